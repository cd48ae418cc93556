"""Can annotations be language? Boxes written as text by a VLM vs a box-regression head, on the same encoder and data.

The task is MiniGPT-v2's ``[refer]``: a phrase naming a defect kind of one of the bundled inspection tiles → its box.
Training: the benchmark's 404 ``[refer]`` instructions of its training tiles; test: all 209 of its held-out test
tiles. Every arm sees the same frozen visual encoder (RepVGG-A0 pre-trained on the bundled textures, its stride-16
level: 8x8 tokens of 192 channels at 128 px) and is scored by the same rule: a box with IoU > 0.5 with the target;
an answer with no valid box is wrong (and counted as malformed).

Arms (``--arms``):
    text            MiniGPT-v2 on SmolLM2-135M-Instruct: 4 tokens grouped → Linear; stage 1 the projector
                    (``--align-steps``), stage 2 projector + LoRA r 64 on q/v (``--steps``); the box as
                    ``{<x1><y1><x2><y2>}`` text, greedy decoding
    text-random     the same with the LLM's weights random (same architecture and tokenizer)
    text-projector  the same with no LoRA: the projector is all that trains (the LLM stays as pretrained)
    text-qformer    MiniGPT-4's design: a Q-Former (16 queries, 2 layers) + Linear instead of grouping, LoRA too
    regression      the same 16 grouped tokens → Linear(768→256) and a learned query per defect kind → a 2-layer
                    transformer encoder (width 256) → the query's 4 box numbers (sigmoid, cx cy w h), L1 + GIoU
                    loss (DETR's weights 5 and 2); ``--steps + --align-steps`` steps of the same batch size, and
                    ``--long`` x that many in the ``regression-long`` row
    dense-frozen    the same frozen encoder (all four RepVGG-A0 levels, eval mode, its own normalisation) under a
                    trained YOLOv6-n neck + head: a dense spatial output on the frozen encoder (Mask Frozen-DETR's
                    frozen backbone + trainable head), 30 epochs, answers by the templates as ``detector``
    detector        YOLOv6-n (``frugalvision detect train data=defects``, ``--detector-epochs`` 30, seed 0)
                    and the data's answer template: its highest-scoring box of the kind asked (no language model)
    prior           the training set's mean box of the kind asked (what the box alone gives)

Rows go to ``experiments/results/vlm_grounding.jsonl`` as each (arm, seed) finishes; ``--table`` writes
``vlm_grounding.md``. The commands used for the committed table are in ``docs/vlm.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = Path(os.environ.get("FV_RUNS", "runs")) / "vlm_grounding"
ARMS = ("text", "text-random", "text-projector", "text-qformer", "regression", "dense-frozen", "detector", "prior")


def data() -> tuple[list, list]:
    from frugalvision.language.instructions import inspection_instructions

    return inspection_instructions("train", tasks=["refer"]), inspection_instructions("test", tasks=["refer"])


def score(test: list, answers: list[str]) -> dict:
    """Accuracy at IoU > 0.5, the malformed rate (the project's scorer) and the mean IoU of the answers."""
    import contextlib

    from frugalvision.language.metrics import _answer_boxes, box_iou, score_answers

    with contextlib.redirect_stdout(None):
        s = score_answers(test, answers)["refer"]
    ious = []
    for inst, ans in zip(test, answers, strict=True):
        boxes = _answer_boxes(ans, inst.width, inst.height)
        ious.append(box_iou(boxes[0], inst.boxes[0]) if boxes else 0.0)
    return {"acc": 100 * float(s["acc"]), "malformed": 100 * float(s["malformed"]), "miou": 100 * float(np.mean(ious)),
            "distinct_answers": len(set(answers))}


def box_text(box: list[float], w: int, h: int) -> str:
    from frugalvision.language.instructions import _box_text

    return _box_text(box, w, h)


# ------------------------------------------------------------------------------------------------ arms
def run_text(arm: str, seed: int, args: argparse.Namespace, test: list) -> dict:
    from frugalvision.pipelines.vlm import VLMConfig, run_vlm

    out = RUNS / f"{arm}{args.tag}-s{seed}"
    cfg = VLMConfig(action=["train"], data="inspection", tasks=["refer"], out=str(out), overwrite=True, seed=seed,
                    stages="align:refer,mixed:refer", steps=[args.align_steps, args.steps], batch_size=8,
                    threads=args.threads, progress=False, test_batch_size=16,
                    llm_init="random" if arm == "text-random" else "pretrained",
                    lora=arm != "text-projector", arch="minigpt4" if arm == "text-qformer" else "minigpt_v2",
                    visual=args.visual, visual_weights=args.visual_weights, visual_stride=args.visual_stride)
    res = run_vlm(cfg)
    answers = [json.loads(line)["prediction"] for line in (out / "answers.jsonl").read_text().splitlines()]
    hist = json.loads((out / "history.json").read_text())
    trainable = max(s.get("trainable_params", 0) for s in hist["stages"])
    return {**score(test, answers), "train_s": res["train_seconds"], "trainable_m": trainable / 1e6,
            "steps": args.align_steps + args.steps, "answer_s": json.loads((out / "metrics.json").read_text())[
                "answer_seconds"], "examples": answers[:3]}


class BoxHead(torch.nn.Module):
    """Grouped visual tokens + one learned query per kind → a 2-layer transformer encoder → a box (cx, cy, w, h)."""

    def __init__(self, in_dim: int, kinds: int, tokens: int, width: int = 256) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, width)
        self.pos = torch.nn.Parameter(torch.zeros(1, tokens, width))
        self.query = torch.nn.Embedding(kinds, width)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, 4))
        torch.nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.query(kind)[:, None], self.proj(tokens) + self.pos], 1)
        cxcywh = self.out(self.body(x)[:, 0]).sigmoid()
        c, s = cxcywh[:, :2], cxcywh[:, 2:]
        return torch.cat([c - s / 2, c + s / 2], 1).clamp(0, 1)


def encoder_tokens(insts: list, visual: str = "repvgg_a0", weights: str = "textures") -> tuple[torch.Tensor, dict]:
    """The frozen encoder's grouped tokens of each instruction's image (the VLM's visual input before its Linear)."""
    from frugalvision.language.minigpt_v2 import group_tokens
    from frugalvision.language.training import _ImageCache
    from frugalvision.language.visual import FeatureLevel
    from frugalvision.pipelines.classification import pretrain_backbone

    enc = FeatureLevel(visual, stride=16)
    enc.load_classifier(pretrain_backbone(visual, progress=False) if weights == "textures" else weights)
    enc.eval()
    cache = _ImageCache(128, enc.mean, enc.std)
    out = []
    with torch.no_grad():
        for i in range(0, len(insts), 32):
            x = torch.stack([cache(inst) for inst in insts[i:i + 32]])
            f = enc(x)
            t = f.flatten(2).transpose(1, 2)
            out.append(group_tokens(t, (f.shape[2], f.shape[3]), "raster"))
    return torch.cat(out), {"params_m": sum(p.numel() for p in enc.parameters()) / 1e6}


def run_regression(seed: int, steps: int, train: list, test: list, feats: tuple) -> dict:
    from torchvision.ops import generalized_box_iou_loss

    (ftr, fte) = feats
    kinds = sorted({i.label for i in train})
    ktr = torch.tensor([kinds.index(i.label) for i in train])
    kte = torch.tensor([kinds.index(i.label) if i.label in kinds else 0 for i in test])
    ytr = torch.tensor([[b[0] / i.width, b[1] / i.height, b[2] / i.width, b[3] / i.height]
                        for i in train for b in i.boxes[:1]], dtype=torch.float32)
    torch.manual_seed(seed)
    head = BoxHead(ftr.shape[2], len(kinds), ftr.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    warm = max(1, steps // 10)
    def factor(s: int) -> float:  # 10 % linear warm-up, then cosine to 10 %, as the VLM stages
        return (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)
    t0, pos = time.perf_counter(), 0
    head.train()
    for _ in range(steps):
        if pos + 8 > len(order):
            order, pos = torch.randperm(len(train), generator=g), 0
        idx = order[pos:pos + 8]
        pos += 8
        pred = head(ftr[idx], ktr[idx])
        loss = 5 * (pred - ytr[idx]).abs().sum(1).mean() + 2 * generalized_box_iou_loss(pred, ytr[idx], "mean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    head.eval()
    with torch.no_grad():
        pred = head(fte, kte)
    answers = [box_text([float(p[0]) * i.width, float(p[1]) * i.height, float(p[2]) * i.width,
                         float(p[3]) * i.height], i.width, i.height) for p, i in zip(pred, test, strict=True)]
    return {**score(test, answers), "train_s": round(train_s, 1), "steps": steps,
            "trainable_m": sum(p.numel() for p in head.parameters()) / 1e6, "examples": answers[:3]}


def run_prior(train: list, test: list) -> dict:
    by_kind: dict[str, list] = {}
    for i in train:
        b = i.boxes[0]
        by_kind.setdefault(i.label, []).append([b[0] / i.width, b[1] / i.height, b[2] / i.width, b[3] / i.height])
    mean = {k: np.mean(v, 0) for k, v in by_kind.items()}
    every = np.mean([b for v in by_kind.values() for b in v], 0)
    answers = []
    for i in test:
        m = mean.get(i.label, every)
        answers.append(box_text([m[0] * i.width, m[1] * i.height, m[2] * i.width, m[3] * i.height], i.width, i.height))
    return {**score(test, answers), "train_s": 0.0, "trainable_m": 0.0, "steps": 0, "examples": answers[:3]}


class _FrozenNormalized(torch.nn.Module):
    """A frozen backbone that normalises [0, 1] pixels as it was trained to read them and stays in eval mode."""

    def __init__(self, inner: torch.nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.inner, self.feature_info = inner.eval(), inner.feature_info
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        for p in self.inner.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenNormalized:
        self.training = mode  # the frozen backbone itself stays in eval mode (its BatchNorm statistics unchanged)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inner((x - self.mean) / self.std)


def run_dense_frozen(seed: int, args: argparse.Namespace, test: list) -> dict:
    from frugalvision.data.transforms import data_config_of
    from frugalvision.detect.datasets import defect_boxset
    from frugalvision.detect.infer import detect_images
    from frugalvision.detect.train import DetectTrainConfig, fit_detector
    from frugalvision.detect.yolov6 import create_detector
    from frugalvision.language.metrics import template_answers
    from frugalvision.models.factory import load_backbone_weights
    from frugalvision.pipelines.classification import pretrain_backbone

    train = defect_boxset("train")
    torch.manual_seed(seed)
    det = create_detector("yolov6_n", num_classes=len(train.class_names), backbone=args.visual)
    load_backbone_weights(det.backbone, pretrain_backbone(args.visual, progress=False))
    for m in det.backbone.modules():  # YOLOv6 sets eps 1e-3 everywhere: the frozen encoder keeps its own numerics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-5
    dc = data_config_of(det.backbone)
    det.backbone = _FrozenNormalized(det.backbone, list(dc["mean"]), list(dc["std"]))
    cfg = DetectTrainConfig(img_size=128, epochs=args.detector_epochs, batch_size=16, optimizer="adamw", lr=0.002,
                            weight_decay=0.05, ema_tau=200.0, device="cpu", seed=seed, progress=False)
    res = fit_detector(det, train, cfg)
    model = res.model.cpu().eval()
    samples = {}
    for inst in test:
        samples.setdefault(inst.key, inst)
    dets = detect_images(model, [Path(i.image) for i in samples.values()], 128, 128, 64, conf_thres=0.001,
                         device="cpu", progress=False)
    preds = {k: (d["boxes"], d["labels"], d["scores"]) for k, d in zip(samples, dets, strict=True)}
    answers = template_answers(test, preds, class_names=list(train.class_names), score_threshold=0.25)
    trainable = sum(p.numel() for p in det.parameters() if p.requires_grad) / 1e6
    return {**score(test, answers), "train_s": round(res.train_seconds, 1), "steps": res.steps,
            "trainable_m": trainable, "examples": answers[:3]}


def run_detector(args: argparse.Namespace, test: list) -> dict:
    from frugalvision.pipelines.detection import DetectConfig, run_detect
    from frugalvision.pipelines.vlm import detector_answers

    out = RUNS / "detector-s0"
    t0 = time.perf_counter()
    if not (out / "model.safetensors").is_file():
        run_detect(DetectConfig(action=["train"], data="defects", model="yolov6_n", epochs=args.detector_epochs,
                                out=str(out), overwrite=True, seed=0, progress=False, threads=args.threads))
    train_s = time.perf_counter() - t0
    answers, _ = detector_answers(str(out / "model.safetensors"), test, "cpu", False)
    return {**score(test, answers), "train_s": round(train_s, 1), "steps": 0, "examples": answers[:3]}


# ------------------------------------------------------------------------------------------------ table
def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[tuple[str, str], list] = {}
    for r in rows:
        enc = r.get("encoder") or ("repvgg_a0" if r["arm"].startswith(("text", "regression", "dense")) else "—")
        by.setdefault((enc, r["arm"]), []).append(r)
    head = rows[0] if rows else {}
    out = ["# Boxes as text (MiniGPT-v2 on SmolLM2) vs a box-regression head, `[refer]` on the bundled defects", "",
           f"{head.get('train', '?')} training / {head.get('test', '?')} test `[refer]` instructions (all of the "
           f"benchmark's); every arm but `detector` and `prior` reads the frozen encoder of its row (RepVGG-A0 "
           "pre-trained on the bundled textures, or the trained detector's backbone): the text and regression arms its "
           "stride-16 tokens, `dense-frozen` all its levels; "
           f"{head.get('machine', '?')}, {head.get('threads', '?')} thread per job, {head.get('date', '?')}. "
           "Accuracy: IoU > 0.5 with the target box (an answer without a valid box is wrong); mean ± std over seeds. "
           "Commands: docs/vlm.md.",
           "", "| arm | frozen encoder | seeds | acc IoU>0.5 % | mean IoU % | malformed % | distinct answers | "
           "trainable M | steps (batch 8) | train s |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(vals: list[float]) -> str:
        return f"{np.mean(vals):.1f}" + (f" ± {np.std(vals):.1f}" if len(vals) > 1 else "")

    def trainable(arm: str, rs: list) -> str:
        return "all (end to end)" if arm == "detector" else f"{np.mean([r.get('trainable_m', 0) for r in rs]):.2f}"

    def steps(arm: str, rs: list) -> str:
        if arm == "detector":
            return "30 epochs"
        return str(rs[0].get("steps", 0)) + (" (batch 16)" if arm == "dense-frozen" else "")

    order = ["text", "text-random", "text-projector", "text-qformer", "regression", "regression-long", "dense-frozen",
             "detector", "prior"]
    for enc, arm in sorted(by, key=lambda k: (order.index(k[1]) if k[1] in order else 99, "detector" in k[0])):
        rs = by[(enc, arm)]
        out.append(f"| {arm} | {enc} | {len(rs)} | {ms([r['acc'] for r in rs])} | {ms([r['miou'] for r in rs])} | "
                   f"{ms([r['malformed'] for r in rs])} | {np.mean([r['distinct_answers'] for r in rs]):.0f} | "
                   f"{trainable(arm, rs)} | {steps(arm, rs)} | "
                   f"{np.mean([r['train_s'] for r in rs]):.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--align-steps", type=int, default=40, help="stage 1 (projector only) steps of the text arms")
    ap.add_argument("--steps", type=int, default=120, help="stage 2 (projector + LoRA) steps of the text arms")
    ap.add_argument("--long", type=int, default=20, help="regression-long trains this many times longer")
    ap.add_argument("--detector-epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--visual", default="repvgg_a0", help="the frozen encoder (text and regression arms)")
    ap.add_argument("--visual-weights", default="textures",
                    help="textures, or a detector model file whose backbone is --visual")
    ap.add_argument("--visual-stride", type=int, default=16,
                    help="the text arms' feature level: 16 = 64 visual tokens (16 LLM tokens), 8 = 256 (64)")
    ap.add_argument("--tag", default="", help="suffix of the text arms' run folders")
    ap.add_argument("--out", default=str(RESULTS / "vlm_grounding.jsonl"))
    ap.add_argument("--table", action="store_true", help="only write the .md table from the jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(table(out))
        print(out.with_suffix(".md").read_text())
        return
    torch.set_num_threads(args.threads)
    train, test = data()
    base = {"train": len(train), "test": len(test), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    feats = None
    encoder = args.visual + ("" if args.visual_weights == "textures" else " (detector backbone)")
    if args.visual_stride != 16:
        if any(not a.startswith("text") for a in args.arms):
            ap.error("--visual-stride applies to the text arms only")
        encoder += f" stride {args.visual_stride}"
    for arm in args.arms:
        seeds = [0] if arm in ("detector", "prior") else args.seeds
        for seed in seeds:
            t0 = time.perf_counter()
            if arm.startswith("text"):
                rows = [("arm", run_text(arm, seed, args, test))]
            elif arm == "regression":
                if feats is None:
                    feats = (encoder_tokens(train, args.visual, args.visual_weights)[0],
                             encoder_tokens(test, args.visual, args.visual_weights)[0])
                n = args.align_steps + args.steps
                rows = [("regression", run_regression(seed, n, train, test, feats)),
                        ("regression-long", run_regression(seed, n * args.long, train, test, feats))]
            elif arm == "prior":
                rows = [("prior", run_prior(train, test))]
            elif arm == "dense-frozen":
                rows = [("dense-frozen", run_dense_frozen(seed, args, test))]
            else:
                rows = [("detector", run_detector(args, test))]
            for name, r in rows:
                name = arm if name == "arm" else name
                enc = encoder if arm.startswith(("text", "regression", "dense")) else "—"
                row = {**base, "arm": name, "encoder": enc, "seed": seed, **r,
                       "wall_s": round(time.perf_counter() - t0, 1)}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)


if __name__ == "__main__":
    main()

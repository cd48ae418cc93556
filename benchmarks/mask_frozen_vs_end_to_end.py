"""Mask Frozen (frozen YOLOv6-N + trained mask head) vs an end-to-end Mask R-CNN at matched training wall-clock.

Data: :func:`frugalvision.detect.datasets.defect_boxset` — train: 300 texture tiles with 1-2 rendered defects each
(467 instances, 7 defect kinds); test: the bundled benchmark's 210 defect tiles + 20 good tiles (211 instances);
no test pixel is in a training image. Every model starts from random weights: no pretrained weights anywhere.

Per seed:

(a) **Mask Frozen.** YOLOv6-N trained on the boxes with ``fit_detector`` for ``--det-budget`` seconds (AdamW
    lr 2e-3 + EMA) -> ``T_det``; frozen; the mask head trained with ``fit_mask_head`` for ``--head-budget`` seconds
    (or ``--head-epochs``, whichever ends first) -> ``T_head`` (the frozen detector's forward passes inside the
    head's training are counted in ``T_head``). **The frozen recipe's training time is ``T_head``**: as in the paper the
    detector is assumed given (trained once for boxes, reused); ``T_det + T_head`` is reported too.
(b) **End-to-end Mask R-CNN** (torchvision ``MaskRCNN``, light for 2 CPU cores: the same EfficientRep-N
    backbone as YOLOv6-N (BatchNorm, random init), an FPN of 64 channels on strides 8/16/32 + a max-pool level,
    anchors 8-128 px, box head 2x256 FC, mask head 4x64 conv, 28x28 masks; 4.7 M parameters vs YOLOv6-N's
    5.0 M + the mask head's 0.16 M), AdamW, warm-up + cosine compressed into its budget,
    the same letterbox size and augmentation as the detector. Trained for ``k x T_head`` seconds for each ``k`` in
    ``--e2e-mult`` (default 1 and 10) and, when it differs from ``10 x T_head`` by more than 10 %, for
    ``T_det + T_head`` (by default ``--det-budget`` = 9 x ``--head-budget``, so ``10 x T_head`` ~ ``T_det + T_head``).

Metrics: COCO box and mask AP / AP50 (pycocotools), masks pasted at the test images' own pixels. Both methods keep
at most 50 detections per image (score >= 0.001). The budgets are wall-clock on a shared machine: other load
slows both alike only on average, so each arm's steps are reported too.

Run (prints an estimate first; ``--quick`` is a tiny smoke run)::

    python benchmarks/mask_frozen_vs_end_to_end.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frugalvision.bench import machine_info, result_header
from frugalvision.data.detection import BoxSet, DetectionDataset, detection_collate, to_original, write_coco
from frugalvision.detect.coco_eval import coco_metrics, detections_to_coco
from frugalvision.detect.datasets import defect_boxset
from frugalvision.detect.mask_frozen import MaskFrozen, MaskTrainConfig, evaluate_masks, fit_mask_head
from frugalvision.detect.train import DetectTrainConfig, _lr_factor, evaluate_detector, fit_detector
from frugalvision.detect.yolov6 import create_detector
from frugalvision.utils.io import atomic_write_text

MAX_DET = 50


# ------------------------------------------------------------------------------------------- end-to-end model
class TimmFPN(nn.Module):
    """A timm ``features_only`` backbone (strides 8, 16, 32) + torchvision FPN with a max-pool level, for MaskRCNN."""

    def __init__(self, name: str = "efficientrep_n", out_channels: int = 64) -> None:
        super().__init__()
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        import frugalvision.models  # noqa: F401  (registers efficientrep_* in timm)

        probe = timm.create_model(name, pretrained=False, features_only=True)
        red = list(probe.feature_info.reduction())
        idx = [probe.feature_info.out_indices[red.index(r)] for r in (8, 16, 32)]
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=idx)
        self.fpn = FeaturePyramidNetwork(list(self.body.feature_info.channels()), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """FPN maps ``0``, ``1``, ``2`` (strides 8, 16, 32) and ``pool`` (64)."""
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_e2e(num_classes: int, backbone: str = "efficientrep_n") -> nn.Module:
    """A light torchvision Mask R-CNN from random weights on a timm backbone (see the module docstring)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    names = ["0", "1", "2"]
    anchors = AnchorGenerator(((8, 16), (24, 32), (48, 64), (96, 128)), ((0.5, 1.0, 2.0),) * 4)
    return MaskRCNN(TimmFPN(backbone, 64), num_classes=None, min_size=128, max_size=128,
                    rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
                    box_head=TwoMLPHead(64 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes + 1),
                    mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), mask_head=MaskRCNNHeads(64, [64, 64, 64, 64], 1),
                    mask_predictor=MaskRCNNPredictor(64, 64, num_classes + 1),
                    rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                    rpn_post_nms_top_n_test=300, box_batch_size_per_image=128, box_detections_per_img=MAX_DET,
                    box_score_thresh=0.001)


def fit_e2e(model: nn.Module, train: BoxSet, img_size: int, budget_s: float, batch_size: int, lr: float, seed: int,
            device: torch.device, progress: bool) -> dict[str, Any]:
    """Train for ``budget_s`` seconds of wall-clock (the schedule compressed into it)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    ds = DetectionDataset(train, img_size=img_size, train=True, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=detection_collate,
                                         generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    model.to(device).train()
    step, epoch, start = 0, 0, time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(desc=f"train e2e ({budget_s:.0f} s)", total=round(budget_s), disable=not progress, unit="s")
    done = False
    while not done:
        ds.set_epoch(epoch)
        for images, targets in loader:
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                done = True
                break
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(elapsed / budget_s, 0.05, 0.01)
            tg = [{"boxes": t["boxes"].to(device), "labels": (t["labels"] + 1).to(device),
                   "masks": t["masks"].to(device)} for t in targets]
            losses = model([im.to(device) for im in images], tg)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"end-to-end loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            step += 1
            last = {k: round(v.item(), 4) for k, v in losses.items()}
            bar.n = min(round(time.perf_counter() - start), bar.total)
            bar.set_postfix(loss=f"{loss.item():.3f}", step=step)
        epoch += 1
    bar.close()
    return {"seconds": time.perf_counter() - start, "steps": step, "epochs": step / len(loader), "losses": last}


def _unletterbox(masks: torch.Tensor, tgt: dict[str, Any]) -> torch.Tensor:
    """``(K, S, S)`` masks on the letterboxed input -> ``(K, h, w)`` on the sample's pixels."""
    w, h = (int(v) for v in tgt["orig_size"])
    s = float(tgt["scale"])
    px, py = (round(float(v)) for v in tgt["pad"])
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    crop = masks[:, py:py + nh, px:px + nw]
    if len(crop) == 0:
        return masks.new_zeros((0, h, w))
    return F.interpolate(crop[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def evaluate_e2e(model: nn.Module, test: BoxSet, img_size: int, device: torch.device) -> dict[str, Any]:
    """COCO box and mask metrics, masks at the samples' own pixels."""
    model.to(device).eval()
    ds = DetectionDataset(test, img_size=img_size, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, collate_fn=detection_collate)
    results = []
    t0 = time.perf_counter()
    for images, targets in loader:
        outs = model([im.to(device) for im in images])
        for o, tgt in zip(outs, targets, strict=True):
            det = {"boxes": to_original(o["boxes"].cpu(), tgt), "scores": o["scores"].cpu(),
                   "labels": o["labels"].cpu() - 1}
            masks = _unletterbox(o["masks"][:, 0].cpu(), tgt) >= 0.5
            results.extend(detections_to_coco(int(tgt["image_id"]), det, masks=masks.numpy()))
    gt = _gt(test)
    box, segm = coco_metrics(gt, results, "bbox"), coco_metrics(gt, results, "segm")
    return {"AP": box["AP"], "AP50": box["AP50"], "mask_AP": segm["AP"], "mask_AP50": segm["AP50"],
            "mask_AP75": segm["AP75"], "eval_seconds": round(time.perf_counter() - t0, 1)}


def _gt(test: BoxSet) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(write_coco(test, Path(tmp) / "gt.json").read_text())


# ------------------------------------------------------------------------------------------- one seed
def run_seed(seed: int, train: BoxSet, test: BoxSet, args: argparse.Namespace, device: torch.device,
             log: Any, ablate: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": seed}
    torch.manual_seed(seed)
    det = create_detector("yolov6_n", num_classes=len(train.class_names))
    dcfg = DetectTrainConfig(img_size=args.img_size, epochs=10_000, time_budget_s=args.det_budget,
                             batch_size=args.batch, optimizer="adamw", lr=0.002, weight_decay=0.05, ema_tau=200.0,
                             device=str(device), seed=seed, progress=args.progress)
    res = fit_detector(det, train, dcfg)
    m = evaluate_detector(res.model, test, args.img_size, device=device, max_det=MAX_DET, progress=False)
    out["detector"] = {"seconds": round(res.train_seconds, 1), "steps": res.steps,
                       "epochs": round(res.epochs_done, 2), "AP": m["AP"], "AP50": m["AP50"]}
    log(f"seed {seed} detector: {out['detector']}")

    def head(variant: dict[str, Any], tag: str) -> tuple[MaskFrozen, dict[str, Any]]:
        torch.manual_seed(seed)
        model = MaskFrozen(res.model, **variant)
        hcfg = MaskTrainConfig(img_size=args.img_size, epochs=args.head_epochs, time_budget_s=args.head_budget,
                               batch_size=args.batch, device=str(device), seed=seed, progress=args.progress)
        hres = fit_mask_head(model, train, hcfg)
        mm = evaluate_masks(model, test, args.img_size, device=device, max_det=MAX_DET, progress=False)
        row = {"seconds": round(hres.train_seconds, 1), "steps": hres.steps, "epochs": round(hres.epochs_done, 2),
               "AP": mm["AP"], "AP50": mm["AP50"], "mask_AP": mm["mask_AP"], "mask_AP50": mm["mask_AP50"],
               "mask_AP75": mm["mask_AP75"],
               "final_loss": next((h["loss"] for h in reversed(hres.history) if "loss" in h), None)}
        log(f"seed {seed} head {tag}: {row}")
        return model, row

    _, out["frozen"] = head({}, "default")
    t_head = out["frozen"]["seconds"]
    if ablate:  # the head's design choices, on this seed's detector, same budget
        out["ablation"] = {tag: head(variant, tag)[1] for tag, variant in (
            ("anchor-level crops", {"mask_roi": "anchor_level"}), ("no image pixels", {"mask_pixels": False}),
            ("mask-IoU rescoring", {"mask_rescore": True}))}
    t_total = out["detector"]["seconds"] + t_head
    budgets = {f"{k:g}x T_head": k * t_head for k in args.e2e_mult}
    if all(abs(b - t_total) > 0.1 * t_total for b in budgets.values()):
        budgets["T_det + T_head"] = t_total
    out["e2e"] = {}
    for tag, budget in budgets.items():
        torch.manual_seed(seed)
        e2e = build_e2e(len(train.class_names))
        fr = fit_e2e(e2e, train, args.img_size, budget, args.e2e_batch, args.e2e_lr, seed, device, args.progress)
        em = evaluate_e2e(e2e, test, args.img_size, device)
        out["e2e"][tag] = {"budget": round(budget, 1), "seconds": round(fr["seconds"], 1), "steps": fr["steps"],
                           "epochs": round(fr["epochs"], 2), **em}
        log(f"seed {seed} e2e {tag}: {out['e2e'][tag]}")
    return out


# ------------------------------------------------------------------------------------------- report
def _ms(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def report(runs: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    rows = []
    for r in runs:
        d, f = r["detector"], r["frozen"]
        rows.append(f"| {r['seed']} | Mask Frozen (head only) | {f['seconds']:.0f} | {f['steps']} | {f['AP']:.2f} | "
                    f"{f['mask_AP']:.2f} | {f['mask_AP50']:.2f} |")
        rows.append(f"| {r['seed']} | Mask Frozen (detector + head) | {d['seconds'] + f['seconds']:.0f} | "
                    f"{d['steps']} + {f['steps']} | {d['AP']:.2f} (detector) | {f['mask_AP']:.2f} | "
                    f"{f['mask_AP50']:.2f} |")
        for tag, e in r["e2e"].items():
            rows.append(f"| {r['seed']} | Mask R-CNN e2e @ {tag} | {e['seconds']:.0f} | {e['steps']} | {e['AP']:.2f} | "
                        f"{e['mask_AP']:.2f} | {e['mask_AP50']:.2f} |")
    per_seed = ["| seed | method | train s | steps | box AP | mask AP | mask AP50 |", "|---|---|---|---|---|---|---|",
                *rows]

    def col(getter: Any) -> list[float]:
        return [float(getter(r)) for r in runs]

    summary = ["| method | train s | box AP | mask AP | mask AP50 |", "|---|---|---|---|---|"]
    summary.append(f"| Mask Frozen: head only (T_head) | {_ms(col(lambda r: r['frozen']['seconds']))} | "
                   f"{_ms(col(lambda r: r['frozen']['AP']))} | {_ms(col(lambda r: r['frozen']['mask_AP']))} | "
                   f"{_ms(col(lambda r: r['frozen']['mask_AP50']))} |")
    summary.append(f"| Mask Frozen: detector + head (T_det + T_head) | "
                   f"{_ms(col(lambda r: r['detector']['seconds'] + r['frozen']['seconds']))} | "
                   f"{_ms(col(lambda r: r['detector']['AP']))} (detector alone) | same | same |")
    tags = list(runs[0]["e2e"]) if runs else []
    for tag in tags:
        summary.append(f"| Mask R-CNN end-to-end @ {tag} | {_ms(col(lambda r, t=tag: r['e2e'][t]['seconds']))} | "
                       f"{_ms(col(lambda r, t=tag: r['e2e'][t]['AP']))} | "
                       f"{_ms(col(lambda r, t=tag: r['e2e'][t]['mask_AP']))} | "
                       f"{_ms(col(lambda r, t=tag: r['e2e'][t]['mask_AP50']))} |")
    frozen = statistics.mean(col(lambda r: r["frozen"]["mask_AP"])) if runs else float("nan")
    verdict = []
    for tag in tags:
        e2e = statistics.mean(col(lambda r, t=tag: r["e2e"][t]["mask_AP"]))
        verdict.append(f"{'reaches' if frozen >= e2e else 'does not reach'} the end-to-end mask AP at {tag} "
                       f"({frozen:.2f} vs {e2e:.2f})")
    ten = next((t for t in tags if t.startswith("10x")), None)
    claim = "n/a"
    if ten is not None:
        e2e10 = statistics.mean(col(lambda r: r["e2e"][ten]["mask_AP"]))
        claim = ("**yes**" if frozen >= e2e10 else "**no**") + (
            f": with T_head of training the frozen recipe's mask AP is {frozen:.2f}, the end-to-end model's after "
            f"10x T_head is {e2e10:.2f}")
    notes = [
        "Mask Frozen (frozen YOLOv6-N + mask head, `frugalvision.detect.mask_frozen`) vs an end-to-end Mask R-CNN "
        "(torchvision `MaskRCNN`, EfficientRep-N backbone as YOLOv6-N, FPN-64) on `defect_boxset` (train: 300 "
        "tiles / 467 instances rendered on the benchmark's train tiles; test: the benchmark's 210 defect + 20 good "
        "tiles, 211 instances). No pretrained weights anywhere: every network starts from random init. "
        f"Image size {args.img_size}, at most {MAX_DET} detections per image, COCO AP (pycocotools), masks at the "
        "images' own pixels.",
        f"Budgets: detector {args.det_budget:g} s (`fit_detector`, AdamW lr 2e-3, EMA), mask head "
        f"{args.head_budget:g} s or {args.head_epochs} epochs (`fit_mask_head`, AdamW; the frozen detector's forward "
        "passes are inside T_head). **The frozen recipe's training time is T_head** (the detector is given, as in "
        "the paper); T_det + T_head is the cost when the detector has to be trained too. The end-to-end model "
        "trains for k x T_head of wall-clock (AdamW, warm-up + cosine compressed into the budget), k in "
        f"{', '.join(f'{k:g}' for k in args.e2e_mult)}; 10x T_head equals T_det + T_head up to 10 % by the "
        "choice det budget = 9 x head budget (else an extra run at T_det + T_head).",
        f"Does the frozen recipe reach the end-to-end mask AP with >= 10x less training time here? {claim}. "
        + ("; ".join(verdict) + "." if verdict else ""),
        f"Whole run: {elapsed / 60:.1f} min. Wall-clock budgets on a machine shared with other jobs: steps per "
        "arm are listed to show how much work each budget bought.",
    ]
    md = result_header("Mask Frozen vs end-to-end Mask R-CNN: mask AP at matched training time",
                       machine_info(args.device), sys.argv, notes)
    md += "\n## Mean ± std over seeds\n\n" + "\n".join(summary) + "\n\n## Per seed\n\n" + "\n".join(per_seed) + "\n"
    if runs and "ablation" in runs[0]:
        md += "\n## Mask head design (seed " + str(runs[0]["seed"]) + ", same detector)\n\n"
        md += "| head | mask AP | mask AP50 | box AP |\n|---|---|---|---|\n"
        f = runs[0]["frozen"]
        md += f"| default (P3 crops, image pixels, no rescoring) | {f['mask_AP']:.2f} | {f['mask_AP50']:.2f} | " \
              f"{f['AP']:.2f} |\n"
        for tag, a in runs[0]["ablation"].items():
            md += f"| {tag} | {a['mask_AP']:.2f} | {a['mask_AP50']:.2f} | {a['AP']:.2f} |\n"
    return md


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--det-budget", type=float, default=270.0, help="detector training seconds")
    p.add_argument("--head-budget", type=float, default=30.0, help="mask head training seconds (cap)")
    p.add_argument("--head-epochs", type=int, default=100, help="mask head epochs (cap)")
    p.add_argument("--e2e-mult", default="1,10", help="end-to-end budgets as multiples of T_head")
    p.add_argument("--e2e-lr", type=float, default=1e-3)
    p.add_argument("--e2e-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ablate", action="store_true", help="also train head variants on the first seed")
    p.add_argument("--quick", action="store_true", help="tiny data and budgets: a smoke test of the script")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/mask_frozen")
    args = p.parse_args(argv)
    args.e2e_mult = [float(v) for v in args.e2e_mult.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        train = defect_boxset("train", categories="grass", tiles=8)
        test = defect_boxset("test", categories="grass", test_good=1)
    else:
        train, test = defect_boxset("train", progress=True), defect_boxset("test")
    eval_s = 5 if args.quick else 25
    per_seed = args.det_budget + args.head_budget * (1 + sum(args.e2e_mult)) + (2 + len(args.e2e_mult)) * eval_s
    total = len(seeds) * per_seed + (3 * (args.head_budget + eval_s) if args.ablate else 0)
    print(f"train {len(train)} images / {train.num_boxes()} instances, test {len(test)} / {test.num_boxes()}; "
          f"{len(seeds)} seed(s); estimate ~{per_seed / 60:.1f} min per seed, ~{total / 60:.0f} min "
          f"in all (detector {args.det_budget:g} s, head <= {args.head_budget:g} s, end-to-end "
          f"{', '.join(f'{k:g}x' for k in args.e2e_mult)} T_head)", flush=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    runs = []
    out = Path(args.out)
    for i, seed in enumerate(seeds):
        runs.append(run_seed(seed, train, test, args, device, log, ablate=args.ablate and i == 0))
        md = report(runs, args, time.perf_counter() - start)  # written after every seed: a partial table survives
        atomic_write_text(out.with_suffix(".md"), md)
        atomic_write_text(out.with_suffix(".json"), json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                                 "runs": runs}, indent=1, default=str) + "\n")
    print(report(runs, args, time.perf_counter() - start))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

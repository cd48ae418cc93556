"""A first look at SLiMe on the small backbone trained here (not the issue's experiment: one category, few seeds).

Fits SLiMe's part embeddings on ONE annotated defect tile of the bundled benchmark (background + defect) and
segments the other test tiles of the same category and kind; reports the defect IoU and the per-image mIoU, next
to the same procedure on the backbone with random weights (is anything learnt from the pretraining?) and the
trivial all-background answer.

    frugalvision slime pretrain run=runs/slime/backbone steps=1000 samples=2000
    python experiments/slime_first_look.py --backbone runs/slime/backbone/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from frugalvision.bench.core import result_header
from frugalvision.inspect.bundled import load_benchmark
from frugalvision.inspect.slime import Slime, SlimeConfig, mean_iou
from frugalvision.inspect.text_diffusion import MiniLMStates, TextDiffusion, TextDiffusionBackbone, load_text_diffusion
from frugalvision.pipelines.common import read_rgb
from frugalvision.pipelines.slime import read_mask
from frugalvision.utils.io import atomic_write_text


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def run(backbone, samples, shots: list[int], seed: int, epochs: int) -> dict:
    train = [samples[i] for i in shots]
    test = [s for i, s in enumerate(samples) if i not in shots]
    images = [read_rgb(s.image) for s in train]
    masks = [read_mask(s.mask) for s in train]
    slime = Slime(backbone, SlimeConfig(num_parts=2, epochs=epochs, train_mask_size=32, seed=seed, device="cpu"))
    t0 = time.perf_counter()
    slime.fit(images, masks, progress=False)
    fit_s = time.perf_counter() - t0
    ious, mious, t1 = [], [], time.perf_counter()
    inter = union = 0
    for s in test:
        pred = slime.predict(read_rgb(s.image), seed=seed).numpy().astype(bool)
        gt = read_mask(s.mask).astype(bool)
        inter += (pred & gt).sum()
        union += (pred | gt).sum()
        ious.append(_iou(pred, gt))
        mious.append(mean_iou(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), 2))
    pred_s = (time.perf_counter() - t1) / max(len(test), 1)
    return {"defect_iou": 100 * inter / max(union, 1), "miou": 100 * float(np.mean(mious)), "fit_s": fit_s,
            "predict_s": pred_s, "test_images": len(test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--category", default="brick")
    p.add_argument("--kind", default="crack")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="experiments/results/slime_first_look")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    samples = [s for s in load_benchmark("test", a.category).samples if s.defect == a.kind]
    trained, info = load_text_diffusion(a.backbone)
    states = MiniLMStates(trained.config.max_tokens)
    torch.manual_seed(0)
    backbones = {"pretrained here": TextDiffusionBackbone(trained, states, a.backbone),
                 "random weights": TextDiffusionBackbone(TextDiffusion(trained.config, states.width), states)}
    rows = []
    for name, bb in backbones.items():
        for seed in [int(s) for s in a.seeds.split(",")]:
            shot = seed % len(samples)  # a different annotated tile per seed
            r = run(bb, samples, [shot], seed, a.epochs)
            rows.append({"backbone": name, "seed": seed, "annotated": Path(samples[shot].image).name, **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    all_bg = []
    for s in samples:
        gt = read_mask(s.mask).astype(np.int64)
        all_bg.append(100 * mean_iou(torch.zeros_like(torch.from_numpy(gt)), torch.from_numpy(gt), 2))
    note = (f"Backbone: {a.backbone} ({info.get('steps')} pretraining steps, final train loss "
            f"{info.get('final_train_loss'):.4f}); {a.epochs} SLiMe epochs, train_mask_size 32, official losses.")
    lines = [result_header(f"SLiMe first look: one annotated {a.kind} on {a.category}, segment the other "
                           f"{a.kind}s", command=["python", *sys.argv], notes=[note]), "",
             "| backbone | seed | annotated tile | defect IoU % | mIoU % | fit s | predict s/img |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['seed']} | {r['annotated']} | {r['defect_iou']:.1f} | {r['miou']:.1f} | "
                     f"{r['fit_s']:.0f} | {r['predict_s']:.2f} |")
    lines += ["", f"All-background answer: mIoU {np.mean(all_bg):.1f} %, defect IoU 0.0 %.", ""]
    out = Path(a.out)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Distillation recipe ablation for the all-modulation ViT student of ``surgery_distill.py`` (accuracy only).

Every attention of each seed's original (the cached originals of ``surgery_distill.py``) is replaced by a modulation
mixer, then the student is distilled with one recipe per row: loss weights, feature matching, mixer kernel,
context FCs, epochs. Latency is not measured here (``surgery_distill.py`` measures it side by side); the question is
which recipe closes the accuracy gap.

Run: ``nice -n 5 python experiments/surgery_ablation.py --recipes base nofeat ...`` (about 3 minutes per recipe,
seed and 16 epochs on one core).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import frugalvision as fv
from frugalvision.bench import result_header
from frugalvision.engine import TrainConfig, Trainer, seed_everything
from frugalvision.engine.distill import DistillationTask
from frugalvision.surgery import find_attention_blocks
from frugalvision.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from surgery_distill import _cached_original, _data, acc, add_model_args  # same model, data and evaluation

OUT = Path(__file__).resolve().parent / "results" / "surgery_ablation"

# name -> (description, overrides of the base recipe)
RECIPES: dict[str, tuple[str, dict]] = {
    "base": ("0.5 CE + 1 KD(T=2) + 1 block-output MSE, k=7, context FCs (surgery_distill.py uses k=11)", {}),
    "nofeat": ("no feature matching: 0.5 CE + 1 KD", {"alpha_feat": 0.0}),
    "kdonly": ("logit KD only", {"alpha_feat": 0.0, "alpha_ce": 0.0}),
    "ce": ("no teacher: plain CE on the student", {"alpha_feat": 0.0, "alpha_kd": 0.0, "alpha_ce": 1.0}),
    "feat01": ("feature MSE weight 0.1", {"alpha_feat": 0.1}),
    "t4": ("KD temperature 4", {"temperature": 4.0}),
    "k11": ("context kernel 11", {"kernel_size": 11}),
    "k3": ("context kernel 3", {"kernel_size": 3}),
    "noctxfc": ("context FCs dropped (cheaper mixer)", {"context_fc": False}),
    "lr1e3": ("lr 1e-3", {"lr": 1e-3}),
    "lr4e3": ("lr 4e-3", {"lr": 4e-3}),
    "random": ("mixer initialised randomly instead of from the attention's v/proj", {"init": "random"}),
}
BASE = dict(alpha_ce=0.5, alpha_kd=1.0, alpha_feat=1.0, temperature=2.0, kernel_size=7, context_fc=True, lr=2e-3,
            init="attention")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["base", "nofeat"], choices=sorted(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=100, help="epochs of the cached originals")
    p.add_argument("--distill-epochs", type=int, default=16)
    add_model_args(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT), help="result path without suffix (.md and .csv are written)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.time()

    train, test = _data(args)
    originals, acc_orig = {}, {}
    for seed in args.seeds:
        path = Path(args.original.format(seed=seed, epochs=args.epochs))
        if not path.is_file():
            raise SystemExit(f"{path}: no cached original; run experiments/surgery_distill.py --epochs {args.epochs}"
                             " --originals-only first (it trains and caches them)")
        originals[seed] = _cached_original(args, seed)
        acc_orig[seed] = acc(originals[seed], test)

    rows = []
    for name in args.recipes:
        r = {**BASE, **RECIPES[name][1]}
        for seed in args.seeds:
            seed_everything(seed)
            teacher = originals[seed]
            blocks = find_attention_blocks(teacher)
            student, _ = fv.modulate(teacher, blocks=blocks, kernel_size=r["kernel_size"],
                                     context_fc=r["context_fc"], init=r["init"], measure_after=False, progress=False,
                                     repeats=3, warmup=1)  # the block choice is fixed: timing is not used
            cfg = TrainConfig(epochs=args.distill_epochs, batch_size=64, lr=r["lr"], weight_decay=0.05,
                              warmup_epochs=0.5, grad_clip=1.0, device="cpu", seed=seed)
            task = DistillationTask(teacher, features=blocks if r["alpha_feat"] > 0 else (), alpha_ce=r["alpha_ce"],
                                    alpha_kd=r["alpha_kd"], alpha_feat=r["alpha_feat"], temperature=r["temperature"])
            Trainer(student.train(), cfg, train, None, task).fit()
            rows.append({"recipe": name, "seed": seed, "acc_original": acc_orig[seed],
                         "acc_distilled": acc(student.eval(), test)})
            print(json.dumps(rows[-1]), flush=True)

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    command = "nice -n 5 python experiments/surgery_ablation.py " + " ".join(sys.argv[1:])
    notes = [f"Originals: the cached {args.epochs}-epoch ViTs of `surgery_distill.py` (bundled textures, "
             f"{args.img_size}², patch {args.patch}, width {args.dim}, {args.depth} blocks); every attention replaced; "
             f"{args.distill_epochs} distillation epochs (AdamW, warm-up 0.5 epoch, cosine, weight decay 0.05). "
             "Gap: original minus distilled, paired per seed (negative: the student is better)."]
    L = [result_header("All-modulation ViT student: distillation recipe ablation (accuracy)", None, command,
                       notes).rstrip("\n"), "",
         "| recipe | what changes | top-1 (%) per seed | mean | gap to original (points) |", "|---|---|---|---|---|"]
    for name in args.recipes:
        rs = [x for x in rows if x["recipe"] == name]
        gap = statistics.mean(x["acc_original"] - x["acc_distilled"] for x in rs)
        per_seed = ", ".join(f"{x['acc_distilled']:.1f}" for x in rs)
        L.append(f"| {name} | {RECIPES[name][0]} | {per_seed} | "
                 f"{statistics.mean(x['acc_distilled'] for x in rs):.2f} | {gap:+.2f} |")
    L += ["", f"Originals: {', '.join(f'{acc_orig[s]:.1f}' for s in args.seeds)} (seeds "
          f"{', '.join(map(str, args.seeds))}). Total wall-clock: {(time.time() - t_start) / 60:.1f} min.", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cheap adaptation on real images: pre-train on textures, fine-tune on handwritten digits with 10 labels per class.

Hypotheses (from the papers, see docs/adaptation.md):
  H1 (Kumar et al.) SGD with the patch embedding frozen matches AdamW, ID and OOD, with less optimiser memory;
     without momentum it needs no optimiser state at all.
  H2 (LP-FT) linear probe then fine-tune is at least as good as fine-tuning, especially OOD.
  H3 (SubTuning) tuning a few greedily chosen blocks matches or beats full fine-tuning with few labels, at a
     fraction of the trainable parameters, and beats tuning the last k blocks.
  H4 profiling with the cached frozen prefix is much cheaper than the naive profile and than k full fine-tunes.

For each architecture (a small ViT and our EfficientMod) the model is pre-trained once on the bundled `textures`
set (17 real surfaces/photos, 32 px) and cached; every method then fine-tunes it on `digits` (10 classes) with 10
training labels per class, is evaluated on the full digits test split (in-distribution) and on corrupted copies
of it (noise, blur, contrast, JPEG at severities 1, 3, 5, on every third test image; code-generated, ImageNet-C
style), for 3 seeds (the seed picks the labelled subset and the training randomness). SubTuning selects its
blocks on a separate 10-per-class validation subset of the digits val split.

Run:  nice -n 5 python experiments/adaptation.py            (about 20 min on 2 shared cores)
      python experiments/adaptation.py --quick               (smoke run, seconds; writes nothing under results)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import frugalvision as fv
from frugalvision.adapt import SubTuningConfig, find_parts, measure_profile_speedup, plot_profile
from frugalvision.bench import machine_info, result_header
from frugalvision.data import build_transforms, cache_dir, load_bundled
from frugalvision.data.corruptions import CORRUPTIONS, CorruptedDataset
from frugalvision.engine import TrainConfig, Trainer, evaluate, seed_everything
from frugalvision.models import create_model
from frugalvision.models.factory import classifier_keys
from frugalvision.pipelines.adaptation import few_shot
from frugalvision.utils.io import atomic_write_text
from frugalvision.weights import load_weights, write_weights

ROOT = Path(__file__).resolve().parent
IMG = 32
SEVERITIES = (1, 3, 5)
ARCHS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": IMG, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}),
    "efficientmod": ("test_efficientmod", {}),
}
PRETRAIN = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1,
            "label_smoothing": 0.1, "grad_clip": 1.0}
FINETUNE = {"epochs": 15, "batch_size": 20, "warmup_epochs": 2, "grad_clip": 1.0}
OOD_EVERY = 3  # OOD sets use every third test image (120 of 360) to fit the compute budget
METHODS = {  # label -> (registered method, options); one fixed setting each, no per-method tuning
    "AdamW full FT": ("full_ft", {"lr": 5e-4, "weight_decay": 0.05}),
    "SGD": ("sgd", {"lr": 2e-2, "momentum": 0.9}),
    "SGD freeze-embed": ("freeze_embed", {"lr": 2e-2, "momentum": 0.9}),
    "SGD freeze-embed, no momentum": ("freeze_embed_nomom", {"lr": 2e-1}),
    "Linear probe": ("linear_probe", {"lr": 1e-2}),
    "LP-FT": ("lp_ft", {"lr": 2e-4, "lp_lr": 1e-2, "lp_fraction": 0.5}),
    "SubTuning (auto k)": ("subtuning", {"lr": 5e-4, "head_lr": 1e-2, "min_gain": 1.0, "profile_epochs": 8,
                                         "profile_lr": 1e-3, "batch_size": 20}),
    "Last k blocks (same k)": ("subtuning", {"lr": 5e-4, "head_lr": 1e-2}),
}


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def pretrained(arch: str, quick: bool) -> tuple[Path, dict]:
    name, kwargs = ARCHS[arch]
    cfg = dict(PRETRAIN, epochs=1 if quick else PRETRAIN["epochs"])
    key = hashlib.sha256(json.dumps([name, kwargs, cfg, IMG]).encode()).hexdigest()[:10]
    path = cache_dir() / "experiments" / "adaptation" / f"{arch}-{key}.safetensors"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return path, json.loads(info_path.read_text())
    seed_everything(0)
    ev = build_transforms(IMG, train=False)
    train = TensorDataset(*tensors(load_bundled("textures", "train", ev)))
    val = TensorDataset(*tensors(load_bundled("textures", "val", ev)))
    model = create_model(name, num_classes=17, **kwargs)
    t0 = time.perf_counter()
    res = Trainer(model, TrainConfig(**cfg, device="cpu", seed=0), train, val).fit()
    info = {"val_acc": res.final["acc1"], "seconds": time.perf_counter() - t0, "epochs": cfg["epochs"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_weights(path, model)
    atomic_write_text(info_path, json.dumps(info))
    return path, info


def load_pretrained(arch: str, path: Path, num_classes: int) -> torch.nn.Module:
    name, kwargs = ARCHS[arch]
    model = create_model(name, num_classes=num_classes, **kwargs)
    load_weights(model, path, reinit=classifier_keys(model))  # the 17-class head is re-initialised; all else must fit
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluate(model, DataLoader(TensorDataset(x, y), batch_size=256), device="cpu")["acc1"]


def run_method(label: str, arch: str, weights: Path, seed: int, data: dict, quick: bool, last_k: dict) -> dict:
    method, options = METHODS[label]
    options = dict(options)
    seed_everything(seed)
    model = load_pretrained(arch, weights, 10)
    if label.startswith("SubTuning"):
        options.update(data=data["profile_train"], val_data=data["val"], device="cpu", progress=False, seed=seed)
        if quick:
            options["profile_epochs"] = 1
    if label.startswith("Last k"):
        blocks = find_parts(model).blocks
        options["tune"] = blocks[-last_k[(arch, seed)]:]
    t0 = time.perf_counter()
    a = fv.adapt(model, method, verbose=False, **options)
    select_s = time.perf_counter() - t0
    cfg = TrainConfig(**dict(FINETUNE, epochs=1 if quick else FINETUNE["epochs"]), device="cpu", seed=seed,
                      progress=False, eval_every=0)
    fit = a.fit(data["train"], None, cfg)
    row = {"arch": arch, "method": label, "seed": seed, "id_acc": accuracy(model, *data["test"]),
           "trainable_params": a.report.trainable, "total_params": a.report.total,
           "optimizer_state_bytes": a.report.optimizer_state_bytes, "fit_s": fit.wall_time_s, "select_s": select_s}
    per = {}
    for (kind, sev), (x, y) in data["ood"].items():
        per[f"{kind}@{sev}"] = accuracy(model, x, y)
    row["ood_acc"] = statistics.mean(per.values())
    for kind in CORRUPTIONS:
        row[f"ood_{kind}"] = statistics.mean(v for k, v in per.items() if k.startswith(kind + "@"))
    result = getattr(a.config, "result", None)
    if result is not None:
        row["chosen"] = "+".join(result.chosen) or "-"
        row["k"] = len(result.chosen)
        last_k[(arch, seed)] = max(1, len(result.chosen))
        row["_result"] = result
    elif label.startswith("Last k"):
        row["chosen"] = "+".join(options["tune"])
        row["k"] = len(options["tune"])
    return row


def digits_data(seed: int) -> dict:
    ev = build_transforms(IMG, train=False)
    train = TensorDataset(*tensors(few_shot(load_bundled("digits", "train", ev), 10, seed)))
    val = TensorDataset(*tensors(few_shot(load_bundled("digits", "val", ev), 10, seed)))
    return {"train": train, "profile_train": train, "val": val}


def test_data() -> dict:
    test = load_bundled("digits", "test", build_transforms(IMG, train=False))
    x, y = tensors(test)
    ood = {}
    sub = TensorDataset(x[::OOD_EVERY], y[::OOD_EVERY])
    for kind in CORRUPTIONS:
        for sev in SEVERITIES:
            ood[(kind, sev)] = tensors(CorruptedDataset(sub, kind, sev))
    return {"test": (x, y), "ood": ood}


def ms(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, no results written (smoke test)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--archs", default="vit,efficientmod")
    ap.add_argument("--out", default=str(ROOT / "results" / "adaptation"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread per process is fastest
    seeds = list(range(1 if args.quick else args.seeds))
    archs = args.archs.split(",")
    command = "nice -n 5 python experiments/adaptation.py " + " ".join(sys.argv[1:])
    t_start = time.perf_counter()
    tdata = test_data()
    rows: list[dict] = []
    pre: dict[str, dict] = {}
    speed: dict[str, dict] = {}
    last_k: dict = {}
    out = Path(args.out) if not args.quick else Path("/tmp/adaptation_quick")
    for arch in archs:
        weights, pre[arch] = pretrained(arch, args.quick)
        print(f"[{arch}] pre-trained on textures: val acc {pre[arch]['val_acc']:.1f}%", flush=True)
        for seed in seeds:
            data = {**digits_data(seed), **tdata}
            for label in METHODS:
                row = run_method(label, arch, weights, seed, data, args.quick, last_k)
                rows.append(row)
                print(f"[{arch} seed {seed}] {label:<32} ID {row['id_acc']:5.1f}  OOD {row['ood_acc']:5.1f}  "
                      f"params {row['trainable_params']:>8,}  opt {row['optimizer_state_bytes'] / 2**20:6.3f} MiB  "
                      f"{row['fit_s'] + row['select_s']:6.1f} s  {row.get('chosen', '')}", flush=True)
                if seed == 0 and "_result" in row:
                    plot_profile(row["_result"], out.parent / f"{out.name}_profile_{arch}.png",
                                 title=f"SubTuning profile: {arch} pre-trained on textures, digits 10/class (seed 0)")
            if seed == 0:
                model = load_pretrained(arch, weights, 10)
                _, opts = METHODS["SubTuning (auto k)"]
                st = SubTuningConfig(data=data["profile_train"], val_data=data["val"], device="cpu", progress=False,
                                     **{k: v for k, v in opts.items() if k != "min_gain"})
                if args.quick:
                    st.profile_epochs = 1
                speed[arch] = measure_profile_speedup(model, st)
                print(f"[{arch}] profile: naive {speed[arch]['naive_s']:.1f} s, cached {speed[arch]['cached_s']:.1f} s"
                      f" -> {speed[arch]['speedup']:.2f}x", flush=True)
    write(out, rows, pre, speed, seeds, command, time.perf_counter() - t_start)


def write(out: Path, rows: list[dict], pre: dict, speed: dict, seeds: list[int], command: str, total_s: float) -> None:
    notes = [f"1 thread per process, CPU; the machine was shared with other jobs (wall times are indicative, ratios "
             f"within one run are comparable). Total wall-clock: {total_s / 60:.1f} min.",
             f"Seeds: {len(seeds)} (each picks the 100 labelled digits, the 100 validation digits and the training "
             "randomness). ID: digits test split (360 images). OOD: the same images corrupted by code "
             f"({', '.join(CORRUPTIONS)}) at severities {', '.join(map(str, SEVERITIES))}; OOD = mean over the "
             f"{len(CORRUPTIONS) * len(SEVERITIES)} sets of {360 // OOD_EVERY} test images (every "
             f"{OOD_EVERY}rd). No random augmentation (images decoded once, in memory). Fine-tuning: "
             f"{FINETUNE['epochs']} epochs, batch "
             f"{FINETUNE['batch_size']}, warm-up + cosine, grad clip 1; one fixed learning rate per method (no "
             "per-method tuning). Optimiser state: bytes of the tensors in `optimizer.state` after training, "
             "measured. Time: fine-tuning + (SubTuning) profiling and selection."]
    lines = [result_header("Adaptation methods: textures -> digits (10 labels per class), ID and corrupted OOD",
                           machine_info("cpu"), command, notes).rstrip("\n"), ""]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        name, kw = ARCHS[arch]
        ar = [r for r in rows if r["arch"] == arch]
        lines += [f"## {arch}: `{name}` {kw or ''}", "",
                  f"Pre-trained on textures for {pre[arch]['epochs']} epochs from random init: textures val acc "
                  f"{pre[arch]['val_acc']:.1f}% ({pre[arch]['seconds']:.0f} s, cached).", "",
                  "| method | ID acc % | OOD acc % | ΔID / ΔOOD vs AdamW | trainable params | optimiser state | time s "
                  "| blocks tuned |", "|---|---|---|---|---|---|---|---|"]
        base = [r for r in ar if r["method"] == "AdamW full FT"]
        b_id = statistics.mean(r["id_acc"] for r in base)
        b_ood = statistics.mean(r["ood_acc"] for r in base)
        for label in METHODS:
            rs = [r for r in ar if r["method"] == label]
            if not rs:
                continue
            d_id = statistics.mean(r["id_acc"] for r in rs) - b_id
            d_ood = statistics.mean(r["ood_acc"] for r in rs) - b_ood
            state = statistics.mean(r["optimizer_state_bytes"] for r in rs)
            chosen = sorted({r.get("chosen", "") for r in rs} - {""})
            most = rs[0]["trainable_params"] > rs[0]["total_params"] / 2
            tuned = "; ".join(chosen) if chosen else "all" if most else "-"
            lines.append(
                f"| {label} | {ms([r['id_acc'] for r in rs])} | {ms([r['ood_acc'] for r in rs])} | "
                f"{d_id:+.1f} / {d_ood:+.1f} | {ms([r['trainable_params'] for r in rs], '{:,.0f}')} | "
                f"{state / 2**10:,.1f} KiB | {ms([r['fit_s'] + r['select_s'] for r in rs])} | "
                f"{tuned} |")
        lines += ["", "OOD accuracy per corruption (mean over severities and seeds):", "",
                  "| method | " + " | ".join(CORRUPTIONS) + " |", "|---|" + "---|" * len(CORRUPTIONS)]
        for label in METHODS:
            rs = [r for r in ar if r["method"] == label]
            if rs:
                lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(r[f'ood_{k}'] for r in rs):.1f}"
                                                          for k in CORRUPTIONS) + " |")
        if arch in speed:
            s = speed[arch]
            lines += ["", f"Profiling cost ({s['blocks']} blocks, one block + classifier per run, seed 0; cached and "
                      "naive runs interleaved block by block on identical batches):", "",
                      "| variant | seconds | vs cached |", "|---|---|---|",
                      f"| naive profile (full forward every step) | {s['naive_s']:.1f} | "
                      f"{s['naive_s'] / s['cached_s']:.2f}x |",
                      f"| cached profile (incl. building the cache, {s['cache_bytes'] / 2**20:.1f} MiB) | "
                      f"{s['cached_s']:.1f} | 1.00x |",
                      f"| {s['blocks']} full fine-tunes of the same length | {s['full_ft_x_blocks_s']:.1f} | "
                      f"{s['full_ft_x_blocks_s'] / s['cached_s']:.2f}x |", "",
                      f"Largest accuracy difference between the cached and the naive profile: "
                      f"{s['max_acc_diff']:.2f} points (same batches; differences are float rounding).", ""]
            lines.append(f"![profile]({out.name}_profile_{arch}.png)")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), md)
    buf = io.StringIO()
    keys = [k for k in rows[0] if not k.startswith("_")] + ["chosen", "k"]
    keys = list(dict.fromkeys(keys))
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if not k.startswith("_")})
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    atomic_write_text(out.parent / f"{out.name}_speedup.json", json.dumps(speed, indent=2))


if __name__ == "__main__":
    main()

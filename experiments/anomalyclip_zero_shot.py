"""AnomalyCLIP zero-shot on unseen categories, on a domain CLIP trained here (no pretrained CLIP available).

Protocol (bundled inspection benchmark, 128 px tiles):

1. Domain CLIP: frozen pretrained all-MiniLM-L6-v2 text tower + a small ViT image tower trained by locked-text
   contrastive tuning on the *training* categories only (brick, grass, gravel): their train/good and test tiles
   with captions (benchmark captions for defects; generated "flawless ... surface" captions for good tiles) plus
   extra defects rendered on their train/good tiles by the benchmark's own defect generator.
2. AnomalyCLIP: object-agnostic prompts + deep text tokens learned with the glocal loss on the training
   categories' images with masks (the auxiliary set), DPAM on the image tower.
3. Zero-shot test on the held-out categories (moon, ihc): image AUROC, pixel AUROC, AUPRO.

Baselines: the same backbone with fixed hand-written prompts (no prompt learning; "object" and "surface"
variants), AnomalyCLIP without DPAM, and PatchCore few-shot (k good tiles of the held-out category; PatchCore's
default backbone, random initialisation since no pretrained weights can be downloaded).

    nice -n 5 python experiments/anomalyclip_zero_shot.py            # full run (3 seeds)
    python experiments/anomalyclip_zero_shot.py --seeds 0 --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from frugalvision.bench import machine_info, result_header
from frugalvision.bench.timing import time_call
from frugalvision.data.bundled import source_images
from frugalvision.data.inspection import load_mask
from frugalvision.inspect.anomaly import aupro, image_auroc, pixel_auroc
from frugalvision.inspect.anomaly.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from frugalvision.inspect.anomaly.domain_clip import DomainCLIP, MiniLMTextEncoder
from frugalvision.inspect.anomaly.training import fit_anomalyclip, train_domain_clip
from frugalvision.inspect.bundled import build_benchmark, load_benchmark
from frugalvision.inspect.defects import DEFECT_KINDS, describe_defect, render_defect
from frugalvision.utils.io import atomic_write_text
from frugalvision.weights import save_model_file

TRAIN_CATS = ("brick", "grass", "gravel")
TEST_CATS = ("moon", "ihc")
GOOD_CAPTIONS = ("A flawless photo of the {c} surface.", "A photo of a perfect {c} surface without defects.",
                 "An unblemished {c} surface.", "A clean, normal {c} texture.")
NOUN = {"color": "discoloured patch", "missing": "missing-material chip", "contamination": "contamination particle"}
OUT = Path(__file__).parent / "results"


def _load(sample, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    with Image.open(sample.image) as im:
        im = im.convert("RGB")
        wh = im.size
        img = np.asarray(im.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    mask = load_mask(sample.mask, wh)
    mask = np.asarray(Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)) > 127
    return torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(mask.astype(np.float32))


def _defect_captions(kind: str, cat: str, detailed: str) -> list[str]:
    noun = NOUN.get(kind, kind)
    return [detailed, f"A photo of a damaged {cat} surface with a {noun}.", f"A {cat} surface with a {kind} defect."]


def load_split(cats, split: str):
    imgs, masks, labels, caps, names = [], [], [], [], []
    for s in load_benchmark(split, cats).samples:
        x, m = _load(s)
        imgs.append(x)
        masks.append(m)
        labels.append(s.label)
        names.append(s.category)
        caps.append(_defect_captions(s.defect, s.category, s.caption) if s.label
                    else [t.format(c=s.category) for t in GOOD_CAPTIONS])
    return torch.stack(imgs), torch.stack(masks), torch.tensor(labels), caps, names


def synthesize(good: torch.Tensor, cats: list[str], per_tile: int, seed: int):
    """Extra defects (benchmark's generator) on training-category good tiles, with masks and captions."""
    rng = np.random.default_rng(seed)
    src = source_images(["coffee", "astronaut", "chelsea"])
    foreign = np.concatenate([np.asarray(Image.fromarray(src[f]).resize((256, 256))) for f in src], 1)
    imgs, masks, caps = [], [], []
    for x, cat in zip(good, cats, strict=True):
        tile = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for _ in range(per_tile):
            kind = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
            img, mask = render_defect(kind, tile, rng, size=rng.uniform(0.7, 1.3), foreign=foreign)
            imgs.append(torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1))
            masks.append(torch.from_numpy(mask.astype(np.float32)))
            caps.append(_defect_captions(kind, cat, describe_defect(kind, mask, cat)))
    return torch.stack(imgs), torch.stack(masks), caps


@torch.no_grad()
def evaluate(model, images, masks, labels, batch: int = 16) -> dict[str, float]:
    model.eval()
    scores, maps = [], []
    for i in range(0, len(images), batch):
        out = model(images[i:i + batch])
        scores.append(out.pred_score)
        maps.append(out.anomaly_map[:, 0])
    s, m = torch.cat(scores), torch.cat(maps)
    return {"image_AUROC": 100 * image_auroc(s, labels), "pixel_AUROC": 100 * pixel_auroc(m, masks),
            "AUPRO": 100 * aupro(m, masks), "image_AUROC_maxmap": 100 * image_auroc(m.flatten(1).amax(1), labels)}


def patchcore_rows(seed: int, shots: int) -> list[dict]:
    """PatchCore through the anomaly CLI's pipeline (its defaults: repvgg_a0 pretrained on the bundled textures)."""
    import tempfile

    try:
        from frugalvision.pipelines.anomaly import AnomalyConfig, run_anomaly
    except ImportError:
        return []
    rows = []
    for k in (shots,):
        with tempfile.TemporaryDirectory() as tmp:
            res = run_anomaly(AnomalyConfig(action=["fit"], method="patchcore", categories=list(TEST_CATS), shots=k,
                                            out=str(Path(tmp) / "run"), img_size=128, seed=seed, progress=False,
                                            report_images=0, threads=1))
        for r in res["rows"]:
            if r["category"] in TEST_CATS:
                rows.append({"method": f"PatchCore {k or 'all 60'}-shot (held-out category's good tiles)",
                             "category": r["category"], "image_AUROC": r["image_AUROC"],
                             "pixel_AUROC": r["pixel_AUROC"], "AUPRO": r["AUPRO"], "image_AUROC_maxmap": float("nan")})
    return rows


ARCH = dict(width=64, depth=4, heads=2, patch_size=16, image_size=128)
PROMPT = dict(n_ctx=12, deep_depth=4, deep_n_ctx=4, feature_layers=(2, 3, 4), sigma=1.0)


def run(seeds: list[int], clip_epochs: int, prompt_epochs: int, per_tile: int, shots: int, quick: bool,
        ablate_dpam: bool, save: str | None = None, on_seed=None) -> list[dict]:
    t0 = time.perf_counter()
    build_benchmark()
    text = MiniLMTextEncoder()
    tr_imgs, tr_masks, tr_labels, tr_caps, tr_names = [], [], [], [], []
    for split in ("train", "test"):
        x, m, y, c, n = load_split(TRAIN_CATS, split)
        tr_imgs.append(x), tr_masks.append(m), tr_labels.append(y), tr_caps.extend(c), tr_names.extend(n)
    tr_imgs, tr_masks, tr_labels = torch.cat(tr_imgs), torch.cat(tr_masks), torch.cat(tr_labels)
    test = load_split(TEST_CATS, "test")
    if quick:
        test = (test[0][::3], test[1][::3], test[2][::3], test[3][::3], test[4][::3])
    rows: list[dict] = []
    for seed in seeds:
        good_idx = [i for i in range(len(tr_labels)) if tr_labels[i] == 0][:180]
        syn_x, syn_m, syn_c = synthesize(tr_imgs[good_idx], [tr_names[i] for i in good_idx], per_tile, seed)
        clip_x = torch.cat([tr_imgs, syn_x])
        clip_c = tr_caps + syn_c
        clip = DomainCLIP(text_encoder=text, seed=seed, **ARCH)
        hist = train_domain_clip(clip, clip_x, clip_c, epochs=clip_epochs, batch_size=64, lr=1e-3, seed=seed)
        print(f"seed {seed}: domain CLIP loss {hist[0]:.3f} -> {hist[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
        aux_x = torch.cat([tr_imgs, syn_x])
        aux_m = torch.cat([tr_masks, syn_m])
        aux_y = torch.cat([tr_labels, torch.ones(len(syn_x), dtype=torch.long)])
        base = PROMPT
        variants = [
            ("AnomalyCLIP (learned prompts, DPAM)", AnomalyCLIPConfig(**base), True),
            ("fixed prompts 'object' (no prompt learning, DPAM)", AnomalyCLIPConfig(**base, prompts="fixed"), False),
            ("fixed prompts 'surface' (no prompt learning, DPAM)",
             AnomalyCLIPConfig(**base, prompts="fixed", object_name="surface"), False),
        ]
        if ablate_dpam and seed == seeds[0]:
            variants.insert(1, ("AnomalyCLIP without DPAM", AnomalyCLIPConfig(**base, dpam_start=ARCH["depth"] + 1),
                                True))
        for name, cfg, learn in variants:
            torch.manual_seed(seed)
            model = AnomalyCLIP(clip, cfg)
            if learn:
                fit_anomalyclip(model, aux_x, aux_m, aux_y, epochs=prompt_epochs, batch_size=32, lr=2e-3,
                                seed=seed)
                if save and seed == seeds[0] and cfg.dpam_start is None:  # a model file the anomaly CLI runs
                    save_model_file(model, save, "anomalyclip", "anomalyclip", model.model_kwargs(),
                                    img_size=ARCH["image_size"], train_categories=list(TRAIN_CATS))
            for cat in TEST_CATS:
                idx = [i for i, n in enumerate(test[4]) if n == cat]
                rows.append({"method": name, "category": cat, "seed": seed,
                             **evaluate(model, test[0][idx], test[1][idx], test[2][idx])})
            print(f"seed {seed}: {name}: {rows[-2]} {rows[-1]} ({time.perf_counter() - t0:.0f} s)")
        for r in patchcore_rows(seed, shots):
            rows.append({**r, "seed": seed})
        print(f"seed {seed}: PatchCore done ({time.perf_counter() - t0:.0f} s)")
        if on_seed is not None:  # tables after every seed, so an interrupted run still leaves its finished seeds
            on_seed(rows, time.perf_counter() - t0)
    return rows


def write(rows: list[dict], seconds: float, cmd: str | list[str], args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    keys = ["image_AUROC", "pixel_AUROC", "AUPRO", "image_AUROC_maxmap"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["method", "category", "seed", *keys])
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(OUT / "anomalyclip_zero_shot.csv", buf.getvalue())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})

    def cell(method: str, cat: str | None, key: str) -> str:
        vals = [r[key] for r in rows if r["method"] == method and (cat is None or r["category"] == cat)]
        if cat is None:  # mean over categories per seed, then mean/std over seeds
            vals = [np.mean([r[key] for r in rows if r["method"] == method and r["seed"] == s]) for s in seeds]
            vals = [v for v in vals if not np.isnan(v)] or [float("nan")]
        if np.isnan(vals[0]):
            return "–"
        return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    lines = [
        result_header("AnomalyCLIP zero-shot on unseen categories (domain CLIP trained here)", machine_info(), cmd,
                      notes=[f"Shared by several users; {seconds / 60:.1f} min wall clock. Seeds: {seeds} (mean ± "
                             "std over seeds)."]).rstrip("\n"), "",
        f"Training categories: {', '.join(TRAIN_CATS)}; held-out (zero-shot) categories: {', '.join(TEST_CATS)}. "
        f"Domain CLIP: frozen pretrained all-MiniLM-L6-v2 + ViT (width {ARCH['width']}, depth {ARCH['depth']}, "
        f"patch 16, 128 px) trained {args.clip_epochs} epochs by locked-text contrastive tuning on the training "
        f"categories' images and captions (+{args.per_tile} rendered defect(s) per training good tile). "
        f"AnomalyCLIP: 12 context vectors, 4 deep tokens in MiniLM layers 1-3, DPAM from block 2, patch features "
        f"of blocks 2-4, glocal loss, {args.prompt_epochs} epochs (batch 32, Adam 2e-3) on the training "
        "categories' images with masks. Image score: the global feature's anomalous text probability "
        "(official); the last table uses the map's maximum as image score instead. PatchCore: the anomaly CLI's "
        "pipeline with its defaults (repvgg_a0 pretrained on the bundled textures set, layers 1-2, sigma 4), "
        f"memory bank from {args.shots} good training tiles of the held-out category itself (few-shot, "
        "not zero-shot).", "",
        "Seeds change the domain CLIP's initialisation and data order, the rendered extra defects, the prompt "
        "initialisation and PatchCore's shots; the no-DPAM ablation ran on the first seed only.", "",
    ]
    for key, title in [("image_AUROC", "Image AUROC (%)"), ("pixel_AUROC", "Pixel AUROC (%)"), ("AUPRO", "AUPRO (%)"),
                       ("image_AUROC_maxmap", "Image AUROC with the map maximum as score (%)")]:
        lines += [f"## {title}", "", "| method | " + " | ".join(TEST_CATS) + " | mean |",
                  "|---|" + "---|" * (len(TEST_CATS) + 1)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(cell(m, c, key) for c in TEST_CATS) + f" | {cell(m, None, key)} |")
        lines.append("")
    atomic_write_text(OUT / "anomalyclip_zero_shot.md", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--clip-epochs", type=int, default=15)
    p.add_argument("--prompt-epochs", type=int, default=5)
    p.add_argument("--per-tile", type=int, default=2)
    p.add_argument("--ablate-dpam", action="store_true", help="also train prompts without DPAM")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--save", help="write the first seed's AnomalyCLIP model file here (for the anomaly CLI)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (results not written)")
    args = p.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core CPU one thread per process is much faster than two
    cmd = ["python", *sys.argv]
    seconds = time_call(lambda: run(args.seeds, args.clip_epochs, args.prompt_epochs, args.per_tile, args.shots,
                                    args.quick, args.ablate_dpam, args.save,
                                    on_seed=None if args.quick else (lambda rows, sec: write(rows, sec, cmd, args))))
    print(f"done in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()

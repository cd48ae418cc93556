"""How faithful is an image's SVG text at a given token budget, and what do raw pixels give for the same tokens?

The image -> SVG step of Cai et al. (ICLR 2024, "Leveraging Large Language Models for Scalable Vector
Graphics-Driven Image Understanding"), with :func:`frugalvision.language.svg.vectorize` (vtracer + the budget
search) and SmolLM2-135M's tokenizer counting the tokens. Real data that ships with the install:

* ``digits``: scikit-learn's 8x8 digits (the first 20: two of each class), upsampled to 32x32 (bilinear),
  binary mode (foreground IoU is the measure);
* ``photos``: scikit-image's camera, coins and brick, three 128x128 crops each, colour mode (8 colours);
* ``defects``: crops of the bundled inspection benchmark's test defects (``defect_boxset("test")``: the box grown
  by half on each side, at least 32 px, squared, resized to 64x64; two per category and kind (the first), 70 in all),
  colour mode.

For each budget: how many images fit, mean tokens, PSNR (dB, RGB), foreground IoU (Otsu's threshold of the image,
see :func:`~frugalvision.language.svg.foreground`), vectorise time (the whole budget search, renders included), and
the "raw pixels as text" baseline (:func:`~frugalvision.language.svg.pixels_as_text`: decimal pixel values, the
image downsampled until the text fits; fidelity of that grid shown at full size, nearest neighbour). ``none``: no
budget (one trace at the default settings).

    python benchmarks/svg_fidelity.py [--budgets 128,256,512,1024,2048] [--out benchmarks/results/svg_fidelity]
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from frugalvision.bench import machine_info, result_header
from frugalvision.errors import DataError
from frugalvision.language import svg as S
from frugalvision.utils.io import atomic_write_text


def digits(n: int = 20) -> list[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = [i for k in range(10) for i in np.flatnonzero(d.target == k)[:2]][:n]
    out = []
    for i in order:
        a = (d.images[i] * (255 / 16)).round().astype(np.uint8)
        big = np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR))
        out.append((f"digit{d.target[i]}_{i}", big))
    return out


def photos(size: int = 128) -> list[tuple[str, np.ndarray]]:
    from skimage import data

    out = []
    for name in ("camera", "coins", "brick"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        for k, (y, x) in enumerate([(0, 0), ((h - size) // 2, (w - size) // 2), (h - size, w - size)]):
            out.append((f"{name}{k}", np.ascontiguousarray(img[y:y + size, x:x + size])))
    return out


def defects(per_kind: int = 2, side: int = 64) -> list[tuple[str, np.ndarray]]:
    from frugalvision.language.svg_read import defect_crops

    images, _, _, names = defect_crops("test", side=side, per_kind=per_kind)
    return list(zip(names, images, strict=True))


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def run_group(name: str, images: list[tuple[str, np.ndarray]], mode: str, budgets: list[int | None],
              count: Callable[[str], int], tok: Any) -> tuple[list[dict[str, Any]], list[float]]:
    rows, ratios = [], []
    for budget in budgets:
        svg_rows: list[dict[str, float]] = []
        pix_rows: list[dict[str, float]] = []
        for _, img in images:
            t0 = time.perf_counter()
            try:
                res = S.vectorize(img, mode=mode, max_tokens=budget, tokenizer=tok)  # type: ignore[arg-type]
            except DataError:
                res = None
            dt = time.perf_counter() - t0
            if res is not None:
                f = S.fidelity(img, res)
                svg_rows.append({"tokens": res.tokens, "psnr": f["psnr"], "iou": f["iou_fg"], "time": dt,
                                 "scale": res.settings["scale"], "colors": res.settings["colors"]})
                ratios.append(res.chars / res.tokens)
            if budget is not None:
                try:
                    text, back, n = S.pixels_as_text(img, budget, count=count)
                except DataError:
                    continue
                f = S.compare(img, back)
                pix_rows.append({"tokens": n, "psnr": f["psnr"], "iou": f["iou_fg"],
                                 "side": max(len(text.splitlines()), len(text.splitlines()[0].split()))})
        n = len(images)
        row = {"group": name, "mode": mode, "images": n, "budget": "none" if budget is None else budget,
               "svg_fit": len(svg_rows), "svg_tokens": mean([r["tokens"] for r in svg_rows]),
               "svg_psnr": mean([min(r["psnr"], 100.0) for r in svg_rows]),
               "svg_iou_fg": mean([r["iou"] for r in svg_rows]), "svg_ms": mean([1e3 * r["time"] for r in svg_rows]),
               "svg_scale": mean([r["scale"] for r in svg_rows]), "svg_colors": mean([r["colors"] for r in svg_rows]),
               "pix_fit": len(pix_rows) if budget is not None else None,
               "pix_tokens": mean([r["tokens"] for r in pix_rows]), "pix_side": mean([r["side"] for r in pix_rows]),
               "pix_psnr": mean([min(r["psnr"], 100.0) for r in pix_rows]),
               "pix_iou_fg": mean([r["iou"] for r in pix_rows])}
        rows.append(row)
        print(f"{name:8s} budget {row['budget']!s:>5}: svg fit {row['svg_fit']}/{n} tokens {fmt(row['svg_tokens'], 0)} "
              f"psnr {fmt(row['svg_psnr'])} iou {fmt(row['svg_iou_fg'], 3)} | pixels side {fmt(row['pix_side'], 1)} "
              f"psnr {fmt(row['pix_psnr'])} iou {fmt(row['pix_iou_fg'], 3)}", file=sys.stderr)
    return rows, ratios


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


COLUMNS = [("group", "data", 0), ("budget", "budget (tokens)", 0), ("svg_fit", "SVG fits", 0),
           ("svg_tokens", "SVG tokens", 0), ("svg_psnr", "SVG PSNR (dB)", 1), ("svg_iou_fg", "SVG IoU fg", 3),
           ("svg_scale", "trace scale", 2), ("svg_colors", "colours", 1), ("svg_ms", "vectorise (ms)", 0),
           ("pix_tokens", "pixels tokens", 0), ("pix_side", "pixels side", 1), ("pix_psnr", "pixels PSNR (dB)", 1),
           ("pix_iou_fg", "pixels IoU fg", 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="128,256,512,1024,2048")
    p.add_argument("--out", default="benchmarks/results/svg_fidelity")
    a = p.parse_args()
    budgets: list[int | None] = [None, *(int(b) for b in a.budgets.split(","))]
    tok = S.smollm2_tokenizer()

    def count(text: str) -> int:
        return S.count_tokens(text, tok)  # type: ignore[return-value]

    t0 = time.perf_counter()
    info = machine_info("cpu")
    rows: list[dict[str, Any]] = []
    ratios: list[float] = []
    for name, images, mode in (("digits", digits(), "binary"), ("photos", photos(), "color"),
                               ("defects", defects(), "color")):
        r, q = run_group(name, images, mode, budgets, count, tok)
        rows += r
        ratios += q
    took = time.perf_counter() - t0
    q10, q50, q90 = np.percentile(ratios, [10, 50, 90])
    notes = [
        "Tokens: SmolLM2-135M-Instruct's tokenizer (`smollm2_tokenizer()`; one token per digit). SVG columns: "
        "the images whose SVG fits the budget (means over those); `vectorize(img, mode=..., max_tokens=budget)` "
        "with its defaults (8 colours, polygons, integer coordinates, filter_speckle 2). Pixels columns: the "
        "`pixels_as_text` baseline at the same budget (decimal values, one row per line; `pixels side` is the "
        "longer side of the grid that fits; PSNR / IoU of that grid at full size, nearest neighbour). "
        "PSNR is over RGB, capped at 100 dB for identical images; IoU fg is of Otsu's foreground (the measure for "
        "digits; for textures read PSNR). Vectorise time: the whole budget search (vtracer traces + resvg renders of "
        "the candidates), 1 thread, on a machine shared with other work.",
        f"SVG characters per SmolLM2 token over all SVGs here: 10th percentile {q10:.2f}, median {q50:.2f}, "
        f"90th {q90:.2f} (the estimate without a tokenizer uses {S.CHARS_PER_TOKEN}). Run time {took:.0f} s.",
    ]
    md = [result_header("SVG fidelity vs token budget", info, "python " + " ".join(sys.argv), notes).rstrip("\n"), ""]
    md.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    md.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        cells = []
        for key, _, d in COLUMNS:
            v = r[key]
            if key == "svg_fit":
                v = f"{v}/{r['images']}"
            cells.append(fmt(float(v), d) if isinstance(v, float | np.floating) else fmt(v))
        md.append("| " + " | ".join(cells) + " |")
    out = a.out
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*rows[0], "machine"])
    w.writeheader()
    for r in rows:
        w.writerow({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, "machine": info.line()})
    atomic_write_text(f"{out}.csv", buf.getvalue())
    atomic_write_text(f"{out}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

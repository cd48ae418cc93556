"""``frugalvision svg``: images as SVG text for language models, with their renderings and a fidelity table."""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._deps import require_all
from ..config import check_number
from ..data.images import check_images
from ..errors import ConfigError, DataError
from ..utils.io import atomic_path, atomic_write_text
from .common import check_outputs, iter_images, read_rgb, save_png

__all__ = ["CSV_COLUMNS", "SVGConfig", "run_svg"]

CSV_COLUMNS = ("image", "status", "svg", "png", "width", "height", "paths", "chars", "tokens", "counted_by", "psnr",
               "iou_fg", "colors", "scale", "filter_speckle", "seconds")
"""Columns of ``svg.csv``: one row per input image, in input order."""


@dataclass
class SVGConfig:
    """Vectorise images into compact SVG text (vtracer), render it back (resvg) and measure the fidelity.

    Writes ``<stem>.svg`` and ``<stem>.png`` (its rendering at the image's size) per image and ``svg.csv`` (size in
    characters and tokens, PSNR, foreground IoU, the settings used). Every image is decoded before any work; no
    output is replaced without ``overwrite=true``. Needs the ``[svg]`` extra.

    Attributes:
        images: Image files and/or folders (searched recursively, in sorted order).
        out: Output folder.
        colors: Palette size in colour mode (2-64).
        precision: Decimals of the coordinates (0: integers; 0-3).
        max_tokens: Token budget per image: fewer colours, stronger speckle filtering and coarser tracing are
            searched until the SVG fits (the closest one that fits is kept); unset: no budget.
        mode: ``color`` (palette layers) or ``binary`` (foreground on background, Otsu's threshold).
        filter_speckle: Patches smaller than this many pixels squared are dropped (0-128).
        trace: ``polygon`` (fewer tokens) or ``spline`` (cubic curves).
        tokenizer: Count tokens with this language model's tokenizer: ``smollm2``, a ``.gguf`` file or a
            transformers folder (needs the ``[vlm]`` extra); unset: estimated from the length in characters.
        overwrite: Allow replacing existing outputs.
        progress: Show a progress bar.
    """

    images: list[str] = field(default_factory=list)
    out: str = "runs/svg"
    colors: int = 8
    precision: int = 0
    max_tokens: int | None = None
    mode: str = "color"
    filter_speckle: int = 2
    trace: str = "polygon"
    tokenizer: str | None = None
    overwrite: bool = False
    progress: bool = True


def _check_config(cfg: SVGConfig) -> None:
    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (positional, or images=a.png,b/)")
    if cfg.mode not in ("color", "binary"):
        raise ConfigError(f"mode must be color or binary, got {cfg.mode!r}")
    if cfg.trace not in ("polygon", "spline"):
        raise ConfigError(f"trace must be polygon or spline, got {cfg.trace!r}")
    for key, low, high in (("colors", 2, 64), ("precision", 0, 3), ("filter_speckle", 0, 128)):
        value = getattr(cfg, key)
        check_number(key, value, low, high)
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if cfg.max_tokens is not None:
        check_number("max_tokens", cfg.max_tokens, 1, hint=" (tokens per SVG; leave it unset for no budget)")
        if not isinstance(cfg.max_tokens, int):
            raise ConfigError(f"max_tokens must be an integer, got {cfg.max_tokens!r}")


def _check_inputs(paths: list[Path], progress: bool) -> None:
    """Decode every input once; the first unreadable one is a one-line DataError naming it."""
    verdicts = check_images(paths, progress=progress, desc="checking images")
    bad = [str(v) for v in verdicts.values() if isinstance(v, str)]
    if bad:
        more = f" ({len(bad) - 1} more unreadable image(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; nothing was written")


def run_svg(cfg: SVGConfig) -> dict[str, Any]:
    """``frugalvision svg IMAGES... out=runs/svg``: SVG text, rendering and fidelity row per image.

    Returns:
        ``images`` (inputs), ``written``, ``skipped`` (images whose SVG could not fit ``max_tokens`` or was empty:
        reported on stderr and in the CSV), ``csv``, ``out`` and the means of ``tokens``, ``psnr`` and ``iou_fg``
        over the written images.

    Raises:
        ConfigError: A setting is invalid, or an output exists without ``overwrite=true``.
        DataError: An input image is unreadable (nothing is written), or the inputs hold no image.
        MissingDependencyError: The ``[svg]`` extra (or ``[vlm]`` for ``tokenizer=``) is missing.
    """
    _check_config(cfg)
    needs = [("vtracer", "frugalvision svg (vectorising)", "svg"), ("resvg_py", "frugalvision svg (rendering)", "svg")]
    if cfg.tokenizer:
        needs.append(("transformers", f"tokenizer={cfg.tokenizer}", "vlm"))
    require_all(needs)
    from tqdm.auto import tqdm

    from ..language.svg import compare, rasterize, smollm2_tokenizer, vectorize

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder")
    csv_path = out / "svg.csv"

    def outputs(stem: Path) -> list[Path]:
        return [out / f"{stem}.svg", out / f"{stem}.png"]

    total = check_outputs(cfg.images, outputs, cfg.overwrite, "out", extra=[csv_path])
    _check_inputs([p for p, _ in iter_images(cfg.images)], cfg.progress)
    tokenizer = smollm2_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    sums = {"tokens": 0.0, "psnr": 0.0, "iou_fg": 0.0}
    bar = tqdm(total=total, desc="svg", unit="img", disable=not cfg.progress, dynamic_ncols=True)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for path, stem in iter_images(cfg.images):
            arr = read_rgb(path)
            h, w = arr.shape[:2]
            t0 = time.perf_counter()
            try:
                res = vectorize(arr, colors=cfg.colors, precision=cfg.precision, mode=cfg.mode,  # type: ignore[arg-type]
                                max_tokens=cfg.max_tokens, tokenizer=tokenizer, filter_speckle=cfg.filter_speckle,
                                trace=cfg.trace)  # type: ignore[arg-type]
            except DataError as exc:
                skipped += 1
                print(f"skipped {path}: {exc}", file=sys.stderr)
                writer.writerow({"image": str(path), "status": f"skipped: {exc}", "width": w, "height": h})
                bar.update(1)
                continue
            seconds = time.perf_counter() - t0
            rendering = rasterize(res.svg, w, h)
            fid = compare(arr, rendering)
            svg_file, png_file = outputs(stem)
            atomic_write_text(svg_file, res.svg + "\n")
            save_png(rendering, png_file)
            s = res.settings
            writer.writerow({"image": str(path), "status": "ok", "svg": str(svg_file), "png": str(png_file),
                             "width": w, "height": h, "paths": res.paths, "chars": res.chars,
                             "tokens": res.budget_tokens, "counted_by": s["counted_by"],
                             "psnr": f"{fid['psnr']:.3f}", "iou_fg": f"{fid['iou_fg']:.4f}", "colors": s["colors"],
                             "scale": s["scale"], "filter_speckle": s["filter_speckle"], "seconds": f"{seconds:.4f}"})
            written += 1
            sums["tokens"] += res.budget_tokens
            sums["psnr"] += min(fid["psnr"], 100.0)
            sums["iou_fg"] += fid["iou_fg"]
            bar.update(1)
    bar.close()
    means = {f"mean_{k}": round(v / written, 4) if written else None for k, v in sums.items()}
    return {"images": total, "written": written, "skipped": skipped, "csv": str(csv_path), "out": str(out),
            "counted_by": "tokenizer" if tokenizer is not None else "estimate", **means}

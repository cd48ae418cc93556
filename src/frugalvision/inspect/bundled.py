"""The bundled inspection benchmark: real surface tiles with realistic defects, in MVTec AD layout.

Built at first use, deterministically (fixed seed), from real images that ship inside scikit-image (brick,
grass, gravel, moon surface, immunohistochemistry tissue). How it is made:

1. Each source image is split into two vertical bands: the left 60 % supplies training tiles, the right 40 %
   test tiles, so no test pixel is ever seen in training.
2. A tile is a 128x128 crop at a random position of its band, turned by a random multiple of 90°, randomly
   flipped, with a mild brightness/contrast jitter (±6 %) standing in for acquisition variation.
3. ``train/good`` holds 60 defect-free tiles per category, ``test/good`` 20, and ``test/<kind>`` 6 tiles for each
   of the 7 defect kinds (scratch, crack, hole, stain, contamination, missing, color) rendered by
   :mod:`frugalvision.inspect.defects`; each defect tile has its 0/255 mask in ``ground_truth/<kind>/`` and a
   Defect Spectrum-style caption (kind, location, size) in ``captions.csv``.
4. Contamination particles are cut from other real photos (coffee, astronaut, chelsea).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.bundled import cache_dir, source_images
from ..data.inspection import SampleList, load_mvtec
from ..errors import DataError
from .defects import DEFECT_KINDS, describe_defect, render_defect

__all__ = ["BENCHMARK_CATEGORIES", "BenchmarkSpec", "build_benchmark", "load_benchmark", "load_captions"]

BENCHMARK_CATEGORIES = ("brick", "grass", "gravel", "moon", "ihc")
_FOREIGN = ("coffee", "astronaut", "chelsea")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Sizes of the bundled benchmark (the defaults are what ``build_benchmark()`` builds)."""

    tile: int = 128
    train_good: int = 60
    test_good: int = 20
    per_kind: int = 6
    seed: int = 2024
    version: int = 1


def _jitter(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tile = np.rot90(tile, rng.integers(0, 4))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    gain, bias = rng.uniform(0.94, 1.06), rng.uniform(-6, 6)
    return np.clip(tile.astype(np.float32) * gain + bias, 0, 255).round().astype(np.uint8)


def _tile(src: np.ndarray, band: tuple[float, float], size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape[:2]
    x0, x1 = round(band[0] * w), round(band[1] * w)
    if x1 - x0 < size or h < size:
        raise DataError(f"source image of {w}x{h} is too small for {size}px tiles")
    y = rng.integers(0, h - size + 1)
    x = rng.integers(x0, x1 - size + 1)
    return _jitter(src[y : y + size, x : x + size], rng)


def _png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def build_benchmark(root: str | Path | None = None, spec: BenchmarkSpec = BenchmarkSpec(),
                    categories: tuple[str, ...] = BENCHMARK_CATEGORIES, force: bool = False) -> Path:
    """Build (once) the bundled inspection benchmark and return its root (MVTec AD layout + ``captions.csv``).

    The build goes to a temporary folder renamed into place, so concurrent or interrupted builds never leave
    a partial dataset.

    Example:
        >>> root = build_benchmark()
        >>> sorted(p.name for p in root.iterdir() if p.is_dir())
        ['brick', 'grass', 'gravel', 'ihc', 'moon']
    """
    base = Path(root) if root is not None else cache_dir() / "datasets"
    name = f"inspection-v{spec.version}-t{spec.tile}-{'-'.join(categories)}"
    final = base / name
    if (final / "manifest.json").is_file() and not force:
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".inspection-", dir=base))
    try:
        sources = source_images([*categories, *_FOREIGN])
        foreign = np.concatenate([np.asarray(Image.fromarray(sources[f]).resize((256, 256))) for f in _FOREIGN], 1)
        captions: list[dict[str, str]] = []
        for ci, cat in enumerate(categories):
            rng = np.random.default_rng([spec.seed, ci])
            src = sources[cat]
            for i in range(spec.train_good):
                _png(_tile(src, (0.0, 0.6), spec.tile, rng), tmp / cat / "train" / "good" / f"{i:03d}.png")
            for i in range(spec.test_good):
                _png(_tile(src, (0.6, 1.0), spec.tile, rng), tmp / cat / "test" / "good" / f"{i:03d}.png")
            for kind in DEFECT_KINDS:
                for i in range(spec.per_kind):
                    clean = _tile(src, (0.6, 1.0), spec.tile, rng)
                    img, mask = render_defect(kind, clean, rng, size=rng.uniform(0.7, 1.3), foreign=foreign)
                    rel = f"{cat}/test/{kind}/{i:03d}.png"
                    _png(img, tmp / rel)
                    _png(mask.astype(np.uint8) * 255, tmp / cat / "ground_truth" / kind / f"{i:03d}_mask.png")
                    captions.append({"image": rel, "category": cat, "defect": kind,
                                     "caption": describe_defect(kind, mask, cat)})
        with open(tmp / "captions.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "category", "defect", "caption"])
            writer.writeheader()
            writer.writerows(captions)
        manifest = {"name": name, "spec": spec.__dict__, "categories": list(categories), "kinds": list(DEFECT_KINDS),
                    "sources": "scikit-image bundled images", "foreign": list(_FOREIGN)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():
            if not force:
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_captions(root: str | Path) -> dict[str, str]:
    """``{relative image path: caption}`` of a benchmark built by :func:`build_benchmark`."""
    path = Path(root) / "captions.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["image"]: r["caption"] for r in csv.DictReader(fh)}


def load_benchmark(split: str = "test", category: str | tuple[str, ...] | None = None,
                   root: str | Path | None = None) -> SampleList:
    """Samples of the bundled benchmark (built on first use), with captions on the defective ones.

    Example:
        >>> s = load_benchmark("test", "brick")
        >>> len(s), s.defects[:3]
        (62, ['color', 'contamination', 'crack'])
    """
    folder = build_benchmark(root)
    return load_mvtec(folder, category, split=split, captions=load_captions(folder))

"""Real-image datasets built at first use from images that ship inside installed packages (no downloads).

* ``textures``: 17 classes, one per real photo or surface that scikit-image and scikit-learn ship (brick,
  grass, gravel, moon, coins, camera, astronaut, coffee, chelsea, rocket, hubble, ihc, retina, cell,
  motorcycle, china, flower). Each sample is a square crop (10-15 % of the source's short side, random
  position) resized to 64x64. Splits come from disjoint vertical bands of each source (train: left 70 %,
  val: next 15 %, test: right 15 %), so no pixel of a test crop was seen in training.
* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (10 classes) upsampled to 32x32; stratified
  60/20/20 split.
* ``faces``: scikit-image's LFW subset, 100 faces vs 100 non-faces at 25x25 upsampled to 32x32; stratified
  60/20/20 split.

Everything is deterministic (fixed seed) and written once as PNG files in the image-folder layout under
:func:`cache_dir` (``$FRUGALVISION_CACHE`` or ``~/.cache/frugalvision``), so the same folder loader serves
bundled and user data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils.io import cache_dir
from .folder import ImageFolderDataset

__all__ = ["BUNDLED", "build_bundled", "cache_dir", "load_bundled", "source_images"]

_SKIMAGE_FILES = {
    "brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png", "moon": "moon.png", "coins": "coins.png",
    "camera": "camera.png", "astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
    "rocket": "rocket.jpg", "hubble": "hubble_deep_field.jpg", "ihc": "ihc.png", "retina": "retina.jpg",
    "cell": "cell.png", "motorcycle": "motorcycle_left.png",
}
SPLITS = ("train", "val", "test")


def _skimage_image(filename: str) -> np.ndarray:
    path = resources.files("skimage.data") / filename
    with resources.as_file(path) as p:
        if not p.is_file():
            raise DataError(
                f"scikit-image's bundled image {filename} is missing from {p.parent}; reinstall scikit-image"
            )
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))


def source_images(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The real RGB ``uint8`` images shipped by scikit-image and scikit-learn, by name (all when omitted).

    Example:
        >>> source_images(["brick"])["brick"].shape
        (512, 512, 3)
    """
    wanted = names or [*_SKIMAGE_FILES, "china", "flower"]
    out: dict[str, np.ndarray] = {}
    sk_samples = None
    for n in wanted:
        if n in _SKIMAGE_FILES:
            out[n] = _skimage_image(_SKIMAGE_FILES[n])
        elif n in ("china", "flower"):
            if sk_samples is None:
                from sklearn.datasets import load_sample_images

                data = load_sample_images()
                sk_samples = {Path(f).stem: img for f, img in zip(data.filenames, data.images, strict=True)}
            out[n] = np.asarray(sk_samples[n], dtype=np.uint8)
        else:
            raise DataError(f"unknown source image {n!r}; available: {', '.join([*_SKIMAGE_FILES, 'china', 'flower'])}")
    return out


# --------------------------------------------------------------------------------------------- builders
def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, optimize=False)


def _build_textures(out: Path, size: int, per_split: dict[str, int], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    bands = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}
    counts: dict[str, int] = {}
    for name, img in source_images().items():
        h, w = img.shape[:2]
        short = min(h, w)
        for split, (a, b) in bands.items():
            x0, x1 = round(a * w), round(b * w)
            for i in range(per_split[split]):
                side = int(rng.uniform(0.10, 0.15) * short)
                side = max(8, min(side, x1 - x0, h))
                x = int(rng.integers(x0, x1 - side + 1))
                y = int(rng.integers(0, h - side + 1))
                crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
                _save(np.asarray(crop), out / split / name / f"{i:04d}.png")
            counts[f"{split}/{name}"] = per_split[split]
    return {"counts": counts}


def _stratified_split(labels: np.ndarray, seed: int, fractions: tuple[float, float] = (0.6, 0.2)
                      ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr, n_va = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
        parts["train"] += idx[:n_tr].tolist()
        parts["val"] += idx[n_tr : n_tr + n_va].tolist()
        parts["test"] += idx[n_tr + n_va :].tolist()
    return {k: np.array(sorted(v)) for k, v in parts.items()}


def _write_small(out: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], size: int,
                 seed: int) -> dict[str, Any]:
    split = _stratified_split(labels, seed)
    counts = {}
    for s, idx in split.items():
        for i in idx:
            im = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR)
            _save(np.asarray(im), out / s / class_names[labels[i]] / f"{i:04d}.png")
        counts[s] = len(idx)
    return {"counts": counts}


def _build_digits(out: Path, size: int, per_split: dict[str, int], seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _write_small(out, images, d.target, [str(i) for i in range(10)], size, seed)


def _build_faces(out: Path, size: int, per_split: dict[str, int], seed: int) -> dict[str, Any]:
    path = resources.files("skimage.data") / "lfw_subset.npy"
    with resources.as_file(path) as p:
        data = np.load(p, allow_pickle=False)
    images = (np.clip(data, 0, 1) * 255).round().astype(np.uint8)
    labels = np.array([0] * 100 + [1] * (len(images) - 100))
    return _write_small(out, images, labels, ["face", "nonface"], size, seed)


@dataclass(frozen=True)
class BundledSpec:
    """How a bundled dataset is built."""

    builder: Callable[[Path, int, dict[str, int], int], dict[str, Any]]
    size: int
    per_split: tuple[int, int, int] = (0, 0, 0)
    seed: int = 0
    version: int = 1
    description: str = ""


BUNDLED: dict[str, BundledSpec] = {
    "textures": BundledSpec(_build_textures, 64, (80, 20, 40), seed=2024,
                            description="17 real photos/surfaces, crops from disjoint bands per split"),
    "digits": BundledSpec(_build_digits, 32, seed=2024, description="sklearn handwritten digits, 10 classes"),
    "faces": BundledSpec(_build_faces, 32, seed=2024, description="LFW subset, face vs non-face"),
}


def build_bundled(name: str, root: str | Path | None = None, force: bool = False) -> Path:
    """Build (once) and return the folder of a bundled dataset, holding ``train``/``val``/``test``.

    The build goes to a temporary folder that is renamed into place, so a concurrent or interrupted build
    never leaves a partial dataset behind.

    Example:
        >>> (build_bundled("faces") / "train").is_dir()
        True
    """
    if name not in BUNDLED:
        raise DataError(f"unknown bundled dataset {name!r}; available: {', '.join(BUNDLED)}")
    spec = BUNDLED[name]
    root = Path(root) if root is not None else cache_dir() / "datasets"
    final = root / f"{name}-v{spec.version}-s{spec.size}"
    if final.is_dir() and (final / "manifest.json").is_file() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        info = spec.builder(tmp, spec.size, dict(zip(SPLITS, spec.per_split, strict=True)), spec.seed)
        manifest = {"name": name, "version": spec.version, "size": spec.size, "seed": spec.seed,
                    "description": spec.description, **info}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():
            if not force:  # another process finished first
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_bundled(
    name: str, split: str = "train", transform: Callable[[Any], Any] | None = None, root: str | Path | None = None
) -> ImageFolderDataset:
    """A split of a bundled dataset as an :class:`ImageFolderDataset` (built on first use).

    Example:
        >>> ds = load_bundled("faces", "test"); ds.classes
        ['face', 'nonface']
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    folder = build_bundled(name, root)
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    return ImageFolderDataset(folder / split, transform=transform, classes=classes)

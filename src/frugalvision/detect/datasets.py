"""Detection and instance-segmentation sets built from bundled data (no downloads).

:func:`defect_boxset` turns the bundled inspection benchmark (:mod:`frugalvision.inspect.bundled`: 128x128 real
texture tiles with rendered defects, 7 defect kinds) into a :class:`~frugalvision.data.detection.BoxSet` with one
box and one instance mask per defect instance; the classes are the 7 defect kinds.

**Instances.** An instance is a connected component (8-connectivity, ``scipy.ndimage.label``) of one defect's
mask. Components smaller than :data:`MIN_INSTANCE_PIXELS` pixels (specks of anti-aliased strokes) are dropped:
their pixels stay in the image but carry no box. A box is the tight box of its mask in continuous pixels
(``x2 = last column + 1``), so a box is exactly the bbox of its mask.

**Test split.** The benchmark's ``test`` defect tiles (6 per kind and category, one defect each; the instances are
the components of its ground-truth mask) plus the first ``test_good`` ``test/good`` tiles of each category
(no boxes). The image files are the benchmark's own.

**Train split.** The benchmark's ``train`` split holds defect-free tiles only, so the training set is rendered
once: tile ``i`` of category ``c`` gets ``1..per_tile`` defects of uniformly drawn kinds, rendered one after the
other with :func:`~frugalvision.inspect.defects.render_defect` (random size 0.7-1.3) from the generator
``numpy.random.default_rng([seed, c, i])``. A later defect paints over an earlier one, so each defect's visible
mask is its own mask minus the pixels of later defects; its components are its instances. Contamination particles
are cut from photos other than the ones the test defects use (rocket, motorcycle, china instead of coffee,
astronaut, chelsea). Images (PNG) and instance label maps (PNG, value ``k`` = instance ``k``) are written under
``cache_dir()/defect_boxes_v1/`` in a temporary folder renamed into place, so concurrent or interrupted builds
never leave half a dataset and later calls only read files.

**No shared pixels.** The benchmark cuts train tiles from the left 60 % of each source photo and test tiles from
the right 40 %, so no test pixel of a texture is in a training image.

Example:
    >>> test = defect_boxset("test", categories=["brick"])
    >>> test.class_names[:3], len(test), test.num_boxes() >= 42
    (['scratch', 'crack', 'hole'], 46, True)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from ..data.bundled import cache_dir, source_images
from ..data.detection import BoxSample, BoxSet
from ..data.inspection import load_mask
from ..errors import ConfigError, DataError
from ..inspect.bundled import BENCHMARK_CATEGORIES, build_benchmark, load_benchmark
from ..inspect.defects import DEFECT_KINDS, render_defect

__all__ = ["MIN_INSTANCE_PIXELS", "TRAIN_FOREIGN", "defect_boxset", "instances_of"]

#: Connected components with fewer pixels are not instances (dropped, no box).
MIN_INSTANCE_PIXELS = 8
#: Photos the training contamination particles are cut from (the test defects use coffee, astronaut, chelsea).
TRAIN_FOREIGN = ("rocket", "motorcycle", "china")
_VERSION = 1
_EIGHT = np.ones((3, 3), dtype=bool)


def instances_of(mask: np.ndarray, min_pixels: int = MIN_INSTANCE_PIXELS) -> list[np.ndarray]:
    """The instance masks of a boolean mask: its 8-connected components with at least ``min_pixels`` pixels.

    Components are ordered by their first pixel in row-major order.

    Example:
        >>> m = np.zeros((8, 8), bool); m[0:3, 0:3] = True; m[3, 3] = True; m[6:8, 5:8] = True; m[0, 7] = True
        >>> [int(c.sum()) for c in instances_of(m, min_pixels=2)]  # (3, 3) joins the first block diagonally
        [10, 6]
    """
    labels, n = ndi.label(np.asarray(mask, dtype=bool), structure=_EIGHT)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == k for k in range(1, n + 1) if sizes[k] >= min_pixels]


def _boxes_of(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Tight ``xyxy`` boxes (continuous pixels) of non-empty masks."""
    out = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        out[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def _sample(image: Path, masks: list[np.ndarray], labels: list[int], size: tuple[int, int], image_id: int,
            group: str) -> BoxSample:
    w, h = size
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return BoxSample(image, _boxes_of(masks), np.asarray(labels, np.int64), w, h, image_id, masks=stacked,
                     group=group)


def _categories(categories: str | Sequence[str] | None) -> tuple[str, ...]:
    cats = BENCHMARK_CATEGORIES if categories is None else (
        (categories,) if isinstance(categories, str) else tuple(categories))
    unknown = [c for c in cats if c not in BENCHMARK_CATEGORIES]
    if unknown or not cats:
        raise ConfigError(f"unknown benchmark categories {unknown or cats}; choose from "
                          f"{', '.join(BENCHMARK_CATEGORIES)}")
    return cats


def _test_set(cats: tuple[str, ...], test_good: int, min_pixels: int) -> BoxSet:
    samples: list[BoxSample] = []
    for cat in cats:
        good = 0
        for s in load_benchmark("test", cat).samples:
            with Image.open(s.image) as im:
                size = im.size
            if s.label == 0:
                if good >= test_good:
                    continue
                good += 1
                samples.append(_sample(s.image, [], [], size, len(samples) + 1, cat))
                continue
            masks = instances_of(load_mask(s.mask, size).astype(bool), min_pixels)
            samples.append(_sample(s.image, masks, [DEFECT_KINDS.index(s.defect)] * len(masks), size,
                                   len(samples) + 1, cat))
    return BoxSet(samples, list(DEFECT_KINDS), name="defects-test")


def _foreign() -> np.ndarray:
    src = source_images(list(TRAIN_FOREIGN))
    return np.concatenate([np.asarray(Image.fromarray(src[f]).resize((256, 256))) for f in TRAIN_FOREIGN], 1)


def _render_tile(tile: np.ndarray, rng: np.random.Generator, per_tile: int, foreign: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Defects on one tile: the image, an instance label map (0 = background) and the class of each instance."""
    n = int(rng.integers(1, per_tile + 1))
    owner = np.zeros(tile.shape[:2], np.int16)  # which rendered defect (1..n) a pixel shows last
    kinds = []
    img = tile
    for d in range(1, n + 1):
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        img, mask = render_defect(kind, img, rng, size=float(rng.uniform(0.7, 1.3)), foreign=foreign)
        owner[mask] = d
        kinds.append(DEFECT_KINDS.index(kind))
    label_map = np.zeros(tile.shape[:2], np.uint8)
    labels: list[int] = []
    for d, cls in enumerate(kinds, 1):
        for comp in instances_of(owner == d):
            labels.append(cls)
            label_map[comp] = len(labels)
    return img, label_map, labels


def _build_train(folder: Path, cats: tuple[str, ...], seed: int, per_tile: int, tiles: int | None,
                 progress: bool) -> None:
    bench = build_benchmark()
    foreign = _foreign()
    tmp = Path(tempfile.mkdtemp(prefix=".defect-boxes-", dir=folder.parent))
    try:
        records = []
        jobs = []
        for ci, cat in enumerate(cats):
            files = sorted((bench / cat / "train" / "good").glob("*.png"))
            jobs += [(ci, cat, i, f) for i, f in enumerate(files[:tiles] if tiles is not None else files)]
        (tmp / "images").mkdir()
        (tmp / "instances").mkdir()
        for ci, cat, i, f in tqdm(jobs, desc="render defect train set", disable=not progress):
            rng = np.random.default_rng([seed, ci, i])
            tile = np.asarray(Image.open(f).convert("RGB"))
            img, label_map, labels = _render_tile(tile, rng, per_tile, foreign)
            name = f"{cat}_{i:03d}.png"
            Image.fromarray(img).save(tmp / "images" / name)
            Image.fromarray(label_map).save(tmp / "instances" / name)
            records.append({"image": f"images/{name}", "instances": f"instances/{name}", "labels": labels,
                            "category": cat, "source": str(f.relative_to(bench))})
        meta = {"version": _VERSION, "seed": seed, "per_tile": per_tile, "tiles": tiles, "categories": list(cats),
                "class_names": list(DEFECT_KINDS), "min_instance_pixels": MIN_INSTANCE_PIXELS,
                "foreign": list(TRAIN_FOREIGN), "benchmark": bench.name, "images": records}
        (tmp / "annotations.json").write_text(json.dumps(meta, indent=1))
        if not (folder / "annotations.json").is_file():
            if folder.exists():  # a half-built folder from an older, non-atomic writer
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_train(folder: Path) -> BoxSet:
    meta = json.loads((folder / "annotations.json").read_text())
    samples = []
    for rec in meta["images"]:
        label_map = np.asarray(Image.open(folder / rec["instances"]))
        h, w = label_map.shape
        masks = [label_map == k for k in range(1, len(rec["labels"]) + 1)]
        if any(not m.any() for m in masks):
            raise DataError(f"instance map {folder / rec['instances']} lacks an instance of annotations.json; delete "
                            f"{folder} to rebuild it")
        samples.append(_sample(folder / rec["image"], masks, rec["labels"], (w, h), len(samples) + 1,
                               rec["category"]))
    return BoxSet(samples, list(meta["class_names"]), name="defects-train")


def defect_boxset(split: str = "train", categories: str | Sequence[str] | None = None, seed: int = 2024,
                  per_tile: int = 2, tiles: int | None = None, test_good: int = 4,
                  min_pixels: int = MIN_INSTANCE_PIXELS, progress: bool = False) -> BoxSet:
    """The bundled inspection benchmark as boxes + instance masks of the 7 defect kinds (see the module docstring).

    Args:
        split: ``train`` (defects rendered on the benchmark's defect-free train tiles, built once and cached) or
            ``test`` (the benchmark's defect test tiles + ``test_good`` defect-free tiles per category).
        categories: Benchmark categories (``brick``, ``grass``, ``gravel``, ``moon``, ``ihc``); all when omitted.
        seed: Seed of the rendered train set.
        per_tile: Each train tile gets ``1..per_tile`` defects.
        tiles: Train tiles used per category (the first ones; all 60 when None).
        test_good: Defect-free test tiles kept per category (no boxes; they test false positives).
        min_pixels: Smallest instance of the test split, in pixels (the train split uses
            :data:`MIN_INSTANCE_PIXELS`, fixed by the cache).
        progress: A progress bar while the train set is rendered (once).

    Returns:
        A :class:`~frugalvision.data.detection.BoxSet` with ``masks`` on every sample, ``group`` = category.

    Raises:
        ConfigError: If ``split``, a category, ``per_tile`` or ``tiles`` is invalid.

    Example:
        >>> train = defect_boxset("train", categories="grass", tiles=3)
        >>> s = train.samples[0]
        >>> len(train), s.masks.shape[1:], bool((s.boxes[:, 2:] > s.boxes[:, :2]).all())
        (3, (128, 128), True)
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    cats = _categories(categories)
    if split == "test":
        if test_good < 0 or min_pixels < 1:
            raise ConfigError(f"test_good must be >= 0 and min_pixels >= 1, got {test_good}, {min_pixels}")
        return _test_set(cats, test_good, min_pixels)
    if per_tile < 1:
        raise ConfigError(f"per_tile must be >= 1 (defects per training tile), got {per_tile}")
    if tiles is not None and tiles < 1:
        raise ConfigError(f"tiles must be >= 1 or None (all train tiles), got {tiles}")
    name = f"train-s{seed}-p{per_tile}-t{tiles or 'all'}-{'-'.join(cats)}"
    folder = cache_dir() / f"defect_boxes_v{_VERSION}" / name
    if not (folder / "annotations.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _build_train(folder, cats, seed, per_tile, tiles, progress)
    return _read_train(folder)

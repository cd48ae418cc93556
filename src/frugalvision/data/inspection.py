"""Industrial inspection datasets in the public layouts: MVTec AD, VisA and Defect Spectrum.

Each loader turns a downloaded copy into a list of :class:`DefectSample` records (image path, mask path, label,
defect kind, category, caption) and checks it up front: a defective image without its mask, a mask whose size
differs from its image, or an unreadable file raises a :class:`~frugalvision.errors.DataError` naming the file —
or, with ``on_error="skip"``, is left out and listed in ``skipped``. :class:`DefectDataset` then serves samples as
``{"image", "mask", "label", "index"}`` dicts for training and evaluation.

Layouts:

* MVTec AD: ``<root>/<category>/train/good/*.png``, ``test/<defect>/*.png``,
  ``ground_truth/<defect>/<stem>_mask.png`` (0/255 masks; ``good`` has none).
* VisA: ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG``, ``Data/Masks/Anomaly/*.png`` and a split CSV
  (``<root>/split_csv/1cls.csv``: ``object,split,label,image,mask`` with paths relative to the root).
* Defect Spectrum (e.g. DS-MVTec): ``<root>/<category>/image/<defect>/NNN.png`` with class-coded masks
  ``<root>/<category>/mask/<defect>/NNN_mask.png`` (pixel value = defect class id, 0 = background) and an
  optional captions table (CSV, or XLSX when ``openpyxl`` is installed).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, check_images, load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DefectDataset",
    "DefectSample",
    "SampleList",
    "SegmentationTransform",
    "load_defect_spectrum",
    "load_mask",
    "load_mvtec",
    "load_visa",
    "segmentation_transforms",
]

log = logging.getLogger(__name__)
OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class DefectSample:
    """One image of an inspection dataset."""

    image: Path
    mask: Path | None
    label: int  # 0 good, 1 defective
    defect: str  # "good" or the defect kind
    category: str
    caption: str | None = None


@dataclass
class SampleList:
    """Samples of a dataset plus the files that were skipped and why."""

    samples: list[DefectSample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def defects(self) -> list[str]:
        """Sorted defect kinds present (``good`` excluded)."""
        return sorted({s.defect for s in self.samples if s.label == 1})

    @property
    def categories(self) -> list[str]:
        """Sorted categories present."""
        return sorted({s.category for s in self.samples})


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check(samples: list[DefectSample], on_error: OnError, progress: bool = True) -> SampleList:
    """Decode every image and mask once (cached verdicts, see :func:`check_images`); sizes must match; raise or skip."""
    sizes = check_images([s.image for s in samples], progress=progress, desc="checking images")
    sizes |= check_images([s.mask for s in samples if s.mask is not None and s.mask.is_file()], progress=progress,
                          desc="checking masks", masks=True)
    kept: list[DefectSample] = []
    skipped: list[tuple[Path, str]] = []
    for s in samples:
        try:
            if s.label == 1 and s.mask is None:
                raise DataError(f"defective image {s.image} has no mask")
            if s.mask is not None and not s.mask.is_file():
                raise DataError(f"mask {s.mask} for image {s.image} does not exist")
            size = sizes[s.image]
            if isinstance(size, str):
                raise DataError(size)
            if s.mask is not None:
                msize = sizes[s.mask]
                if isinstance(msize, str):
                    raise DataError(msize)
                if msize != size:
                    raise DataError(
                        f"mask {s.mask} is {msize[0]}x{msize[1]} but image {s.image} is {size[0]}x{size[1]}"
                    )
        except DataError as exc:
            if on_error == "raise":
                raise
            skipped.append((s.image, str(exc)))
            log.warning("skipping: %s", exc)
            continue
        kept.append(s)
    if not kept:
        raise DataError("no usable samples: " + (skipped[0][1] if skipped else "the dataset is empty"))
    return SampleList(kept, skipped)


def _categories(root: Path, category: str | Sequence[str] | None, marker: Callable[[Path], bool]) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    # the root may itself be one category
    found = [root] if marker(root) else sorted(p for p in root.iterdir() if p.is_dir() and marker(p))
    if not found:
        raise DataError(f"{root} holds no category in the expected layout (see frugalvision.data.inspection)")
    if category is None:
        return found
    wanted = [category] if isinstance(category, str) else list(category)
    names = {p.name: p for p in found}
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{root} has no category {', '.join(missing)}; it has {', '.join(sorted(names))}")
    return [names[c] for c in wanted]


# --------------------------------------------------------------------------------------------- MVTec AD
def load_mvtec(root: str | Path, category: str | Sequence[str] | None = None,
               split: Literal["train", "test"] = "test", on_error: OnError = "raise",
               captions: dict[str, str] | None = None) -> SampleList:
    """Index an MVTec AD-layout folder (one category, several, or all).

    Args:
        root: The dataset root (holding category folders) or one category folder.
        category: Category name(s); all when omitted.
        split: ``train`` (good images only) or ``test`` (good + defects with masks).
        on_error: ``raise`` or ``skip`` bad files (missing or mis-sized masks, unreadable images).
        captions: Optional ``{relative image path: caption}`` (as written by the bundled benchmark).

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> r = pathlib.Path(tempfile.mkdtemp())
        >>> for d in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
        ...     (r / "tile" / d).mkdir(parents=True)
        >>> for p in ("train/good/000.png", "test/good/000.png", "test/hole/000.png"):
        ...     Image.new("RGB", (8, 8)).save(r / "tile" / p)
        >>> Image.new("L", (8, 8)).save(r / "tile/ground_truth/hole/000_mask.png")
        >>> [(s.defect, s.label) for s in load_mvtec(r, split="test").samples]
        [('good', 0), ('hole', 1)]
    """
    if split not in ("train", "test"):
        raise DataError(f"MVTec AD has splits train and test, not {split!r}")
    root = Path(root)
    cats = _categories(root, category, lambda p: (p / "train").is_dir() and (p / "test").is_dir())
    samples: list[DefectSample] = []
    for cat in cats:
        split_dir = cat / split
        if not split_dir.is_dir():
            raise DataError(f"{cat} has no {split}/ folder")
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for img in _images_in(defect_dir):
                good = defect_dir.name == "good"
                mask = None if good else cat / "ground_truth" / defect_dir.name / f"{img.stem}_mask.png"
                rel = str(img.relative_to(root)) if img.is_relative_to(root) else img.name
                samples.append(DefectSample(img, mask, 0 if good else 1, defect_dir.name, cat.name,
                                            (captions or {}).get(rel)))
    if not samples:
        raise DataError(f"no images under {root} for split {split}")
    return _check(samples, on_error)


# --------------------------------------------------------------------------------------------- VisA
def load_visa(root: str | Path, category: str | Sequence[str] | None = None,
              split: Literal["train", "test"] = "test", split_csv: str | Path | None = None,
              on_error: OnError = "raise") -> SampleList:
    """Index a VisA copy through its split CSV (``object,split,label,image,mask``).

    Args:
        root: The VisA root (holding ``candle/``, ``pcb1/``, ... and ``split_csv/``).
        category: Object name(s) to keep; all when omitted.
        split: ``train`` or ``test``.
        split_csv: The split file; ``<root>/split_csv/1cls.csv`` by default.
        on_error: ``raise`` or ``skip`` bad rows and files.
    """
    root = Path(root)
    csv_path = Path(split_csv) if split_csv else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"VisA split file {csv_path} does not exist; pass split_csv=")
    wanted = None if category is None else ({category} if isinstance(category, str) else set(category))
    samples: list[DefectSample] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        if not reader.fieldnames or not need.issubset(reader.fieldnames):
            raise DataError(f"{csv_path} must have the columns {', '.join(sorted(need))}; it has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["split"] != split or (wanted is not None and row["object"] not in wanted):
                continue
            label = row["label"].strip().lower()
            if label not in ("normal", "anomaly"):
                raise DataError(f"{csv_path}:{line}: label must be normal or anomaly, got {row['label']!r}")
            bad = label == "anomaly"
            mask = root / row["mask"] if bad and row["mask"].strip() else None
            samples.append(
                DefectSample(root / row["image"], mask, int(bad), "anomaly" if bad else "good", row["object"])
            )
    if not samples:
        raise DataError(f"{csv_path} lists no {split} images" + (f" for {sorted(wanted)}" if wanted else ""))
    missing = [s.image for s in samples if not s.image.is_file()]
    if missing and on_error == "raise":
        raise DataError(f"image {missing[0]} listed in {csv_path} does not exist ({len(missing)} missing)")
    return _check(samples, on_error)


# --------------------------------------------------------------------------------------------- Defect Spectrum
def _read_captions(path: Path) -> dict[str, str]:
    """``{image name or relative path: caption}`` from a CSV or XLSX table with image and caption columns."""
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".xlsx":
        from .._deps import require

        openpyxl = require("openpyxl", "reading Defect Spectrum's captions.xlsx", extra="data")
        wb = openpyxl.load_workbook(path, read_only=True)
        data = list(wb.active.iter_rows(values_only=True))
        header = [str(h).strip().lower() for h in data[0]]
        rows = [dict(zip(header, r, strict=False)) for r in data[1:]]
    else:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k.strip().lower(): v for k, v in r.items()} for r in csv.DictReader(fh)]
    if not rows:
        return {}
    keys = list(rows[0])
    img_col = next((k for k in keys if any(w in k for w in ("image", "path", "file", "name"))), None)
    cap_col = next((k for k in keys if any(w in k for w in ("caption", "description", "text"))), None)
    if img_col is None or cap_col is None:
        raise DataError(f"captions table {path} needs an image/path column and a caption column; it has {keys}")
    return {str(r[img_col]).strip(): str(r[cap_col]).strip() for r in rows if r.get(img_col) and r.get(cap_col)}


def load_defect_spectrum(root: str | Path, category: str | Sequence[str] | None = None,
                         captions: str | Path | None = None, on_error: OnError = "raise") -> SampleList:
    """Index a Defect Spectrum copy (class-coded masks, optional captions).

    Args:
        root: e.g. the ``DS-MVTec`` folder, holding ``<category>/image/<defect>/*.png`` and ``<category>/mask/...``.
        category: Category name(s); all when omitted.
        captions: Captions table (CSV/XLSX); ``<root>/captions.csv`` or ``captions.xlsx`` when present.
        on_error: ``raise`` or ``skip`` bad files.
    """
    root = Path(root)
    cats = _categories(root, category, lambda p: (p / "image").is_dir())
    cap_file = Path(captions) if captions else next(
        (root / n for n in ("captions.csv", "captions.xlsx") if (root / n).is_file()), None)
    caps = _read_captions(cap_file) if cap_file else {}
    samples: list[DefectSample] = []
    for cat in cats:
        for defect_dir in sorted(p for p in (cat / "image").iterdir() if p.is_dir()):
            good = defect_dir.name == "good"
            for img in _images_in(defect_dir):
                mask = None if good else cat / "mask" / defect_dir.name / f"{img.stem}_mask.png"
                rel = f"{cat.name}/image/{defect_dir.name}/{img.name}"
                cap = caps.get(rel) or caps.get(f"{cat.name}/{defect_dir.name}/{img.name}") or caps.get(img.name)
                samples.append(DefectSample(img, mask, 0 if good else 1, defect_dir.name, cat.name, cap))
    if not samples:
        raise DataError(f"no images under {root}")
    return _check(samples, on_error)


# --------------------------------------------------------------------------------------------- dataset
def load_mask(path: Path | None, size: tuple[int, int], binary: bool = True) -> np.ndarray:
    """A mask as ``uint8`` ``(H, W)``: 0/1 when ``binary``, else the stored class ids; zeros when ``path`` is None.

    ``size`` is ``(width, height)`` of the image; a mismatch raises a :class:`DataError` naming the file.
    """
    if path is None:
        return np.zeros((size[1], size[0]), np.uint8)
    try:
        with Image.open(path) as im:
            im.load()
            if im.size != size:
                raise DataError(f"mask {path} is {im.size[0]}x{im.size[1]} but its image is {size[0]}x{size[1]}")
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > 0).astype(np.uint8) if binary else arr.astype(np.uint8)


class SegmentationTransform:
    """Joint image + mask transform on tensors: resize, flips and 90° turns for training, normalise.

    Images are resized bilinearly and masks with nearest neighbours. Exact flips and turns keep thin defects
    (one-pixel scratches) intact and cost a fraction of an arbitrary-angle rotation.

    Example:
        >>> tf = SegmentationTransform(16, train=True)
        >>> img, mask = tf(torch.zeros(3, 20, 20, dtype=torch.uint8), torch.zeros(20, 20, dtype=torch.long))
        >>> tuple(img.shape), img.dtype, tuple(mask.shape)
        ((3, 16, 16), torch.float32, (16, 16))
    """

    def __init__(self, img_size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, rotate90: bool = True) -> None:
        self.size = img_size
        self.train = train
        self.rotate90 = rotate90
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    #: Images with more pixels than this are resized in two passes over row strips (widths first, then heights):
    #: the same values as one pass (the antialiased resize is separable), without a full-size float copy.
    strip_pixels: int = 1 << 22

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if h * w > self.strip_pixels and image.dtype == torch.uint8 and (h, w) != (self.size, self.size):
            rows = max(1, self.strip_pixels // (4 * w))
            narrow = torch.cat([torch.nn.functional.interpolate(
                image[None, :, r:r + rows].float().div_(255.0), size=(min(rows, h - r), self.size), mode="bilinear",
                align_corners=False, antialias=True)[0] for r in range(0, h, rows)], dim=1)
            return torch.nn.functional.interpolate(narrow[None], size=(self.size, self.size), mode="bilinear",
                                                   align_corners=False, antialias=True)[0]
        img = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if img.shape[-2:] != (self.size, self.size):
            img = torch.nn.functional.interpolate(img[None], size=(self.size, self.size), mode="bilinear",
                                                  align_corners=False, antialias=True)[0]
        return img

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """The evaluation transform of an image alone (resize, normalise): what a deployed segmenter sees."""
        return ((self._resize(image) - self.mean) / self.std).contiguous()

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a ``uint8`` (or float in [0, 1]) image ``(3, H, W)`` and its mask ``(H, W)``."""
        img = self._resize(image)
        if mask.shape[-2:] != (self.size, self.size):
            mask = torch.nn.functional.interpolate(mask[None, None].float(), size=(self.size, self.size),
                                                   mode="nearest")[0, 0].long()
        if self.train:
            if torch.rand(()) < 0.5:
                img, mask = img.flip(-1), mask.flip(-1)
            if torch.rand(()) < 0.5:
                img, mask = img.flip(-2), mask.flip(-2)
            if self.rotate90:
                k = int(torch.randint(0, 4, ()))
                img, mask = img.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1))
        return ((img - self.mean) / self.std).contiguous(), mask.contiguous()


def segmentation_transforms(img_size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD, rotate90: bool = True) -> SegmentationTransform:
    """The joint transform of :class:`DefectDataset` (see :class:`SegmentationTransform`)."""
    return SegmentationTransform(img_size, train, mean, std, rotate90)


class DefectDataset(Dataset):
    """Samples as ``{"image": (3,H,W) float, "mask": (H,W) long, "label": int, "index": int}``.

    Args:
        samples: :class:`DefectSample` records (e.g. ``load_mvtec(...).samples``).
        transform: Joint transform (see :func:`segmentation_transforms`); tensors unnormalised in [0, 1] when None.
        classes: Defect kinds in class order; with ``mask_mode="kind"`` a defective pixel's class is
            ``1 + classes.index(sample.defect)``.
        mask_mode: ``binary`` (defect = 1), ``kind`` (class from the defect folder), or ``stored`` (the mask
            file's own class ids, as in Defect Spectrum).
    """

    def __init__(self, samples: Sequence[DefectSample], transform: Callable[..., Any] | None = None,
                 classes: Sequence[str] | None = None,
                 mask_mode: Literal["binary", "kind", "stored"] = "binary", cache: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.mask_mode = mask_mode
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.classes = list(classes) if classes is not None else sorted({s.defect for s in self.samples if s.label})
        if mask_mode == "kind":
            unknown = sorted({s.defect for s in self.samples if s.label and s.defect not in self.classes})
            if unknown:
                raise DataError(f"defect kinds {unknown} are not in the class list {self.classes}")

    @property
    def num_classes(self) -> int:
        """Number of mask classes including background (for ``binary``: 2)."""
        return 2 if self.mask_mode == "binary" else 1 + len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded ``uint8`` image ``(3, H, W)`` and ``long`` mask ``(H, W)`` of a sample.

        Memoised when ``cache=True``: small inspection sets fit in memory and decoding PNGs dominates a CPU epoch.
        """
        if index in self._cache:
            return self._cache[index]
        s = self.samples[index]
        img = load_image(s.image)
        mask = load_mask(s.mask, img.size, binary=self.mask_mode != "stored")
        if self.mask_mode == "kind" and s.label:
            mask = mask * (1 + self.classes.index(s.defect))
        pair = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(),
                torch.from_numpy(mask.astype(np.int64)))
        if self.cache:
            self._cache[index] = pair
        return pair

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = image.float() / 255.0
        return {"image": image, "mask": mask.long(), "label": self.samples[index].label, "index": index}

"""Object-detection data: COCO, Pascal VOC and YOLO readers, a COCO writer, tiling, region splits, a letterbox dataset.

A :class:`BoxSet` is a list of :class:`BoxSample` (an image file, or a window of one, with ``xyxy`` pixel boxes
and class indices) plus the class names. Every reader checks what it reads and raises a :class:`DataError` that
names the file and the line or object at fault, or, with ``on_error="skip"``, drops that image, logs a warning
and records it in :attr:`BoxSet.skipped`.

Coordinates are continuous pixels: a box ``(x1, y1, x2, y2)`` covers ``x1 <= x < x2``; a box may exceed the image
by at most 1 px (it is then clipped), more is an error. Big images are cut into tiles with :func:`tile_boxset`;
:func:`split_by_region` makes a train and a test region of every image so that no pixel is in both.
:class:`DetectionDataset` letterboxes samples for a YOLOv6-style detector; :func:`to_original` inverts it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, MissingDependencyError
from ..utils import atomic_write_text
from .images import IMAGE_EXTENSIONS, load_image

__all__ = [
    "BoxSample",
    "BoxSet",
    "DetectionDataset",
    "detection_collate",
    "load_coco",
    "load_deepforest",
    "load_voc",
    "load_yolo",
    "split_by_region",
    "tile_boxset",
    "tile_windows",
    "to_original",
    "write_coco",
]

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
Window = tuple[int, int, int, int]
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

#: A box may exceed the image by this many pixels (then it is clipped); more is an error.
TOLERANCE = 1.0
#: Gray value of the letterbox padding (as YOLOv6).
PAD_VALUE = 114
#: Decoded images kept in memory by :meth:`BoxSet.read` (tiles of one big image are read many times).
_CACHE_BYTES = 256 * 2**20
#: The sample files of the ``deepforest`` wheel: one class, tree crowns.
DEEPFOREST_FILES = (
    "2019_YELL_2_528000_4978000_image_crop2",
    "2019_YELL_2_541000_4977000_image_crop",
    "OSBS_029",
    "SOAP_061",
)


# ----------------------------------------------------------------------------------------------- containers
@dataclass
class BoxSample:
    """One detection sample: an image file (or a window of it) with its boxes.

    Attributes:
        image: Image file.
        boxes: ``(N, 4)`` float32 ``xyxy`` in pixels of this sample (of the window if one is set); N may be 0.
        labels: ``(N,)`` int64 indices into :attr:`BoxSet.class_names`.
        width: Width of this sample (the window's if windowed, else the image's).
        height: Height of this sample.
        image_id: Unique within a :class:`BoxSet`, ``>= 1``.
        window: ``(x0, y0, x1, y1)`` crop of the file that this sample is, or None for the whole file.
        masks: Optional ``(N, height, width)`` bool instance masks.
        group: Source image or region id (for splitting and reporting).

    Example:
        >>> s = BoxSample("a.png", [[1, 2, 5, 6]], [0], width=8, height=8, image_id=1)
        >>> s.boxes.dtype, s.labels.dtype, s.boxes.shape
        (dtype('float32'), dtype('int64'), (1, 4))
    """

    image: Path
    boxes: np.ndarray
    labels: np.ndarray
    width: int
    height: int
    image_id: int
    window: tuple[int, int, int, int] | None = None
    masks: np.ndarray | None = None
    group: str = ""

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.width, self.height, self.image_id = int(self.width), int(self.height), int(self.image_id)
        where = f"sample of {self.image}"
        if len(self.labels) != len(self.boxes):
            raise DataError(f"{where}: {len(self.boxes)} boxes but {len(self.labels)} labels; give one label per box")
        if self.width < 1 or self.height < 1:
            raise DataError(f"{where}: size {self.width}x{self.height} is empty; give the image's size in pixels")
        if self.window is not None:
            x0, y0, x1, y1 = (int(v) for v in self.window)
            self.window = (x0, y0, x1, y1)
            if (x1 - x0, y1 - y0) != (self.width, self.height) or x0 < 0 or y0 < 0:
                raise DataError(f"{where}: window {self.window} does not match the sample size "
                                f"{self.width}x{self.height}; width/height must be the window's")
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
            if self.masks.shape != (len(self.boxes), self.height, self.width):
                raise DataError(f"{where}: masks have shape {self.masks.shape}, expected "
                                f"{(len(self.boxes), self.height, self.width)} (boxes, height, width)")


@dataclass
class BoxSet:
    """Detection samples and their class names.

    Attributes:
        samples: The samples.
        class_names: Class ``k`` is ``class_names[k]``.
        name: A label for reports.
        skipped: ``(file, reason)`` of every image a reader dropped with ``on_error="skip"``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (8, 6), "red").save(p)
        >>> bs = BoxSet([BoxSample(p, [[0, 0, 4, 3]], [0], 4, 3, 1, window=(4, 3, 8, 6))], ["thing"])
        >>> len(bs), bs.num_boxes(), bs.read(0).shape
        (1, 1, (3, 4, 3))
    """

    samples: list[BoxSample]
    class_names: list[str]
    name: str = ""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    _cache: OrderedDict[Path, np.ndarray] = field(default_factory=OrderedDict, init=False, repr=False,
                                                  compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def num_boxes(self) -> int:
        """Total number of boxes over all samples."""
        return sum(len(s.boxes) for s in self.samples)

    def read(self, i: int) -> np.ndarray:
        """Pixels of sample ``i``: ``(height, width, 3)`` uint8 RGB, cropped to its window.

        Raises:
            DataError: If the file is missing or unreadable, or its size disagrees with the annotation.
        """
        s = self.samples[i]
        pixels = self._decoded(s.image)
        h, w = pixels.shape[:2]
        if s.window is None:
            if (w, h) != (s.width, s.height):
                raise DataError(f"image {s.image} is {w}x{h} pixels but its annotation says {s.width}x{s.height}; "
                                "fix the annotation's image size (or replace the image)")
            return pixels.copy()
        x0, y0, x1, y1 = s.window
        if x1 > w or y1 > h:
            raise DataError(f"window {s.window} of sample {s.image_id} exceeds image {s.image} ({w}x{h} pixels); "
                            "rebuild the tiles from the current images")
        return pixels[y0:y1, x0:x1].copy()

    def _decoded(self, path: Path) -> np.ndarray:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        pixels = np.asarray(load_image(path))
        pixels.flags.writeable = False
        self._cache[path] = pixels
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > _CACHE_BYTES:
            self._cache.popitem(last=False)
        return pixels


# ----------------------------------------------------------------------------------------------- helpers
def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _skip(skipped: list[tuple[Path, str]], path: Path, exc: Exception) -> None:
    skipped.append((Path(path), str(exc)))
    log.warning("skipping %s: %s", path, exc)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _checked_box(box: Sequence[float], width: int, height: int, where: str) -> list[float]:
    """Validate one ``xyxy`` box against the image size and clip it (within :data:`TOLERANCE`)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"{where}: box (x1, y1, x2, y2) = {_fmt(box)} has a non-finite coordinate; "
                        "fix or remove it")
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box (x1, y1, x2, y2) = {_fmt(box)} is degenerate (x2 <= x1 or y2 <= y1); "
                        "fix or remove it")
    if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > width + TOLERANCE or y2 > height + TOLERANCE:
        raise DataError(f"{where}: box (x1, y1, x2, y2) = {_fmt(box)} lies outside the {width}x{height} image "
                        f"(by more than {TOLERANCE:g} px); fix the coordinates or the image size")
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise DataError(f"{where}: box (x1, y1, x2, y2) = {_fmt(box)} lies on the edge of the {width}x{height} "
                        "image and has no area inside it; fix or remove it")
    return clipped


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` from the file header (no decoding)."""
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist; add the image or fix the annotation's file name")
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot read image {path}: {exc}; the file is corrupt or not an image — "
                        "replace or remove it") from None


def _renumbered(samples: list[BoxSample]) -> list[BoxSample]:
    return [replace(s, image_id=k) for k, s in enumerate(samples, 1)]


def _coco_mask_api() -> ModuleType:
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise MissingDependencyError("instance masks in COCO files need pycocotools; run `pip install pycocotools` "
                                     "(or load without masks)") from None
    return mask_api


# ----------------------------------------------------------------------------------------------- COCO
def _coco_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    mask_api = _coco_mask_api()
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        if any(len(p) < 6 or len(p) % 2 for p in seg):
            raise DataError(f"{where}: a segmentation polygon has fewer than 3 points or an odd number of values; "
                            "fix the polygon or load with with_masks=False")
        rle = mask_api.merge(mask_api.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise DataError(f"{where}: RLE size {seg['size']} differs from the image size [{height}, {width}]; "
                            "re-export the masks")
        rle = mask_api.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
    else:
        raise DataError(f"{where}: has no usable 'segmentation' (polygons or RLE); add one or load with "
                        "with_masks=False")
    with warnings.catch_warnings():  # pycocotools' own NumPy 2 deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_api.decode(rle).astype(bool)


def load_coco(json_path: str | Path, image_root: str | Path | None = None, with_masks: bool = False,
              on_error: OnError = "raise") -> BoxSet:
    """Read a COCO detection JSON file.

    Boxes (``bbox`` ``[x, y, w, h]``) become ``xyxy``; category ids map to ``0..K-1`` in id order; ``iscrowd``
    annotations are left out (crowd regions are not objects to detect). Image ids are kept when they are all
    ``>= 1``, else renumbered ``1..n``. The ``window`` and ``group`` keys that :func:`write_coco` adds to an
    image entry are read back.

    Args:
        json_path: The JSON file.
        image_root: Folder of the images (``file_name`` is relative to it); default: the JSON's folder, then its
            ``images/`` sub-folder.
        with_masks: Decode each annotation's ``segmentation`` (polygons or RLE) into ``masks`` (needs
            pycocotools).
        on_error: ``raise`` or ``skip`` (drop the image with the problem and record it in ``skipped``).

    Raises:
        DataError: If the file is not valid COCO JSON, or an image is missing, or a box is outside its image,
            degenerate or non-finite, or an annotation names an unknown category or image (``on_error="raise"``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); Image.new("RGB", (10, 8)).save(d / "a.png")
        >>> _ = (d / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 10,
        ...     "height": 8}], "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}],
        ...     "categories": [{"id": 3, "name": "cat"}]}))
        >>> bs = load_coco(d / "c.json")
        >>> bs.class_names, bs.samples[0].boxes.tolist(), bs.samples[0].labels.tolist()
        (['cat'], [[1.0, 2.0, 4.0, 6.0]], [0])
    """
    _check_on_error(on_error)
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"COCO file {json_path} does not exist; check the path")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "fix or re-export the file") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read COCO file {json_path}: {exc}; re-export it as UTF-8 JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path} has no 'images' list: it is not a COCO detection file; export COCO JSON")
    anns = data.get("annotations", [])
    cats = data.get("categories")
    if not isinstance(anns, list) or not isinstance(cats, list) or not cats:
        raise DataError(f"{json_path} needs an 'annotations' list and a non-empty 'categories' list; "
                        "export COCO detection JSON")
    try:
        cat_ids = sorted(int(c["id"]) for c in cats)
        names_by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        images = [(int(im["id"]), str(im["file_name"]), im) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{json_path}: a category or image entry lacks a valid {exc} key; every category needs "
                        "'id' and 'name', every image 'id' and 'file_name'") from None
    if len(set(cat_ids)) != len(cat_ids):
        raise DataError(f"{json_path}: duplicate category ids in {cat_ids}; give every category its own id")
    ids = [i for i, _, _ in images]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{json_path}: image id {dup} occurs more than once; give every image its own id")
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    root = Path(image_root) if image_root is not None else json_path.parent
    skipped: list[tuple[Path, str]] = []
    by_image: dict[int, list[tuple[int, dict]]] = {i: [] for i in ids}
    for n, ann in enumerate(anns):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in by_image:
            exc = DataError(f"{json_path}: annotation #{n} (id {ann.get('id') if isinstance(ann, dict) else '?'}) "
                            f"refers to image id {image_id!r}, which is not in 'images'; fix or remove it")
            if on_error == "raise":
                raise exc
            _skip(skipped, json_path, exc)
            continue
        by_image[image_id].append((n, ann))
    renumber = any(i < 1 for i in ids)
    if renumber:
        log.warning("%s has image ids < 1; renumbering images 1..%d", json_path, len(ids))
    samples: list[BoxSample] = []
    for k, (image_id, file_name, entry) in enumerate(images, 1):
        where = f"{json_path}: image id {image_id} ({file_name})"
        try:
            candidates = [root / file_name] + ([json_path.parent / "images" / file_name] if image_root is None else [])
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise DataError(f"{where}: image file not found (looked for {', '.join(map(str, candidates))}); "
                                "add it, fix 'file_name' or pass image_root=")
            window = tuple(int(v) for v in entry["window"]) if entry.get("window") else None
            if window is not None:
                width, height = window[2] - window[0], window[3] - window[1]
            elif entry.get("width") and entry.get("height"):
                width, height = int(entry["width"]), int(entry["height"])
            else:
                width, height = _image_size(path, where)
            boxes, labels, masks = [], [], []
            for n, ann in by_image[image_id]:
                if ann.get("iscrowd", 0):
                    continue
                at = f"{where}: annotation #{n} (id {ann.get('id', '?')})"
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise DataError(f"{at}: 'bbox' must be [x, y, width, height], got {bbox!r}; fix the annotation")
                try:
                    x, y, bw, bh = (float(v) for v in bbox)
                except (TypeError, ValueError):
                    raise DataError(f"{at}: 'bbox' {bbox!r} holds non-numbers; fix the annotation") from None
                boxes.append(_checked_box((x, y, x + bw, y + bh), width, height, at))
                if ann.get("category_id") not in cat_index:
                    raise DataError(f"{at}: unknown category_id {ann.get('category_id')!r} (categories: {cat_ids}); "
                                    "add it to 'categories' or fix the annotation")
                labels.append(cat_index[ann["category_id"]])
                if with_masks:
                    masks.append(_coco_mask(ann.get("segmentation"), height, width, at))
            mask_arr = None
            if with_masks:
                mask_arr = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
            samples.append(BoxSample(path, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                                     width, height, k if renumber else image_id, window=window, masks=mask_arr,
                                     group=str(entry.get("group") or Path(file_name).stem)))
        except DataError as exc:
            if on_error == "raise":
                raise
            _skip(skipped, json_path, exc)
    return BoxSet(samples, [names_by_id[c] for c in cat_ids], name=json_path.stem, skipped=skipped)


def write_coco(boxset: BoxSet, path: str | Path, overwrite: bool = False) -> Path:
    """Write the ground truth of a :class:`BoxSet` as COCO JSON (atomically), e.g. for pycocotools' COCOeval.

    Images get ``file_name`` (relative to the JSON's folder when the image lies below it), ``width``,
    ``height`` and ``id = image_id`` (plus ``window`` and ``group`` when set, which :func:`load_coco` reads
    back); boxes become ``bbox`` ``[x, y, w, h]`` with ``area`` (the mask's when masks exist), ``iscrowd`` 0 and
    an RLE ``segmentation`` when the sample has masks; categories are ``id = index + 1``.

    Raises:
        DataError: If ``path`` exists and ``overwrite`` is False, or image ids are not unique.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> bs = BoxSet([BoxSample(d / "a.png", [[1, 2, 4, 6]], [1], 10, 8, 7)], ["a", "b"])
        >>> data = json.loads(write_coco(bs, d / "gt.json").read_text())
        >>> data["images"][0]["id"], data["annotations"][0]["bbox"], data["annotations"][0]["category_id"]
        (7, [1.0, 2.0, 3.0, 4.0], 2)
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass overwrite=True to replace it or choose another path")
    ids = [s.image_id for s in boxset.samples]
    if len(set(ids)) != len(ids) or any(i < 1 for i in ids):
        raise DataError(f"cannot write {path}: image ids of BoxSet {boxset.name!r} are not unique and >= 1; "
                        "renumber the samples")
    folder = path.parent.resolve()
    images, annotations = [], []
    mask_api = _coco_mask_api() if any(s.masks is not None for s in boxset.samples) else None
    for s in boxset.samples:
        try:
            file_name = s.image.resolve().relative_to(folder).as_posix()
        except ValueError:
            file_name = str(s.image.resolve())
        entry: dict[str, Any] = {"id": s.image_id, "file_name": file_name, "width": s.width, "height": s.height}
        if s.window is not None:
            entry["window"] = list(s.window)
        if s.group:
            entry["group"] = s.group
        images.append(entry)
        for k, (box, label) in enumerate(zip(s.boxes.tolist(), s.labels.tolist(), strict=True)):
            x1, y1, x2, y2 = box
            ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": s.image_id, "category_id": label + 1,
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if s.masks is not None and mask_api is not None:
                rle = mask_api.encode(np.asfortranarray(s.masks[k].astype(np.uint8)))
                ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                ann["area"] = float(s.masks[k].sum())
            annotations.append(ann)
    categories = [{"id": k + 1, "name": n, "supercategory": ""} for k, n in enumerate(boxset.class_names)]
    data = {"info": {"description": boxset.name}, "images": images, "annotations": annotations,
            "categories": categories}
    return atomic_write_text(path, json.dumps(data))


# ----------------------------------------------------------------------------------------------- Pascal VOC
@dataclass
class _VocFile:
    xml: Path
    image: Path
    width: int
    height: int
    names: list[str]
    boxes: list[list[float]]


def _voc_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.xml"))
            if not files:
                raise DataError(f"folder {path} holds no .xml files; point to the Pascal VOC annotation folder")
            return files
        if not path.is_file():
            raise DataError(f"VOC annotation {path} does not exist; check the path")
        return [path]
    return [Path(p) for p in path]


def _read_voc(xml: Path, keep_difficult: bool = True, image: Path | None = None) -> _VocFile:
    if not xml.is_file():
        raise DataError(f"VOC annotation {xml} does not exist; check the path")
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise DataError(f"{xml} is not well-formed XML (line {line}, column {col}); fix or re-export it") from None
    if root.tag != "annotation":
        raise DataError(f"{xml}: root element is <{root.tag}>, not <annotation>; this is not a Pascal VOC file")
    if image is None:
        filename = (root.findtext("filename") or "").strip()
        path_text = (root.findtext("path") or "").strip()
        candidates = []
        if filename:
            candidates += [xml.parent / filename, xml.parent.parent / "JPEGImages" / filename]
        if path_text:
            p = Path(path_text)
            candidates += [p if p.is_absolute() else xml.parent / p,
                           xml.parent / Path(path_text.replace("\\", "/")).name]
        if not candidates:
            raise DataError(f"{xml}: neither <filename> nor <path> names the image; add <filename>")
        image = next((p for p in candidates if p.is_file()), None)
        if image is None:
            raise DataError(f"{xml}: image file not found (looked for {', '.join(map(str, candidates))}); put the "
                            "image next to the XML or fix <filename>/<path>")
    width, height = _image_size(image, str(xml))
    try:
        declared = (int(float(root.findtext("size/width") or 0)), int(float(root.findtext("size/height") or 0)))
    except ValueError:
        declared = (0, 0)
    if all(declared) and declared != (width, height):
        raise DataError(f"{xml}: <size> says {declared[0]}x{declared[1]} but image {image} is {width}x{height}; "
                        "fix <size> or use the matching image")
    names, boxes = [], []
    for k, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        at = f"{xml}: object #{k} ({name or 'no name'})"
        if not name:
            raise DataError(f"{at}: has no <name>; add the class name")
        if not keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        texts = [obj.findtext(f"bndbox/{t}") for t in ("xmin", "ymin", "xmax", "ymax")]
        if any(t is None for t in texts):
            raise DataError(f"{at}: <bndbox> is missing or lacks one of xmin/ymin/xmax/ymax; add them or remove "
                            "the object")
        try:
            vals = [float(t or "") for t in texts]
        except ValueError:
            raise DataError(f"{at}: <bndbox> coordinates {texts} are not numbers; fix them") from None
        boxes.append(_checked_box(vals, width, height, at))
        names.append(name)
    return _VocFile(xml, image, width, height, names, boxes)


def _voc_boxset(files: list[_VocFile], class_names: list[str], name: str, on_error: OnError,
                skipped: list[tuple[Path, str]]) -> BoxSet:
    index = {n: k for k, n in enumerate(class_names)}
    samples = []
    for f in files:
        try:
            for k, n in enumerate(f.names, 1):
                if n not in index:
                    raise DataError(f"{f.xml}: object #{k} has unknown class {n!r} (classes: {class_names}); add it to "
                                    "class_names or fix <name>")
            samples.append(BoxSample(f.image, np.asarray(f.boxes, np.float32).reshape(-1, 4),
                                     np.asarray([index[n] for n in f.names], np.int64), f.width, f.height,
                                     len(samples) + 1, group=f.xml.stem))
        except DataError as exc:
            if on_error == "raise":
                raise
            _skip(skipped, f.xml, exc)
    return BoxSet(samples, list(class_names), name=name, skipped=skipped)


def load_voc(path: str | Path | Sequence[str | Path], class_names: Sequence[str] | None = None,
             on_error: OnError = "raise", keep_difficult: bool = True) -> BoxSet:
    """Read Pascal VOC XML annotations: a folder of ``*.xml``, one file, or a list of files.

    The image is ``<filename>`` next to the XML (or in ``../JPEGImages``), else ``<path>``. Coordinates are
    used as written (``xmin ymin xmax ymax`` in pixels). Classes come from ``<name>``.

    Args:
        path: Folder, file or list of files.
        class_names: The classes in index order; default: the sorted names found. A name not in the list is an
            error.
        on_error: ``raise`` or ``skip`` (drop the file with the problem and record it in ``skipped``).
        keep_difficult: Keep objects marked ``<difficult>1</difficult>``.

    Raises:
        DataError: If an XML file is malformed, its image is missing, a box is outside the image, degenerate or
            non-finite, or a class is unknown (``on_error="raise"``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); Image.new("RGB", (10, 8)).save(d / "a.png")
        >>> _ = (d / "a.xml").write_text("<annotation><filename>a.png</filename><object><name>car</name>"
        ...     "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>8</ymax></bndbox></object></annotation>")
        >>> bs = load_voc(d)
        >>> bs.class_names, bs.samples[0].boxes.tolist(), (bs.samples[0].width, bs.samples[0].height)
        (['car'], [[1.0, 2.0, 5.0, 8.0]], (10, 8))
    """
    _check_on_error(on_error)
    skipped: list[tuple[Path, str]] = []
    files = []
    for xml in _voc_files(path):
        try:
            files.append(_read_voc(xml, keep_difficult))
        except DataError as exc:
            if on_error == "raise":
                raise
            _skip(skipped, xml, exc)
    names = list(class_names) if class_names is not None else sorted({n for f in files for n in f.names})
    name = Path(path).stem if isinstance(path, (str, Path)) else "voc"
    return _voc_boxset(files, names, name, on_error, skipped)


def load_deepforest(with_labels: tuple[str, ...] | None = None) -> BoxSet:
    """The real aerial images with hand-drawn tree-crown boxes that ship in the ``deepforest`` wheel.

    Four RGB images of NEON sites (``deepforest/data/*.xml`` with their PNG): ``2019_YELL_2_528000_4978000_
    image_crop2`` (2299x2472, 574 boxes), ``2019_YELL_2_541000_4977000_image_crop`` (1249x1035, 279),
    ``OSBS_029`` (400x400, 61) and ``SOAP_061`` (400x400, 37: 9 ``Alive``, 28 ``Dead``), 951 boxes in all.
    There is one class, ``"Tree"``: every label in the files (``Tree``, ``Alive``, ``Dead``) is mapped to it.
    The package itself is never imported, only its data folder is read.

    Args:
        with_labels: Keep only the boxes whose label in the XML is one of these (e.g. ``("Alive",)``); they
            are still of class ``"Tree"``. Default: all boxes.

    Raises:
        MissingDependencyError: If the ``deepforest`` wheel is not installed.

    Example:
        >>> try:
        ...     trees = load_deepforest()
        ... except MissingDependencyError:  # the wheel is an optional extra
        ...     pass
        ... else:
        ...     assert trees.class_names == ["Tree"] and trees.num_boxes() == 951
    """
    spec = importlib.util.find_spec("deepforest")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the tree-crown sample images ship in the deepforest wheel, which is not "
                                     "installed; run `pip install --no-deps deepforest`")
    folder = Path(spec.origin).parent / "data"
    xmls = sorted(folder.glob("*.xml"))
    if not xmls:
        raise DataError(f"no .xml annotations in {folder}; reinstall with `pip install --no-deps deepforest`")
    files = []
    for xml in xmls:
        png = xml.with_suffix(".png")
        f = _read_voc(xml, image=png if png.is_file() else None)
        keep = [with_labels is None or n in with_labels for n in f.names]
        f.boxes = [b for b, k in zip(f.boxes, keep, strict=True) if k]
        f.names = ["Tree"] * len(f.boxes)
        files.append(f)
    return _voc_boxset(files, ["Tree"], "deepforest", "raise", [])


# ----------------------------------------------------------------------------------------------- YOLO
def _yolo_names(root: Path) -> list[str]:
    for yml in (root / "data.yaml", root / "data.yml"):
        if not yml.is_file():
            continue
        try:
            data = yaml.safe_load(yml.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"{yml} is not valid YAML ({exc}); fix it or pass class_names=") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, list):
            return [str(n) for n in names]
        if isinstance(names, dict):
            try:
                keys = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                keys = []
            if keys != list(range(len(names))):
                raise DataError(f"{yml}: the keys of 'names' must be 0..{len(names) - 1}; fix them")
            return [str(names[k] if k in names else names[str(k)]) for k in keys]
        raise DataError(f"{yml} has no 'names' list or dict; add `names: [...]` or pass class_names=")
    for txt in (root / "classes.txt", root / "labels" / "classes.txt"):
        if txt.is_file():
            return [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise DataError(f"no class names for YOLO dataset {root}: add data.yaml (`names: [...]`) or classes.txt, or pass "
                    "class_names=")


def _read_yolo_labels(label: Path, width: int, height: int, num_classes: int) -> tuple[list, list]:
    boxes, labels = [], []
    try:
        lines = label.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read label file {label}: {exc}; re-export it as UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        at = f"{label}, line {n}"
        if len(fields) != 5:
            raise DataError(f"{at}: {len(fields)} fields, expected 5 (`class cx cy w h`); fix the line")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{at}: {line.strip()!r} holds non-numbers; fix the line") from None
        cls = values[0]
        if not math.isfinite(cls) or cls != int(cls) or cls < 0:
            raise DataError(f"{at}: class {fields[0]!r} is not a class index (0, 1, ...); fix the line")
        if cls >= num_classes:
            raise DataError(f"{at}: unknown class index {int(cls)}, there are {num_classes} class names; fix the line "
                            "or the class names (data.yaml / classes.txt / class_names=)")
        cx, cy, bw, bh = values[1:]
        box = ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height)
        boxes.append(_checked_box(box, width, height, at))
        labels.append(int(cls))
    return boxes, labels


def load_yolo(root: str | Path, class_names: Sequence[str] | None = None, on_error: OnError = "raise") -> BoxSet:
    r"""Read a YOLO dataset: ``root/images/**`` and ``root/labels/**`` with the same relative path and stem.

    Each label line is ``class cx cy w h`` (normalised to the image size); an image without a label file has
    no objects. Class names come from ``class_names``, else ``root/data.yaml`` ``names`` (list or dict), else
    ``classes.txt`` (in ``root`` or ``root/labels``).

    Args:
        root: Dataset folder.
        class_names: The classes in index order.
        on_error: ``raise`` or ``skip`` (drop the image with the problem and record it in ``skipped``).

    Raises:
        DataError: If the folders or class names are missing, a label file has no image, a line is malformed,
            a class index is unknown, or a box is outside the image, degenerate or non-finite
            (``on_error="raise"``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "images").mkdir(); (d / "labels").mkdir()
        >>> Image.new("RGB", (10, 20)).save(d / "images" / "a.png")
        >>> _ = (d / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.1\n")
        >>> bs = load_yolo(d, class_names=["x", "y"])
        >>> bs.samples[0].boxes.tolist(), bs.samples[0].labels.tolist()
        ([[4.0, 9.0, 6.0, 11.0]], [1])
    """
    _check_on_error(on_error)
    root = Path(root)
    img_dir, lbl_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DataError(f"YOLO dataset {root} has no images/ folder; lay it out as images/ + labels/")
    names = list(class_names) if class_names is not None else _yolo_names(root)
    images = sorted(p for p in img_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{img_dir} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}); add them")
    skipped: list[tuple[Path, str]] = []
    stems = {p.relative_to(img_dir).with_suffix("") for p in images}
    if lbl_dir.is_dir():
        for label in sorted(lbl_dir.rglob("*.txt")):
            if label.name == "classes.txt" or label.relative_to(lbl_dir).with_suffix("") in stems:
                continue
            exc = DataError(f"label file {label} has no image in {img_dir} (same path and stem, extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add the image or delete the label file")
            if on_error == "raise":
                raise exc
            _skip(skipped, label, exc)
    samples = []
    for img in images:
        label = lbl_dir / img.relative_to(img_dir).with_suffix(".txt")
        try:
            width, height = _image_size(img, str(label))
            boxes, labels = _read_yolo_labels(label, width, height, len(names)) if label.is_file() else ([], [])
            samples.append(BoxSample(img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                                     width, height, len(samples) + 1, group=img.stem))
        except DataError as exc:
            if on_error == "raise":
                raise
            _skip(skipped, label if label.is_file() else img, exc)
    return BoxSet(samples, names, name=root.name, skipped=skipped)


# ----------------------------------------------------------------------------------------------- tiling, splits
def _overlap_pixels(tile: int, overlap: float) -> int:
    if isinstance(overlap, float) and 0 <= overlap < 1:
        pixels = round(overlap * tile)
    else:
        pixels = int(overlap)
        if pixels != overlap:
            raise ConfigError(f"overlap must be whole pixels or a fraction in [0, 1), got {overlap!r}")
    if not 0 <= pixels < tile:
        raise ConfigError(f"overlap of {pixels} px must be >= 0 and smaller than the tile ({tile} px)")
    return pixels


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def tile_windows(width: int, height: int, tile: int, overlap: int | float) -> list[Window]:
    """Windows ``(x0, y0, x1, y1)`` of ``tile`` x ``tile`` pixels covering a ``width`` x ``height`` image.

    Neighbours overlap by ``overlap`` pixels (an int) or that fraction of ``tile`` (a float in ``[0, 1)``); the
    last window of a row or column is flush with the image edge. Along a side not longer than ``tile`` there
    is one window of the full side. Row-major order.

    Raises:
        ConfigError: If ``tile < 1`` or the overlap is negative or not smaller than the tile.

    Example:
        >>> tile_windows(1000, 600, 512, 0.25)
        [(0, 0, 512, 512), (384, 0, 896, 512), (488, 0, 1000, 512), (0, 88, 512, 600), (384, 88, 896, 600), (488, 88, 1000, 600)]
        >>> tile_windows(300, 200, 512, 64)
        [(0, 0, 300, 200)]
    """  # noqa: E501
    if int(tile) != tile or tile < 1:
        raise ConfigError(f"tile must be a positive number of pixels, got {tile!r}")
    tile = int(tile)
    stride = tile - _overlap_pixels(tile, overlap)
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def _crop_sample(s: BoxSample, win: Window, min_visibility: float) -> BoxSample:
    """The part of sample ``s`` inside ``win`` (in the sample's coordinates) as a new windowed sample."""
    if win == (0, 0, s.width, s.height):
        return replace(s)
    x0, y0, x1, y1 = win
    w, h = x1 - x0, y1 - y0
    shifted = s.boxes.astype(np.float64) - np.array([x0, y0, x0, y0])
    clipped = np.clip(shifted, 0, [w, h, w, h])
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw > 0) & (ch > 0) & (cw * ch >= min_visibility * area * (1 - 1e-6))
    masks = s.masks[keep][:, y0:y1, x0:x1] if s.masks is not None else None
    ox, oy = s.window[:2] if s.window is not None else (0, 0)
    return BoxSample(s.image, clipped[keep].astype(np.float32), s.labels[keep], w, h, s.image_id,
                     window=(ox + x0, oy + y0, ox + x1, oy + y1), masks=masks, group=s.group)


def tile_boxset(boxset: BoxSet, tile: int, overlap: int | float, min_visibility: float = 0.5) -> BoxSet:
    """Cut every sample larger than ``tile`` into :func:`tile_windows`; smaller ones stay one sample.

    Boxes are clipped to their tile and kept when at least ``min_visibility`` of their area remains; masks are
    cropped with them. Tiles without boxes are kept (they teach the background). Image ids are renumbered
    ``1..n``; ``group`` keeps the source's.

    Example:
        >>> bs = BoxSet([BoxSample("big.png", [[10, 10, 30, 30], [90, 10, 110, 30]], [0, 0], 200, 100, 1)], ["a"])
        >>> tiles = tile_boxset(bs, 100, 0)
        >>> [(t.window, t.boxes.tolist()) for t in tiles.samples]
        [((0, 0, 100, 100), [[10.0, 10.0, 30.0, 30.0], [90.0, 10.0, 100.0, 30.0]]), ((100, 0, 200, 100), [[0.0, 10.0, 10.0, 30.0]])]
    """  # noqa: E501
    if not 0 <= min_visibility <= 1:
        raise ConfigError(f"min_visibility must be in [0, 1], got {min_visibility!r}")
    out = [_crop_sample(s, win, min_visibility) for s in boxset.samples
           for win in tile_windows(s.width, s.height, tile, overlap)]
    return BoxSet(_renumbered(out), list(boxset.class_names), name=boxset.name, skipped=list(boxset.skipped))


def split_by_region(boxset: BoxSet, fraction: float = 0.7, axis: str = "y",
                    min_visibility: float = 0.5) -> tuple[BoxSet, BoxSet]:
    """Split every image into a train region and a test region that share no pixel.

    With ``axis="y"`` the train region is the first ``fraction`` of each sample's height and the test region
    the rest (``axis="x"``: of its width). Each region becomes a windowed sample whose boxes are clipped to it
    and kept when at least ``min_visibility`` of their area is inside. Make tiles afterwards, inside each
    region (:func:`tile_boxset`), so that train and test tiles never overlap.

    Raises:
        ConfigError: If ``fraction`` is not in ``(0, 1)`` or ``axis`` is not ``"x"`` or ``"y"``.
        DataError: If a sample is too small to split at that fraction.

    Example:
        >>> bs = BoxSet([BoxSample("a.png", [[0, 0, 10, 10], [0, 60, 10, 80]], [0, 0], 50, 100, 1)], ["a"])
        >>> train, test = split_by_region(bs, 0.7)
        >>> train.samples[0].window, test.samples[0].window, test.samples[0].boxes.tolist()
        ((0, 0, 50, 70), (0, 70, 50, 100), [[0.0, 0.0, 10.0, 10.0]])
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction!r}")
    if axis not in ("x", "y"):
        raise ConfigError(f"axis must be 'x' or 'y', got {axis!r}")
    train, test = [], []
    for s in boxset.samples:
        size = s.height if axis == "y" else s.width
        cut = round(size * fraction)
        if not 0 < cut < size:
            raise DataError(f"sample {s.image_id} ({s.image}) is {size} px along {axis}: too small to split at "
                            f"{fraction}; drop it or change the fraction")
        if axis == "y":
            first, rest = (0, 0, s.width, cut), (0, cut, s.width, s.height)
        else:
            first, rest = (0, 0, cut, s.height), (cut, 0, s.width, s.height)
        train.append(_crop_sample(s, first, min_visibility))
        test.append(_crop_sample(s, rest, min_visibility))
    names = list(boxset.class_names)
    return (BoxSet(_renumbered(train), names, name=f"{boxset.name}-train", skipped=list(boxset.skipped)),
            BoxSet(_renumbered(test), list(names), name=f"{boxset.name}-test", skipped=list(boxset.skipped)))


# ----------------------------------------------------------------------------------------------- dataset
def _hsv_jitter(img: np.ndarray, dh: float, ds: float, dv: float) -> np.ndarray:
    """Shift hue by ``dh`` (fraction of the circle), multiply saturation by ``ds`` and value by ``dv``."""
    x = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.round(x + dh * 256) % 256, np.clip(np.round(x * ds), 0, 255),
                          np.clip(np.round(x * dv), 0, 255)]).astype(np.uint8)
    hsv = Image.fromarray(img).convert("HSV").point(lut.tolist())
    return np.array(hsv.convert("RGB"))


def _placed(pixels: np.ndarray, size: int, px: int, py: int, fill: int) -> np.ndarray:
    """Paste ``pixels`` (H, W, ...) at ``(px, py)`` on a ``size`` x ``size`` canvas (cropping what falls off)."""
    h, w = pixels.shape[:2]
    canvas = np.full((size, size, *pixels.shape[2:]), fill, dtype=pixels.dtype)
    sx, sy, dx, dy = max(0, -px), max(0, -py), max(0, px), max(0, py)
    cw, ch = min(w - sx, size - dx), min(h - sy, size - dy)
    if cw > 0 and ch > 0:
        canvas[dy:dy + ch, dx:dx + cw] = pixels[sy:sy + ch, sx:sx + cw]
    return canvas


class DetectionDataset(Dataset):
    """Letterboxed detection samples for a YOLOv6-style detector.

    ``dataset[i]`` is ``(image, target)``: ``image`` a float32 ``(3, img_size, img_size)`` tensor in ``[0, 1]``
    (no mean/std), the sample resized so its long side is ``img_size`` (keeping the aspect) and padded with
    114/255; ``target`` a dict with ``boxes`` (float32 ``(N, 4)`` ``xyxy`` in the letterboxed pixels),
    ``labels`` (int64 ``(N,)``), ``image_id``, ``scale`` and ``pad`` ``(px, py)`` (the original box is
    ``(box - pad) / scale``, see :func:`to_original`), ``orig_size`` ``(width, height)`` and ``flip``
    ``(horizontal, vertical)``, plus ``masks`` (uint8 ``(N, img_size, img_size)``) when the sample has masks.

    Train mode adds, in this order: random horizontal/vertical flips (of the sample, recorded in ``flip``), a
    random scale factor and a random translation of up to ``translate * img_size``, then HSV jitter (hue shift
    of up to ``hsv[0]`` of the circle, saturation and value gains in ``1 ± hsv[1]``, ``1 ± hsv[2]``). Boxes are
    clipped to the image and dropped when less than 2 px wide or high or when less than 30 % of their area
    before clipping is visible; masks follow. Eval mode is the deterministic letterbox only.

    Reproducibility: the random draws of sample ``i`` come from ``numpy.random.default_rng((seed, epoch, i))``,
    so they depend neither on the worker process nor on the order of calls. ``epoch`` is 0 unless
    :meth:`set_epoch` is called; call it once per epoch to get new augmentations each epoch.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (40, 20)).save(p)
        >>> ds = DetectionDataset(BoxSet([BoxSample(p, [[10, 5, 30, 15]], [0], 40, 20, 1)], ["a"]), img_size=80)
        >>> image, target = ds[0]
        >>> image.shape, target["boxes"].tolist(), target["pad"]
        (torch.Size([3, 80, 80]), [[20.0, 30.0, 60.0, 50.0]], (0.0, 20.0))
        >>> to_original(target["boxes"], target).tolist()
        [[10.0, 5.0, 30.0, 15.0]]
    """

    def __init__(self, boxset: BoxSet, img_size: int = 320, train: bool = False, hflip: float = 0.5,
                 vflip: float = 0.0, scale: tuple[float, float] = (0.75, 1.25), translate: float = 0.1,
                 hsv: tuple[float, float, float] = (0.015, 0.5, 0.3), seed: int = 0) -> None:
        if img_size < 8:
            raise ConfigError(f"img_size must be at least 8, got {img_size}")
        if not (0 <= hflip <= 1 and 0 <= vflip <= 1):
            raise ConfigError(f"hflip and vflip are probabilities in [0, 1], got {hflip}, {vflip}")
        if not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if translate < 0 or min(hsv) < 0 or len(hsv) != 3:
            raise ConfigError(f"translate and hsv gains must be >= 0 (hsv has 3 values), got {translate}, {hsv}")
        self.boxset = boxset
        self.img_size = int(img_size)
        self.train = train
        self.hflip, self.vflip = hflip, vflip
        self.scale = (float(scale[0]), float(scale[1]))
        self.translate = translate
        self.hsv = tuple(float(v) for v in hsv)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch`` (train mode) from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.boxset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.boxset.samples[i]
        pixels = self.boxset.read(i)
        boxes = s.boxes.astype(np.float64)
        labels, masks = s.labels, s.masks
        h, w = pixels.shape[:2]
        size = self.img_size
        ratio = size / max(w, h)
        flip_h = flip_v = False
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            u_h, u_v, u_s, u_x, u_y = rng.random(5)
            gains = rng.uniform(-1, 1, 3) * np.asarray(self.hsv)
            flip_h, flip_v = bool(u_h < self.hflip), bool(u_v < self.vflip)
            if flip_h:
                pixels, boxes = pixels[:, ::-1], boxes.copy()
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
                masks = masks[:, :, ::-1] if masks is not None else None
            if flip_v:
                pixels, boxes = pixels[::-1], boxes.copy()
                boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
                masks = masks[:, ::-1] if masks is not None else None
            ratio *= self.scale[0] + u_s * (self.scale[1] - self.scale[0])
        nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
        if self.train:
            px = round((size - nw) / 2 + (2 * u_x - 1) * self.translate * size)
            py = round((size - nh) / 2 + (2 * u_y - 1) * self.translate * size)
        else:
            px, py = (size - nw) // 2, (size - nh) // 2
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((nw, nh), Image.BILINEAR))
        canvas = _placed(resized, size, px, py, PAD_VALUE)
        out = boxes * ratio + np.array([px, py, px, py])
        keep = np.ones(len(out), dtype=bool)
        if self.train:
            area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
            out = np.clip(out, 0, size)
            bw, bh = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
            keep = (bw >= 2) & (bh >= 2) & (bw * bh >= 0.3 * area)
            if np.any(gains):
                canvas = _hsv_jitter(canvas, gains[0], 1 + gains[1], 1 + gains[2])
        image = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).float().div_(255)
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(out[keep].astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(labels[keep].copy()),
            "image_id": s.image_id, "scale": float(ratio), "pad": (float(px), float(py)),
            "orig_size": (w, h), "flip": (flip_h, flip_v),
        }
        if masks is not None:
            kept = np.ascontiguousarray(masks[keep])
            if len(kept):
                scaled = F.interpolate(torch.from_numpy(kept).unsqueeze(0).to(torch.uint8), size=(nh, nw),
                                       mode="nearest-exact")[0].permute(1, 2, 0).numpy()
                target["masks"] = torch.from_numpy(_placed(scaled, size, px, py, 0)).permute(2, 0, 1).contiguous()
            else:
                target["masks"] = torch.zeros((0, size, size), dtype=torch.uint8)
        return image, target


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack the images of a batch and keep the targets as a list (their box counts differ).

    Example:
        >>> images, targets = detection_collate([(torch.zeros(3, 4, 4), {"image_id": 1})] * 2)
        >>> images.shape, [t["image_id"] for t in targets]
        (torch.Size([2, 3, 4, 4]), [1, 1])
    """
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def to_original(boxes: ArrayT, target: dict[str, Any]) -> ArrayT:
    """Map ``xyxy`` boxes in letterboxed pixels back to the sample's pixels: ``(box - pad) / scale``.

    Flips recorded in ``target["flip"]`` (train mode) are undone too. Works on tensors and arrays of shape
    ``(..., 4)`` and returns the same type.

    Example:
        >>> to_original(np.array([[20.0, 30.0, 60.0, 50.0]]), {"scale": 2.0, "pad": (0.0, 20.0)}).tolist()
        [[10.0, 5.0, 30.0, 15.0]]
    """
    scale = float(target["scale"])
    px, py = (float(v) for v in target["pad"])
    if isinstance(boxes, torch.Tensor):
        out = boxes.clone() if boxes.is_floating_point() else boxes.float()
    else:
        out = np.array(boxes, dtype=np.result_type(np.asarray(boxes).dtype, np.float32))
    out[..., 0::2] = (out[..., 0::2] - px) / scale
    out[..., 1::2] = (out[..., 1::2] - py) / scale
    flip_h, flip_v = target.get("flip", (False, False))
    if flip_h or flip_v:
        w, h = (float(v) for v in target["orig_size"])
        if flip_h:
            out[..., [0, 2]] = w - out[..., [2, 0]]
        if flip_v:
            out[..., [1, 3]] = h - out[..., [3, 1]]
    return out

"""COCO detection and mask metrics with pycocotools, and COCO result files.

The metrics are ``pycocotools.cocoeval.COCOeval``'s own (101-point interpolated AP over IoU 0.50:0.95, area ranges
small < 32² <= medium < 96² <= large), in percent.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_text

__all__ = ["METRIC_KEYS", "coco_metrics", "detections_to_coco", "write_coco_results"]

#: The keys of :func:`coco_metrics` and their index in ``COCOeval.stats``.
METRIC_KEYS: dict[str, int] = {"AP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5,
                               "AR1": 6, "AR10": 7, "AR100": 8}


def _load_gt(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(gt, str | Path):
        try:
            data = json.loads(Path(gt).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read the COCO ground truth {gt}: {exc}") from None
    else:
        data = copy.deepcopy(dict(gt))
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"COCO ground truth lacks the list(s) {missing}; it needs images, annotations and categories")
    return data


def _gt_coco(data: dict[str, Any]) -> Any:
    """A ``pycocotools`` COCO object of the ground truth, with COCO's optional fields filled in."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    sizes = {im.get("id"): (im.get("height"), im.get("width")) for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if "bbox" not in ann or "image_id" not in ann or "category_id" not in ann:
            raise DataError(f"COCO ground-truth annotation {i} lacks image_id, category_id or bbox")
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:  # COCO's area is the mask's where there is one
            seg = ann.get("segmentation")
            if seg:
                ann["area"] = float(mask_utils.area(_to_rle(seg, *sizes.get(ann["image_id"], (None, None)))))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _to_rle(seg: Any, height: int, width: int) -> Any:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    return seg


def coco_metrics(gt: str | Path | Mapping[str, Any], predictions: Sequence[Mapping[str, Any]],
                 iou_type: Literal["bbox", "segm"] = "bbox") -> dict[str, Any]:
    """COCO AP and AR of ``predictions`` against the ground truth ``gt``, computed by ``COCOeval``.

    Args:
        gt: A COCO annotation JSON file or its dict (``images``, ``annotations``, ``categories``). Missing optional
            fields are filled in: ``iscrowd`` 0, ``area`` from the mask (or the box when there is none), ``id``.
        predictions: COCO result dicts: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score`` and,
            for ``segm``, ``segmentation`` (RLE), as :func:`detections_to_coco` writes them. Not modified.
        iou_type: ``bbox`` (box IoU) or ``segm`` (mask IoU).

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``, ``AP_large``, ``AR1``, ``AR10``, ``AR100`` in
        percent, rounded to 6 decimals (``nan`` where the ground truth has no object in that area range:
        COCOeval's ``-1``), ``num_predictions`` and ``summary``: COCOeval's printed table. No predictions give 0
        (not an error).

    Raises:
        DataError: If the ground truth is malformed, or a prediction names an image or a category that it does
            not have (a category offset, such as class index vs category id, gives 0 AP silently otherwise).
        ConfigError: If ``iou_type`` is neither ``bbox`` nor ``segm``.

    Example:
        >>> gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
        ...       "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]}]}
        >>> coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}])["AP"]
        100.0
        >>> m = coco_metrics(gt, [])
        >>> m["AP"], m["AR100"], m["AP_small"]  # no small object in the ground truth
        (0.0, 0.0, nan)
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ConfigError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    data = _load_gt(gt)
    if iou_type == "segm":
        lack = sum(not a.get("segmentation") for a in data["annotations"])
        if lack:
            raise DataError(f"{lack} ground-truth annotation(s) have no segmentation; iou_type='segm' needs a mask "
                            "(polygons or RLE) for every object, or use iou_type='bbox'")
    coco_gt = _gt_coco(data)
    preds = [dict(p) for p in predictions]  # loadRes adds fields to its dicts
    need = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
    for i, p in enumerate(preds):
        lack = [k for k in need if k not in p]
        if lack:
            raise DataError(f"prediction {i} lacks {lack}; {iou_type} results need {list(need)}")
        if iou_type == "segm":
            p.pop("bbox", None)  # loadRes then takes each detection's area and box from its mask
    bad_images = sorted({p["image_id"] for p in preds} - set(coco_gt.getImgIds()))
    if bad_images:
        raise DataError(f"{len(bad_images)} predicted image id(s) are not in the ground truth, e.g. {bad_images[:5]}")
    bad_cats = sorted({p["category_id"] for p in preds} - set(coco_gt.getCatIds()))
    if bad_cats:
        raise DataError(f"predicted category id(s) {bad_cats[:10]} are not in the ground truth's categories "
                        f"{sorted(coco_gt.getCatIds())[:10]}; map class indices to category ids "
                        "(detections_to_coco's category_ids)")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if preds:
            coco_dt = coco_gt.loadRes(preds)
        else:
            coco_dt = type(coco_gt)()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics: dict[str, Any] = {k: (math.nan if ev.stats[i] < 0 else round(100.0 * float(ev.stats[i]), 6))
                               for k, i in METRIC_KEYS.items()}
    metrics["num_predictions"] = len(preds)
    metrics["summary"] = out.getvalue()
    return metrics


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def detections_to_coco(image_id: int, det: Mapping[str, Any], category_ids: Sequence[int] | None = None,
                       masks: Any = None) -> list[dict[str, Any]]:
    """COCO result dicts of one image's detections (a :func:`~frugalvision.detect.postprocess.postprocess` item).

    Args:
        image_id: The image's COCO id.
        det: ``boxes`` ``(K, 4)`` xyxy pixels, ``scores`` ``(K,)``, ``labels`` ``(K,)`` class indices (tensors or
            arrays); other keys are ignored.
        category_ids: Category id of each class index; default ``label + 1`` (COCO ids start at 1).
        masks: ``(K, H, W)`` boolean masks; each becomes a compressed RLE ``segmentation`` (``counts`` a str).

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score`` and, with
        masks, ``segmentation``.

    Raises:
        DataError: If a label has no category id, or the masks do not match the detections.

    Example:
        >>> det = {"boxes": torch.tensor([[10., 20, 50, 60]]), "scores": torch.tensor([0.5]),
        ...        "labels": torch.tensor([0])}
        >>> detections_to_coco(7, det)
        [{'image_id': 7, 'category_id': 1, 'bbox': [10.0, 20.0, 40.0, 40.0], 'score': 0.5}]
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> m[0, 1:3, 1:3] = True
        >>> detections_to_coco(7, det, category_ids=[3], masks=m)[0]["segmentation"]
        {'size': [4, 4], 'counts': '52203'}
    """
    from pycocotools import mask as mask_utils

    boxes = _numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(det["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(det["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise DataError(f"detections of image {image_id} have {len(boxes)} boxes, {len(scores)} scores and "
                        f"{len(labels)} labels; they must have one of each per detection")
    if len(labels) and (labels.min() < 0 or (category_ids is not None and labels.max() >= len(category_ids))):
        raise DataError(f"labels of image {image_id} range over [{labels.min()}, {labels.max()}] but category_ids "
                        f"has {len(category_ids) if category_ids is not None else 'no'} entries; give one category "
                        "id per class index")
    cats = [int(category_ids[i]) for i in labels] if category_ids is not None else [int(i) + 1 for i in labels]
    rles: list[dict[str, Any]] | None = None
    if masks is not None:
        m = _numpy(masks)
        if m.ndim != 3 or m.shape[0] != len(boxes):
            raise DataError(f"masks of image {image_id} have shape {m.shape}; expected ({len(boxes)}, H, W)")
        rles = mask_utils.encode(np.asfortranarray(m.astype(bool).transpose(1, 2, 0).astype(np.uint8))) if len(m) \
            else []
        for r in rles:
            r["counts"] = r["counts"].decode("ascii")
    out = []
    for k, ((x1, y1, x2, y2), s, c) in enumerate(zip(boxes, scores, cats, strict=True)):
        res: dict[str, Any] = {"image_id": int(image_id), "category_id": c,
                               "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)}
        if rles is not None:
            res["segmentation"] = {"size": [int(v) for v in rles[k]["size"]], "counts": rles[k]["counts"]}
        out.append(res)
    return out


def write_coco_results(results: Sequence[Mapping[str, Any]], path: str | Path, overwrite: bool = False) -> Path:
    """Write COCO result dicts to a JSON file atomically (a reader never sees half a file).

    Args:
        results: The result dicts, e.g. from :func:`detections_to_coco`.
        path: Output ``.json`` file.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        ConfigError: If ``path`` exists and ``overwrite`` is false.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "results.json"
        >>> write_coco_results([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}], p).name
        'results.json'
        >>> write_coco_results([], p)
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: .../results.json already exists; pass overwrite=true to replace it ...
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass overwrite=true to replace it or choose another file")
    return atomic_write_text(path, json.dumps(list(results), separators=(",", ":")))

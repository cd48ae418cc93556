"""Detections from a detector's decoded predictions: thresholds, per-class NMS, top-k; tiled inference.

The one definition shared by :func:`postprocess` and the ONNX graph of
:func:`frugalvision.detect.onnx_export.export_detector_onnx` (both give the same detections for the same
predictions ``(B, A, 4 + C)``: xyxy boxes in input pixels, then class scores in ``[0, 1]``):

1. **Candidates**: every ``(anchor, class)`` pair whose score is ``> conf_thres`` (strictly). With
   ``multi_label=True`` (YOLOv6's evaluation) an anchor can give several classes; with ``multi_label=False`` only
   its best class (the first on ties) is a candidate. ``class_agnostic=True`` implies the best class only.
2. **NMS** per class (one NMS over all classes when ``class_agnostic``): greedy by descending score (equal scores:
   lower ``class * A + anchor`` first), a box is dropped when its IoU with a kept one is ``> iou_thres``
   (strictly; ``iou_thres`` is rounded to float32, as an ONNX graph stores it).
3. **Top-k** per image: the ``max_det`` highest scores over all classes, in descending order (equal scores: lower
   ``class * A + anchor`` first). No cap per class before this and no pre-NMS cap on the number of candidates.

Boxes must have ``x1 <= x2`` and ``y1 <= y2`` (a distance decoder guarantees it); onnxruntime reorders the
corners of an inverted box, torchvision does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision

from ..errors import ConfigError, DataError

__all__ = ["merge_tile_detections", "postprocess", "predict_tiled"]

Window = tuple[int, int, int, int]


def _check_thresholds(conf_thres: float, iou_thres: float, max_det: int) -> None:
    if not conf_thres >= 0:
        raise ConfigError(f"conf_thres must be >= 0 (scores are in [0, 1]), got {conf_thres}")
    if not 0 <= iou_thres <= 1:
        raise ConfigError(f"iou_thres must be in [0, 1], got {iou_thres}")
    if int(max_det) != max_det or max_det < 1:
        raise ConfigError(f"max_det must be a positive integer, got {max_det!r}")


def _empty(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    long = torch.zeros(0, dtype=torch.int64, device=device)
    return {"boxes": torch.zeros(0, 4, dtype=dtype, device=device),
            "scores": torch.zeros(0, dtype=dtype, device=device), "labels": long, "anchors": long.clone()}


def _nms_by_group(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Indices kept by an NMS run separately in each group, in ascending order.

    One ``torchvision.ops.nms`` per group rather than ``batched_nms``: for small inputs ``batched_nms`` shifts each
    class's boxes by ``class * (max coordinate + 1)``, which rounds the coordinates of high classes in float32
    (about 0.004 px at class 79 of a 640 px image) and can flip a decision near ``iou_thres`` relative to an
    unshifted NMS such as ONNX's. The candidates come in ascending ``class * A + anchor`` order, so an NMS that
    breaks score ties by position prefers the lower index, as onnxruntime does.
    """
    iou = float(np.float32(iou_thres))
    keep = [idx[torchvision.ops.nms(boxes[idx], scores[idx], iou)]
            for idx in (torch.nonzero(groups == g).squeeze(1) for g in torch.unique(groups))]
    return torch.sort(torch.cat(keep)).values if keep else groups.new_zeros(0)


def _top(scores: torch.Tensor, max_det: int) -> torch.Tensor:
    """Positions of the ``max_det`` highest scores, descending; ties keep their given order."""
    return torch.sort(scores, descending=True, stable=True).indices[:max_det]


def postprocess(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.65, max_det: int = 300,
                class_agnostic: bool = False, multi_label: bool = True) -> list[dict[str, torch.Tensor]]:
    """Detections of each image from decoded predictions, by the definition in this module's docstring.

    Args:
        pred: ``(B, A, 4 + C)`` per anchor point: xyxy box in input pixels, then ``C`` class scores in ``[0, 1]``.
        conf_thres: A class is a candidate when its score is strictly greater.
        iou_thres: NMS drops a box whose IoU with a kept box of its class is strictly greater.
        max_det: Most detections per image (the highest scores over all classes).
        class_agnostic: One NMS over all classes (each anchor then gives its best class only).
        multi_label: Every class above ``conf_thres`` of an anchor is a candidate (YOLOv6's evaluation);
            ``False``: only the anchor's best class.

    Returns:
        Per image a dict, sorted by descending score: ``boxes`` ``(K, 4)`` xyxy and ``scores`` ``(K,)`` float32,
        ``labels`` ``(K,)`` int64 class indices and ``anchors`` ``(K,)`` int64, the index into ``A`` of the anchor
        point that produced each detection (for a mask head).

    Raises:
        DataError: If ``pred`` is not ``(B, A, 4 + C)`` with ``C >= 1``.
        ConfigError: If a threshold is out of range.

    Example:
        >>> pred = torch.tensor([[[0., 0, 10, 10, 0.9, 0.1],    # anchor 0: class 0
        ...                       [1., 1, 11, 11, 0.8, 0.7],    # anchor 1: overlaps anchor 0; classes 0 and 1
        ...                       [50., 50, 60, 60, 0.2, 0.3]]])  # anchor 2: class 1
        >>> det = postprocess(pred, conf_thres=0.25, iou_thres=0.5)[0]
        >>> det["labels"].tolist(), det["anchors"].tolist(), det["scores"].tolist()
        ([0, 1, 1], [0, 1, 2], [0.8999999761581421, 0.699999988079071, 0.30000001192092896])
        >>> postprocess(pred, multi_label=False)[0]["labels"].tolist()
        [0, 1]
    """
    if not isinstance(pred, torch.Tensor) or pred.ndim != 3 or pred.shape[-1] < 5:
        shape = tuple(pred.shape) if hasattr(pred, "shape") else type(pred).__name__
        raise DataError(f"postprocess expects predictions (batch, anchors, 4 + classes) with at least one class, got "
                        f"{shape}; pass the detector's eval-mode output")
    _check_thresholds(conf_thres, iou_thres, max_det)
    pred = pred.detach().float()  # as the ONNX graph computes
    out = []
    for p in pred:
        boxes, scores = p[:, :4], p[:, 4:]
        if class_agnostic or not multi_label:
            best = scores.argmax(1)  # the first of equal maxima, as ONNX ArgMax
            scores = torch.where(torch.arange(scores.shape[1], device=p.device) == best[:, None], scores, -1.0)
        cls, anchor = torch.nonzero(scores.t() > conf_thres, as_tuple=True)  # ascending class * A + anchor
        if cls.numel() == 0:
            out.append(_empty(p.device, p.dtype))
            continue
        cand_scores, cand_boxes = scores[anchor, cls], boxes[anchor]
        keep = _nms_by_group(cand_boxes, cand_scores, torch.zeros_like(cls) if class_agnostic else cls, iou_thres)
        keep = keep[_top(cand_scores[keep], int(max_det))]
        out.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": cls[keep],
                    "anchors": anchor[keep]})
    return out


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().to(dtype)


def merge_tile_detections(per_tile: Sequence[Mapping[str, Any]], windows: Sequence[Window], iou_thres: float = 0.5,
                          max_det: int = 300, class_agnostic: bool = False) -> dict[str, torch.Tensor]:
    """Merge the detections of overlapping tiles into detections of the whole image.

    A large image is cut into tiles that overlap, so that an object cut by one tile's border lies whole in a
    neighbouring tile (when the overlap is at least the object's size). An object in an overlap is then found by
    every tile that holds it: shifted into image pixels, its boxes nearly coincide, and a class-wise NMS keeps the
    best one. A box truncated at a tile border overlaps the whole box less and may survive an NMS with a high
    ``iou_thres``; a lower ``iou_thres`` (the default 0.5) removes more of those.

    Args:
        per_tile: Per tile a dict with ``boxes`` ``(K, 4)`` xyxy in tile pixels, ``scores`` and ``labels``
            (tensors or arrays; ``anchors`` optional), e.g. one :func:`postprocess` result.
        windows: Per tile its window ``(x0, y0, x1, y1)`` in image pixels.
        iou_thres: NMS threshold across tiles (strictly greater IoU is a duplicate).
        max_det: Most detections kept, by descending score.
        class_agnostic: One NMS over all classes.

    Returns:
        ``boxes`` (image pixels), ``scores``, ``labels``, ``anchors`` (index in its tile's anchors, ``-1`` when the
        tile's dict has none) and ``tiles`` (index of the source tile), sorted by descending score, on the CPU.

    Raises:
        DataError: If the number of tiles and windows differ or a tile's dict lacks a key.

    Example:
        >>> tile = {"boxes": torch.tensor([[40., 10, 60, 30]]), "scores": torch.tensor([0.9]),
        ...         "labels": torch.tensor([2])}
        >>> shifted = {**tile, "boxes": torch.tensor([[8., 10, 28, 30]]), "scores": torch.tensor([0.8])}
        >>> merged = merge_tile_detections([tile, shifted], [(0, 0, 64, 64), (32, 0, 96, 64)])
        >>> merged["boxes"].tolist(), merged["tiles"].tolist()  # one object, seen by both tiles
        ([[40.0, 10.0, 60.0, 30.0]], [0])
    """
    if len(per_tile) != len(windows):
        raise DataError(f"merge_tile_detections got {len(per_tile)} tile result(s) but {len(windows)} window(s); "
                        "pass one window per tile, in the same order")
    _check_thresholds(0.0, iou_thres, max_det)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("boxes", "scores", "labels", "anchors", "tiles")}
    for i, (det, (x0, y0, _, _)) in enumerate(zip(per_tile, windows, strict=True)):
        missing = [k for k in ("boxes", "scores", "labels") if k not in det]
        if missing:
            raise DataError(f"tile {i}'s detections lack {missing}; each tile needs boxes, scores and labels")
        boxes = _as_tensor(det["boxes"], torch.float32).reshape(-1, 4)
        n = boxes.shape[0]
        parts["boxes"].append(boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
        parts["scores"].append(_as_tensor(det["scores"], torch.float32).reshape(n))
        parts["labels"].append(_as_tensor(det["labels"], torch.int64).reshape(n))
        anchors = det.get("anchors")
        parts["anchors"].append(_as_tensor(anchors, torch.int64).reshape(n) if anchors is not None
                                else torch.full((n,), -1, dtype=torch.int64))
        parts["tiles"].append(torch.full((n,), i, dtype=torch.int64))
    if not per_tile:
        return {**_empty(torch.device("cpu")), "tiles": torch.zeros(0, dtype=torch.int64)}
    merged = {k: torch.cat(v) for k, v in parts.items()}
    groups = torch.zeros_like(merged["labels"]) if class_agnostic else merged["labels"]
    keep = _nms_by_group(merged["boxes"], merged["scores"], groups, iou_thres)
    keep = keep[_top(merged["scores"][keep], int(max_det))]
    return {k: v[keep] for k, v in merged.items()}


def predict_tiled(fn: Callable[[np.ndarray], Mapping[str, Any]], image: np.ndarray, tile: int,
                  overlap: int | float = 64,
                  windows: Sequence[Window] | None = None, iou_thres: float = 0.5, max_det: int = 300,
                  class_agnostic: bool = False) -> dict[str, torch.Tensor]:
    """Detect on a large image tile by tile and merge the tiles' detections (see :func:`merge_tile_detections`).

    Args:
        fn: Called with each tile, an ``(h, w, 3)`` uint8 array, it returns the tile's detections (a dict with
            ``boxes`` xyxy in tile pixels, ``scores``, ``labels``), e.g. ``lambda t: postprocess(model(x(t)))[0]``.
        image: ``(H, W, 3)`` uint8 RGB image.
        tile: Tile size in pixels (square tiles; smaller where the image is).
        overlap: Overlap of neighbouring tiles in pixels (an int) or as a fraction of ``tile`` (a float in
            ``[0, 1)``); at least the size of the largest object to find whole.
        windows: The tiles' windows ``(x0, y0, x1, y1)``; by default
            :func:`frugalvision.data.detection.tile_windows` ``(W, H, tile, overlap)`` (the last tile of a row or
            column flush with the image edge).
        iou_thres: NMS threshold across tiles.
        max_det: Most detections kept.
        class_agnostic: One NMS over all classes when merging.

    Returns:
        The merged detections in image pixels, as :func:`merge_tile_detections` returns them.

    Raises:
        DataError: If ``image`` is not an ``(H, W, 3)`` uint8 array.
        ConfigError: If ``overlap`` is negative or not smaller than ``tile`` (without ``windows``).

    Example:
        >>> img = np.zeros((100, 150, 3), np.uint8)
        >>> img[40:60, 70:90] = 255  # one bright square, inside two tiles
        >>> def bright(t):
        ...     ys, xs = np.nonzero(t[..., 0])
        ...     if len(xs) == 0:
        ...         return {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
        ...     return {"boxes": [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], "scores": [0.9], "labels": [0]}
        >>> det = predict_tiled(bright, img, tile=100, overlap=50)
        >>> det["boxes"].tolist()
        [[70.0, 40.0, 90.0, 60.0]]
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"predict_tiled expects an (H, W, 3) uint8 RGB image, got a {what}")
    if windows is None:
        from ..data.detection import tile_windows

        windows = tile_windows(image.shape[1], image.shape[0], tile, overlap)
    windows = [tuple(int(v) for v in w) for w in windows]  # type: ignore[misc]
    per_tile = [fn(np.ascontiguousarray(image[y0:y1, x0:x1])) for x0, y0, x1, y1 in windows]
    return merge_tile_detections(per_tile, windows, iou_thres=iou_thres, max_det=max_det,
                                 class_agnostic=class_agnostic)

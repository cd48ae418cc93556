"""Run a detector on image files of any size: small images letterboxed whole, large ones tile by tile.

An image is tiled when its longer side exceeds ``tile_above`` (default: twice the model's input size): windows of
``tile`` pixels overlapping by ``overlap`` (:func:`frugalvision.data.detection.tile_windows`); each window's
detections are shifted into image pixels and merged across windows with class-wise NMS
(:func:`frugalvision.detect.postprocess.merge_tile_detections`), so an object seen by two windows is kept once.

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from frugalvision.detect.yolov6 import yolov6_test
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (300, 90), "gray").save(p)
    >>> res = detect_images(yolov6_test(num_classes=2), [p], img_size=64, overlap=16, progress=False)
    >>> res[0]["width"], res[0]["height"], res[0]["tiles"], sorted(res[0])[:3]
    (300, 90, 12, ['boxes', 'height', 'image'])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.detection import BoxSample, BoxSet, tile_windows
from ..data.images import load_image
from .postprocess import merge_tile_detections
from .train import predict_boxset

__all__ = ["detect_images"]


def detect_images(model: nn.Module, images: Sequence[str | Path], img_size: int, tile: int | None = None,
                  overlap: int = 64, tile_above: int | None = None, conf_thres: float = 0.25, iou_thres: float = 0.65,
                  max_det: int = 300, batch_size: int = 8, device: str | torch.device = "auto",
                  progress: bool = True) -> list[dict[str, Any]]:
    """Detections of each image in its own pixels: ``image``, ``width``, ``height``, ``tiles``, ``boxes``, ...

    Args:
        model: A detector whose ``forward`` returns ``(B, A, 4 + C)`` (our YOLOv6, fused or not).
        images: Image files.
        img_size: The model's input size (letterboxed square).
        tile: Window size for large images (default ``img_size``).
        overlap: Overlap of neighbouring windows in pixels (at least the size of the largest object).
        tile_above: Tile images whose longer side exceeds this (default ``2 * img_size``).
        conf_thres: Score threshold (per window).
        iou_thres: NMS IoU threshold (per window; the merge across windows uses at most 0.5).
        max_det: Most detections per window and per image.
        batch_size: Windows per forward pass.
        device: auto, cpu or cuda.
        progress: Progress bar.
    """
    tile = tile or img_size
    tile_above = tile_above or 2 * img_size
    samples: list[BoxSample] = []
    owners: list[int] = []
    sizes: list[tuple[int, int]] = []
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    for i, path in enumerate(images):
        w, h = load_image(path).size  # decodes once here to fail early with the file's name
        sizes.append((w, h))
        wins = tile_windows(w, h, tile, overlap) if max(w, h) > tile_above else [None]
        for win in wins:
            sw, sh = (w, h) if win is None else (win[2] - win[0], win[3] - win[1])
            samples.append(BoxSample(Path(path), empty_boxes, empty_labels, sw, sh, len(samples) + 1, window=win,
                                     group=str(path)))
            owners.append(i)
    boxset = BoxSet(samples, [f"class_{k}" for k in range(int(getattr(model, "num_classes", 1)))])
    dets = predict_boxset(model, boxset, img_size, batch_size, device, conf_thres, iou_thres, max_det, progress)
    out: list[dict[str, Any]] = []
    for i, path in enumerate(images):
        idx = [j for j, o in enumerate(owners) if o == i]
        windows = [samples[j].window or (0, 0, sizes[i][0], sizes[i][1]) for j in idx]
        per = [dets[j] for j in idx]
        merged = per[0] if len(per) == 1 else merge_tile_detections(per, windows, iou_thres=min(iou_thres, 0.5),
                                                                     max_det=max_det)
        merged = {k: v for k, v in merged.items() if k in ("boxes", "scores", "labels")}
        out.append({"image": Path(path), "width": sizes[i][0], "height": sizes[i][1], "tiles": len(idx), **merged})
    return out

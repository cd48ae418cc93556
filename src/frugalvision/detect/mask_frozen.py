"""Mask Frozen: instance masks from a frozen YOLOv6 detector plus a light trained mask head.

Mask Frozen-DETR (no official code) keeps a trained DETR-family detector frozen and trains only a mask head: for
each detected box it crops image features inside the box and predicts the mask as the dot product of the box's
query embedding with every pixel embedding of the crop, trained with BCE + Dice. It reaches the mask AP of
end-to-end instance segmenters at over 10x less training. Here the same idea on our frozen YOLOv6:

* **Boxes**: the detector's own detections (:func:`~frugalvision.detect.postprocess.postprocess`, top-K).
* **Pixel embeddings**: RoIAlign crops (``mask_size // 2`` bins) of the neck's P3 map (stride 8; ``mask_roi="p3"``,
  the default) or of the level (P3/P4/P5) of the anchor point that produced the detection (``"anchor_level"``: the
  detector's own scale choice), projected to ``mask_dim`` channels (1x1), two 3x3 conv + GroupNorm + ReLU,
  upsampled 2x to ``mask_size``; with ``mask_pixels`` (default) the RoIAlign crop of the input image at
  ``mask_size`` is added (a stride-8 map is too coarse for the outline of a 20 px defect: 2.5 cells), fused by a
  3x3 conv, then a 1x1 conv gives the pixel embeddings.
* **Box embedding** (DETR's query): the head's stem features at the detection's anchor point (its level and grid
  cell come from ``anchors``), a 1x1 projection per level to ``mask_dim``, plus a learned embedding of the detected
  class, then a 2-layer MLP.
* **Mask logits** = box embedding · pixel embedding / sqrt(mask_dim) + a learned bias, at ``mask_size`` x
  ``mask_size`` in the box; pasted into the image by bilinear resampling (:func:`paste_masks`).
* **Mask-IoU rescoring** (``mask_rescore``, Mask Scoring R-CNN; off by default): an MLP predicts the IoU of the
  predicted mask with the ground truth from the box embedding and the pooled pixel embeddings; at inference the
  detection score is multiplied by it.

Design choices, measured on :func:`~frugalvision.detect.datasets.defect_boxset` (one YOLOv6-N trained 240 s on
CPU, box AP 33.1; head trained 5 epochs; test mask AP): P3 crops 34.2 vs anchor-level crops 33.8 (P3 is also
cheaper: one projection); without the image-pixel crops 27.9 (-6.3); ``mask_dim`` 32 instead of 64: 32.6;
rescoring changed mask AP by -0.3 (P3) and -0.0 (anchor level), so it is off by default.

:class:`MaskFrozen` holds the frozen detector (``requires_grad_(False)`` and always in eval mode, so its weights and
BatchNorm statistics never move) and the :class:`MaskHead`; :func:`fit_mask_head` trains the head only: each
image's detections (score >= ``conf_thres``, top-K) with IoU >= 0.5 to a ground-truth instance, plus the
ground-truth boxes themselves (``gt_proposals``, as Mask R-CNN adds them to its proposals; their anchor is the one
inside the box with the highest score of the box's class), take the ground-truth mask cropped to the box by
RoIAlign as target; loss BCE + Dice (+ MSE on the predicted IoU); AdamW, warm-up + cosine. :func:`evaluate_masks`
gives COCO box and mask AP (pycocotools) with masks pasted at each sample's original pixels.

Example:
    >>> from frugalvision.detect import create_detector
    >>> model = MaskFrozen(create_detector("yolov6_test", num_classes=2), conf_thres=0.0, max_det=5).eval()
    >>> out = model(torch.rand(1, 3, 64, 64))
    >>> out[0]["masks"].shape  # 5 detections, masks at image size
    torch.Size([5, 64, 64])
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

from ..data.detection import BoxSet, DetectionDataset, to_original, write_coco
from ..engine.trainer import _progress, build_optimizer, resolve_device, seed_everything
from ..errors import ConfigError, DataError, TrainingDivergedError
from .coco_eval import coco_metrics, detections_to_coco
from .postprocess import postprocess
from .train import _loader, _lr_factor
from .yolov6 import DetectorOutput, YOLOv6, create_detector

__all__ = [
    "MaskFitResult",
    "MaskFrozen",
    "MaskHead",
    "MaskTrainConfig",
    "build_mask_frozen_from_info",
    "dice_loss",
    "evaluate_masks",
    "fit_mask_head",
    "mask_targets",
    "paste_masks",
]

RoiMode = Literal["anchor_level", "p3"]


# ----------------------------------------------------------------------------------------------- helpers
def anchor_cells(anchors: torch.Tensor, level_sizes: Sequence[tuple[int, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level, row and column of flat anchor indices (levels concatenated row-major, as the detector flattens them).

    Example:
        >>> lvl, y, x = anchor_cells(torch.tensor([0, 5, 16, 19]), [(4, 4), (2, 2)])
        >>> lvl.tolist(), y.tolist(), x.tolist()
        ([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 0, 1])
    """
    counts = torch.tensor([h * w for h, w in level_sizes], device=anchors.device)
    ends = counts.cumsum(0)
    level = torch.searchsorted(ends, anchors, right=True)
    if bool((level >= len(level_sizes)).any()):
        raise DataError(f"anchor index {int(anchors.max())} is beyond the detector's {int(ends[-1])} anchor points")
    pos = anchors - (ends - counts)[level]
    widths = torch.tensor([w for _, w in level_sizes], device=anchors.device)[level]
    return level, pos // widths, pos % widths


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, chunk: int = 64) -> torch.Tensor:
    """Paste ``(K, M, M)`` box-relative masks (probabilities) into ``(K, height, width)`` images.

    The mask covers its box ``(x1, y1, x2, y2)`` in continuous pixels; each image pixel centre samples it
    bilinearly (zero outside the box). ``chunk`` masks are resampled at a time to bound memory.

    Example:
        >>> out = paste_masks(torch.ones(1, 4, 4), torch.tensor([[2.0, 1.0, 6.0, 3.0]]), 4, 8)
        >>> out[0].round().int().tolist()
        [[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    """
    k = masks.shape[0]
    if k == 0:
        return masks.new_zeros((0, height, width))
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    out = []
    for i in range(0, k, chunk):
        b = boxes[i:i + chunk].float()
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-3)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-3)
        gx = 2 * (xs[None] - b[:, 0:1]) / bw[:, None] - 1  # (k, W) in [-1, 1] inside the box
        gy = 2 * (ys[None] - b[:, 1:2]) / bh[:, None] - 1  # (k, H)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (k, H, W, 2)
        m = masks[i:i + chunk, None].float()
        out.append(F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0])
    return torch.cat(out)


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Binary ``(R, size, size)`` targets: each full-image mask cropped to its box by RoIAlign, then ``>= 0.5``.

    Example:
        >>> m = torch.zeros(1, 8, 8); m[0, 2:6, 2:4] = 1
        >>> mask_targets(m, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 4)[0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    """
    if len(boxes) == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    crops = roi_align(gt_masks[:, None].float(), rois.float(), size, spatial_scale=1.0, sampling_ratio=2,
                      aligned=True)
    return (crops[:, 0] >= 0.5).float()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean soft Dice loss ``1 - (2 |p t| + eps) / (|p| + |t| + eps)`` over instances.

    Example:
        >>> t = torch.zeros(1, 4, 4); t[0, :2] = 1
        >>> round(float(dice_loss(torch.where(t > 0, 20.0, -20.0), t)), 4)
        0.0
    """
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def _mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary ``(R, M, M)`` masks, per instance (1 where both are empty)."""
    p, t = pred.flatten(1), target.flatten(1)
    inter, union = (p * t).sum(1), ((p + t) > 0).float().sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ----------------------------------------------------------------------------------------------- modules
def _conv_gn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(min(8, cout), cout),
                         nn.ReLU(inplace=True))


class MaskHead(nn.Module):
    """Masks of boxes from a frozen detector's features: box embedding · RoI pixel embeddings (module docstring).

    Args:
        neck_chs: Channels of the neck maps (P3, P4, P5).
        head_chs: Channels of the head's per-level stem features.
        num_classes: Detector classes (a learned embedding of the detected class joins the box embedding).
        strides: Strides of the neck levels.
        mask_size: Side of the predicted box-relative mask.
        mask_dim: Width of the pixel and box embeddings.
        mask_roi: ``anchor_level`` (crop the neck level of the detection's anchor) or ``p3`` (always P3).
        mask_pixels: Add the RoIAlign crop of the input image to the pixel embeddings.
        mask_rescore: Predict the mask's IoU (multiplies the detection score at inference).

    Example:
        >>> head = MaskHead((16, 32), (16, 32), num_classes=2, strides=(8, 16), mask_size=8, mask_dim=8,
        ...                 mask_rescore=True)
        >>> neck = [torch.rand(1, 16, 4, 4), torch.rand(1, 32, 2, 2)]
        >>> logits, iou = head(neck, neck, [(4, 4), (2, 2)], torch.rand(1, 3, 32, 32),
        ...                    [torch.tensor([[0.0, 0, 10, 10], [4, 4, 30, 20]])], [torch.tensor([0, 17])],
        ...                    [torch.tensor([1, 0])])
        >>> logits.shape, iou.shape
        (torch.Size([2, 8, 8]), torch.Size([2]))
    """

    def __init__(self, neck_chs: Sequence[int], head_chs: Sequence[int], num_classes: int,
                 strides: Sequence[int] = (8, 16, 32), mask_size: int = 28, mask_dim: int = 64,
                 mask_roi: RoiMode = "p3", mask_pixels: bool = True, mask_rescore: bool = False) -> None:
        super().__init__()
        if mask_size < 4 or mask_size % 2:
            raise ConfigError(f"mask_size must be an even number >= 4, got {mask_size}")
        if mask_dim < 8:
            raise ConfigError(f"mask_dim must be >= 8, got {mask_dim}")
        if mask_roi not in ("anchor_level", "p3"):
            raise ConfigError(f"mask_roi must be 'anchor_level' or 'p3', got {mask_roi!r}")
        if not len(neck_chs) == len(head_chs) == len(strides):
            raise ConfigError(f"neck_chs {tuple(neck_chs)}, head_chs {tuple(head_chs)} and strides {tuple(strides)} "
                              "must have one entry per level")
        self.mask_size, self.mask_dim, self.mask_roi = int(mask_size), int(mask_dim), mask_roi
        self.mask_pixels, self.mask_rescore = bool(mask_pixels), bool(mask_rescore)
        self.strides = tuple(int(s) for s in strides)
        used = neck_chs if mask_roi == "anchor_level" else neck_chs[:1]
        self.lateral = nn.ModuleList(nn.Conv2d(c, mask_dim, 1) for c in used)
        self.tower = nn.Sequential(_conv_gn(mask_dim, mask_dim), _conv_gn(mask_dim, mask_dim))
        pix = 16 if mask_pixels else 0
        self.pixel_stem = _conv_gn(3, pix) if mask_pixels else nn.Identity()
        self.fuse = _conv_gn(mask_dim + pix, mask_dim)
        self.embed = nn.Conv2d(mask_dim, mask_dim, 1)
        self.box_proj = nn.ModuleList(nn.Linear(c, mask_dim) for c in head_chs)
        self.class_embed = nn.Embedding(num_classes, mask_dim)
        self.box_mlp = nn.Sequential(nn.Linear(mask_dim, mask_dim), nn.ReLU(inplace=True),
                                     nn.Linear(mask_dim, mask_dim))
        self.bias = nn.Parameter(torch.zeros(()))
        self.iou_head = nn.Sequential(nn.Linear(3 * mask_dim, mask_dim), nn.ReLU(inplace=True),
                                      nn.Linear(mask_dim, 1)) if mask_rescore else None

    def _rois(self, boxes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([torch.full((len(b),), i, dtype=torch.float32, device=b.device) for i, b in enumerate(boxes)])
        return torch.cat([idx[:, None], torch.cat(list(boxes)).float()], 1), idx.long()

    def forward(self, neck: Sequence[torch.Tensor], stems: Sequence[torch.Tensor],
                level_sizes: Sequence[tuple[int, int]], images: torch.Tensor, boxes: Sequence[torch.Tensor],
                anchors: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mask logits ``(R, mask_size, mask_size)`` and predicted mask IoU ``(R,)`` (None without rescoring).

        Args:
            neck: Neck maps of the batch (one per level).
            stems: Head stem features per level.
            level_sizes: ``(H, W)`` per level.
            images: The detector's input ``(B, 3, S, S)`` in ``[0, 1]``.
            boxes: Per image ``(K_i, 4)`` xyxy boxes in input pixels; ``R = sum K_i``.
            anchors: Per image ``(K_i,)`` flat anchor indices of the boxes.
            labels: Per image ``(K_i,)`` class indices.
        """
        rois, bidx = self._rois(boxes)
        anchor = torch.cat(list(anchors)).long()
        label = torch.cat(list(labels)).long()
        level, gy, gx = anchor_cells(anchor, level_sizes)
        r, half = len(rois), self.mask_size // 2
        crops = rois.new_zeros((r, self.mask_dim, half, half))
        box_emb = rois.new_zeros((r, self.mask_dim))
        for lvl in range(len(level_sizes)):
            sel = torch.nonzero(level == lvl).squeeze(1)
            if len(sel) == 0:
                continue
            feat = stems[lvl][bidx[sel], :, gy[sel], gx[sel]]
            box_emb = box_emb.index_copy(0, sel, self.box_proj[lvl](feat.float()))
            if self.mask_roi == "anchor_level":
                lat = self.lateral[lvl](neck[lvl].float())
                crops = crops.index_copy(0, sel, roi_align(lat, rois[sel], half, 1.0 / self.strides[lvl], 2, True))
        if self.mask_roi == "p3":
            crops = roi_align(self.lateral[0](neck[0].float()), rois, half, 1.0 / self.strides[0], 2, True)
        x = F.interpolate(self.tower(crops), scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.mask_pixels:
            pix = roi_align(images.float() - 0.5, rois, self.mask_size, 1.0, 2, True)
            x = torch.cat([x, self.pixel_stem(pix)], 1)
        pixel_emb = self.embed(self.fuse(x))  # (R, D, M, M)
        query = self.box_mlp(box_emb + self.class_embed(label))  # (R, D)
        logits = torch.einsum("rd,rdhw->rhw", query, pixel_emb) / math.sqrt(self.mask_dim) + self.bias
        if self.iou_head is None:
            return logits, None
        prob = logits.detach().sigmoid()[:, None]
        inside = (pixel_emb * prob).sum((2, 3)) / prob.sum((2, 3)).clamp(min=1.0)
        iou = self.iou_head(torch.cat([query, inside, pixel_emb.mean((2, 3))], 1)).squeeze(1).sigmoid()
        return logits, iou


#: Constructor arguments of :class:`MaskFrozen` beyond the detector (what :meth:`MaskFrozen.head_kwargs` returns).
HEAD_KEYS = ("mask_size", "mask_dim", "mask_roi", "mask_pixels", "mask_rescore")


class MaskFrozen(nn.Module):
    """A frozen detector plus a trainable :class:`MaskHead`: detections with instance masks.

    The detector gets ``requires_grad_(False)`` and stays in eval mode whatever ``train()`` is called with, so its
    weights and BatchNorm statistics never change. ``forward(images)`` returns per image a dict: ``boxes``
    ``(K, 4)`` xyxy input pixels, ``scores`` (times the predicted mask IoU with ``mask_rescore``), ``labels``,
    ``anchors``, ``mask_iou`` (predicted; ones without rescoring) and ``masks`` ``(K, H, W)`` float
    probabilities at the input size.

    Args:
        detector: A trained :class:`~frugalvision.detect.yolov6.YOLOv6`.
        mask_size, mask_dim, mask_roi, mask_pixels, mask_rescore: :class:`MaskHead` settings.
        conf_thres, iou_thres, max_det: Post-processing of the detector's predictions (``max_det`` = top-K boxes
            that get masks).
    """

    def __init__(self, detector: YOLOv6, mask_size: int = 28, mask_dim: int = 64,
                 mask_roi: RoiMode = "p3", mask_pixels: bool = True, mask_rescore: bool = False,
                 conf_thres: float = 0.25, iou_thres: float = 0.65, max_det: int = 100) -> None:
        super().__init__()
        if not hasattr(detector, "forward_raw") or not hasattr(detector, "head"):
            raise ConfigError(f"MaskFrozen needs a YOLOv6-style detector with forward_raw and head, got "
                              f"{type(detector).__name__}")
        self.detector = detector.eval().requires_grad_(False)
        neck_chs = list(detector.neck.out_chs)  # the head's 1x1 stems keep each level's width
        self.head = MaskHead(neck_chs, neck_chs, detector.num_classes, detector.strides, mask_size, mask_dim,
                             mask_roi, mask_pixels, mask_rescore)
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det

    def head_kwargs(self) -> dict[str, Any]:
        """The head's constructor arguments (for model files; :func:`build_mask_frozen_from_info` reads them)."""
        h = self.head
        return {"mask_size": h.mask_size, "mask_dim": h.mask_dim, "mask_roi": h.mask_roi,
                "mask_pixels": h.mask_pixels, "mask_rescore": h.mask_rescore}

    def train(self, mode: bool = True) -> MaskFrozen:
        """Set the head's mode; the detector stays in eval mode."""
        super().train(mode)
        self.detector.eval()
        return self

    @torch.no_grad()
    def detect(self, images: torch.Tensor, conf_thres: float | None = None, iou_thres: float | None = None,
               max_det: int | None = None) -> tuple[DetectorOutput, list[dict[str, torch.Tensor]]]:
        """The frozen detector's raw output and post-processed detections (boxes clipped to the image)."""
        out = self.detector.forward_raw(images)
        pred = torch.cat((out.boxes, out.cls_logits.float().sigmoid()), -1)
        dets = postprocess(pred, self.conf_thres if conf_thres is None else conf_thres,
                           self.iou_thres if iou_thres is None else iou_thres,
                           self.max_det if max_det is None else max_det)
        h, w = images.shape[-2:]
        for d in dets:
            d["boxes"] = torch.stack([d["boxes"][:, 0].clamp(0, w), d["boxes"][:, 1].clamp(0, h),
                                      d["boxes"][:, 2].clamp(0, w), d["boxes"][:, 3].clamp(0, h)], 1)
        return out, dets

    def predict(self, images: torch.Tensor, conf_thres: float | None = None, iou_thres: float | None = None,
                max_det: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections with box-relative mask probabilities ``mask_probs`` ``(K, mask_size, mask_size)``."""
        out, dets = self.detect(images, conf_thres, iou_thres, max_det)
        logits, iou = self.head(out.neck, out.head, out.level_sizes, images, [d["boxes"] for d in dets],
                                [d["anchors"] for d in dets], [d["labels"] for d in dets])
        counts = [len(d["boxes"]) for d in dets]
        iou = iou if iou is not None else logits.new_ones(len(logits))
        for d, lg, q in zip(dets, logits.split(counts), iou.split(counts), strict=True):
            d["mask_probs"] = lg.sigmoid()
            d["mask_iou"] = q
            if self.head.mask_rescore:
                d["scores"] = d["scores"] * q
                order = torch.sort(d["scores"], descending=True, stable=True).indices
                for k in ("boxes", "scores", "labels", "anchors", "mask_probs", "mask_iou"):
                    d[k] = d[k][order]
        return dets

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections with ``masks`` ``(K, H, W)`` probabilities at the input size (see the class docstring)."""
        h, w = images.shape[-2:]
        dets = self.predict(images)
        for d in dets:
            d["masks"] = paste_masks(d.pop("mask_probs"), d["boxes"], h, w)
        return dets


def build_mask_frozen_from_info(info: Mapping[str, Any]) -> MaskFrozen:
    """The Mask Frozen model a model file describes (kind ``mask_frozen``), weights not loaded.

    ``model_kwargs`` holds the detector's arguments plus the head's (:data:`HEAD_KEYS`).

    Example:
        >>> m = build_mask_frozen_from_info({"name": "yolov6_test", "model_kwargs": {"num_classes": 2,
        ...                                   "mask_size": 14}})
        >>> m.head.mask_size, m.detector.num_classes
        (14, 2)
    """
    kwargs = dict(info.get("model_kwargs", {}))
    head = {k: kwargs.pop(k) for k in HEAD_KEYS if k in kwargs}
    return MaskFrozen(create_detector(str(info["name"]), **kwargs), **head)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class MaskTrainConfig:
    """Settings of a mask-head training run (the detector stays frozen).

    Attributes:
        img_size: Square letterbox size (the detector's).
        epochs: Passes over the training data (the planned schedule).
        time_budget_s: Stop after this many seconds (the schedule is compressed to fit); None: no limit.
        batch_size: Images per step.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (weights of dimension >= 2).
        warmup: Fraction of the run in linear warm-up; then cosine to ``lr * final_lr_ratio``.
        final_lr_ratio: End of the cosine.
        conf_thres: Detections above this score are mask candidates during training.
        nms_iou: NMS IoU threshold of the detections.
        top_k: Most detections per image considered.
        match_iou: A detection trains on the ground-truth instance it overlaps by at least this box IoU.
        gt_proposals: Also train on the ground-truth boxes themselves (anchor: the best-scoring one inside).
        rois_per_image: Most training boxes per image (a random subset beyond).
        dice_weight: Weight of the Dice loss (BCE has weight 1).
        iou_weight: Weight of the mask-IoU regression loss (when the head rescores).
        grad_clip: Clip the gradient norm (None: off).
        augment: :class:`~frugalvision.data.detection.DetectionDataset` keyword arguments.
        device, seed, num_workers, progress: As in :class:`~frugalvision.detect.train.DetectTrainConfig`.

    Example:
        >>> MaskTrainConfig(img_size=128, epochs=4).match_iou
        0.5
    """

    img_size: int = 320
    epochs: int = 12
    time_budget_s: float | None = None
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    final_lr_ratio: float = 0.01
    conf_thres: float = 0.05
    nms_iou: float = 0.65
    top_k: int = 20
    match_iou: float = 0.5
    gt_proposals: bool = True
    rois_per_image: int = 8
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    grad_clip: float | None = 10.0
    augment: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.img_size < 32 or self.img_size % 32:
            raise ConfigError(f"img_size must be a multiple of 32 (the detector's largest stride), got {self.img_size}")
        if self.epochs < 1 or self.batch_size < 1 or self.top_k < 1 or self.rois_per_image < 1:
            raise ConfigError(f"epochs, batch_size, top_k and rois_per_image must be >= 1, got {self.epochs}, "
                              f"{self.batch_size}, {self.top_k}, {self.rois_per_image}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be > 0 (a finite number), got {self.lr}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s must be > 0 or unset, got {self.time_budget_s}")
        if not 0 < self.match_iou <= 1:
            raise ConfigError(f"match_iou must be in (0, 1], got {self.match_iou}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the run in [0, 1), got {self.warmup}")


@dataclass
class MaskFitResult:
    """What :func:`fit_mask_head` produced (the model is trained in place)."""

    model: MaskFrozen
    history: list[dict[str, float]]
    train_seconds: float
    steps: int
    epochs_done: float

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no model)."""
        return {"train_seconds": round(self.train_seconds, 1), "steps": self.steps,
                "epochs_done": round(self.epochs_done, 2), "history": self.history}


def _gt_anchors(out: DetectorOutput, b: int, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
    """Per ground-truth box the anchor the detector would answer with: inside the box, best score of its class."""
    pts = out.anchor_points
    inside = ((pts[None, :, 0] > gt_boxes[:, None, 0]) & (pts[None, :, 0] < gt_boxes[:, None, 2])
              & (pts[None, :, 1] > gt_boxes[:, None, 1]) & (pts[None, :, 1] < gt_boxes[:, None, 3]))
    score = out.cls_logits[b].float().t()[gt_labels]  # (G, A)
    best = torch.where(inside, score, torch.full_like(score, -1e9)).argmax(1)
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    nearest = torch.cdist(centre, pts).argmin(1)
    return torch.where(inside.any(1), best, nearest)


def _training_rois(out: DetectorOutput, dets: list[dict[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]],
                   cfg: MaskTrainConfig, size: int, gen: torch.Generator
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Boxes, anchors and labels per image, and the stacked ``(R, M', M')`` target masks (M' = ``size``)."""
    boxes, anchors, labels, tgts = [], [], [], []
    for b, (det, tgt) in enumerate(zip(dets, targets, strict=True)):
        gt_boxes = tgt["boxes"].to(det["boxes"].device)
        gt_masks = tgt.get("masks")
        empty = torch.zeros(0, dtype=torch.int64, device=det["boxes"].device)
        if gt_masks is None or len(gt_boxes) == 0:
            boxes.append(det["boxes"][:0])
            anchors.append(empty)
            labels.append(empty)
            continue
        gt_masks = gt_masks.to(det["boxes"].device)
        gt_labels = tgt["labels"].to(det["boxes"].device)
        parts_b, parts_a, parts_l, parts_g = [], [], [], []
        if len(det["boxes"]):
            iou = box_iou(det["boxes"], gt_boxes)
            best, gi = iou.max(1)
            ok = best >= cfg.match_iou
            parts_b.append(det["boxes"][ok])
            parts_a.append(det["anchors"][ok])
            parts_l.append(det["labels"][ok])
            parts_g.append(gi[ok])
        if cfg.gt_proposals:
            parts_b.append(gt_boxes)
            parts_a.append(_gt_anchors(out, b, gt_boxes, gt_labels))
            parts_l.append(gt_labels)
            parts_g.append(torch.arange(len(gt_boxes), device=gt_boxes.device))
        bx, an, lb, gi = (torch.cat(p) if p else empty for p in (parts_b, parts_a, parts_l, parts_g))
        if len(bx) > cfg.rois_per_image:
            keep = torch.randperm(len(bx), generator=gen)[:cfg.rois_per_image].to(bx.device)
            bx, an, lb, gi = bx[keep], an[keep], lb[keep], gi[keep]
        boxes.append(bx.float().reshape(-1, 4))
        anchors.append(an)
        labels.append(lb)
        tgts.append(mask_targets(gt_masks[gi], bx.float().reshape(-1, 4), size))
    target = torch.cat(tgts) if tgts else torch.zeros(0, size, size)
    return boxes, anchors, labels, target


def mask_loss(logits: torch.Tensor, iou: torch.Tensor | None, target: torch.Tensor, dice_weight: float = 1.0,
              iou_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + ``dice_weight`` Dice (+ ``iou_weight`` MSE of the predicted mask IoU) and the parts as floats.

    Example:
        >>> t = torch.zeros(2, 4, 4); t[:, :2] = 1
        >>> loss, parts = mask_loss(torch.where(t > 0, 9.0, -9.0), torch.ones(2), t)
        >>> sorted(parts), parts["iou"]
        (['bce', 'dice', 'iou', 'loss'], 0.0)
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = dice_loss(logits, target)
    loss = bce + dice_weight * dice
    parts = {"bce": bce.item(), "dice": dice.item()}
    if iou is not None:
        actual = _mask_iou((logits.detach() > 0).float(), target)
        iou_l = F.mse_loss(iou, actual)
        loss = loss + iou_weight * iou_l
        parts["iou"] = iou_l.item()
    parts["loss"] = loss.item()
    return loss, parts


def fit_mask_head(model: MaskFrozen, train: BoxSet, cfg: MaskTrainConfig) -> MaskFitResult:
    """Train ``model.head`` on the instance masks of ``train``; the detector stays frozen (module docstring).

    Args:
        model: A :class:`MaskFrozen` (trained in place).
        train: Samples with ``masks``.
        cfg: Settings.

    Returns:
        The model, per-epoch history (mean losses, rois per image) and the training seconds (detector forwards
        included: they are part of what training the head costs).

    Raises:
        DataError: If ``train`` is empty or has no instance masks.
    """
    if len(train) == 0 or train.num_boxes() == 0:
        raise DataError("the training set has no boxes: the mask head needs instances with masks to learn from")
    if not any(s.masks is not None for s in train.samples):
        raise DataError(f"the training set {train.name!r} has no instance masks; give samples with masks (e.g. "
                        "frugalvision.detect.datasets.defect_boxset or a COCO file loaded with with_masks=True)")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device).train()
    ds = DetectionDataset(train, img_size=cfg.img_size, train=True, seed=cfg.seed, **cfg.augment)
    loader = _loader(ds, cfg.batch_size, True, cfg.num_workers, cfg.seed)
    opt = build_optimizer(model.head, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    planned = cfg.epochs * len(loader)
    history: list[dict[str, float]] = []
    step, stop = 0, False
    bar = _progress(range(planned), "train mask head", cfg.progress, total=planned)
    it = iter(bar) if cfg.progress else None
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        ds.set_epoch(epoch)
        sums: dict[str, float] = {}
        n = rois = 0
        for images, targets in loader:
            elapsed = time.perf_counter() - start
            progress = step / planned
            if cfg.time_budget_s:
                progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                stop = True
                break
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(progress, cfg.warmup, cfg.final_lr_ratio)
            images = images.to(device, non_blocking=True)
            out, dets = model.detect(images, cfg.conf_thres, cfg.nms_iou, cfg.top_k)
            boxes, anchors, labels, target = _training_rois(out, dets, targets, cfg, model.head.mask_size, gen)
            step += 1
            if it is not None:
                next(it, None)
            if len(target) == 0:
                continue
            logits, iou = model.head(out.neck, out.head, out.level_sizes, images, boxes, anchors, labels)
            loss, parts = mask_loss(logits, iou, target.to(device), cfg.dice_weight, cfg.iou_weight)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"the mask loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.head.parameters(), cfg.grad_clip)
            opt.step()
            n += 1
            rois += len(target)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if it is not None:
                bar.set_postfix(loss=f"{parts['loss']:.3f}", rois=len(target))
        if n or not stop:  # no record for an epoch the budget ended before its first step
            history.append({"epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 2),
                            "rois_per_step": round(rois / max(n, 1), 1),
                            **{k: round(v / max(n, 1), 5) for k, v in sums.items()}})
        if stop:
            break
    if cfg.progress:
        bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    return MaskFitResult(model, history, seconds, step, step / max(1, len(loader)))


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_masks(model: MaskFrozen, boxset: BoxSet, img_size: int, batch_size: int = 8,
                  device: str | torch.device = "auto", conf_thres: float = 0.001, iou_thres: float = 0.65,
                  max_det: int = 100, progress: bool = True, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Detections with boolean ``masks`` ``(K, h, w)`` in each sample's own pixels (``image_id`` added).

    The letterbox is undone on the boxes (:func:`~frugalvision.data.detection.to_original`) and each box-relative
    mask is pasted straight into the sample's ``height`` x ``width`` pixels, then thresholded at ``threshold``.
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    ds = DetectionDataset(boxset, img_size=img_size, train=False)
    loader = _loader(ds, batch_size, False, 0, 0)
    results: list[dict[str, Any]] = []
    for images, targets in _progress(loader, "masks", progress, total=len(loader)):
        dets = model.predict(images.to(device), conf_thres, iou_thres, max_det)
        for det, tgt in zip(dets, targets, strict=True):
            w, h = tgt["orig_size"]
            boxes = to_original(det["boxes"], tgt).float()
            masks = paste_masks(det["mask_probs"], boxes, int(h), int(w)) >= threshold
            results.append({"boxes": boxes.cpu(), "scores": det["scores"].cpu(), "labels": det["labels"].cpu(),
                            "mask_iou": det["mask_iou"].cpu(), "masks": masks.cpu(),
                            "image_id": int(tgt["image_id"])})
    return results


def evaluate_masks(model: MaskFrozen, boxset: BoxSet, img_size: int, batch_size: int = 8,
                   device: str | torch.device = "auto", conf_thres: float = 0.001, iou_thres: float = 0.65,
                   max_det: int = 100, progress: bool = True) -> dict[str, Any]:
    """COCO box and mask metrics (pycocotools) of ``model`` on ``boxset`` (samples with ``masks``).

    Returns:
        Box metrics under the keys of :func:`~frugalvision.detect.coco_eval.coco_metrics` (``AP``, ``AP50``, ...;
        scores rescored by the predicted mask IoU when the head does) and the same mask metrics prefixed
        ``mask_`` (``mask_AP``, ``mask_AP50``, ``mask_AP75``, ...), in percent, plus ``eval_seconds``.

    Raises:
        DataError: If ``boxset`` has no instance masks.
    """
    if not any(s.masks is not None for s in boxset.samples):
        raise DataError(f"{boxset.name!r} has no instance masks to evaluate against; give samples with masks")
    t0 = time.perf_counter()
    dets = predict_masks(model, boxset, img_size, batch_size, device, conf_thres, iou_thres, max_det, progress)
    results = []
    for d in dets:
        results.extend(detections_to_coco(d["image_id"], d, masks=d["masks"].numpy()))
    with tempfile.TemporaryDirectory() as tmp:
        gt = json.loads(Path(write_coco(boxset, Path(tmp) / "gt.json")).read_text())
    box = coco_metrics(gt, results, iou_type="bbox")
    segm = coco_metrics(gt, results, iou_type="segm")
    metrics: dict[str, Any] = {k: v for k, v in box.items() if k != "summary"}
    metrics.update({f"mask_{k}": v for k, v in segm.items() if k not in ("summary", "num_predictions")})
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return metrics


def config_dict(cfg: MaskTrainConfig) -> dict[str, Any]:
    """The config as JSON-able values."""
    return asdict(cfg)


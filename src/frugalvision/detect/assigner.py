"""Label assignment for anchor-free detectors: ATSS (YOLOv6's warm-up) and the task-aligned assigner (TAL).

Both take padded ground truth ``gt_boxes (N, M, 4)`` xyxy in pixels, ``gt_labels (N, M)`` and ``gt_mask (N, M)``
(True for real boxes) and return per grid point: the target class, the target box, soft class targets
``(N, A, C)`` (an IoU-aware quality, as varifocal loss expects) and a foreground mask.

* ATSS (Zhang et al. 2020): on each level the ``topk`` grid cells nearest to the box centre (cells are squares of
  ``cell_size * stride`` around each point) are candidates; those with IoU above the mean + std of the candidates'
  IoUs and whose point lies inside the box are positives. Soft targets are the IoU of the predicted box.
* TAL (TOOD, Feng et al. 2021): alignment ``score^alpha * IoU^beta`` of the predicted class score and box with each
  ground truth; the ``topk`` best-aligned points inside the box are positives; soft targets are the alignment,
  normalised per box so that its best point gets the box's best IoU.

A point claimed by several boxes keeps the box of highest IoU.

Example:
    >>> pts = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> gt = torch.tensor([[[0.0, 0.0, 16.0, 8.0]]]); lab = torch.tensor([[1]]); ok = torch.tensor([[True]])
    >>> scores = torch.full((1, 4, 2), 0.5); boxes = torch.tensor([[[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16],
    ...                                                               [8, 8, 16, 16]]])
    >>> out = TaskAlignedAssigner(topk=2)(scores, boxes, pts, gt, lab, ok)
    >>> out.fg_mask.tolist()
    [[True, True, False, False]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_iou

__all__ = ["ATSSAssigner", "Assignment", "TaskAlignedAssigner", "pairwise_iou", "points_in_boxes"]


@dataclass
class Assignment:
    """Targets of every grid point: ``labels (N, A)``, ``boxes (N, A, 4)``, ``scores (N, A, C)``, ``fg_mask``."""

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    fg_mask: torch.Tensor


def pairwise_iou(gt: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of every ground truth with every box: ``(N, M, 4)`` x ``(N, A, 4)`` -> ``(N, M, A)``."""
    lt = torch.maximum(gt[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(gt[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_g = (gt[..., 2:] - gt[..., :2]).clamp(min=0).prod(-1)[:, :, None]
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)[:, None, :]
    return inter / (area_g + area_b - inter + eps)


def points_in_boxes(points: torch.Tensor, gt: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Whether each point ``(A, 2)`` lies strictly inside each box ``(N, M, 4)``: ``(N, M, A)`` bool."""
    lt = points[None, None] - gt[:, :, None, :2]
    rb = gt[:, :, None, 2:] - points[None, None]
    return torch.cat((lt, rb), -1).amin(-1) > eps


def _resolve(mask_pos: torch.Tensor, overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep one box per point (the highest IoU); returns (box index per point, fg mask, cleaned mask_pos)."""
    fg = mask_pos.sum(1)
    if fg.max() > 1:
        multi = (fg > 1)[:, None, :].expand_as(mask_pos)
        best = torch.nn.functional.one_hot(overlaps.argmax(1), mask_pos.shape[1]).permute(0, 2, 1).to(mask_pos.dtype)
        mask_pos = torch.where(multi, best, mask_pos)
        fg = mask_pos.sum(1)
    return mask_pos.argmax(1), fg > 0, mask_pos


def _gather_targets(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, idx: torch.Tensor, fg: torch.Tensor,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.gather(gt_labels, 1, idx).long()
    boxes = torch.gather(gt_boxes, 1, idx[..., None].expand(-1, -1, 4))
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).to(gt_boxes.dtype)
    scores = onehot * fg[..., None].to(gt_boxes.dtype)
    labels = torch.where(fg, labels, torch.full_like(labels, num_classes))
    return labels, boxes, scores


def _empty(n: int, a: int, num_classes: int, device: torch.device, dtype: torch.dtype) -> Assignment:
    return Assignment(torch.full((n, a), num_classes, dtype=torch.long, device=device),
                      torch.zeros(n, a, 4, device=device, dtype=dtype), torch.zeros(n, a, num_classes, device=device,
                                                                                    dtype=dtype),
                      torch.zeros(n, a, dtype=torch.bool, device=device))


class TaskAlignedAssigner(nn.Module):
    """Task-aligned assignment (YOLOv6's formal assigner: ``topk=13, alpha=1, beta=6``)."""

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9) -> None:
        super().__init__()
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps

    @torch.no_grad()
    def forward(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor, gt_boxes: torch.Tensor,
                gt_labels: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        """Assign. ``pred_scores (N, A, C)`` are probabilities, ``pred_boxes (N, A, 4)`` xyxy pixels."""
        n, a, c = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return _empty(n, a, c, pred_scores.device, gt_boxes.dtype)
        pred_scores, pred_boxes, gt_boxes = pred_scores.float(), pred_boxes.float(), gt_boxes.float()
        overlaps = pairwise_iou(gt_boxes, pred_boxes)  # (N, M, A)
        cls = torch.gather(pred_scores.transpose(1, 2), 1, gt_labels.clamp(min=0).long()[..., None].expand(-1, -1, a))
        align = cls.pow(self.alpha) * overlaps.pow(self.beta)
        inside = points_in_boxes(points, gt_boxes) & gt_mask[..., None]
        k = min(self.topk, a)
        top_idx = (align * inside).topk(k, dim=-1).indices
        in_top = torch.zeros_like(align, dtype=torch.bool).scatter_(-1, top_idx, True)
        mask_pos = (in_top & inside).to(align.dtype)
        idx, fg, mask_pos = _resolve(mask_pos, overlaps)
        labels, boxes, scores = _gather_targets(gt_boxes, gt_labels, idx, fg, c)
        align = align * mask_pos
        best_align = align.amax(-1, keepdim=True)
        best_iou = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (align * best_iou / (best_align + self.eps)).amax(1)[..., None]  # (N, A, 1)
        return Assignment(labels, boxes, scores * norm, fg)


class ATSSAssigner(nn.Module):
    """Adaptive training sample selection (YOLOv6's warm-up assigner, ``topk=9``)."""

    def __init__(self, topk: int = 9, cell_size: float = 5.0) -> None:
        super().__init__()
        self.topk, self.cell_size = topk, cell_size

    @torch.no_grad()
    def forward(self, points: torch.Tensor, strides: torch.Tensor, level_sizes: Sequence[int], gt_boxes: torch.Tensor,
                gt_labels: torch.Tensor, gt_mask: torch.Tensor, pred_boxes: torch.Tensor | None,
                num_classes: int) -> Assignment:
        """Assign from the grid geometry; ``pred_boxes`` (if given) scale the soft targets by their IoU."""
        n, m = gt_boxes.shape[:2]
        a = points.shape[0]
        if m == 0:
            return _empty(n, a, num_classes, points.device, gt_boxes.dtype)
        gt_boxes = gt_boxes.float()
        half = strides.float() * self.cell_size / 2
        cells = torch.cat((points - half, points + half), -1)  # (A, 4)
        overlaps = box_iou(gt_boxes.reshape(-1, 4), cells).reshape(n, m, a)
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        dist = (centres[:, :, None] - points[None, None]).pow(2).sum(-1).sqrt()  # (N, M, A)
        cand = torch.zeros_like(dist, dtype=torch.bool)
        start = 0
        for size in level_sizes:
            k = min(self.topk, size)
            idx = dist[..., start:start + size].topk(k, dim=-1, largest=False).indices + start
            cand.scatter_(-1, idx, True)
            start += size
        cand &= gt_mask[..., None]
        cand_iou = torch.where(cand, overlaps, torch.zeros_like(overlaps))
        count = cand.sum(-1, keepdim=True).clamp(min=1)
        mean = cand_iou.sum(-1, keepdim=True) / count
        # unbiased std over the candidates, as the reference uses torch.std on the selected IoUs
        var = (torch.where(cand, overlaps - mean, torch.zeros_like(overlaps)).pow(2).sum(-1, keepdim=True)
               / (count - 1).clamp(min=1))
        thr = mean + var.sqrt()
        pos = cand & (overlaps > thr) & points_in_boxes(points, gt_boxes) & gt_mask[..., None]
        idx, fg, mask_pos = _resolve(pos.to(overlaps.dtype), overlaps)
        labels, boxes, scores = _gather_targets(gt_boxes, gt_labels, idx, fg, num_classes)
        if pred_boxes is not None:
            ious = (pairwise_iou(gt_boxes, pred_boxes.float()) * mask_pos).amax(1)[..., None]
            scores = scores * ious
        return Assignment(labels, boxes, scores, fg)

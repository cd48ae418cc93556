"""YOLOv6 training losses: varifocal loss, IoU box loss (SIoU / GIoU / CIoU / DIoU), DFL, self-distillation.

``loss = 1.0 * VFL + 2.5 * IoU + 0.5 * DFL`` (YOLOv6's weights), each normalised by the sum of the soft class
targets. Label assignment is ATSS for the first ``warmup_epochs`` epochs, then task-aligned (top-k 13, alpha 1,
beta 6). The self-distillation term (YOLOv6 v3.0) adds a temperature-softened KL divergence between student and
teacher class scores and DFL bins, its weight decayed by a cosine from 1 to 0.01 over the run.

Example:
    >>> from frugalvision.detect.yolov6 import yolov6_test
    >>> model = yolov6_test(num_classes=2)
    >>> crit = DetectionLoss(num_classes=2, iou_type="siou")
    >>> out = model.forward_raw(torch.rand(2, 3, 64, 64))
    >>> targets = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 30.0]]), labels=torch.tensor([1])),
    ...            dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    >>> loss, parts = crit(out, targets, epoch=0)
    >>> sorted(parts), bool(loss > 0)
    (['cls', 'dfl', 'iou'], True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .assigner import Assignment, ATSSAssigner, TaskAlignedAssigner
from .yolov6 import DetectorOutput

__all__ = ["DetectionLoss", "bbox_iou_loss", "dfl_loss", "pad_targets", "self_distill_loss", "varifocal_loss"]


def varifocal_loss(logits: torch.Tensor, target: torch.Tensor, onehot: torch.Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss (sum): BCE against the soft target, negatives down-weighted by ``alpha * p^gamma``.

    Computed from logits in float32 (the same value as YOLOv6's BCE on sigmoid scores, more stable).
    """
    logits, target = logits.float(), target.float()
    p = logits.sigmoid()
    weight = alpha * p.pow(gamma) * (1 - onehot) + target * onehot
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight.detach()).sum()


def bbox_iou_loss(pred: torch.Tensor, target: torch.Tensor, iou_type: str = "giou", eps: float = 1e-10) -> torch.Tensor:
    """``1 - IoU`` variant per box pair, boxes xyxy ``(K, 4)``; ``iou_type`` in siou, giou, ciou, diou, iou.

    SIoU (Gevorgyan 2022) adds angle, distance and shape costs; the formulas follow YOLOv6's ``IOUloss``.

    Example:
        >>> b = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> [round(bbox_iou_loss(b, b, t).item(), 6) for t in ("iou", "giou", "siou")]
        [0.0, 0.0, 0.0]
    """
    b1x1, b1y1, b1x2, b1y2 = pred.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = target.unbind(-1)
    inter = ((torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0)
             * (torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)).clamp(min=0))
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    if iou_type == "giou":
        c_area = cw * ch + eps
        iou = iou - (c_area - union) / c_area
    elif iou_type in ("diou", "ciou"):
        c2 = cw**2 + ch**2 + eps
        rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
        iou = iou - rho2 / c2
        if iou_type == "ciou":
            v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
            with torch.no_grad():
                a = v / (v - inter / union + 1 + max(eps, 1e-7))
            iou = iou - v * a
    elif iou_type == "siou":
        s_cw = (b2x1 + b2x2 - b1x1 - b1x2) * 0.5 + eps
        s_ch = (b2y1 + b2y2 - b1y1 - b1y2) * 0.5 + eps
        sigma = (s_cw**2 + s_ch**2).sqrt()
        sin1, sin2 = s_cw.abs() / sigma, s_ch.abs() / sigma
        sin_alpha = torch.where(sin1 > 2**0.5 / 2, sin2, sin1)
        angle = torch.cos(torch.arcsin(sin_alpha) * 2 - math.pi / 2)
        gamma = angle - 2
        dist = 2 - torch.exp(gamma * (s_cw / cw) ** 2) - torch.exp(gamma * (s_ch / ch) ** 2)
        ow = (w1 - w2).abs() / torch.maximum(w1, w2)
        oh = (h1 - h2).abs() / torch.maximum(h1, h2)
        shape = (1 - torch.exp(-ow)).pow(4) + (1 - torch.exp(-oh)).pow(4)
        iou = iou - 0.5 * (dist + shape)
    elif iou_type != "iou":
        raise ValueError(f"iou_type must be siou, giou, ciou, diou or iou, got {iou_type!r}")
    return 1.0 - iou


def dfl_loss(logits: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss per box ``(K,)``: cross-entropy to the two bins around each side's distance.

    ``logits (K, 4, reg_max + 1)``, ``target (K, 4)`` distances in grid units, clipped to ``[0, reg_max - 0.01]``.
    """
    target = target.clamp(0, reg_max - 0.01)
    left = target.long()
    w_left = (left + 1).to(target.dtype) - target
    flat = logits.reshape(-1, reg_max + 1).float()
    ce_l = F.cross_entropy(flat, left.reshape(-1), reduction="none").view_as(target)
    ce_r = F.cross_entropy(flat, (left + 1).reshape(-1), reduction="none").view_as(target)
    return (ce_l * w_left + ce_r * (1 - w_left)).mean(-1)


def pad_targets(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth of a batch padded to ``(N, M, 4)`` boxes, ``(N, M)`` labels and a ``(N, M)`` validity mask."""
    m = max((len(t["labels"]) for t in targets), default=0)
    n = len(targets)
    boxes = torch.zeros(n, m, 4, device=device)
    labels = torch.zeros(n, m, dtype=torch.long, device=device)
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        if k:
            boxes[i, :k] = t["boxes"].to(device, torch.float32)
            labels[i, :k] = t["labels"].to(device)
            mask[i, :k] = True
    return boxes, labels, mask


def self_distill_loss(student: DetectorOutput, teacher: DetectorOutput, fg_mask: torch.Tensor, weights: torch.Tensor,
                      reg_max: int, temperature: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KL terms of YOLOv6 self-distillation: class scores (all points) and DFL bins (foreground points).

    Softmax with ``temperature`` over the classes (and over the ``reg_max + 1`` bins of each side), times
    ``temperature^2``; the DFL term is weighted by the box weights of the assignment, as YOLOv6 does.
    """
    t = temperature
    s_cls = student.cls_logits.float().sigmoid().reshape(-1, student.cls_logits.shape[-1])
    t_cls = teacher.cls_logits.float().sigmoid().reshape(-1, student.cls_logits.shape[-1]).detach()
    kl_cls = F.kl_div(F.log_softmax(s_cls / t, -1), F.softmax(t_cls / t, -1), reduction="sum") * t * t
    if reg_max == 0 or not fg_mask.any():
        return kl_cls, student.reg.sum() * 0.0
    s_reg = student.reg[fg_mask].float().reshape(-1, 4, reg_max + 1)
    t_reg = teacher.reg[fg_mask].float().reshape(-1, 4, reg_max + 1).detach()
    kl = F.kl_div(F.log_softmax(s_reg / t, -1), F.softmax(t_reg / t, -1), reduction="none").sum(-1).mean(-1)
    return kl_cls, (kl * weights).sum() * t * t


class DetectionLoss(nn.Module):
    """YOLOv6's ``ComputeLoss``: assignment (ATSS warm-up, then TAL), VFL + IoU + DFL.

    Args:
        num_classes: Classes of the detector.
        iou_type: Box loss (``siou`` for N/S, ``giou`` for M/L).
        reg_max: DFL bins minus one of the head (0: no DFL term).
        weights: Weights of the class, IoU and DFL terms.
        warmup_epochs: Epochs with the ATSS assigner (YOLOv6 v3.0 configs use 0 for N/S/M/L).
        topk: TAL's top-k; alpha, beta: its exponents.
    """

    def __init__(self, num_classes: int, iou_type: str = "siou", reg_max: int = 0,
                 weights: Mapping[str, float] | None = None, warmup_epochs: int = 0, topk: int = 13,
                 alpha: float = 1.0, beta: float = 6.0) -> None:
        super().__init__()
        self.num_classes, self.iou_type, self.reg_max = num_classes, iou_type, reg_max
        self.warmup_epochs = warmup_epochs
        self.weights = {"cls": 1.0, "iou": 2.5, "dfl": 0.5, **(weights or {})}
        self.tal = TaskAlignedAssigner(topk, alpha, beta)
        self.atss = ATSSAssigner(9)

    def assign(self, out: DetectorOutput, targets: Sequence[Mapping[str, torch.Tensor]], epoch: int) -> Assignment:
        """Targets of every grid point for this batch."""
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, out.boxes.device)
        if epoch < self.warmup_epochs:
            sizes = [h * w for h, w in out.level_sizes]
            return self.atss(out.anchor_points, out.strides, sizes, gt_boxes, gt_labels, gt_mask,
                             out.boxes.detach(), self.num_classes)
        return self.tal(out.cls_logits.detach().float().sigmoid(), out.boxes.detach(), out.anchor_points, gt_boxes,
                        gt_labels, gt_mask)

    def forward(self, out: DetectorOutput, targets: Sequence[Mapping[str, torch.Tensor]], epoch: int = 0,
                teacher: DetectorOutput | None = None, distill: Mapping[str, Any] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its weighted parts (``cls``, ``iou``, ``dfl``; ``kd_cls``, ``kd_dfl`` with a teacher).

        ``distill``: ``{"epoch": e, "epochs": E, "temperature": 20, "cls": 1.0, "dfl": 1.0}`` for self-distillation.
        """
        a = self.assign(out, targets, epoch)
        fg = a.fg_mask
        onehot = F.one_hot(a.labels, self.num_classes + 1)[..., :-1].to(out.cls_logits.dtype)
        score_sum = a.scores.sum()
        norm = score_sum.clamp(min=1.0)
        loss_cls = varifocal_loss(out.cls_logits, a.scores, onehot) / norm
        zero = out.reg.sum() * 0.0
        loss_iou, loss_dfl = zero, zero
        weights = a.scores.sum(-1)[fg]
        if fg.any():
            strides = out.strides[None].expand(fg.shape[0], -1, -1)[fg]
            pred = out.boxes[fg] / strides
            target = a.boxes[fg] / strides
            loss_iou = (bbox_iou_loss(pred, target, self.iou_type) * weights).sum() / norm
            if self.reg_max > 0:
                points = (out.anchor_points[None].expand(fg.shape[0], -1, -1)[fg] / strides)
                ltrb = torch.cat((points - target[:, :2], target[:, 2:] - points), -1)
                logits = out.reg[fg].reshape(-1, 4, self.reg_max + 1)
                loss_dfl = (dfl_loss(logits, ltrb, self.reg_max) * weights).sum() / norm
        w = self.weights
        total = w["cls"] * loss_cls + w["iou"] * loss_iou + w["dfl"] * loss_dfl
        parts = {k: float(w[k] * v.detach()) for k, v in (("cls", loss_cls), ("iou", loss_iou), ("dfl", loss_dfl))}
        if teacher is not None:
            d = {"epoch": epoch, "epochs": 1, "temperature": 20.0, "cls": 1.0, "dfl": 1.0, **(distill or {})}
            decay = ((1 - math.cos(d["epoch"] * math.pi / max(1, d["epochs"]))) / 2) * (0.01 - 1) + 1
            kd_cls, kd_dfl = self_distill_loss(out, teacher, fg, weights, self.reg_max, d["temperature"])
            kd_cls, kd_dfl = kd_cls / norm * decay * d["cls"], kd_dfl / norm * decay * d["dfl"]
            total = total + w["cls"] * kd_cls + w["dfl"] * kd_dfl
            parts.update(kd_cls=float(w["cls"] * kd_cls.detach()), kd_dfl=float(w["dfl"] * kd_dfl.detach()))
        return total, parts

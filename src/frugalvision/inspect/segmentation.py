"""Defect segmentation: the training task (loss + metrics) and the segmenters (ours and baselines).

``build_segmenter("ours:<timm backbone>", ...)`` gives a :class:`~frugalvision.models.heads.SegmentationModel`;
``smp:unet``, ``smp:pspnet``, ``smp:deeplabv3plus``, ``smp:segformer`` give segmentation_models_pytorch baselines
(randomly initialised encoders: nothing downloads) for speed and quality comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..engine.task import MeanLoss, Metric, Task
from ..models.heads import SegmentationModel
from .metrics import SegmentationMetrics

__all__ = ["SMP_ARCHS", "SegmentationTask", "build_segmenter", "soft_dice_loss"]

SMP_ARCHS = {"unet": "Unet", "pspnet": "PSPNet", "deeplabv3plus": "DeepLabV3Plus", "segformer": "Segformer",
             "fpn": "FPN"}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_background: bool = True) -> torch.Tensor:
    """Mean soft Dice loss over the classes present in the batch (background excluded by default).

    Example:
        >>> t = torch.tensor([[[0, 1], [1, 0]]])
        >>> perfect = F.one_hot(t, 2).permute(0, 3, 1, 2).float() * 20 - 10
        >>> float(soft_dice_loss(perfect, t)) < 1e-3
        True
    """
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    start = 1 if ignore_background else 0
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)[start:]
    denom = (probs + onehot).sum(dims)[start:]
    present = onehot.sum(dims)[start:] > 0
    if not present.any():
        return logits.sum() * 0.0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return (1 - dice[present]).mean()


class SegmentationTask(Task):
    """Per-pixel classification: cross-entropy + soft Dice; mIoU, per-class IoU, pixel AUROC, F1-max.

    Batches are dicts with ``image`` ``(N, 3, H, W)`` and ``mask`` ``(N, H, W)`` (0 = background).
    """

    main_metric = "mIoU"
    higher_is_better = True

    def __init__(self, class_names: Sequence[str], dice_weight: float = 1.0) -> None:
        self.class_names = list(class_names)
        self.dice_weight = dice_weight

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits of the batch's images."""
        return model(batch["image"])

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Cross-entropy plus weighted soft Dice."""
        target = batch["mask"]
        loss = F.cross_entropy(outputs.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(outputs, target)
        return loss

    def metrics(self) -> list[Metric]:
        """Mean loss and segmentation metrics."""
        return [MeanLoss(), SegmentationMetrics(self.class_names)]


def build_segmenter(name: str, num_classes: int, dim: int = 64, **kwargs: Any) -> nn.Module:
    """A segmenter by name: ``ours:<timm backbone>`` or ``smp:<arch>[:<encoder>]`` (encoder resnet18 by default).

    Example:
        >>> build_segmenter("ours:resnet10t", 3, dim=16)(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """
    kind, _, rest = name.partition(":")
    if kind == "ours" and rest:
        return SegmentationModel(rest, num_classes, dim=dim, **kwargs)
    if kind == "smp" and rest:
        smp = require("segmentation_models_pytorch", "segmentation baselines", extra="seg")
        arch, _, encoder = rest.partition(":")
        if arch not in SMP_ARCHS:
            raise ValueError(f"unknown smp architecture {arch!r}; choose from {', '.join(SMP_ARCHS)}")
        return getattr(smp, SMP_ARCHS[arch])(encoder_name=encoder or "resnet18", encoder_weights=None,
                                             classes=num_classes, **kwargs)
    raise ValueError(f"segmenter {name!r} must look like 'ours:<timm backbone>' or 'smp:<arch>[:<encoder>]'")

"""Segmentation and defect-detection metrics.

* Per-class IoU and mIoU from a confusion matrix (``torchmetrics.MulticlassConfusionMatrix``); a class absent from
  both prediction and ground truth is left out of the mean instead of counting as 0 or 1.
* Pixel AUROC and F1 at the best threshold (F1-max) for "defect vs good" pixel scores, from histograms of the
  scores of defect and good pixels (1000 bins over [0, 1]): one ``bincount`` per batch, bounded memory on any
  number of images, and exact up to the bin width (torchmetrics' binned curves loop over every threshold, which
  is a thousand passes over millions of pixels per batch).

The confusion matrix is a torchmetrics state (reduced across processes on ``compute()``); the histograms are
summed across processes by :meth:`SegmentationMetrics.sync`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from ..engine.distributed import all_reduce_sum
from ..engine.task import Metric

__all__ = ["ScoreHistogram", "SegmentationMetrics", "decide", "f1_max", "iou_from_confusion"]


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``tp / (tp + fp + fn)`` from a confusion matrix (rows: truth); NaN where undefined.

    Example:
        >>> iou_from_confusion(torch.tensor([[3, 1], [0, 2]])).tolist()
        [0.75, 0.6666666865348816]
    """
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan"))).float()


def decide(probs: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """The decision rule of a segmenter: class map ``(N, H, W)`` of probabilities ``(N, C, H, W)``.

    Without a threshold, the arg-max over all classes (background included). With one, a pixel is a defect when
    its defect score ``1 - p(background)`` reaches the threshold, and its class is the most likely defect class.

    Example:
        >>> p = torch.tensor([[[[0.6]], [[0.3]], [[0.1]]]])  # one pixel: background 0.6, class 1 0.3, class 2 0.1
        >>> decide(p).item(), decide(p, threshold=0.35).item(), decide(p, threshold=0.5).item()
        (0, 1, 0)
    """
    if threshold is None:
        return probs.argmax(1)
    score = 1 - probs[:, 0]
    return torch.where(score >= threshold, probs[:, 1:].argmax(1) + 1, torch.zeros_like(score, dtype=torch.long))


def f1_max(precision: torch.Tensor, recall: torch.Tensor, thresholds: torch.Tensor) -> tuple[float, float]:
    """Best F1 over thresholds and the threshold that reaches it."""
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    f1 = torch.nan_to_num(f1[: len(thresholds)], nan=0.0)  # no prediction above a threshold: precision undefined
    i = int(torch.argmax(f1))
    return float(f1[i]), float(thresholds[i])


class ScoreHistogram:
    """Histograms of scores in [0, 1] for positives and negatives; ROC AUC and F1-max from them.

    Example:
        >>> h = ScoreHistogram(bins=10)
        >>> h.update(torch.tensor([0.05, 0.15, 0.85, 0.95]), torch.tensor([0, 0, 1, 1]))
        >>> h.auroc(), h.f1_max()[0]
        (1.0, 1.0)
    """

    def __init__(self, bins: int = 1000) -> None:
        self.bins = bins
        self.counts = torch.zeros(2, bins, dtype=torch.float64)

    def update(self, scores: torch.Tensor, truth: torch.Tensor) -> None:
        """Add scores (clamped to [0, 1]) with binary truth."""
        idx = (scores.detach().float().clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)
        flat = idx.flatten() + self.bins * truth.flatten().long()
        self.counts += torch.bincount(flat, minlength=2 * self.bins).view(2, self.bins).double().cpu()

    def _above(self) -> tuple[torch.Tensor, torch.Tensor]:
        # counts of negatives / positives with score >= lower edge of each bin (thresholds ascending)
        neg = self.counts[0].flip(0).cumsum(0).flip(0)
        pos = self.counts[1].flip(0).cumsum(0).flip(0)
        return neg, pos

    def auroc(self) -> float:
        """Area under the ROC curve (ties within a bin count half, as the trapezoid rule does)."""
        neg, pos = self._above()
        n_neg, n_pos = float(self.counts[0].sum()), float(self.counts[1].sum())
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        fpr = torch.cat([neg / n_neg, torch.zeros(1, dtype=torch.float64)])
        tpr = torch.cat([pos / n_pos, torch.zeros(1, dtype=torch.float64)])
        return float(torch.trapezoid(tpr.flip(0), fpr.flip(0)))

    def f1_max(self) -> tuple[float, float]:
        """Best F1 over the bin thresholds and that threshold."""
        neg, pos = self._above()
        n_pos = self.counts[1].sum()
        precision = pos / (pos + neg).clamp_min(1e-12)
        recall = pos / n_pos.clamp_min(1e-12)
        return f1_max(precision, recall, torch.arange(self.bins, dtype=torch.float64) / self.bins)


class SegmentationMetrics(Metric):
    """mIoU, per-class IoU, pixel AUROC and F1-max for logits ``(N, C, H, W)`` against masks ``(N, H, W)``.

    The defect score of a pixel is ``1 - p(background)``; a pixel is a defect when its mask class is not 0.

    Args:
        class_names: Names of the classes, background first.
        bins: Bins of the pixel AUROC / F1 curves.
        threshold: Decision rule of the IoUs (:func:`decide`): arg-max when ``None``, else the defect-score
            threshold a deployed model uses.

    Example:
        >>> m = SegmentationMetrics(["bg", "hole"])
        >>> logits = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]]]])  # (1, 2, 1, 2): pixel 0 bg, pixel 1 hole
        >>> m.update(logits, {"mask": torch.tensor([[[0, 1]]])})
        >>> r = m.compute(); r["mIoU"], r["pixel_AUROC"], r["F1_max"]
        (100.0, 100.0, 100.0)
    """

    def __init__(self, class_names: Sequence[str], bins: int = 1000, threshold: float | None = None) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.threshold = threshold
        self.cm = MulticlassConfusionMatrix(len(self.class_names), validate_args=False)
        self.hist = ScoreHistogram(bins)

    def reset(self) -> None:
        """Clear the accumulators."""
        if hasattr(self, "cm"):
            self.cm.reset()
            self.hist = ScoreHistogram(self.hist.bins)

    def sync(self) -> None:
        """Sum the score histograms across processes (torchmetrics reduces the confusion matrix itself)."""
        all_reduce_sum(self.hist.counts)

    @torch.no_grad()
    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        """Accumulate one batch."""
        logits = outputs.detach().float()
        target = batch["mask"] if isinstance(batch, dict) else batch[1]
        self.cm.to(logits.device)
        probs = logits.softmax(1)
        pred = logits.argmax(1) if self.threshold is None else decide(probs, self.threshold)
        self.cm.update(pred.flatten(), target.flatten())
        self.hist.update(1 - probs[:, 0], target > 0)

    def compute(self) -> dict[str, float]:
        """The metrics, in percent.

        ``mIoU`` (classes present), ``mIoU_defects`` (without background), per-class IoU, ``pixel_AUROC``,
        ``F1_max`` and the threshold reaching it.
        """
        iou = iou_from_confusion(self.cm.compute())
        out: dict[str, float] = {}
        valid = ~torch.isnan(iou)
        out["mIoU"] = float(iou[valid].mean() * 100) if valid.any() else float("nan")
        dv = valid[1:]
        out["mIoU_defects"] = float(iou[1:][dv].mean() * 100) if dv.any() else float("nan")
        for name, v in zip(self.class_names, iou.tolist(), strict=True):
            out[f"IoU/{name}"] = v * 100
        has_pos = bool(self.cm.compute()[1:].sum() > 0)
        if has_pos:
            out["pixel_AUROC"] = self.hist.auroc() * 100
            f1, thr = self.hist.f1_max()
            out["F1_max"], out["F1_threshold"] = f1 * 100, thr
        else:
            out["pixel_AUROC"] = out["F1_max"] = out["F1_threshold"] = float("nan")
        return out

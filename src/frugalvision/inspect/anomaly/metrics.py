"""Anomaly-detection metrics: image AUROC, pixel AUROC, AUPRO and F1-max.

All are exact (no binning): scores are sorted once and every distinct score is a threshold, ties handled as
scikit-learn does (a tie group moves the curve diagonally). Scores may be any real numbers (PatchCore's are
distances), so nothing assumes [0, 1].

* :func:`image_auroc` / :func:`pixel_auroc`: area under the ROC curve of image scores / of every pixel.
* :func:`aupro`: area under the per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3, as
  the MVTec AD evaluation defines it: ground-truth regions are the 8-connected components of each mask; at a
  threshold, PRO is the mean over all regions of the fraction of the region above the threshold, and FPR is the
  fraction of all defect-free pixels (of every image) above it.
* :func:`f1_max`: the best F1 over all thresholds and the threshold reaching it.
* :class:`AnomalyMetrics`: accumulates batches of model outputs and computes all of them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["AnomalyMetrics", "F1Max", "aupro", "f1_max", "image_auroc", "pixel_auroc"]


def _flat(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).detach().cpu().double().flatten()
    y = torch.as_tensor(labels).detach().cpu().flatten() > 0
    if s.numel() != y.numel():
        raise ValueError(f"scores have {s.numel()} elements but labels have {y.numel()}; give one label per score")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values; check the model's outputs")
    return s, y


def _curve(scores: torch.Tensor, weights_pos: torch.Tensor, weights_neg: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative positive / negative weights above each distinct threshold (descending) and the thresholds."""
    order = torch.argsort(scores, descending=True, stable=True)
    s = scores[order]
    tp = weights_pos[order].cumsum(0)
    fp = weights_neg[order].cumsum(0)
    # keep the last index of every group of equal scores: a threshold takes all of a tie at once
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return tp[last], fp[last], s[last]


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp, _ = _curve(scores, labels.double(), (~labels).double())
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / n_pos])
    fpr = torch.cat([zero, fp / n_neg])
    return float(torch.trapezoid(tpr, fpr))


def image_auroc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of image scores against 0/1 labels (NaN if one class is missing).

    Example:
        >>> image_auroc(torch.tensor([0.125, 0.5, 0.375, 0.875]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    return _auroc(*_flat(scores, labels))


def pixel_auroc(anomaly_maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of every pixel's score against the ground-truth masks (any shape, same size).

    Example:
        >>> pixel_auroc(torch.tensor([[[0.1, 0.9], [0.2, 0.3]]]), torch.tensor([[[0, 1], [0, 0]]]))
        1.0
    """
    return _auroc(*_flat(anomaly_maps, masks))


class F1Max(NamedTuple):
    """The best F1 and the threshold reaching it (predict anomalous when ``score >= threshold``)."""

    f1: float
    threshold: float


def f1_max(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> F1Max:
    """Best F1 over all thresholds (each distinct score) and that threshold.

    Works for image scores and for pixel maps alike (everything is flattened).

    Example:
        >>> f1_max(torch.tensor([0.125, 0.5, 0.375, 0.875]), torch.tensor([0, 0, 1, 1]))
        F1Max(f1=0.8, threshold=0.375)
    """
    s, y = _flat(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return F1Max(float("nan"), float("nan"))
    tp, fp, thr = _curve(s, y.double(), (~y).double())
    f1 = 2 * tp / (tp + fp + n_pos)  # = 2PR / (P + R) with P = tp/(tp+fp), R = tp/n_pos
    i = int(torch.argmax(f1))
    return F1Max(float(f1[i]), float(thr[i]))


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy.ndimage import label

    lab, n = label(mask > 0, structure=np.ones((3, 3), dtype=int))  # 8-connectivity, as MVTec AD
    return lab, int(n)


def aupro(anomaly_maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD's AUPRO, in [0, 1]).

    Args:
        anomaly_maps: ``(N, H, W)`` or ``(N, 1, H, W)`` pixel scores.
        masks: Ground truth of the same shape (non-zero = defect).
        fpr_limit: Upper limit of the false-positive rate (0.3 in MVTec AD).

    Returns:
        The area divided by ``fpr_limit``; NaN without any defect region or defect-free pixel.

    Example:
        >>> maps = torch.tensor([[[0.9, 0.8, 0.1], [0.2, 0.1, 0.7]]])
        >>> round(aupro(maps, torch.tensor([[[1, 1, 0], [0, 0, 1]]])), 4)  # both regions found before any FP
        1.0
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    a = torch.as_tensor(anomaly_maps).detach().cpu().double()
    m = torch.as_tensor(masks).detach().cpu()
    if a.ndim == 4:
        a = a[:, 0]
    if m.ndim == 4:
        m = m[:, 0]
    if a.shape != m.shape or a.ndim != 3:
        raise ValueError(f"anomaly maps {tuple(a.shape)} and masks {tuple(m.shape)} must both be (N, H, W) "
                         "or (N, 1, H, W) of the same size")
    if not torch.isfinite(a).all():
        raise ValueError("anomaly maps contain NaN or infinite values; check the model's outputs")
    m_np = m.numpy() > 0
    # weight of each defect pixel: 1 / (its region's size * number of regions) -> the cumulative sum is PRO
    region_w = np.zeros(m_np.shape, np.float64)
    sizes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i in range(m_np.shape[0]):
        lab, n = _label_regions(m_np[i])
        labels.append(lab)
        sizes.append(np.bincount(lab.ravel(), minlength=n + 1) if n else np.zeros(1, np.int64))
    n_regions = sum(len(s) - 1 for s in sizes)
    n_ok = int((~m_np).sum())
    if n_regions == 0 or n_ok == 0:
        return float("nan")
    for i, (lab, sz) in enumerate(zip(labels, sizes, strict=True)):
        if len(sz) > 1:
            w = np.zeros(len(sz), np.float64)
            w[1:] = 1.0 / (sz[1:] * n_regions)
            region_w[i] = w[lab]
    neg_w = torch.from_numpy((~m_np).astype(np.float64) / n_ok).flatten()
    pro, fpr, _ = _curve(a.flatten(), torch.from_numpy(region_w).flatten(), neg_w)
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fpr]).clamp_(0, 1)
    pro = torch.cat([zero, pro]).clamp_(0, 1)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: torch.Tensor, y: torch.Tensor, limit: float) -> float:
    """Trapezoid area under the non-decreasing curve ``(x, y)`` for ``x <= limit``, interpolating at ``limit``."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    area = float(torch.trapezoid(ys, xs)) if xs.numel() > 1 else 0.0
    k = int(inside.sum())  # first point beyond the limit
    if k < x.numel() and xs[-1] < limit:
        x0, x1, y0, y1 = float(xs[-1]), float(x[k]), float(ys[-1]), float(y[k])
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area


class AnomalyMetrics:
    """Accumulate anomaly-model outputs batch by batch; compute every metric at the end.

    Image scores, maps and masks are kept (as float32 / bool on CPU): the exact metrics need all of them.

    Example:
        >>> m = AnomalyMetrics()
        >>> maps = torch.zeros(2, 1, 4, 4); maps[1, 0, :2, :2] = 1.0
        >>> masks = torch.zeros(2, 4, 4); masks[1, :2, :2] = 1
        >>> m.update(torch.tensor([0.0, 1.0]), maps, torch.tensor([0, 1]), masks)
        >>> r = m.compute(); r["image_AUROC"], r["pixel_AUROC"], r["AUPRO"]
        (100.0, 100.0, 100.0)
    """

    def __init__(self, fpr_limit: float = 0.3) -> None:
        self.fpr_limit = fpr_limit
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, pred_score: torch.Tensor, anomaly_map: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor | None = None) -> None:
        """Add a batch: scores ``(B,)``, maps ``(B, 1, H, W)``, labels ``(B,)`` and masks ``(B, [1,] H, W)``."""
        if pred_score.shape[0] != labels.shape[0] or anomaly_map.shape[0] != labels.shape[0]:
            raise ValueError(f"batch sizes differ: {pred_score.shape[0]} scores, {anomaly_map.shape[0]} maps, "
                             f"{labels.shape[0]} labels")
        self.scores.append(pred_score.detach().float().cpu().flatten())
        self.labels.append(torch.as_tensor(labels).cpu().flatten() > 0)
        if masks is not None:
            amap = anomaly_map.detach().float().cpu().reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:])
            mk = torch.as_tensor(masks).cpu()
            mk = mk.reshape(mk.shape[0], *mk.shape[-2:]) > 0
            if mk.shape != amap.shape:
                raise ValueError(f"masks {tuple(mk.shape)} do not match anomaly maps {tuple(amap.shape)}")
            self.maps.append(amap)
            self.masks.append(mk)

    def compute(self) -> dict[str, float]:
        """The metrics in percent (thresholds in score units).

        ``image_AUROC``, ``image_F1_max`` and ``image_threshold``; with masks also ``pixel_AUROC``, ``AUPRO``,
        ``pixel_F1_max`` and ``pixel_threshold``.
        """
        if not self.scores:
            raise ValueError("no batch was added; call update() first")
        s, y = torch.cat(self.scores), torch.cat(self.labels)
        f1 = f1_max(s, y)
        out: dict[str, Any] = {"image_AUROC": image_auroc(s, y) * 100, "image_F1_max": f1.f1 * 100,
                               "image_threshold": f1.threshold}
        if self.maps:
            maps, masks = torch.cat(self.maps), torch.cat(self.masks)
            pf1 = f1_max(maps, masks)
            out.update(pixel_AUROC=pixel_auroc(maps, masks) * 100, AUPRO=aupro(maps, masks, self.fpr_limit) * 100,
                       pixel_F1_max=pf1.f1 * 100, pixel_threshold=pf1.threshold)
        return out

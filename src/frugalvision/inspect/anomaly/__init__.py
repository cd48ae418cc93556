"""Anomaly detection: typed outputs shared by every method (PatchCore, AnomalyCLIP) and their metrics."""

from .base import AnomalyOutput
from .metrics import AnomalyMetrics, F1Max, aupro, f1_max, image_auroc, pixel_auroc

__all__ = ["AnomalyMetrics", "AnomalyOutput", "F1Max", "aupro", "f1_max", "image_auroc", "pixel_auroc"]

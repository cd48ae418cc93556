"""Anomaly detection: typed outputs shared by every method (PatchCore, AnomalyCLIP) and their metrics."""

from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, OpenCLIPBackbone, fit_anomalyclip, load_open_clip_checkpoint
from .base import AnomalyOutput
from .domain_clip import DomainCLIP, train_domain_clip
from .metrics import AnomalyMetrics, F1Max, aupro, f1_max, image_auroc, pixel_auroc

__all__ = ["AnomalyMetrics", "AnomalyOutput", "F1Max", "aupro", "f1_max", "image_auroc", "pixel_auroc"]
__all__ += ["AnomalyCLIP", "AnomalyCLIPConfig", "DomainCLIP", "OpenCLIPBackbone", "fit_anomalyclip",
            "load_open_clip_checkpoint", "train_domain_clip"]

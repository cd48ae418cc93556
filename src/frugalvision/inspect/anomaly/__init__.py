"""Anomaly detection: typed outputs shared by every method (PatchCore, AnomalyCLIP), their metrics and training.

Layout: pure, exportable modules (``patchcore``, ``anomalyclip``, ``domain_clip``, the CLIP adapter interface in
``clip_backbone``) apart from their training (``training``: PatchCore's coreset fitting, AnomalyCLIP's glocal loss
and the domain CLIP's contrastive loss as engine ``Task`` s, and their loops); ``export`` holds the one-graph ONNX
export and the predictor shared by PyTorch and onnxruntime.
"""

from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, OpenCLIPBackbone, load_open_clip_checkpoint
from .base import AnomalyOutput
from .clip_backbone import BlockParts, CLIPBackbone
from .domain_clip import DomainCLIP
from .metrics import AnomalyMetrics, F1Max, aupro, f1_max, image_auroc, pixel_auroc
from .patchcore import PatchCoreModel
from .training import AnomalyCLIPTask, DomainCLIPContrastiveTask, fit_anomalyclip, fit_patchcore, train_domain_clip

__all__ = ["AnomalyMetrics", "AnomalyOutput", "F1Max", "aupro", "f1_max", "image_auroc", "pixel_auroc"]
__all__ += ["AnomalyCLIP", "AnomalyCLIPConfig", "AnomalyCLIPTask", "BlockParts", "CLIPBackbone", "DomainCLIP",
            "DomainCLIPContrastiveTask", "OpenCLIPBackbone", "PatchCoreModel", "fit_anomalyclip", "fit_patchcore",
            "load_open_clip_checkpoint", "train_domain_clip"]

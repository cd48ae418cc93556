"""The output every anomaly model returns, identical in PyTorch and in its exported ONNX graph."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AnomalyOutput"]


class AnomalyOutput(NamedTuple):
    """Image-level score and pixel-level map of an anomaly model.

    Attributes:
        pred_score: ``(B,)`` image anomaly score (higher = more anomalous).
        anomaly_map: ``(B, 1, H, W)`` per-pixel anomaly score at the input resolution.

    Example:
        >>> out = AnomalyOutput(torch.zeros(2), torch.zeros(2, 1, 8, 8))
        >>> out.anomaly_map.shape[-1], out._fields
        (8, ('pred_score', 'anomaly_map'))
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor

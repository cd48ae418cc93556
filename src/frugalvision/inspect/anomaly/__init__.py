"""Anomaly detection: typed outputs shared by every method (PatchCore, AnomalyCLIP) and their metrics."""

from .base import AnomalyOutput

__all__ = ["AnomalyOutput"]

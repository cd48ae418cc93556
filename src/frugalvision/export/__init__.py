"""Inference fusion (re-parameterisation + BN folding, verified) and ONNX export with onnxruntime parity checks."""

from .fusion import FuseError, FuseReport, fuse, fuse_with_report, reparameterize_model
from .onnx import ExportError, ExportResult, OrtRunner, export_onnx
from .openvino import OpenVinoRunner

__all__ = [
    "ExportError",
    "ExportResult",
    "FuseError",
    "FuseReport",
    "OpenVinoRunner",
    "OrtRunner",
    "export_onnx",
    "fuse",
    "fuse_with_report",
    "reparameterize_model",
]

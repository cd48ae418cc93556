"""Export to ONNX with onnxruntime parity checks."""

from .onnx import ExportError, ExportResult, OrtRunner, export_onnx

__all__ = ["ExportError", "ExportResult", "OrtRunner", "export_onnx"]

"""Run an exported ONNX file with OpenVINO's CPU plugin: a second compiled runtime beside onnxruntime.

OpenVINO compiles the same ``.onnx`` file with oneDNN kernels that fuse element-wise work (activations, biases,
normalisations) into the matmuls and convolutions, which onnxruntime's CPU provider leaves as separate passes. Timing
a model in both tells whether a gap to another architecture is the runtime's or the model's. Optional: ``pip install
"frugalvision[openvino]"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._deps import require
from .onnx import ExportError, input_arrays

__all__ = ["OpenVinoRunner"]


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for the CPU, called like :class:`~frugalvision.export.OrtRunner`.

    Args:
        path: The ``.onnx`` file.
        threads: Inference threads (``torch.get_num_threads()`` when omitted, so timings compare fairly).
        precision: Inference precision hint. ``f32`` (default) keeps results comparable with PyTorch; on CPUs with
            bf16 units OpenVINO would otherwise pick bf16 by itself.
        hint: OpenVINO's performance hint, ``LATENCY`` or ``THROUGHPUT``.

    Note:
        Keep OpenVINO out of processes that also fork (e.g. ``DataLoader`` workers started with ``fork``): once its
        worker threads are running, such a process has been seen to crash with a segmentation fault when it later
        reaps child processes. Benchmark scripts are fine; the tests run OpenVINO in a fresh interpreter.

    Example:
        >>> import tempfile, pathlib
        >>> from torch import nn
        >>> from frugalvision.export import export_onnx
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
        >>> _ = export_onnx(nn.Linear(4, 2).eval(), p, torch.randn(1, 4), exporter="torchscript")
        >>> OpenVinoRunner(p, threads=1)(np.zeros((3, 4), np.float32))[0].shape
        (3, 2)
    """

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32",
                 hint: str = "LATENCY") -> None:
        ov = require("openvino", "running ONNX models with OpenVINO")
        if hint not in ("LATENCY", "THROUGHPUT"):
            raise ValueError(f"OpenVinoRunner: hint must be 'LATENCY' or 'THROUGHPUT', got {hint!r}")
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
               "PERFORMANCE_HINT": hint}
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ExportError(f"OpenVINO cannot compile {path}: {exc}") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.version = ov.get_version()

    def __call__(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Run the graph on numpy arrays or CPU tensors; returns the outputs as numpy arrays."""
        result = self.request.infer(dict(enumerate(input_arrays(inputs, self.input_names))))
        return [np.array(result[out]) for out in self.compiled.outputs]

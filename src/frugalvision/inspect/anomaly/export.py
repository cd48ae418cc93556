"""One ONNX graph per anomaly model (image -> score, anomaly map) and a predictor that runs either backend.

Pre- and post-processing live here, outside the graph, and are shared by both backends, so PyTorch and
onnxruntime inference differ only by the graph itself:

* pre: RGB ``uint8`` image -> float in [0, 1] -> bilinear (antialiased) resize to the model's square input;
* graph: normalisation, backbone, scoring, smoothing (inside the model, see :class:`PatchCoreModel`);
* post: the map is resized bilinearly back to the image's size; a pixel is defective when its score is
  ``>= pixel_threshold``, an image anomalous when its score is ``>= image_threshold``.

The thresholds and the input size travel inside the ONNX file (metadata ``frugalvision``), so
``AnomalyPredictor.from_onnx(path)`` needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...export.onnx import ExportResult, OrtRunner, export_onnx
from ...utils.io import atomic_path

__all__ = ["AnomalyPrediction", "AnomalyPredictor", "AnomalySpec", "export_anomaly_onnx", "postprocess",
           "preprocess"]

_META_KEY = "frugalvision"


@dataclass
class AnomalySpec:
    """What inference needs besides the graph: input size and thresholds (score units of the model)."""

    img_size: int
    pixel_threshold: float
    image_threshold: float
    method: str = "patchcore"


class AnomalyPrediction(NamedTuple):
    """One image's result at its own resolution."""

    score: float
    anomalous: bool
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool


def preprocess(images: Sequence[np.ndarray], img_size: int) -> torch.Tensor:
    """RGB ``uint8`` arrays ``(H, W, 3)`` -> ``(B, 3, img_size, img_size)`` float in [0, 1].

    Example:
        >>> preprocess([np.zeros((20, 30, 3), np.uint8)], 16).shape
        torch.Size([1, 3, 16, 16])
    """
    out = []
    for a in images:
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
        x = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255)
        if x.shape[-2:] != (img_size, img_size):
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x[0])
    return torch.stack(out)


def postprocess(scores: torch.Tensor, maps: torch.Tensor, sizes: Sequence[tuple[int, int]],
                spec: AnomalySpec) -> list[AnomalyPrediction]:
    """Graph outputs ``(B,)``, ``(B, 1, S, S)`` -> per-image maps at ``sizes`` ``(H, W)``, masks and decisions."""
    preds = []
    for s, m, (h, w) in zip(scores, maps, sizes, strict=True):
        m = m[None].float()
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        amap = m[0, 0].numpy().astype(np.float32)
        preds.append(AnomalyPrediction(float(s), bool(float(s) >= spec.image_threshold), amap,
                                       amap >= spec.pixel_threshold))
    return preds


class AnomalyPredictor:
    """Pre-process, run PyTorch or onnxruntime, post-process with the same code and thresholds.

    Args:
        run: Maps a ``(B, 3, S, S)`` float32 tensor in [0, 1] to ``(scores (B,), maps (B, 1, S, S))`` tensors.
        spec: Input size and thresholds.
        backend: ``torch`` or ``onnx`` (informational).
    """

    def __init__(self, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], spec: AnomalySpec,
                 backend: str) -> None:
        self.run = run
        self.spec = spec
        self.backend = backend

    @classmethod
    def from_model(cls, model: nn.Module, spec: AnomalySpec) -> AnomalyPredictor:
        """A PyTorch predictor around any anomaly model returning ``AnomalyOutput``."""
        model = model.eval()

        @torch.no_grad()
        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            device = next((b.device for b in model.buffers()), torch.device("cpu"))
            out = model(x.to(device))
            return out.pred_score.float().cpu(), out.anomaly_map.float().cpu()

        return cls(run, spec, "torch")

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int | None = None,
                  runner: Callable[..., list[np.ndarray]] | None = None) -> AnomalyPredictor:
        """A predictor for a file written by :func:`export_anomaly_onnx`.

        It runs onnxruntime, or the given ``runner`` (e.g. an :class:`~frugalvision.export.OpenVinoRunner`).
        """
        spec = read_onnx_spec(path)
        runner = runner or OrtRunner(path, threads=threads)

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            score, amap = runner(x.numpy().astype(np.float32))
            return torch.from_numpy(score), torch.from_numpy(amap)

        return cls(run, spec, "onnx")

    def __call__(self, images: Sequence[np.ndarray]) -> list[AnomalyPrediction]:
        """Predict a batch of RGB ``uint8`` images of any sizes."""
        x = preprocess(images, self.spec.img_size)
        scores, maps = self.run(x)
        return postprocess(scores, maps, [a.shape[:2] for a in images], self.spec)


def export_anomaly_onnx(model: nn.Module, path: str | Path, spec: AnomalySpec,
                        exporter: Literal["auto", "dynamo", "torchscript"] = "torchscript", opset: int = 18,
                        check: bool = True, rtol: float = 1e-4, atol: float = 1e-5) -> ExportResult:
    """Export an anomaly model as one graph ``image (B, 3, S, S) in [0, 1] -> pred_score (B,), anomaly_map``.

    The graph is checked against PyTorch with onnxruntime on two batch sizes (``atol + rtol * |reference|``),
    then ``spec`` (input size, thresholds) is stored in the file's metadata. ``torchscript`` is the default
    exporter because it traces the memory-bank loop in seconds; ``dynamo`` gives the same graph more slowly.
    """
    import onnx

    path = Path(path)
    g = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, spec.img_size, spec.img_size, generator=g)
    res = export_onnx(model, path, example, exporter=exporter, opset=opset, check=check, atol=atol, rtol=rtol,
                      input_names=("image",), output_names=("pred_score", "anomaly_map"))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(asdict(spec))
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return res


def read_onnx_spec(path: str | Path) -> AnomalySpec:
    """The :class:`AnomalySpec` stored in an ONNX file by :func:`export_anomaly_onnx`."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ONNX file {p} does not exist")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises its own decode errors
        raise CheckpointError(f"{p} is not a readable ONNX file: {exc}") from None
    meta: dict[str, Any] = {m.key: m.value for m in proto.metadata_props}
    if _META_KEY not in meta:
        raise CheckpointError(f"{p} has no anomaly metadata (input size, thresholds); export it with "
                              "export_anomaly_onnx or `frugalvision anomaly fit onnx=true`")
    return AnomalySpec(**json.loads(meta[_META_KEY]))

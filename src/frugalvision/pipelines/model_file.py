"""Jobs on any model file: ``frugalvision eval``, ``export`` and ``predict``.

A model file says which kind of model it holds (:data:`frugalvision.weights.MODEL_KINDS`), and each kind serves a
task. This module keeps, per task, the three things these commands do with a model of that task
(:class:`TaskJobs`); a new kind of model (detection, language) plugs in with :func:`register_task_jobs`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..weights import MODEL_KINDS, MODEL_META, load_model_file, read_model_info

__all__ = ["DEMO_MODEL_FILE", "TASK_JOBS", "EvalConfig", "ExportConfig", "PredictConfig", "TaskJobs",
           "describe_for_onnx", "export_model_file", "register_task_jobs", "run_eval", "run_predict"]

#: Where ``frugalvision demo`` (default ``out_dir=runs/demo``) writes its segmenter's model file: the default
#: ``model_file`` of ``eval``, ``export`` and ``predict``.
DEMO_MODEL_FILE = "runs/demo/segmenter/model.safetensors"


@dataclass
class EvalConfig:
    """Evaluate a model file (classifier, surgery student, segmenter or anomaly model) on a dataset split.

    Attributes:
        model_file: A model file written by train, segment, surgery, anomaly fit or demo (``model.safetensors``);
            by default the demo's segmenter.
        data: Bundled dataset name, ``bundled`` (the inspection benchmark) or a folder; the data the model was
            trained on when unset (for segmenters, without the defects it was trained on).
        split: Which split to evaluate.
        format: Layout of an inspection ``data`` folder (mvtec, visa, defect_spectrum); the model's when unset.
        threshold: Segmenters: defect-score threshold of the IoUs; the model file's when unset.
        batch_size: Evaluation batch size.
        device: auto, cpu or cuda.
        precision: ``fp32`` or ``bf16`` (PyTorch autocast) for a safetensors model file; an ONNX file runs in the
            precision it was exported in.
        runtime: ONNX files: ``onnxruntime`` or ``openvino``; ``auto``: OpenVINO for bf16 files, else onnxruntime.
        progress: Show progress bars.
    """

    model_file: str = DEMO_MODEL_FILE
    data: str | None = None
    split: str = "test"
    format: str | None = None
    threshold: float | None = None
    batch_size: int = 32
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _check_precision(self.precision, ("fp32", "bf16"), "eval")
        _check_runtime(self.runtime)


@dataclass
class ExportConfig:
    """Export a model file to ONNX and check it with onnxruntime (any kind of model file).

    Attributes:
        model_file: A model file written by train, segment, surgery, anomaly fit or demo; by default the demo's
            segmenter.
        out: The ``.onnx`` file to write (classifiers and segmenters carry their classes, input size,
            normalisation and threshold in its metadata, so ``predict`` runs it).
        opset: ONNX opset.
        check: Compare onnxruntime with PyTorch (tolerance 1e-4).
        reparameterize: Fold multi-branch blocks and conv+BN pairs before export (``fv.fuse``, verified).
        precision: ``fp32``; ``int8``: ONNX Runtime static quantisation (QDQ, per-channel int8 weights, uint8
            activations calibrated on ``calibration_images`` images of the model's own training data), which
            onnxruntime and OpenVINO run with int8 kernels; ``bf16``: the fp32 graph marked to run in bf16, which
            ``predict``/``eval`` run with OpenVINO's bf16 kernels (needs ``frugalvision[openvino]``).
        calibration: int8 calibration method: ``minmax``, ``entropy`` or ``percentile``.
        calibration_images: Images of the training data the int8 ranges are calibrated on.
        keep_first_last: int8: keep the first and last quantisable layers in float (stem and head; usual
            practice, small cost, fewer flipped decisions).
        int8_scope: int8: quantise only this submodule (dotted name, e.g. ``backbone``); ``auto``: the model
            kind's default (PatchCore: ``backbone``, whose scoring and map smoothing lose most in int8; every
            other kind: the whole graph); ``all``: the whole graph.
        accuracy_check: For bf16/int8: evaluate the fp32 model and the exported file on the held-out data (the
            ``eval`` metrics, plus top-1 / per-pixel agreement with fp32) and store the result in the file.
        overwrite: Replace an existing ``out``.
    """

    model_file: str = DEMO_MODEL_FILE
    out: str = "model.onnx"
    opset: int = 18
    check: bool = True
    reparameterize: bool = True
    precision: str = "fp32"
    calibration: str = "minmax"
    calibration_images: int = 64
    keep_first_last: bool = True
    int8_scope: str = "auto"
    accuracy_check: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        from ..export.quantize import CALIBRATION_METHODS, PRECISIONS

        _check_precision(self.precision, PRECISIONS, "export")
        if self.calibration not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got "
                              f"{self.calibration!r}")
        if int(self.calibration_images) != self.calibration_images or self.calibration_images < 1:
            raise ConfigError(f"calibration_images must be a positive integer, got {self.calibration_images!r}")


@dataclass
class PredictConfig:
    """Run a model file on image files and folders (streamed, one batch in memory).

    Classifiers write ``predictions.csv`` (top-k classes); segmenters and anomaly models write a mask PNG (and an
    overlay) per image plus ``predictions.csv``. An ``.onnx`` file written by ``frugalvision export`` (classifier,
    surgery student, segmenter, anomaly model), by the demo or by ``anomaly fit onnx=true`` runs with onnxruntime,
    with the same pre- and post-processing.

    Attributes:
        model_file: A model file written by train, segment, surgery, anomaly fit or demo, or such an ``.onnx``
            file; by default the demo's segmenter (``runs/demo/segmenter/model.safetensors``).
        images: Image files and/or folders (searched recursively, in sorted order).
        out: Output folder.
        overwrite: Allow replacing existing outputs.
        batch_size: Images per forward pass.
        threshold: Segmenters and anomaly models: pixel threshold; the model file's when unset.
        image_threshold: Anomaly models: image threshold; the model file's when unset.
        overlays: Segmenters: also write overlay PNGs.
        top_k: Classifiers: classes listed per image.
        device: auto, cpu or cuda.
        precision: ``fp32`` or ``bf16`` (PyTorch autocast) for a safetensors model file; an ONNX file runs in the
            precision it was exported in (``export precision=int8|bf16``).
        runtime: ONNX files: ``onnxruntime`` or ``openvino``; ``auto``: OpenVINO for bf16 files, else onnxruntime.
        progress: Show a progress bar.
    """

    model_file: str = DEMO_MODEL_FILE
    images: list[str] = field(default_factory=list)
    out: str = "runs/predict"
    overwrite: bool = False
    batch_size: int = 8
    threshold: float | None = None
    image_threshold: float | None = None
    overlays: bool = True
    top_k: int = 3
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _check_precision(self.precision, ("fp32", "bf16"), "predict")
        _check_runtime(self.runtime)


def _check_precision(value: str, allowed: tuple[str, ...], command: str) -> None:
    if value not in allowed:
        hint = " (int8 is an export: `frugalvision export precision=int8`, then run the .onnx file)" \
            if value == "int8" else ""
        raise ConfigError(f"{command}: precision must be one of {', '.join(allowed)}, got {value!r}{hint}")


RUNTIMES = ("auto", "onnxruntime", "openvino")


def _check_runtime(value: str) -> None:
    if value not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {value!r}")


@dataclass(frozen=True)
class TaskJobs:
    """What ``eval``, ``predict`` and ``export`` do with a model of one task.

    Attributes:
        evaluate: ``(model, info, cfg: EvalConfig) -> dict`` of metrics.
        predict: ``(model, info, cfg: PredictConfig) -> dict`` with ``images``, ``predicted``, ``skipped``.
        export: ``(model, info, cfg: ExportConfig) -> dict`` with the written path and the parity error.
        predict_onnx: ``(onnx path, info, cfg: PredictConfig) -> dict`` like ``predict``, for an ONNX file whose
            metadata holds the model file's description (``info``); ``None``: predict refuses ONNX files of the task.
        onnx_module: ``(onnx path, runtime) -> module`` that ``evaluate`` takes in place of the PyTorch model (the
            exported graph behind the same call); ``None``: eval refuses ONNX files and export refuses bf16/int8.
        calibration: ``(info, n) -> (n, C, H, W)`` graph inputs from the model's own training data, for int8
            calibration; ``None``: no int8 export.
        int8_ops: Operator types an int8 export quantises.
        int8_scope: ``info -> submodule name or None``: what ``int8_scope=auto`` quantises (``None``: everything).
    """

    evaluate: Callable[[torch.nn.Module, dict[str, Any], EvalConfig], dict[str, Any]]
    predict: Callable[[torch.nn.Module, dict[str, Any], PredictConfig], dict[str, Any]]
    export: Callable[[torch.nn.Module, dict[str, Any], ExportConfig], dict[str, Any]]
    predict_onnx: Callable[[Path, dict[str, Any], PredictConfig], dict[str, Any]] | None = None
    onnx_module: Callable[[Path, str], torch.nn.Module] | None = None
    calibration: Callable[[dict[str, Any], int], torch.Tensor] | None = None
    int8_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    int8_scope: Callable[[dict[str, Any]], str | None] | None = None


TASK_JOBS: dict[str, TaskJobs] = {}
#: Where the commands for model files of a task without eval / predict / export jobs are.
_OTHER_COMMANDS = {"vlm": ": evaluate it with `frugalvision vlm test model_file=...` and run it with "
                           "`frugalvision ask IMAGE QUESTION model_file=...` or `frugalvision chat IMAGE "
                           "model_file=...`",
                   "svg_reader": ": evaluate it with `frugalvision svg test model=...` (images read as text); in "
                                 "Python, frugalvision.language.svg_read.load_reader(...)",
                   "seed_tokenizer": ": images become codes with `frugalvision seed encode IMAGES model=...` and codes "
                                     "into image embeddings with `frugalvision seed decode TOKENS model=...`; in "
                                     "Python, frugalvision.language.seed_file.load_seed(...)",
                   "seed_lm": ": it captions images with `frugalvision ask IMAGE model_file=...` and draws captions "
                              "with `frugalvision seed draw CAPTION model=...`; in Python, "
                              "frugalvision.language.seed_file.load_seed_lm(...)",
                   "seed_pixel_decoder": ": it turns codes into images with `frugalvision seed decode TOKENS "
                                         "decoder=...` (and `seed draw ... decoder=...`); in Python, "
                                         "frugalvision.language.seed_decoder.load_pixel_decoder(...)"}


def register_task_jobs(task: str, jobs: TaskJobs) -> None:
    """Say what eval / predict / export do for model files of ``task`` (see :class:`TaskJobs`)."""
    TASK_JOBS[task] = jobs


def _is_onnx(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    # safetensors: 8-byte header length, then "{"; ONNX (protobuf): the ir_version field's tag 0x08 first
    return head[8:9] != b"{" and head[:1] == b"\x08"


def _open(path: str, command: str = "eval") -> tuple[torch.nn.Module, dict[str, Any], TaskJobs]:
    if not Path(path).exists() and path == DEMO_MODEL_FILE:
        raise CheckpointError(f"no model file at {path}, the default model_file (where `frugalvision demo` writes its "
                              "segmenter): run `frugalvision demo` first, or pass model_file=PATH")
    if _is_onnx(path):
        raise ConfigError(f"{path} is an ONNX graph; {command} takes the safetensors model file it was exported "
                          f"from{_hint_for(Path(path))}")
    info = read_model_info(path)  # the kind first: a model these commands do not run is not built (or loaded)
    kind = MODEL_KINDS.get(info["kind"])
    task = kind.task if kind is not None else None
    if task is not None and task not in TASK_JOBS:
        raise ConfigError(f"{path} holds a {info['kind']} model (task {task}); eval, export and predict do not "
                          f"handle it{_OTHER_COMMANDS.get(task, '')}")
    model, info = load_model_file(path)
    return model, info, TASK_JOBS[MODEL_KINDS[info["kind"]].task]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``frugalvision eval``: metrics of any model file (or of an ONNX file written by ``export``)."""
    if Path(cfg.model_file).is_file() and _is_onnx(cfg.model_file):
        path = Path(cfg.model_file)
        info, jobs = _onnx_description(path, "eval")
        if jobs.onnx_module is None:
            raise ConfigError(f"{path} holds a {info.get('kind')} model; eval runs ONNX files of classifiers, "
                              f"segmenters, anomaly models and detectors only: pass its model file{_hint_for(path)}")
        module = jobs.onnx_module(path, _runtime_of(info, cfg.runtime))
        res = jobs.evaluate(module, info, _on_cpu(cfg))
        return {"model_file": str(path), "kind": info["kind"], "precision": info.get("precision", "fp32"),
                "runtime": module.runtime, **res}
    model, info, jobs = _open(cfg.model_file, "eval")
    if info.get("weights") == "random":
        raise ConfigError(f"{cfg.model_file} holds a {info['kind']} model with random weights (e.g. `surgery "
                          "model=NAME`, a latency-only run): it has no classes or data to evaluate; give a model file "
                          "of a trained model (`surgery model_file=...`)")
    return {"model_file": cfg.model_file, "kind": info["kind"], **({"precision": "bf16"} if cfg.precision == "bf16"
                                                                      else {}),
            **jobs.evaluate(with_precision(model, cfg.precision), info, cfg)}


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """``frugalvision predict``: run any model file on images."""
    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (positional, or images=a.png,b/)")
    if Path(cfg.model_file).is_file() and _is_onnx(cfg.model_file):
        return _predict_onnx(Path(cfg.model_file), cfg)
    model, info, jobs = _open(cfg.model_file, "predict")
    return {"kind": info["kind"], **jobs.predict(with_precision(model, cfg.precision), info, cfg)}


def _on_cpu(cfg: EvalConfig) -> EvalConfig:
    from dataclasses import replace

    return replace(cfg, device="cpu")


class _Autocast(torch.nn.Module):
    """Run ``inner`` under autocast (``bf16``) on the input's device; floating outputs come back as float32."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> Any:
        """The wrapped model's output, computed in reduced precision."""
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.inner(x)
        if isinstance(out, torch.Tensor):
            return out.float()
        return out


def with_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``model`` as is (``fp32``) or under bf16 autocast (``bf16``; CPU and CUDA), same call and outputs.

    Example:
        >>> m = with_precision(torch.nn.Linear(4, 2), "bf16")
        >>> m(torch.randn(3, 4)).dtype
        torch.float32
    """
    if precision == "fp32":
        return model
    if precision == "bf16":
        return _Autocast(model)
    raise ConfigError(f"precision must be fp32 or bf16 for a PyTorch model, got {precision!r}")


# --------------------------------------------------------------------------------------------- ONNX files
def describe_for_onnx(info: dict[str, Any], source: str | Path) -> dict[str, str]:
    """ONNX ``metadata_props`` that let ``predict`` run an exported graph: the model file's description.

    The description (kind, task, classes, input size, normalisation, threshold, ...) is stored under the model
    file's own header key, with the task and the ``source_file`` the graph was exported from.
    """
    kind = info.get("kind", "")
    task = MODEL_KINDS[kind].task if kind in MODEL_KINDS else info.get("task", "")
    return {MODEL_META: json.dumps({**info, "task": task, "source_file": str(source)}, default=str)}


def _hint_for(onnx_path: Path) -> str:
    """``: model_file=<its source>`` (recorded at export, or the file beside it), else where such files come from."""
    from ..export.onnx import read_onnx_metadata

    candidates = [onnx_path.with_suffix(".safetensors"), onnx_path.parent / "model.safetensors",
                  onnx_path.parent / "segmenter" / "model.safetensors"]
    try:
        source = json.loads(read_onnx_metadata(onnx_path).get(MODEL_META, "{}")).get("source_file")
    except (CheckpointError, json.JSONDecodeError, AttributeError):
        source = None
    for c in ([Path(source)] if source else []) + candidates:
        if c.is_file():
            return f": model_file={c}"
    return (" (the model.safetensors that train, segment, surgery, anomaly fit or demo wrote): "
            "model_file=PATH/model.safetensors")


def _runtime_of(info: dict[str, Any], runtime: str) -> str:
    """The runtime of an exported file: the one asked for, else OpenVINO for bf16 files and onnxruntime otherwise."""
    if runtime != "auto":
        return runtime
    return "openvino" if info.get("precision") == "bf16" else "onnxruntime"


def onnx_runner(path: Path, runtime: str, precision: str = "fp32") -> Callable[..., list[np.ndarray]]:
    """A callable running ``path`` with onnxruntime or OpenVINO (bf16 inference precision for bf16 files)."""
    from .._deps import require
    from ..export import OpenVinoRunner, OrtRunner

    if runtime == "openvino":
        require("openvino", f"running {path.name} with OpenVINO", "openvino")
        return OpenVinoRunner(path, precision="bf16" if precision == "bf16" else "f32")
    if precision == "bf16":
        raise ConfigError(f"{path} is a bf16 export, which runs with OpenVINO's bf16 kernels (onnxruntime has none "
                          "on the CPU): pass runtime=openvino or leave runtime=auto")
    return OrtRunner(path)


class _OnnxModule(torch.nn.Module):
    """An exported file behind a module call: the runtime follows the file's precision unless one is asked for."""

    def __init__(self, path: Path, runtime: str = "auto") -> None:
        super().__init__()
        from ..export.onnx import read_onnx_metadata

        self.path = path
        try:
            info = json.loads(read_onnx_metadata(path).get(MODEL_META, "{}"))
        except json.JSONDecodeError:
            info = {}
        self.runtime = _runtime_of(info, runtime)
        self.runner = onnx_runner(self._graph(path), self.runtime, info.get("precision", "fp32"))

    def _graph(self, path: Path) -> Path:
        """The graph the runtime loads (the file itself)."""
        return path


class _OnnxImageModel(_OnnxModule):
    """An exported image model (image -> logits) behind the module call the jobs make (onnxruntime or OpenVINO)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch, on the batch's device."""
        out = self.runner(x.detach().float().cpu().numpy())[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


class _OnnxAnomalyModel(_OnnxModule):
    """An exported anomaly model behind the PyTorch model's call: ``image -> (pred_score, anomaly_map)``."""

    def forward(self, x: torch.Tensor) -> Any:
        """``pred_score`` (B,) and ``anomaly_map`` (B, 1, S, S), as the PyTorch anomaly models return them."""
        from types import SimpleNamespace

        score, amap = self.runner(x.detach().float().cpu().numpy())[:2]
        return SimpleNamespace(pred_score=torch.from_numpy(np.asarray(score)),
                               anomaly_map=torch.from_numpy(np.asarray(amap)))


class _OnnxDetector(_OnnxModule):
    """An exported detector behind the PyTorch detector's call: images in ``[0, 1]`` -> predictions (B, A, 4 + C).

    The runtime loads the file's graph up to the decoded predictions (the file's own NMS, at its stored
    ``conf_thres``, is left out): the jobs post-process them as they do the PyTorch model's, so COCO evaluation
    sees every score above 0.001 and ``predict`` tiles large images the same way.
    """

    def __init__(self, path: Path, runtime: str = "auto") -> None:
        super().__init__(path, runtime)
        from ..export.onnx import read_onnx_metadata

        try:
            classes = json.loads(read_onnx_metadata(path).get(MODEL_META, "{}")).get("classes") or []
        except json.JSONDecodeError:
            classes = []
        self.num_classes = max(1, len(classes))

    def _graph(self, path: Path) -> Path:
        import tempfile

        from .._deps import require

        onnx = require("onnx", "running an exported detector")
        proto = onnx.load(str(path))
        if "pred" not in {o for n in proto.graph.node for o in n.output}:
            raise ConfigError(f"{path} has no 'pred' tensor: it is not a detector graph of `frugalvision export`; "
                              "re-export it from its model file")
        if "pred" not in {v.name for v in proto.graph.value_info}:  # shape inference may stop before it
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info("pred", onnx.TensorProto.FLOAT, None))
        try:
            decode = onnx.utils.Extractor(proto).extract_model([i.name for i in proto.graph.input], ["pred"])
        except Exception as exc:  # onnx's extractor raises several types
            raise ConfigError(f"cannot take the predictions out of {path} ({type(exc).__name__}: {exc}); re-export "
                              "it from its model file") from None
        self._tmp = tempfile.TemporaryDirectory(prefix="fv-detector-")
        out = Path(self._tmp.name) / path.name
        onnx.save(decode, str(out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded predictions of a batch in ``[0, 1]``, on the batch's device."""
        out = self.runner(x.detach().float().cpu().numpy())[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


def _onnx_description(path: Path, command: str) -> tuple[dict[str, Any], TaskJobs]:
    """The model file's description stored in an exported ONNX file, and the jobs of its task."""
    from ..export.onnx import read_onnx_metadata

    meta = read_onnx_metadata(path)
    if MODEL_META not in meta:
        raise ConfigError(f"{path} is an ONNX file without frugalvision's description (classes, input size, "
                          f"normalisation), so {command} cannot run it; pass the safetensors model file it was "
                          f"exported from{_hint_for(path)}, or re-export it with `frugalvision export`")
    try:
        info = json.loads(meta[MODEL_META])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has a corrupt frugalvision description: {exc}") from None
    kind = info.get("kind")
    jobs = TASK_JOBS.get(MODEL_KINDS[kind].task) if kind in MODEL_KINDS else None
    if jobs is None:
        raise ConfigError(f"{path} holds a {kind} model, which {command} does not run from ONNX: pass its "
                          f"safetensors model file{_hint_for(path)}")
    return info, jobs


def _predict_onnx(path: Path, cfg: PredictConfig) -> dict[str, Any]:
    """``predict`` with an ONNX file: the description in its metadata says how to pre- and post-process."""
    from ..export.onnx import read_onnx_metadata

    meta = read_onnx_metadata(path)
    if MODEL_META in meta:
        try:
            info = json.loads(meta[MODEL_META])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} has a corrupt frugalvision description: {exc}") from None
        kind = info.get("kind")
        jobs = TASK_JOBS.get(MODEL_KINDS[kind].task) if kind in MODEL_KINDS else None
        if jobs is None or jobs.predict_onnx is None:
            raise ConfigError(f"{path} holds a {kind} model; predict runs ONNX files of classifiers, segmenters, "
                              f"anomaly models and detectors only: pass its safetensors model file{_hint_for(path)}")
        runtime = _runtime_of(info, cfg.runtime)
        return {"kind": kind, **jobs.predict_onnx(path, info, cfg), "backend": runtime,
                "precision": info.get("precision", "fp32")}
    if "frugalvision" in meta:  # written by export_anomaly_onnx (`anomaly fit onnx=true`): thresholds + size
        res = _predict_anomaly_onnx(path, {}, cfg)
        return {"kind": res.get("method", "anomaly"), **res, "backend": "onnxruntime"}
    raise ConfigError(f"{path} is an ONNX file without frugalvision's description (classes, input size, "
                      f"normalisation), so predict cannot run it; pass the safetensors model file it was exported "
                      f"from{_hint_for(path)}, or re-export it with `frugalvision export`")


def export_model_file(cfg: ExportConfig) -> dict[str, Any]:
    """``frugalvision export``: ONNX graph of any model file, checked against PyTorch with onnxruntime.

    ``precision=int8`` quantises the checked fp32 graph (:func:`frugalvision.export.quantize.quantize_onnx`) on
    images of the model's own training data; ``precision=bf16`` marks it to run with OpenVINO's bf16 kernels. For
    both, the accuracy check (``accuracy_check=true``) evaluates the fp32 PyTorch model and the written file on the
    held-out data and stores the result in the file's description.
    """
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it or choose another out=")
    model, info, jobs = _open(cfg.model_file, "export")
    if cfg.precision == "fp32":
        return {"kind": info["kind"], **jobs.export(model, info, cfg)}
    return {"kind": info["kind"], **_export_reduced(model, info, jobs, cfg)}


def _export_reduced(model: torch.nn.Module, info: dict[str, Any], jobs: TaskJobs, cfg: ExportConfig) -> dict[str, Any]:
    """bf16 / int8 export: the fp32 graph first (checked), then quantised or marked, then the accuracy check."""
    import shutil
    import tempfile
    from dataclasses import replace

    from .._deps import require
    from ..export.onnx import read_onnx_metadata, write_onnx_metadata
    from ..export.quantize import quantize_onnx
    from ..utils.io import atomic_path

    if jobs.onnx_module is None or (cfg.precision == "int8" and jobs.calibration is None):
        raise ConfigError(f"{cfg.model_file} holds a {info['kind']} model; precision={cfg.precision} export covers "
                          "classifiers, segmenters, anomaly models and detectors (export it with precision=fp32)")
    if cfg.precision == "bf16":
        require("openvino", "bf16 export (OpenVINO runs the bf16 graph)", "openvino")
    if info["kind"] == "mask_frozen":  # the exported graph is its detector's (boxes): checked as a detector
        model, info = model.detector, {**info, "kind": "detector"}
    out = Path(cfg.out)
    with tempfile.TemporaryDirectory(prefix="fv-export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        res = jobs.export(model, info, replace(cfg, out=str(fp32), overwrite=True, precision="fp32"))
        desc = json.loads(read_onnx_metadata(fp32).get(MODEL_META, "{}"))
        desc.update(precision=cfg.precision)
        if cfg.precision == "int8":
            calib = jobs.calibration(info, int(cfg.calibration_images))  # type: ignore[misc]
            scope = int8_scope_of(jobs, info, cfg.int8_scope)
            q = quantize_onnx(fp32, Path(tmp) / "int8.onnx", calib, method=cfg.calibration, op_types=jobs.int8_ops,
                              keep_first_last=cfg.keep_first_last, scope=scope)
            desc["quantization"] = {"format": "QDQ", "weights": "int8, symmetric, per output channel",
                                    "activations": "uint8, per tensor", "calibration": cfg.calibration,
                                    "calibration_images": q.calibration_images,
                                    "first_and_last_in_float": cfg.keep_first_last,
                                    "scope": scope or "whole graph", "calibration_data":
                                    f"{_data_of(info)} (train split)", "quantized_ops": dict(q.quantized_ops),
                                    "float_ops": dict(q.float_ops)}
            staged = q.path
            res = {**res, "quantization": q.summary()}
        else:
            staged = fp32
            res = {**res, "bf16": "fp32 graph run with OpenVINO's bf16 inference precision"}
        write_onnx_metadata(staged, {MODEL_META: json.dumps(desc, default=str)})
        if cfg.accuracy_check:
            check = accuracy_check(model, info, jobs, staged, cfg)
            desc["accuracy_check"] = check
            write_onnx_metadata(staged, {MODEL_META: json.dumps(desc, default=str)})
            res["accuracy_check"] = check
        with atomic_path(out) as dst:
            shutil.copyfile(staged, dst)
    res.update(path=str(out), precision=cfg.precision, size_mb=round(out.stat().st_size / 1e6, 2))
    return res


def int8_scope_of(jobs: TaskJobs, info: dict[str, Any], scope: str = "auto") -> str | None:
    """The submodule an int8 export of the model described by ``info`` quantises (``None``: the whole graph).

    Example:
        >>> int8_scope_of(TASK_JOBS["anomaly"], {"kind": "patchcore"}), int8_scope_of(TASK_JOBS["anomaly"], {}, "all")
        ('backbone', None)
    """
    if scope == "auto":
        return jobs.int8_scope(info) if jobs.int8_scope is not None else None
    return None if scope in ("all", "", None) else scope


def _anomaly_int8_scope(info: dict[str, Any]) -> str | None:
    """PatchCore's int8 export quantises its backbone only.

    Measured on PatchCore (brick, benchmarks/results/precision.md): every Conv/MatMul in int8 took pixel AUROC
    from 98.2 to 60.6 %; the cause is the map-smoothing convolution after the scoring (the bank matmul alone in
    int8 keeps 98.2 %). All convolutions (smoothing included) with the first and last in float: 93.2 %; the
    backbone only: see the table (the default).
    """
    return "backbone" if info.get("kind") == "patchcore" else None


def _data_of(info: dict[str, Any]) -> str:
    data = info.get("data")
    if isinstance(data, dict):
        return str(data.get("data") or "bundled")
    return str(data or "bundled")


class _Recorder(torch.nn.Module):
    """Pass-through that keeps each batch's decisions.

    The class of every image or pixel (argmax over dim 1), or an anomaly model's image scores.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> Any:
        """The wrapped model's output."""
        out = self.inner(x)
        if isinstance(out, torch.Tensor) and out.ndim == 3:  # a detector's predictions (B, A, 4 + C)
            self.seen.extend(out.detach().float().cpu())
        elif isinstance(out, torch.Tensor):
            self.seen.append(out.detach().float().argmax(1).cpu())
        else:
            self.seen.append(out.pred_score.detach().float().reshape(-1).cpu())
        return out

    def __getattr__(self, name: str) -> Any:  # e.g. `runtime` of an ONNX module, attributes anomaly jobs read
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


def accuracy_check(model: torch.nn.Module, info: dict[str, Any], jobs: TaskJobs, path: Path,
                   cfg: ExportConfig) -> dict[str, Any]:
    """Evaluate the fp32 PyTorch model and the exported file on the same held-out data; metrics and agreement.

    Agreement: the fraction of test images (classifiers) or pixels (segmenters) given the same class as fp32; for
    anomaly models the correlation of the image scores and the fraction of images on the same side of the stored
    image threshold.
    """
    from dataclasses import replace

    ecfg = EvalConfig(model_file=cfg.model_file, device="cpu", progress=False)
    ref, exp = _Recorder(model), _Recorder(jobs.onnx_module(path, "auto"))  # type: ignore[misc]
    m_ref = jobs.evaluate(ref, info, ecfg)
    m_exp = jobs.evaluate(exp, info, replace(ecfg))
    task = MODEL_KINDS[info["kind"]].task
    a, b = (torch.cat(r.seen) if task != "detection" else r.seen for r in (ref, exp))
    numeric = {k: v for k, v in m_ref.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("images", "ms_per_image", "loss", "threshold", "boxes") and not k.endswith("_seconds")}
    out: dict[str, Any] = {"data": m_ref.get("data") or ecfg.data or info.get("data"), "images": m_ref.get("images"),
                           "fp32": {k: round(float(v), 4) for k, v in numeric.items()},
                           cfg.precision: {k: round(float(m_exp[k]), 4) for k in numeric if k in m_exp},
                           "runtime": exp.runtime}
    if task == "anomaly":
        out["score_correlation"] = round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 4)
        if "image_threshold" in info:
            t = float(info["image_threshold"])
            out["decision_agreement"] = round(float(((a >= t) == (b >= t)).float().mean()), 4)
    elif task == "detection":
        out.update(detection_agreement(a, b, float(info.get("conf_thres", 0.25)), float(info.get("iou_thres", 0.65))))
    else:
        out["top1_agreement" if task == "classification" else "pixel_agreement"] = round(
            float((a == b).float().mean()), 4)
    return out


def detection_agreement(ref: list[torch.Tensor], got: list[torch.Tensor], conf_thres: float = 0.25,
                        iou_thres: float = 0.65, match_iou: float = 0.5) -> dict[str, float]:
    """How far two detectors' detections agree, image by image, at the deployed thresholds.

    Each image's predictions ``(A, 4 + C)`` are post-processed as ``predict`` does; a detection of ``got`` matches
    an unmatched one of ``ref`` of the same class with IoU >= ``match_iou`` (greedy, by score).

    Returns:
        ``box_recall`` (share of ``ref``'s detections that ``got`` reproduces), ``box_precision`` (share of
        ``got``'s detections that match one of ``ref``), ``box_iou`` (mean IoU of the matches; ``None``
        without one) and the counts.

    Example:
        >>> p = torch.zeros(1, 3, 5)
        >>> p[0, :, :4] = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 1, 1.0]])
        >>> p[0, :, 4] = torch.tensor([0.9, 0.8, 0.1])
        >>> q = p.clone()
        >>> q[0, 1, 4] = 0.1  # the second box drops below the threshold
        >>> detection_agreement(list(p), list(q))["box_recall"]
        0.5
    """
    from torchvision.ops import box_iou

    from ..detect.postprocess import postprocess

    n_ref = n_got = matched = 0
    ious: list[float] = []
    for r, g in zip(ref, got, strict=True):
        dr, dg = (postprocess(x[None], conf_thres=conf_thres, iou_thres=iou_thres)[0] for x in (r, g))
        n_ref, n_got = n_ref + len(dr["boxes"]), n_got + len(dg["boxes"])
        if not len(dr["boxes"]) or not len(dg["boxes"]):
            continue
        iou = box_iou(dg["boxes"], dr["boxes"])
        iou[dg["labels"][:, None] != dr["labels"][None]] = 0.0
        free = torch.ones(len(dr["boxes"]), dtype=torch.bool)
        for i in dg["scores"].argsort(descending=True).tolist():
            cand = torch.where(free, iou[i], torch.zeros_like(iou[i]))
            j = int(cand.argmax())
            if cand[j] >= match_iou:
                free[j] = False
                matched += 1
                ious.append(float(cand[j]))
    return {"box_recall": round(matched / n_ref, 4) if n_ref else 1.0,
            "box_precision": round(matched / n_got, 4) if n_got else 1.0,
            "box_iou": round(sum(ious) / len(ious), 4) if ious else None,
            "detections_fp32": n_ref, "detections": n_got}


# --------------------------------------------------------------------------------------------- the tasks
def _spread(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them when there are fewer)."""
    if n >= n_total:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n).round().astype(int).tolist()


def _classifier_calibration(info: dict[str, Any], n: int) -> torch.Tensor:
    """``n`` training images of a classifier file, transformed as at evaluation."""
    from ..data import ImageFolderDataset, build_transforms
    from ..errors import DataError
    from .common import resolve_data_root

    data = _data_of(info) if info.get("data") else "textures"
    root = resolve_data_root(data) / "train"
    if not root.is_dir():
        raise DataError(f"int8 calibration reads the model's training images, but {root} does not exist; export "
                        "where the training data is (or with precision=fp32)")
    ds = ImageFolderDataset(root, build_transforms(info["img_size"], False, info["mean"], info["std"]),
                            classes=info["classes"])
    return torch.stack([ds[i][0] for i in _spread(len(ds), n)])


def _segmenter_calibration(info: dict[str, Any], n: int) -> torch.Tensor:
    """``n`` training images of a segmenter's inspection data, transformed as at evaluation."""
    from ..data.inspection import DefectDataset, segmentation_transforms
    from .inspection import load_inspection_data

    trained = info.get("data") or {}
    samples, _ = load_inspection_data(trained.get("data") or "bundled", "train", trained.get("format") or "mvtec",
                                      trained.get("categories") or None)
    ds = DefectDataset(list(samples.samples), segmentation_transforms(int(info["img_size"]), False, info["mean"],
                                                                      info["std"]))
    return torch.stack([ds[i]["image"] for i in _spread(len(ds), n)])


def _anomaly_calibration(info: dict[str, Any], n: int) -> torch.Tensor:
    """``n`` defect-free training images of an anomaly model's category, pre-processed as the graph takes them."""
    from ..errors import DataError
    from ..inspect.anomaly.export import preprocess
    from .anomaly import _samples as anomaly_samples
    from .anomaly import anomaly_spec, read_rgb

    category = info.get("category")
    train = anomaly_samples(info.get("data") or "bundled", "train", [category]).get(category, [])
    if not train:
        raise DataError(f"no training images of category {category} for int8 calibration")
    size = anomaly_spec(info).img_size
    return torch.cat([preprocess([read_rgb(train[i].image)], size) for i in _spread(len(train), n)])


def _detection_calibration(info: dict[str, Any], n: int) -> torch.Tensor:
    """``n`` training images (tiles) of a detector's data, letterboxed in ``[0, 1]`` as at evaluation."""
    from ..data.detection import DetectionDataset
    from .detection import detect_data

    size = int(info["img_size"])
    train, _ = detect_data(str(info["data"]), info.get("test_data"), info.get("split", 0.7),
                           int(info.get("tile", size)), int(info.get("overlap", 64)))
    ds = DetectionDataset(train, img_size=size, train=False)
    return torch.stack([ds[i][0] for i in _spread(len(ds), n)])


def _export_image_model(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """Classifiers and segmenters: image ``(1, 3, S, S)`` -> logits, fused first when asked."""
    from ..export import export_onnx, fuse_with_report
    from ..export.onnx import write_onnx_metadata

    size = int(info.get("img_size", 224))
    fused = ""
    if cfg.reparameterize:  # verified on a probe batch: refuses instead of exporting a changed model
        model, report = fuse_with_report(model, (2, 3, size, size))
        fused = report.summary()
    res = export_onnx(model, cfg.out, (1, 3, size, size), opset=cfg.opset, check=cfg.check,
                      input_names=("image",), output_names=("logits",))
    write_onnx_metadata(res.path, describe_for_onnx(info, cfg.model_file))  # what `predict x.onnx` needs
    return {"path": str(res.path), "weights_file": str(res.data_path) if res.data_path else None,
            "exporter": res.exporter, "max_abs_err": res.max_abs_err, "fused": fused}


def _classification() -> TaskJobs:
    from .classification import evaluate_classifier, predict_classifier

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_classifier(m, i, c.data, c.split, c.batch_size, c.device, c.progress),
        predict=lambda m, i, c: predict_classifier(m, i, c.images, c.out, c.overwrite, c.batch_size, c.top_k,
                                                   c.device, c.progress),
        export=_export_image_model,
        predict_onnx=lambda p, i, c: predict_classifier(_OnnxImageModel(p, c.runtime), i, c.images, c.out,
                                                        c.overwrite, c.batch_size, c.top_k, "cpu", c.progress),
        onnx_module=_OnnxImageModel,
        calibration=_classifier_calibration,
    )


def _segmentation() -> TaskJobs:
    from .inspection import evaluate_segmenter, predict_segmenter

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_segmenter(m, i, c.data, c.format, c.split, c.threshold, c.batch_size,
                                                    c.device, c.progress),
        predict=lambda m, i, c: predict_segmenter(m, i, c.images, c.out, c.overwrite, c.batch_size, c.threshold,
                                                  c.overlays, c.device, c.progress),
        export=_export_image_model,
        predict_onnx=lambda p, i, c: predict_segmenter(_OnnxImageModel(p, c.runtime), i, c.images, c.out,
                                                       c.overwrite, c.batch_size, c.threshold, c.overlays, "cpu",
                                                       c.progress),
        onnx_module=_OnnxImageModel,
        calibration=_segmenter_calibration,
    )


def _export_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    from ..export.onnx import write_onnx_metadata
    from ..inspect.anomaly.export import export_anomaly_onnx
    from .anomaly import anomaly_spec

    res = export_anomaly_onnx(model, cfg.out, anomaly_spec(info), opset=cfg.opset, check=cfg.check)
    write_onnx_metadata(res.path, describe_for_onnx(info, cfg.model_file))
    return {"path": str(res.path), "exporter": res.exporter, "max_abs_err": res.max_abs_err,
            "max_rel_err": res.max_rel_err}


def _evaluate_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    from .anomaly import evaluate_anomaly_model

    return evaluate_anomaly_model(model, info, cfg.data, cfg.batch_size, cfg.progress)


def _predict_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: PredictConfig) -> dict[str, Any]:
    from .anomaly import predict_anomaly_model

    return predict_anomaly_model(model, info, cfg.images, cfg.out, cfg.overwrite, cfg.threshold, cfg.image_threshold)


def _predict_anomaly_onnx(path: Path, info: dict[str, Any], cfg: PredictConfig) -> dict[str, Any]:
    from .anomaly import predict_anomaly_onnx

    runtime = _runtime_of(info, cfg.runtime)
    runner = onnx_runner(path, runtime, info.get("precision", "fp32")) if info else None
    return {**predict_anomaly_onnx(path, cfg.images, cfg.out, cfg.overwrite, cfg.threshold, cfg.image_threshold,
                                   runner),
            **({"category": info["category"]} if info.get("category") else {})}


def _detection() -> TaskJobs:
    from .detection import evaluate_detector_file, predict_detector

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_detector_file(m, i, None, c.device, c.progress, data=c.data),
        predict=lambda m, i, c: predict_detector(m, i, c.images, c.out, c.overwrite, None, None, None, c.device,
                                                 c.progress),
        export=_export_detector,
        predict_onnx=lambda p, i, c: predict_detector(_OnnxDetector(p, c.runtime), i, c.images, c.out, c.overwrite,
                                                      None, None, None, "cpu", c.progress),
        onnx_module=_OnnxDetector,
        calibration=_detection_calibration,
    )


def _export_detector(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """A detector (or Mask Frozen's detector): one graph with NMS, plus the description ``predict`` reads."""
    from ..export.onnx import write_onnx_metadata
    from .detection import export_detector_file

    res = export_detector_file(model, info, Path(cfg.out), cfg.overwrite)
    desc = {**info, "kind": "detector"} if info["kind"] == "mask_frozen" else info  # the graph holds the boxes
    write_onnx_metadata(Path(res["path"]), describe_for_onnx(desc, cfg.model_file))
    return res


register_task_jobs("classification", _classification())
register_task_jobs("segmentation", _segmentation())
register_task_jobs("anomaly", TaskJobs(_evaluate_anomaly, _predict_anomaly, _export_anomaly, _predict_anomaly_onnx,
                                       onnx_module=_OnnxAnomalyModel, calibration=_anomaly_calibration,
                                       int8_scope=_anomaly_int8_scope))
register_task_jobs("detection", _detection())

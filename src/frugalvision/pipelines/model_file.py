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
        progress: Show progress bars.
    """

    model_file: str = DEMO_MODEL_FILE
    data: str | None = None
    split: str = "test"
    format: str | None = None
    threshold: float | None = None
    batch_size: int = 32
    device: str = "auto"
    progress: bool = True


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
        overwrite: Replace an existing ``out``.
    """

    model_file: str = DEMO_MODEL_FILE
    out: str = "model.onnx"
    opset: int = 18
    check: bool = True
    reparameterize: bool = True
    overwrite: bool = False


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
    progress: bool = True


@dataclass(frozen=True)
class TaskJobs:
    """What ``eval``, ``predict`` and ``export`` do with a model of one task.

    Attributes:
        evaluate: ``(model, info, cfg: EvalConfig) -> dict`` of metrics.
        predict: ``(model, info, cfg: PredictConfig) -> dict`` with ``images``, ``predicted``, ``skipped``.
        export: ``(model, info, cfg: ExportConfig) -> dict`` with the written path and the parity error.
        predict_onnx: ``(onnx path, info, cfg: PredictConfig) -> dict`` like ``predict``, for an ONNX file whose
            metadata holds the model file's description (``info``); ``None``: predict refuses ONNX files of the task.
    """

    evaluate: Callable[[torch.nn.Module, dict[str, Any], EvalConfig], dict[str, Any]]
    predict: Callable[[torch.nn.Module, dict[str, Any], PredictConfig], dict[str, Any]]
    export: Callable[[torch.nn.Module, dict[str, Any], ExportConfig], dict[str, Any]]
    predict_onnx: Callable[[Path, dict[str, Any], PredictConfig], dict[str, Any]] | None = None


TASK_JOBS: dict[str, TaskJobs] = {}
#: Where the commands for model files of a task without eval / predict / export jobs are.
_OTHER_COMMANDS = {"vlm": ": evaluate it with `frugalvision vlm test model_file=...` and run it with "
                           "`frugalvision ask IMAGE QUESTION model_file=...` or `frugalvision chat IMAGE "
                           "model_file=...`"}


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
    """``frugalvision eval``: metrics of any model file."""
    model, info, jobs = _open(cfg.model_file, "eval")
    if info.get("weights") == "random":
        raise ConfigError(f"{cfg.model_file} holds a {info['kind']} model with random weights (e.g. `surgery "
                          "model=NAME`, a latency-only run): it has no classes or data to evaluate; give a model file "
                          "of a trained model (`surgery model_file=...`)")
    return {"model_file": cfg.model_file, "kind": info["kind"], **jobs.evaluate(model, info, cfg)}


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """``frugalvision predict``: run any model file on images."""
    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (positional, or images=a.png,b/)")
    if Path(cfg.model_file).is_file() and _is_onnx(cfg.model_file):
        return _predict_onnx(Path(cfg.model_file), cfg)
    model, info, jobs = _open(cfg.model_file, "predict")
    return {"kind": info["kind"], **jobs.predict(model, info, cfg)}


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


class _OnnxImageModel(torch.nn.Module):
    """An exported image model (image -> logits) behind the module call the predict jobs make; runs onnxruntime."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        from ..export import OrtRunner

        self.path = path
        self.runner = OrtRunner(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch, on the batch's device."""
        out = self.runner(x.detach().float().cpu().numpy())[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


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
            raise ConfigError(f"{path} holds a {kind} model; predict runs ONNX files of classifiers, segmenters and "
                              f"anomaly models only: pass its safetensors model file{_hint_for(path)}")
        return {"kind": kind, **jobs.predict_onnx(path, info, cfg), "backend": "onnxruntime"}
    if "frugalvision" in meta:  # written by export_anomaly_onnx (`anomaly fit onnx=true`): thresholds + size
        res = _predict_anomaly_onnx(path, {}, cfg)
        return {"kind": res.get("method", "anomaly"), **res, "backend": "onnxruntime"}
    raise ConfigError(f"{path} is an ONNX file without frugalvision's description (classes, input size, "
                      f"normalisation), so predict cannot run it; pass the safetensors model file it was exported "
                      f"from{_hint_for(path)}, or re-export it with `frugalvision export`")


def export_model_file(cfg: ExportConfig) -> dict[str, Any]:
    """``frugalvision export``: ONNX graph of any model file, checked against PyTorch with onnxruntime."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it or choose another out=")
    model, info, jobs = _open(cfg.model_file, "export")
    return {"kind": info["kind"], **jobs.export(model, info, cfg)}


# --------------------------------------------------------------------------------------------- the tasks
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
        predict_onnx=lambda p, i, c: predict_classifier(_OnnxImageModel(p), i, c.images, c.out, c.overwrite,
                                                        c.batch_size, c.top_k, "cpu", c.progress),
    )


def _segmentation() -> TaskJobs:
    from .inspection import evaluate_segmenter, predict_segmenter

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_segmenter(m, i, c.data, c.format, c.split, c.threshold, c.batch_size,
                                                    c.device, c.progress),
        predict=lambda m, i, c: predict_segmenter(m, i, c.images, c.out, c.overwrite, c.batch_size, c.threshold,
                                                  c.overlays, c.device, c.progress),
        export=_export_image_model,
        predict_onnx=lambda p, i, c: predict_segmenter(_OnnxImageModel(p), i, c.images, c.out, c.overwrite,
                                                       c.batch_size, c.threshold, c.overlays, "cpu", c.progress),
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

    return {**predict_anomaly_onnx(path, cfg.images, cfg.out, cfg.overwrite, cfg.threshold, cfg.image_threshold),
            **({"category": info["category"]} if info.get("category") else {})}


def _detection() -> TaskJobs:
    from .detection import evaluate_detector_file, export_detector_file, predict_detector

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_detector_file(m, i, None, c.device, c.progress, data=c.data),
        predict=lambda m, i, c: predict_detector(m, i, c.images, c.out, c.overwrite, None, None, None, c.device,
                                                 c.progress),
        export=lambda m, i, c: export_detector_file(m, i, Path(c.out), c.overwrite),
    )


register_task_jobs("classification", _classification())
register_task_jobs("segmentation", _segmentation())
register_task_jobs("anomaly", TaskJobs(_evaluate_anomaly, _predict_anomaly, _export_anomaly, _predict_anomaly_onnx))
register_task_jobs("detection", _detection())

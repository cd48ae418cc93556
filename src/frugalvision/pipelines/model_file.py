"""Jobs on any model file: ``frugalvision eval``, ``export`` and ``predict``.

A model file says which kind of model it holds (:data:`frugalvision.weights.MODEL_KINDS`), and each kind serves a
task. This module keeps, per task, the three things these commands do with a model of that task
(:class:`TaskJobs`); a new kind of model (detection, language) plugs in with :func:`register_task_jobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..weights import MODEL_KINDS, load_model_file

__all__ = ["TASK_JOBS", "EvalConfig", "ExportConfig", "PredictConfig", "TaskJobs", "export_model_file",
           "register_task_jobs", "run_eval", "run_predict"]


@dataclass
class EvalConfig:
    """Evaluate a model file (classifier, surgery student, segmenter or anomaly model) on a dataset split.

    Attributes:
        model_file: A model file written by train, segment, surgery, anomaly fit or demo (``model.safetensors``).
        data: Bundled dataset name, ``bundled`` (the inspection benchmark) or a folder; the data the model was
            trained on when unset (for segmenters, without the defects it was trained on).
        split: Which split to evaluate.
        format: Layout of an inspection ``data`` folder (mvtec, visa, defect_spectrum); the model's when unset.
        threshold: Segmenters: defect-score threshold of the IoUs; the model file's when unset.
        batch_size: Evaluation batch size.
        device: auto, cpu or cuda.
        progress: Show progress bars.
    """

    model_file: str = "runs/train/model.safetensors"
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
        model_file: A model file written by train, segment, surgery, anomaly fit or demo.
        out: The ``.onnx`` file to write.
        opset: ONNX opset.
        check: Compare onnxruntime with PyTorch (tolerance 1e-4).
        reparameterize: Fold multi-branch blocks and conv+BN pairs before export (``fv.fuse``, verified).
        overwrite: Replace an existing ``out``.
    """

    model_file: str = "runs/train/model.safetensors"
    out: str = "model.onnx"
    opset: int = 18
    check: bool = True
    reparameterize: bool = True
    overwrite: bool = False


@dataclass
class PredictConfig:
    """Run a model file on image files and folders (streamed, one batch in memory).

    Classifiers write ``predictions.csv`` (top-k classes); segmenters and anomaly models write a mask PNG (and an
    overlay) per image plus ``predictions.csv``.

    Attributes:
        model_file: A model file written by train, segment, surgery, anomaly fit or demo.
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

    model_file: str = "runs/demo/segmenter/model.safetensors"
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
    """

    evaluate: Callable[[torch.nn.Module, dict[str, Any], EvalConfig], dict[str, Any]]
    predict: Callable[[torch.nn.Module, dict[str, Any], PredictConfig], dict[str, Any]]
    export: Callable[[torch.nn.Module, dict[str, Any], ExportConfig], dict[str, Any]]


TASK_JOBS: dict[str, TaskJobs] = {}


def register_task_jobs(task: str, jobs: TaskJobs) -> None:
    """Say what eval / predict / export do for model files of ``task`` (see :class:`TaskJobs`)."""
    TASK_JOBS[task] = jobs


def _open(path: str) -> tuple[torch.nn.Module, dict[str, Any], TaskJobs]:
    model, info = load_model_file(path)
    task = MODEL_KINDS[info["kind"]].task
    if task not in TASK_JOBS:
        raise ConfigError(f"{path} holds a {info['kind']} model (task {task}); eval, export and predict do not "
                          f"handle that task yet")
    return model, info, TASK_JOBS[task]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``frugalvision eval``: metrics of any model file."""
    model, info, jobs = _open(cfg.model_file)
    return {"model_file": cfg.model_file, "kind": info["kind"], **jobs.evaluate(model, info, cfg)}


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """``frugalvision predict``: run any model file on images."""
    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (positional, or images=a.png,b/)")
    model, info, jobs = _open(cfg.model_file)
    return {"kind": info["kind"], **jobs.predict(model, info, cfg)}


def export_model_file(cfg: ExportConfig) -> dict[str, Any]:
    """``frugalvision export``: ONNX graph of any model file, checked against PyTorch with onnxruntime."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it or choose another out=")
    model, info, jobs = _open(cfg.model_file)
    return {"kind": info["kind"], **jobs.export(model, info, cfg)}


# --------------------------------------------------------------------------------------------- the tasks
def _export_image_model(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """Classifiers and segmenters: image ``(1, 3, S, S)`` -> logits, fused first when asked."""
    from ..export import export_onnx, fuse_with_report

    size = int(info.get("img_size", 224))
    fused = ""
    if cfg.reparameterize:  # verified on a probe batch: refuses instead of exporting a changed model
        model, report = fuse_with_report(model, (2, 3, size, size))
        fused = report.summary()
    res = export_onnx(model, cfg.out, (1, 3, size, size), opset=cfg.opset, check=cfg.check,
                      input_names=("image",), output_names=("logits",))
    return {"path": str(res.path), "weights_file": str(res.data_path) if res.data_path else None,
            "exporter": res.exporter, "max_abs_err": res.max_abs_err, "fused": fused}


def _classification() -> TaskJobs:
    from .classification import evaluate_classifier, predict_classifier

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_classifier(m, i, c.data, c.split, c.batch_size, c.device, c.progress),
        predict=lambda m, i, c: predict_classifier(m, i, c.images, c.out, c.overwrite, c.batch_size, c.top_k,
                                                   c.device, c.progress),
        export=_export_image_model,
    )


def _segmentation() -> TaskJobs:
    from .inspection import evaluate_segmenter, predict_segmenter

    return TaskJobs(
        evaluate=lambda m, i, c: evaluate_segmenter(m, i, c.data, c.format, c.split, c.threshold, c.batch_size,
                                                    c.device, c.progress),
        predict=lambda m, i, c: predict_segmenter(m, i, c.images, c.out, c.overwrite, c.batch_size, c.threshold,
                                                  c.overlays, c.device, c.progress),
        export=_export_image_model,
    )


def _export_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    from ..inspect.anomaly.export import export_anomaly_onnx
    from .anomaly import anomaly_spec

    res = export_anomaly_onnx(model, cfg.out, anomaly_spec(info), opset=cfg.opset, check=cfg.check)
    return {"path": str(res.path), "exporter": res.exporter, "max_abs_err": res.max_abs_err,
            "max_rel_err": res.max_rel_err}


def _evaluate_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    from .anomaly import evaluate_anomaly_model

    return evaluate_anomaly_model(model, info, cfg.data, cfg.batch_size, cfg.progress)


def _predict_anomaly(model: torch.nn.Module, info: dict[str, Any], cfg: PredictConfig) -> dict[str, Any]:
    from .anomaly import predict_anomaly_model

    return predict_anomaly_model(model, info, cfg.images, cfg.out, cfg.overwrite, cfg.threshold, cfg.image_threshold)


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
register_task_jobs("anomaly", TaskJobs(_evaluate_anomaly, _predict_anomaly, _export_anomaly))
register_task_jobs("detection", _detection())

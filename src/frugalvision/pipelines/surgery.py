"""The ``frugalvision surgery`` job: attention -> modulation surgery under a latency budget, then distillation.

The surgery itself (measuring, planning, replacing mixers) is the library's :func:`frugalvision.surgery.modulate`;
this job adds the data, the distillation run, the evaluation and the model file (kind ``surgery``), which
``eval``, ``export`` and ``predict`` open like any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import data_config_of
from ..engine import ClassificationTask, TrainConfig, Trainer, evaluate, resolve_device
from ..engine.distill import DistillationTask
from ..errors import ConfigError
from ..models import create_model
from ..surgery import find_attention_blocks, modulate, surgery_record
from ..utils.io import atomic_write_text
from ..weights import load_model_file, save_model_file
from .classification import load_splits
from .common import check_run_dir

__all__ = ["SurgeryConfig", "run_surgery"]


@dataclass
class SurgeryConfig(TrainConfig):
    """Replace a ViT's most expensive attention mixers to meet a latency budget, then distil from the original.

    Every :class:`~frugalvision.engine.TrainConfig` key applies to the distillation (``epochs``, ``lr``, ...).

    Attributes:
        model_file: A model file written by ``frugalvision train`` (a ViT-family model); when unset, ``model``.
        model: A timm model name with random weights (latency surgery only, no distillation).
        img_size: Input resolution when ``model`` is used (the model file's otherwise).
        budget_ms: Target batch-1 latency in ms on ``device``.
        speedup: Alternative target: the measured latency divided by this.
        blocks: Replace exactly these blocks (e.g. ``[blocks.0,blocks.3]``) instead of planning for a budget.
        kernel_size: Depth-wise context kernel of the new mixers.
        context_fc: Keep the mixers' context FCs.
        repeats: Timed interleaved rounds per latency measurement.
        threads: torch threads for the latency measurement (unchanged when unset).
        data: Bundled dataset or image-folder root for distillation and evaluation.
        distill_epochs: Distillation epochs (0: no distillation).
        alpha_ce: Weight of the cross-entropy on labels.
        alpha_kd: Weight of the logit distillation (KL at ``temperature``, times T^2).
        alpha_feat: Weight of the block-output MSE.
        temperature: Softmax temperature of the logit distillation.
    """

    model_file: str | None = None
    model: str | None = None
    img_size: int = 224
    budget_ms: float | None = None
    speedup: float | None = None
    blocks: list[str] | None = None
    kernel_size: int = 7
    context_fc: bool = True
    repeats: int = 30
    threads: int | None = None
    data: str = "textures"
    distill_epochs: int = 5
    alpha_ce: float = 0.5
    alpha_kd: float = 1.0
    alpha_feat: float = 1.0
    temperature: float = 2.0


def run_surgery(cfg: SurgeryConfig) -> dict[str, Any]:
    """The ``frugalvision surgery`` job: surgery, optional distillation, evaluation; writes a model file + report."""
    if (cfg.model_file is None) == (cfg.model is None):
        raise ConfigError("give exactly one of model_file=PATH (a trained model file) or model=NAME")
    if cfg.output_dir is not None:  # before measuring anything
        check_run_dir(Path(cfg.output_dir), cfg.overwrite, outputs=("model.safetensors", "report.json", "report.md"),
                      resumable=False)
    dev = resolve_device(cfg.device)
    info: dict[str, Any]
    if cfg.model_file:
        teacher, info = load_model_file(cfg.model_file)
        img_size = int(info.get("img_size", cfg.img_size))
    else:
        teacher = create_model(cfg.model, img_size=cfg.img_size)  # type: ignore[arg-type]
        dc = data_config_of(teacher)
        # random weights: no class names, so the classes are the head's indices; eval/predict/export still open it
        info = {"name": cfg.model, "model_kwargs": {"img_size": cfg.img_size}, "img_size": cfg.img_size,
                "mean": list(dc["mean"]), "std": list(dc["std"]),
                "classes": [str(i) for i in range(int(getattr(teacher, "num_classes", 0) or 0))],
                "weights": "random"}
        img_size = cfg.img_size
    student, report = modulate(teacher, cfg.budget_ms, speedup=cfg.speedup, device=dev, img_size=img_size,
                               kernel_size=cfg.kernel_size, context_fc=cfg.context_fc, repeats=cfg.repeats,
                               threads=cfg.threads, blocks=cfg.blocks, progress=cfg.progress)
    out = Path(cfg.output_dir or f"runs/surgery/{info['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    result: dict[str, Any] = {"report": report.to_dict(), "output_dir": str(out)}
    if cfg.model_file and cfg.distill_epochs > 0 and report.replaced:
        splits, classes = load_splits(cfg.data, img_size, info["mean"], info["std"])
        if classes != info.get("classes", classes):
            raise ConfigError(f"data {cfg.data!r} has classes {classes[:5]}..., the model file "
                              f"{info['classes'][:5]}...")
        test = splits.get("test", splits.get("val"))
        acc = {"original": evaluate(teacher, test, ClassificationTask(), device=dev)["acc1"],
               "surgery": evaluate(student, test, ClassificationTask(), device=dev)["acc1"]}
        train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})
        train_cfg.epochs, train_cfg.output_dir, train_cfg.resume = cfg.distill_epochs, None, None
        task = DistillationTask(teacher, features=find_attention_blocks(teacher), alpha_ce=cfg.alpha_ce,
                                alpha_kd=cfg.alpha_kd, alpha_feat=cfg.alpha_feat, temperature=cfg.temperature)
        Trainer(student, train_cfg, splits["train"], None, task).fit()
        acc["distilled"] = evaluate(student, test, ClassificationTask(), device=dev)["acc1"]
        result["acc1"] = acc
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in info.items() if k not in ("kind", "name", "model_kwargs")}
    meta["surgery"] = surgery_record(info.get("surgery"), report.replaced, cfg.kernel_size, cfg.context_fc)
    save_model_file(student.cpu(), out / "model.safetensors", "surgery", info["name"], info.get("model_kwargs", {}),
                    **meta)
    atomic_write_text(out / "report.md", report.to_markdown())
    atomic_write_text(out / "report.json", json.dumps(result, indent=2, default=str))
    result["model_file"] = str(out / "model.safetensors")
    return result

"""``fv.adapt(model, config)``: freeze / unfreeze, build the method's optimiser, report, and train its stages."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine.task import Task
from ..engine.trainer import FitResult, TrainConfig, Trainer
from ..errors import ConfigError
from .config import AdaptConfig, get_method_config
from .freeze import AdaptReport, ModelParts, build_report, optimizer_state_bytes, set_trainable

__all__ = ["Adaptation", "adapt"]


@dataclass
class Adaptation:
    """An adapted model: what :func:`adapt` returns.

    Attributes:
        model: The model (adapted in place: ``requires_grad`` set, frozen parts kept in eval mode).
        config: The method's config.
        optimizer: The optimiser the method prescribes, over the trainable parameters.
        report: Trainable-parameter report (``print(report)``); after :meth:`fit` it holds the measured
            optimiser-state bytes.
        parts: The discovered blocks, embedding and head.
        trainable: Names of the trainable parameters of the current stage.
        stage: Index of the current stage (LP-FT has two).
        state_bytes: Measured optimiser-state bytes at the end of each stage trained by :meth:`fit`.
        trainer: The trainer of the last stage :meth:`fit` ran.
    """

    model: nn.Module
    config: AdaptConfig
    optimizer: torch.optim.Optimizer
    report: AdaptReport
    parts: ModelParts
    trainable: list[str]
    stage: int = 0
    state_bytes: list[int] = field(default_factory=list)
    trainer: Trainer | None = field(default=None, repr=False)

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimiser's state tensors now (0 before the first step)."""
        return optimizer_state_bytes(self.optimizer)

    def fit(self, train_data: Dataset, val_data: Dataset | None = None, config: TrainConfig | None = None,
            task: Task | None = None, callbacks: Sequence[Any] = ()) -> FitResult:
        """Train every stage of the method with the engine's :class:`~frugalvision.engine.Trainer`.

        The optimiser (type, learning rate, weight decay) is the method's; ``config`` gives the rest (epochs or
        ``max_steps``, batch size, schedule, device, checkpoints). Stages split the steps by their fractions;
        with ``output_dir`` set, stage ``i`` checkpoints to ``output_dir/stage{i}``.
        """
        config = config or TrainConfig()
        stages = self.config.stages()
        n_train = len(train_data)  # type: ignore[arg-type]
        total = config.max_steps or config.epochs * max(n_train // config.batch_size, 1)
        counts = [max(1, round(total * f)) for _, f in stages]
        counts[-1] = max(1, total - sum(counts[:-1]))
        merged = FitResult()
        for i, steps in enumerate(counts):
            if i != self.stage:
                self._apply_stage(i, verbose=False)
            out = config.output_dir
            if out is not None and len(stages) > 1:
                out = out / f"stage{i}"
            cfg = dataclasses.replace(config, max_steps=steps, output_dir=out)
            self.trainer = Trainer(self.model, cfg, train_data, val_data, task, optimizer=self.optimizer,
                                   callbacks=callbacks)
            res = self.trainer.fit()
            self.state_bytes.append(self.optimizer_state_bytes())
            merged.history += [{**h, "stage": i} for h in res.history]
            merged.final, merged.checkpoint = res.final, res.checkpoint
            merged.steps += res.steps
            merged.wall_time_s += res.wall_time_s
        self.report.optimizer_state_bytes = max(self.state_bytes)
        return merged

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: method, trainable / total parameters, optimiser, measured state bytes."""
        out: dict[str, Any] = {"method": self.config.method, "trainable_params": self.report.trainable,
                               "total_params": self.report.total, "optimizer": self.report.optimizer,
                               "optimizer_state_bytes": self.report.optimizer_state_bytes}
        result = getattr(self.config, "result", None)
        if result is not None:
            out["subtuning"] = result.to_dict()
        elif getattr(self.config, "tune", None):
            out["tuned_layers"] = list(self.config.tune)
        return out

    def _apply_stage(self, index: int, verbose: bool) -> None:
        stages = self.config.stages()
        trainable, optimizer, report, parts = _apply(self.model, stages[index][0], self.config.method, index,
                                                     len(stages))
        self.trainable, self.optimizer, self.parts, self.stage = trainable, optimizer, parts, index
        self.report = report
        if verbose:
            print(report)


def _apply(model: nn.Module, cfg: AdaptConfig, method: str, stage: int, n_stages: int
           ) -> tuple[list[str], torch.optim.Optimizer, AdaptReport, ModelParts]:
    parts = cfg.parts(model)
    names = list(cfg.trainable(model, parts))
    trainable = set_trainable(model, names, frozen_eval=cfg.frozen_eval)
    if not trainable:
        raise ConfigError(f"{method}: nothing to train (the selected modules {names} hold no parameters)")
    optimizer = cfg.build_optimizer(model)
    label = method if n_stages == 1 else f"{method} (stage {stage + 1}/{n_stages}: {cfg.method})"
    report = build_report(model, label, cfg.describe_optimizer(), parts.blocks)
    report.notes += list(getattr(cfg, "report_notes", lambda: [])())
    return trainable, optimizer, report, parts


def adapt(model: nn.Module, config: AdaptConfig | str = "full_ft", verbose: bool = True, **options: Any) -> Adaptation:
    """Apply an adaptation method to ``model``: freeze / unfreeze, build its optimiser, print the report.

    Args:
        model: A timm model or one of ours (sized for the target task: ``model.reset_classifier(n)``).
        config: A method config (``fv.FreezeEmbedConfig()``, ``fv.SubTuningConfig(data=..., val_data=...)``)
            or a registered method name (``"subtuning"``).
        verbose: Print the trainable-parameter report.
        **options: Fields of the method's config (with a name) or replacements of them (with a config).

    Returns:
        An :class:`Adaptation`; call ``.fit(train, val, TrainConfig(...))`` to train (all stages for LP-FT).

    Example:
        >>> import timm
        >>> a = adapt(timm.create_model("test_vit", num_classes=3), "freeze_embed", verbose=False)
        >>> type(a.optimizer).__name__, any(n.startswith("patch_embed") for n in a.trainable)
        ('SGD', False)
    """
    if isinstance(config, str):
        config = get_method_config(config, **options)
    elif not isinstance(config, AdaptConfig):
        raise ConfigError(f"config must be an AdaptConfig or a method name, got {type(config).__name__}")
    elif options:
        try:
            config = dataclasses.replace(config, **options)
        except TypeError as exc:
            raise ConfigError(f"{config.method}: {exc}") from None
    stages = config.stages()
    trainable, optimizer, report, parts = _apply(model, stages[0][0], config.method, 0, len(stages))
    result = Adaptation(model, config, optimizer, report, parts, trainable)
    if verbose:
        print(report)
    return result

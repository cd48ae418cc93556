"""Adaptation jobs: ``frugalvision train --adapt <method>`` and ``frugalvision profile`` (SubTuning)."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..config import check_number
from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_text

__all__ = ["ProfileConfig", "adapt_classifier", "few_shot", "run_profile"]


def few_shot(dataset: Dataset, shots: int | None, seed: int = 0) -> Dataset:
    """``shots`` samples per class (a seeded choice), or the whole dataset when ``shots`` is ``None``.

    Example:
        >>> class D(list):
        ...     targets = [0, 0, 0, 1, 1, 1]
        >>> len(few_shot(D(range(6)), 2))
        4
    """
    if shots is None:
        return dataset
    if shots < 1:
        raise ConfigError(f"shots must be >= 1 or unset, got {shots}")
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    targets = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        if len(idx) < shots:
            raise DataError(f"class {c} has only {len(idx)} samples, fewer than shots={shots}")
        keep += idx[torch.randperm(len(idx), generator=g)[:shots]].tolist()
    sub = Subset(dataset, sorted(keep))
    sub.targets = [int(targets[i]) for i in sorted(keep)]  # type: ignore[attr-defined]
    sub.classes = getattr(dataset, "classes", None)  # type: ignore[attr-defined]
    return sub


def _plain_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "parsed", v) for k, v in options.items()}


def adapt_classifier(model: torch.nn.Module, cfg: Any, splits: dict[str, Dataset], eval_train: Dataset | None = None
                     ) -> Any:
    """Apply ``cfg.adapt`` (a method name) with ``cfg.adapt_options`` to ``model`` for ``frugalvision train``.

    The train command's ``lr``, ``weight_decay`` and ``momentum`` set the method's optimiser; SubTuning profiles
    on ``eval_train`` (the training split without augmentation) against the validation split.
    """
    from ..adapt import adapt, get_method_config

    options = _plain_options(cfg.adapt_options)
    cfg.adapt_options = dict(options)
    options.setdefault("lr", cfg.lr)
    options.setdefault("weight_decay", cfg.weight_decay)
    options.setdefault("momentum", cfg.momentum)
    if cfg.adapt == "subtuning" and "tune" not in options:
        options.setdefault("data", eval_train if eval_train is not None else splits["train"])
        options.setdefault("val_data", splits.get("val"))
        options.setdefault("device", cfg.device)
        options.setdefault("progress", cfg.progress)
        options.setdefault("seed", cfg.seed)
    config = get_method_config(cfg.adapt, **options)
    return adapt(model, config, verbose=cfg.progress)


@dataclass
class ProfileConfig:
    """SubTuning profile: train each block alone, plot validation accuracy, select the best few blocks.

    Attributes:
        model: timm model name (ours included).
        weights: Pretrained weights (safetensors or weights-only PyTorch); the classifier is re-sized.
        data: Bundled dataset name or image-folder root with train/ and val/ splits.
        img_size: Resolution.
        shots: Training labels per class (few-shot); all when unset.
        val_shots: Validation labels per class used to score selections; all when unset.
        k: Blocks to select; chosen automatically (min_gain) when unset.
        min_gain: Auto k: stop when the next block adds fewer accuracy points than this.
        max_k: Auto k: at most this many blocks.
        max_params: Budget on the selected blocks' parameters.
        max_compute: Budget on the fraction of block FLOPs recomputed per step.
        layers: Block names in forward order (discovered when unset).
        epochs: Epochs of each profiling run.
        lr: AdamW learning rate of the profiling runs.
        batch_size: Batch size.
        cache: Cache the frozen prefix's activations.
        seed: Seed of the few-shot choice and of training.
        device: auto, cpu or cuda.
        progress: Show progress bars.
        output_dir: Where ``profile.png``, ``chosen_layers.json`` and ``profile.csv`` go.
        overwrite: Replace the outputs of an earlier profile in ``output_dir`` (refused before any work otherwise).
    """

    model: str = "resnet18"
    weights: str | None = None
    data: str = "digits"
    img_size: int = 32
    shots: int | None = None
    val_shots: int | None = None
    k: int | None = None
    min_gain: float = 1.0
    max_k: int | None = None
    max_params: int | None = None
    max_compute: float | None = None
    layers: list[str] | None = None
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    cache: bool = True
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    output_dir: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from ..engine.trainer import MAX_LR

        check_number("img_size", self.img_size, 1)
        check_number("epochs", self.epochs, 1)
        check_number("batch_size", self.batch_size, 1)
        check_number("lr", self.lr, 0, MAX_LR, low_open=True)
        check_number("min_gain", self.min_gain)
        for key in ("shots", "val_shots", "k", "max_k", "max_params"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), 1)
        if self.max_compute is not None:
            check_number("max_compute", self.max_compute, 0, low_open=True)


PROFILE_OUTPUTS = ("chosen_layers.json", "profile.csv", "profile.png")


def run_profile(cfg: ProfileConfig) -> dict[str, Any]:
    """Profile ``cfg.model``'s blocks on ``cfg.data``; write the plot, the chosen layers (JSON) and a CSV."""
    from .._deps import require_all
    from ..adapt import SubTuningConfig, find_parts, plot_profile, subtuning_select
    from ..data import data_config_of
    from ..engine import seed_everything
    from ..models import create_model
    from ..models.factory import check_input_size
    from .common import check_run_dir, lm_needs, load_pretrained, load_splits, size_kwargs

    require_all(lm_needs(cfg.model, None))
    out = Path(cfg.output_dir or f"runs/profile/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out, cfg.overwrite, outputs=PROFILE_OUTPUTS, resumable=False)
    seed_everything(cfg.seed)
    probe = create_model(cfg.model, **size_kwargs(cfg.model, cfg.img_size))
    check_input_size(probe, cfg.model, cfg.img_size)
    dc = data_config_of(probe)
    splits, classes = load_splits(cfg.data, cfg.img_size, dc["mean"], dc["std"], train_aug=False)
    if "val" not in splits:
        raise DataError(f"data {cfg.data!r} has no val/ split to score the selections")
    model = create_model(cfg.model, num_classes=len(classes), **size_kwargs(cfg.model, cfg.img_size))
    if cfg.weights:
        load_pretrained(model, cfg.weights)
    st = SubTuningConfig(data=few_shot(splits["train"], cfg.shots, cfg.seed),
                         val_data=few_shot(splits["val"], cfg.val_shots, cfg.seed), k=cfg.k, min_gain=cfg.min_gain,
                         max_k=cfg.max_k, max_params=cfg.max_params, max_compute=cfg.max_compute, layers=cfg.layers,
                         profile_epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, cache=cfg.cache,
                         seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    parts = find_parts(model, cfg.layers)
    result = subtuning_select(model, st, parts)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_profile(result, out / "profile.png", title=f"SubTuning profile: {cfg.model} on {cfg.data}")
    summary = {"model": cfg.model, "data": cfg.data, "shots": cfg.shots, **result.to_dict()}
    atomic_write_text(out / "chosen_layers.json", json.dumps(summary, indent=2))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "layers", "val_acc", "val_loss", "params", "compute", "seconds"])
    for kind, trials in (("baseline", [result.baseline]), ("profile", result.profile), ("greedy", result.steps)):
        for t in trials:
            w.writerow([kind, "+".join(t.layers) or "-", f"{t.acc:.2f}", f"{t.loss:.4f}", t.params,
                        f"{t.compute:.3f}", f"{t.seconds:.2f}"])
    atomic_write_text(out / "profile.csv", buf.getvalue())
    return {"chosen": result.chosen, "val_acc": result.steps[-1].acc if result.steps else result.baseline.acc,
            "profile": {t.layers[0]: round(t.acc, 2) for t in result.profile}, "baseline": result.baseline.acc,
            "runs": len(result.trials), "wall_time_s": round(result.wall_time_s, 2), "plot": str(png),
            "chosen_layers": str(out / "chosen_layers.json"), "output_dir": str(out)}

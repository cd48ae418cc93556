"""Image classification jobs: train, evaluate and export a timm model on a folder or a bundled dataset."""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .._deps import require_all
from ..config import check_number, config_to_dict
from ..data import ImageFolderDataset, build_transforms, data_config_of
from ..data.bundled import cache_dir
from ..data.images import load_image
from ..engine import ClassificationTask, TrainConfig, Trainer, evaluate, resolve_device, seed_everything
from ..errors import DataError
from ..models import create_model
from ..models.factory import check_input_size
from ..utils.io import atomic_path, atomic_write_text
from ..weights import save_model_file
from .common import (
    check_outputs,
    check_run_dir,
    iter_images,
    lm_needs,
    load_pretrained,
    load_splits,
    resolve_data_root,
    size_kwargs,
)

__all__ = ["ClassifyConfig", "evaluate_classifier", "predict_classifier", "pretrain_backbone", "train_classifier"]


@dataclass
class ClassifyConfig(TrainConfig):
    """Train a classifier (every :class:`~frugalvision.engine.TrainConfig` key applies too).

    Attributes:
        model: timm model name (``frugalvision models`` lists ours).
        data: A bundled dataset name (textures, digits, faces) or a folder with ``train/`` and ``val/``
            (and optionally ``test/``) image-folder splits.
        img_size: Training and evaluation resolution; fixed-size models (ViT, DeiT, FasterViT) are built for it,
            and a size the model cannot take is refused with the sizes it can.
        weights: Initial weights file (safetensors or weights-only PyTorch); random init when unset. A ViT's
            position embedding is resampled when the file was trained at another resolution.
        drop_path_rate: Stochastic depth rate for models that support it.
        lm_path: For ViTs with a frozen language-model block (``vit_tiny_lm``, ``vit_small_lm``): the language
            model's checkpoint (transformers folder or safetensors file; ``minilm`` for the installed
            all-MiniLM-L6-v2). The ViT is then built at ``img_size``.
        lm_block: Which layer of that language model (``-1``: the last).
        adapt: Adaptation method (``frugalvision.adapt``: full_ft, sgd, freeze_embed, freeze_embed_nomom,
            linear_probe, lp_ft, frozen_backbone, subtuning); the method prescribes what trains and the
            optimiser (``lr``, ``weight_decay``, ``momentum`` still apply). Plain training when unset.
        adapt_options: Options of the method, e.g. ``adapt_options.k=2`` or ``adapt_options.lp_fraction=0.3``.
    """

    model: str = "resnet18"
    data: str = "textures"
    img_size: int = 64
    weights: str | None = None
    drop_path_rate: float | None = None
    lm_path: str | None = None
    lm_block: int = -1
    adapt: str | None = None
    adapt_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("img_size", self.img_size, 1)
        if self.drop_path_rate is not None:
            check_number("drop_path_rate", self.drop_path_rate, 0, 1, high_open=True)

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages this job needs: ``(module, feature, extra)``."""
        return lm_needs(self.model, self.lm_path)


def train_classifier(cfg: ClassifyConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; writes ``model.safetensors``, ``metrics.json`` and ``config.yaml``.

    Returns:
        The final validation and test metrics and the output paths.
    """
    require_all(cfg.needs())
    out = Path(cfg.output_dir or f"runs/train/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out, cfg.overwrite, cfg.resume)
    cfg.output_dir = out
    seed_everything(cfg.seed)
    kwargs: dict[str, Any] = {}
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    kwargs.update(size_kwargs(cfg.model, cfg.img_size))  # ViTs are built for the training resolution
    if cfg.lm_path:
        kwargs.update(lm_path=cfg.lm_path, lm_block=cfg.lm_block, img_size=cfg.img_size)
    probe = create_model(cfg.model, **kwargs)
    check_input_size(probe, cfg.model, cfg.img_size)
    dc = data_config_of(probe)
    splits, classes = load_splits(cfg.data, cfg.img_size, dc["mean"], dc["std"])
    kwargs["num_classes"] = len(classes)
    seed_everything(cfg.seed)
    model = create_model(cfg.model, weights=None, **kwargs)
    if cfg.weights:
        load_pretrained(model, cfg.weights)
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})
    task = ClassificationTask(label_smoothing=cfg.label_smoothing)
    if cfg.adapt:
        from .adaptation import adapt_classifier

        eval_train = load_splits(cfg.data, cfg.img_size, dc["mean"], dc["std"], train_aug=False)[0]["train"]
        adaptation = adapt_classifier(model, cfg, splits, eval_train)
        result = adaptation.fit(splits["train"], splits.get("val"), train_cfg, task)
        trainer = adaptation.trainer
    else:
        trainer = Trainer(model, train_cfg, splits["train"], splits.get("val"), task)
        result = trainer.fit()
    metrics: dict[str, Any] = {"val": result.final, "steps": result.steps, "wall_time_s": result.wall_time_s}
    if cfg.adapt:
        metrics["adapt"] = adaptation.summary()
    if "test" in splits:
        metrics["test"] = trainer.evaluate(splits["test"])
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_model_file(model, out / "model.safetensors", "classifier", cfg.model, kwargs, classes=classes,
                        img_size=cfg.img_size, mean=list(dc["mean"]), std=list(dc["std"]), data=cfg.data)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    metrics["output_dir"] = str(out)
    return metrics


def evaluate_classifier(model: torch.nn.Module, info: dict[str, Any], data: str | None = None, split: str = "test",
                        batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Accuracy of a classifier model file (plain or after surgery) on a split of a dataset.

    ``data``: a bundled dataset or an image-folder root; the data the file was trained on when unset.
    """
    data = data or info.get("data") or "textures"
    root = resolve_data_root(data)
    if not (root / split).is_dir():
        raise DataError(f"dataset folder {root} has no {split}/ split")
    ds = ImageFolderDataset(root / split, build_transforms(info["img_size"], False, info["mean"], info["std"]),
                            classes=info["classes"])
    metrics = evaluate(model, ds, ClassificationTask(), batch_size, resolve_device(device), progress=progress)
    return {**metrics, "data": f"{data} ({split} split)", "images": len(ds)}


@torch.no_grad()
def predict_classifier(model: torch.nn.Module, info: dict[str, Any], images: list[str], out: str | Path,
                       overwrite: bool = False, batch_size: int = 32, top_k: int = 3, device: str = "auto",
                       progress: bool = True) -> dict[str, Any]:
    """Classify image files/folders with a classifier model file; writes ``predictions.csv`` (top-k classes).

    An unreadable image is reported, recorded and skipped; an existing CSV is kept unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    csv_path = out / "predictions.csv"
    total = check_outputs(images, lambda stem: [], overwrite, "out", extra=[csv_path])
    dev = resolve_device(device)
    model = model.to(dev).eval()
    tf = build_transforms(info["img_size"], False, info["mean"], info["std"])
    classes = list(info["classes"])
    k = max(1, min(top_k, len(classes)))
    n_ok = n_bad = 0
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "status", "class", "probability", f"top{k}"])
        batch: list[tuple[Path, torch.Tensor]] = []

        def flush() -> None:
            nonlocal n_ok
            if not batch:
                return
            probs = model(torch.stack([x for _, x in batch]).to(dev)).float().softmax(1).cpu()
            p, idx = probs.topk(k, dim=1)
            for (path, _), pi, ii in zip(batch, p.tolist(), idx.tolist(), strict=True):
                top = ";".join(f"{classes[c]}:{q:.4f}" for c, q in zip(ii, pi, strict=True))
                writer.writerow([str(path), "ok", classes[ii[0]], f"{pi[0]:.6f}", top])
                n_ok += 1
            bar.update(len(batch))
            batch.clear()

        for path, _ in iter_images(images):
            try:
                x = tf(load_image(path))
            except DataError as exc:
                flush()
                n_bad += 1
                writer.writerow([str(path), f"skipped: {exc}", "", "", ""])
                print(f"skipped {path}: {exc}", file=sys.stderr)
                bar.update(1)
                continue
            batch.append((path, x))
            if len(batch) >= batch_size:
                flush()
        flush()
    bar.close()
    return {"images": total, "predicted": n_ok, "skipped": n_bad, "csv": str(csv_path)}


def pretrain_backbone(name: str, epochs: int = 6, img_size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """A classifier of ``name`` trained on the bundled ``textures`` set, cached; returns its model file.

    Real pretrained weights cannot be downloaded here, so "pretrained" means pretrained on this real data.
    """
    folder = cache_dir() / "pretrained" / f"{name}-textures-e{epochs}-i{img_size}-s{seed}"
    model_file = folder / "model.safetensors"
    if model_file.is_file():
        return model_file
    cfg = ClassifyConfig(model=name, data="textures", img_size=img_size, epochs=epochs, batch_size=64, lr=2e-3,
                         warmup_epochs=0.5, label_smoothing=0.1, seed=seed, output_dir=folder, progress=progress,
                         overwrite=True)  # no model file yet: whatever a killed run left there is replaced
    train_classifier(cfg)
    return model_file

"""Training and evaluation of detectors: a step budget or a wall-clock budget, EMA weights, COCO metrics.

The schedule runs on *progress* = the larger of (steps done / steps planned) and (seconds spent / time budget), so
a run with ``time_budget_s`` gets a full warm-up + cosine schedule inside its budget whatever the machine's speed:
that is how different detectors are compared at the same training wall-clock.

YOLOv6's recipe: SGD (momentum 0.937, Nesterov, weight decay 5e-4 on weights only), linear warm-up, cosine to
``lr * 0.01``, an EMA of the weights (decay ``0.9999 * (1 - exp(-updates / 2000))``) that is the model evaluated
and saved. ``ema_tau`` shortens the EMA ramp for the short runs of this machine.

Example:
    >>> from frugalvision.detect.train import DetectTrainConfig
    >>> DetectTrainConfig(epochs=2, img_size=64).lr
    0.01
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.detection import BoxSet, DetectionDataset, detection_collate, to_original, write_coco
from ..engine.trainer import _amp_dtype, _autocast, _progress, build_optimizer, resolve_device, seed_everything
from ..errors import ConfigError, DataError, TrainingDivergedError
from .coco_eval import coco_metrics, detections_to_coco
from .loss import DetectionLoss
from .postprocess import postprocess
from .yolov6 import YOLOv6

__all__ = ["DetectFitResult", "DetectTrainConfig", "ModelEMA", "evaluate_detector", "fit_detector", "predict_boxset"]

log = logging.getLogger(__name__)


@dataclass
class DetectTrainConfig:
    """Settings of one detector training run.

    Attributes:
        img_size: Square training and evaluation size (letterboxed).
        epochs: Passes over the training data (the planned schedule).
        time_budget_s: Stop after this many seconds of training (the schedule is compressed to fit); None: no limit.
        batch_size: Images per step.
        optimizer: ``sgd`` (YOLOv6) or ``adamw``.
        lr: Peak learning rate.
        momentum: SGD momentum / AdamW beta1.
        weight_decay: On weights of dimension >= 2.
        warmup: Fraction of the run spent in linear warm-up.
        final_lr_ratio: Cosine end point as a fraction of ``lr``.
        ema: Keep and evaluate an exponential moving average of the weights.
        ema_tau: Updates over which the EMA decay ramps up (YOLOv6: 2000).
        atss_epochs: Epochs with the ATSS assigner before TAL (YOLOv6 v3.0: 0).
        grad_clip: Clip the gradient norm (None: off).
        amp: ``auto`` (bf16/fp16 on CUDA), ``none``, ``bf16``, ``fp16``.
        device: ``auto``, ``cpu``, ``cuda[:N]``.
        seed: Seed of initialisation, augmentation and data order.
        num_workers: DataLoader workers.
        eval_every: Evaluate on the validation set every this many epochs (0: only at the end).
        conf_thres, iou_thres, max_det: Post-processing for evaluation (COCO convention: a low threshold).
        augment: Keyword arguments of :class:`~frugalvision.data.detection.DetectionDataset` for training.
        progress: Progress bars.
        distill_weight: Self-distillation weights ``{"cls": 1.0, "dfl": 1.0}`` used when a teacher is given.
    """

    img_size: int = 320
    epochs: int = 50
    time_budget_s: float | None = None
    batch_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup: float = 0.05
    final_lr_ratio: float = 0.01
    ema: bool = True
    ema_tau: float = 2000.0
    atss_epochs: int = 0
    grad_clip: float | None = 10.0
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 0
    conf_thres: float = 0.001
    iou_thres: float = 0.65
    max_det: int = 300
    augment: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    distill_weight: dict[str, float] = field(default_factory=lambda: {"cls": 1.0, "dfl": 1.0})

    def __post_init__(self) -> None:
        if self.img_size < 32 or self.img_size % 32:
            raise ConfigError(f"img_size must be a multiple of 32 (the detector's largest stride), got {self.img_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be > 0 (a finite number), got {self.lr}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s must be > 0 or unset, got {self.time_budget_s}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the run in [0, 1), got {self.warmup}")


class ModelEMA:
    """Exponential moving average of a model's weights and buffers (YOLOv6's ``ModelEMA``).

    Example:
        >>> m = nn.Linear(2, 2); ema = ModelEMA(m, tau=1.0)
        >>> with torch.no_grad(): _ = m.weight.add_(1.0)
        >>> ema.update(m); bool((ema.module.weight != m.weight).any())
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights in."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


@dataclass
class DetectFitResult:
    """What a training run produced."""

    model: nn.Module
    history: list[dict[str, float]]
    train_seconds: float
    steps: int
    epochs_done: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no model)."""
        return {"train_seconds": round(self.train_seconds, 1), "steps": self.steps,
                "epochs_done": round(self.epochs_done, 2), "metrics": self.metrics, "history": self.history}


def _loader(ds: DetectionDataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=detection_collate,
                      generator=g, drop_last=False)


def _lr_factor(progress: float, warmup: float, final: float) -> float:
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    span = max(1e-8, 1 - warmup)
    p = min(1.0, (progress - warmup) / span)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))


def fit_detector(model: YOLOv6, train: BoxSet, cfg: DetectTrainConfig, val: BoxSet | None = None,
                 teacher: nn.Module | None = None, on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> DetectFitResult:
    """Train ``model`` on ``train``; returns the EMA (or last) weights, history and COCO metrics on ``val``.

    Args:
        model: A :class:`~frugalvision.detect.yolov6.YOLOv6` (or any module with ``forward_raw`` and the same loss
            interface).
        train: Training boxes (tile large images first with :func:`~frugalvision.data.detection.tile_boxset`).
        cfg: Settings.
        val: Evaluated every ``cfg.eval_every`` epochs and at the end.
        teacher: A trained detector of the same head layout for self-distillation (kept frozen).
        on_epoch: Called with ``(epoch, record)`` after each epoch.
    """
    if len(train) == 0:
        raise DataError("the training set is empty: no images to train the detector on")
    if train.num_boxes() == 0:
        raise DataError("the training set has no boxes: a detector cannot learn from images without objects only")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp = _amp_dtype(cfg.amp, device)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    ds = DetectionDataset(train, img_size=cfg.img_size, train=True, seed=cfg.seed, **cfg.augment)
    loader = _loader(ds, cfg.batch_size, True, cfg.num_workers, cfg.seed)
    crit = DetectionLoss(model.num_classes, model.iou_type, model.reg_max, warmup_epochs=cfg.atss_epochs)
    opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                          nesterov=cfg.optimizer == "sgd", betas=(cfg.momentum, 0.999))
    ema = ModelEMA(model, tau=cfg.ema_tau) if cfg.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    planned = cfg.epochs * len(loader)
    history: list[dict[str, float]] = []
    step, start, stop = 0, time.perf_counter(), False
    epoch = 0
    bar = _progress(range(planned), "train detector", cfg.progress, total=planned)
    it = iter(bar) if cfg.progress else None
    for epoch in range(cfg.epochs):
        ds.set_epoch(epoch)
        sums: dict[str, float] = {}
        n = 0
        for images, targets in loader:
            elapsed = time.perf_counter() - start
            progress = step / planned
            if cfg.time_budget_s:
                progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                stop = True
                break
            factor = _lr_factor(progress, cfg.warmup, cfg.final_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor
            images = images.to(device, non_blocking=True)
            with _autocast(device, amp):
                out = model.forward_raw(images)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher.forward_raw(images)
                distill = {"epoch": epoch, "epochs": cfg.epochs, **cfg.distill_weight}
                loss, parts = crit(out, targets, epoch=epoch, teacher=t_out, distill=distill)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"the detection loss became {loss.item()} at step {step} (epoch {epoch}); "
                                            "lower lr or use amp=none; nothing was saved")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if it is not None:
                next(it, None)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cfg.lr * factor:.2e}")
        record = {"epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 2),
                  **{k: round(v / max(n, 1), 5) for k, v in sums.items()}}
        eval_model = ema.module if ema is not None else model
        if val is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and not stop:
            m = evaluate_detector(eval_model, val, cfg.img_size, batch_size=cfg.batch_size, device=device,
                                  progress=False)
            record.update(AP=m["AP"], AP50=m["AP50"])
            model.train()
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if stop:
            break
    if cfg.progress:
        bar.close()
    seconds = time.perf_counter() - start
    final = (ema.module if ema is not None else model).eval()
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics = evaluate_detector(final, val, cfg.img_size, batch_size=cfg.batch_size, device=device,
                                    conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres, max_det=cfg.max_det,
                                    progress=cfg.progress)
    return DetectFitResult(final, history, seconds, step, step / max(1, len(loader)), metrics)


@torch.no_grad()
def predict_boxset(model: nn.Module, boxset: BoxSet, img_size: int, batch_size: int = 8,
                   device: str | torch.device = "auto", conf_thres: float = 0.001, iou_thres: float = 0.65,
                   max_det: int = 300, progress: bool = True,
                   extra: Callable[[torch.Tensor, list[dict[str, torch.Tensor]]], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Detections of every sample of ``boxset`` in its own pixel coordinates (``image_id`` added).

    ``extra(images, dets)`` may add fields (e.g. masks) to each detection dict before boxes are mapped back.
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    ds = DetectionDataset(boxset, img_size=img_size, train=False)
    loader = _loader(ds, batch_size, False, 0, 0)
    results: list[dict[str, Any]] = []
    for images, targets in _progress(loader, "detect", progress, total=len(loader)):
        images = images.to(device)
        dets = postprocess(model(images), conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
        if extra is not None:
            extra(images, dets)
        for det, tgt in zip(dets, targets, strict=True):
            out = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in det.items()}
            boxes = torch.as_tensor(to_original(out["boxes"], tgt)).float()
            w, h = tgt["orig_size"]  # boxes clipped to the sample, as every output box should be
            out["boxes"] = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                        boxes[:, 3].clamp(0, h)), 1) if len(boxes) else boxes
            out["image_id"] = int(tgt["image_id"])
            results.append(out)
    return results


def coco_results(boxset: BoxSet, dets: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO result dicts of :func:`predict_boxset` output (masks, when present, as RLE)."""
    out: list[dict[str, Any]] = []
    for d in dets:
        masks = d.get("masks")
        out.extend(detections_to_coco(d["image_id"], d, masks=None if masks is None else np.asarray(masks)))
    return out


def evaluate_detector(model: nn.Module, boxset: BoxSet, img_size: int, batch_size: int = 8,
                      device: str | torch.device = "auto", conf_thres: float = 0.001, iou_thres: float = 0.65,
                      max_det: int = 300, progress: bool = True, with_results: bool = False) -> dict[str, Any]:
    """COCO box metrics (AP, AP50, AP75, AP_small/medium/large, AR100; pycocotools) of ``model`` on ``boxset``."""
    dets = predict_boxset(model, boxset, img_size, batch_size, device, conf_thres, iou_thres, max_det, progress)
    results = coco_results(boxset, dets)
    with tempfile.TemporaryDirectory() as tmp:
        gt = write_coco(boxset, Path(tmp) / "gt.json")
        gt_dict = json.loads(Path(gt).read_text())
    metrics = coco_metrics(gt_dict, results, iou_type="bbox")
    if with_results:
        metrics["results"] = results
    return metrics


def config_dict(cfg: DetectTrainConfig) -> dict[str, Any]:
    """The config as JSON-able values."""
    return asdict(cfg)

"""torchvision detectors as baselines, trained and evaluated exactly like ours (data, input size, budget, metrics).

:func:`build_baseline` makes one of :data:`BASELINES` from scratch (``weights=None, weights_backbone=None``, the
same rule as ours: nothing pre-trained, nothing downloaded) and wraps it in a :class:`TorchvisionDetector` that
speaks our conventions: images ``(B, 3, S, S)`` in ``[0, 1]`` as :class:`~frugalvision.data.detection.
DetectionDataset` letterboxes them, boxes ``xyxy`` in those pixels, class indices ``0..K-1``. The wrapper converts
labels to and from each model's own convention (checked in torchvision's code, not its docs):

============================================  ===========================  ============  ===========
model                                         classifier                   num_classes   labels
============================================  ===========================  ============  ===========
``fasterrcnn_mobilenet_v3_large_fpn``         softmax, class 0 background  ``K + 1``     ``1..K``
``ssdlite320_mobilenet_v3_large``             softmax, class 0 background  ``K + 1``     ``1..K``
``retinanet_resnet50_fpn``                    sigmoid (focal loss)         ``K``         ``0..K-1``
============================================  ===========================  ============  ===========

(RetinaNet's docs say "including the background", but its loss one-hot-encodes ``labels`` straight into the
``num_classes`` sigmoid channels and its post-processing keeps every channel: a background slot would only be a
channel that never gets a positive target.)

Input size: every model's own resize is made a no-op at ``img_size``: ``min_size = max_size = img_size`` for
Faster R-CNN and RetinaNet, and SSDlite's fixed 320x320 input becomes ``img_size x img_size`` (its default boxes are
relative to the image, its backbone is fully convolutional); ``native_size=True`` keeps SSDlite at 320 instead
(then :attr:`TorchvisionDetector.input_size` says so). The models keep their own normalisation (ImageNet mean/std;
``[-1, 1]`` for SSDlite), anchors and NMS IoU thresholds; their score threshold and detection cap are set to ours
(``conf_thres=0.001``, ``max_det=300`` for COCO evaluation), see :meth:`TorchvisionDetector.set_postprocess`.

:func:`fit_baseline` is :func:`~frugalvision.detect.train.fit_detector`'s loop with the model's own losses: the
same augmentation, optimiser (SGD with Nesterov or AdamW, no decay on 1-D tensors), progress-based warm-up + cosine
(``progress = max(step fraction, time fraction)``), gradient clipping, AMP and EMA settings of the
:class:`~frugalvision.detect.train.DetectTrainConfig`. :func:`predict_baseline` and :func:`evaluate_baseline`
give what :func:`~frugalvision.detect.train.predict_boxset` and :func:`~frugalvision.detect.train.evaluate_detector`
give, through the same COCO code.

Example:
    >>> from frugalvision.detect.baselines import build_baseline
    >>> det = build_baseline("ssdlite320_mobilenet_v3_large", num_classes=2, img_size=64)
    >>> det.label_offset, det.input_size, det.model.head.classification_head.num_columns  # K + background
    (1, 64, 3)
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.detection import BoxSet, DetectionDataset, to_original, write_coco
from ..engine.trainer import _amp_dtype, _autocast, _progress, build_optimizer, resolve_device, seed_everything
from ..errors import ConfigError, DataError, TrainingDivergedError
from .coco_eval import coco_metrics
from .train import DetectFitResult, DetectTrainConfig, ModelEMA, _loader, _lr_factor, coco_results

__all__ = [
    "BASELINES",
    "TorchvisionDetector",
    "build_baseline",
    "evaluate_baseline",
    "fit_baseline",
    "images_seen",
    "predict_baseline",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    background: bool  #: the classifier has a background class 0 (num_classes = K + 1, labels 1..K)
    fixed_size: bool  #: the model resizes to a fixed size (SSD) rather than min_size/max_size
    score_attr: str  #: where the score threshold lives ("roi_heads." prefix: on model.roi_heads)
    cap_attr: str
    nms_attr: str
    #: smallest trainable batch: SSDlite's last extra layers are BatchNorms on 1x1 maps, which need 2 images
    min_batch: int = 1


#: The baselines and their conventions.
_SPECS: dict[str, _Spec] = {
    "fasterrcnn_mobilenet_v3_large_fpn": _Spec(True, False, "roi_heads.score_thresh", "roi_heads.detections_per_img",
                                               "roi_heads.nms_thresh"),
    "ssdlite320_mobilenet_v3_large": _Spec(True, True, "score_thresh", "detections_per_img", "nms_thresh", 2),
    "retinanet_resnet50_fpn": _Spec(False, False, "score_thresh", "detections_per_img", "nms_thresh"),
}
#: Names accepted by :func:`build_baseline`.
BASELINES: tuple[str, ...] = tuple(_SPECS)


def _owner(model: nn.Module, attr: str) -> tuple[Any, str]:
    *path, name = attr.split(".")
    obj: Any = model
    for p in path:
        obj = getattr(obj, p)
    return obj, name


class TorchvisionDetector(nn.Module):
    """A torchvision detector with our conventions: square letterboxed images in ``[0, 1]``, labels ``0..K-1``.

    Train mode: ``forward(images, targets)`` (targets as :class:`~frugalvision.data.detection.DetectionDataset`
    gives them: ``boxes`` ``xyxy`` in input pixels, ``labels`` ``0..K-1``) returns the model's loss dict. Eval mode:
    ``forward(images)`` returns one dict per image with ``boxes`` (input pixels), ``scores`` and ``labels``
    (``0..K-1``).

    Attributes:
        model: The torchvision detector.
        name: Its builder's name.
        num_classes: Object classes ``K`` (without background).
        label_offset: Added to our labels to get the model's (1 with a background class, else 0).
        input_size: The square size the model runs at (after its own transform).
    """

    def __init__(self, model: nn.Module, name: str, num_classes: int, label_offset: int, input_size: int) -> None:
        super().__init__()
        self.model, self.name = model, name
        self.num_classes, self.label_offset, self.input_size = num_classes, label_offset, input_size

    def set_postprocess(self, conf_thres: float | None = None, max_det: int | None = None,
                        iou_thres: float | None = None) -> dict[str, float]:
        """Set the score threshold, detections per image and NMS IoU (None: unchanged); returns the old values.

        Example:
            >>> det = build_baseline("ssdlite320_mobilenet_v3_large", 1, 64)
            >>> det.set_postprocess(conf_thres=0.25)["conf_thres"], det.model.score_thresh
            (0.001, 0.25)
        """
        spec = _SPECS[self.name]
        old: dict[str, float] = {}
        for key, attr, value in (("conf_thres", spec.score_attr, conf_thres), ("max_det", spec.cap_attr, max_det),
                                 ("iou_thres", spec.nms_attr, iou_thres)):
            obj, name = _owner(self.model, attr)
            old[key] = getattr(obj, name)
            if value is not None:
                setattr(obj, name, int(value) if key == "max_det" else float(value))
        return old

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor],
                targets: Sequence[dict[str, Any]] | None = None) -> Any:
        """Losses (train mode, with targets) or detections with labels ``0..K-1`` (eval mode)."""
        batch = list(images)
        if self.training:
            if targets is None:
                raise ConfigError(f"{self.name} in train mode needs targets; call .eval() to detect")
            dev = batch[0].device
            own = [{"boxes": t["boxes"].to(dev, torch.float32).reshape(-1, 4),
                    "labels": t["labels"].to(dev, torch.int64) + self.label_offset} for t in targets]
            return self.model(batch, own)
        dets = self.model(batch)
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - self.label_offset} for d in dets]


def build_baseline(name: str, num_classes: int, img_size: int, native_size: bool = False, conf_thres: float = 0.001,
                   max_det: int = 300, **kwargs: Any) -> TorchvisionDetector:
    """A torchvision detector of :data:`BASELINES`, randomly initialised, running at ``img_size``.

    Args:
        name: One of :data:`BASELINES`.
        num_classes: Object classes ``K`` (the background class, where the model has one, is added here).
        img_size: The square letterboxed size the model is fed; its own resize is made a no-op at that size.
        native_size: SSDlite only: keep its fixed 320x320 input (images are resized to it, detections mapped
            back).
        conf_thres: Score threshold of the model's post-processing.
        max_det: Detections kept per image.
        **kwargs: Passed to the torchvision builder (e.g. ``nms_thresh``).

    Raises:
        ConfigError: If the name is unknown or a size or count is out of range.

    Example:
        >>> det = build_baseline("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, img_size=64)
        >>> det.model.roi_heads.box_predictor.cls_score.out_features, det.model.transform.min_size
        (4, (64,))
    """
    from torchvision.models import detection as tvd

    if name not in _SPECS:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if img_size < 32:
        raise ConfigError(f"img_size must be at least 32, got {img_size}")
    spec = _SPECS[name]
    args: dict[str, Any] = {"weights": None, "weights_backbone": None,
                            "num_classes": num_classes + 1 if spec.background else num_classes}
    if name == "fasterrcnn_mobilenet_v3_large_fpn":
        args.update(min_size=img_size, max_size=img_size, box_score_thresh=conf_thres, box_detections_per_img=max_det)
    elif name == "retinanet_resnet50_fpn":
        args.update(min_size=img_size, max_size=img_size, score_thresh=conf_thres, detections_per_img=max_det)
    else:
        args.update(score_thresh=conf_thres, detections_per_img=max_det)
    model = getattr(tvd, name)(**{**args, **kwargs})
    size = img_size
    if spec.fixed_size:
        if native_size:
            size = int(model.transform.fixed_size[0])
        else:  # default boxes are relative to the image and the network is fully convolutional
            model.transform.fixed_size = (img_size, img_size)
            model.transform.min_size, model.transform.max_size = (img_size,), img_size
    elif native_size:
        log.info("native_size only concerns SSDlite; %s runs at img_size=%d", name, img_size)
    return TorchvisionDetector(model, name, num_classes, 1 if spec.background else 0, size)


def _check_train_data(train: BoxSet) -> None:
    if len(train) == 0:
        raise DataError("the training set is empty: no images to train the detector on")
    if train.num_boxes() == 0:
        raise DataError("the training set has no boxes: a detector cannot learn from images without objects only")


def fit_baseline(model: TorchvisionDetector, train: BoxSet, cfg: DetectTrainConfig, val: BoxSet | None = None
                 ) -> DetectFitResult:
    """Train a baseline like :func:`~frugalvision.detect.train.fit_detector` trains ours (same data, schedule, budget).

    The loss is the sum of the model's own loss terms; everything else (augmentation, optimiser, warm-up + cosine on
    ``progress = max(step fraction, time fraction)``, gradient clipping, AMP, EMA) follows ``cfg``. Returns the EMA
    (or last) weights in eval mode, per-epoch mean losses, seconds, steps, and COCO metrics on ``val``.

    SSDlite cannot train on a batch of one image (BatchNorm on its 1x1 feature maps): a last batch of one image in
    an epoch is skipped for it.

    Raises:
        DataError: If the training set is empty or has no boxes.
        ConfigError: If ``cfg.batch_size`` is below the model's smallest trainable batch (SSDlite: 2).
        TrainingDivergedError: If the loss becomes non-finite (a ``FloatingPointError``).
    """
    _check_train_data(train)
    min_batch = _SPECS[model.name].min_batch
    if cfg.batch_size < min_batch:
        raise ConfigError(f"{model.name} needs batch_size >= {min_batch} to train (BatchNorm on 1x1 feature maps), "
                          f"got {cfg.batch_size}")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp = _amp_dtype(cfg.amp, device)
    model.to(device).train()
    ds = DetectionDataset(train, img_size=cfg.img_size, train=True, seed=cfg.seed, **cfg.augment)
    loader = _loader(ds, cfg.batch_size, True, cfg.num_workers, cfg.seed)
    opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                          nesterov=cfg.optimizer == "sgd", betas=(cfg.momentum, 0.999))
    ema = ModelEMA(model, tau=cfg.ema_tau) if cfg.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    planned = cfg.epochs * len(loader)
    history: list[dict[str, float]] = []
    step, start, stop = 0, time.perf_counter(), False
    bar = _progress(range(planned), f"train {model.name}", cfg.progress, total=planned)
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
            if len(images) < min_batch:
                continue
            factor = _lr_factor(progress, cfg.warmup, cfg.final_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor
            images = images.to(device, non_blocking=True)
            with _autocast(device, amp):
                parts = model(images, targets)
                loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"the {model.name} loss became {loss.item()} at step {step} "
                                            f"(epoch {epoch}); lower lr or use amp=none")
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
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if it is not None:
                next(it, None)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cfg.lr * factor:.2e}")
        history.append({"epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 2),
                        **{k: round(v / max(n, 1), 5) for k, v in sums.items()}})
        if stop:
            break
    if cfg.progress:
        bar.close()
    seconds = time.perf_counter() - start
    final = (ema.module if ema is not None else model).eval()
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics = evaluate_baseline(final, val, cfg.img_size, batch_size=cfg.batch_size, device=device,
                                    conf_thres=cfg.conf_thres, max_det=cfg.max_det, progress=cfg.progress)
    return DetectFitResult(final, history, seconds, step, step / max(1, len(loader)), metrics)


@torch.no_grad()
def predict_baseline(model: TorchvisionDetector, boxset: BoxSet, img_size: int, batch_size: int = 8,
                     device: str | torch.device = "auto", conf_thres: float = 0.001, max_det: int = 300,
                     iou_thres: float | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Detections of every sample in its own pixels, as :func:`~frugalvision.detect.train.predict_boxset` gives them.

    Args:
        model: A :class:`TorchvisionDetector`.
        boxset: The samples (letterboxed to ``img_size`` as for ours).
        img_size: Letterbox size.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        conf_thres: Score threshold.
        max_det: Detections per image.
        iou_thres: NMS IoU; None keeps the model's own (0.5 for Faster R-CNN and RetinaNet, 0.55 for SSDlite).
        progress: Progress bar.

    Returns:
        One dict per sample: ``boxes`` (float32 ``(K, 4)`` xyxy in the sample's pixels), ``scores``, ``labels``
        (``0..K-1``) and ``image_id``.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    old = model.set_postprocess(conf_thres, max_det, iou_thres)
    try:
        loader = _loader(DetectionDataset(boxset, img_size=img_size, train=False), batch_size, False, 0, 0)
        results: list[dict[str, Any]] = []
        for images, targets in _progress(loader, f"detect {model.name}", progress, total=len(loader)):
            dets = model(images.to(dev))
            for det, tgt in zip(dets, targets, strict=True):
                out = {k: v.detach().cpu() for k, v in det.items()}
                out["boxes"] = torch.as_tensor(to_original(out["boxes"].float(), tgt)).float()
                out["image_id"] = int(tgt["image_id"])
                results.append(out)
    finally:
        model.set_postprocess(old["conf_thres"], int(old["max_det"]), old["iou_thres"])
    return results


def evaluate_baseline(model: TorchvisionDetector, boxset: BoxSet, img_size: int, batch_size: int = 8,
                      device: str | torch.device = "auto", conf_thres: float = 0.001, max_det: int = 300,
                      iou_thres: float | None = None, progress: bool = True, with_results: bool = False
                      ) -> dict[str, Any]:
    """COCO box metrics of a baseline on ``boxset``, through the same code as :func:`~frugalvision.detect.train.evaluate_detector`.

    Returns ``AP``, ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``, ``AP_large``, ``AR1``, ``AR10``, ``AR100`` (percent),
    ``num_predictions``, ``summary`` and, with ``with_results``, the COCO result dicts.
    """  # noqa: E501
    dets = predict_baseline(model, boxset, img_size, batch_size, device, conf_thres, max_det, iou_thres, progress)
    results = coco_results(boxset, dets)
    with tempfile.TemporaryDirectory() as tmp:
        gt = json.loads(Path(write_coco(boxset, Path(tmp) / "gt.json")).read_text())
    metrics = coco_metrics(gt, results, iou_type="bbox")
    if with_results:
        metrics["results"] = results
    return metrics


def images_seen(steps: int, batch_size: int, dataset_size: int) -> int:
    """Training images seen in ``steps`` steps (the last batch of an epoch may be short).

    Example:
        >>> images_seen(5, 4, 10)  # epochs of 3 steps: 4 + 4 + 2, then 4 + 4
        18
    """
    per_epoch = math.ceil(dataset_size / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * dataset_size + min(rest * batch_size, dataset_size)

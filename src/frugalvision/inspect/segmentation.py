"""Defect segmentation: the training task (loss + metrics) and the segmenters (ours and baselines).

``build_segmenter("ours:<timm backbone>", ...)`` gives a :class:`~frugalvision.models.heads.SegmentationModel`;
``smp:unet``, ``smp:pspnet``, ``smp:deeplabv3plus``, ``smp:segformer`` give segmentation_models_pytorch baselines
(randomly initialised encoders: nothing downloads) for speed and quality comparisons.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..data.inspection import segmentation_transforms
from ..engine.task import MeanLoss, Metric, Task
from ..errors import ConfigError
from ..models.heads import SegmentationModel
from .metrics import SegmentationMetrics, decide

__all__ = ["SMP_ARCHS", "CachedFeatures", "DecoderOnly", "SegmentationPrediction", "SegmentationPredictor",
           "SegmentationTask", "build_segmenter", "cache_features", "check_segmenter_name", "decide", "dihedral",
           "soft_dice_loss"]

SMP_ARCHS = {"unet": "Unet", "pspnet": "PSPNet", "deeplabv3plus": "DeepLabV3Plus", "segformer": "Segformer",
             "fpn": "FPN"}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_background: bool = True) -> torch.Tensor:
    """Mean soft Dice loss over the classes present in the batch (background excluded by default).

    Example:
        >>> t = torch.tensor([[[0, 1], [1, 0]]])
        >>> perfect = F.one_hot(t, 2).permute(0, 3, 1, 2).float() * 20 - 10
        >>> float(soft_dice_loss(perfect, t)) < 1e-3
        True
    """
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    start = 1 if ignore_background else 0
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)[start:]
    denom = (probs + onehot).sum(dims)[start:]
    present = onehot.sum(dims)[start:] > 0
    if not present.any():
        return logits.sum() * 0.0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return (1 - dice[present]).mean()


class SegmentationTask(Task):
    """Per-pixel classification: cross-entropy + soft Dice; mIoU, per-class IoU, pixel AUROC, F1-max.

    Batches are dicts with ``image`` ``(N, 3, H, W)`` and ``mask`` ``(N, H, W)`` (0 = background).
    """

    main_metric = "mIoU"
    higher_is_better = True

    def __init__(self, class_names: Sequence[str], dice_weight: float = 1.0, input_key: str = "image",
                 threshold: float | None = None) -> None:
        self.class_names = list(class_names)
        self.dice_weight = dice_weight
        self.input_key = input_key
        self.threshold = threshold

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits of the batch's inputs (images, or cached backbone features)."""
        return model(batch[self.input_key])

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Cross-entropy plus weighted soft Dice."""
        target = batch["mask"]
        loss = F.cross_entropy(outputs.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(outputs, target)
        return loss

    def metrics(self) -> list[Metric]:
        """Mean loss and segmentation metrics."""
        return [MeanLoss(), SegmentationMetrics(self.class_names, threshold=self.threshold)]


def check_segmenter_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` is ``ours:<timm backbone>`` or ``smp:<arch>[:<encoder>]``.

    Unknown kinds list the valid ones; unknown backbones and architectures get the closest valid names (smp's
    encoders are smp's to check).

    Example:
        >>> check_segmenter_name("ours:resnet10t")
        >>> check_segmenter_name("ours:resnet19")
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: unknown backbone 'resnet19' in segmenter=ours:resnet19; did you mean ...
    """
    import timm

    kinds = f"ours:<timm backbone> (e.g. ours:repvgg_a0) or smp:<arch>[:<encoder>] (arch: {', '.join(SMP_ARCHS)})"
    kind, _, rest = name.partition(":")
    if kind not in ("ours", "smp"):
        raise ConfigError(f"unknown segmenter kind {kind!r} in segmenter={name}; it must look like {kinds}")
    if not rest:
        raise ConfigError(f"segmenter={name} names no {'backbone' if kind == 'ours' else 'architecture'}; it must "
                          f"look like {kinds}")
    if kind == "ours" and not timm.is_model(rest):
        close = difflib.get_close_matches(rest, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown backbone {rest!r} in segmenter={name}; {hint}`frugalvision models PATTERN` lists "
                          "ours (--all: every timm model)")
    arch = rest.partition(":")[0]
    if kind == "smp" and arch not in SMP_ARCHS:
        close = difflib.get_close_matches(arch, list(SMP_ARCHS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown smp architecture {arch!r} in segmenter={name}; {hint}choose from "
                          f"{', '.join(SMP_ARCHS)}")


def build_segmenter(name: str, num_classes: int, dim: int = 64, **kwargs: Any) -> nn.Module:
    """A segmenter by name: ``ours:<timm backbone>`` or ``smp:<arch>[:<encoder>]`` (encoder resnet18 by default).

    Example:
        >>> build_segmenter("ours:resnet10t", 3, dim=16)(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """
    check_segmenter_name(name)
    kind, _, rest = name.partition(":")
    if kind == "ours":
        return SegmentationModel(rest, num_classes, dim=dim, **kwargs)
    smp = require("segmentation_models_pytorch", "segmentation baselines", extra="seg")
    arch, _, encoder = rest.partition(":")
    return getattr(smp, SMP_ARCHS[arch])(encoder_name=encoder or "resnet18", encoder_weights=None,
                                         classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------- frozen-feature cache
def dihedral(x: torch.Tensor, d: int) -> torch.Tensor:
    """Element ``d`` (0-7) of the symmetry group of the square on the last two axes.

    ``d % 4`` quarter turns, mirrored when ``d >= 4``.

    Example:
        >>> x = torch.arange(4).view(2, 2)
        >>> [dihedral(x, d).flatten().tolist() for d in (0, 1, 4)]
        [[0, 1, 2, 3], [1, 3, 0, 2], [1, 0, 3, 2]]
    """
    x = x.rot90(d % 4, (-2, -1))
    return x.flip(-1) if d >= 4 else x


class CachedFeatures(torch.utils.data.Dataset):
    """Samples as ``{"feats": [level tensors], "mask", "label", "index"}`` from a frozen backbone's cached outputs.

    Each call draws one of the cached dihedral variants uniformly (with the trainer's per-sample RNG), which is
    the same augmentation distribution as random horizontal/vertical flips plus quarter turns on the images.
    """

    def __init__(self, feats: list[list[torch.Tensor]], masks: list[torch.Tensor], labels: list[int],
                 variants: int) -> None:
        self.feats, self.masks, self.labels, self.variants = feats, masks, labels, variants

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = int(torch.randint(self.variants, ())) if self.variants > 1 else 0
        return {"feats": [f.float() for f in self.feats[index * self.variants + d]],
                "mask": dihedral(self.masks[index], d), "label": self.labels[index], "index": index}


@torch.no_grad()
def cache_features(backbone: nn.Module, dataset: Any, variants: int = 8, batch_size: int = 32,
                   max_mb: float = 3000.0, progress: bool = True) -> CachedFeatures:
    """Run a frozen backbone once over every image (and its ``variants`` dihedral copies); keep the features.

    Training a head on a frozen backbone then costs only the head: for ``E`` epochs the backbone runs
    ``variants`` times per image instead of ``E`` times. Features are stored in float16.

    Args:
        backbone: The frozen, eval-mode backbone (``features_only``).
        dataset: A :class:`~frugalvision.data.inspection.DefectDataset` whose transform does no random
            augmentation (the variants are the augmentation).
        variants: 8 (all flips and quarter turns) or 1 (as is, for evaluation).
        batch_size: Backbone batch size.
        max_mb: Refuse (ValueError) when the cache would exceed this many MiB.
        progress: Show a progress bar.
    """
    from tqdm.auto import tqdm

    if variants not in (1, 8):
        raise ValueError(f"variants must be 1 or 8, got {variants}")
    backbone.eval()
    device = next(backbone.parameters()).device
    items = [(i, d) for i in range(len(dataset)) for d in range(variants)]
    feats: list[list[torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    labels: list[int] = []
    bar = tqdm(total=len(items), desc=f"cache features x{variants}", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        samples = {i: dataset[i] for i in sorted({i for i, _ in chunk})}
        x = torch.stack([dihedral(samples[i]["image"], d) for i, d in chunk]).to(device)
        out = backbone(x)
        for j, (i, d) in enumerate(chunk):
            feats.append([f[j].to("cpu", torch.float16) for f in out])
            if d == 0:
                masks.append(samples[i]["mask"])
                labels.append(int(samples[i]["label"]))
        if start == 0:
            per = sum(f.numel() * 2 for f in feats[0]) / 2**20
            if per * len(items) > max_mb:
                raise ValueError(f"the feature cache would take {per * len(items):.0f} MiB (> max_mb={max_mb}); "
                                 "train without it (feature_cache=false) or on fewer images")
        bar.update(len(chunk))
    bar.close()
    return CachedFeatures(feats, masks, labels, variants)


class DecoderOnly(nn.Module):
    """The trainable part of a :class:`SegmentationModel` with a frozen backbone.

    Maps cached features to logits at the mask resolution.
    """

    def __init__(self, model: SegmentationModel, out_size: int) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.out_size = out_size

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Upsampled logits."""
        logits = self.decoder(feats)
        return F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------- inference
class SegmentationPrediction(NamedTuple):
    """A segmenter's output for one image, at the image's own resolution.

    Attributes:
        classes: ``(H, W)`` uint8 class map (0 = background, k = the k-th defect class).
        score: ``(H, W)`` float32 defect score ``1 - p(background)``.
    """

    classes: np.ndarray
    score: np.ndarray


class SegmentationPredictor:
    """The one inference path of a segmenter: pre-processing, the model and the decision rule.

    Evaluation, ``frugalvision predict`` and the demo's pictures all go through it, so a stored threshold means the
    same thing everywhere: a pixel is a defect when its score ``1 - p(background)`` reaches the threshold, and its
    class is the most likely defect class (:func:`~frugalvision.inspect.metrics.decide`; without a threshold, the
    arg-max over all classes).

    Args:
        model: Maps normalised images ``(N, 3, S, S)`` to logits ``(N, C, S, S)``.
        img_size: The model's input size ``S``.
        mean: Normalisation mean (RGB, images in [0, 1]).
        std: Normalisation std.
        threshold: Defect-score threshold; arg-max when ``None``.
        device: Where the model runs.

    Example:
        >>> m = build_segmenter("ours:resnet10t", 3, dim=8).eval()
        >>> p = SegmentationPredictor(m, 64, (0.5,) * 3, (0.5,) * 3, threshold=0.5)
        >>> out = p([np.zeros((40, 50, 3), np.uint8)])[0]
        >>> out.classes.shape, out.score.dtype
        ((40, 50), dtype('float32'))
    """

    def __init__(self, model: nn.Module, img_size: int, mean: Sequence[float], std: Sequence[float],
                 threshold: float | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.img_size = int(img_size)
        self.transform = segmentation_transforms(self.img_size, train=False, mean=mean, std=std)
        self.threshold = threshold

    @classmethod
    def from_model(cls, model: nn.Module, info: Mapping[str, Any], threshold: float | None = None,
                   device: str | torch.device = "cpu") -> SegmentationPredictor:
        """From a segmentation model file's model and description; its stored threshold unless one is given."""
        thr = threshold if threshold is not None else info.get("threshold")
        return cls(model, int(info["img_size"]), info["mean"], info["std"], thr, device)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(H, W, 3)`` uint8 images -> a normalised batch at the model's size (the evaluation transform)."""
        return torch.stack([self.transform.image(torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1))
                            for a in images]).to(self.device)

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C, S, S)`` of a normalised batch."""
        return self.model(x.to(self.device)).float().softmax(1)

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class map and defect score of probabilities ``(N, C, H, W)``."""
        return decide(probs, self.threshold), 1 - probs[:, 0]

    #: Above this many upsampled values (classes x height x width) the outputs are made in row strips of this
    #: size: the same bilinear rule, bounded memory (an 8000x8000 image no longer holds C full-size float maps).
    strip_elements: int = 1 << 24

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[SegmentationPrediction]:
        """Predict ``(H, W, 3)`` uint8 images of any sizes; outputs at each image's resolution."""
        probs = self.probs(self.preprocess(images))
        out = []
        for a, p in zip(images, probs, strict=True):
            h, w = a.shape[:2]
            if p.shape[0] * h * w <= self.strip_elements:
                p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)
                cls, score = self.decide(p)
                out.append(SegmentationPrediction(cls[0].cpu().numpy().astype(np.uint8), score[0].cpu().numpy()))
            else:
                out.append(self._decide_in_strips(p.cpu(), h, w))
        return out

    def _decide_in_strips(self, p: torch.Tensor, h: int, w: int) -> SegmentationPrediction:
        """Bilinear upsampling (``align_corners=False``) and the decision, ``rows`` output rows at a time."""
        y0, y1, ly = _bilinear_taps(p.shape[1], h)
        x0, x1, lx = _bilinear_taps(p.shape[2], w)
        classes = np.empty((h, w), np.uint8)
        score = np.empty((h, w), np.float32)
        rows = max(1, self.strip_elements // (p.shape[0] * w))
        for r in range(0, h, rows):
            sl = slice(r, min(h, r + rows))
            ry = ly[sl].view(1, -1, 1)
            band = p[:, y0[sl]] * (1 - ry) + p[:, y1[sl]] * ry  # (C, R, w_in)
            up = band[:, :, x0] * (1 - lx) + band[:, :, x1] * lx  # (C, R, W)
            cls, sc = self.decide(up[None])
            classes[sl] = cls[0].numpy().astype(np.uint8)
            score[sl] = sc[0].numpy()
        return SegmentationPrediction(classes, score)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of PyTorch's bilinear resize with ``align_corners=False`` along one axis."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, (src - i0).float()

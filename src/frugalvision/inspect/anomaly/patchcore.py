"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aware patch features of defect-free images.

The split follows the usual one between a pure model and its fitting loop:

* :class:`PatchCoreModel` is a plain ``nn.Module`` whose ``forward(images)`` does everything — normalisation,
  frozen backbone, patch embedding, chunked nearest-neighbour search against the memory bank (a buffer),
  image score with the paper's re-weighting, bilinear upsampling and Gaussian smoothing — so one ONNX graph goes
  from an image to :class:`~frugalvision.inspect.anomaly.AnomalyOutput`.
* :func:`fit_patchcore` extracts the patch features of the training images and fills the bank with a greedy
  k-center coreset (:func:`greedy_coreset`) of bounded size.

Patch features: the outputs of two mid-level stages of any timm ``features_only`` backbone (ours included;
for ResNets these are ``layer2`` and ``layer3``), each averaged over its 3x3 neighbourhood, the deeper one
upsampled bilinearly to the finer grid, concatenated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError, DataError
from .base import AnomalyOutput

__all__ = [
    "PatchCoreFit",
    "PatchCoreModel",
    "fit_patchcore",
    "gaussian_kernel1d",
    "greedy_coreset",
    "load_patchcore",
    "save_patchcore",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``2 * int(4 sigma + 0.5) + 1`` taps (the 2-D blur is its outer product).

    Example:
        >>> k = gaussian_kernel1d(4.0); k.numel(), round(float(k.sum()), 6)
        (33, 1.0)
    """
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def _sq_dist(x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(n, m)`` between rows of ``x`` and ``y`` (``y_sq``: squared norms of ``y``)."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * (x @ y.T) + y_sq).clamp_min(0)


class PatchCoreModel(nn.Module):
    """PatchCore as one exportable module: images in [0, 1] -> ``AnomalyOutput(pred_score, anomaly_map)``.

    Args:
        backbone: timm model name (ours included; ``features_only`` is used) or a ready features-only module.
        layers: Two (or more) feature indices of the backbone (``feature_info``), finest first; ``(2, 3)`` are
            strides 8 and 16 (``layer2``/``layer3`` of a ResNet).
        img_size: Input resolution (square); the anomaly map has this size.
        bank_size: Rows of the memory bank (0 until fitted; a saved model passes its size).
        num_neighbors: Neighbours of the re-weighting of the image score (paper eq. 7); 1 = plain max patch score.
        sigma: Standard deviation (in output pixels) of the Gaussian smoothing of the map.
        chunk_size: Memory-bank rows compared per step of the nearest-neighbour search (bounds peak memory to
            ``batch * patches * chunk_size`` distances).
        mean: Normalisation mean (applied inside the model).
        std: Normalisation std.

    Example:
        >>> m = PatchCoreModel("resnet18", layers=(2, 3), img_size=64, bank_size=10)
        >>> out = m(torch.rand(2, 3, 64, 64)); out.pred_score.shape, out.anomaly_map.shape
        (torch.Size([2]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(self, backbone: str | nn.Module = "repvgg_a0", layers: Sequence[int] = (2, 3), img_size: int = 128,
                 bank_size: int = 0, num_neighbors: int = 9, sigma: float = 4.0, chunk_size: int = 2048,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if len(layers) < 2:
            raise ConfigError(f"PatchCore uses two or more backbone stages, got layers={list(layers)}")
        if num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1, got {num_neighbors}")
        radius = int(4.0 * sigma + 0.5)
        if img_size <= radius:
            raise ConfigError(f"img_size={img_size} is too small for a Gaussian of sigma {sigma} (needs > {radius})")
        if isinstance(backbone, str):
            import timm

            from ... import models  # noqa: F401  (registers our architectures with timm)

            try:
                backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(layers))
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ConfigError(f"cannot build backbone {backbone!r} with feature indices {list(layers)}: "
                                  f"{exc}") from None
        self.backbone = backbone.eval().requires_grad_(False)
        self.layers = tuple(int(i) for i in layers)
        self.img_size = int(img_size)
        self.num_neighbors = int(num_neighbors)
        self.sigma = float(sigma)
        self.chunk_size = int(chunk_size)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.feature_dim = int(sum(self.backbone.feature_info.channels()))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("blur", gaussian_kernel1d(sigma))
        # the bank is stored centred on its mean (distances do not change; float32 cancellation does)
        self.register_buffer("memory_bank", torch.zeros(bank_size, self.feature_dim))
        self.register_buffer("bank_center", torch.zeros(self.feature_dim))
        self.register_buffer("bank_sq", torch.zeros(bank_size))

    def train(self, mode: bool = True) -> PatchCoreModel:
        """The backbone stays in eval mode (frozen BN statistics) whatever ``mode`` is."""
        super().train(mode)
        self.backbone.eval()
        return self

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Replace the memory bank with the patch features ``bank`` ``(M, feature_dim)``."""
        if bank.ndim != 2 or bank.shape[1] != self.feature_dim or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be (M > 0, {self.feature_dim}), got {tuple(bank.shape)}")
        bank = bank.detach().to(self.memory_bank.device, torch.float32)
        self.bank_center = bank.mean(0)
        self.memory_bank = (bank - self.bank_center).contiguous()
        self.bank_sq = self.memory_bank.pow(2).sum(1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, C, h, w)`` of images in [0, 1]."""
        feats = self.backbone((images - self.mean) / self.std)
        first = self.pool(feats[0])
        size = first.shape[-2:]
        rest = [F.interpolate(self.pool(f), size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return torch.cat([first, *rest], 1)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest memory-bank row for each row of ``queries`` ``(n, C)``.

        ``queries`` are centred like the bank (patch features minus ``bank_center``).

        The bank is scanned in chunks of ``chunk_size`` rows, so memory stays bounded for any bank size.
        """
        n_bank = self.memory_bank.shape[0]
        best_d: torch.Tensor | None = None
        best_i = torch.zeros(0, dtype=torch.long)
        q_sq = queries.pow(2).sum(-1, keepdim=True)
        for start in range(0, n_bank, self.chunk_size):
            bank = self.memory_bank[start : start + self.chunk_size]
            d = (q_sq - 2 * (queries @ bank.T) + self.bank_sq[start : start + self.chunk_size]).clamp_min(0)
            d_min, i_min = d.min(1)
            if best_d is None:
                best_d, best_i = d_min, i_min + start
            else:
                take = d_min < best_d
                best_i = torch.where(take, i_min + start, best_i)
                best_d = torch.minimum(best_d, d_min)
        # the expansion above cancels badly in float32 when the distance is small against the norms: it only
        # picks the neighbour; the distance itself is recomputed directly (stable, and equal across backends)
        exact = (queries - self.memory_bank[best_i]).pow(2).sum(-1)
        return exact.sqrt(), best_i  # type: ignore[return-value]

    def _image_score(self, patch_scores: torch.Tensor, locations: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Max patch score, re-weighted by how isolated its nearest bank row is (paper eq. 7)."""
        score, top = patch_scores.max(1)
        if self.num_neighbors == 1:
            return score
        top_feat = torch.gather(emb, 1, top.view(-1, 1, 1).expand(-1, 1, emb.shape[-1]))[:, 0]  # m_test*
        nn_idx = torch.gather(locations, 1, top.view(-1, 1))[:, 0]
        nn_feat = self.memory_bank[nn_idx]  # m*
        k = min(self.num_neighbors, self.memory_bank.shape[0])
        support = _sq_dist(nn_feat, self.memory_bank, self.bank_sq).topk(k, dim=1, largest=False).indices  # N_b(m*)
        d = (top_feat[:, None, :] - self.memory_bank[support]).pow(2).sum(-1).clamp_min(0).sqrt()
        weight = 1 - d.softmax(1)[:, 0]
        return weight * score

    def smooth(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """``(B, 1, h, w)`` patch scores -> bilinear upsampling to ``img_size`` -> separable Gaussian (reflect)."""
        amap = F.interpolate(patch_scores, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        r = self.blur.numel() // 2
        amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), self.blur.view(1, 1, 1, -1))
        return F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), self.blur.view(1, 1, -1, 1))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, img_size, img_size)`` in [0, 1] (RGB, unnormalised)."""
        emb = self.embed(images)
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, c) - self.bank_center
        dist, loc = self.nearest(flat.reshape(b * h * w, c))
        patch_scores, locations = dist.view(b, h * w), loc.view(b, h * w)
        pred_score = self._image_score(patch_scores, locations, flat)
        return AnomalyOutput(pred_score, self.smooth(patch_scores.view(b, 1, h, w)))


def greedy_coreset(features: torch.Tensor, k: int, projection_dim: int | None = 128, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Indices of a greedy k-center coreset of the rows of ``features`` (paper Alg. 1).

    Distances are computed after a Gaussian random projection to ``projection_dim`` dimensions (as the paper; none
    when ``None`` or not smaller). Each step is one fused matrix-vector product (``||f||^2 - 2 f.c + ||c||^2``),
    an in-place minimum and an argmax over the running distances: O(N * d) per selected row, no N x N matrix.

    Example:
        >>> x = torch.cat([torch.zeros(50, 4), torch.ones(1, 4) * 10])  # one far outlier
        >>> idx = greedy_coreset(x, 2, projection_dim=None); bool((idx == 50).any())
        True
    """
    n = features.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {k}")
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    sq = x.pow(2).sum(1)
    selected = torch.empty(k, dtype=torch.long)
    idx = int(torch.randint(n, (1,), generator=g))
    selected[0] = idx
    min_d = torch.full((n,), float("inf"), device=x.device)
    from tqdm.auto import tqdm

    for j in tqdm(range(1, k), desc="coreset", disable=not progress, dynamic_ncols=True, leave=False):
        c = x[idx]
        d = torch.addmv(sq, x, c, alpha=-2.0).add_(c.dot(c))  # squared distances to the new center
        torch.minimum(min_d, d, out=min_d)
        idx = int(torch.argmax(min_d))
        selected[j] = idx
    return selected


@dataclass
class PatchCoreFit:
    """What fitting measured: sizes and wall-clock seconds of each stage."""

    train_images: int
    patches: int
    bank_size: int
    feature_dim: int
    extract_s: float
    coreset_s: float
    total_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def fit_patchcore(model: PatchCoreModel, images: Iterable[torch.Tensor], coreset_ratio: float = 0.1,
                  max_bank: int | None = 16384, projection_dim: int | None = 128, seed: int = 0,
                  progress: bool = True) -> PatchCoreFit:
    """Fill ``model``'s memory bank from defect-free images.

    Args:
        model: The model (its bank is replaced).
        images: Batches ``(B, 3, H, W)`` in [0, 1] at the model's resolution (e.g. a DataLoader's images).
        coreset_ratio: Fraction of all training patches kept in the bank.
        max_bank: Upper bound on the bank size (``None``: no bound).
        projection_dim: Dimension of the random projection used by the coreset selection.
        seed: Seed of the projection and the first center.
        progress: Show progress bars.

    Example:
        >>> m = PatchCoreModel("resnet18", layers=(2, 3), img_size=64)
        >>> fit = fit_patchcore(m, [torch.rand(2, 3, 64, 64)], coreset_ratio=0.25, progress=False)
        >>> fit.patches, fit.bank_size, tuple(m.memory_bank.shape)
        (128, 32, (32, 384))
    """
    from tqdm.auto import tqdm

    if not 0 < coreset_ratio <= 1:
        raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
    model.eval()
    device = model.memory_bank.device
    t0 = time.perf_counter()
    chunks: list[torch.Tensor] = []
    n_img = 0
    for batch in tqdm(images, desc="features", disable=not progress, dynamic_ncols=True, leave=False):
        x = batch.to(device, torch.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (model.img_size, model.img_size):
            raise DataError(f"training batch has shape {tuple(x.shape)}; expected (B, 3, {model.img_size}, "
                            f"{model.img_size}) images in [0, 1]")
        emb = model.embed(x)
        chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        n_img += x.shape[0]
    if not chunks:
        raise DataError("no training images: PatchCore needs defect-free images to build its memory bank")
    feats = torch.cat(chunks)
    del chunks
    t1 = time.perf_counter()
    k = max(1, int(feats.shape[0] * coreset_ratio))
    if max_bank is not None:
        k = min(k, int(max_bank))
    if k < feats.shape[0]:
        idx = greedy_coreset(feats, k, projection_dim, seed, progress).to(feats.device)
        bank = feats[idx]
    else:
        bank = feats
    model.set_memory_bank(bank)
    t2 = time.perf_counter()
    return PatchCoreFit(n_img, int(feats.shape[0]), int(bank.shape[0]), int(bank.shape[1]), t1 - t0, t2 - t1, t2 - t0)


# --------------------------------------------------------------------------------------------- files
def _model_kwargs(model: PatchCoreModel, backbone: str) -> dict[str, Any]:
    return {"backbone": backbone, "layers": list(model.layers), "img_size": model.img_size,
            "bank_size": int(model.memory_bank.shape[0]), "num_neighbors": model.num_neighbors, "sigma": model.sigma,
            "chunk_size": model.chunk_size, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}


def save_patchcore(model: PatchCoreModel, path: str | Path, backbone: str, fused: bool = False, **meta: Any) -> Path:
    """Save a fitted model (weights + memory bank, safetensors) with what rebuilds it and free ``meta``.

    ``backbone`` is the timm name the model was built from; ``fused``: its backbone was re-parameterised.
    """
    from ...models import save_model_file

    if model.memory_bank.shape[0] == 0:
        raise ConfigError("the model has an empty memory bank; fit it before saving")
    return save_model_file(model, path, "patchcore", _model_kwargs(model, backbone), fused_backbone=fused,
                           task="anomaly", method="patchcore", **meta)


def load_patchcore(path: str | Path) -> tuple[PatchCoreModel, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_patchcore`; returns it (eval mode) and its stored description."""
    from ...engine.checkpoint import load_state_dict_file
    from ...models.factory import read_model_info

    info = read_model_info(path)
    if info.get("name") != "patchcore":
        raise CheckpointError(f"{path} is not a PatchCore model file (it holds {info.get('name')!r})")
    model = PatchCoreModel(**info["model_kwargs"])
    if info.get("fused_backbone"):
        from timm.utils import reparameterize_model

        model.backbone = reparameterize_model(model.backbone).requires_grad_(False)
    sd = load_state_dict_file(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its model description: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    return model.eval(), info

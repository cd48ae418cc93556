"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aware patch features of defect-free images.

The split follows the usual one between a pure model and its fitting loop:

* :class:`PatchCoreModel` is a plain ``nn.Module`` whose ``forward(images)`` does everything — normalisation,
  frozen backbone, patch embedding, chunked nearest-neighbour search against the memory bank (a buffer),
  image score with the paper's re-weighting, bilinear upsampling and Gaussian smoothing — so one ONNX graph goes
  from an image to :class:`~frugalvision.inspect.anomaly.AnomalyOutput`.
* Fitting (:func:`frugalvision.inspect.anomaly.training.fit_patchcore`) extracts the patch features of the
  training images and fills the bank with a greedy k-center coreset of bounded size.

Patch features: the outputs of two mid-level stages of any timm ``features_only`` backbone (ours included;
for ResNets these are ``layer2`` and ``layer3``), each averaged over its 3x3 neighbourhood, the deeper one
upsampled bilinearly to the finer grid, concatenated.

Model files: ``save_model_file(model, path, "patchcore", "patchcore", model.model_kwargs(), **meta)``;
``frugalvision.weights.load_model_file`` rebuilds the model through :func:`build_patchcore`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ...errors import ConfigError
from ...utils.filters import gaussian_blur, gaussian_kernel1d
from .base import AnomalyOutput

__all__ = ["PatchCoreModel", "build_patchcore"]


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
        fused: Re-parameterise the backbone right away (:meth:`fuse_backbone`); a model file of a fused model
            rebuilds it this way before its weights are loaded.

    Example:
        >>> m = PatchCoreModel("resnet18", layers=(2, 3), img_size=64, bank_size=10)
        >>> out = m(torch.rand(2, 3, 64, 64)); out.pred_score.shape, out.anomaly_map.shape
        (torch.Size([2]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(self, backbone: str | nn.Module = "repvgg_a0", layers: Sequence[int] = (2, 3), img_size: int = 128,
                 bank_size: int = 0, num_neighbors: int = 9, sigma: float = 4.0, chunk_size: int = 2048,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 fused: bool = False) -> None:
        super().__init__()
        if len(layers) < 2:
            raise ConfigError(f"PatchCore uses two or more backbone stages, got layers={list(layers)}")
        if num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1, got {num_neighbors}")
        blur = gaussian_kernel1d(sigma)
        radius = blur.numel() // 2
        if img_size <= radius:
            raise ConfigError(f"img_size={img_size} is too small for a Gaussian of sigma {sigma} (needs > {radius})")
        self.backbone_name = backbone if isinstance(backbone, str) else None
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
        self.register_buffer("blur", blur)
        # the bank is stored centred on its mean (distances do not change; float32 cancellation does)
        self.register_buffer("memory_bank", torch.zeros(bank_size, self.feature_dim))
        self.register_buffer("bank_center", torch.zeros(self.feature_dim))
        self.register_buffer("bank_sq", torch.zeros(bank_size))
        self.fused = False
        if fused:
            self.fuse_backbone()

    def train(self, mode: bool = True) -> PatchCoreModel:
        """The backbone stays in eval mode (frozen BN statistics) whatever ``mode`` is."""
        super().train(mode)
        self.backbone.eval()
        return self

    def fuse_backbone(self) -> PatchCoreModel:
        """Re-parameterise the frozen backbone (timm folds multi-branch blocks and conv + BN): same features, faster."""
        from timm.utils import reparameterize_model

        self.backbone = reparameterize_model(self.backbone).requires_grad_(False)
        self.fused = True
        return self

    def model_kwargs(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture (stored in its model file).

        Raises:
            ConfigError: The memory bank is empty (nothing to save before fitting), or the backbone was given as a
                module (its timm name is unknown).
        """
        if self.memory_bank.shape[0] == 0:
            raise ConfigError("the model has an empty memory bank; fit it before saving")
        if self.backbone_name is None:
            raise ConfigError("the backbone was given as a module: build PatchCoreModel from its timm name to save it")
        return {"backbone": self.backbone_name, "layers": list(self.layers), "img_size": self.img_size,
                "bank_size": int(self.memory_bank.shape[0]), "num_neighbors": self.num_neighbors,
                "sigma": self.sigma, "chunk_size": self.chunk_size, "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(), "fused": self.fused}

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
        return gaussian_blur(amap, self.blur, padding="reflect")

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, img_size, img_size)`` in [0, 1] (RGB, unnormalised)."""
        emb = self.embed(images)
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, c) - self.bank_center
        dist, loc = self.nearest(flat.reshape(b * h * w, c))
        patch_scores, locations = dist.view(b, h * w), loc.view(b, h * w)
        pred_score = self._image_score(patch_scores, locations, flat)
        return AnomalyOutput(pred_score, self.smooth(patch_scores.view(b, 1, h, w)))


def build_patchcore(info: Mapping[str, Any]) -> PatchCoreModel:
    """The architecture of a ``patchcore`` model file (weights and memory bank not loaded); the kind's build function.

    Files written before model-file kinds existed recorded a fused backbone as ``fused_backbone`` beside the
    constructor arguments; both forms are read.

    Example:
        >>> m = PatchCoreModel("resnet18", layers=(2, 3), img_size=64, bank_size=4)
        >>> m.set_memory_bank(torch.rand(4, m.feature_dim))
        >>> build_patchcore({"model_kwargs": m.model_kwargs()}).memory_bank.shape
        torch.Size([4, 384])
    """
    kwargs = dict(info["model_kwargs"])
    kwargs.setdefault("fused", bool(info.get("fused_backbone", False)))
    return PatchCoreModel(**kwargs)

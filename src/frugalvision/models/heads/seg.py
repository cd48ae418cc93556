"""A light segmentation model for any timm backbone: multi-scale features -> all-MLP decoder -> per-pixel logits.

The decoder follows SegFormer's all-MLP design: each feature level is projected to ``dim`` channels by a
1x1 conv + BN + ReLU, upsampled to the finest level, concatenated, fused by another 1x1 conv + BN + ReLU and
classified by a 1x1 conv; logits are upsampled to the input size. Every conv is followed by a BN that
``frugalvision.fuse``/``timm.utils.reparameterize_model`` can fold, and the backbone is a plain
``features_only`` timm model, so ours (FasterViT, EfficientMod, EfficientRep) and timm's all plug in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLPDecoder", "SegmentationModel", "build_segmentation_model"]


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MLPDecoder(nn.Module):
    """SegFormer-style all-MLP decoder over feature maps of decreasing resolution.

    Example:
        >>> dec = MLPDecoder([16, 32], num_classes=3, dim=8)
        >>> dec([torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.ModuleList(_ConvBNReLU(c, dim) for c in in_channels)
        self.fusion = _ConvBNReLU(dim * len(in_channels), dim)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits at the resolution of the first (finest) feature map."""
        size = feats[0].shape[-2:]
        ups = [
            p(f) if f.shape[-2:] == size else F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            for p, f in zip(self.proj, feats, strict=True)
        ]
        return self.classifier(self.drop(self.fusion(torch.cat(ups, dim=1))))


class SegmentationModel(nn.Module):
    """Backbone (timm ``features_only``) + :class:`MLPDecoder`; returns logits ``(N, classes, H, W)``.

    Args:
        backbone: timm model name (ours included) or a ready ``features_only`` module with ``feature_info``.
        num_classes: Classes including background.
        dim: Decoder width.
        out_indices: Feature levels to use; when omitted, every level of stride >= 4 (stride-2 maps cost much and
            add little for defects of a few pixels and more).
        **backbone_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size``).

    Example:
        >>> m = SegmentationModel("resnet10t", num_classes=4, dim=16).eval()
        >>> m(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 4, 64, 64])
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, dim: int = 64,
                 out_indices: Sequence[int] | None = None, dropout: float = 0.1, **backbone_kwargs: Any) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        if isinstance(backbone, str):
            kw: dict[str, Any] = {"features_only": True, "pretrained": False, **backbone_kwargs}
            if out_indices is not None:
                kw["out_indices"] = tuple(out_indices)
            name = backbone
            backbone = timm.create_model(name, **kw)
            reductions = backbone.feature_info.reduction()
            if out_indices is None and min(reductions) < 4 and max(reductions) >= 4:
                keep = tuple(i for i, r in enumerate(reductions) if r >= 4)
                backbone = timm.create_model(name, **{**kw, "out_indices": keep})
        if not hasattr(backbone, "feature_info"):
            raise ValueError("the backbone must expose feature_info (create it with features_only=True)")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder = MLPDecoder(backbone.feature_info.channels(), num_classes, dim, dropout)
        self.frozen = "none"

    def freeze_backbone(self, mode: str = "all") -> None:
        """Freeze the backbone (``all``), all but its last feature stage (``partial``), or nothing (``none``).

        Frozen parts get ``requires_grad=False`` and stay in eval mode under ``.train()``, so their batch-norm
        statistics do not drift either (the Mask Frozen-DETR principle: a frozen feature extractor, a trained head).

        Example:
            >>> m = SegmentationModel("resnet10t", 2, dim=8); m.freeze_backbone("all"); _ = m.train()
            >>> any(p.requires_grad for p in m.backbone.parameters()), m.backbone.training, m.decoder.training
            (False, False, True)
        """
        if mode not in ("all", "partial", "none"):
            raise ValueError(f"freeze mode must be all, partial or none, got {mode!r}")
        self.frozen = mode
        for p in self.backbone.parameters():
            p.requires_grad_(mode == "none")
        if mode == "partial":
            for p in self._last_stage().parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def _last_stage(self) -> nn.Module:
        """The backbone's last stage.

        ``stages_N`` / ``layers_N`` / ``layerN`` of a features-only timm model, or ``stages[-1]``; else the module
        producing the last feature map.
        """
        pattern = r"(stages|layers|blocks)_\d+|layer\d+"
        staged = [m for n, m in self.backbone.named_children() if re.fullmatch(pattern, n)]
        if staged:
            return staged[-1]
        for attr in ("stages", "layers", "blocks"):
            seq = getattr(self.backbone, attr, None)
            if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq):
                return seq[-1]
        return self.backbone.get_submodule(self.backbone.feature_info.module_name()[-1])

    def train(self, mode: bool = True) -> SegmentationModel:
        """Set training mode; frozen backbone parts stay in eval mode."""
        super().train(mode)
        if self.frozen == "all":
            self.backbone.eval()
        elif self.frozen == "partial":
            self.backbone.eval()
            self._last_stage().train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input resolution."""
        logits = self.decoder(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmentation_model(info: Mapping[str, Any]) -> SegmentationModel:
    """The architecture of a ``segmentation`` model file, weights not loaded (backbone fused when it was saved so).

    Example:
        >>> m = build_segmentation_model({"model_kwargs": {"backbone": "resnet10t", "num_classes": 2, "dim": 8}})
        >>> m.num_classes
        2
    """
    model = SegmentationModel(**info.get("model_kwargs", {}))
    if info.get("fused_backbone"):
        from timm.utils import reparameterize_model

        model.backbone = reparameterize_model(model.backbone)
    return model

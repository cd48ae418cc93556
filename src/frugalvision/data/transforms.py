"""Image transforms for training and evaluation (torchvision v2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2 as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms", "data_config_of"]

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN  # timm's definition; one source for the whole package
IMAGENET_STD = IMAGENET_DEFAULT_STD


def data_config_of(model: torch.nn.Module) -> dict[str, Any]:
    """Input size, mean and std from a timm model's pretrained config, with ImageNet defaults."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    return {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
    }


def build_transforms(
    img_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.35, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    crop_pct: float = 1.0,
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised float tensor ``(C, H, W)``.

    Training: random-resized crop, flips. Evaluation: resize to ``img_size / crop_pct`` and centre crop.

    Example:
        >>> from PIL import Image
        >>> build_transforms(32, train=False)(Image.new("RGB", (40, 50))).shape
        torch.Size([3, 32, 32])
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    ops: list[Any] = [T.ToImage()]
    if train:
        ops += [T.RandomResizedCrop(img_size, scale=scale, antialias=True)]
        if hflip:
            ops.append(T.RandomHorizontalFlip(hflip))
        if vflip:
            ops.append(T.RandomVerticalFlip(vflip))
    else:
        ops += [T.Resize(round(img_size / crop_pct), antialias=True), T.CenterCrop(img_size)]
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)

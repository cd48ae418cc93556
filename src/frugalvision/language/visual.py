"""A visual encoder for the VLMs from any registered model: one feature level of its ``features_only`` backbone.

MiniGPT-v2 takes the last layer of a 448 px EVA ViT-g (a 32x32 patch grid). A small CNN on the bundled 128 px tiles
has a 4x4 grid at its last stage (stride 32), too coarse to place a box to 1 % of the side, so the VLMs here take the
feature map of the level with a chosen stride (default 16: an 8x8 grid of 128 px tiles, 64 visual tokens, 16 LLM
tokens after grouping 4). :class:`FeatureLevel` gives that map the ``forward_features`` / ``num_features`` interface
:class:`~frugalvision.language.vlm_base.VisionLanguageModel` expects.

Example:
    >>> enc = FeatureLevel("test_resnet", stride=16)
    >>> enc.forward_features(torch.zeros(1, 3, 64, 64)).shape, enc.num_features
    (torch.Size([1, 192, 4, 4]), 192)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import data_config_of
from ..errors import CheckpointError, ConfigError
from ..models.factory import create_model, load_backbone_weights, size_kwargs

__all__ = ["FeatureLevel"]


class FeatureLevel(nn.Module):
    """The feature map of one stride of a timm model's ``features_only`` backbone, as a frozen visual encoder.

    Args:
        name: A timm / frugalvision model name with ``features_only`` support (CNNs, ViTs).
        stride: Reduction of the level to use (2, 4, 8, 16, 32 for most CNNs; the patch size for ViTs); ``0``
            takes the last level.
        img_size: Input size, for models built for one resolution (ViTs); ignored by CNNs.

    Attributes:
        num_features: Channels of the level (the visual token width).
        stride: The level's actual reduction.
        mean: Input normalisation mean (the model's pretrained config; ImageNet's by default).
        std: Input normalisation std.
    """

    def __init__(self, name: str, stride: int = 16, img_size: int | None = None) -> None:
        super().__init__()
        kwargs: dict[str, Any] = size_kwargs(name, img_size) if img_size else {}
        probe = create_model(name, features_only=True, **kwargs)
        reductions = list(probe.feature_info.reduction())
        if stride == 0:
            index = len(reductions) - 1
        elif stride in reductions:
            index = len(reductions) - 1 - reductions[::-1].index(stride)  # the deepest level of that stride
        else:
            raise ConfigError(f"{name} has feature levels of strides {sorted(set(reductions))}, not {stride}; "
                              "choose visual_stride among them (0 = the last level)")
        self.name = name
        self.body = create_model(name, features_only=True, out_indices=(index,), **kwargs)
        self.stride = int(reductions[index])
        self.num_features = int(self.body.feature_info.channels()[-1])
        dc = data_config_of(self.body)
        self.mean = [float(v) for v in dc["mean"]]
        self.std = [float(v) for v in dc["std"]]
        self.bn_eps: float | None = None  # set when the weights come with other BatchNorm numerics (a detector)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → ``(B, C, H / stride, W / stride)``."""
        out = self.body(x)[-1]
        if out.ndim == 3:  # a ViT level as tokens (B, N, C): back to a map
            side = round(out.shape[1] ** 0.5)
            out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, -1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def set_detector_numerics(self) -> None:
        """YOLOv6's input and BatchNorm conventions: pixels in [0, 1] (no mean / std), every BatchNorm eps 1e-3."""
        self.mean, self.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        self.bn_eps = 1e-3
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3

    def load_classifier(self, weights: str | Path) -> None:
        """Load a classifier's weights file (its head and deeper stages are unused), or a detector's backbone.

        A detector model file (``frugalvision detect train``, kind ``detector`` or ``mask_frozen``) whose backbone is
        this model gives its backbone's tensors: a frozen detector backbone as the visual encoder (the Mask
        Frozen-DETR idea), trained to localise rather than to classify; the encoder then takes the detector's
        input convention (pixels in [0, 1]) and BatchNorm eps (:meth:`set_detector_numerics`).
        """
        from ..weights import read_model_info, read_safetensors

        path = Path(weights)
        info: dict[str, Any] = {}
        if path.suffix == ".safetensors" and path.is_file():
            try:
                info = read_model_info(path)
            except CheckpointError:  # a plain weights file, not a model file
                info = {}
        if info.get("kind") in ("detector", "mask_frozen"):
            prefix = "backbone." if info["kind"] == "detector" else "detector.backbone."
            tensors, _ = read_safetensors(path)
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            from ..detect.yolov6 import VARIANTS

            variant = VARIANTS.get(str(info.get("name")))
            backbone = (info.get("model_kwargs") or {}).get("backbone") or (variant.backbone if variant else None)
            if not state:
                raise CheckpointError(f"detector file {path} has no '{prefix}*' tensors; it cannot give {self.name} "
                                      "features")
            if backbone and backbone != self.name:
                raise ConfigError(f"detector file {path} has a {backbone} backbone, not {self.name}: use "
                                  f"visual={backbone}")
            load_backbone_weights(self.body, state, what=f"{self.name} features from the detector {path.name}")
            self.set_detector_numerics()
            return
        load_backbone_weights(self.body, weights, what=f"{self.name} features")

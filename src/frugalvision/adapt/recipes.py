"""The fine-tuning recipes: full fine-tuning, SGD, freeze-embed SGD, linear probe, LP-FT, frozen backbone + head.

- Full fine-tuning with AdamW (``full_ft``) or SGD with momentum (``sgd``).
- SGD with the patch embedding / stem frozen (``freeze_embed``), with and without momentum
  (``freeze_embed_nomom``): Kumar et al.'s finding that freezing the embedding lets plain SGD match AdamW, with
  less optimiser state (SGD with momentum: one buffer per trainable weight; without: none; AdamW: two).
- Linear probe (``linear_probe``): only the final classifier trains.
- LP-FT (``lp_ft``): a linear probe first, then full fine-tuning from the probed head.
- Frozen backbone + trainable head (``frozen_backbone``), the Mask Frozen-DETR principle for any head: freeze
  the named backbone (or everything but the named head) and train the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .config import AdaptConfig, register_method
from .freeze import ModelParts, check_module_names

__all__ = [
    "FreezeEmbedConfig",
    "FreezeEmbedNoMomentumConfig",
    "FrozenBackboneConfig",
    "FullFineTuneConfig",
    "LPFTConfig",
    "LinearProbeConfig",
    "SGDConfig",
]


@register_method("full_ft")
@dataclass
class FullFineTuneConfig(AdaptConfig):
    """Full fine-tuning: every parameter trains, with AdamW by default.

    Example:
        >>> FullFineTuneConfig().describe_optimizer()
        'AdamW(lr=0.0003, betas=(0.9, 0.999), weight_decay=0.05)'
    """


@register_method("sgd")
@dataclass
class SGDConfig(AdaptConfig):
    """Full fine-tuning with SGD (momentum 0.9).

    Example:
        >>> SGDConfig().describe_optimizer()
        'SGD(lr=0.01, momentum=0.9, weight_decay=0)'
    """

    optimizer: Literal["adamw", "sgd"] = "sgd"
    lr: float = 1e-2
    weight_decay: float = 0.0


@register_method("freeze_embed")
@dataclass
class FreezeEmbedConfig(SGDConfig):
    """SGD with the patch embedding (or conv stem) frozen; everything else trains.

    Example:
        >>> import timm
        >>> m = timm.create_model("test_vit")
        >>> FreezeEmbedConfig().trainable(m, FreezeEmbedConfig().parts(m))[:3]
        ['cls_token', 'pos_embed', 'blocks']
    """

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """Every top-level parameter / module except the embedding (nested embeddings are handled too)."""
        return _complement(model, parts.embedding)


@register_method("freeze_embed_nomom")
@dataclass
class FreezeEmbedNoMomentumConfig(FreezeEmbedConfig):
    """Freeze-embed SGD without momentum: no optimiser state at all.

    Example:
        >>> FreezeEmbedNoMomentumConfig().momentum
        0.0
    """

    momentum: float = 0.0
    lr: float = 1e-1


@register_method("linear_probe")
@dataclass
class LinearProbeConfig(AdaptConfig):
    """Linear probe: only the classifier trains (AdamW, larger learning rate).

    Example:
        >>> import timm
        >>> m = timm.create_model("test_resnet")
        >>> LinearProbeConfig().trainable(m, LinearProbeConfig().parts(m))
        ['fc']
    """

    lr: float = 1e-2
    weight_decay: float = 0.0

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """The classifier only."""
        return parts.classifier


@register_method("frozen_backbone")
@dataclass
class FrozenBackboneConfig(AdaptConfig):
    """Frozen backbone + trainable head, for any head (classification, segmentation, detection).

    Attributes:
        backbone: Module names to freeze; everything else trains. When unset, ``train`` decides.
        train: Module names to train; when both are unset, the modules after the blocks (final norm + head).

    Example:
        >>> import timm
        >>> m = timm.create_model("test_vit")
        >>> FrozenBackboneConfig().trainable(m, FrozenBackboneConfig().parts(m))
        ['norm', 'head']
    """

    lr: float = 1e-3
    backbone: list[str] | None = None
    train: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone is not None and self.train is not None:
            raise ValueError("give either backbone (what to freeze) or train (what to train), not both")
        for key in ("backbone", "train"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])

    def parts(self, model: nn.Module) -> ModelParts:
        """Discovery is optional here: a model without blocks/classifier works when backbone/train is given."""
        if self.backbone is not None or self.train is not None:
            return ModelParts([], [], [], [])
        return super().parts(model)

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """Everything outside ``backbone``, or exactly ``train``, or the post-block modules."""
        if self.backbone is not None:
            return _complement(model, check_module_names(model, self.backbone, "backbone module"))
        if self.train is not None:
            return check_module_names(model, self.train, "trainable module")
        return parts.post


@register_method("lp_ft")
@dataclass
class LPFTConfig(AdaptConfig):
    """LP-FT: linear probe for ``lp_fraction`` of the steps, then fine-tune everything.

    Attributes:
        lp_fraction: Fraction of the training steps spent on the linear probe.
        lp_lr: Learning rate of the probe stage (AdamW on the classifier).

    Example:
        >>> [(type(c).__name__, f) for c, f in LPFTConfig(lp_fraction=0.25).stages()]
        [('LinearProbeConfig', 0.25), ('FullFineTuneConfig', 0.75)]
    """

    lp_fraction: float = 0.5
    lp_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.lp_fraction < 1:
            raise ValueError(f"lp_fraction must be in (0, 1), got {self.lp_fraction}")

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """The first stage trains the classifier."""
        return parts.classifier

    def stages(self) -> list[tuple[AdaptConfig, float]]:
        """Linear probe, then full fine-tuning with this config's optimiser."""
        common = {"layers": self.layers, "embed": self.embed, "head": self.head, "frozen_eval": self.frozen_eval}
        lp = LinearProbeConfig(lr=self.lp_lr, **common)
        ft_cls = SGDConfig if self.optimizer == "sgd" else FullFineTuneConfig
        ft = ft_cls(lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum, betas=self.betas, **common)
        return [(lp, self.lp_fraction), (ft, 1.0 - self.lp_fraction)]


def _complement(model: nn.Module, frozen: Sequence[str]) -> list[str]:
    """The smallest set of module / parameter names covering everything outside ``frozen``."""
    out: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for pn, _ in mod.named_parameters(recurse=False):
            out.append(f"{prefix}.{pn}" if prefix else pn)
        for cn, child in mod.named_children():
            name = f"{prefix}.{cn}" if prefix else cn
            if name in frozen or not any(True for _ in child.parameters()):
                continue
            if any(f.startswith(name + ".") for f in frozen):
                visit(name, child)
            else:
                out.append(name)

    visit("", model)
    return out

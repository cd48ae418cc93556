"""Adaptation methods as config dataclasses in a registry, looked up by name.

Each method is a dataclass deriving from :class:`AdaptConfig` and registered with :func:`register_method`.
A method says which parts of a model train (:meth:`AdaptConfig.trainable`), which optimiser it prescribes
(:meth:`AdaptConfig.build_optimizer`) and, for multi-stage recipes such as LP-FT, its stages
(:meth:`AdaptConfig.stages`). :func:`frugalvision.adapt.adapt` applies one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..engine.trainer import build_optimizer
from ..errors import ConfigError
from ..utils.registry import Registry
from .freeze import ModelParts, find_parts

__all__ = ["ADAPT_METHODS", "AdaptConfig", "get_method_config", "list_methods", "register_method"]

ADAPT_METHODS = Registry("adaptation method")


def register_method(name: str) -> Any:
    """Class decorator registering an :class:`AdaptConfig` subclass under ``name``.

    Example:
        >>> @register_method("head_only_demo")
        ... @dataclass
        ... class HeadOnly(AdaptConfig):
        ...     def trainable(self, model, parts):
        ...         return parts.classifier
        >>> "head_only_demo" in list_methods()
        True
        >>> _ = ADAPT_METHODS.pop("head_only_demo")
    """
    return ADAPT_METHODS.register(name)


def list_methods() -> list[str]:
    """Registered method names.

    Example:
        >>> {"full_ft", "sgd", "freeze_embed", "linear_probe", "lp_ft", "subtuning"} <= set(list_methods())
        True
    """
    return ADAPT_METHODS.names()


def get_method_config(name: str, **kwargs: Any) -> AdaptConfig:
    """Build the config of method ``name`` with ``kwargs`` (unknown names/keys give a clear error).

    Example:
        >>> get_method_config("sgd", lr=0.05).lr
        0.05
        >>> get_method_config("sgd_freeze")
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: unknown adaptation method 'sgd_freeze'; did you mean freeze_embed, sgd, ...
    """
    cls = ADAPT_METHODS.lookup(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ConfigError(f"{name} has no option(s) {', '.join(bad)}; valid options: {', '.join(sorted(fields))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {name} options {kwargs}: {exc}") from None


@dataclass
class AdaptConfig:
    """Base of every adaptation method: the optimiser it prescribes and overrides of part discovery.

    Attributes:
        optimizer: ``adamw`` or ``sgd``.
        lr: Learning rate of the method's optimiser.
        weight_decay: Weight decay (not applied to norms and biases).
        momentum: SGD momentum (0 disables it and its state).
        betas: AdamW betas.
        layers: Module names of the blocks in forward order; discovered when unset.
        embed: Module names of the patch embedding / stem; discovered when unset.
        head: Module names of the classifier; discovered when unset.
        frozen_eval: Run fully frozen sub-modules in eval mode (fixed batch-norm statistics, no dropout).
    """

    method: ClassVar[str] = "base"

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    layers: list[str] | None = None
    embed: list[str] | None = None
    head: list[str] | None = None
    frozen_eval: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for key in ("layers", "embed", "head"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])

    def parts(self, model: nn.Module) -> ModelParts:
        """The model's blocks, embedding and head, with this config's overrides."""
        return find_parts(model, self.layers, self.embed, self.head)

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """Module or parameter names to train (``""`` is the whole model)."""
        return [""]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The method's optimiser over the model's trainable parameters."""
        return build_optimizer(model, self.optimizer, self.lr, self.weight_decay, self.momentum, False, self.betas)

    def describe_optimizer(self) -> str:
        """A one-line description of the optimiser (for the report)."""
        if self.optimizer == "sgd":
            return f"SGD(lr={self.lr:g}, momentum={self.momentum:g}, weight_decay={self.weight_decay:g})"
        return f"AdamW(lr={self.lr:g}, betas={tuple(self.betas)}, weight_decay={self.weight_decay:g})"

    def stages(self) -> list[tuple[AdaptConfig, float]]:
        """``(config, fraction of the training steps)`` per stage; one stage for most methods."""
        return [(self, 1.0)]

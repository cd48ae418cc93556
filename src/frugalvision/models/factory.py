"""Creating models by name without downloads, loading weights into them, and rebuilding classifier model files.

The file format itself (reading, writing, the fit check, model-file kinds) lives in :mod:`frugalvision.weights`;
this module only knows how timm models are built and how a classifier's weights map onto its features-only
backbone.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import ConfigError
from ..weights import WeightsFit, load_weights

__all__ = ["build_classifier", "classifier_keys", "create_model", "features_only_keys", "load_backbone_weights"]


def create_model(name: str, num_classes: int | None = None, weights: str | Path | None = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without downloads, with a clear error for unknown names and optional local weights.

    Args:
        name: A timm model name (ours are registered in timm too).
        num_classes: Classifier size; the model's default when omitted.
        weights: Optional weights file (safetensors or weights-only PyTorch). A family's ``checkpoint_filter_fn``
            maps official checkpoints' keys when the family defines one. Every key must fit.
        **kwargs: Passed to the model constructor (``img_size``, ``drop_path_rate``, ...).

    Example:
        >>> create_model("resnet18", num_classes=3).fc.out_features
        3
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `frugalvision models`"
        raise ConfigError(f"unknown model {name!r}{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build {name} with {kwargs}: {exc}") from None
    if weights is not None:
        module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        filt = getattr(module, "checkpoint_filter_fn", None)
        load_weights(model, weights, what=name, key_map=(lambda sd: filt(sd, model)) if filt else None)
    return model


def build_classifier(info: Mapping[str, Any]) -> nn.Module:
    """The architecture of a ``classifier`` model file (a timm model by name), weights not loaded."""
    return create_model(info["name"], **info.get("model_kwargs", {}))


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier (from its ``pretrained_cfg``).

    Example:
        >>> classifier_keys(create_model("resnet18"))
        ('fc.',)
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if not names:
        raise ConfigError(f"{type(model).__name__} does not name its classifier (pretrained_cfg['classifier'])")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def features_only_keys(state_dict: Mapping[str, torch.Tensor], backbone_keys: Iterable[str]
                       ) -> dict[str, torch.Tensor]:
    """A classifier's keys as its timm ``features_only`` model names them.

    timm's feature extractors flatten some containers (``stages.0.x`` -> ``stages_0.x``), keep others
    (``conv1.0.x`` of a ResNet stem) or wrap the whole model (``model.x`` of a ``FeatureGetterNet``); a key is
    renamed only to a name the backbone has.

    Example:
        >>> sd = {"stages.0.conv.weight": torch.zeros(1), "conv1.0.weight": torch.zeros(1)}
        >>> list(features_only_keys(sd, ["stages_0.conv.weight", "conv1.0.weight"]))
        ['stages_0.conv.weight', 'conv1.0.weight']
    """
    own = set(backbone_keys)
    out = {}
    for k, v in state_dict.items():
        names = (k, re.sub(r"^(\w+)\.(\d+)\.", r"\1_\2.", k), f"model.{k}")
        out[next((n for n in names if n in own), k)] = v
    return out


def load_backbone_weights(backbone: nn.Module, weights: str | Path | Mapping[str, torch.Tensor],
                          what: str = "the backbone") -> WeightsFit:
    """Load a classifier's weights file into its ``features_only`` backbone.

    Every backbone tensor must come from the file; the file's tensors the backbone does not use (the classifier
    head, final norms) are allowed and counted in the returned fit.
    """
    own = list(backbone.state_dict())
    return load_weights(backbone, weights, what=what, key_map=lambda sd: features_only_keys(sd, own),
                        allow_unused=True)

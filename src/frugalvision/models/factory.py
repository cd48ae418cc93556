"""Creating models by name without downloads, loading weights into them, and rebuilding classifier model files.

The file format itself (reading, writing, the fit check, model-file kinds) lives in :mod:`frugalvision.weights`;
this module only knows how timm models are built and how a classifier's weights map onto its features-only
backbone.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import ConfigError
from ..weights import WeightsFit, load_weights

__all__ = ["build_classifier", "check_input_size", "classifier_keys", "create_model", "features_only_keys",
           "load_backbone_weights", "resample_pos_embed", "size_kwargs"]


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
        load_weights(model, weights, what=name,
                     key_map=lambda sd: resample_pos_embed(filt(sd, model) if filt else sd, model))
    return model


def size_kwargs(model: str, img_size: int | tuple[int, int]) -> dict[str, Any]:
    """``{"img_size": img_size}`` for models built for one input size (vision transformers), ``{}`` otherwise.

    Example:
        >>> size_kwargs("vit_tiny_patch16_224", 64), size_kwargs("resnet10t", 64)
        ({'img_size': 64}, {})
    """
    if not timm.is_model(model):
        return {}
    fixed = (timm.models.get_pretrained_cfg(model) or {})
    fixed = getattr(fixed, "fixed_input_size", False) if not isinstance(fixed, dict) else fixed.get("fixed_input_size")
    entry = timm.models.model_entrypoint(model)
    takes = "img_size" in inspect.signature(entry).parameters
    return {"img_size": img_size} if fixed or takes else {}


def _sizes_that_work(model: nn.Module) -> str:
    """Which input sizes a model takes, for messages: patch multiples for ViTs, else its stride and default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size", (3, 224, 224)))[-1]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch:
        p = patch[0] if isinstance(patch, tuple | list) else int(patch)
        return f"multiples of its patch size {p} (its default is {default})"
    info = getattr(model, "feature_info", None)
    reductions = [f.get("reduction", 1) for f in info] if isinstance(info, list) else []
    stride = max(reductions, default=32)
    return f"multiples of its stride {stride}, at least {stride} (its default is {default})"


def check_input_size(model: nn.Module, name: str, img_size: int | tuple[int, int], in_chans: int = 3) -> None:
    """Run the model once on a zero image of ``img_size``; a :class:`ConfigError` names the sizes that work if not.

    Example:
        >>> check_input_size(create_model("resnet10t"), "resnet10t", 64)
        >>> check_input_size(create_model("vit_tiny_patch16_224"), "vit_tiny_patch16_224", 64)
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: vit_tiny_patch16_224 cannot take img_size=64 (Input height (64) doesn't ...
        >>> check_input_size(create_model("vit_tiny_patch16_224", img_size=40), "vit_tiny_patch16_224", 40)
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: vit_tiny_patch16_224 cannot take img_size=40: sizes must be multiples of ...
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch and not getattr(pe, "dynamic_img_pad", False):  # a strided patch conv floors: the border is dropped
        ph, pw = (patch[0], patch[-1]) if isinstance(patch, tuple | list) else (int(patch), int(patch))
        if h % ph or w % pw:
            p, n = (ph, h) if h % ph else (pw, w)
            near = sorted({max(p, n // p * p), -(-n // p) * p})
            size = f"{ph}" if ph == pw else f"{ph}x{pw}"
            raise ConfigError(f"{name} cannot take img_size={img_size}: sizes must be multiples of its patch size "
                              f"{size} (the patch embedding would silently drop the last {h % ph} pixel rows and "
                              f"{w % pw} columns); nearest that work: {' or '.join(map(str, near))}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, h, w))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{name} cannot take img_size={img_size} ({first}); sizes that work: "
                          f"{_sizes_that_work(model)}") from None
    finally:
        model.train(was_training)


def resample_pos_embed(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embedding in ``state_dict`` to ``model``'s grid (timm's interpolation).

    Weights trained at one resolution then load into the same ViT built for another; other tensors and models
    without a ``pos_embed`` of another length pass through unchanged (the fit check judges them).

    Example:
        >>> src, dst = create_model("test_vit", img_size=64), create_model("test_vit", img_size=32)
        >>> resample_pos_embed(src.state_dict(), dst)["pos_embed"].shape == dst.pos_embed.shape
        True
    """
    from timm.layers import resample_abs_pos_embed

    own = getattr(model, "pos_embed", None)
    got = state_dict.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(own, torch.Tensor) or not isinstance(got, torch.Tensor) or grid is None:
        return state_dict
    if got.shape == own.shape or got.ndim != 3 or own.ndim != 3 or got.shape[-1] != own.shape[-1]:
        return state_dict
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = round((got.shape[1] - prefix) ** 0.5)
    if side * side != got.shape[1] - prefix:  # not a square grid: leave it to the fit check
        return state_dict
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(got, new_size=list(grid), old_size=[side, side],
                                              num_prefix_tokens=prefix, verbose=False)
    return out


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

"""Creating models by name and saving/loading self-describing model files.

A *model file* is a safetensors file of weights whose header also records how to rebuild the model (timm
name, number of classes, input size, class names, ...), so ``frugalvision eval``/``export``/``predict``
need only the file.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import nn

from ..engine.checkpoint import _check_and_load, load_state_dict_file, save_weights
from ..errors import CheckpointError, ConfigError

__all__ = ["create_model", "load_model_file", "read_model_info", "save_model_file"]

_MODEL_META = "frugalvision.model"


def create_model(name: str, num_classes: int | None = None, weights: str | Path | None = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without downloads, with a clear error for unknown names and optional local weights.

    Args:
        name: A timm model name (ours are registered in timm too).
        num_classes: Classifier size; the model's default when omitted.
        weights: Optional weights file (safetensors or weights-only PyTorch). A family's ``checkpoint_filter_fn``
            maps official checkpoints' keys when the family defines one.
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
        sd = load_state_dict_file(weights)
        module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        filt = getattr(module, "checkpoint_filter_fn", None)
        if filt is not None:
            sd = filt(sd, model)
        _check_and_load(model, sd, Path(weights), strict=True)
    return model


def save_model_file(model: nn.Module, path: str | Path, name: str, model_kwargs: Mapping[str, Any] | None = None,
                    **meta: Any) -> Path:
    """Save weights plus what rebuilds the model: its ``name``, constructor ``model_kwargs`` and free ``meta``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> m = create_model("resnet18", num_classes=3)
        >>> _ = save_model_file(m, p, "resnet18", {"num_classes": 3}, classes=["a", "b", "c"])
        >>> load_model_file(p)[1]["classes"]
        ['a', 'b', 'c']
    """
    info = {"name": name, "model_kwargs": dict(model_kwargs or {}), **meta}
    return save_weights(model, path, metadata={_MODEL_META: json.dumps(info)})


def read_model_info(path: str | Path) -> dict[str, Any]:
    """The description stored in a model file by :func:`save_model_file`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a safetensors model file ({exc})") from None
    if _MODEL_META not in header:
        raise CheckpointError(
            f"{path} has no model description; give the model name and load it as weights (model=NAME weights={path})"
        )
    return json.loads(header[_MODEL_META])


def load_model_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model_file`; returns the model (eval mode) and its description."""
    info = read_model_info(path)
    if info["name"] == "segmentation":
        from .heads.seg import SegmentationModel

        model: nn.Module = SegmentationModel(**info.get("model_kwargs", {}))
        if info.get("fused_backbone"):
            from timm.utils import reparameterize_model

            model.backbone = reparameterize_model(model.backbone)
    else:
        model = create_model(info["name"], **info.get("model_kwargs", {}))
    _check_and_load(model, load_state_dict_file(path), Path(path), strict=True)
    return model.eval(), info

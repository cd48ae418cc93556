"""frugalvision: efficient vision — fast architectures, cheap adaptation, industrial inspection, language x vision.

Example:
    >>> import frugalvision as fv
    >>> fv.__version__
    '0.1.0'
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import (
    adapt,  # callable: fv.adapt(model, config)
    models,  # registers our architectures in timm's registry
)
from .adapt import (
    FreezeEmbedConfig,
    FreezeEmbedNoMomentumConfig,
    FrozenBackboneConfig,
    FullFineTuneConfig,
    LinearProbeConfig,
    LPFTConfig,
    SGDConfig,
    SubTuningConfig,
)
from .bench import benchmark, count_flops, count_params
from .config import build_config
from .engine import TrainConfig, Trainer, evaluate, load_checkpoint, save_checkpoint, seed_everything
from .errors import CheckpointError, ConfigError, DataError, FrugalVisionError, MissingDependencyError
from .export import export_onnx, fuse, reparameterize_model
from .surgery import modulate
from .weights import load_model_file, load_weights, read_weights, save_model_file

#: Subpackages loaded on first use (``fv.vlm``): their optional packages are imported only then.
_LAZY = {"vlm": "frugalvision.language"}


def __getattr__(name: str) -> object:
    """``fv.vlm``: the language x vision API (:mod:`frugalvision.language`, with ``load_vlm`` and ``ask``)."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'frugalvision' has no attribute {name!r}")


try:
    __version__ = version("frugalvision")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FreezeEmbedConfig",
    "FreezeEmbedNoMomentumConfig",
    "FrozenBackboneConfig",
    "FrugalVisionError",
    "FullFineTuneConfig",
    "LPFTConfig",
    "LinearProbeConfig",
    "MissingDependencyError",
    "SGDConfig",
    "SubTuningConfig",
    "TrainConfig",
    "Trainer",
    "__version__",
    "adapt",
    "benchmark",
    "build_config",
    "count_flops",
    "count_params",
    "evaluate",
    "export_onnx",
    "fuse",
    "load_checkpoint",
    "load_model_file",
    "load_weights",
    "models",
    "modulate",
    "read_weights",
    "reparameterize_model",
    "save_checkpoint",
    "save_model_file",
    "seed_everything",
    "vlm",
]

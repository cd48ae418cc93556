"""Cheap adaptation of pretrained models: one config dataclass per method, applied with :func:`adapt`.

Example:
    >>> import timm, frugalvision as fv
    >>> a = fv.adapt(timm.create_model("test_resnet", num_classes=3), fv.LinearProbeConfig(), verbose=False)
    >>> a.trainable
    ['fc.weight', 'fc.bias']
"""

import sys
import types
from typing import Any

from .apply import Adaptation, adapt
from .config import ADAPT_METHODS, AdaptConfig, get_method_config, list_methods, register_method
from .freeze import (
    AdaptReport,
    ModelParts,
    find_blocks,
    find_classifier,
    find_embedding,
    find_parts,
    optimizer_state_bytes,
    set_trainable,
    trainable_parameter_names,
)
from .recipes import (
    FreezeEmbedConfig,
    FreezeEmbedNoMomentumConfig,
    FrozenBackboneConfig,
    FullFineTuneConfig,
    LinearProbeConfig,
    LPFTConfig,
    SGDConfig,
)
from .subtuning import (
    PrefixCache,
    SubTuningConfig,
    SubTuningResult,
    block_costs,
    measure_profile_speedup,
    plot_profile,
    subtuning_select,
)

__all__ = [
    "ADAPT_METHODS",
    "AdaptConfig",
    "AdaptReport",
    "Adaptation",
    "FreezeEmbedConfig",
    "FreezeEmbedNoMomentumConfig",
    "FrozenBackboneConfig",
    "FullFineTuneConfig",
    "LPFTConfig",
    "LinearProbeConfig",
    "ModelParts",
    "PrefixCache",
    "SGDConfig",
    "SubTuningConfig",
    "SubTuningResult",
    "adapt",
    "block_costs",
    "find_blocks",
    "find_classifier",
    "find_embedding",
    "find_parts",
    "get_method_config",
    "list_methods",
    "measure_profile_speedup",
    "optimizer_state_bytes",
    "plot_profile",
    "register_method",
    "set_trainable",
    "subtuning_select",
    "trainable_parameter_names",
]


class _CallableModule(types.ModuleType):
    """``frugalvision.adapt`` is both this package and the :func:`adapt` function: ``fv.adapt(model, cfg)``."""

    def __call__(self, model: Any, config: Any = "full_ft", verbose: bool = True, **options: Any) -> Adaptation:
        return adapt(model, config, verbose, **options)


sys.modules[__name__].__class__ = _CallableModule

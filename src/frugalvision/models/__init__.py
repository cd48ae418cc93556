"""Model families registered in timm's registry (``timm.create_model`` works after ``import frugalvision``)."""

from .factory import create_model, load_model_file, read_model_info, save_model_file
from . import efficientmod  # noqa: F401  (EfficientMod xxs/xs/s, ModulationMixer)
from . import fastervit  # noqa: F401  (FasterViT 0-6 and high-resolution variants, HAT)
from . import rep  # noqa: F401  (EfficientRep, RepConv)
from . import lm_encoder  # noqa: F401  (ViT + frozen language-model block)

__all__ = ["create_model", "load_model_file", "read_model_info", "save_model_file"]

"""Model families registered in timm's registry (``timm.create_model`` works after ``import frugalvision``).

Families: ``efficientmod`` (EfficientMod xxs/xs/s, ModulationMixer), ``fastervit`` (FasterViT 0-6 and the
high-resolution variants, HAT), ``rep`` (EfficientRep, RepConv), ``lm_encoder`` (ViT + frozen language-model block).
"""

from . import efficientmod, fastervit, lm_encoder, rep  # noqa: F401  (registering is the import's effect)
from .factory import create_model, load_model_file, read_model_info, save_model_file

__all__ = ["create_model", "load_model_file", "read_model_info", "save_model_file"]

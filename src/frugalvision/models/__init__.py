"""Model families registered in timm's registry (``timm.create_model`` works after ``import frugalvision``).

Families: ``efficientmod`` (EfficientMod xxs/xs/s, ModulationMixer), ``fastervit`` (FasterViT 0-6 and the
high-resolution variants, HAT), ``rep`` (EfficientRep, RepConv), ``lm_encoder`` (ViT + frozen language-model block).
Model files (weights + how to rebuild the model) are read and written by :mod:`frugalvision.weights`.
"""

from . import efficientmod, fastervit, lm_encoder, rep  # noqa: F401  (registering is the import's effect)
from .factory import create_model, load_backbone_weights

__all__ = ["create_model", "load_backbone_weights"]

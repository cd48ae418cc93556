"""Causal-LM loading for the language models of this package; it lives in :mod:`frugalvision.models.llm`.

``models`` holds it (below ``language`` in the layering) so that architectures such as the frozen-LM-block ViT
(:mod:`frugalvision.models.lm_encoder`) can read the same cached SmolLM2 folder.
"""

from ..models.llm import llm_cache_path, load_llm, smollm2_gguf, tiny_llm

__all__ = ["llm_cache_path", "load_llm", "smollm2_gguf", "tiny_llm"]

"""MiniGPT-v2 (Chen et al., 2023): frozen ViT tokens, 4 neighbours concatenated, one Linear into the LLM, LoRA.

Official code: Vision-CAIR/MiniGPT-4, ``minigpt4/models/minigpt_v2.py``. The EVA ViT-g/14 (448 px) gives 1024 patch
tokens after ``ln_vision`` (the class token is dropped); ``image_embeds.view(b, n / 4, 4 * c)`` concatenates **4
consecutive tokens in raster order** (``group="raster"``: a 1x4 strip of a row) and ``llama_proj`` maps each group to
the LLM width (256 image tokens). LLaMA-2-chat-7B gets LoRA r 64, alpha 16, dropout 0.05 on ``q_proj`` / ``v_proj``;
the stage-3 checkpoint stores ``llama_proj.*`` and the LoRA tensors only.

``group="2x2"`` concatenates 2x2 spatial neighbourhoods instead (same token count, square receptive field; the
raster grouping is what the paper describes as "adjacent tokens"). Any frugalvision / timm model can be the visual
encoder, any transformers causal LM the language model (:func:`~frugalvision.language.llm.load_llm`).

Example:
    >>> import timm, torch
    >>> from frugalvision.language.llm import tiny_llm
    >>> from frugalvision.language.prompts import build_prompt, encode_example
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1,
    ...                         num_heads=2, num_classes=0)
    >>> llm, tok = tiny_llm()
    >>> model = MiniGPTv2(vit, llm, tok, lora=False)
    >>> model.encode_images(torch.zeros(1, 3, 32, 32)).shape  # 16 patches -> 4 tokens of the LLM width
    torch.Size([1, 4, 64])
    >>> ex = encode_example(tok, build_prompt("caption", "describe"), "a cat")
    >>> loss = model(torch.zeros(1, 3, 32, 32), [ex])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from .vlm_base import LoraSettings, VisionLanguageModel, map_llm_key

__all__ = ["GROUPINGS", "MiniGPTv2", "checkpoint_filter_fn", "group_tokens"]

GROUPINGS = ("raster", "2x2")


def group_tokens(tokens: torch.Tensor, grid: tuple[int, int], mode: str = "raster") -> torch.Tensor:
    """Concatenate groups of 4 visual tokens: ``(B, N, C)`` → ``(B, N / 4, 4 C)``.

    Args:
        tokens: Patch tokens in raster order (row by row).
        grid: ``(rows, cols)`` of the patch grid (``rows * cols == N``).
        mode: ``"raster"`` (official: 4 consecutive tokens) or ``"2x2"`` (2x2 neighbourhoods, in the order
            top-left, top-right, bottom-left, bottom-right).

    Example:
        >>> t = torch.arange(16.).view(1, 16, 1)  # a 4x4 grid, one channel
        >>> group_tokens(t, (4, 4), "raster")[0].tolist()
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0], [12.0, 13.0, 14.0, 15.0]]
        >>> group_tokens(t, (4, 4), "2x2")[0].tolist()
        [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0], [8.0, 9.0, 12.0, 13.0], [10.0, 11.0, 14.0, 15.0]]
    """
    b, n, c = tokens.shape
    rows, cols = grid
    if rows * cols != n:
        raise ConfigError(f"a {rows}x{cols} grid does not hold {n} tokens")
    if mode == "raster":
        if n % 4:
            raise ConfigError(f"raster grouping needs a multiple of 4 tokens, got {n} (choose another input size)")
        return tokens.reshape(b, n // 4, 4 * c)
    if mode == "2x2":
        if rows % 2 or cols % 2:
            raise ConfigError(f"2x2 grouping needs an even patch grid, got {rows}x{cols} (choose another input size)")
        x = tokens.reshape(b, rows // 2, 2, cols // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, n // 4, 4 * c)
    raise ConfigError(f"unknown grouping {mode!r}; choose one of {', '.join(GROUPINGS)}")


class MiniGPTv2(VisionLanguageModel):
    """MiniGPT-v2: frozen visual encoder → ``ln_vision`` → 4-token groups → ``llama_proj`` → LLM (+ LoRA).

    Args:
        visual: Visual encoder (``forward_features`` → ``(B, C, H, W)`` or ``(B, N, C)``), frozen.
        llm: Causal LM (:func:`~frugalvision.language.llm.load_llm`).
        tokenizer: Its tokenizer.
        group: ``"raster"`` (official) or ``"2x2"`` (:func:`group_tokens`).
        lora: ``True`` (official r 64 / alpha 16 / dropout 0.05 on q/v), a :class:`LoraSettings` / dict, or
            ``False`` (LLM frozen, only the projector trains).
        vision_dim: Visual token width (``visual.num_features`` by default).
        ln_vision: LayerNorm on the visual tokens (official; frozen, identity at initialisation).
        chat: Wrap prompts in the tokenizer's chat template.

    Trainable: ``llama_proj`` and the LoRA adapters.
    """

    def __init__(self, visual: nn.Module, llm: nn.Module, tokenizer: Any, *,
                 group: Literal["raster", "2x2"] = "raster",
                 lora: bool | LoraSettings | Mapping[str, Any] = True, vision_dim: int | None = None,
                 ln_vision: bool = True, chat: bool = True) -> None:
        if group not in GROUPINGS:
            raise ConfigError(f"unknown grouping {group!r}; choose one of {', '.join(GROUPINGS)}")
        super().__init__(visual, llm, tokenizer, lora=lora, vision_dim=vision_dim, ln_vision=ln_vision, chat=chat)
        for p in self.ln_vision.parameters():  # official: frozen with the visual encoder
            p.requires_grad_(False)
        self.group = group
        self.llama_proj = nn.Linear(4 * self.vision_dim, self.llm_hidden_size)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` → ``(B, N / 4, d)`` LLM input embeddings."""
        tokens, grid = self.visual_tokens(pixels, drop_prefix=True)
        return self.llama_proj(group_tokens(tokens, grid, self.group).to(self.llama_proj.weight.dtype))

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MiniGPTv2) -> dict[str, torch.Tensor]:
        """See :func:`checkpoint_filter_fn`."""
        return checkpoint_filter_fn(state_dict, model)


_DROP = re.compile(r"^(visual_encoder\.|Qformer\.|query_tokens$)")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MiniGPTv2) -> dict[str, torch.Tensor]:
    """Official MiniGPT-v2 names → ours.

    ``llama_proj.*`` and ``ln_vision.*`` keep their names; ``llama_model.base_model.model.<path>.lora_A.weight``
    becomes ``llm.base_model.model.<path>.lora_A.default.weight`` (:func:`~frugalvision.language.vlm_base.map_llm_key`);
    EVA ViT tensors (``visual_encoder.*``) are dropped (the visual encoder is loaded on its own, e.g. from timm).
    A ``{"model": ...}`` wrapper is unwrapped.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> llm, tok = tiny_llm()
        >>> m = MiniGPTv2(nn.Identity(), llm, tok, vision_dim=8)
        >>> sorted(checkpoint_filter_fn({"llama_proj.bias": torch.zeros(64), "visual_encoder.x": torch.zeros(1)}, m))
        ['llama_proj.bias']
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if _DROP.search(k):
            continue
        out[map_llm_key(k, model) if k.startswith("llama_model.") else k] = v
    return out

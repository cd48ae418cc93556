"""The interface between AnomalyCLIP and a CLIP-like model, in its own module.

:class:`CLIPBackbone` is what AnomalyCLIP reads from a CLIP (text tower with learnable word embeddings and deep
prompts; vision tokens, blocks, head and pooling); :class:`BlockParts` the pieces of one ViT block its DPAM forward
needs. ``anomalyclip.OpenCLIPBackbone`` and ``domain_clip.DomainCLIP`` implement it; neither of those modules
imports the other at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BlockParts", "CLIPBackbone"]


class BlockParts(NamedTuple):
    """The pieces of one pre-norm ViT block that the DPAM forward needs."""

    norm1: nn.Module
    qkv: nn.Module | tuple[torch.Tensor, torch.Tensor | None]  # a Linear, or (weight, bias) of a fused projection
    proj: nn.Module
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    num_heads: int


class CLIPBackbone(nn.Module):
    """Adapter interface between AnomalyCLIP and a CLIP-like model (frozen; only read, never modified).

    Text side: ``tokenize``, ``token_embeddings`` (word embeddings, before positions) and ``encode_embeddings``
    (run the text tower on given word embeddings, overwriting tokens ``1..k`` before layer ``i`` with
    ``deep_prompts[i-1]``). Vision side: ``vision_embed`` (tokens with ``num_prefix_tokens`` leading prefix
    tokens, positions added, pre-norm applied), ``vision_blocks`` (:class:`BlockParts`), ``vision_head``
    (final norm + projection of every token) and ``vision_pool`` (global image feature from head outputs).
    Files: ``build_spec`` (what rebuilds the architecture, stored in AnomalyCLIP model files).
    """

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_prefix_tokens: int = 1
    text_layers: int

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``(N, L)``."""
        raise NotImplementedError

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings ``(N, L, width)`` of token ids."""
        raise NotImplementedError

    def encode_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Text features ``(N, D)`` (unnormalised) of word embeddings, with deep prompts."""
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text features ``(N, D)`` of plain strings."""
        ids, mask = self.tokenize(texts)
        return self.encode_embeddings(self.token_embeddings(ids), ids, mask)

    def vision_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, prefix + N, C)`` of normalised images, positions added, pre-norm applied."""
        raise NotImplementedError

    def vision_blocks(self) -> list[BlockParts]:
        """The vision blocks, in order."""
        raise NotImplementedError

    def vision_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of every token: ``(B, L, C) -> (B, L, D)``."""
        raise NotImplementedError

    def vision_pool(self, head_tokens: torch.Tensor) -> torch.Tensor:
        """Global image feature from the head outputs of the last block (default: the class token)."""
        return head_tokens[:, 0]

    def build_spec(self) -> dict:
        """What rebuilds this architecture with fresh weights (``{"kind": ..., ...}``, JSON-serialisable)."""
        raise NotImplementedError

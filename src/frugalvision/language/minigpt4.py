"""MiniGPT-4 (Zhu et al., 2023): frozen ViT → ``ln_vision`` → BLIP-2 Q-Former (32 queries) → one Linear → frozen LLM.

Official code: Vision-CAIR/MiniGPT-4, ``minigpt4/models/minigpt4.py`` and ``Qformer.py`` (BLIP-2's BERT with
cross-attention). The Q-Former's query path, which is all MiniGPT-4 uses (the text embeddings and text FFNs are
deleted there), is per layer: self-attention over the queries → (every ``cross_attention_freq``-th layer, starting
with layer 0) cross-attention to the visual tokens → FFN (``intermediate_query`` / ``output_query``), each a
post-LayerNorm residual block (eps 1e-12, exact GELU), after a LayerNorm of the learned queries
(``bert.embeddings.LayerNorm``). The Q-Former attends to every visual token (class token included). Only
``llama_proj`` trains; the Q-Former, ``query_tokens`` and ``ln_vision`` come from a BLIP-2 checkpoint.

Without BLIP-2 weights a frozen random Q-Former is useless, so ``freeze_qformer`` defaults to ``False`` here
(the Q-Former and ``ln_vision`` train with the projector); set it to ``True`` after loading BLIP-2 weights with
:func:`~frugalvision.language.vlm_base.load_official_checkpoint`.

Example:
    >>> import torch
    >>> q = QFormer(vision_dim=24, width=32, num_layers=2, num_heads=4, num_queries=8)
    >>> q(torch.randn(2, 17, 24)).shape
    torch.Size([2, 8, 32])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .vlm_base import VisionLanguageModel, _Renames, map_llm_key

__all__ = ["MiniGPT4", "QFormer", "checkpoint_filter_fn"]


class QFormerAttention(nn.Module):
    """BERT attention block, post-LN: ``norm(x + proj(attn(q(x), k(ctx), v(ctx))))``."""

    def __init__(self, width: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"Q-Former width {width} is not a multiple of its {num_heads} heads")
        kv = context_dim or width
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv, width)
        self.v = nn.Linear(kv, width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (to ``x`` itself when omitted)."""
        ctx = x if context is None else context
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, d // h).transpose(1, 2)

        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(ctx)), heads(self.v(ctx)), dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.norm(x + F.dropout(self.proj(out), p, self.training))


class QFormerFFN(nn.Module):
    """BERT feed-forward block of the query path, post-LN: ``norm(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.norm(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), self.dropout, self.training))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, optional cross-attention to the visual tokens, FFN."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, vision_dim: int, cross: bool, dropout: float,
                 eps: float) -> None:
        super().__init__()
        self.self_attn = QFormerAttention(width, num_heads, None, dropout, eps)
        self.cross_attn = QFormerAttention(width, num_heads, vision_dim, dropout, eps) if cross else None
        self.ffn = QFormerFFN(width, mlp_dim, dropout, eps)

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """One layer."""
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, visual)
        return self.ffn(x)


class QFormer(nn.Module):
    """BLIP-2's Querying Transformer (query path): learned queries read the visual tokens.

    Args:
        vision_dim: Width of the visual tokens (1408 for EVA ViT-g).
        width: Hidden width (768 official, BERT-base).
        num_layers: Layers (12 official).
        num_heads: Attention heads (12 official).
        num_queries: Learned queries = output tokens (32 official).
        mlp_ratio: FFN width / width (4 official: 3072).
        cross_attention_freq: Cross-attention in layers ``0, f, 2f, ...`` (2 official).
        dropout: Attention and hidden dropout (0.1 in BERT-base; frozen in MiniGPT-4, so 0 by default).
        eps: LayerNorm epsilon (1e-12, BERT).
    """

    def __init__(self, vision_dim: int, width: int = 768, num_layers: int = 12, num_heads: int = 12,
                 num_queries: int = 32, mlp_ratio: float = 4.0, cross_attention_freq: int = 2, dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if cross_attention_freq < 1:
            raise ConfigError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
        if num_queries < 1 or num_layers < 1:
            raise ConfigError(f"a Q-Former needs >= 1 query and layer, got {num_queries} and {num_layers}")
        self.width, self.num_queries = width, num_queries
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width).normal_(std=0.02))
        self.input_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout
        mlp = round(width * mlp_ratio)
        self.layers = nn.ModuleList(
            QFormerLayer(width, num_heads, mlp, vision_dim, i % cross_attention_freq == 0, dropout, eps)
            for i in range(num_layers))
        self.apply(_bert_init)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, N, C)`` → query outputs ``(B, num_queries, width)``."""
        x = self.input_norm(self.query_tokens.expand(visual.shape[0], -1, -1).to(visual.dtype))
        x = F.dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, visual)
        return x


def _bert_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MiniGPT4(VisionLanguageModel):
    """MiniGPT-4: frozen visual encoder → ``ln_vision`` → :class:`QFormer` → ``llama_proj`` → frozen LLM.

    Args:
        visual: Visual encoder (``forward_features`` → ``(B, C, H, W)`` or ``(B, N, C)``), frozen.
        llm: Causal LM (:func:`~frugalvision.language.llm.load_llm`), frozen (official; ``lora`` adds adapters).
        tokenizer: Its tokenizer.
        num_queries: Q-Former queries = image tokens (32 official).
        qformer_width: Q-Former width (768 official; small for experiments).
        qformer_layers: Q-Former layers (12 official).
        qformer_heads: Q-Former heads (12 official).
        cross_attention_freq: Cross-attention every this many layers (2 official).
        freeze_qformer: Freeze the Q-Former, its queries and ``ln_vision`` (official, with BLIP-2 weights).
        drop_prefix_tokens: Drop class / register tokens before the Q-Former (official: kept).
        lora: LoRA on the LLM (official MiniGPT-4: none).
        vision_dim: Visual token width (``visual.num_features`` by default).
        chat: Wrap prompts in the tokenizer's chat template.
    """

    def __init__(self, visual: nn.Module, llm: nn.Module, tokenizer: Any, *, num_queries: int = 32,
                 qformer_width: int = 768, qformer_layers: int = 12, qformer_heads: int = 12,
                 cross_attention_freq: int = 2, freeze_qformer: bool = False, drop_prefix_tokens: bool = False,
                 lora: bool | Mapping[str, Any] = False, vision_dim: int | None = None, chat: bool = True) -> None:
        super().__init__(visual, llm, tokenizer, lora=lora, vision_dim=vision_dim, ln_vision=True, chat=chat)
        self.qformer = QFormer(self.vision_dim, qformer_width, qformer_layers, qformer_heads, num_queries,
                               cross_attention_freq=cross_attention_freq)
        self.drop_prefix_tokens = drop_prefix_tokens
        self.llama_proj = nn.Linear(qformer_width, self.llm_hidden_size)
        self.freeze_qformer(freeze_qformer)

    def freeze_qformer(self, frozen: bool = True) -> None:
        """Freeze (official, after loading BLIP-2 weights) or unfreeze the Q-Former, its queries and ``ln_vision``."""
        for p in (*self.qformer.parameters(), *self.ln_vision.parameters()):
            p.requires_grad_(not frozen)
        self.qformer_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> MiniGPT4:
        """Train mode; a frozen Q-Former stays in eval mode (no dropout)."""
        super().train(mode)
        if getattr(self, "qformer_frozen", False):
            self.qformer.eval()
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` → ``(B, num_queries, d)`` LLM input embeddings."""
        tokens, _ = self.visual_tokens(pixels, drop_prefix=self.drop_prefix_tokens)
        queries = self.qformer(tokens.to(self.llama_proj.weight.dtype))
        return self.llama_proj(queries)

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MiniGPT4) -> dict[str, torch.Tensor]:
        """See :func:`checkpoint_filter_fn`."""
        return checkpoint_filter_fn(state_dict, model)


_LAYER = r"^Qformer\.bert\.encoder\.layer\.(\d+)\."
_QFORMER_RENAMES = _Renames(
    renames=[(re.compile(p), r) for p, r in [
        (r"^query_tokens$", "qformer.query_tokens"),
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.input_norm."),
        (_LAYER + r"attention\.self\.query\.", r"qformer.layers.\1.self_attn.q."),
        (_LAYER + r"attention\.self\.key\.", r"qformer.layers.\1.self_attn.k."),
        (_LAYER + r"attention\.self\.value\.", r"qformer.layers.\1.self_attn.v."),
        (_LAYER + r"attention\.output\.dense\.", r"qformer.layers.\1.self_attn.proj."),
        (_LAYER + r"attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
        (_LAYER + r"crossattention\.self\.query\.", r"qformer.layers.\1.cross_attn.q."),
        (_LAYER + r"crossattention\.self\.key\.", r"qformer.layers.\1.cross_attn.k."),
        (_LAYER + r"crossattention\.self\.value\.", r"qformer.layers.\1.cross_attn.v."),
        (_LAYER + r"crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.proj."),
        (_LAYER + r"crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
        (_LAYER + r"intermediate_query\.dense\.", r"qformer.layers.\1.ffn.fc1."),
        (_LAYER + r"output_query\.dense\.", r"qformer.layers.\1.ffn.fc2."),
        (_LAYER + r"output_query\.LayerNorm\.", r"qformer.layers.\1.ffn.norm."),
    ]],
    # what MiniGPT-4 deletes from the BLIP-2 Q-Former (text path) and BLIP-2's other parts
    drop=[re.compile(p) for p in [
        _LAYER + r"(intermediate|output)\.",
        r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",
        r"^Qformer\.cls\.",
        r"^(visual_encoder|t5_model|t5_proj|opt_model|opt_proj|vision_proj|text_proj|itm_head|llm_model|llm_proj)\.",
        r"^temp$",
    ]],
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MiniGPT4) -> dict[str, torch.Tensor]:
    """Official MiniGPT-4 / BLIP-2 names → ours.

    * ``llama_proj.*``, ``ln_vision.*``: same names.
    * ``query_tokens`` → ``qformer.query_tokens``; ``Qformer.bert.embeddings.LayerNorm`` → ``qformer.input_norm``;
      ``Qformer.bert.encoder.layer.{i}.attention.self.{query,key,value}`` → ``qformer.layers.{i}.self_attn.{q,k,v}``,
      ``...attention.output.{dense,LayerNorm}`` → ``self_attn.{proj,norm}``; the same for ``crossattention`` →
      ``cross_attn``; ``intermediate_query.dense`` / ``output_query.{dense,LayerNorm}`` → ``ffn.{fc1,fc2,norm}``.
    * Dropped: the Q-Former's text path (word / position embeddings, ``intermediate`` / ``output`` FFNs, ``cls``),
      the EVA ViT (``visual_encoder.*``, loaded on its own) and BLIP-2's other heads (``t5_*``, ``opt_*``, ...).
    * ``llama_model.*`` (LoRA, if any) as :func:`~frugalvision.language.vlm_base.map_llm_key`.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> llm, tok = tiny_llm()
        >>> m = MiniGPT4(nn.Identity(), llm, tok, vision_dim=8, qformer_width=16, qformer_layers=2, qformer_heads=2)
        >>> sd = {"Qformer.bert.encoder.layer.1.output_query.dense.weight": torch.zeros(64, 16),
        ...       "Qformer.bert.encoder.layer.1.output.dense.weight": torch.zeros(64, 16)}
        >>> list(checkpoint_filter_fn(sd, m))
        ['qformer.layers.1.ffn.fc2.weight']
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith("llama_model."):
            out[map_llm_key(k, model)] = v
            continue
        new = _QFORMER_RENAMES.apply(k)
        if new is not None:
            out[new] = v
    return out

"""SEED (Ge et al., ICLR 2024): a discrete image tokenizer whose codes an LLM can read and write.

"Making LLaMA SEE and Draw with SEED Tokenizer"; official code AILab-CVC/SEED
(``models/seed_qformer/qformer_quantizer.py``: ``Blip2QformerQuantizer``, ``VectorQuantizer2``; the causal Q-Former
in ``models/Qformer_casual.py``). The structure, with the official attribute names kept where they exist::

    frozen ViT tokens (B, N, C) → ln_vision → causal Q-Former (32 learned queries; query i attends to queries ≤ i,
    cross-attention to the ViT tokens) → encode_task_layer (Linear → Tanh → Linear, width → 32)
    → quantize (nearest of 8192 x 32-d codes, beta 0.25, straight-through) → codes (B, 32)
    → decode_task_layer (Linear → Tanh → Linear, 32 → width)
        ├─ + pos_embed → blocks (pre-LN ViT blocks)            → reconstructed Q-Former features (stage II: cosine)
        └─ + pos_embed_image → blocks_image → image head      → one image embedding (1024-d, conditions unCLIP)

Training (paper, §3): **stage I** trains the causal Q-Former alone with a contrastive loss between the *last*
query's feature (the causal summary of the image) and the caption's text embedding (BLIP-2's ITC: symmetric
InfoNCE, label smoothing 0.1, learnable temperature); **stage II** freezes it and trains the quantiser path and the
de-tokeniser with ``5 L_vq + 2 (1 - cos(recon, qformer_feats)) + 0.5 MSE(image_embedding, target)``
(:meth:`SEEDTokenizer.stage1_loss`, :meth:`SEEDTokenizer.stage2_loss`, :meth:`SEEDTokenizer.set_stage`).
SEED-LLaMA then adds ``<img_00000>`` … ``<img_08191>`` plus ``<img>`` / ``</img>`` to the LLM's vocabulary
(:func:`image_token_strings`, :func:`codes_to_text`, :func:`text_to_codes`).

Differences from the released code, each a switch of :class:`SEEDConfig`:

* The text side of stage I is any caption embedding given as a tensor (e.g. all-MiniLM-L6-v2, 384-d) projected by
  ``text_proj``, instead of BLIP-2's BERT text encoder (which this module does not load).
* ``legacy_beta=False`` puts beta on the commitment term (VQ-VAE, the paper's text); ``VectorQuantizer2`` keeps
  taming-transformers' ``legacy=True`` default, which puts it on the codebook term. ``legacy_beta=True``
  reproduces that.
* ``l2_normalize=False`` (official: the ``l2norm`` is commented out); ``True`` matches cosine distance on the unit
  sphere (ViT-VQGAN / BEiT v2), which keeps more codes alive from a random start.
* Codebook health tools absent from the official code: usage / perplexity (:meth:`VectorQuantizer.codebook_usage`),
  dead-code restarts from recent encoder outputs (:meth:`VectorQuantizer.restart_dead_codes`, automatic with
  ``restart_every``) and k-means initialisation (:meth:`SEEDTokenizer.kmeans_init`); small-data training from a
  random start collapses onto a few codes without them.
* ``image_head="flatten"`` is the official default (``image_down`` per query, flattened, ``distill_image_proj``);
  ``"query"`` is the official ``use_qformer_image`` variant (one learned query reads ``blocks_image``'s output) with
  a ``decoder_layers``-deep Q-Former instead of a 12-layer one.

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> seed = SEEDTokenizer(SEEDConfig.tiny()).eval()
    >>> codes = seed.encode(torch.randn(2, 10, 16))
    >>> codes.shape, codes.dtype, seed.decode(codes).shape
    (torch.Size([2, 8]), torch.int64, torch.Size([2, 24]))
    >>> text_to_codes(codes_to_text(codes[0]), 8, 64).equal(codes[0])
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .minigpt4 import QFormer, QFormerAttention, _bert_init

__all__ = [
    "IMAGE_END",
    "IMAGE_START",
    "CausalQFormer",
    "CausalQFormerAttention",
    "CodebookUsage",
    "DecoderBlock",
    "QuantizerOutput",
    "SEEDConfig",
    "SEEDOutput",
    "SEEDTokenizer",
    "VectorQuantizer",
    "codes_to_text",
    "fit_seed_tokenizer",
    "image_token",
    "image_token_strings",
    "text_to_codes",
    "visual_tokens",
]

#: Begin / end of an image's codes in text (SEED-LLaMA).
IMAGE_START = "<img>"
IMAGE_END = "</img>"
_DIGITS = 5  # <img_00000>: codebooks up to 100000 codes


# ============================================================================================== configuration
@dataclass
class SEEDConfig:
    """Sizes and loss settings of :class:`SEEDTokenizer` (defaults: the official SEED tokenizer).

    Args:
        vision_dim: Width of the frozen encoder's tokens (1408, EVA ViT-g).
        width: Q-Former width (768, BERT-base).
        num_layers: Q-Former layers (12).
        num_heads: Q-Former heads (12).
        num_queries: Learned queries = codes per image (32).
        cross_attention_freq: Cross-attention in Q-Former layers ``0, f, 2f, ...`` (2).
        mlp_ratio: FFN width / width in the Q-Former and the de-tokeniser (4).
        ln_vision: LayerNorm on the visual tokens before the Q-Former (official ``ln_vision``).
        code_dim: Code width (32).
        codebook_size: Codes (8192).
        beta: Commitment weight (0.25).
        legacy_beta: Put ``beta`` on the codebook term as ``VectorQuantizer2(legacy=True)`` does.
        l2_normalize: Quantise unit vectors (cosine nearest code) instead of raw ones (official: raw).
        dead_after: A code is dead after this many training forwards without being picked.
        restart_every: Restart dead codes every this many training forwards (0: only when called).
        recent_size: Encoder outputs kept (not saved) to restart dead codes from.
        decoder_layers: Pre-LN blocks in each de-tokeniser branch (4).
        decoder_heads: Their heads (12).
        image_dim: Regressed image embedding (1024: the unCLIP-SD image embedding).
        image_head: ``"flatten"`` (official default) or ``"query"`` (``use_qformer_image``).
        image_down_dims: Per-query down-projection of the ``"flatten"`` head ((256, 128, 32)).
        text_dim: Width of the caption embeddings of stage I (384: all-MiniLM-L6-v2).
        embed_dim: Shared contrastive space (256, BLIP-2).
        label_smoothing: Of the contrastive cross-entropy (0.1).
        logit_scale_init: Initial log inverse temperature (``log(1 / 0.07)``, CLIP).
        logit_scale_max: Upper clamp of the inverse temperature (100, CLIP).
        vq_weight: Stage II weight of the quantiser loss (5).
        recon_weight: Stage II weight of ``1 - cos`` between reconstructed and Q-Former features (2).
        image_weight: Stage II weight of the image-embedding MSE (0.5).
        dropout: Q-Former dropout (0).
    """

    vision_dim: int = 1408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_queries: int = 32
    cross_attention_freq: int = 2
    mlp_ratio: float = 4.0
    ln_vision: bool = True
    code_dim: int = 32
    codebook_size: int = 8192
    beta: float = 0.25
    legacy_beta: bool = False
    l2_normalize: bool = False
    dead_after: int = 100
    restart_every: int = 0
    recent_size: int = 4096
    decoder_layers: int = 4
    decoder_heads: int = 12
    image_dim: int = 1024
    image_head: str = "flatten"
    image_down_dims: tuple[int, ...] = (256, 128, 32)
    text_dim: int = 384
    embed_dim: int = 256
    label_smoothing: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    vq_weight: float = 5.0
    recon_weight: float = 2.0
    image_weight: float = 0.5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.image_down_dims = tuple(int(d) for d in self.image_down_dims)
        positive = ("vision_dim", "width", "num_layers", "num_heads", "num_queries", "cross_attention_freq",
                    "code_dim", "codebook_size", "dead_after", "recent_size", "decoder_layers", "decoder_heads",
                    "image_dim", "text_dim", "embed_dim")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"SEEDConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.restart_every < 0:
            raise ConfigError(f"SEEDConfig.restart_every must be >= 0 (0: off), got {self.restart_every}")
        for name, heads in (("num_heads", self.num_heads), ("decoder_heads", self.decoder_heads)):
            if self.width % heads:
                raise ConfigError(f"SEEDConfig.width {self.width} is not a multiple of {name}={heads}")
        if self.codebook_size > 10**_DIGITS:
            raise ConfigError(f"codebook_size {self.codebook_size} does not fit the {_DIGITS}-digit image tokens")
        if self.image_head not in ("flatten", "query"):
            raise ConfigError(f"SEEDConfig.image_head must be 'flatten' or 'query', got {self.image_head!r}")
        if not self.image_down_dims or min(self.image_down_dims) < 1:
            raise ConfigError(f"SEEDConfig.image_down_dims must be positive widths, got {self.image_down_dims}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"SEEDConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.beta < 0:
            raise ConfigError(f"SEEDConfig.beta must be >= 0, got {self.beta}")

    @classmethod
    def tiny(cls, **overrides: Any) -> SEEDConfig:
        """A CPU-sized configuration for tests and examples (``overrides`` replace its fields).

        Example:
            >>> SEEDConfig.tiny(codebook_size=16).codebook_size
            16
        """
        small: dict[str, Any] = dict(vision_dim=16, width=32, num_layers=2, num_heads=4, num_queries=8, code_dim=8,
                                     codebook_size=64, recent_size=256, decoder_layers=1, decoder_heads=4,
                                     image_dim=24, image_down_dims=(16, 8), text_dim=12, embed_dim=16)
        small.update(overrides)
        return cls(**small)


# ================================================================================================ Q-Former
class CausalQFormerAttention(QFormerAttention):
    """:class:`~frugalvision.language.minigpt4.QFormerAttention` with a causal mask: token i attends to ``≤ i``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over ``x`` (``context`` must be omitted)."""
        if context is not None:
            raise ConfigError("causal attention is self-attention; it takes no context")
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), dropout_p=p,
                                             is_causal=True)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.norm(x + F.dropout(self.proj(out), p, self.training))


class CausalQFormer(QFormer):
    """SEED's causal Q-Former: BLIP-2's query path with causal self-attention among the queries.

    Same arguments and parameter names as :class:`~frugalvision.language.minigpt4.QFormer` (a BLIP-2 / MiniGPT-4
    Q-Former state_dict loads into it); only the self-attention is masked, so query ``i`` is a function of the
    queries ``≤ i`` and of the visual tokens, and the last query summarises the image.

    Example:
        >>> q = CausalQFormer(vision_dim=24, width=32, num_layers=2, num_heads=4, num_queries=8)
        >>> q(torch.randn(2, 17, 24)).shape
        torch.Size([2, 8, 32])
    """

    def __init__(self, vision_dim: int, width: int = 768, num_layers: int = 12, num_heads: int = 12,
                 num_queries: int = 32, mlp_ratio: float = 4.0, cross_attention_freq: int = 2, dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__(vision_dim, width, num_layers, num_heads, num_queries, mlp_ratio, cross_attention_freq,
                         dropout, eps)
        for layer in self.layers:
            layer.self_attn = CausalQFormerAttention(width, num_heads, None, dropout, eps)
            layer.self_attn.apply(_bert_init)


# ============================================================================================== quantiser
class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: Codes in the input's shape, straight-through (forward: the code; backward: identity to ``z``).
        indices: Code index of each vector (the input's shape without its last axis).
        loss: ``codebook + beta * commitment`` (``commitment + beta * codebook`` with ``legacy_beta``).
        commitment: ``mean((z - sg[e])^2)``: pulls the encoder towards its code.
        codebook: ``mean((sg[z] - e)^2)``: pulls the code towards the encoder.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor


class CodebookUsage(NamedTuple):
    """Codebook health (:meth:`VectorQuantizer.codebook_usage`).

    Attributes:
        used: Distinct codes among the indices.
        fraction: ``used / codebook_size``.
        perplexity: ``exp(entropy)`` of the indices' histogram (1: one code; ``codebook_size``: uniform use).
        dead: Codes unpicked for ``dead_after`` training forwards.
    """

    used: int
    fraction: float
    perplexity: float
    dead: int


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantiser with a straight-through estimator (``VectorQuantizer2`` of the official code).

    Training forwards (``track``, default: in train mode) record which codes were picked and keep recent encoder
    outputs (a non-saved buffer) to restart dead codes from.

    Args:
        num_codes: Codebook size (8192).
        code_dim: Code width (32).
        beta: Commitment weight (0.25).
        legacy_beta: ``beta`` on the codebook term instead (official ``legacy=True``).
        l2_normalize: Quantise unit vectors (cosine distance); codes are then used normalised.
        dead_after: Training forwards without a pick after which a code counts as dead.
        restart_every: Restart dead codes every this many training forwards (0: off).
        recent_size: Encoder outputs kept for restarts.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> vq = VectorQuantizer(16, 4)
        >>> out = vq(torch.randn(2, 5, 4))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 5, 4]), torch.Size([2, 5]))
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, legacy_beta: bool = False,
                 l2_normalize: bool = False, dead_after: int = 100, restart_every: int = 0,
                 recent_size: int = 4096) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ConfigError(f"a codebook needs >= 1 code of width >= 1, got {num_codes} x {code_dim}")
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.legacy_beta, self.l2_normalize = legacy_beta, l2_normalize
        self.dead_after, self.restart_every, self.recent_size = dead_after, restart_every, recent_size
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)  # official init
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent", torch.zeros(0, code_dim), persistent=False)

    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup ``(num_codes, code_dim)`` (unit rows with ``l2_normalize``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of ``z`` ``(..., code_dim)`` → ``(...)``."""
        flat = z.detach().reshape(-1, self.code_dim)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=-1)
        e = self.codes().detach().to(flat.dtype)
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).reshape(z.shape[:-1])

    def forward(self, z: torch.Tensor, track: bool | None = None) -> QuantizerOutput:
        """Quantise ``z`` ``(..., code_dim)``; ``track`` the picks (default: in train mode)."""
        if z.shape[-1] != self.code_dim:
            raise DataError(f"the quantiser takes vectors of width {self.code_dim}, got shape {tuple(z.shape)}")
        idx = self.nearest(z)
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        e = self.codes()[idx].to(z.dtype)
        commitment = F.mse_loss(z, e.detach())
        codebook = F.mse_loss(e, z.detach())
        loss = commitment + self.beta * codebook if self.legacy_beta else codebook + self.beta * commitment
        quantized = z + (e - z).detach()
        if self.training if track is None else track:
            self._track(z.detach(), idx)
        return QuantizerOutput(quantized, idx, loss, commitment, codebook)

    @torch.no_grad()
    def _track(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        self.steps_unused += 1
        self.steps_unused[idx.reshape(-1).unique()] = 0
        self.step += 1
        flat = z.reshape(-1, self.code_dim).float()
        if len(flat) > self.recent_size:
            flat = flat[torch.randperm(len(flat), device=flat.device)[:self.recent_size]]
        self.recent = torch.cat([self.recent.to(flat), flat])[-self.recent_size:]
        if self.restart_every and int(self.step) % self.restart_every == 0:
            self.restart_dead_codes()

    def dead_codes(self) -> torch.Tensor:
        """Boolean mask ``(num_codes,)`` of codes unpicked for ``dead_after`` training forwards."""
        return self.steps_unused >= self.dead_after

    def codebook_usage(self, indices: torch.Tensor) -> CodebookUsage:
        """Distinct codes, their fraction and the perplexity of ``indices``; dead codes from the tracked picks.

        Example:
            >>> VectorQuantizer(8, 2).codebook_usage(torch.tensor([0, 0, 1, 1]))
            CodebookUsage(used=2, fraction=0.25, perplexity=2.0, dead=0)
        """
        flat = indices.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_codes):
            raise DataError(f"code indices must be in [0, {self.num_codes}), got {int(flat.min())}..{int(flat.max())}")
        counts = torch.bincount(flat.cpu(), minlength=self.num_codes).double()
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        used = int((counts > 0).sum())
        return CodebookUsage(used, used / self.num_codes, round(float(entropy.exp()), 6), int(self.dead_codes().sum()))

    @torch.no_grad()
    def restart_dead_codes(self, samples: torch.Tensor | None = None) -> int:
        """Re-initialise dead codes from random encoder outputs (``samples`` or the recent ones); returns how many.

        Raises:
            DataError: If there are dead codes but no encoder outputs to restart them from.
        """
        dead = self.dead_codes().nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pool = self.recent if samples is None else samples.detach().reshape(-1, self.code_dim)
        if pool.numel() == 0:
            raise DataError("no encoder outputs to restart dead codes from: run training forwards or pass samples")
        pool = pool.to(self.embedding.weight)
        if self.l2_normalize:
            pool = F.normalize(pool, dim=-1)
        n = len(pool)
        pick = (torch.randperm(n, device=pool.device)[:len(dead)] if n >= len(dead)
                else torch.randint(n, (len(dead),), device=pool.device))
        self.embedding.weight[dead] = pool[pick]
        self.steps_unused[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def kmeans_init(self, samples: torch.Tensor, iters: int = 10) -> torch.Tensor:
        """Set the codebook to k-means (k-means++ seeding, Lloyd steps) centroids of ``samples`` ``(..., code_dim)``.

        With ``l2_normalize`` the clustering is spherical. Returns each sample's cluster.

        Raises:
            DataError: If there are fewer samples than codes or the width is wrong.
        """
        x = samples.detach().reshape(-1, samples.shape[-1]).float()
        if x.shape[-1] != self.code_dim:
            raise DataError(f"k-means samples must have width {self.code_dim}, got {samples.shape[-1]}")
        k = self.num_codes
        if len(x) < k:
            raise DataError(f"k-means initialisation needs >= {k} samples (one per code), got {len(x)}")
        if self.l2_normalize:
            x = F.normalize(x, dim=-1)
        x2 = x.pow(2).sum(1)

        def dist(c: torch.Tensor) -> torch.Tensor:
            return (x2[:, None] + c.pow(2).sum(1) - 2 * x @ c.t()).clamp(min=0)

        centroids = torch.empty(k, self.code_dim, device=x.device)
        first = int(torch.randint(len(x), ()))
        centroids[0] = x[first]
        best = dist(centroids[:1]).squeeze(1)
        for j in range(1, k):  # k-means++: pick proportionally to the squared distance to the closest centroid
            pick = int(torch.multinomial(best, 1)) if float(best.sum()) > 0 else int(torch.randint(len(x), ()))
            centroids[j] = x[pick]
            best = torch.minimum(best, dist(centroids[j:j + 1]).squeeze(1))
        assign = dist(centroids).argmin(1)
        for _ in range(iters):
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            empty = counts.squeeze(1) == 0
            centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1))
            if empty.any():  # re-seed empty clusters on the worst-fitted samples
                worst = dist(centroids).min(1).values.topk(int(empty.sum())).indices
                centroids[empty] = x[worst]
            if self.l2_normalize:
                centroids = F.normalize(centroids, dim=-1)
            assign = dist(centroids).argmin(1)
        self.embedding.weight.copy_(centroids.to(self.embedding.weight))
        self.steps_unused.zero_()
        return assign.reshape(samples.shape[:-1])


# ============================================================================================ de-tokeniser
class _Attention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-LN ViT block of the de-tokeniser (official ``vit.Block``: LayerNorm eps 1e-6, qkv bias, GELU MLP).

    Example:
        >>> DecoderBlock(32, 4)(torch.randn(2, 8, 32)).shape
        torch.Size([2, 8, 32])
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"block width {width} is not a multiple of its {num_heads} heads")
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = _Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = _Mlp(width, round(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block over ``(B, N, width)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _vit_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ================================================================================================== model
class SEEDOutput(NamedTuple):
    """Everything one pass of :class:`SEEDTokenizer` computes.

    Attributes:
        query_features: Causal Q-Former outputs ``(B, Q, width)``.
        codes: Code indices ``(B, Q)``.
        quantized: Straight-through codes ``(B, Q, code_dim)``.
        reconstructed: De-tokenised Q-Former features ``(B, Q, width)`` (``blocks`` branch).
        image_embedding: Regressed image embedding ``(B, image_dim)`` (``blocks_image`` branch).
        vq: The quantiser's output (its losses).
    """

    query_features: torch.Tensor
    codes: torch.Tensor
    quantized: torch.Tensor
    reconstructed: torch.Tensor
    image_embedding: torch.Tensor
    vq: QuantizerOutput


def visual_tokens(features: torch.Tensor) -> torch.Tensor:
    """A feature map ``(B, C, H, W)`` → visual tokens ``(B, HW, C)``; tokens ``(B, N, C)`` pass unchanged.

    Use it on the output of :class:`~frugalvision.language.visual.FeatureLevel` (a frozen encoder).

    Example:
        >>> visual_tokens(torch.zeros(2, 16, 3, 4)).shape
        torch.Size([2, 12, 16])
    """
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features
    raise DataError(f"visual features must be (B, C, H, W) or (B, N, C), got shape {tuple(features.shape)}")


class SEEDTokenizer(nn.Module):
    """SEED image tokenizer: visual tokens → ``num_queries`` discrete codes → one image embedding.

    Args:
        config: Sizes and losses (:class:`SEEDConfig`; the official sizes by default).
        **overrides: Fields replacing the config's (``SEEDTokenizer(width=64)``).

    Attributes:
        config: The configuration.
        ln_vision: LayerNorm of the visual tokens (identity when ``config.ln_vision`` is off).
        qformer: The :class:`CausalQFormer`.
        vision_proj: Stage I projection of the last query into the contrastive space.
        text_proj: Stage I projection of caption embeddings into it.
        logit_scale: Learnable log inverse temperature of stage I.
        encode_task_layer: Linear → Tanh → Linear, Q-Former width → code width.
        quantize: The :class:`VectorQuantizer`.
        decode_task_layer: Linear → Tanh → Linear, code width → Q-Former width.
        blocks: De-tokeniser branch reconstructing the Q-Former features.
        blocks_image: De-tokeniser branch feeding the image head.
    """

    def __init__(self, config: SEEDConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or SEEDConfig(), **overrides)
        self.config = cfg
        w, q = cfg.width, cfg.num_queries
        self.ln_vision: nn.Module = nn.LayerNorm(cfg.vision_dim) if cfg.ln_vision else nn.Identity()
        self.qformer = CausalQFormer(cfg.vision_dim, w, cfg.num_layers, cfg.num_heads, q, cfg.mlp_ratio,
                                     cfg.cross_attention_freq, cfg.dropout)
        # stage I
        self.vision_proj = nn.Linear(w, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # stage II: quantiser path
        self.encode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, cfg.code_dim))
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.legacy_beta, cfg.l2_normalize,
                                        cfg.dead_after, cfg.restart_every, cfg.recent_size)
        self.decode_task_layer = nn.Sequential(nn.Linear(cfg.code_dim, cfg.code_dim), nn.Tanh(),
                                               nn.Linear(cfg.code_dim, w))
        # stage II: de-tokeniser
        self.pos_embed = nn.Parameter(torch.zeros(1, q, w))
        self.blocks = nn.ModuleList(DecoderBlock(w, cfg.decoder_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.decoder_layers))
        self.pos_embed_image = nn.Parameter(torch.zeros(1, q, w))
        self.blocks_image = nn.ModuleList(DecoderBlock(w, cfg.decoder_heads, cfg.mlp_ratio)
                                          for _ in range(cfg.decoder_layers))
        for module in (self.vision_proj, self.text_proj, self.encode_task_layer, self.decode_task_layer, self.blocks,
                       self.blocks_image):
            module.apply(_vit_init)
        if cfg.image_head == "flatten":
            dims = (w, *cfg.image_down_dims)
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(itertools.pairwise(dims)):
                layers += [nn.Linear(a, b, bias=False)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
            self.image_down = nn.Sequential(*layers)
            self.distill_image_proj = nn.Linear(q * dims[-1], cfg.image_dim)
        else:
            self.reverse_qformer = QFormer(w, w, cfg.decoder_layers, cfg.decoder_heads, 1, cfg.mlp_ratio, 1)
            self.distill_image_proj = nn.Linear(w, cfg.image_dim)

    # ------------------------------------------------------------------------------------------- encoder side
    def _check_visual(self, visual: torch.Tensor) -> torch.Tensor:
        if not isinstance(visual, torch.Tensor) or visual.ndim != 3 or not visual.is_floating_point():
            shape = tuple(visual.shape) if isinstance(visual, torch.Tensor) else type(visual).__name__
            raise DataError(f"visual tokens must be a float tensor (B, N, C), got {shape}; "
                            "turn a (B, C, H, W) map into tokens with visual_tokens()")
        if visual.shape[-1] != self.config.vision_dim:
            raise DataError(f"visual tokens have width {visual.shape[-1]}, the tokenizer expects "
                            f"vision_dim={self.config.vision_dim}")
        if visual.shape[0] == 0 or visual.shape[1] == 0:
            raise DataError(f"visual tokens are empty: shape {tuple(visual.shape)}")
        return visual.to(self.logit_scale.dtype)

    def query_features(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, N, vision_dim)`` → causal Q-Former features ``(B, num_queries, width)``."""
        return self.qformer(self.ln_vision(self._check_visual(visual)))

    def forward(self, visual: torch.Tensor) -> SEEDOutput:
        """One full pass (straight-through, so every branch back-propagates to the encoder side)."""
        feats = self.query_features(visual)
        vq = self.quantize(self.encode_task_layer(feats))
        up = self.decode_task_layer(vq.quantized)
        return SEEDOutput(feats, vq.indices, vq.quantized, self._reconstruct(up), self._image_embedding(up), vq)

    @torch.no_grad()
    def encode(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, N, vision_dim)`` → codes ``(B, num_queries)`` (int64; picks are not tracked)."""
        feats = self.query_features(visual)
        return self.quantize(self.encode_task_layer(feats), track=False).indices

    def check_codes(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """``codes`` as an int64 tensor ``(B, num_queries)`` on the model's device.

        Raises:
            DataError: If they are not integers, not ``(B, num_queries)`` or outside ``[0, codebook_size)``.
        """
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise DataError(f"codes must be integers, got {codes.dtype}")
        q, k = self.config.num_queries, self.config.codebook_size
        if codes.ndim != 2 or codes.shape[1] != q:
            raise DataError(f"codes must have shape (B, {q}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise DataError(f"codes must be in [0, {k}), got values {int(codes.min())}..{int(codes.max())}")
        return codes.long().to(self.logit_scale.device)

    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Codes ``(B, num_queries)`` → image embeddings ``(B, image_dim)`` (official ``get_codebook_entry``)."""
        e = self.quantize.codes()[self.check_codes(codes)]
        return self._image_embedding(self.decode_task_layer(e))

    def decode_features(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Codes ``(B, num_queries)`` → reconstructed Q-Former features ``(B, num_queries, width)``."""
        return self._reconstruct(self.decode_task_layer(self.quantize.codes()[self.check_codes(codes)]))

    def _reconstruct(self, up: torch.Tensor) -> torch.Tensor:
        x = up + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x

    def _image_embedding(self, up: torch.Tensor) -> torch.Tensor:
        x = up + self.pos_embed_image
        for blk in self.blocks_image:
            x = blk(x)
        if self.config.image_head == "flatten":
            return self.distill_image_proj(self.image_down(x).flatten(1))
        return self.distill_image_proj(self.reverse_qformer(x).squeeze(1))

    # ------------------------------------------------------------------------------------------------ training
    def stage_modules(self, stage: int) -> list[nn.Module | nn.Parameter]:
        """What trains in ``stage`` 1 (Q-Former, ``ln_vision``, contrastive heads) or 2 (the rest)."""
        if stage == 1:
            return [self.ln_vision, self.qformer, self.vision_proj, self.text_proj, self.logit_scale]
        if stage == 2:
            head = [self.image_down] if self.config.image_head == "flatten" else [self.reverse_qformer]
            return [self.encode_task_layer, self.quantize, self.decode_task_layer, self.pos_embed, self.blocks,
                    self.pos_embed_image, self.blocks_image, *head, self.distill_image_proj]
        raise ConfigError(f"SEED trains in stage 1 or 2, got {stage!r}")

    def set_stage(self, stage: int) -> SEEDTokenizer:
        """Make only ``stage``'s parameters trainable (stage II freezes the causal Q-Former, as the paper does)."""
        train = self.stage_modules(stage)
        self.requires_grad_(False)
        for m in train:
            m.requires_grad_(True)
        return self

    def contrastive_logits(self, visual: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits ``(B, B)``: scaled cosine of the last query's and the captions' projections."""
        feats = self.query_features(visual)
        if text_embeds.ndim != 2 or text_embeds.shape != (feats.shape[0], self.config.text_dim):
            raise DataError(f"text embeddings must have shape ({feats.shape[0]}, {self.config.text_dim}) "
                            f"(one per image), got {tuple(text_embeds.shape)}")
        img = F.normalize(self.vision_proj(feats[:, -1]), dim=-1)
        txt = F.normalize(self.text_proj(text_embeds.to(img.dtype)), dim=-1)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        return scale * img @ txt.t()

    def stage1_loss(self, visual: torch.Tensor, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage I: symmetric InfoNCE (label smoothing) between the last query and the caption embeddings.

        Args:
            visual: Visual tokens ``(B, N, vision_dim)``, ``B >= 2``.
            text_embeds: One caption embedding per image ``(B, text_dim)``.

        Returns:
            ``loss`` (the mean of both directions), ``image_to_text``, ``text_to_image``, ``accuracy`` (image→text
            top-1, detached) and ``logit_scale`` (the inverse temperature in use, detached).
        """
        if visual.ndim >= 1 and visual.shape[0] < 2:
            raise DataError(f"the contrastive loss needs >= 2 image-caption pairs, got {visual.shape[0]}")
        logits = self.contrastive_logits(visual, text_embeds)
        target = torch.arange(len(logits), device=logits.device)
        ls = self.config.label_smoothing
        i2t = F.cross_entropy(logits, target, label_smoothing=ls)
        t2i = F.cross_entropy(logits.t(), target, label_smoothing=ls)
        acc = (logits.argmax(1) == target).float().mean().detach()
        scale = self.logit_scale.detach().exp().clamp(max=self.config.logit_scale_max)
        return {"loss": (i2t + t2i) / 2, "image_to_text": i2t, "text_to_image": t2i, "accuracy": acc,
                "logit_scale": scale}

    def stage2_loss(self, visual: torch.Tensor, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage II: ``vq_weight L_vq + recon_weight (1 - cos) + image_weight MSE`` (5, 2, 0.5).

        Args:
            visual: Visual tokens ``(B, N, vision_dim)``.
            image_embeds: Target image embeddings ``(B, image_dim)`` (e.g. unCLIP's image encoder).

        Returns:
            ``loss`` (the weighted sum), ``vq`` (with ``commitment`` and ``codebook``), ``recon``
            (``mean(1 - cos)`` against the detached Q-Former features), ``image`` (MSE) and ``perplexity``
            (of this batch's codes, detached).
        """
        out = self.forward(visual)
        if image_embeds.shape != out.image_embedding.shape:
            raise DataError(f"target image embeddings must have shape {tuple(out.image_embedding.shape)}, "
                            f"got {tuple(image_embeds.shape)}")
        cfg = self.config
        recon = (1 - F.cosine_similarity(out.reconstructed, out.query_features.detach(), dim=-1)).mean()
        image = F.mse_loss(out.image_embedding, image_embeds.to(out.image_embedding.dtype))
        loss = cfg.vq_weight * out.vq.loss + cfg.recon_weight * recon + cfg.image_weight * image
        perplexity = torch.tensor(self.quantize.codebook_usage(out.codes).perplexity)
        return {"loss": loss, "vq": out.vq.loss, "commitment": out.vq.commitment, "codebook": out.vq.codebook,
                "recon": recon, "image": image, "perplexity": perplexity}

    @torch.no_grad()
    def kmeans_init(self, visual: torch.Tensor, iters: int = 10) -> CodebookUsage:
        """Initialise the codebook by k-means on the encoder outputs of ``visual``; returns the usage on them.

        Needs ``>= codebook_size`` query vectors, i.e. ``B * num_queries >= codebook_size``.
        """
        z = self.encode_task_layer(self.query_features(visual))
        self.quantize.kmeans_init(z, iters)
        return self.quantize.codebook_usage(self.quantize.nearest(z))


# ============================================================================================= training
def fit_seed_tokenizer(tok: SEEDTokenizer, visual: torch.Tensor, text_embeds: torch.Tensor,
                       image_embeds: torch.Tensor, stage1: int, stage2: int, batch_size: int = 64, lr: float = 3e-4,
                       seed: int = 0, kmeans: bool = True, progress: bool = False,
                       log: dict[str, list] | None = None) -> SEEDTokenizer:
    """Stage I (``stage1`` contrastive steps) then stage II (``stage2`` reconstruction steps) on frozen features.

    Each stage: AdamW (weight decay 0.05) under a one-cycle schedule peaking at ``lr``, gradient norm clipped at 1,
    batches drawn with replacement from ``visual`` ``(N, T, C)`` and the matching caption / image embeddings;
    ``kmeans`` initialises the codebook from the training queries before stage II. Returns ``tok`` in eval mode;
    ``log`` (when given) collects ``{"step", "loss"}`` every 50 steps per stage.

    Example:
        >>> tok = SEEDTokenizer(SEEDConfig.tiny())
        >>> v, t, i = torch.randn(8, 10, 16), torch.randn(8, 12), torch.randn(8, 24)
        >>> fit_seed_tokenizer(tok, v, t, i, stage1=2, stage2=2, batch_size=4, kmeans=False).training
        False
    """
    from tqdm.auto import tqdm

    n = len(visual)
    if not len(text_embeds) == len(image_embeds) == n:
        raise DataError(f"{n} images, {len(text_embeds)} caption and {len(image_embeds)} image embeddings")
    g = torch.Generator().manual_seed(seed)
    for stage, steps, target in ((1, stage1, text_embeds), (2, stage2, image_embeds)):
        tok.set_stage(stage).train()
        if stage == 2 and kmeans:
            tok.kmeans_init(visual)
        params = [p for p in tok.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        bar = tqdm(range(steps), desc=f"stage {'I' if stage == 1 else 'II'}", disable=not progress)
        for step in bar:
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            loss = (tok.stage1_loss if stage == 1 else tok.stage2_loss)(visual[idx], target[idx])["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            value = float(loss.detach())
            bar.set_postfix(loss=f"{value:.3f}")
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log.setdefault(f"stage{stage}", []).append({"step": step, "loss": round(value, 4)})
    return tok.eval()


# ============================================================================================= image text
def image_token(code: int) -> str:
    """The vocabulary token of one code: ``<img_00012>``.

    Example:
        >>> image_token(12)
        '<img_00012>'
    """
    code = int(code)
    if not 0 <= code < 10**_DIGITS:
        raise DataError(f"image codes must be in [0, {10**_DIGITS}), got {code}")
    return f"<img_{code:0{_DIGITS}d}>"


def image_token_strings(codebook_size: int = 8192) -> list[str]:
    """Tokens to add to an LLM's vocabulary: ``<img_00000>`` … ``<img_{K-1}>``, then ``<img>`` and ``</img>``.

    Code ``i`` is the ``i``-th token, so its id is the id of ``<img_00000>`` plus ``i``.

    Example:
        >>> image_token_strings(3)
        ['<img_00000>', '<img_00001>', '<img_00002>', '<img>', '</img>']
    """
    if not 1 <= codebook_size <= 10**_DIGITS:
        raise ConfigError(f"codebook_size must be in [1, {10**_DIGITS}], got {codebook_size}")
    return [image_token(i) for i in range(codebook_size)] + [IMAGE_START, IMAGE_END]


def codes_to_text(codes: torch.Tensor | Sequence[int], codebook_size: int | None = None) -> str:
    """One image's codes ``(num_queries,)`` → ``<img><img_00012><img_00345>...</img>``.

    Raises:
        DataError: If ``codes`` is not one flat sequence of integers in range (``< codebook_size`` when given).

    Example:
        >>> codes_to_text([12, 345])
        '<img><img_00012><img_00345></img>'
    """
    t = torch.as_tensor(codes)
    if t.ndim != 1:
        raise DataError(f"codes_to_text takes one image's codes (a flat sequence), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"codes must be integers, got {t.dtype}")
    limit = 10**_DIGITS if codebook_size is None else codebook_size
    values = [int(c) for c in t.tolist()]
    bad = [c for c in values if not 0 <= c < limit]
    if bad:
        raise DataError(f"codes must be in [0, {limit}), got {bad[:5]}")
    return IMAGE_START + "".join(image_token(c) for c in values) + IMAGE_END


_SPAN = re.compile(re.escape(IMAGE_START) + r"(.*?)" + re.escape(IMAGE_END), re.S)
_TOKEN = re.compile(r"\s*<img_(\d{" + str(_DIGITS) + r"})>\s*")


def text_to_codes(text: str, num_queries: int, codebook_size: int) -> torch.Tensor:
    """Parse the first ``<img>...</img>`` span of ``text`` back into codes ``(num_queries,)`` (int64).

    Text around the span and whitespace between its tokens (as a tokenizer's decode may add) are allowed.

    Raises:
        DataError: If there is no span, it holds anything but ``<img_ddddd>`` tokens, the count is not
            ``num_queries`` or a code is ``>= codebook_size``.

    Example:
        >>> text_to_codes("an image: <img><img_00012> <img_00345></img>.", 2, 8192).tolist()
        [12, 345]
    """
    m = _SPAN.search(text)
    if m is None:
        raise DataError(f"no {IMAGE_START}...{IMAGE_END} span in {text[:80]!r}")
    body, pos, codes = m.group(1), 0, []
    while pos < len(body):
        tok = _TOKEN.match(body, pos)
        if tok is None:
            if not body[pos:].strip():
                break
            raise DataError(f"malformed image tokens at {body[pos:pos + 20]!r}: expected <img_ddddd> "
                            f"({_DIGITS} digits)")
        codes.append(int(tok.group(1)))
        pos = tok.end()
    if len(codes) != num_queries:
        raise DataError(f"expected {num_queries} image tokens, got {len(codes)}")
    bad = [c for c in codes if c >= codebook_size]
    if bad:
        raise DataError(f"image codes must be < codebook_size={codebook_size}, got {bad[:5]}")
    return torch.tensor(codes, dtype=torch.long)

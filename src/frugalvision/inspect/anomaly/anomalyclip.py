"""AnomalyCLIP: zero-shot anomaly detection with object-agnostic prompts learned on a frozen CLIP.

What is learned (everything else stays frozen):

* two object-agnostic prompts, ``[V1]..[Vn] object.`` and ``[W1]..[Wn] damaged object.``, whose ``n_ctx`` context
  vectors replace the ``X`` placeholder tokens of the tokenised prompt;
* deep text prompts: ``deep_n_ctx`` tokens that overwrite positions ``1..deep_n_ctx`` of the text sequence before
  each of the text layers ``1..deep_depth-1``.

The image side runs the frozen ViT with DPAM (diagonally prominent attention maps): from block ``dpam_start`` on
a second, V-V path is carried along, ``vv <- vv + proj(softmax(v v^T / sqrt(d)) v)`` with ``q, k, v`` taken from
the unchanged (Q-K) path, which keeps computing CLIP's ordinary forward pass. Patch features of several layers
are read from the V-V path, the image feature from the ordinary path. DPAM is computed functionally from the
frozen weights, so the user's model is never modified.

Scores: ``p = softmax(<f, t> / 0.07)`` over the (normal, anomalous) text features; the image score is the
anomalous probability of the global feature, the map the mean over the feature layers of ``(p_anom + 1 -
p_norm) / 2`` upsampled bilinearly to the input size and smoothed with a Gaussian. Training uses the glocal loss:
cross-entropy on the image logits plus, for every layer, focal loss and two dice losses on the maps.

The backbone is reached through a small adapter interface (:class:`CLIPBackbone`); :class:`OpenCLIPBackbone`
wraps any ViT open_clip model and ``frugalvision.inspect.anomaly.domain_clip.DomainCLIP`` implements it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..._deps import require
from ...errors import CheckpointError, ConfigError, DataError
from .base import AnomalyOutput

__all__ = [
    "AnomalyCLIP", "AnomalyCLIPConfig", "AnomalyPromptLearner", "BlockParts", "CLIPBackbone", "OpenCLIPBackbone",
    "anomalyclip_loss", "binary_dice_loss", "build_anomalyclip", "build_for_pipeline", "check_state_dict",
    "encode_samples", "fit_anomalyclip", "focal_loss", "gaussian_blur", "load_anomalyclip", "load_open_clip_checkpoint",
    "save_anomalyclip", "tiny_open_clip",
]

#: Fixed prompt ensemble of the no-prompt-learning baseline (state words as in the official code).
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALY_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
FIXED_TEMPLATES = ("a photo of a {}.", "a close-up photo of the {}.", "a cropped photo of a {}.", "this is a {}.")


@dataclass
class AnomalyCLIPConfig:
    """Hyper-parameters of AnomalyCLIP (defaults: the official ViT-L/14@336 settings).

    Attributes:
        n_ctx: Learnable context vectors per prompt (official ``n_ctx=12``).
        deep_depth: Text layers ``1..deep_depth-1`` receive deep prompts (official ``depth=9``).
        deep_n_ctx: Deep prompt tokens per layer (official ``t_n_ctx=4``); must be ``<= n_ctx``.
        feature_layers: 1-based vision blocks whose V-V patch tokens make the maps (official 6, 12, 18, 24).
        dpam_start: First 1-based block with the V-V path; ``None``: the first feature layer (official: 6, i.e.
            ``DPAM_layer=20`` on 24 blocks); ``depth + 1`` turns DPAM off.
        temperature: Softmax temperature of the image-text similarities.
        image_size: Side the images are resized to inside the model; ``None``: the backbone's own size.
        sigma: Gaussian smoothing of the map, in pixels of the input (official: 4); 0 disables it.
        object_name: The object word of the prompts.
        prompts: ``learned`` (AnomalyCLIP) or ``fixed`` (hand-written normal/damaged prompt ensemble, no training).
        local_weight: Weight of the map losses against the image cross-entropy (official ``lam=4``).
    """

    n_ctx: int = 12
    deep_depth: int = 9
    deep_n_ctx: int = 4
    feature_layers: tuple[int, ...] = (6, 12, 18, 24)
    dpam_start: int | None = None
    temperature: float = 0.07
    image_size: int | None = None
    sigma: float = 4.0
    object_name: str = "object"
    prompts: Literal["learned", "fixed"] = "learned"
    local_weight: float = 4.0

    def validate(self, num_layers: int, text_layers: int) -> None:
        """Raise a :class:`ConfigError` naming the bad field for a backbone of the given depths."""
        if self.prompts not in ("learned", "fixed"):
            raise ConfigError(f"prompts must be 'learned' or 'fixed', got {self.prompts!r}")
        if self.n_ctx < 1 or self.deep_n_ctx < 0 or self.deep_depth < 1:
            raise ConfigError("n_ctx must be >= 1, deep_n_ctx >= 0 and deep_depth >= 1")
        if self.deep_n_ctx > self.n_ctx:
            raise ConfigError(f"deep_n_ctx={self.deep_n_ctx} must not exceed n_ctx={self.n_ctx}: deep prompts "
                              "overwrite the context tokens, never the words of the prompt")
        if self.deep_depth > text_layers:
            raise ConfigError(f"deep_depth={self.deep_depth} exceeds the {text_layers} text layers of the backbone")
        if not self.feature_layers or any(not 1 <= i <= num_layers for i in self.feature_layers):
            raise ConfigError(f"feature_layers={self.feature_layers} must be 1-based block indices in "
                              f"1..{num_layers} (the backbone's vision depth)")
        start = self.dpam_start if self.dpam_start is not None else min(self.feature_layers)
        if not 1 <= start <= num_layers + 1:
            raise ConfigError(f"dpam_start={start} must be in 1..{num_layers + 1} ({num_layers + 1}: no DPAM)")
        if self.temperature <= 0 or self.sigma < 0:
            raise ConfigError("temperature must be > 0 and sigma >= 0")


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


# ----------------------------------------------------------------------------------------------------- open_clip


def _interp_pos(pos: torch.Tensor, prefix: int, grid: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a ``(prefix + gh*gw, C)`` position table to another grid (prefix rows kept)."""
    if grid == new:
        return pos
    c = pos.shape[-1]
    patch = pos[prefix:].reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=new, mode="bilinear", align_corners=False)
    return torch.cat([pos[:prefix], patch.permute(0, 2, 3, 1).reshape(-1, c)], 0)


class OpenCLIPBackbone(CLIPBackbone):
    """:class:`CLIPBackbone` over an open_clip ``CLIP``/``CustomTextCLIP`` with a ViT image tower.

    Args:
        model: The open_clip model (frozen by :class:`AnomalyCLIP`).
        tokenizer: An open_clip tokenizer; ``open_clip.get_tokenizer(model_name)`` when omitted (offline: the
            BPE vocabulary ships inside open_clip).
        model_name: Name used to pick the tokenizer.

    Example:
        >>> from frugalvision.inspect.anomaly.anomalyclip import tiny_open_clip
        >>> bb = OpenCLIPBackbone(tiny_open_clip())  # doctest: +SKIP
        >>> bb.encode_text(["a photo of a damaged object."]).shape  # doctest: +SKIP
        torch.Size([1, 32])
    """

    def __init__(self, model: nn.Module, tokenizer=None, model_name: str = "ViT-B-32") -> None:
        super().__init__()
        open_clip = require("open_clip", "AnomalyCLIP on open_clip models")
        visual = model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise ConfigError(f"AnomalyCLIP needs a ViT image tower; {type(visual).__name__} is not one")
        if getattr(visual, "attn_pool", None) is not None:
            raise ConfigError("open_clip image towers with attentional pooling are not supported by AnomalyCLIP")
        text = getattr(model, "text", model)  # CustomTextCLIP keeps the text tower in .text
        if not hasattr(text, "token_embedding") or getattr(text, "cls_emb", None) is not None:
            raise ConfigError("AnomalyCLIP needs open_clip's own text transformer (no HF text tower, no CoCa)")
        self.model = model
        self.text = text
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(model_name)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.image_mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.text_layers = len(text.transformer.resblocks)
        self.pool_type = getattr(visual, "pool_type", "tok")
        self.model_name = model_name

    def build_spec(self) -> dict:
        """What rebuilds this architecture (with fresh weights): the open_clip name or the custom config."""
        return {"kind": "open_clip", "model_name": self.model_name,
                "open_clip_cfg": getattr(self.model, "fv_open_clip_cfg", None)}

    # text
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        ids = self.tokenizer(list(texts)).long()
        return ids, (ids != 0).long()

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.text.token_embedding(ids)

    def encode_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,  # noqa: D102
                          deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        t = self.text
        pool = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
        attn_mask = getattr(t, "attn_mask", None)
        # with a causal mask the pooled (EOT) token never sees later positions: cropping the padding is exact
        length = int(mask.sum(1).max()) if attn_mask is not None and pool == "argmax" else ids.shape[1]
        x = embeds[:, :length] + t.positional_embedding[:length].to(embeds.dtype)
        am = attn_mask[:length, :length] if attn_mask is not None else None
        batch_first = getattr(t.transformer, "batch_first", True)
        for i, block in enumerate(t.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):
                p = deep_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], 1)
            x = block(x, attn_mask=am) if batch_first else block(x.transpose(0, 1), attn_mask=am).transpose(0, 1)
        x = t.ln_final(x)
        if pool == "argmax":
            x = x[torch.arange(x.shape[0]), ids[:, :length].argmax(-1)]
        elif pool == "eos":
            x = x[torch.arange(x.shape[0]), (ids[:, :length] == t.text_eos_id).int().argmax(-1)]
        elif pool == "first":
            x = x[:, 0]
        else:
            x = x[:, -1]
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    # vision
    def vision_embed(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        v = self.model.visual
        x = v.conv1(images)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        grid = tuple(v.grid_size) if hasattr(v, "grid_size") else (math.isqrt(v.positional_embedding.shape[0] - 1),) * 2
        x = x + _interp_pos(v.positional_embedding, 1, grid, (int(gh), int(gw))).to(x.dtype)
        return v.ln_pre(x)

    def vision_blocks(self) -> list[BlockParts]:  # noqa: D102
        out = []
        for b in self.model.visual.transformer.resblocks:
            if not isinstance(getattr(b, "attn", None), nn.MultiheadAttention):
                raise ConfigError(f"unsupported open_clip block {type(b).__name__}: AnomalyCLIP needs "
                                  "nn.MultiheadAttention blocks")
            a = b.attn
            out.append(BlockParts(b.ln_1, (a.in_proj_weight, a.in_proj_bias), a.out_proj, b.ls_1, b.ln_2, b.mlp,
                                  b.ls_2, a.num_heads))
        return out

    def vision_head(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        v = self.model.visual
        x = v.ln_post(tokens)
        return x @ v.proj if v.proj is not None else x

    def vision_pool(self, head_tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return head_tokens[:, 1:].mean(1) if self.pool_type == "avg" else head_tokens[:, 0]


def tiny_open_clip(embed_dim: int = 32, image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 4,
                   text_width: int = 32, text_layers: int = 4, seed: int = 0) -> nn.Module:
    """A tiny random-weight open_clip ``CLIP`` (real architecture and tokenizer, test-sized).

    Example:
        >>> m = tiny_open_clip()  # doctest: +SKIP
        >>> m.encode_image(torch.zeros(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 32])
    """
    open_clip = require("open_clip", "AnomalyCLIP on open_clip models")
    torch.manual_seed(seed)
    vision = dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=width // 2)
    text = dict(context_length=77, vocab_size=49408, width=text_width, heads=max(1, text_width // 16),
                layers=text_layers)
    model = open_clip.model.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text).eval()
    model.fv_open_clip_cfg = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}
    return model


# ------------------------------------------------------------------------------------------- checkpoint loading


def check_state_dict(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise a :class:`CheckpointError` listing missing keys, unexpected keys and shape mismatches.

    Example:
        >>> check_state_dict({"a": (2,)}, {"a": (2,)}, "toy")
        >>> check_state_dict({"a": (2,)}, {"a": (3,)}, "toy")
        Traceback (most recent call last):
        ...
        frugalvision.errors.CheckpointError: checkpoint does not fit toy: 1 shape mismatches (a: file (3,) vs ...
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or wrong):
        return

    def show(keys: list[str], fmt=lambda k: k) -> str:
        head = ", ".join(fmt(k) for k in keys[:8])
        return head + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({show(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({show(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches "
                     f"({show(wrong, lambda k: f'{k}: file {tuple(got[k])} vs model {tuple(expected[k])}')})")
    raise CheckpointError(f"checkpoint does not fit {what}: " + "; ".join(parts))


_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints stored in OpenAI's CLIP files


def load_open_clip_checkpoint(model: str | nn.Module, path: str | Path) -> nn.Module:
    """Build an open_clip architecture offline and load a user's checkpoint file into it (strictly).

    Accepts open_clip checkpoints (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``) and OpenAI
    CLIP state dicts saved as plain tensors (keys match open_clip's ``CLIP``); ``module.`` prefixes and the
    integer metadata entries of OpenAI files are dropped. Files needing unsafe unpickling (e.g. TorchScript
    archives) are refused by :func:`frugalvision.engine.load_state_dict_file`.

    Args:
        model: An open_clip model name (``"ViT-L-14-336"``; built with ``pretrained=None``) or a built model.
        path: The weights file.

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        CheckpointError: If keys or shapes disagree; the message lists every kind of mismatch.
    """
    from ...engine import load_state_dict_file

    if isinstance(model, str):
        open_clip = require("open_clip", "loading CLIP checkpoints")
        name = model
        try:
            model = open_clip.create_model(name, pretrained=None)
        except RuntimeError as exc:
            raise ConfigError(f"unknown open_clip model {name!r}: {exc}") from None
    else:
        name = type(model).__name__
    sd = load_state_dict_file(path)
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    expected = model.state_dict()
    if hasattr(model, "text") and not any(k.startswith("text.") for k in sd):  # OpenAI layout into CustomTextCLIP
        text_keys = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        sd = {(f"text.{k}" if k.split(".")[0] in text_keys else k): v for k, v in sd.items()}
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in sd.items()},
                     f"open_clip {name} (file {path})")
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------- prompts


class AnomalyPromptLearner(nn.Module):
    """Object-agnostic learnable prompts (normal, anomalous) plus deep text prompts.

    The prompts ``"X X ... X object."`` and ``"X X ... X damaged object."`` are tokenised once; their word
    embeddings around the ``X`` placeholders are kept as buffers, the placeholders are the learnable ``ctx``.
    """

    def __init__(self, backbone: CLIPBackbone, cfg: AnomalyCLIPConfig) -> None:
        super().__init__()
        placeholder = " ".join(["X"] * cfg.n_ctx)
        texts = [f"{placeholder} {cfg.object_name}.", f"{placeholder} damaged {cfg.object_name}."]
        ids, mask = backbone.tokenize(texts)
        ref, _ = backbone.tokenize([placeholder])
        x_id = ref[0, 1]
        if not bool((ids[:, 1:1 + cfg.n_ctx] == x_id).all()):
            raise ConfigError("the tokenizer does not map each 'X' placeholder to one token at positions 1..n_ctx")
        with torch.no_grad():
            emb = backbone.token_embeddings(ids).float()
        width = emb.shape[-1]
        self.register_buffer("prefix", emb[:, :1].clone())
        self.register_buffer("suffix", emb[:, 1 + cfg.n_ctx:].clone())
        self.register_buffer("ids", ids)
        self.register_buffer("mask", mask)
        self.ctx = nn.Parameter(torch.randn(2, cfg.n_ctx, width) * 0.02)
        self.deep = nn.ParameterList([nn.Parameter(torch.randn(cfg.deep_n_ctx, width) * 0.02)
                                      for _ in range(cfg.deep_depth - 1 if cfg.deep_n_ctx else 0)])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(embeddings (2, L, width), ids, mask, deep prompts)`` of the (normal, anomalous) prompts."""
        return torch.cat([self.prefix, self.ctx, self.suffix], 1), self.ids, self.mask, list(self.deep)


# ----------------------------------------------------------------------------------------------- post-processing


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, 1, H, W)`` maps with edge replication (scipy ``mode='nearest'``).

    Example:
        >>> m = torch.zeros(1, 1, 9, 9); m[0, 0, 4, 4] = 1
        >>> round(float(gaussian_blur(m, _gaussian_kernel(1.0)).sum()), 4)
        1.0
    """
    r = kernel.numel() // 2
    x = F.pad(maps, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


# ---------------------------------------------------------------------------------------------------------- model


@dataclass
class _Features:
    image: torch.Tensor  # (B, D) normalised global feature
    patches: list[torch.Tensor] = field(default_factory=list)  # per layer (B, N, D), normalised
    grid: tuple[int, int] = (0, 0)


class AnomalyCLIP(nn.Module):
    """AnomalyCLIP on a frozen :class:`CLIPBackbone`; ``forward(images)`` returns an :class:`AnomalyOutput`.

    ``images`` are RGB in ``[0, 1]``, ``(B, 3, H, W)``; resizing to ``image_size`` and the backbone's mean/std
    normalisation happen inside, so the exported ONNX graph takes the same input. Call
    :meth:`cache_text_features` after training (``eval()`` does it too): the two text features become a buffer
    and the forward pass is one image-only graph.

    Example:
        >>> from frugalvision.inspect.anomaly.anomalyclip import tiny_open_clip
        >>> cfg = AnomalyCLIPConfig(n_ctx=4, deep_depth=3, deep_n_ctx=2, feature_layers=(2, 4))
        >>> m = AnomalyCLIP(OpenCLIPBackbone(tiny_open_clip()), cfg).eval()  # doctest: +SKIP
        >>> out = m(torch.rand(2, 3, 48, 40))  # doctest: +SKIP
        >>> out.pred_score.shape, out.anomaly_map.shape  # doctest: +SKIP
        (torch.Size([2]), torch.Size([2, 1, 48, 40]))
    """

    def __init__(self, backbone: CLIPBackbone, cfg: AnomalyCLIPConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AnomalyCLIPConfig()
        blocks = backbone.vision_blocks()
        cfg.validate(len(blocks), backbone.text_layers)
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False).eval()
        self.image_size = int(cfg.image_size or backbone.image_size)
        self.dpam_start = cfg.dpam_start if cfg.dpam_start is not None else min(cfg.feature_layers)
        self.prompt_learner = AnomalyPromptLearner(backbone, cfg) if cfg.prompts == "learned" else None
        self.register_buffer("mean", torch.tensor(backbone.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.image_std).view(1, 3, 1, 1))
        self.register_buffer("kernel", _gaussian_kernel(cfg.sigma) if cfg.sigma > 0 else torch.ones(1))
        self.register_buffer("text_cache", torch.zeros(0))

    def train(self, mode: bool = True) -> AnomalyCLIP:
        """Train mode drops the cached text features; eval mode (re)computes them. The backbone stays in eval."""
        super().train(mode)
        self.backbone.eval()
        if mode:
            self.text_cache = torch.zeros(0, device=self.mean.device)
        else:
            self.cache_text_features()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The learnable prompt parameters (empty with fixed prompts)."""
        return list(self.prompt_learner.parameters()) if self.prompt_learner is not None else []

    def compute_text_features(self) -> torch.Tensor:
        """``(2, D)`` normalised (normal, anomalous) text features; differentiable w.r.t. the prompts."""
        if self.prompt_learner is not None:
            emb, ids, mask, deep = self.prompt_learner()
            feats = self.backbone.encode_embeddings(emb, ids, mask, deep)
            return F.normalize(feats.float(), dim=-1)
        out = []
        for states in (NORMAL_STATES, ANOMALY_STATES):
            texts = [t.format(s.format(self.cfg.object_name)) for s in states for t in FIXED_TEMPLATES]
            with torch.no_grad():
                f = F.normalize(self.backbone.encode_text(texts).float(), dim=-1).mean(0)
            out.append(F.normalize(f, dim=-1))
        return torch.stack(out)

    @torch.no_grad()
    def cache_text_features(self) -> torch.Tensor:
        """Compute the text features once and keep them as the ``text_cache`` buffer (used by ``forward``)."""
        self.text_cache = self.compute_text_features().detach()
        return self.text_cache

    def text_features(self) -> torch.Tensor:
        """The cached text features when present, else freshly computed ones."""
        return self.text_cache if self.text_cache.numel() else self.compute_text_features()

    def encode_images(self, images: torch.Tensor) -> _Features:
        """Global feature (ordinary path) and the V-V patch features of ``feature_layers`` (DPAM)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        bb = self.backbone
        tokens = bb.vision_embed(x)
        prefix = bb.num_prefix_tokens
        n = tokens.shape[1] - prefix
        side = math.isqrt(n)
        grid = (side, n // side)
        vv: torch.Tensor | None = None
        layer_tokens: list[torch.Tensor] = []
        wanted = set(self.cfg.feature_layers)
        for i, p in enumerate(bb.vision_blocks(), start=1):
            h = p.norm1(tokens)
            if i < self.dpam_start:
                tokens = tokens + p.ls1(_attention(h, p, vv=False))
            else:
                ori, vvo = _attention(h, p, vv=True)
                vv = (tokens if vv is None else vv) + p.ls1(vvo)
                tokens = tokens + p.ls1(ori)
            tokens = tokens + p.ls2(p.mlp(p.norm2(tokens)))
            if i in wanted:
                layer_tokens.append(vv if vv is not None else tokens)
        image = F.normalize(bb.vision_pool(bb.vision_head(tokens)).float(), dim=-1)
        patches = [F.normalize(bb.vision_head(t)[:, prefix:].float(), dim=-1) for t in layer_tokens]
        return _Features(image, patches, grid)

    def logits(self, feats: _Features, text: torch.Tensor, size: tuple[int, int]
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image logits ``(B, 2)`` and per-layer probability maps ``(B, 2, H, W)`` at ``size``."""
        t = self.cfg.temperature
        img_logits = feats.image @ text.t() / t
        maps = []
        for p in feats.patches:
            prob = (p @ text.t() / t).softmax(-1)  # (B, N, 2)
            prob = prob.transpose(1, 2).reshape(prob.shape[0], 2, *feats.grid)
            maps.append(F.interpolate(prob, size=size, mode="bilinear", align_corners=False))
        return img_logits, maps

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Image score ``(B,)`` and anomaly map ``(B, 1, H, W)`` of RGB images in ``[0, 1]``."""
        feats = self.encode_images(images)
        img_logits, maps = self.logits(feats, self.text_features(), tuple(images.shape[-2:]))
        score = img_logits.softmax(-1)[:, 1]
        amap = torch.stack([(m[:, 1:2] + 1 - m[:, 0:1]) / 2 for m in maps]).mean(0)
        if self.cfg.sigma > 0:
            amap = gaussian_blur(amap, self.kernel)
        return AnomalyOutput(score, amap)


def _attention(h: torch.Tensor, p: BlockParts, vv: bool):
    """Multi-head self-attention of a block; with ``vv`` also the V-V attention from the same ``v``."""
    b, n, _ = h.shape
    qkv = p.qkv(h) if isinstance(p.qkv, nn.Module) else F.linear(h, p.qkv[0], p.qkv[1])
    heads = p.num_heads
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = q.shape[-1] ** -0.5
    ori = ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    ori = p.proj(ori.transpose(1, 2).reshape(b, n, -1))
    if not vv:
        return ori
    vvo = ((v * scale) @ v.transpose(-2, -1)).softmax(-1) @ v
    return ori, p.proj(vvo.transpose(1, 2).reshape(b, n, -1))


# ----------------------------------------------------------------------------------------------------- training


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities ``(B, C, H, W)`` against integer targets ``(B, H, W)``.

    As in the official AnomalyCLIP loss: one-hot targets clamped to ``[smooth/(C-1), 1-smooth]``,
    ``pt = <onehot, p> + smooth``, loss ``-(1-pt)^gamma log pt`` averaged over pixels.

    Example:
        >>> p = torch.tensor([[[[0.9]], [[0.1]]]])
        >>> round(float(focal_loss(p, torch.zeros(1, 1, 1), gamma=0.0)), 4)
        0.1054
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    onehot = F.one_hot(target.reshape(-1).long(), c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def binary_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b (2|p t| + 1) / (|p| + |t| + 1)`` over images (official smoothing of 1).

    Example:
        >>> t = torch.zeros(1, 4, 4); t[0, :2] = 1
        >>> float(binary_dice_loss(t, t))
        0.0
    """
    p, t = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1).to(pred.dtype)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def anomalyclip_loss(img_logits: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
                     masks: torch.Tensor, local_weight: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Glocal loss: ``(local, global)`` = (weighted focal + dice on every layer's maps, image cross-entropy)."""
    gt = (masks > 0.5).float()
    local = img_logits.new_zeros(())
    for m in maps:
        local = local + focal_loss(m, gt) + binary_dice_loss(m[:, 1], gt) + binary_dice_loss(m[:, 0], 1 - gt)
    return local_weight * local, F.cross_entropy(img_logits, labels.long())


@torch.no_grad()
def encode_samples(model: AnomalyCLIP, images: torch.Tensor, batch_size: int = 16, progress: bool = False
                   ) -> _Features:
    """Frozen image features of a whole set (global + per-layer patches), batched."""
    chunks = [model.encode_images(images[i:i + batch_size])
              for i in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress, leave=False)]
    return _Features(torch.cat([c.image for c in chunks]),
                     [torch.cat([c.patches[j] for c in chunks]) for j in range(len(chunks[0].patches))],
                     chunks[0].grid)


def fit_anomalyclip(model: AnomalyCLIP, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    epochs: int = 15, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, progress: bool = True
                    ) -> list[float]:
    """Learn the prompts on an auxiliary set with pixel masks (Adam, betas (0.5, 0.999), as the official code).

    The backbone is frozen and its image features do not depend on the prompts, so they are computed once and
    reused every epoch (exactly what per-step recomputation under ``no_grad`` gives).

    Args:
        model: An :class:`AnomalyCLIP` with learned prompts.
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        masks: ``(N, H, W)`` 0/1 ground truth.
        labels: ``(N,)`` 0 good / 1 anomalous.
        epochs: Passes over the set.
        batch_size: Images per step.
        lr: Adam learning rate.
        seed: Seed of the shuffling.
        progress: Show a progress bar.

    Returns:
        The mean total loss of every epoch.
    """
    if model.prompt_learner is None:
        raise ConfigError("fixed prompts have nothing to train; use AnomalyCLIPConfig(prompts='learned')")
    if not (len(images) == len(masks) == len(labels)) or len(images) == 0:
        raise DataError(f"images, masks and labels must be non-empty and equally long, got "
                        f"{len(images)}, {len(masks)}, {len(labels)}")
    if masks.shape[-2:] != images.shape[-2:]:
        raise DataError(f"masks {tuple(masks.shape[-2:])} must have the images' size {tuple(images.shape[-2:])}")
    model.train()
    feats = encode_samples(model, images, progress=progress)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr, betas=(0.5, 0.999))
    history = []
    size = tuple(images.shape[-2:])
    for _ in tqdm(range(epochs), desc="AnomalyCLIP prompts", disable=not progress):
        order = torch.randperm(len(images), generator=gen)
        total = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            sub = _Features(feats.image[idx], [p[idx] for p in feats.patches], feats.grid)
            img_logits, maps = model.logits(sub, model.compute_text_features(), size)
            local, glob = anomalyclip_loss(img_logits, maps, labels[idx], masks[idx], model.cfg.local_weight)
            opt.zero_grad()
            loss = local + glob
            loss.backward()
            opt.step()
            total.append(float(loss.detach()))
        history.append(float(np.mean(total)))
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------------- model files


def _build_backbone(spec: dict) -> CLIPBackbone:
    kind = spec.get("kind")
    if kind == "open_clip":
        open_clip = require("open_clip", "AnomalyCLIP on open_clip models")
        if spec.get("open_clip_cfg"):
            model = open_clip.model.CLIP(**spec["open_clip_cfg"])
            model.fv_open_clip_cfg = spec["open_clip_cfg"]
        else:
            model = open_clip.create_model(spec["model_name"], pretrained=None)
        return OpenCLIPBackbone(model.eval(), model_name=spec["model_name"])
    if kind == "domain":
        from .domain_clip import DomainCLIP

        return DomainCLIP(**spec["arch"])
    raise CheckpointError(f"unknown AnomalyCLIP backbone kind {kind!r} (expected 'open_clip' or 'domain')")


def build_anomalyclip(spec: dict) -> AnomalyCLIP:
    """An AnomalyCLIP of the architecture described by ``spec`` (as stored by :func:`save_anomalyclip`), eval mode."""
    cfg = dict(spec["config"])
    cfg["feature_layers"] = tuple(cfg["feature_layers"])
    return AnomalyCLIP(_build_backbone(spec["backbone"]), AnomalyCLIPConfig(**cfg)).eval()


def save_anomalyclip(model: AnomalyCLIP, path: str | Path, **meta) -> Path:
    """Save an AnomalyCLIP (backbone, prompts, cached text features) as one safetensors model file."""
    from ...models import save_model_file

    if not hasattr(model.backbone, "build_spec"):
        raise ConfigError(f"{type(model.backbone).__name__} cannot be saved: it has no build_spec()")
    model.eval()
    spec = {"backbone": model.backbone.build_spec(), "config": asdict(model.cfg)}
    return save_model_file(model, path, "anomalyclip", {}, task="anomaly", method="anomalyclip", anomalyclip=spec,
                           **meta)


def load_anomalyclip(path: str | Path) -> AnomalyCLIP:
    """Rebuild and load a model file written by :func:`save_anomalyclip` (strict key/shape check)."""
    from ...engine import load_state_dict_file
    from ...models.factory import read_model_info

    info = read_model_info(path)
    if "anomalyclip" not in info:
        raise CheckpointError(f"{path} is not an AnomalyCLIP model file (write one with save_anomalyclip)")
    model = build_anomalyclip(info["anomalyclip"])
    sd = load_state_dict_file(path)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()},
                     {k: tuple(v.shape) for k, v in sd.items()}, f"AnomalyCLIP (file {path})")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def build_for_pipeline(config: dict, category: str) -> AnomalyCLIP:
    """``frugalvision anomaly ... method=anomalyclip``: the zero-shot model stored in ``backbone_weights``.

    AnomalyCLIP is category-agnostic: every category gets the same model (prompts learned on auxiliary
    categories), read from the AnomalyCLIP model file given as ``backbone_weights=`` (written by
    :func:`save_anomalyclip`, e.g. by ``experiments/anomalyclip_zero_shot.py --save FILE``).
    """
    weights = str(config.get("backbone_weights") or "")
    if not weights or not Path(weights).is_file():
        raise ConfigError(f"method=anomalyclip needs backbone_weights=<AnomalyCLIP model file> (written by "
                          f"frugalvision.inspect.anomaly.anomalyclip.save_anomalyclip); got {weights!r}")
    return load_anomalyclip(weights)

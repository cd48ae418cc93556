"""AnomalyCLIP: zero-shot anomaly detection with object-agnostic prompts learned on a frozen CLIP.

This module holds the pure, exportable model; its training (the glocal loss as an engine ``Task`` and the
prompt-learning loop) lives in :mod:`frugalvision.inspect.anomaly.training`.

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
p_norm) / 2`` upsampled bilinearly to the input size and smoothed with a Gaussian.

The backbone is reached through a small adapter interface
(:class:`~frugalvision.inspect.anomaly.clip_backbone.CLIPBackbone`); :class:`OpenCLIPBackbone` wraps any ViT
open_clip model and :class:`~frugalvision.inspect.anomaly.domain_clip.DomainCLIP` implements it too.

Model files: ``save_model_file(model, path, "anomalyclip", "anomalyclip", model.model_kwargs(), **meta)`` stores
the architecture (backbone spec + config) with the weights; ``frugalvision.weights.load_model_file`` rebuilds it
through :func:`build_anomalyclip_from_info`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..._deps import require
from ...errors import CheckpointError, ConfigError, DataError
from ...utils.filters import gaussian_blur, gaussian_kernel1d
from ...weights import load_weights
from .base import AnomalyOutput
from .clip_backbone import BlockParts, CLIPBackbone

__all__ = [
    "ANOMALY_STATES", "FIXED_TEMPLATES", "NORMAL_STATES", "AnomalyCLIP", "AnomalyCLIPConfig", "AnomalyPromptLearner",
    "CLIPFeatures", "OpenCLIPBackbone", "build_anomalyclip", "build_anomalyclip_from_info",
    "load_open_clip_checkpoint", "open_clip_key_map", "tiny_open_clip",
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


_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints stored in OpenAI's CLIP files
_OPENAI_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def open_clip_key_map(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The key mapping of :func:`load_open_clip_checkpoint` for ``model``: OpenAI's layout to open_clip's.

    Drops ``module.`` prefixes and the integer entries of OpenAI files; when ``model`` keeps its text tower in
    ``.text`` (``CustomTextCLIP``) and the file does not, the text tower's keys move under ``text.``.

    Example:
        >>> fn = open_clip_key_map(nn.Module())
        >>> sorted(fn({"module.visual.proj": torch.zeros(1), "context_length": torch.tensor(77)}))
        ['visual.proj']
    """
    custom_text = hasattr(model, "text")

    def key_map(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
        if custom_text and not any(k.startswith("text.") for k in sd):  # OpenAI layout into CustomTextCLIP
            sd = {(f"text.{k}" if k.split(".")[0] in _OPENAI_TEXT_KEYS else k): v for k, v in sd.items()}
        return sd

    return key_map


def load_open_clip_checkpoint(model: str | nn.Module, path: str | Path) -> nn.Module:
    """Build an open_clip architecture offline and load a user's checkpoint file into it (strictly).

    Accepts open_clip checkpoints (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``) and OpenAI
    CLIP state dicts saved as plain tensors (keys mapped by :func:`open_clip_key_map`). Files are read by
    :func:`frugalvision.weights.read_weights` (files needing unsafe unpickling, e.g. TorchScript archives, are
    refused) and checked by :func:`frugalvision.weights.load_weights`.

    Args:
        model: An open_clip model name (``"ViT-L-14-336"``; built with ``pretrained=None``) or a built model.
        path: The weights file.

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        CheckpointError: If keys or shapes disagree; the message lists every kind of mismatch.
    """
    if isinstance(model, str):
        open_clip = require("open_clip", "loading CLIP checkpoints")
        name = model
        try:
            model = open_clip.create_model(name, pretrained=None)
        except RuntimeError as exc:
            raise ConfigError(f"unknown open_clip model {name!r}: {exc}") from None
    else:
        name = type(model).__name__
    load_weights(model, path, what=f"open_clip {name}", key_map=open_clip_key_map(model))
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


# ---------------------------------------------------------------------------------------------------------- model


class CLIPFeatures(NamedTuple):
    """Image features of a batch (what the maps and the image score are computed from).

    Attributes:
        image: ``(B, D)`` normalised global feature.
        patches: Per feature layer, ``(B, N, D)`` normalised patch features.
        grid: The patch grid ``(h, w)``, ``h * w = N``.
    """

    image: torch.Tensor
    patches: list[torch.Tensor]
    grid: tuple[int, int]


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
        self.register_buffer("kernel", gaussian_kernel1d(cfg.sigma) if cfg.sigma > 0 else torch.ones(1))
        # the text features of the current prompts, always (2, D): a model file's shapes do not depend on the mode
        # the model was saved in, and loading recomputes it from the loaded prompts (eval mode)
        self.register_buffer("text_cache", torch.zeros(0))
        self.cache_text_features()

    def train(self, mode: bool = True) -> AnomalyCLIP:
        """Train mode computes text features afresh each forward; eval mode caches them. The backbone stays in eval."""
        super().train(mode)
        self.backbone.eval()
        if not mode:
            self.cache_text_features()
        return self

    def model_kwargs(self) -> dict[str, Any]:
        """The architecture as stored in a model file (backbone spec + config); see :func:`build_anomalyclip`."""
        try:
            backbone = self.backbone.build_spec()
        except NotImplementedError:
            raise ConfigError(f"{type(self.backbone).__name__} cannot be saved in a model file: it does not "
                              "implement CLIPBackbone.build_spec()") from None
        return {"backbone": backbone, "config": asdict(self.cfg)}

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
        """The cached text features in eval mode, freshly computed (differentiable) ones in train mode."""
        return self.compute_text_features() if self.training else self.text_cache

    def encode_images(self, images: torch.Tensor) -> CLIPFeatures:
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
        return CLIPFeatures(image, patches, grid)

    def logits(self, feats: CLIPFeatures, text: torch.Tensor, size: tuple[int, int]
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
            amap = gaussian_blur(amap, self.kernel, padding="replicate")
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


# ---------------------------------------------------------------------------------------------------- model files


def _build_backbone(spec: Mapping[str, Any]) -> CLIPBackbone:
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


def build_anomalyclip(spec: Mapping[str, Any]) -> AnomalyCLIP:
    """An AnomalyCLIP of the architecture ``spec`` (:meth:`AnomalyCLIP.model_kwargs`), fresh weights, eval mode.

    Example:
        >>> m = AnomalyCLIP(OpenCLIPBackbone(tiny_open_clip()), AnomalyCLIPConfig(n_ctx=2, deep_depth=2,
        ...                 deep_n_ctx=1, feature_layers=(2, 4)))  # doctest: +SKIP
        >>> build_anomalyclip(m.model_kwargs()).cfg == m.cfg  # doctest: +SKIP
        True
    """
    cfg = dict(spec["config"])
    cfg["feature_layers"] = tuple(cfg["feature_layers"])
    return AnomalyCLIP(_build_backbone(spec["backbone"]), AnomalyCLIPConfig(**cfg)).eval()


def build_anomalyclip_from_info(info: Mapping[str, Any]) -> AnomalyCLIP:
    """The architecture of an ``anomalyclip`` model file (weights not loaded); the kind's build function.

    Reads the spec from ``info["model_kwargs"]``; files written before model-file kinds existed kept it in
    ``info["anomalyclip"]``.
    """
    spec = info.get("model_kwargs") or info.get("anomalyclip")
    if not spec or "backbone" not in spec or "config" not in spec:
        raise CheckpointError(f"AnomalyCLIP model file {info.get('name')!r} has no architecture description "
                              "(model_kwargs with 'backbone' and 'config'); it was written by an old version that "
                              "stored only a reference to another file: re-save the model with save_model_file("
                              "model, path, 'anomalyclip', 'anomalyclip', model.model_kwargs())")
    return build_anomalyclip(spec)

"""SLiMe: segment like me, from one annotated image, with a frozen text-conditioned diffusion model's attention.

SLiMe (ICLR 2024) freezes a Stable Diffusion model and optimises only the text-encoder *output* embeddings of
``K - 1`` part tokens (prompt ``"part part ... part"``; the start token's embedding stays fixed and stands for the
background) so that the UNet's attention maps reproduce one annotated mask. New images are then segmented at the
same granularity. The numerics follow the official code (``src/slime.py``, ``src/stable_difusion.py``,
``src/arguments.py``):

* **Attention** is read through diffusers' attention processors (:class:`AttentionRecorder`, no patching of the
  library): the pre-softmax scores of the chosen layers are kept. Cross-attention maps take the scores of the
  ``K`` first tokens; self-attention maps are softmaxed over keys. Both are bilinearly resized to a common size
  and averaged over heads, then over layers. Default layers (:func:`default_layers`): in SD-2.1's layout,
  cross-attention of ``up_blocks[1].attentions[0..2]`` and ``up_blocks[2].attentions[0..1]``, self-attention of
  ``up_blocks[3].attentions[0..2]``; the rule for other depths is in :func:`default_layers`.
* **Loss**: ``CE_w(cross, mask) + 1.0 * K * MSE(sum_j softmax(cross)_j * self_j, one_hot(mask)) + 0.005 *
  MSE(noise prediction with guidance 100, noise)``; the class weights give the background 1 and each annotated
  part ``(part pixels) / (its pixels)``; the timestep is uniform in ``[5, 100]`` of 1000 (scaled to the
  schedule's length); Adam with lr 0.1; the best embeddings by validation mIoU are kept.
* **Inference**: cross-attention softmaxed over all tokens; parts whose peak is below 0.2 are dropped from a
  crop; the first kept map (the background) is zeroed below its mean; each part's map is propagated through
  self-attention and rescaled to its cross-attention range; overlapping crops (2 per side, 400/512 of the side)
  are averaged; argmax.

One change from the official code, with identical results: the unconditional UNet pass (needed only for the
guided noise loss) runs without autograd and separately from the conditional one, and inference runs the
conditional pass only (its maps do not depend on the unconditional half of the batch). This halves inference
time and the memory of the backward pass.

Two backbones work: :meth:`StableDiffusionBackbone.from_pretrained` loads a Stable Diffusion pipeline saved in
diffusers' format from a local folder (e.g. the user's SD-2.1-base); any object with the
:class:`DiffusionBackbone` interface (a UNet2DConditionModel, a scheduler, image encoding and prompt states)
works too.

Example:
    >>> import torch
    >>> from frugalvision.inspect.slime import Slime, SlimeConfig, tiny_stable_diffusion
    >>> backbone = tiny_stable_diffusion(seed=0)
    >>> img = torch.rand(3, 32, 32); mask = torch.zeros(32, 32, dtype=torch.long); mask[8:20, 8:24] = 1
    >>> slime = Slime(backbone, SlimeConfig(num_parts=2, epochs=2, train_mask_size=16))
    >>> history = slime.fit([img], [mask], progress=False)
    >>> slime.predict(img).shape
    torch.Size([32, 32])
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..errors import CheckpointError, ConfigError, DataError

__all__ = [
    "AttentionRecorder",
    "DiffusionBackbone",
    "Slime",
    "SlimeConfig",
    "StableDiffusionBackbone",
    "attention_losses",
    "class_weights",
    "crop_boxes",
    "crop_part_maps",
    "cross_maps",
    "default_layers",
    "mean_iou",
    "self_maps",
    "tiny_clip_text",
    "tiny_stable_diffusion",
]


@dataclass
class SlimeConfig:
    """SLiMe's settings; the defaults are the official ones (``src/arguments.py``).

    Args:
        num_parts: ``K``, the number of classes including the background (token 0, the start token).
        cross_layers: Attention modules (dotted names under the UNet) whose cross-attention is used; ``None``: the
            rule of :func:`default_layers`.
        self_layers: Attention modules whose self-attention is used; ``None``: the rule of :func:`default_layers`.
        epochs: Passes over the training images, one image per step (official: 200).
        lr: Adam's learning rate on the part embeddings.
        train_t: Timestep range, inclusive, on a 1000-step schedule (scaled to the backbone's schedule).
        test_t: Inference timestep on a 1000-step schedule.
        train_mask_size: Size of the attention maps and masks in the losses (and of the self-attention maps at
            inference).
        self_attention_loss_coef: Weight of the self-attention MSE term.
        sd_loss_coef: Weight of the noise-prediction term.
        guidance_scale: Classifier-free guidance scale inside the noise-prediction term.
        patch_threshold: A part is kept in a crop only where its cross-attention peak reaches this.
        test_softmax: ``all`` (official): inference softmaxes the cross-attention over every token of the prompt;
            ``parts``: over the ``K`` part tokens only, as the training loss does (for text encoders whose start
            token is no attention sink, e.g. MiniLM, where ``all`` leaves every part below the threshold).
        class_weighting: ``official`` or ``balanced`` cross-entropy weights (see :func:`class_weights`).
        inference: ``official`` (crops, peak threshold, self-attention refinement, argmax) or ``calibrated``
            (not in the paper): each part's attention probability (:meth:`Slime.part_probabilities`) against a
            threshold that :meth:`Slime.calibrate` picks on the annotated images at the end of :meth:`Slime.fit`
            (best IoU there). For parts too small to win the argmax, such as defects (docs/slime.md).
        crop_fraction: Inference crop side as a fraction of the image side (official: 400 / 512).
        crops_per_side: Inference crops per side (official: 2, so 4 crops).
        min_crop_ratio: Training crops keep 0.8 to 1 of the side (official ``--min_crop_ratio``).
        rotation: Training rotation range in degrees (official: 30; 10 for faces).
        augment: Flip, blur, crop and rotate the training images as the official data module does.
        seed: Seed of the augmentation, timesteps and noise.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """

    num_parts: int = 2
    cross_layers: tuple[str, ...] | None = None
    self_layers: tuple[str, ...] | None = None
    epochs: int = 200
    lr: float = 0.1
    train_t: tuple[int, int] = (5, 100)
    test_t: int = 100
    train_mask_size: int = 64
    self_attention_loss_coef: float = 1.0
    sd_loss_coef: float = 0.005
    guidance_scale: float = 100.0
    patch_threshold: float = 0.2
    test_softmax: str = "all"
    class_weighting: str = "official"
    inference: str = "official"
    crop_fraction: float = 400 / 512
    crops_per_side: int = 2
    min_crop_ratio: float = 0.8
    rotation: float = 30.0
    augment: bool = True
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.num_parts < 2:
            raise ConfigError(f"num_parts={self.num_parts}: SLiMe needs the background and at least one part (>= 2)")
        lo, hi = self.train_t
        if not 0 <= lo <= hi < 1000 or not 0 <= self.test_t < 1000:
            raise ConfigError(f"train_t={self.train_t}, test_t={self.test_t}: timesteps are on a 1000-step "
                              "schedule, 0 <= low <= high <= 999")
        if not 0 < self.crop_fraction <= 1 or self.crops_per_side < 1:
            raise ConfigError(f"crop_fraction={self.crop_fraction} must be in (0, 1] and crops_per_side="
                              f"{self.crops_per_side} at least 1")
        if self.class_weighting not in ("official", "balanced"):
            raise ConfigError(f"class_weighting={self.class_weighting!r}: choose official or balanced")
        if self.test_softmax not in ("all", "parts"):
            raise ConfigError(f"test_softmax={self.test_softmax!r}: choose all (official) or parts")
        if self.inference not in ("official", "calibrated"):
            raise ConfigError(f"inference={self.inference!r}: choose official or calibrated")
        if self.epochs < 0 or self.train_mask_size < 1:
            raise ConfigError(f"epochs={self.epochs} and train_mask_size={self.train_mask_size} must be positive")
        self.train_t = (int(lo), int(hi))
        for name in ("cross_layers", "self_layers"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(v))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlimeConfig:
        """The config from :func:`dataclasses.asdict`'s output (lists back to tuples); unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ConfigError(f"unknown SLiMe settings {unknown}; known: {sorted(names)}")
        d = dict(d)
        for k in ("train_t", "cross_layers", "self_layers"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# ------------------------------------------------------------------------------------------- backbones
class DiffusionBackbone(Protocol):
    """What SLiMe needs of a text-conditioned diffusion model (all of it frozen).

    Attributes:
        unet: A diffusers ``UNet2DConditionModel`` (``unet(x, t, encoder_hidden_states=...).sample``).
        scheduler: A diffusers noise scheduler (``add_noise``, ``config.num_train_timesteps``).
        image_size: The square input side the model is run at (512 for SD-2.1-base).
    """

    unet: nn.Module
    scheduler: Any
    image_size: int

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` images in ``[0, 1]`` -> the UNet's input space (latents)."""
        ...

    def prompt_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states ``(B, L, D)`` of the text encoder for the prompts (padded to its length)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description saved into SLiMe's files (what backbone the embeddings belong to)."""
        ...


class StableDiffusionBackbone:
    """A Stable Diffusion pipeline's frozen parts: VAE encoder, CLIP text encoder and tokenizer, UNet, scheduler.

    Build it with :meth:`from_pretrained` from a local folder in diffusers' pipeline format (``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``), or from the loaded parts.

    Args:
        vae: diffusers ``AutoencoderKL``; only its encoder is used (latents are sampled and scaled by its
            ``scaling_factor``, as the official code does).
        text_encoder: transformers ``CLIPTextModel`` (or any encoder whose first output is token states).
        tokenizer: Its tokenizer.
        unet: diffusers ``UNet2DConditionModel``.
        scheduler: A diffusers scheduler with ``add_noise`` (DDIM in the official code).
        source: Where the pipeline came from, for saved files.
    """

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, unet: nn.Module, scheduler: Any,
                 source: str = "") -> None:
        self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler = (vae, text_encoder, tokenizer,
                                                                                 unet, scheduler)
        self.source = source
        for m in (vae, text_encoder, unet):
            m.eval().requires_grad_(False)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * factor
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionBackbone:
        """Load a Stable Diffusion pipeline saved in diffusers' format from a local folder (nothing is downloaded).

        Example:
            >>> StableDiffusionBackbone.from_pretrained("/nonexistent")
            Traceback (most recent call last):
            ...
            frugalvision.errors.CheckpointError: /nonexistent is not a Stable Diffusion folder: ...
        """
        folder = Path(folder).expanduser()
        parts = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        if missing := [p for p in parts if not (folder / p).is_dir()]:
            lacks = ", ".join(m + "/" for m in missing)
            raise CheckpointError(f"{folder} is not a Stable Diffusion folder: it lacks {lacks} (a pipeline"
                                  " saved with diffusers' save_pretrained, e.g. stable-diffusion-2-1-base)")
        diffusers = require("diffusers", "SLiMe on Stable Diffusion", extra="diffusion")
        transformers = require("transformers", "SLiMe on Stable Diffusion (its CLIP text encoder)", extra="lm")
        kw = {"local_files_only": True}
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
            unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **kw)
            scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer", **kw)
            text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, **kw)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"could not load the Stable Diffusion pipeline in {folder}: {first}") from None
        return cls(vae, text_encoder, tokenizer, unet, scheduler, source=str(folder))

    def to(self, device: torch.device | str) -> StableDiffusionBackbone:
        """Move the frozen parts to ``device``."""
        for m in (self.vae, self.text_encoder, self.unet):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the UNet is."""
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> scaled VAE latents (sampled, as the official code does)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def prompt_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP token states ``(B, 77, D)`` of the prompts, padded to the tokenizer's length."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def describe(self) -> dict[str, Any]:
        """What the embeddings were fitted on (saved in SLiMe's files)."""
        return {"kind": "stable-diffusion", "source": self.source, "image_size": self.image_size,
                "token_dim": int(self.text_encoder.config.hidden_size)}


def tiny_clip_text(hidden_size: int = 16, max_length: int = 16) -> tuple[Any, Any]:
    """A random one-layer CLIP text encoder and a CLIP BPE tokenizer that spells "part" and single letters.

    For toy diffusers pipelines in tests (no files are downloaded).

    Example:
        >>> tok, enc = tiny_clip_text()
        >>> enc(**tok(["part"], return_tensors="pt")).last_hidden_state.shape[-1]
        16
    """
    import tempfile

    transformers = require("transformers", "a toy CLIP text encoder", extra="lm")
    with tempfile.TemporaryDirectory() as tmp:
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = {c: i for i, c in enumerate(letters)}
        vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
        merges = ["p a", "pa r", "par t</w>"]
        for tok in ("pa", "par", "part</w>", "<|startoftext|>", "<|endoftext|>"):
            vocab[tok] = len(vocab)
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = transformers.CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                               model_max_length=max_length, pad_token="<|endoftext|>")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    return tokenizer, text_encoder


def tiny_stable_diffusion(seed: int = 0, image_size: int = 32, folder: str | Path | None = None,
                          ) -> StableDiffusionBackbone:
    """A randomly initialised Stable Diffusion with SD-2.1's module layout at toy width (for tests and smoke runs).

    Four down and four up blocks of SD-2.1's types (``UpBlock2D`` then three ``CrossAttnUpBlock2D`` with three
    attentions each), a two-level VAE and a one-layer CLIP text encoder with a tokenizer that knows "part". With
    ``folder`` the pipeline is also saved there in diffusers' format and reloaded through
    :meth:`StableDiffusionBackbone.from_pretrained`, the path a real SD-2.1 folder takes.
    """
    diffusers = require("diffusers", "a toy Stable Diffusion", extra="diffusion")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=(2, 2, 4, 4),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, use_linear_projection=True)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=image_size)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer, text_encoder = tiny_clip_text(hidden_size=16)
    backbone = StableDiffusionBackbone(vae, text_encoder, tokenizer, unet, scheduler, source="tiny")
    if folder is None:
        return backbone
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return StableDiffusionBackbone.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- attention
def _attentions(unet: nn.Module, block: nn.Module) -> list[nn.Module]:
    return list(getattr(block, "attentions", None) or [])


def default_layers(unet: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """SLiMe's attention layers for a UNet: ``(cross_layers, self_layers)``, dotted module names.

    The rule (which gives the official list on SD-2.1's layout): self-attention of every attention module of the
    last, highest-resolution up block that has attention; cross-attention of every attention module of the
    earlier up blocks that have attention, except the very last of them (the one next to the highest resolution),
    unless it is the only one. A UNet with a single attention up block uses that block for both.

    Example:
        >>> from frugalvision.inspect.slime import tiny_stable_diffusion
        >>> cross, self_ = default_layers(tiny_stable_diffusion().unet)
        >>> [c.split(".transformer")[0] for c in cross]  # doctest: +NORMALIZE_WHITESPACE
        ['up_blocks.1.attentions.0', 'up_blocks.1.attentions.1', 'up_blocks.1.attentions.2',
         'up_blocks.2.attentions.0', 'up_blocks.2.attentions.1']
        >>> [s.split(".transformer")[0] for s in self_]
        ['up_blocks.3.attentions.0', 'up_blocks.3.attentions.1', 'up_blocks.3.attentions.2']
    """
    ups = [(i, _attentions(unet, b)) for i, b in enumerate(getattr(unet, "up_blocks", []))]
    ups = [(i, a) for i, a in ups if a]
    if not ups:
        raise ConfigError(f"{type(unet).__name__} has no up block with attention: SLiMe reads cross- and "
                          "self-attention maps of a text-conditioned UNet (diffusers' UNet2DConditionModel)")

    def names(i: int, att: list[nn.Module], which: str) -> list[str]:
        return [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.{which}" for j in range(len(att))]

    last_i, last_att = ups[-1]
    self_layers = names(last_i, last_att, "attn1")
    if len(ups) == 1:
        return tuple(names(last_i, last_att, "attn2")), tuple(self_layers)
    cross = [n for i, a in ups[:-1] for n in names(i, a, "attn2")]
    return tuple(cross[:-1] if len(cross) > 1 else cross), tuple(self_layers)


class _RecordingProcessor:
    """diffusers' plain attention, computed explicitly so that the pre-softmax scores can be kept."""

    def __init__(self, name: str, recorder: AttentionRecorder) -> None:
        self.name, self.recorder = name, recorder

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.bmm(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if self.recorder.active:
            self.recorder.maps[self.name] = scores.view(-1, attn.heads, *scores.shape[1:])
        probs = scores.float().softmax(-1).to(v.dtype) if attn.upcast_softmax else scores.softmax(-1).to(v.dtype)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionRecorder:
    """Keep the pre-softmax attention scores of named attention modules of a diffusers UNet while it runs.

    Installs its own attention processors on those modules only (through ``unet.set_attn_processor``; the
    library is not patched) and puts the originals back on :meth:`close` or when used as a context manager.
    After a forward pass ``maps[name]`` holds ``(batch, heads, queries, keys)`` scores.

    Example:
        >>> from frugalvision.inspect.slime import tiny_stable_diffusion
        >>> sd = tiny_stable_diffusion()
        >>> name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
        >>> with AttentionRecorder(sd.unet, [name]) as rec:
        ...     _ = sd.unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 16, 16))
        >>> tuple(rec.maps[name].shape)  # batch, heads, 16x16 queries, 16x16 keys
        (1, 2, 256, 256)
    """

    def __init__(self, unet: nn.Module, layers: Sequence[str]) -> None:
        self.unet, self.layers, self.maps, self.active = unet, list(layers), {}, True
        procs = dict(unet.attn_processors)
        self._original = dict(procs)
        for name in self.layers:
            key = f"{name}.processor"
            if key not in procs:
                near = sorted(k.removesuffix(".processor") for k in procs if k.startswith(name.split(".")[0]))[:6]
                raise ConfigError(f"the UNet has no attention module {name!r}; some it has: {near}")
            procs[key] = _RecordingProcessor(name, self)
        unet.set_attn_processor(procs)

    def close(self) -> None:
        """Put the UNet's original attention processors back."""
        self.unet.set_attn_processor(self._original)

    def __enter__(self) -> AttentionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pop(self) -> dict[str, torch.Tensor]:
        """The recorded scores, emptying the store."""
        maps, self.maps = self.maps, {}
        return maps


def _side(n: int, layer: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ConfigError(f"attention layer {layer} has {n} queries, not a square grid: SLiMe needs square inputs")
    return s


def cross_maps(scores: dict[str, torch.Tensor], layers: Sequence[str], num_parts: int, size: int,
               softmax_all: bool) -> torch.Tensor:
    """``(K, size, size)`` cross-attention of the first ``K`` tokens, averaged over heads and layers.

    ``softmax_all=False`` (training) keeps the raw scores of the ``K`` tokens (the loss softmaxes them among
    themselves); ``True`` (inference) softmaxes over every token first. ``scores[name]`` is ``(heads, queries,
    tokens)`` of one image.
    """
    out = []
    for name in layers:
        s = scores[name]
        if softmax_all:
            s = s.softmax(-1)
        side = _side(s.shape[1], name)
        m = s[..., :num_parts].reshape(s.shape[0], side, side, num_parts).permute(0, 3, 1, 2)
        out.append(F.interpolate(m, size=size, mode="bilinear").mean(0))
    return torch.stack(out).mean(0)


def self_maps(scores: dict[str, torch.Tensor], layers: Sequence[str], size: int) -> torch.Tensor:
    """``(N, size, size)``: for each of the ``N`` key positions, the attention every query pays it, resized."""
    out, n = [], None
    for name in layers:
        s = scores[name].softmax(-1)
        side = _side(s.shape[1], name)
        if n is not None and s.shape[-1] != n:
            raise ConfigError(f"self-attention layers {list(layers)} are at different resolutions: SLiMe averages "
                              "them, so choose layers of one up block")
        n = s.shape[-1]
        m = s.reshape(s.shape[0], side, side, n).permute(0, 3, 1, 2)
        out.append(F.interpolate(m, size=size, mode="bilinear").mean(0))
    return torch.stack(out).mean(0)


def class_weights(mask: torch.Tensor, num_parts: int, balanced: bool = False) -> torch.Tensor:
    """Cross-entropy weights per class, the official ones or balanced ones.

    Official: 1 for the background, ``(all part pixels) / (its pixels)`` per part, so the parts are balanced among
    themselves but not against the background. ``balanced``: every present class,
    background included, weighted by ``(all pixels) / (classes present * its pixels)`` (for parts as small as
    defects, where the official weights let "all background" win).

    Example:
        >>> m = torch.zeros(10, 10, dtype=torch.long); m[:1, :] = 1; m[1:4, :] = 2
        >>> class_weights(m, 4).tolist()  # 10 and 30 part pixels; part 3 is absent
        [1.0, 4.0, 1.3333333730697632, 0.0]
        >>> [round(w, 3) for w in class_weights(m, 4, balanced=True).tolist()]
        [0.556, 3.333, 1.111, 0.0]
    """
    counts = torch.bincount(mask.flatten(), minlength=num_parts).float()
    if balanced:
        present = (counts > 0).sum()
        return torch.where(counts > 0, counts.sum() / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    counts[0] = 0
    weights = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
    weights[0] = 1
    return weights


def attention_losses(logits: torch.Tensor, sa: torch.Tensor, mask: torch.Tensor, balanced: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiMe's two attention terms for one image.

    Args:
        logits: ``(K, m, m)`` cross-attention scores of the ``K`` tokens (not softmaxed).
        sa: ``(N, m, m)`` self-attention maps (:func:`self_maps`), ``N`` a square number of key positions.
        mask: ``(m, m)`` labels.
        balanced: Weight the cross-entropy by :func:`class_weights` ``balanced`` instead of the official weights.

    Returns:
        ``(weighted cross-entropy, K * MSE(self-attention propagated cross-attention, one-hot mask))``.
    """
    k = logits.shape[0]
    ce = F.cross_entropy(logits[None], mask[None], weight=class_weights(mask, k, balanced))
    side = _side(sa.shape[0], "self-attention")
    probs = F.interpolate(logits.softmax(0)[None], size=side, mode="bilinear")[0].flatten(1)
    propagated = torch.einsum("kn,nhw->khw", probs, sa)
    one_hot = F.one_hot(mask, k).permute(2, 0, 1).to(propagated.dtype)
    return ce, F.mse_loss(propagated, one_hot) * k


def crop_part_maps(cross: torch.Tensor, sa: torch.Tensor, threshold: float, size: tuple[int, int],
                   ) -> tuple[list[int], list[torch.Tensor]]:
    """One crop's part maps at inference: the parts kept and their ``size`` maps (the official refinement).

    Parts whose cross-attention peak is below ``threshold`` are dropped; the first kept one (the background) is
    zeroed below its mean; each map is propagated through self-attention, resized, and rescaled linearly onto
    its cross-attention's own ``[min, max]``.

    Args:
        cross: ``(K, N)`` cross-attention probabilities (softmaxed over all tokens) at the self-attention grid.
        sa: ``(N, m, m)`` self-attention maps.
        threshold: The official ``patch_threshold`` (0.2).
        size: The crop's output size.
    """
    top, low = cross.max(1).values, cross.min(1).values
    kept = torch.nonzero(top >= threshold).flatten().tolist()
    if not kept:
        return [], []
    sub = cross[kept].clone()
    sub[0] = torch.where(sub[0] > sub[0].mean(), sub[0], 0)
    maps = []
    for j, part in enumerate(kept):
        m = torch.einsum("n,nhw->hw", sub[j], sa)
        m = F.interpolate(m[None, None], size=size, mode="bilinear")[0, 0]
        coef = (m.max() - m.min()) / (top[part] - low[part])
        if not torch.isfinite(coef) or coef == 0:
            coef = torch.tensor(1e-7, device=m.device)
        maps.append(m / coef + (low[part] - m.min() / coef))
    return kept, maps


# ------------------------------------------------------------------------------------------- metrics, crops
def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_parts: int) -> float:
    """Mean IoU over the classes present in ``target`` (the official per-image measure).

    Example:
        >>> t = torch.tensor([[0, 1], [1, 1]]); mean_iou(t, t, 2), mean_iou(torch.zeros_like(t), t, 2)
        (1.0, 0.125)
    """
    ious = []
    for k in range(num_parts):
        gt = target == k
        if not gt.any():
            continue
        p = pred == k
        ious.append(float((p & gt).sum()) / float((p | gt).sum()))
    return sum(ious) / max(len(ious), 1)


def crop_boxes(size: int, crop: int, per_side: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of ``per_side**2`` square crops of side ``crop`` tiling a ``size`` square, evenly spaced.

    Example:
        >>> crop_boxes(512, 400, 2)
        [(0, 400, 0, 400), (0, 400, 112, 512), (112, 512, 0, 400), (112, 512, 112, 512)]
    """
    step = 0 if per_side == 1 else (size - crop) // (per_side - 1)
    return [(i * step, i * step + crop, j * step, j * step + crop) for i in range(per_side) for j in range(per_side)]


# ------------------------------------------------------------------------------------------- the method
def _as_image(img: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1] from a CHW float tensor or an HWC/HW uint8 array."""
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        if img.ndim != 3 or img.shape[-1] not in (3, 4):
            raise DataError(f"{what}: expected an (H, W, 3) image, got shape {img.shape}")
        t = torch.from_numpy(np.array(img[..., :3], copy=True)).permute(2, 0, 1)
        return t.float() / 255 if img.dtype == np.uint8 else t.float()
    if img.ndim != 3 or img.shape[0] != 3:
        raise DataError(f"{what}: expected a (3, H, W) tensor in [0, 1], got shape {tuple(img.shape)}")
    return img.float()


def _as_mask(mask: torch.Tensor | np.ndarray, shape: tuple[int, int], num_parts: int, what: str) -> torch.Tensor:
    m = torch.as_tensor(np.array(mask, copy=True) if isinstance(mask, np.ndarray) else mask)
    if m.shape != shape:
        raise DataError(f"{what}: the mask is {tuple(m.shape)} but its image is {shape}; masks must be (H, W) "
                        "label images of the same size as their image")
    if m.is_floating_point() and not torch.equal(m, m.round()):
        raise DataError(f"{what}: the mask holds non-integer values; it must hold labels 0..{num_parts - 1}")
    m = m.long()
    if int(m.min()) < 0 or int(m.max()) >= num_parts:
        raise DataError(f"{what}: the mask holds labels {sorted(int(v) for v in m.unique())[:8]} but num_parts="
                        f"{num_parts} allows 0..{num_parts - 1} (0 is the background)")
    return m


class Slime(nn.Module):
    """SLiMe on a frozen diffusion backbone; the only trainable tensor is ``part_embeddings``.

    Args:
        backbone: A :class:`DiffusionBackbone` (e.g. :class:`StableDiffusionBackbone`).
        config: Settings; ``config.num_parts`` is ``K`` (background included).
        part_names: Optional names of the ``K`` classes (saved with the embeddings).
    """

    def __init__(self, backbone: DiffusionBackbone, config: SlimeConfig | None = None,
                 part_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SlimeConfig()
        k = cfg.num_parts
        self.part_names = list(part_names) if part_names else ["background"] + [f"part{i}" for i in range(1, k)]
        if len(self.part_names) != k:
            raise ConfigError(f"{len(self.part_names)} part names for num_parts={k}")
        self.backbone = backbone
        dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if hasattr(backbone, "to"):
            backbone.to(dev)
        self.device = torch.device(dev)
        cross, self_ = default_layers(backbone.unet)
        self.cross_layers = list(cfg.cross_layers or cross)
        self.self_layers = list(cfg.self_layers or self_)
        text = backbone.prompt_states([" ".join(["part"] * k)]).float()
        if text.shape[1] < k + 1:
            raise ConfigError(f"the text encoder's {text.shape[1]} tokens cannot hold {k} parts")
        self.register_buffer("text_states", text, persistent=False)
        self.register_buffer("null_states", backbone.prompt_states([""]).float(), persistent=False)
        self.part_embeddings = nn.Parameter(text[:, 1:k].clone())
        # inference=calibrated: each part's probability threshold, set by calibrate()
        self.register_buffer("part_thresholds", torch.full((k - 1,), 0.5))

    # ---------------------------------------------------------------- pieces
    def states(self) -> torch.Tensor:
        """The conditional prompt states with the (trainable) part embeddings in place of tokens 1..K-1."""
        k = self.config.num_parts
        return torch.cat([self.text_states[:, :1], self.part_embeddings, self.text_states[:, k:]], 1)

    def _t(self, t: int) -> torch.Tensor:
        n = int(self.backbone.scheduler.config.num_train_timesteps)
        return torch.tensor([min(round(t * n / 1000), n - 1)], device=self.device)

    def _run(self, image: torch.Tensor, t: int, gen: torch.Generator, with_uncond: bool,
             rec: AttentionRecorder) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One UNet pass on ``image`` (1, 3, S, S); the recorded scores of image 0 and the guided noise loss."""
        bb = self.backbone
        latents = bb.encode_images(image, generator=gen).float()
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device)
        tt = self._t(t)
        noisy = bb.scheduler.add_noise(latents, noise, tt)
        dtype = next(bb.unet.parameters()).dtype
        uncond = None
        if with_uncond:
            rec.active = False
            with torch.no_grad():
                uncond = bb.unet(noisy.to(dtype), tt, encoder_hidden_states=self.null_states.to(dtype)).sample.float()
            rec.active = True
        cond = bb.unet(noisy.to(dtype), tt, encoder_hidden_states=self.states().to(dtype)).sample.float()
        scores = {n: s[0].float() for n, s in rec.pop().items()}
        if uncond is None:
            return scores, None
        guided = uncond + self.config.guidance_scale * (cond - uncond)
        return scores, F.mse_loss(guided, noise)

    def losses(self, image: torch.Tensor, mask: torch.Tensor, t: int, gen: torch.Generator,
               rec: AttentionRecorder) -> dict[str, torch.Tensor]:
        """The three loss terms and their weighted sum on one ``(1, 3, S, S)`` image and its ``(m, m)`` mask."""
        cfg, k = self.config, self.config.num_parts
        scores, sd_loss = self._run(image, t, gen, with_uncond=True, rec=rec)
        logits = cross_maps(scores, self.cross_layers, k, mask.shape[-1], softmax_all=False)
        ce, sa_loss = attention_losses(logits, self_maps(scores, self.self_layers, mask.shape[-1]), mask,
                                       balanced=cfg.class_weighting == "balanced")
        total = ce + cfg.self_attention_loss_coef * sa_loss + cfg.sd_loss_coef * sd_loss
        return {"loss": total, "cross_entropy": ce, "self_attention": sa_loss, "noise": sd_loss}

    # ---------------------------------------------------------------- augmentation (the official data module)
    def _augment(self, img: torch.Tensor, mask: torch.Tensor, part: int, gen: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        cfg, s = self.config, self.backbone.image_size
        img = F.interpolate(img[None], size=(s, s), mode="bilinear", antialias=True)[0]
        mask = F.interpolate(mask[None, None].float(), size=(s, s), mode="nearest")[0, 0].long()
        if not cfg.augment:
            return img, mask
        r = torch.rand(4, generator=gen).tolist()
        if r[0] < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        ks = 1 + 2 * int(r[1] * 3)  # odd kernel 1, 3 or 5
        if ks > 1:
            img = TF.gaussian_blur(img, [ks, ks])
        total = int((mask == part).sum())
        for _ in range(100):  # a crop that keeps > 30 % of the current part (as the official data module)
            side = int((cfg.min_crop_ratio + float(torch.rand(1, generator=gen)) * (1 - cfg.min_crop_ratio)) * s)
            y0 = int(torch.randint(0, s - side + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, s - side + 1, (1,), generator=gen))
            kept = int((mask[y0:y0 + side, x0:x0 + side] == part).sum())
            if total == 0 or kept / total > 0.3:
                break
        img = F.interpolate(img[None, :, y0:y0 + side, x0:x0 + side], size=(s, s), mode="bilinear")[0]
        mask = F.interpolate(mask[None, None, y0:y0 + side, x0:x0 + side].float(), size=(s, s), mode="nearest")[0, 0]
        angle = (r[2] * 2 - 1) * cfg.rotation
        img = TF.rotate(img, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        mask = TF.rotate(mask[None], angle, interpolation=TF.InterpolationMode.NEAREST, fill=0.0)[0].long()
        return img.clamp(0, 1), mask

    # ---------------------------------------------------------------- training
    def fit(self, images: Sequence[torch.Tensor | np.ndarray], masks: Sequence[torch.Tensor | np.ndarray],
            val_images: Sequence[torch.Tensor | np.ndarray] = (), val_masks: Sequence[torch.Tensor | np.ndarray] = (),
            progress: bool = True, log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Optimise the part embeddings on annotated images; keep the best by validation mIoU (else the last).

        Args:
            images: ``(3, H, W)`` float tensors in [0, 1] or ``(H, W, 3)`` uint8 arrays.
            masks: ``(H, W)`` label images, 0 the background, ``1..K-1`` the parts.
            val_images: Held-out annotated images; mIoU on them after each epoch picks the embeddings kept.
            val_masks: Their masks.
            progress: Show a progress bar.
            log: Called with each epoch's record.

        Returns:
            One record per epoch: mean losses, validation mIoU (when given) and seconds.
        """
        from tqdm.auto import tqdm

        cfg, k = self.config, self.config.num_parts
        if not images or len(images) != len(masks):
            raise DataError(f"SLiMe needs annotated images: got {len(images)} images and {len(masks)} masks")
        if len(val_images) != len(val_masks):
            raise DataError(f"{len(val_images)} validation images but {len(val_masks)} masks")
        data = []
        for i, (img, m) in enumerate(zip(images, masks, strict=True)):
            img = _as_image(img, f"training image {i}")
            m = _as_mask(m, tuple(img.shape[-2:]), k, f"training image {i}")
            if not (m > 0).any():
                raise DataError(f"training image {i}: its mask is all background; annotate at least one part")
            data.append((img, m))
        val = [(_as_image(v, f"validation image {i}"), _as_mask(m, tuple(_as_image(v, "").shape[-2:]), k,
                                                                  f"validation image {i}"))
               for i, (v, m) in enumerate(zip(val_images, val_masks, strict=True))]
        gen = torch.Generator().manual_seed(cfg.seed)
        dgen = torch.Generator(self.device).manual_seed(cfg.seed)
        opt = torch.optim.Adam([self.part_embeddings], lr=cfg.lr)
        best, best_state, history, part = -1.0, self.part_embeddings.detach().clone(), [], 0
        lo, hi = cfg.train_t
        rec = AttentionRecorder(self.backbone.unet, [*self.cross_layers, *self.self_layers])
        bar = tqdm(total=cfg.epochs * len(data), desc="SLiMe fit", unit="step", disable=not progress)
        try:
            for epoch in range(cfg.epochs):
                t0, sums = time.perf_counter(), {}
                for img, m in data:
                    a_img, a_mask = self._augment(img, m, part, gen)
                    part = (part + 1) % k
                    small = F.interpolate(a_mask[None, None].float(), size=cfg.train_mask_size,
                                          mode="nearest")[0, 0].long().to(self.device)
                    t = int(torch.randint(lo, hi + 1, (1,), generator=gen))
                    out = self.losses(a_img[None].to(self.device), small, t, dgen, rec)
                    opt.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    opt.step()
                    for n, v in out.items():
                        sums[n] = sums.get(n, 0.0) + float(v.detach()) / len(data)
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}")
                record = {"epoch": epoch + 1, **sums}
                if val:
                    rec.close()
                    record["val_miou"] = float(np.mean([mean_iou(self.predict(v), vm, k) for v, vm in val]))
                    rec = AttentionRecorder(self.backbone.unet, [*self.cross_layers, *self.self_layers])
                    if record["val_miou"] >= best:
                        best, best_state = record["val_miou"], self.part_embeddings.detach().clone()
                record["seconds"] = time.perf_counter() - t0
                history.append(record)
                if log is not None:
                    log(record)
        finally:
            rec.close()
            bar.close()
        if val:
            with torch.no_grad():
                self.part_embeddings.copy_(best_state)
        if cfg.inference == "calibrated":
            self.calibrate([img for img, _ in data + val], [m for _, m in data + val])
        return history

    @torch.no_grad()
    def part_probabilities(self, image: torch.Tensor | np.ndarray, seed: int | None = None) -> torch.Tensor:
        """``(K, H, W)`` part probabilities of one image, as the training loss sees them.

        The cross-attention of the ``K`` tokens at ``test_t`` on the whole image, softmaxed over them (no crops, no
        refinement), resized to the image.
        """
        cfg, s = self.config, self.backbone.image_size
        img = _as_image(image, "image")
        x = F.interpolate(img[None], size=(s, s), mode="bilinear", antialias=True).to(self.device)
        gen = torch.Generator(self.device).manual_seed(cfg.seed if seed is None else seed)
        with AttentionRecorder(self.backbone.unet, self.cross_layers) as rec:
            scores, _ = self._run(x, cfg.test_t, gen, with_uncond=False, rec=rec)
        p = cross_maps(scores, self.cross_layers, cfg.num_parts, s, softmax_all=False).softmax(0)
        return F.interpolate(p[None], size=tuple(img.shape[-2:]), mode="bilinear")[0].cpu()

    @torch.no_grad()
    def calibrate(self, images: Sequence[torch.Tensor | np.ndarray], masks: Sequence[torch.Tensor | np.ndarray],
                  quantiles: int = 120) -> torch.Tensor:
        """Pick each part's probability threshold with the best IoU on annotated images (``inference=calibrated``).

        Candidates are quantiles 0.5-0.999 of the part's probabilities over all pixels of ``images``; the IoU is
        pooled over the images. Returns (and keeps) the ``K-1`` thresholds.
        """
        k = self.config.num_parts
        probs = [self.part_probabilities(img) for img in images]
        labels = [_as_mask(m, tuple(p.shape[-2:]), k, f"calibration mask {i}") for i, (m, p) in
                  enumerate(zip(masks, probs, strict=True))]
        for part in range(1, k):
            values = torch.cat([p[part].flatten() for p in probs])
            gt = [lab == part for lab in labels]
            if not any(bool(g.any()) for g in gt):
                continue  # a part absent from these images keeps its threshold
            best = (-1.0, float(self.part_thresholds[part - 1]))
            for q in torch.linspace(0.5, 0.999, quantiles).tolist():
                thr = float(torch.quantile(values[:: max(1, values.numel() // 1_000_000)], q))
                inter = sum(int(((p[part] > thr) & g).sum()) for p, g in zip(probs, gt, strict=True))
                union = sum(int(((p[part] > thr) | g).sum()) for p, g in zip(probs, gt, strict=True))
                best = max(best, (inter / max(union, 1), thr))
            self.part_thresholds[part - 1] = best[1]
        return self.part_thresholds.clone()

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_maps(self, image: torch.Tensor | np.ndarray, seed: int | None = None) -> torch.Tensor:
        """``(K, H, W)`` part scores of one image at its own size (the argmax is :meth:`predict`).

        With ``inference=calibrated`` a part's score is its probability over its threshold and the background's is
        1: a pixel takes the part furthest above its threshold, the background where none is above.
        """
        cfg, k, s = self.config, self.config.num_parts, self.backbone.image_size
        if cfg.inference == "calibrated":
            p = self.part_probabilities(image, seed)
            ratio = p[1:] / self.part_thresholds.cpu().clamp_min(1e-8)[:, None, None]
            return torch.cat([torch.ones_like(p[:1]), ratio])
        img = _as_image(image, "image")
        h, w = img.shape[-2:]
        full = F.interpolate(img[None], size=(s, s), mode="bilinear", antialias=True).to(self.device)
        crop = max(1, round(cfg.crop_fraction * s))
        acc = torch.zeros(k, s, s, device=self.device)
        cnt = torch.full((k, s, s), 1e-7, device=self.device)
        gen = torch.Generator(self.device).manual_seed(cfg.seed if seed is None else seed)
        with AttentionRecorder(self.backbone.unet, [*self.cross_layers, *self.self_layers]) as rec:
            for y0, y1, x0, x1 in crop_boxes(s, crop, cfg.crops_per_side):
                patch = F.interpolate(full[:, :, y0:y1, x0:x1], size=(s, s), mode="bilinear")
                scores, _ = self._run(patch, cfg.test_t, gen, with_uncond=False, rec=rec)
                sa = self_maps(scores, self.self_layers, cfg.train_mask_size)
                side = _side(sa.shape[0], self.self_layers[0])
                if cfg.test_softmax == "all":
                    cross = cross_maps(scores, self.cross_layers, k, side, softmax_all=True).flatten(1)
                else:
                    cross = cross_maps(scores, self.cross_layers, k, side, softmax_all=False).softmax(0).flatten(1)
                for part, m in zip(*crop_part_maps(cross, sa, cfg.patch_threshold, (y1 - y0, x1 - x0)),
                                   strict=True):
                    acc[part, y0:y1, x0:x1] += m
                    cnt[part, y0:y1, x0:x1] += 1
        maps = acc / cnt
        return F.interpolate(maps[None], size=(h, w), mode="bilinear")[0].cpu()

    def predict(self, image: torch.Tensor | np.ndarray, seed: int | None = None) -> torch.Tensor:
        """``(H, W)`` labels ``0..K-1`` of one image."""
        return self.predict_maps(image, seed).argmax(0)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path, overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write the part embeddings with everything needed to use them again (safetensors, atomically)."""
        from ..weights import MODEL_META, write_weights

        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; pass overwrite=true to replace it")
        info = {"kind": "slime", "config": asdict(self.config), "part_names": self.part_names,
                "cross_layers": self.cross_layers, "self_layers": self.self_layers,
                "backbone": self.backbone.describe(), **(extra or {})}
        write_weights(path, {"part_embeddings": self.part_embeddings.detach().cpu().contiguous(),
                             "part_thresholds": self.part_thresholds.detach().cpu().contiguous()},
                      metadata={MODEL_META: json.dumps(info)})
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: DiffusionBackbone, **overrides: Any) -> Slime:
        """Rebuild a fitted SLiMe from :meth:`save`'s file on ``backbone`` (which must match the saved one)."""
        from ..weights import MODEL_META, read_safetensors

        tensors, meta = read_safetensors(path)
        try:
            info = json.loads(meta[MODEL_META])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a SLiMe embeddings file (no {MODEL_META} header)") from None
        if info.get("kind") != "slime" or "part_embeddings" not in tensors:
            raise CheckpointError(f"{path} holds a {info.get('kind')!r} model file, not SLiMe part embeddings")
        cfg = SlimeConfig.from_dict({**info["config"], **overrides})
        cfg.cross_layers, cfg.self_layers = tuple(info["cross_layers"]), tuple(info["self_layers"])
        slime = cls(backbone, cfg, info["part_names"])
        emb = tensors["part_embeddings"]
        if emb.shape != slime.part_embeddings.shape:
            raise CheckpointError(f"{path}: part embeddings of shape {tuple(emb.shape)} do not fit this backbone's "
                                  f"{tuple(slime.part_embeddings.shape)} (saved for {info['backbone']})")
        with torch.no_grad():
            slime.part_embeddings.copy_(emb)
            if "part_thresholds" in tensors:  # files written before inference=calibrated existed have none
                slime.part_thresholds.copy_(tensors["part_thresholds"])
        return slime


"""SEED's way back to pixels: a diffusion decoder conditioned on the de-tokenised image embedding (unCLIP's role).

The released SEED pipeline hands the image embedding its de-tokeniser regresses to Stable unCLIP, which adds it to
the UNet's timestep embedding (``class_embed_type="projection"``). Here the same conditioning runs on a small
pixel-space diffusers ``UNet2DConditionModel`` trained from scratch (the project's text-conditioned UNet,
:class:`~frugalvision.inspect.text_diffusion.TextDiffusion`, with the image embedding in place of caption states):
the LayerNorm-ed embedding is both the projection class embedding and the one token its cross-attention reads.
A learned null embedding replaces it for ``dropout`` of the training images, so sampling can use classifier-free
guidance. Sampling is DDIM.

:class:`UnCLIPDecoder` is the released path itself: a Stable unCLIP image-variation pipeline (``stable-diffusion-2-1
-unclip``) saved in diffusers' format in a local folder, called as SEED calls it (image embeddings in, an empty
prompt, noise level 0). It needs image embeddings in that pipeline's space (CLIP ViT-H/14's 1024-wide image
embeddings for SD-2.1-unclip), i.e. a SEED tokenizer whose de-tokeniser was trained to regress them; tokenizers
trained here on our own encoders have other widths and are refused with that explanation.

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> dec = SEEDPixelDecoder(embed_dim=12, config=TextDiffusionConfig(image_size=16, channels=(8, 16, 16), heads=2))
    >>> loss = dec.loss(torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 12))
    >>> dec.sample(torch.randn(2, 12), steps=2).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..errors import CheckpointError, ConfigError, DataError
from ..inspect.text_diffusion import TextDiffusionConfig

__all__ = ["PIXEL_KIND", "SEEDPixelDecoder", "UnCLIPDecoder", "build_pixel_decoder_from_info", "fit_pixel_decoder",
           "load_pixel_decoder", "save_pixel_decoder", "tiny_stable_unclip"]

PIXEL_KIND = "seed_pixel_decoder"


class SEEDPixelDecoder(nn.Module):
    """Noise-predicting UNet conditioned on an image embedding; :meth:`sample` draws ``[0, 1]`` RGB images.

    Args:
        embed_dim: Width of the image embedding (the SEED tokenizer's ``image_dim``).
        config: UNet sizes, image side and noise schedule (:class:`TextDiffusionConfig`).
        dropout: Share of training embeddings replaced by the learned null embedding (classifier-free guidance).
    """

    def __init__(self, embed_dim: int, config: TextDiffusionConfig | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        diffusers = require("diffusers", "the SEED pixel decoder", extra="diffusion")
        self.config = cfg = config or TextDiffusionConfig(image_size=32)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.dropout = int(embed_dim), float(dropout)
        n = len(cfg.channels)
        self.norm = nn.LayerNorm(embed_dim)
        self.null = nn.Parameter(torch.zeros(embed_dim))
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=cfg.image_size, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
            block_out_channels=cfg.channels, norm_num_groups=min(8, cfg.channels[0]), cross_attention_dim=embed_dim,
            attention_head_dim=cfg.heads, class_embed_type="projection",
            projection_class_embeddings_input_dim=embed_dim,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))

    def describe(self) -> dict[str, Any]:
        """What rebuilds this decoder (stored in its model file)."""
        return {"kind": PIXEL_KIND, "name": "seed_pixel_decoder", "embed_dim": self.embed_dim,
                "dropout": self.dropout, "config": dataclasses.asdict(self.config)}

    def _condition(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim != 2 or embeds.shape[1] != self.embed_dim:
            raise DataError(f"image embeddings must be (B, {self.embed_dim}), got {tuple(embeds.shape)}")
        return self.norm(embeds)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise given normalised conditions ``(B, embed_dim)``."""
        return self.unet(noisy, t, encoder_hidden_states=cond[:, None], class_labels=cond).sample

    def loss(self, images: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """Denoising MSE on ``[-1, 1]`` images ``(B, 3, S, S)`` with their embeddings (some dropped to null)."""
        cond = self._condition(embeds)
        drop = torch.rand(len(cond), generator=generator, device=cond.device) < self.dropout
        cond = torch.where(drop[:, None], self.norm(self.null.expand_as(cond)), cond)
        sched = self.config.scheduler("ddpm")
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        t = torch.randint(0, self.config.timesteps, (len(images),), generator=generator, device=images.device)
        return F.mse_loss(self(sched.add_noise(images, noise, t), t, cond), noise)

    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, steps: int = 50, guidance: float = 2.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in ``[0, 1]`` for image embeddings (DDIM, classifier-free guidance)."""
        cond = self._condition(embeds)
        null = self.norm(self.null.expand_as(cond))
        sched = self.config.scheduler("ddim")
        sched.set_timesteps(steps)
        s = self.config.image_size
        x = torch.randn((len(cond), 3, s, s), generator=generator, device=cond.device)
        for t in sched.timesteps:
            tt = t.expand(len(cond)).to(cond.device)
            eps = self(x, tt, cond)
            if guidance != 1.0:
                eps = self(x, tt, null) + guidance * (eps - self(x, tt, null))
            x = sched.step(eps, t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


def fit_pixel_decoder(decoder: SEEDPixelDecoder, images: torch.Tensor, embeds: torch.Tensor, steps: int = 2000,
                      batch_size: int = 32, lr: float = 3e-4, seed: int = 0, progress: bool = True,
                      log: list[dict[str, float]] | None = None) -> float:
    """Train on ``[0, 1]`` images ``(N, 3, S, S)`` and their embeddings ``(N, D)`` (AdamW, cosine); returns seconds.

    Horizontal flips augment the images (the embedding is kept: it should not encode the flip).
    """
    from tqdm.auto import tqdm

    s = decoder.config.image_size
    if images.ndim != 4 or images.shape[1:] != (3, s, s) or len(images) != len(embeds):
        raise DataError(f"images must be (N, 3, {s}, {s}) paired with (N, {decoder.embed_dim}) embeddings, got "
                        f"{tuple(images.shape)} and {tuple(embeds.shape)}")
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * i / steps)))
    g = torch.Generator().manual_seed(seed)
    decoder.train()
    t0, ema = time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="pixel decoder", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx] * 2 - 1
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = decoder.loss(x, embeds[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if math.isnan(ema) else 0.98 * ema + 0.02 * v
        bar.set_postfix(loss=f"{ema:.4f}")
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log.append({"step": step, "loss": round(ema, 5), "seconds": round(time.perf_counter() - t0, 1)})
    decoder.eval()
    return time.perf_counter() - t0


def build_pixel_decoder_from_info(info: dict[str, Any]) -> SEEDPixelDecoder:
    """An untrained :class:`SEEDPixelDecoder` shaped as a model file's description says."""
    try:
        cfg = dict(info["config"])
        cfg["channels"] = tuple(cfg["channels"])
        return SEEDPixelDecoder(int(info["embed_dim"]), TextDiffusionConfig(**cfg), dropout=float(info["dropout"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"the pixel decoder's description is incomplete or malformed ({exc})") from None


def save_pixel_decoder(decoder: SEEDPixelDecoder, path: str | Path, overwrite: bool = False, **meta: Any) -> Path:
    """Write a ``seed_pixel_decoder`` model file atomically; refuses to replace a file without ``overwrite``."""
    from ..weights import MODEL_META, write_weights

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=true to replace it")
    return write_weights(path, decoder.state_dict(),
                         metadata={MODEL_META: json.dumps({**decoder.describe(), **meta})})


def load_pixel_decoder(path: str | Path) -> SEEDPixelDecoder:
    """Open a ``seed_pixel_decoder`` model file (``frugalvision seed pixels``), in eval mode.

    Raises:
        CheckpointError: A missing file, a model file of another kind, or tensors that do not fit.
    """
    from ..weights import load_weights, read_model_info

    info = read_model_info(path)
    if info["kind"] != PIXEL_KIND:
        raise CheckpointError(f"{path} holds a {info['kind']} model, not a SEED pixel decoder (kind {PIXEL_KIND}); "
                              "give the pixels.safetensors of `frugalvision seed pixels`")
    decoder = build_pixel_decoder_from_info(info)
    load_weights(decoder, path, what="its description (seed_pixel_decoder)")
    decoder.info = info  # type: ignore[attr-defined]
    return decoder.eval()


# --------------------------------------------------------------------------------------------- Stable unCLIP
class UnCLIPDecoder:
    """SEED's released decoder: a Stable unCLIP image-variation pipeline from a local folder, fed image embeddings.

    Build it with :meth:`from_pretrained`. :meth:`sample` calls the pipeline as SEED's ``ImageTokenizer.decode``
    does: the de-tokenised embedding as ``image_embeds``, ``noise_level=0``, an empty prompt, classifier-free
    guidance (diffusers' pipeline uses zero image embeddings as the negative).

    Args:
        pipe: A loaded ``diffusers.StableUnCLIPImg2ImgPipeline``.
        source: Where it came from (for messages).
    """

    def __init__(self, pipe: Any, source: str = "") -> None:
        self.pipe, self.source = pipe, str(source)
        unet = pipe.unet.config
        if unet.get("class_embed_type") != "projection" or not unet.get("projection_class_embeddings_input_dim"):
            raise CheckpointError(f"{source}: the UNet takes no image embedding (class_embed_type "
                                  f"{unet.get('class_embed_type')!r}); give a Stable unCLIP pipeline")
        # the UNet's class input is the noised image embedding concatenated with the noise level's embedding
        self.embed_dim = int(unet["projection_class_embeddings_input_dim"]) // 2

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> UnCLIPDecoder:
        """Load ``folder`` (diffusers' format: ``model_index.json``, ``unet/``, ``vae/``, ...), offline.

        Example:
            >>> UnCLIPDecoder.from_pretrained("/nonexistent")
            Traceback (most recent call last):
            ...
            frugalvision.errors.CheckpointError: /nonexistent is not a diffusers pipeline folder ...
        """
        folder = Path(folder)
        index = folder / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no model_index.json); give a Stable "
                                  "unCLIP pipeline saved with save_pretrained, e.g. stable-diffusion-2-1-unclip")
        try:
            kind = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index} is not valid JSON ({exc.msg})") from None
        if kind not in ("StableUnCLIPImg2ImgPipeline", "StableUnCLIPPipeline"):
            raise CheckpointError(f"{folder} holds a {kind}, not a Stable unCLIP pipeline "
                                  "(StableUnCLIPImg2ImgPipeline)")
        diffusers = require("diffusers", "the Stable unCLIP decoder", extra="diffusion")
        require("transformers", "the Stable unCLIP decoder (its CLIP text encoder)", extra="lm")
        try:
            with warnings.catch_warnings():  # newer diffusers call it dtype; torch_dtype works in all we support
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folder, torch_dtype=dtype,
                                                                             local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: could not load the Stable unCLIP pipeline ({exc})") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), source=str(folder))

    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, steps: int = 20, guidance: float = 10.0,
               generator: torch.Generator | None = None, noise_level: int = 0, size: int | None = None
               ) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` for image embeddings ``(B, embed_dim)``.

        SEED's defaults: 20 steps, guidance 10, noise level 0.

        Raises:
            DataError: Embeddings of another width than the pipeline's.
        """
        if embeds.ndim != 2 or embeds.shape[1] != self.embed_dim:
            raise DataError(f"{self.source} draws from ({self.embed_dim},)-wide image embeddings (its CLIP image "
                            f"space), got {tuple(embeds.shape)}: the SEED tokenizer must be trained to regress that "
                            "pipeline's image embeddings")
        unet = self.pipe.unet
        emb = embeds.to(unet.device, unet.dtype)
        out = self.pipe(prompt=[""] * len(emb), image_embeds=emb, noise_level=noise_level,
                        num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=size,
                        width=size, output_type="pt")
        return out.images.float().clamp(0, 1).cpu()


def tiny_stable_unclip(folder: str | Path, embed_dim: int = 8, image_size: int = 32, seed: int = 0) -> UnCLIPDecoder:
    """A randomly initialised Stable unCLIP pipeline at toy width (tests only).

    It is saved in diffusers' format in ``folder`` and loaded back through :meth:`UnCLIPDecoder.from_pretrained`,
    the path a real folder takes.
    """
    diffusers = require("diffusers", "a toy Stable unCLIP", extra="diffusion")
    transformers = require("transformers", "a toy Stable unCLIP", extra="lm")
    from ..inspect.slime import tiny_clip_text

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * embed_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=image_size)
    tokenizer, text_encoder = tiny_clip_text(hidden_size=16)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=8, projection_dim=embed_dim))
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessor(crop_size=image_size, size=image_size),
        image_encoder=image_encoder,
        image_normalizer=diffusers.pipelines.stable_diffusion.StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                          prediction_type="v_prediction"),
        vae=vae)
    pipe.save_pretrained(folder)
    return UnCLIPDecoder.from_pretrained(folder)

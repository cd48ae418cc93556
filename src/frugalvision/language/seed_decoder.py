"""SEED's way back to pixels: a diffusion decoder conditioned on the de-tokenised image embedding (unCLIP's role).

The released SEED pipeline hands the image embedding its de-tokeniser regresses to Stable unCLIP, which adds it to
the UNet's timestep embedding (``class_embed_type="projection"``). Here the same conditioning runs on a small
pixel-space diffusers ``UNet2DConditionModel`` trained from scratch (the project's text-conditioned UNet,
:class:`~frugalvision.inspect.text_diffusion.TextDiffusion`, with the image embedding in place of caption states):
the LayerNorm-ed embedding is both the projection class embedding and the one token its cross-attention reads.
A learned null embedding replaces it for ``dropout`` of the training images, so sampling can use classifier-free
guidance. Sampling is DDIM.

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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..errors import CheckpointError, ConfigError, DataError
from ..inspect.text_diffusion import TextDiffusionConfig

__all__ = ["PIXEL_KIND", "SEEDPixelDecoder", "build_pixel_decoder_from_info", "fit_pixel_decoder",
           "load_pixel_decoder", "save_pixel_decoder"]

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
    from ..weights import check_fit, read_model_info, read_safetensors

    info = read_model_info(path)
    if info["kind"] != PIXEL_KIND:
        raise CheckpointError(f"{path} holds a {info['kind']} model, not a SEED pixel decoder (kind {PIXEL_KIND}); "
                              "give the pixels.safetensors of `frugalvision seed pixels`")
    decoder = build_pixel_decoder_from_info(info)
    tensors, _ = read_safetensors(path)
    check_fit(decoder.state_dict(), tensors, path, what="its description (seed_pixel_decoder)")
    decoder.load_state_dict(tensors)
    decoder.info = info  # type: ignore[attr-defined]
    return decoder.eval()

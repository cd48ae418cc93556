"""A small text-conditioned diffusion model trained here: a SLiMe backbone that needs no download.

No Stable Diffusion weights can be fetched on an offline machine, so SLiMe's experiments run on this model: a
diffusers ``UNet2DConditionModel`` on 64-pixel RGB (pixel space, no VAE) whose cross-attention reads the token
states of the real, frozen all-MiniLM-L6-v2 (384 wide, padded to ``max_tokens``; the ``[CLS]`` token plays the
start token SLiMe uses for the background).

Its attention layout follows SD's in miniature: no attention at full resolution, cross- and self-attention at 1/4
and 1/2 (SD: 1/32 to 1/8), so :func:`frugalvision.inspect.slime.default_layers` picks cross-attention at 1/4 and
self-attention at 1/2 of the image side.

Training data (:class:`DefectCaptionSet`): the bundled benchmark's defect-free *training* tiles (the test tiles are
never seen), each given a random procedural defect half of the time, captioned the way the benchmark's captions
are ("A crack on the brick surface at the top left, about 20x31 pixels (2.1% of the image).") or "A brick surface
without defects."; 10 % of captions are dropped to the empty prompt so that the unconditional prediction exists.

Example:
    >>> cfg = TextDiffusionConfig(image_size=16, channels=(8, 8, 8), layers_per_block=1, heads=2)
    >>> model = TextDiffusion(cfg, text_width=12)
    >>> model(torch.zeros(2, 3, 16, 16), torch.tensor([3, 500]), torch.zeros(2, 5, 12)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._deps import require
from ..engine.task import Task
from ..errors import CheckpointError, ConfigError

__all__ = ["DefectCaptionSet", "DenoiseTask", "MiniLMStates", "TextDiffusion", "TextDiffusionBackbone",
           "TextDiffusionConfig", "load_text_diffusion", "save_text_diffusion"]

KIND = "text-diffusion"


@dataclass
class TextDiffusionConfig:
    """Size of the text-conditioned UNet.

    Args:
        image_size: Square side of the images it generates and reads (pixels).
        channels: Widths of the UNet levels (the first has no attention).
        layers_per_block: ResNet(+attention) layers per down block (up blocks have one more).
        heads: Attention heads.
        max_tokens: Caption tokens kept (MiniLM tokens, padded).
        timesteps: Length of the noise schedule.
        caption_dropout: Fraction of training captions replaced by the empty prompt.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    heads: int = 4
    max_tokens: int = 32
    timesteps: int = 1000
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 3:
            raise ConfigError(f"channels={self.channels}: at least 3 levels (one without attention, two with)")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(f"image_size={self.image_size} must be divisible by {2 ** (len(self.channels) - 1)}")

    def scheduler(self, kind: str = "ddpm") -> Any:
        """The noise schedule (``ddpm`` for training, ``ddim`` for SLiMe and sampling): SD's scaled-linear betas."""
        diffusers = require("diffusers", "the text-conditioned diffusion model", extra="diffusion")
        kw = {"num_train_timesteps": self.timesteps, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "clip_sample": False}
        if kind == "ddim":
            return diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, steps_offset=1)
        return diffusers.DDPMScheduler(**kw)


class TextDiffusion(nn.Module):
    """The UNet (a diffusers ``UNet2DConditionModel``) predicting the noise of a ``[-1, 1]`` RGB image.

    Args:
        config: Sizes.
        text_width: Width of the text encoder's token states (384 for MiniLM).
    """

    def __init__(self, config: TextDiffusionConfig | None = None, text_width: int = 384) -> None:
        super().__init__()
        diffusers = require("diffusers", "the text-conditioned diffusion model", extra="diffusion")
        self.config = cfg = config or TextDiffusionConfig()
        self.text_width = text_width
        n = len(cfg.channels)
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=cfg.image_size, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
            block_out_channels=cfg.channels, norm_num_groups=min(8, cfg.channels[0]), cross_attention_dim=text_width,
            attention_head_dim=cfg.heads,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Predicted noise of ``noisy`` at timesteps ``t`` given caption token states."""
        return self.unet(noisy, t, encoder_hidden_states=states).sample


class MiniLMStates:
    """Frozen all-MiniLM-L6-v2 token states of captions, padded to ``max_tokens`` (``(B, max_tokens, 384)``)."""

    def __init__(self, max_tokens: int = 32, path: str | Path | None = None) -> None:
        from .anomaly.domain_clip import MiniLMTextEncoder

        self.encoder = MiniLMTextEncoder(path)
        self.max_tokens = max_tokens
        self.width = self.encoder.width

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        """Token states of ``texts`` (computed in batches)."""
        out = []
        for i in range(0, len(texts), batch):
            enc = self.encoder.tokenizer(list(texts[i:i + batch]), padding="max_length", truncation=True,
                                         max_length=self.max_tokens, return_tensors="pt")
            out.append(self.encoder.bert(**enc).last_hidden_state)
        return torch.cat(out) if out else torch.zeros(0, self.max_tokens, self.width)


class DefectCaptionSet(Dataset):
    """Captioned 64-px tiles for training: the bundled benchmark's training tiles, half with a procedural defect.

    Items are ``(image in [-1, 1] (3, S, S), token states (max_tokens, 384))``; the images, captions and states
    are made once, deterministically from ``seed``.

    Args:
        n: Number of samples.
        states: The caption encoder.
        image_size: Side of the returned images.
        seed: Seed of the tile choice, the defects and the caption dropout.
        caption_dropout: Fraction of captions replaced by the empty prompt.
        progress: Show a progress bar while the defects are drawn.
    """

    def __init__(self, n: int, states: MiniLMStates, image_size: int = 64, seed: int = 0,
                 caption_dropout: float = 0.1, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        from ..data.bundled import source_images
        from ..data.images import load_image
        from .bundled import _FOREIGN, load_benchmark
        from .defects import DEFECT_KINDS, describe_defect, render_defect

        train = load_benchmark("train").samples
        rng = np.random.default_rng(seed)
        sources = source_images(list(_FOREIGN))
        foreign = np.concatenate([np.asarray(_resize(sources[f], 256)) for f in _FOREIGN], 1)
        self.images, self.captions, self.masks = [], [], []
        for _ in tqdm(range(n), desc="captioned tiles", disable=not progress):
            i = int(rng.integers(len(train)))
            tile, cat = np.asarray(load_image(train[i].image)), train[i].category
            if rng.random() < 0.5:
                kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
                tile, mask = render_defect(kind, tile, rng, size=rng.uniform(0.7, 1.3), foreign=foreign)
                caption = describe_defect(kind, mask, cat)
            else:
                mask, caption = np.zeros(tile.shape[:2], bool), f"A {cat} surface without defects."
            if rng.random() < caption_dropout:
                caption = ""
            self.images.append(_resize(tile, image_size))
            self.masks.append(mask)
            self.captions.append(caption)
        self.states = states(self.captions)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(self.images[i], copy=True)).permute(2, 0, 1).float() / 127.5 - 1
        return img, self.states[i]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


class DenoiseTask(Task):
    """The engine's task for :class:`TextDiffusion`: noise a batch at random timesteps, predict the noise (MSE)."""

    def __init__(self, config: TextDiffusionConfig) -> None:
        self.scheduler = config.scheduler("ddpm")
        self.timesteps = config.timesteps

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """``(predicted noise, noise)`` of a batch ``(images, states)``."""
        x, states = batch
        noise = torch.randn_like(x)
        t = torch.randint(0, self.timesteps, (x.shape[0],), device=x.device)
        noisy = self.scheduler.add_noise(x, noise, t)
        return model(noisy, t, states), noise

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """MSE between predicted and true noise."""
        pred, noise = outputs
        return F.mse_loss(pred, noise)


def save_text_diffusion(model: TextDiffusion, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model as a self-describing safetensors file (its config in the header), atomically."""
    from ..weights import MODEL_META, write_weights

    info = {"kind": KIND, "config": asdict(model.config), "text_width": model.text_width,
            "text_encoder": "all-MiniLM-L6-v2", **(extra or {})}
    return write_weights(path, model.unet.state_dict(), metadata={MODEL_META: json.dumps(info)})


def load_text_diffusion(path: str | Path) -> tuple[TextDiffusion, dict[str, Any]]:
    """Rebuild a :class:`TextDiffusion` from :func:`save_text_diffusion`'s file (every tensor must fit)."""
    from ..weights import MODEL_META, load_weights, read_header

    try:
        info = json.loads(read_header(path).get(MODEL_META, "{}"))
    except json.JSONDecodeError:
        info = {}
    if info.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a text-conditioned diffusion model file (kind {info.get('kind')!r});"
                              " it comes from `frugalvision slime pretrain`")
    model = TextDiffusion(TextDiffusionConfig(**info["config"]), int(info["text_width"]))
    load_weights(model.unet, path, what="the text-conditioned UNet")
    return model.eval(), info


class TextDiffusionBackbone:
    """:class:`TextDiffusion` + frozen MiniLM as a SLiMe backbone (pixel space: the image is the "latent")."""

    def __init__(self, model: TextDiffusion, states: MiniLMStates, source: str = "") -> None:
        self.model, self.states, self.source = model.eval().requires_grad_(False), states, source
        self.unet = model.unet
        self.scheduler = model.config.scheduler("ddim")
        self.image_size = model.config.image_size

    @classmethod
    def from_file(cls, path: str | Path) -> TextDiffusionBackbone:
        """Load a model file written by ``frugalvision slime pretrain`` (with the packaged MiniLM)."""
        model, _ = load_text_diffusion(path)
        return cls(model, MiniLMStates(model.config.max_tokens), source=str(path))

    def to(self, device: torch.device | str) -> TextDiffusionBackbone:
        """Move the UNet and the text encoder to ``device``."""
        self.model.to(device)
        self.states.encoder.to(device)
        return self

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[0, 1]`` images -> ``[-1, 1]`` (the model works in pixel space)."""
        return images.to(next(self.unet.parameters()).device) * 2 - 1

    def prompt_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """MiniLM token states of the prompts."""
        return self.states(prompts).to(next(self.unet.parameters()).device)

    def describe(self) -> dict[str, Any]:
        """What SLiMe's embeddings were fitted on."""
        return {"kind": KIND, "source": self.source, "image_size": self.image_size, "token_dim": self.states.width}

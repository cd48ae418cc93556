"""A self-describing SEED tokenizer: frozen visual encoder + tokenizer in one model file (kind ``seed_tokenizer``).

``frugalvision seed train`` writes it; ``seed encode`` turns images into codes with it and ``seed decode`` codes into
image embeddings. The file holds the visual encoder's tensors (``visual.*``: one feature level of a registered
model) and the tokenizer's (``tokenizer.*``), and its description holds the :class:`~frugalvision.language.seed.
SEEDConfig`, the encoder's name, level, input size and normalisation: nothing else is needed to open it.

Example:
    >>> import tempfile, pathlib
    >>> from frugalvision.language.seed import SEEDConfig
    >>> m = SEEDImageTokenizer(FeatureLevel("test_resnet", stride=16), SEEDConfig.tiny(vision_dim=192), 64).eval()
    >>> codes = m.encode_images(torch.zeros(2, 3, 64, 64))
    >>> p = save_seed(m, pathlib.Path(tempfile.mkdtemp()) / "seed.safetensors")
    >>> load_seed(p).encode_images(torch.zeros(2, 3, 64, 64)).equal(codes)
    True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointError
from .seed import SEEDConfig, SEEDTokenizer
from .visual import FeatureLevel

__all__ = ["KIND", "SEEDImageTokenizer", "build_seed_from_info", "load_seed", "save_seed"]

KIND = "seed_tokenizer"


class SEEDImageTokenizer(nn.Module):
    """Images → SEED codes → image embeddings: a frozen feature level of a registered model + a SEED tokenizer.

    Args:
        visual: The frozen visual encoder (its ``(B, C, h, w)`` map becomes ``h * w`` tokens).
        config: The tokenizer's configuration (``vision_dim`` = the encoder's channels).
        img_size: Square side images are resized to.
    """

    def __init__(self, visual: FeatureLevel, config: SEEDConfig, img_size: int) -> None:
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.tokenizer = SEEDTokenizer(config)
        self.img_size = int(img_size)

    def train(self, mode: bool = True) -> SEEDImageTokenizer:
        """Train mode for the tokenizer; the visual encoder stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, S, S)`` pixels → ``(B, h * w, C)`` frozen visual tokens."""
        return self.visual(pixels).flatten(2).transpose(1, 2)

    def pixels(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Images of any size / mode → normalised ``(B, 3, S, S)`` (one clear error per unreadable file)."""
        from .vlm_file import image_tensor, read_image

        return torch.stack([image_tensor(read_image(im), self.img_size, self.visual.mean, self.visual.std)
                            for im in images])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels → codes ``(B, num_queries)``."""
        return self.tokenizer.encode(self.visual_tokens(pixels))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Codes → image embeddings ``(B, image_dim)`` (what a pixel decoder is conditioned on)."""
        return self.tokenizer.decode(codes)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this model (stored in its model file)."""
        return {"kind": KIND, "name": "seed", "config": dataclasses.asdict(self.tokenizer.config),
                "visual": self.visual.name, "visual_stride": self.visual.stride, "img_size": self.img_size,
                "mean": self.visual.mean, "std": self.visual.std, "bn_eps": self.visual.bn_eps}


def build_seed_from_info(info: dict[str, Any]) -> SEEDImageTokenizer:
    """An untrained :class:`SEEDImageTokenizer` shaped as a model file's description says."""
    try:
        visual = FeatureLevel(info["visual"], stride=int(info["visual_stride"]), img_size=int(info["img_size"]))
        config = SEEDConfig(**info["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"the SEED tokenizer's description is incomplete or malformed ({exc})") from None
    visual.mean, visual.std = list(info.get("mean", visual.mean)), list(info.get("std", visual.std))
    if info.get("bn_eps"):
        visual.set_detector_numerics()
        visual.mean, visual.std = list(info["mean"]), list(info["std"])
    return SEEDImageTokenizer(visual, config, int(info["img_size"]))


def save_seed(model: SEEDImageTokenizer, path: str | Path, overwrite: bool = False, **meta: Any) -> Path:
    """Write the model file atomically; refuses to replace a file without ``overwrite``."""
    from ..errors import ConfigError
    from ..weights import MODEL_META, write_weights

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=true to replace it")
    return write_weights(path, model.state_dict(), metadata={MODEL_META: json.dumps({**model.describe(), **meta})})


def load_seed(path: str | Path) -> SEEDImageTokenizer:
    """Open a ``seed_tokenizer`` model file (``frugalvision seed train``), in eval mode.

    Raises:
        CheckpointError: A missing file, a model file of another kind, or tensors that do not fit.
    """
    from ..weights import check_fit, read_model_info, read_safetensors

    info = read_model_info(path)
    if info["kind"] != KIND:
        raise CheckpointError(f"{path} holds a {info['kind']} model, not a SEED tokenizer (kind {KIND}); give the "
                              "model.safetensors of `frugalvision seed train`")
    model = build_seed_from_info(info)
    tensors, _ = read_safetensors(path)
    check_fit(model.state_dict(), tensors, path, what="its description (seed_tokenizer)")
    model.load_state_dict(tensors)
    model.info = info  # type: ignore[attr-defined]
    return model.eval()

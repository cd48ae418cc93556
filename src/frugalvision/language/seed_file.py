"""A self-describing SEED tokenizer: frozen visual encoder + tokenizer in one model file (kind ``seed_tokenizer``).

``frugalvision seed train`` writes it; ``seed encode`` turns images into codes with it and ``seed decode`` codes into
image embeddings. ``seed lm`` adds a language model that reads and draws those codes (:class:`SEEDImageLM`, kind
``seed_lm``: the tokenizer's tensors under ``seed.*``, the LM's new rows and LoRA adapters under ``lm.*``; the LM's
own weights stay where they are and are checked by fingerprint when the file is opened).

The tokenizer's file holds the visual encoder's tensors (``visual.*``: one feature level of a registered
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

__all__ = ["KIND", "LM_KIND", "SEEDImageLM", "SEEDImageTokenizer", "build_seed_from_info", "build_seed_lm",
           "build_seed_lm_from_info", "load_seed", "load_seed_lm", "save_seed", "save_seed_lm"]

KIND = "seed_tokenizer"
LM_KIND = "seed_lm"


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
    from ..weights import load_weights, read_model_info

    info = read_model_info(path)
    if info["kind"] != KIND:
        raise CheckpointError(f"{path} holds a {info['kind']} model, not a SEED tokenizer (kind {KIND}); give the "
                              "model.safetensors of `frugalvision seed train`")
    model = build_seed_from_info(info)
    load_weights(model, path, what="its description (seed_tokenizer)")
    model.info = info  # type: ignore[attr-defined]
    return model.eval()


# --------------------------------------------------------------------------------------------- tokenizer + LM
class SEEDImageLM(nn.Module):
    """A SEED tokenizer and a language model that reads and draws its codes: one ``seed_lm`` model file.

    Images are read as ``<img>`` + their codes + ``</img>`` and captioned (:meth:`caption`); captions are drawn as
    codes (:meth:`draw`) that the tokenizer de-tokenises into image embeddings (:meth:`embeddings`) for a pixel
    decoder. The LM's own weights are left out of :meth:`state_dict` (only its new rows and LoRA adapters are kept).

    Args:
        seed: The (trained) image tokenizer.
        lm: The LM with this tokenizer's ``codebook_size`` / ``num_queries`` image tokens.
        llm: Where the LM was loaded from (``"smollm2"``, a ``.gguf`` file, a folder or ``"tiny"``).
        fingerprint: :func:`~frugalvision.language.vlm_file.llm_fingerprint` of the LM before LoRA.
    """

    def __init__(self, seed: SEEDImageTokenizer, lm: Any, llm: str, fingerprint: dict[str, Any]) -> None:
        from .vlm_file import keep_llm_weights_out

        super().__init__()
        c = seed.tokenizer.config
        if (lm.codebook_size, lm.num_queries) != (c.codebook_size, c.num_queries):
            raise CheckpointError(f"the LM has {lm.codebook_size} codes x {lm.num_queries} per image, the tokenizer "
                                  f"{c.codebook_size} x {c.num_queries}")
        self.seed, self.lm = seed, keep_llm_weights_out(lm)
        self.llm_source, self.llm_fingerprint = str(llm), dict(fingerprint)

    def train(self, mode: bool = True) -> SEEDImageLM:
        """Train mode for the LM's trainable parts; the tokenizer stays frozen in eval mode."""
        super().train(mode)
        self.seed.eval()
        return self

    @torch.no_grad()
    def codes(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Images of any size / mode → their codes ``(B, num_queries)``."""
        return self.seed.encode_images(self.seed.pixels(images).to(self.lm.device)).cpu()

    def caption(self, images: Sequence[str | Path | Image.Image], max_new_tokens: int = 48, progress: bool = False
                ) -> list[str]:
        """Captions of images: tokenised, then read by the LM (greedy)."""
        return self.lm.read(self.codes(images), max_new_tokens=max_new_tokens, progress=progress)

    def draw(self, captions: Sequence[str], do_sample: bool = False, temperature: float = 1.0,
             generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Codes ``(B, num_queries)`` the LM writes for captions (greedy, or sampled at ``temperature``)."""
        return self.lm.draw(captions, do_sample=do_sample, temperature=temperature, generator=generator,
                            progress=progress).cpu()

    @torch.no_grad()
    def embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes → de-tokenised image embeddings ``(B, image_dim)`` (what a pixel decoder draws from)."""
        return self.seed.decode(codes.to(self.lm.device)).cpu()

    def describe(self) -> dict[str, Any]:
        """What rebuilds this model (stored in its model file)."""
        lora = self.lm.lora
        return {"kind": LM_KIND, "name": "seed_lm", "tokenizer": self.seed.describe(), "llm": self.llm_source,
                "llm_fingerprint": self.llm_fingerprint, "feature_dim": None,
                "lora": dataclasses.asdict(lora) if lora is not None else None,
                "codebook_size": self.lm.codebook_size, "num_queries": self.lm.num_queries}


def _language_model(llm: str, random_init: bool = False) -> tuple[Any, Any]:
    from ..models.llm import load_llm, tiny_llm

    if str(llm) == "tiny":
        return tiny_llm(seed=0)
    return load_llm(llm, random_init=random_init)


def build_seed_lm(seed: SEEDImageTokenizer, llm: str = "smollm2", lora: Any = True,
                  expect_fingerprint: dict[str, Any] | None = None) -> SEEDImageLM:
    """A :class:`SEEDImageLM` over ``seed`` with fresh image rows and adapters on the LM at ``llm``.

    Args:
        seed: The image tokenizer (frozen inside).
        llm: ``"smollm2"``, a ``.gguf`` file, a transformers folder, or ``"tiny"`` (tests).
        lora: As :class:`~frugalvision.language.seed_lm.SEEDLanguageModel`'s ``lora``.
        expect_fingerprint: The fingerprint a model file recorded; another LM is refused.

    Raises:
        CheckpointError: The LM at ``llm`` is not the one ``expect_fingerprint`` names.
    """
    from .seed_lm import SEEDLanguageModel
    from .vlm_file import _check_fingerprint, llm_fingerprint

    model, tokenizer = _language_model(llm)
    fingerprint = llm_fingerprint(model)
    if expect_fingerprint is not None:
        _check_fingerprint(expect_fingerprint, fingerprint, str(llm))
    c = seed.tokenizer.config
    lm = SEEDLanguageModel(c.codebook_size, c.num_queries, model=model, tokenizer=tokenizer, lora=lora)
    return SEEDImageLM(seed, lm, str(llm), fingerprint).eval()


def build_seed_lm_from_info(info: dict[str, Any], llm: str | None = None) -> SEEDImageLM:
    """The architecture of a ``seed_lm`` model file (its LM loaded, trained weights not).

    ``llm`` overrides where the LM is (a moved folder).
    """
    try:
        seed = build_seed_from_info(info["tokenizer"])
        lora = info["lora"] if info["lora"] is not None else False
        source = str(llm or info["llm"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"the SEED LM's description is incomplete or malformed ({exc})") from None
    return build_seed_lm(seed, source, lora=lora, expect_fingerprint=info.get("llm_fingerprint"))


def save_seed_lm(model: SEEDImageLM, path: str | Path, overwrite: bool = False, **meta: Any) -> Path:
    """Write the ``seed_lm`` model file atomically (the LM's own weights left out).

    Refuses to replace a file without ``overwrite``.
    """
    from ..errors import ConfigError
    from ..weights import MODEL_META, write_weights

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=true to replace it")
    return write_weights(path, model.state_dict(), metadata={MODEL_META: json.dumps({**model.describe(), **meta})})


def load_seed_lm(path: str | Path, llm: str | None = None, device: str | torch.device = "cpu") -> SEEDImageLM:
    """Open a ``seed_lm`` model file (``frugalvision seed lm``): rebuild over its LM (fingerprint checked), load.

    Args:
        path: The model file.
        llm: Where the LM is, when not where the file says.
        device: Where to put the model.

    Raises:
        CheckpointError: A missing file, a model file of another kind, another LM, or tensors that do not fit.
    """
    from ..weights import load_weights, read_model_info

    info = read_model_info(path)
    if info["kind"] != LM_KIND:
        raise CheckpointError(f"{path} holds a {info['kind']} model, not a SEED language model (kind {LM_KIND}); "
                              "give the lm.safetensors of `frugalvision seed lm`")
    model = build_seed_lm_from_info(info, llm)
    load_weights(model, path, what="its description (seed_lm)")
    model.info = info  # type: ignore[attr-defined]
    return model.to(device).eval()

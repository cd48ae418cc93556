"""What MiniGPT-v2 and MiniGPT-4 share: frozen vision, image embeddings in a causal LM, decoding, checkpoints.

A frozen visual encoder, image embeddings spliced into a causal LM, the answer-only loss, greedy / sampled decoding
with or without a KV cache, LoRA, and loading official checkpoints.

A subclass only says how images become LLM input embeddings (:meth:`VisionLanguageModel.encode_images`) and how
official checkpoint names map onto its own (``checkpoint_filter_fn``). The rest follows the official
``minigpt4/models/minigpt_base.py``:

* training sequences are ``[before] [image] [after] [answer + eos]``, right-padded; labels are ``-100`` except on the
  answer tokens (so the loss is the mean cross-entropy of the answer tokens of the batch);
* generation sequences are ``[before] [image] [after]``, left-padded, with position ids counted from each
  sequence's first real token, so a padded batch decodes exactly as its examples one by one.

The LLM is any transformers causal LM (LLaMA family names: ``q_proj`` / ``v_proj`` for LoRA). It is frozen; with
``lora`` it gets peft LoRA adapters (official MiniGPT-v2: r 64, alpha 16, dropout 0.05 on q/v).
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..errors import CheckpointError, ConfigError
from ..weights import WeightsFit, check_fit, read_weights
from .prompts import EncodedExample, encode_prompt

__all__ = [
    "LoraSettings",
    "VisionLanguageModel",
    "load_official_checkpoint",
    "map_llm_key",
]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the LLM (defaults: official MiniGPT-v2).

    Example:
        >>> LoraSettings().r, LoraSettings().target_modules
        (64, ('q_proj', 'v_proj'))
    """

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def _lora_settings(lora: bool | LoraSettings | Mapping[str, Any]) -> LoraSettings | None:
    if lora is False or lora is None:
        return None
    if lora is True:
        return LoraSettings()
    if isinstance(lora, LoraSettings):
        return lora
    if isinstance(lora, Mapping):
        extra = set(lora) - {"r", "alpha", "dropout", "target_modules"}
        if extra:
            raise ConfigError(f"unknown LoRA settings {sorted(extra)}; known: r, alpha, dropout, target_modules")
        d = dict(lora)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return LoraSettings(**d)
    raise ConfigError(f"lora must be True, False, a LoraSettings or a dict, not {type(lora).__name__}")


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class VisionLanguageModel(nn.Module):
    """Base class: frozen visual encoder → (subclass: image embeddings) → causal LM with optional LoRA.

    Args:
        visual: Any timm / frugalvision model whose ``forward_features`` returns ``(B, C, H, W)`` or ``(B, N, C)``
            tokens (prefix / class tokens are dropped using ``num_prefix_tokens`` where the subclass asks).
            Frozen and kept in eval mode.
        llm: A transformers causal LM (:func:`~frugalvision.language.llm.load_llm`). It is frozen in place, and
            with ``lora`` peft injects the adapters into it in place: build each model from its own LLM instance.
        tokenizer: Its tokenizer.
        lora: ``True`` (official settings), a :class:`LoraSettings` / dict, or ``False`` (LLM fully frozen).
        vision_dim: Width ``C`` of the visual tokens (``visual.num_features`` when omitted).
        ln_vision: A LayerNorm on the visual tokens (the official ``ln_vision``).
        chat: Wrap prompts in the tokenizer's chat template (:func:`~frugalvision.language.prompts.chat_wrap`).
    """

    #: Adapter name of peft (in its parameter names ``...lora_A.<name>.weight``).
    adapter_name = "default"

    def __init__(self, visual: nn.Module, llm: nn.Module, tokenizer: Any, *,
                 lora: bool | LoraSettings | Mapping[str, Any] = True, vision_dim: int | None = None,
                 ln_vision: bool = True, chat: bool = True) -> None:
        super().__init__()
        self.visual = visual
        _freeze(self.visual)
        self.visual.eval()
        dim = vision_dim if vision_dim is not None else getattr(visual, "num_features", None)
        if not isinstance(dim, int) or dim <= 0:
            raise ConfigError(f"cannot tell the width of {type(visual).__name__}'s tokens (no num_features); pass "
                              f"vision_dim=")
        self.vision_dim = dim
        self.ln_vision = nn.LayerNorm(dim) if ln_vision else nn.Identity()
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat = chat
        self.lora = _lora_settings(lora)
        _freeze(llm)
        if self.lora is not None:
            peft = require("peft", "LoRA adapters on the language model", extra="vlm")
            cfg = peft.LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                                  target_modules=list(self.lora.target_modules), bias="none", task_type="CAUSAL_LM")
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                llm = peft.get_peft_model(llm, cfg, adapter_name=self.adapter_name)
        self.llm = llm

    # ------------------------------------------------------------------------------------------- pieces
    @property
    def llm_hidden_size(self) -> int:
        """Width of the LLM's input embeddings."""
        return int(self.llm.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the LLM's embeddings live (inputs are moved there)."""
        return self.llm.get_input_embeddings().weight.device

    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (inside the peft wrapper when LoRA is on; LoRA layers included)."""
        return self.llm.get_base_model() if self.lora is not None else self.llm

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """Train mode for the trainable parts; the frozen visual encoder stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that training changes (what the official checkpoints store): projector, adapters, ..."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings of token ids."""
        return self.llm.get_input_embeddings()(ids)

    @torch.no_grad()
    def _visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.visual.parameters(), None)
        if p is not None:
            pixels = pixels.to(device=p.device, dtype=p.dtype)
        return self.visual.forward_features(pixels)

    def visual_tokens(self, pixels: torch.Tensor, drop_prefix: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen visual tokens ``(B, N, C)`` after ``ln_vision``, and their ``(rows, cols)`` patch grid.

        Args:
            pixels: ``(B, 3, H, W)`` images, normalised as the visual encoder expects.
            drop_prefix: Drop the ``num_prefix_tokens`` class / register tokens of a ``(B, N, C)`` output (the grid
                describes the remaining tokens; with prefix tokens kept it describes the patch tokens only).
        """
        feats = self._visual_features(pixels)
        if feats.ndim == 4:  # (B, C, H, W): raster order, row by row
            h, w = feats.shape[-2:]
            tokens, grid = feats.flatten(2).transpose(1, 2), (h, w)
        elif feats.ndim == 3:
            prefix = int(getattr(self.visual, "num_prefix_tokens", 0) or 0)
            n = feats.shape[1] - prefix
            grid = _grid_of(self.visual, n)
            tokens = feats[:, prefix:] if drop_prefix else feats
        else:
            raise ConfigError(f"{type(self.visual).__name__}.forward_features returned shape {tuple(feats.shape)}; "
                              "expected (B, C, H, W) or (B, N, C)")
        if tokens.shape[-1] != self.vision_dim:
            raise ConfigError(f"visual tokens have width {tokens.shape[-1]}, but the model was built for "
                              f"vision_dim={self.vision_dim}")
        return self.ln_vision(tokens.contiguous()), grid

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` → LLM input embeddings ``(B, T, d)``."""
        raise NotImplementedError

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
        """Official checkpoint names → this model's names (each subclass maps its family's names)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- sequences
    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.encode_images(pixels.to(self.device))
        return emb.to(self.llm.get_input_embeddings().weight.dtype)

    def build_inputs(self, image_embeds: torch.Tensor, examples: Sequence[EncodedExample],
                     left_pad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice image embeddings into each example's token embeddings and pad the batch.

        Args:
            image_embeds: ``(B, T, d)`` from :meth:`encode_images`.
            examples: ``B`` encoded examples (:func:`~frugalvision.language.prompts.encode_example`).
            left_pad: Pad on the left (generation) instead of the right (training).

        Returns:
            ``(inputs_embeds (B, L, d), attention_mask (B, L) long, labels (B, L) long)``; labels are the answer
            ids at answer positions and ``-100`` elsewhere (not yet shifted: position ``i`` predicts ``i + 1``).
        """
        if len(examples) != image_embeds.shape[0]:
            raise ConfigError(f"{image_embeds.shape[0]} images but {len(examples)} examples")
        dev, n_img = image_embeds.device, image_embeds.shape[1]
        flat = [i for ex in examples for i in (*ex.before, *ex.after, *ex.answer)]
        tok = self.embed_tokens(torch.tensor(flat, dtype=torch.long, device=dev)) if flat else None
        seqs, labels, start = [], [], 0
        for img, ex in zip(image_embeds, examples, strict=True):
            nb, na, nans = len(ex.before), len(ex.after), len(ex.answer)
            assert tok is not None
            t = tok[start:start + nb + na + nans]
            start += nb + na + nans
            seqs.append(torch.cat([t[:nb], img.to(t.dtype), t[nb:]]))
            lab = torch.full((nb + n_img + na + nans,), -100, dtype=torch.long, device=dev)
            if nans:
                lab[-nans:] = torch.tensor(ex.answer, dtype=torch.long, device=dev)
            labels.append(lab)
        length = max(s.shape[0] for s in seqs)
        b, d = len(seqs), image_embeds.shape[-1]
        embeds = image_embeds.new_zeros(b, length, d, dtype=seqs[0].dtype)
        mask = torch.zeros(b, length, dtype=torch.long, device=dev)
        out_labels = torch.full((b, length), -100, dtype=torch.long, device=dev)
        for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
            sl = slice(length - s.shape[0], length) if left_pad else slice(0, s.shape[0])
            embeds[i, sl], mask[i, sl], out_labels[i, sl] = s, 1, lab
        return embeds, mask, out_labels

    def encode(self, prompts: str | Sequence[str] | Sequence[EncodedExample], batch: int) -> list[EncodedExample]:
        """Prompts (strings holding ``<ImageHere>``, or encoded examples) as encoded examples, one per image."""
        if isinstance(prompts, str):
            prompts = [prompts] * batch
        if len(prompts) != batch:
            raise ConfigError(f"{batch} images but {len(prompts)} prompts")
        return [p if isinstance(p, EncodedExample) else encode_prompt(self.tokenizer, p, self.chat) for p in prompts]

    def _backbone(self) -> tuple[nn.Module, nn.Module]:
        lm = self.causal_lm()
        return lm.base_model, lm.get_output_embeddings()

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp_min(0)

    # ------------------------------------------------------------------------------------------- training
    def forward(self, pixels: torch.Tensor, examples: Sequence[EncodedExample],
                reduction: str = "mean") -> torch.Tensor:
        """Teacher-forced loss on the answer tokens.

        Args:
            pixels: ``(B, 3, H, W)`` images.
            examples: ``B`` encoded examples with answers (:func:`~frugalvision.language.prompts.encode_example`).
            reduction: ``"mean"`` over every answer token of the batch (the official loss), or ``"none"`` for
                each example's mean (e.g. to rank multiple-choice answers).

        Returns:
            The loss (a scalar, or ``(B,)``); only answer logits are computed (the vocabulary projection of the
            image and prompt positions is skipped).
        """
        if reduction not in ("mean", "none"):
            raise ConfigError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        if any(not ex.answer for ex in examples):
            raise ConfigError("every training example needs an answer (use encode_example, not encode_prompt)")
        embeds, mask, labels = self.build_inputs(self._image_embeds(pixels), examples)
        backbone, head = self._backbone()
        hidden = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(mask),
                          use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="none")
        if reduction == "mean":
            return loss.mean()
        per = torch.zeros(keep.shape, dtype=loss.dtype, device=loss.device)
        per[keep] = loss
        return per.sum(1) / keep.sum(1)

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: str | Sequence[str] | Sequence[EncodedExample],
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 **hf_kwargs: Any) -> list[str]:
        """Answer each prompt about its image.

        Args:
            pixels: ``(B, 3, H, W)`` images.
            prompts: One prompt for all images, or one per image (strings holding ``<ImageHere>`` once, built with
                :func:`~frugalvision.language.prompts.build_prompt`, or encoded prompts).
            max_new_tokens: Most tokens generated per answer.
            do_sample: Sample (``temperature``, ``top_p``) instead of greedy decoding.
            temperature: Softmax temperature when sampling.
            top_p: Nucleus sampling mass when sampling.
            use_cache: Reuse keys/values of earlier positions (KV cache); ``False`` recomputes the whole sequence
                at every step (same tokens, slower: for benchmarks).
            generator: Random generator for sampling.
            **hf_kwargs: Anything else (``num_beams``, ``repetition_penalty``, ...) decodes with transformers'
                ``generate(inputs_embeds=..., attention_mask=...)`` instead of this module's loop.

        Returns:
            The decoded answers (special tokens removed, stripped).
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        examples = self.encode(prompts, pixels.shape[0])
        embeds, mask, _ = self.build_inputs(self._image_embeds(pixels), examples, left_pad=True)
        if hf_kwargs:
            ids = self._hf_generate(embeds, mask, max_new_tokens, do_sample, temperature, top_p, use_cache,
                                    **hf_kwargs)
        else:
            ids = self.decode_loop(embeds, mask, max_new_tokens, do_sample, temperature, top_p, use_cache, generator)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def _stop_ids(self) -> set[int]:
        stop = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.causal_lm(), "generation_config", None), "eos_token_id", None)
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return {int(i) for i in stop if i is not None}

    def decode_loop(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
                    generator: torch.Generator | None = None) -> list[list[int]]:
        """Token-by-token decoding from left-padded input embeddings; returns each row's new ids (stop id excluded).

        With ``use_cache`` the prompt is run once and each step feeds only the new token (keys and values of the
        earlier positions are reused); without it every step reruns the whole sequence.
        """
        backbone, head = self._backbone()
        stop = self._stop_ids()
        b = embeds.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        out: list[list[int]] = [[] for _ in range(b)]
        cache_arg = _cache_argument(backbone)
        past, step_embeds = None, embeds
        for _ in range(max_new_tokens):
            pos = self._positions(mask)
            if past is not None:
                pos = pos[:, -step_embeds.shape[1]:]
            res = backbone(inputs_embeds=step_embeds, attention_mask=mask, position_ids=pos,
                           use_cache=use_cache, **({cache_arg: past} if past is not None else {}))
            logits = head(res.last_hidden_state[:, -1]).float()
            nxt = _pick(logits, do_sample, temperature, top_p, generator)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            new = self.embed_tokens(nxt)[:, None].to(embeds.dtype)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:
                past, step_embeds = getattr(res, cache_arg), new
            else:
                embeds = torch.cat([embeds, new], dim=1)
                step_embeds = embeds
        return out

    def _hf_generate(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, do_sample: bool,
                     temperature: float, top_p: float, use_cache: bool, **kwargs: Any) -> list[list[int]]:
        if not use_cache:
            raise ConfigError("transformers' generate needs use_cache=True with input embeddings (without a cache "
                              "it would drop the image); leave out the extra generate arguments to use "
                              "use_cache=False")
        lm = self.causal_lm()
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        pad = self.tokenizer.pad_token_id
        ids = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                          do_sample=do_sample, use_cache=True, pad_token_id=pad, **sampling, **kwargs)
        stop = self._stop_ids()
        rows = []
        for row in ids.tolist():
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            rows.append(row[:cut])
        return rows


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_argument(backbone: nn.Module) -> str:
    """Name of the KV-cache argument and output of a transformers model: ``cache`` (>= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _grid_of(visual: nn.Module, n: int) -> tuple[int, int]:
    grid = getattr(getattr(visual, "patch_embed", None), "grid_size", None)
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"cannot tell the patch grid of {n} visual tokens (not a square and no "
                          f"patch_embed.grid_size)")
    return side, side


# --------------------------------------------------------------------------------------------- official checkpoints
_LORA_RE = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\.(weight|bias)$")


def map_llm_key(key: str, model: VisionLanguageModel) -> str:
    """An official ``llama_model.*`` name as our ``llm.*`` name (peft's naming of this peft version).

    Official checkpoints were written with peft 0.2 (``...q_proj.lora_A.weight``); recent peft names the adapter
    (``...q_proj.lora_A.default.weight``) and moves a wrapped layer's own weight to ``...q_proj.base_layer.weight``.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> from frugalvision.language.minigpt_v2 import MiniGPTv2
        >>> llm, tok = tiny_llm()
        >>> m = MiniGPTv2(nn.Identity(), llm, tok, vision_dim=8, lora=True)
        >>> map_llm_key("llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", m)
        'llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'
    """
    rest = key[len("llama_model."):]
    if model.lora is None:
        rest = rest.removeprefix("base_model.model.")
        return "llm." + rest
    if not rest.startswith("base_model.model."):
        rest = "base_model.model." + rest
    name = model.adapter_name
    rest = _LORA_RE.sub(lambda m: f".{m.group(1)}.{name}.{m.group(2)}"
                        if f".{name}." not in m.group(0) else m.group(0), rest)
    m = re.search(r"\.(\w+)\.(weight|bias)$", rest)
    if m and m.group(1) in model.lora.target_modules:
        rest = rest[:m.start()] + f".{m.group(1)}.base_layer.{m.group(2)}"
    return "llm." + rest


def _group(key: str) -> str:
    if ".lora_" in key:
        return "lora"
    return key.split(".", 1)[0]


def load_official_checkpoint(model: VisionLanguageModel, weights: str | Path | Mapping[str, torch.Tensor],
                             filter_fn: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
                             | None = None, source: str | Path | None = None) -> WeightsFit:
    """Load an official MiniGPT checkpoint (``{"model": state_dict}`` ``.pth`` or safetensors) into ``model``.

    Official checkpoints hold only what their stage trained (MiniGPT-v2 stage 3: ``llama_proj`` + LoRA; MiniGPT-4:
    ``llama_proj``; BLIP-2: the Q-Former, ``query_tokens``, ``ln_vision``). Names are mapped with the model's
    ``checkpoint_filter_fn``; then every *part* the file provides (``llama_proj``, the LoRA tensors, ``qformer``,
    ``ln_vision``, ...) must fit the model entirely: missing tensors of a provided part, tensors the model has no
    place for and shape mismatches are refused (:func:`frugalvision.weights.check_fit`), and nothing is loaded.

    Returns:
        The fit: ``loaded`` lists the model keys that were set.
    """
    if isinstance(weights, str | Path):
        source = source or weights
        weights = read_weights(weights)  # torch.load(weights_only=True) or safetensors; {"model": ...} unwrapped
    src = source or "(in memory)"
    filter_fn = filter_fn or type(model).checkpoint_filter_fn
    mapped = filter_fn(dict(weights), model)
    if not mapped:
        raise CheckpointError(f"weights {src} hold nothing {type(model).__name__} uses")
    own = model.state_dict()
    parts = {_group(k) for k in mapped}
    expected = {k: v for k, v in own.items() if _group(k) in parts}
    fit = check_fit(expected, mapped, src, type(model).__name__)
    result = model.load_state_dict({k: mapped[k] for k in fit.loaded}, strict=False)
    if result.unexpected_keys:  # cannot happen after check_fit; kept as a guard
        raise CheckpointError(f"weights {src}: unexpected keys {result.unexpected_keys[:5]}")
    return fit


@dataclass
class _Renames:
    """Ordered (regex, replacement) renames with a list of keys to drop (used by the checkpoint filters)."""

    renames: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    drop: list[re.Pattern[str]] = field(default_factory=list)

    def apply(self, key: str) -> str | None:
        if any(p.search(key) for p in self.drop):
            return None
        for pattern, repl in self.renames:
            key = pattern.sub(repl, key)
        return key

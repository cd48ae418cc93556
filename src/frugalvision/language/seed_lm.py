"""A causal LM that reads and draws SEED image codes (SEED-LLaMA's recipe at small scale).

SEED-LLaMA (Ge et al., ICLR 2024, §3.3) adds ``<img_00000>`` … ``<img_{K-1}>`` plus ``<img>`` / ``</img>`` to a
pretrained LLM's vocabulary and trains it, with LoRA, on image-caption pairs written as one sequence in either
order (image→text or text→image, chosen at random with probability 0.5), with the next-token loss on *all* tokens.
After that one LM both captions an image (``<img>…</img>`` → text) and draws one (text → ``<img>`` → 32 codes →
the SEED de-tokeniser → an image embedding → the diffusion decoder).

:class:`SEEDLanguageModel` does that on any transformers causal LM (SmolLM2-135M-Instruct by default,
:func:`~frugalvision.language.llm.load_llm`):

* the ``K + 2`` new tokens are added to the tokenizer; their input and output rows are **new parameters**
  (``image_embed`` and, for an LM with untied embeddings, ``image_head``) initialised to the mean of the LM's rows
  (plus a little noise) while the LM's own rows stay frozen. The released SEED-LLaMA trains the whole embedding and
  output matrices; training only the new rows leaves every text token's rows exactly as pretrained and keeps the
  trainable state small (``K + 2`` rows);
* LoRA (peft) on the attention projections (:class:`~frugalvision.language.vlm_base.LoraSettings`, default r 64,
  alpha 16 on q/v);
* :meth:`SEEDLanguageModel.read` captions codes (greedy, text tokens only), :meth:`SEEDLanguageModel.draw` writes
  exactly ``num_queries`` codes after a caption (decoding restricted to the code tokens, so every drawing parses),
  both with a KV cache.

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lm = SEEDLanguageModel(codebook_size=16, num_queries=4, llm="tiny", lora={"r": 4})
    >>> ids = lm.sequence([3, 1, 4, 1], "a crack", image_first=True)
    >>> lm.tokenizer.decode(ids[:6])
    '<img><img_00003><img_00001><img_00004><img_00001></img>'
    >>> loss = lm.loss([ids])
    >>> lm.draw(["a crack"]).shape, len(lm.read(torch.tensor([[3, 1, 4, 1]]), max_new_tokens=3))
    (torch.Size([1, 4]), 1)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..errors import ConfigError, DataError
from .seed import IMAGE_START, image_token_strings
from .vlm_base import LoraSettings, _cache_argument, _freeze, _lora_settings, _pick

__all__ = ["SEEDLMSettings", "SEEDLanguageModel", "fit_seed_lm"]


class SEEDLanguageModel(nn.Module):
    """A causal LM with SEED image tokens in its vocabulary: reads codes into captions, draws codes from captions.

    Args:
        codebook_size: ``K``, the SEED tokenizer's number of codes (``<img_00000>`` … ``<img_{K-1}>``).
        num_queries: Codes per image (the tokenizer's query count; 32 in SEED).
        llm: ``"smollm2"``, a ``.gguf`` file or a transformers folder (:func:`~frugalvision.language.llm.load_llm`),
            or ``"tiny"`` (a small random LLaMA with a character tokenizer, for tests).
        lora: LoRA on the LM (``True``: r 64, alpha 16, dropout 0.05 on q/v), a dict / :class:`LoraSettings`, or
            ``False`` (then only the new rows train).
        random_init: The LM's architecture and tokenizer with random weights (does language pretraining help?).
        model: A loaded causal LM to use instead of ``llm`` (with ``tokenizer``); it is frozen in place.
        tokenizer: Its tokenizer; the image tokens are added to it in place.
        init_noise: Std of the noise added to the mean-initialised new rows, relative to the rows' std.
        feature_dim: Also read *continuous* image features ``(B, num_queries, feature_dim)`` through a trainable
            ``Linear`` projector (``image_proj``, MiniGPT-4 style) in place of the code tokens: the
            ``features=`` argument of :meth:`loss` and :meth:`read_features`; the comparison arm for reading.
    """

    adapter_name = "default"

    def __init__(self, codebook_size: int, num_queries: int, llm: str | Path = "smollm2", *,
                 lora: bool | LoraSettings | Mapping[str, Any] = True, random_init: bool = False, model: Any = None,
                 tokenizer: Any = None, init_noise: float = 0.02, feature_dim: int | None = None) -> None:
        super().__init__()
        if num_queries < 1:
            raise ConfigError(f"num_queries must be >= 1, got {num_queries}")
        strings = image_token_strings(codebook_size)  # checks codebook_size
        if model is None and str(llm) == "tiny":
            from .llm import tiny_llm

            model, tokenizer = tiny_llm()
        elif model is None:
            from .llm import load_llm

            model, tokenizer = load_llm(llm, random_init=random_init)
        elif tokenizer is None:
            raise ConfigError("model= needs its tokenizer=")
        self.codebook_size, self.num_queries = int(codebook_size), int(num_queries)
        base_rows = model.get_input_embeddings().weight
        self.text_vocab = len(tokenizer)
        if tokenizer.convert_tokens_to_ids(IMAGE_START) not in (None, tokenizer.unk_token_id):
            raise ConfigError(f"the tokenizer already has {IMAGE_START}: pass a fresh tokenizer")
        if self.text_vocab > base_rows.shape[0]:
            raise ConfigError(f"the tokenizer has {self.text_vocab} tokens but the LM only {base_rows.shape[0]} rows")
        tokenizer.add_tokens(strings, special_tokens=True)
        self.first_image_id = tokenizer.convert_tokens_to_ids(strings[0])
        if self.first_image_id != self.text_vocab or len(tokenizer) != self.text_vocab + len(strings):
            raise ConfigError("the image tokens did not get consecutive ids after the text vocabulary")
        self.start_id, self.end_id = self.first_image_id + codebook_size, self.first_image_id + codebook_size + 1
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        _freeze(model)
        w = base_rows.detach().float()
        n_new = len(strings)

        def rows() -> nn.Parameter:
            noise = torch.randn(n_new, w.shape[1]) * w.std() * init_noise
            return nn.Parameter((w.mean(0, keepdim=True) + noise).to(base_rows.dtype))

        self.image_embed = rows()
        out = model.get_output_embeddings()
        self.tied = out is None or out.weight is model.get_input_embeddings().weight
        self.image_head = None if self.tied else rows()
        hidden = int(base_rows.shape[1])
        self.image_proj = nn.Linear(int(feature_dim), hidden) if feature_dim else None
        self.lora = _lora_settings(lora)
        if self.lora is not None:
            peft = require("peft", "LoRA adapters on the language model", extra="vlm")
            cfg = peft.LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                                  target_modules=list(self.lora.target_modules), bias="none", task_type="CAUSAL_LM")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = peft.get_peft_model(model, cfg, adapter_name=self.adapter_name)
        self.llm = model

    # ------------------------------------------------------------------------------------------- pieces
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (inside the peft wrapper when LoRA is on)."""
        return self.llm.get_base_model() if self.lora is not None else self.llm

    @property
    def device(self) -> torch.device:
        """Where the new rows (and inputs) live."""
        return self.image_embed.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors training changes: the new rows and the LoRA adapters."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def code_ids(self, codes: torch.Tensor | Sequence[int]) -> list[int]:
        """Token ids of one image's codes, ``<img>`` and ``</img>`` included."""
        t = torch.as_tensor(codes)
        if t.ndim != 1 or t.numel() != self.num_queries:
            raise DataError(f"an image is {self.num_queries} codes, got shape {tuple(t.shape)}")
        if t.is_floating_point() or bool(((t < 0) | (t >= self.codebook_size)).any()):
            raise DataError(f"image codes must be integers in [0, {self.codebook_size}), got {t.tolist()[:8]}...")
        return [self.start_id, *(self.first_image_id + t).tolist(), self.end_id]

    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def sequence(self, codes: torch.Tensor | Sequence[int], caption: str, image_first: bool) -> list[int]:
        """One training sequence: ``<img>codes</img> caption <eos>`` or ``caption <img>codes</img> <eos>``."""
        if not caption.strip():
            raise DataError("empty caption")
        img, txt = self.code_ids(codes), self.text_ids(caption)
        return (img + txt if image_first else txt + img) + [self.eos_id]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids over the extended vocabulary."""
        new = ids >= self.first_image_id
        base = self.causal_lm().get_input_embeddings()(ids.clamp(max=self.first_image_id - 1))
        extra = self.image_embed[(ids - self.first_image_id).clamp(min=0)]
        return torch.where(new[..., None], extra.to(base.dtype), base)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the extended vocabulary ``(…, text_vocab + K + 2)``."""
        lm = self.causal_lm()
        text = lm.get_output_embeddings()(hidden)[..., :self.first_image_id]
        head = self.image_embed if self.image_head is None else self.image_head
        return torch.cat([text, hidden @ head.to(hidden.dtype).t()], dim=-1)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, past: Any = None, use_cache: bool = False,
                features: torch.Tensor | None = None) -> Any:
        backbone = self.causal_lm().base_model
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        kw = {_cache_argument(backbone): past} if past is not None else {}
        embeds = self.embed(ids)
        if features is not None:  # the num_queries positions after each row's <img> hold the projected features
            if self.image_proj is None:
                raise ConfigError("this model reads codes only: build it with feature_dim= to read features")
            if features.ndim != 3 or features.shape[1] != self.num_queries:
                raise DataError(f"features must be (B, {self.num_queries}, D), got {tuple(features.shape)}")
            start = (ids == self.start_id).float().argmax(1)
            rows = torch.arange(len(ids), device=ids.device)[:, None]
            cols = start[:, None] + 1 + torch.arange(self.num_queries, device=ids.device)
            embeds = embeds.index_put((rows.expand_as(cols), cols),
                                      self.image_proj(features.to(self.device, embeds.dtype)))
        return backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=use_cache, **kw)

    # ------------------------------------------------------------------------------------------- training
    def _batch(self, seqs: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(n - len(s), n) if left else slice(0, len(s))
            ids[i, sl] = torch.as_tensor(list(s))
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def loss(self, seqs: Sequence[Sequence[int]], features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over every token of right-padded sequences (SEED-LLaMA's loss).

        With ``features`` (``feature_dim`` models) the code tokens of each sequence are placeholders replaced by
        the projected features, and are not targets.
        """
        if not seqs or any(len(s) < 2 for s in seqs):
            raise DataError("each sequence needs at least two tokens")
        ids, mask = self._batch(seqs)
        hidden = self._hidden(ids, mask, features=features).last_hidden_state[:, :-1]
        keep = mask[:, 1:].bool()
        if features is not None:
            keep &= (ids[:, 1:] < self.first_image_id) | (ids[:, 1:] >= self.start_id)
        return F.cross_entropy(self.logits(hidden[keep]).float(), ids[:, 1:][keep])

    # ------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def _decode(self, prompts: Sequence[Sequence[int]], steps: int, allowed: slice, stop: int | None,
                do_sample: bool, temperature: float, generator: torch.Generator | None,
                features: torch.Tensor | None = None) -> list[list[int]]:
        ids, mask = self._batch(prompts, left=True)
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        past, step_ids = None, ids
        for _ in range(steps):
            res = self._hidden(step_ids, mask, past=past, use_cache=True, features=features if past is None else None)
            logits = self.logits(res.last_hidden_state[:, -1]).float()
            masked = torch.full_like(logits, -math.inf)
            masked[:, allowed] = logits[:, allowed]
            if stop is not None:
                masked[:, stop] = logits[:, stop]
            nxt = _pick(masked, do_sample, temperature, 1.0, generator)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if stop is not None and t == stop:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            past = getattr(res, _cache_argument(self.causal_lm().base_model))
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return out

    def read(self, codes: torch.Tensor, max_new_tokens: int = 48, batch_size: int = 16, progress: bool = False
             ) -> list[str]:
        """Captions of images given as codes ``(B, num_queries)``: greedy, text tokens only, until end of text."""
        from tqdm.auto import tqdm

        codes = torch.as_tensor(codes)
        if codes.ndim != 2:
            raise DataError(f"codes must be (images, {self.num_queries}), got shape {tuple(codes.shape)}")
        texts = []
        for b in tqdm(range(0, len(codes), batch_size), desc="read", disable=not progress, leave=False):
            prompts = [self.code_ids(c) for c in codes[b:b + batch_size]]
            rows = self._decode(prompts, max_new_tokens, slice(0, self.first_image_id), self.eos_id, False, 1.0, None)
            texts += [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        return texts

    def read_features(self, features: torch.Tensor, max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
        """Captions of images given as continuous features ``(B, num_queries, feature_dim)`` (the projector arm)."""
        features = torch.as_tensor(features)
        texts = []
        placeholder = torch.zeros(self.num_queries, dtype=torch.long)
        for b in range(0, len(features), batch_size):
            chunk = features[b:b + batch_size]
            prompts = [self.code_ids(placeholder)] * len(chunk)
            rows = self._decode(prompts, max_new_tokens, slice(0, self.first_image_id), self.eos_id, False, 1.0, None,
                                features=chunk)
            texts += [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        return texts

    def draw(self, captions: Sequence[str], batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
             generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Codes ``(B, num_queries)`` of images for captions: ``caption <img>`` then ``num_queries`` code tokens.

        Decoding is restricted to the ``K`` code tokens, so every drawing is a valid image (greedy by default,
        or sampled at ``temperature``).
        """
        if isinstance(captions, str):
            captions = [captions]
        if not captions or any(not c.strip() for c in captions):
            raise DataError("draw needs non-empty captions")
        from tqdm.auto import tqdm

        rows = []
        allowed = slice(self.first_image_id, self.first_image_id + self.codebook_size)
        for b in tqdm(range(0, len(captions), batch_size), desc="draw", disable=not progress, leave=False):
            prompts = [[*self.text_ids(c), self.start_id] for c in captions[b:b + batch_size]]
            rows += self._decode(prompts, self.num_queries, allowed, None, do_sample, temperature, generator)
        return torch.tensor(rows, dtype=torch.long) - self.first_image_id


@dataclass
class SEEDLMSettings:
    """Training of :func:`fit_seed_lm` (defaults: LoRA-style fine-tuning at small scale).

    Example:
        >>> SEEDLMSettings().image_first_p
        0.5
    """

    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-4
    rows_lr: float = 2e-3
    weight_decay: float = 0.0
    image_first_p: float = 0.5
    seed: int = 0
    progress: bool = True
    log: list[dict[str, float]] = field(default_factory=list)


def fit_seed_lm(model: SEEDLanguageModel, codes: torch.Tensor | None, captions: Sequence[str],
                settings: SEEDLMSettings | None = None, features: torch.Tensor | None = None) -> float:
    """Train the new rows and LoRA on image-caption pairs, each written in a random order; returns seconds.

    Args:
        model: The LM.
        codes: ``(N, num_queries)`` codes of the training images (``None`` with ``features``).
        captions: Their ``N`` captions.
        settings: Steps, batch size, learning rates (``rows_lr`` for the new parameters: rows and projector),
            order probability.
        features: ``(N, num_queries, feature_dim)`` continuous features instead of codes (the projector arm):
            every pair is written image first (it can only read), loss on the text.
    """
    from tqdm.auto import tqdm

    s = settings or SEEDLMSettings()
    if features is not None:
        features = torch.as_tensor(features)
        codes = torch.zeros(features.shape[:2], dtype=torch.long)
    elif codes is None:
        raise ConfigError("fit_seed_lm needs codes or features")
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or len(codes) != len(captions):
        raise DataError(f"codes {tuple(codes.shape)} and {len(captions)} captions do not pair up")
    if len(captions) == 0:
        raise DataError("no training pairs")
    rows = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("image_")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("image_")]
    groups = [{"params": rows, "lr": s.rows_lr}] + ([{"params": rest, "lr": s.lr}] if rest else [])
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    warm = max(1, s.steps // 10)
    def lr_at(i: int) -> float:
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, s.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(s.seed)
    pairs = [(model.code_ids(c), model.text_ids(t)) for c, t in zip(codes, captions, strict=True)]
    model.train()
    t0, ema = time.perf_counter(), float("nan")
    bar = tqdm(range(s.steps), desc="SEED LM", disable=not s.progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(pairs), (s.batch_size,), generator=g).tolist()
        first = (torch.rand(s.batch_size, generator=g) < (1.0 if features is not None else s.image_first_p)).tolist()
        seqs = [(pairs[i][0] + pairs[i][1] if f else pairs[i][1] + pairs[i][0]) + [model.eos_id]
                for i, f in zip(idx, first, strict=True)]
        loss = model.loss(seqs, features=None if features is None else features[idx])
        if not torch.isfinite(loss):
            raise DataError(f"the training loss became {loss.item()} at step {step}; lower lr=")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in groups:  # apart: the new rows' gradients would otherwise dwarf LoRA's under one norm
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if math.isnan(ema) else 0.95 * ema + 0.05 * v
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % 50 == 0 or step == s.steps - 1:
            s.log.append({"step": step, "loss": round(ema, 4), "seconds": round(time.perf_counter() - t0, 1)})
    model.eval()
    return time.perf_counter() - t0

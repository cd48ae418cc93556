"""Training of the anomaly models: PatchCore's memory-bank fitting, AnomalyCLIP's prompt learning, the domain CLIP.

The models themselves are pure modules (:mod:`.patchcore`, :mod:`.anomalyclip`, :mod:`.domain_clip`); what trains
them lives here:

* PatchCore has no gradient step: :func:`fit_patchcore` collects patch features and keeps a greedy k-center
  coreset of them (:func:`greedy_coreset`).
* AnomalyCLIP's glocal loss is an engine :class:`~frugalvision.engine.Task` (:class:`AnomalyCLIPTask`);
  :func:`fit_anomalyclip` is its prompt-learning loop.
* The domain CLIP's locked-text contrastive loss is a :class:`~frugalvision.engine.Task` too
  (:class:`DomainCLIPContrastiveTask`); :func:`train_domain_clip` is its loop.

The two loops call their Task for the forward pass and the loss but do not run through
:class:`~frugalvision.engine.Trainer`: AnomalyCLIP encodes the frozen image features once and reuses them every
epoch, keeps the last incomplete batch and uses the official Adam betas; the domain CLIP keeps its own warm-up +
cosine schedule and its caption draws. The Trainer (its own data order, full batches only, its optimiser builder)
would change the numbers these recipes give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...engine.task import Task
from ...errors import ConfigError, DataError
from .anomalyclip import AnomalyCLIP, CLIPFeatures
from .domain_clip import DomainCLIP
from .patchcore import PatchCoreModel

__all__ = [
    "AnomalyCLIPTask", "DomainCLIPContrastiveTask", "PatchCoreFit", "anomalyclip_loss", "binary_dice_loss",
    "encode_samples", "fit_anomalyclip", "fit_patchcore", "focal_loss", "greedy_coreset", "train_domain_clip",
]


# --------------------------------------------------------------------------------------------- PatchCore
def greedy_coreset(features: torch.Tensor, k: int, projection_dim: int | None = 128, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Indices of a greedy k-center coreset of the rows of ``features`` (paper Alg. 1).

    Distances are computed after a Gaussian random projection to ``projection_dim`` dimensions (as the paper; none
    when ``None`` or not smaller). Each step is one fused matrix-vector product (``||f||^2 - 2 f.c + ||c||^2``),
    an in-place minimum and an argmax over the running distances: O(N * d) per selected row, no N x N matrix.

    Example:
        >>> x = torch.cat([torch.zeros(50, 4), torch.ones(1, 4) * 10])  # one far outlier
        >>> idx = greedy_coreset(x, 2, projection_dim=None); bool((idx == 50).any())
        True
    """
    n = features.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {k}")
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    sq = x.pow(2).sum(1)
    selected = torch.empty(k, dtype=torch.long)
    idx = int(torch.randint(n, (1,), generator=g))
    selected[0] = idx
    min_d = torch.full((n,), float("inf"), device=x.device)
    for j in tqdm(range(1, k), desc="coreset", disable=not progress, dynamic_ncols=True, leave=False):
        c = x[idx]
        d = torch.addmv(sq, x, c, alpha=-2.0).add_(c.dot(c))  # squared distances to the new center
        torch.minimum(min_d, d, out=min_d)
        idx = int(torch.argmax(min_d))
        selected[j] = idx
    return selected


@dataclass
class PatchCoreFit:
    """What fitting measured: sizes and wall-clock seconds of each stage."""

    train_images: int
    patches: int
    bank_size: int
    feature_dim: int
    extract_s: float
    coreset_s: float
    total_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def fit_patchcore(model: PatchCoreModel, images: Iterable[torch.Tensor], coreset_ratio: float = 0.1,
                  max_bank: int | None = 16384, projection_dim: int | None = 128, seed: int = 0,
                  progress: bool = True) -> PatchCoreFit:
    """Fill ``model``'s memory bank from defect-free images.

    Args:
        model: The model (its bank is replaced).
        images: Batches ``(B, 3, H, W)`` in [0, 1] at the model's resolution (e.g. a DataLoader's images).
        coreset_ratio: Fraction of all training patches kept in the bank.
        max_bank: Upper bound on the bank size (``None``: no bound).
        projection_dim: Dimension of the random projection used by the coreset selection.
        seed: Seed of the projection and the first center.
        progress: Show progress bars.

    Example:
        >>> m = PatchCoreModel("resnet18", layers=(2, 3), img_size=64)
        >>> fit = fit_patchcore(m, [torch.rand(2, 3, 64, 64)], coreset_ratio=0.25, progress=False)
        >>> fit.patches, fit.bank_size, tuple(m.memory_bank.shape)
        (128, 32, (32, 384))
    """
    if not 0 < coreset_ratio <= 1:
        raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
    model.eval()
    device = model.memory_bank.device
    t0 = time.perf_counter()
    chunks: list[torch.Tensor] = []
    n_img = 0
    for batch in tqdm(images, desc="features", disable=not progress, dynamic_ncols=True, leave=False):
        x = batch.to(device, torch.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (model.img_size, model.img_size):
            raise DataError(f"training batch has shape {tuple(x.shape)}; expected (B, 3, {model.img_size}, "
                            f"{model.img_size}) images in [0, 1]")
        emb = model.embed(x)
        chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        n_img += x.shape[0]
    if not chunks:
        raise DataError("no training images: PatchCore needs defect-free images to build its memory bank")
    feats = torch.cat(chunks)
    del chunks
    t1 = time.perf_counter()
    k = max(1, int(feats.shape[0] * coreset_ratio))
    if max_bank is not None:
        k = min(k, int(max_bank))
    if k < feats.shape[0]:
        idx = greedy_coreset(feats, k, projection_dim, seed, progress).to(feats.device)
        bank = feats[idx]
    else:
        bank = feats
    model.set_memory_bank(bank)
    t2 = time.perf_counter()
    return PatchCoreFit(n_img, int(feats.shape[0]), int(bank.shape[0]), int(bank.shape[1]), t1 - t0, t2 - t1, t2 - t0)


# --------------------------------------------------------------------------------------------- AnomalyCLIP
def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities ``(B, C, H, W)`` against integer targets ``(B, H, W)``.

    As in the official AnomalyCLIP loss: one-hot targets clamped to ``[smooth/(C-1), 1-smooth]``,
    ``pt = <onehot, p> + smooth``, loss ``-(1-pt)^gamma log pt`` averaged over pixels.

    Example:
        >>> p = torch.tensor([[[[0.9]], [[0.1]]]])
        >>> round(float(focal_loss(p, torch.zeros(1, 1, 1), gamma=0.0)), 4)
        0.1054
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    onehot = F.one_hot(target.reshape(-1).long(), c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def binary_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b (2|p t| + 1) / (|p| + |t| + 1)`` over images (official smoothing of 1).

    Example:
        >>> t = torch.zeros(1, 4, 4); t[0, :2] = 1
        >>> float(binary_dice_loss(t, t))
        0.0
    """
    p, t = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1).to(pred.dtype)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def anomalyclip_loss(img_logits: torch.Tensor, maps: Sequence[torch.Tensor], labels: torch.Tensor,
                     masks: torch.Tensor, local_weight: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Glocal loss: ``(local, global)`` = (weighted focal + dice on every layer's maps, image cross-entropy)."""
    gt = (masks > 0.5).float()
    local = img_logits.new_zeros(())
    for m in maps:
        local = local + focal_loss(m, gt) + binary_dice_loss(m[:, 1], gt) + binary_dice_loss(m[:, 0], 1 - gt)
    return local_weight * local, F.cross_entropy(img_logits, labels.long())


class AnomalyCLIPTask(Task):
    """AnomalyCLIP's glocal loss as an engine task; only the prompt learner has gradients.

    A batch is ``(images or CLIPFeatures, labels (B,), masks (B, H, W))``: images ``(B, 3, H, W)`` in ``[0, 1]``
    are encoded by the frozen backbone, precomputed features (:func:`encode_samples`) are used as they are.
    ``forward`` returns ``(image logits (B, 2), per-layer probability maps (B, 2, H, W))`` at the masks' size.

    Args:
        local_weight: Weight of the map losses against the image cross-entropy (official 4).

    Example:
        >>> task = AnomalyCLIPTask(local_weight=4.0)
        >>> maps = [torch.full((1, 2, 4, 4), 0.5)]
        >>> round(float(task.loss((torch.zeros(1, 2), maps), (None, torch.zeros(1), torch.zeros(1, 4, 4)))), 4)
        6.2218
    """

    def __init__(self, local_weight: float = 4.0) -> None:
        self.local_weight = local_weight

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image logits and maps of the batch against the current prompts' text features."""
        feats, masks = batch[0], batch[2]
        if isinstance(feats, torch.Tensor):
            with torch.no_grad():
                feats = model.encode_images(feats)
        return model.logits(feats, model.compute_text_features(), tuple(masks.shape[-2:]))

    def loss(self, outputs: tuple[torch.Tensor, list[torch.Tensor]], batch: Any) -> torch.Tensor:
        """``local_weight * (focal + dice terms of every layer) + image cross-entropy``."""
        local, glob = anomalyclip_loss(outputs[0], outputs[1], batch[1], batch[2], self.local_weight)
        return local + glob

    def batch_size(self, batch: Any) -> int:
        """Number of images in a batch."""
        return len(batch[1])


@torch.no_grad()
def encode_samples(model: AnomalyCLIP, images: torch.Tensor, batch_size: int = 16, progress: bool = False
                   ) -> CLIPFeatures:
    """Frozen image features of a whole set (global + per-layer patches), batched."""
    chunks = [model.encode_images(images[i:i + batch_size])
              for i in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress, leave=False)]
    return CLIPFeatures(torch.cat([c.image for c in chunks]),
                        [torch.cat([c.patches[j] for c in chunks]) for j in range(len(chunks[0].patches))],
                        chunks[0].grid)


def fit_anomalyclip(model: AnomalyCLIP, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    epochs: int = 15, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                    max_steps: int | None = None, budget_s: float | None = None) -> list[float]:
    """Learn the prompts on an auxiliary set with pixel masks (Adam, betas (0.5, 0.999), as the official code).

    The backbone is frozen and its image features do not depend on the prompts, so they are computed once and
    reused every epoch (exactly what per-step recomputation under ``no_grad`` gives). Each step runs
    :class:`AnomalyCLIPTask` on the batch.

    Args:
        model: An :class:`AnomalyCLIP` with learned prompts.
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        masks: ``(N, H, W)`` 0/1 ground truth.
        labels: ``(N,)`` 0 good / 1 anomalous.
        epochs: Passes over the set.
        batch_size: Images per step (the last batch of an epoch may be smaller).
        lr: Adam learning rate.
        seed: Seed of the shuffling.
        progress: Show a progress bar.
        max_steps: Stop after this many optimiser steps (``None``: all epochs).
        budget_s: Stop once this many seconds have passed since the call, feature encoding included (at least
            one step is made; ``None``: no limit).

    Returns:
        The mean total loss of every epoch (a last, partial epoch included).
    """
    t0 = time.perf_counter()
    _check_budget(max_steps, budget_s)
    if model.prompt_learner is None:
        raise ConfigError("fixed prompts have nothing to train; use AnomalyCLIPConfig(prompts='learned')")
    if not (len(images) == len(masks) == len(labels)) or len(images) == 0:
        raise DataError(f"images, masks and labels must be non-empty and equally long, got "
                        f"{len(images)}, {len(masks)}, {len(labels)}")
    if masks.shape[-2:] != images.shape[-2:]:
        raise DataError(f"masks {tuple(masks.shape[-2:])} must have the images' size {tuple(images.shape[-2:])}")
    task = AnomalyCLIPTask(model.cfg.local_weight)
    model.train()
    feats = encode_samples(model, images, progress=progress)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr, betas=(0.5, 0.999))
    history = []
    steps = 0
    bar = tqdm(range(epochs), desc="AnomalyCLIP prompts", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(images), generator=gen)
        total = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = (CLIPFeatures(feats.image[idx], [p[idx] for p in feats.patches], feats.grid), labels[idx],
                     masks[idx])
            loss = task.loss(task.forward(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            total.append(float(loss.detach()))
            if _spent(steps, max_steps, budget_s, t0):
                break
        history.append(float(np.mean(total)))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if _spent(steps, max_steps, budget_s, t0):
            break
    model.eval()
    return history


def _check_budget(max_steps: int | None, budget_s: float | None) -> None:
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if budget_s is not None and not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0, got {budget_s}")


def _spent(steps: int, max_steps: int | None, budget_s: float | None, t0: float) -> bool:
    """Whether a step or time budget is used up (checked after each step, so every run makes one step)."""
    return (max_steps is not None and steps >= max_steps) or (
        budget_s is not None and time.perf_counter() - t0 >= budget_s)


# --------------------------------------------------------------------------------------------- domain CLIP
def _soft_targets(ids: torch.Tensor) -> torch.Tensor:
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(1, keepdim=True)


class DomainCLIPContrastiveTask(Task):
    """Locked-text contrastive loss of the domain CLIP as an engine task.

    A batch is ``(images (B, 3, H, W) in [0, 1], caption ids (B,))``; the ids index ``text_embeddings``, the frozen
    MiniLM sentence embeddings of the distinct captions (computed once: the text tower never changes). Images
    whose captions are the same string are positives of each other (soft targets), so repeated captions such as
    "a flawless ... surface" are not pushed apart. ``forward`` returns the image-to-text logits ``(B, B)``.

    Args:
        text_embeddings: ``(V, 384)`` pooled MiniLM embeddings of the caption vocabulary.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> task = DomainCLIPContrastiveTask(torch.zeros(2, 384))
        >>> round(float(task.loss(logits, (None, torch.tensor([0, 1])))), 4)
        0.1269
    """

    def __init__(self, text_embeddings: torch.Tensor) -> None:
        self.text_embeddings = text_embeddings

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scaled cosine similarities of the batch's images and captions (scale clamped at 100)."""
        images, cap = batch[0], batch[1]
        img = model.encode_image(images)
        txt = F.normalize(model.text_proj(self.text_embeddings[cap]), dim=-1)
        return model.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Symmetric cross-entropy against soft targets (images sharing a caption are positives)."""
        target = _soft_targets(batch[1])
        return 0.5 * (torch.sum(-target * outputs.log_softmax(1), 1).mean()
                      + torch.sum(-target * outputs.t().log_softmax(1), 1).mean())


def train_domain_clip(model: DomainCLIP, images: torch.Tensor, captions: Sequence[Sequence[str]], epochs: int = 20,
                      batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
                      progress: bool = True, max_steps: int | None = None, budget_s: float | None = None
                      ) -> list[float]:
    """Locked-text contrastive tuning: the MiniLM tower is frozen, the ViT and both projections learn.

    Every step draws one caption per image from its list and runs :class:`DomainCLIPContrastiveTask`. MiniLM
    embeddings of all distinct captions are computed once (the tower is frozen).

    Args:
        model: The domain CLIP.
        images: ``(N, 3, H, W)`` RGB in ``[0, 1]``.
        captions: For every image, one or more captions.
        epochs: Passes over the images.
        batch_size: Images per step.
        lr: AdamW learning rate (cosine decay, 1 warm-up epoch).
        weight_decay: AdamW weight decay.
        seed: Seed of the shuffling and the caption draws.
        progress: Show a progress bar.
        max_steps: At most this many optimiser steps; the warm-up + cosine schedule spans them.
        budget_s: Wall-clock budget in seconds from the call (caption encoding included): the schedule runs on
            progress, the larger of the steps' and the time's fraction, so a short budget still gets a whole
            warm-up + cosine schedule; training stops when the budget is spent (after at least one step).

    Returns:
        The mean loss of every epoch (a last, partial epoch included).
    """
    t0 = time.perf_counter()
    _check_budget(max_steps, budget_s)
    if len(images) != len(captions) or len(images) < 2:
        raise DataError(f"need at least 2 images with one caption list each, got {len(images)} images and "
                        f"{len(captions)} caption lists")
    if any(len(c) == 0 for c in captions):
        raise DataError("every image needs at least one caption")
    vocab = sorted({c for cs in captions for c in cs})
    index = {c: i for i, c in enumerate(vocab)}
    options = [[index[c] for c in cs] for cs in captions]
    with torch.no_grad():
        pooled = []
        for s in range(0, len(vocab), 256):
            ids, mask = model.tokenize(vocab[s:s + 256])
            pooled.append(model.text(model.token_embeddings(ids), mask))
        pooled = torch.cat(pooled)
    task = DomainCLIPContrastiveTask(pooled)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("text.")]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    warm = min(steps_per_epoch, total)

    def schedule(step: int) -> float:
        if budget_s is not None:  # progress in steps: the larger of the steps done and the time's share of total
            step = max(step, int(total * (time.perf_counter() - t0) / budget_s))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    steps = 0
    bar = tqdm(range(epochs), desc="domain CLIP (locked text)", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(images), generator=gen)
        losses = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            if len(idx) < 2:
                continue
            cap = torch.tensor([options[i][rng.integers(len(options[i]))] for i in idx.tolist()])
            batch = (images[idx], cap)
            loss = task.loss(task.forward(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            losses.append(float(loss.detach()))
            if _spent(steps, max_steps, budget_s, t0):
                break
        history.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if _spent(steps, max_steps, budget_s, t0):
            break
    model.zero_grad(set_to_none=True)
    model.eval()
    return history

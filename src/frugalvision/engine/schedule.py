"""Learning-rate schedules, stepped once per optimisation step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "build_scheduler"]


class WarmupCosine:
    """Linear warm-up from 0 to 1, then cosine decay to ``min_ratio`` (a picklable LR multiplier).

    Example:
        >>> f = WarmupCosine(total_steps=10, warmup_steps=2, min_ratio=0.0)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, cosine: bool = True):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_ratio = float(min_ratio)
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        """The LR multiplier at optimisation step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
    kind: str = "cosine",
) -> LambdaLR:
    """A per-step LambdaLR: ``kind`` is ``"cosine"`` (warm-up + cosine) or ``"constant"`` (warm-up only)."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; use 'cosine' or 'constant'")
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio, cosine=kind == "cosine"))

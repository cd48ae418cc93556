"""The one timing utility: wall-clock time of calls, synchronised on CUDA, in interleaved rounds.

Every measurement in the package, its benchmarks and experiments goes through :func:`interleaved` (or
:func:`time_call` for a single call): each round times every function once, in an order that rotates by one
per round, so a slow drift of a noisy machine hits every function alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

__all__ = ["interleaved", "median_ms", "synchronize", "time_call"]

K = TypeVar("K")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes (device synchronised before and after).

    Example:
        >>> time_call(lambda: sum(range(1000))) >= 0
        True
    """
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved(fns: Mapping[K, Callable[[], Any]], rounds: int, warmup: int = 0,
                device: torch.device | str | None = None, on_call: Callable[[], Any] | None = None,
                inference: bool = False) -> dict[K, list[float]]:
    """Seconds per call of each function, over ``rounds`` interleaved rounds with a rotating order.

    Args:
        fns: The functions to time, by name.
        rounds: Timed rounds; each calls every function once, round ``r`` starting at function ``r mod n``.
        warmup: Untimed calls of each function first.
        device: Synchronised around each call (CUDA).
        on_call: Called after every call, warm-up included (e.g. a progress bar's ``update``).
        inference: Run under ``torch.inference_mode()``.

    Returns:
        ``{name: [seconds of round 0, round 1, ...]}``.

    Example:
        >>> t = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3, warmup=1)
        >>> sorted(t), len(t["a"])
        (['a', 'b'], 3)
    """
    keys = list(fns)
    times: dict[K, list[float]] = {k: [] for k in keys}
    with torch.inference_mode(inference):
        for k in keys:
            for _ in range(warmup):
                fns[k]()
                if on_call:
                    on_call()
        for r in range(rounds):
            shift = r % len(keys) if keys else 0
            for k in keys[shift:] + keys[:shift]:
                times[k].append(time_call(fns[k], device))
                if on_call:
                    on_call()
    return times


def median_ms(times: Mapping[K, list[float]]) -> dict[K, float]:
    """Median of each list of seconds, in milliseconds.

    Example:
        >>> median_ms({"a": [0.001, 0.003, 0.002]})
        {'a': 2.0}
    """
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}

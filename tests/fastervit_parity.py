"""Comparisons shared by the FasterViT parity tests (fixed and any resolution)."""

from __future__ import annotations

import torch

from frugalvision.models.fastervit import checkpoint_filter_fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over max |a|."""
    return float((a - b).abs().max() / a.abs().max())


def assert_gradients_match(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    """Backward the same loss through both (training mode) and compare every gradient, mapped to our names."""
    theirs.train(), ours.train()
    theirs(x).square().mean().backward()
    ours(x).square().mean().backward()
    mapped = checkpoint_filter_fn({k: p.grad for k, p in theirs.named_parameters() if p.grad is not None}, ours)
    grads = dict(ours.named_parameters())
    assert mapped.keys() == {k for k, p in grads.items() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in mapped.values())
    for k, g in mapped.items():  # (biases in front of training-mode BN get ~0 gradients: compare on one scale)
        assert torch.allclose(grads[k].grad, g, rtol=1e-4, atol=1e-5 * scale), k

"""Non-trivial weights for parity checks: the tests and the benchmarks perturb models the same way."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["perturb_parameters", "randomize_bn_stats"]


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (for fusion/parity checks).

    Example:
        >>> bn = randomize_bn_stats(nn.Sequential(nn.BatchNorm2d(4)))[0]
        >>> bool((bn.running_var != 1).all())
        True
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.8 + 0.4)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def perturb_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (layer-scale ``gamma``s drawn in [0.3, 1)) and give BNs non-trivial statistics.

    For parity checks against reference implementations: default initialisations (zero biases, unit scales, tiny
    layer scales) would hide mistakes in the terms they multiply.

    Example:
        >>> lin = perturb_parameters(nn.Linear(3, 2))
        >>> bool((lin.bias != 0).all())
        True
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return randomize_bn_stats(model, seed)

"""Test set-up: import this checkout's sources and keep built data inside the pytest cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
os.environ.setdefault("FRUGALVISION_CACHE", str(ROOT / ".pytest_cache" / "frugalvision"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny models: more threads only add overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (for fusion/parity tests)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.8 + 0.4)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def perturb_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (layer-scale ``gamma``s drawn in [0.3, 1)) and give BNs non-trivial statistics.

    For parity tests against reference implementations: default initialisations (zero biases, unit scales, tiny
    layer scales) would hide mistakes in the terms they multiply.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return randomize_bn_stats(model, seed)

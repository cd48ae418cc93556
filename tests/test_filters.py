"""The one Gaussian blur: kernel, border modes against scipy, and the exact numerics of each user."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from frugalvision.utils.filters import gaussian_blur, gaussian_kernel1d


def _scipy(x: torch.Tensor, sigma: float, mode: str, truncate: float = 4.0) -> torch.Tensor:
    """scipy's blur of every (image, channel) plane."""
    planes = [gaussian_filter(p.double().numpy(), sigma=sigma, mode=mode, truncate=truncate)
              for p in x.reshape(-1, *x.shape[-2:])]
    return torch.from_numpy(np.stack(planes)).reshape(x.shape)


def test_kernel_radius_rule_and_normalisation() -> None:
    for sigma in (0.5, 1.0, 1.5, 4.0):
        k = gaussian_kernel1d(sigma)
        assert k.numel() == 2 * int(4 * sigma + 0.5) + 1 and k.dtype == torch.float32
        assert float(k.sum()) == pytest.approx(1.0, abs=1e-6) and torch.equal(k, k.flip(0))
    assert gaussian_kernel1d(2.0, truncate=3.0).numel() == 13
    assert gaussian_kernel1d(0.7, radius=3).numel() == 7
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(0.0)


@pytest.mark.parametrize(("padding", "mode"), [("reflect", "mirror"), ("replicate", "nearest")])
@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_blur_matches_scipy(padding: str, mode: str, sigma: float) -> None:
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    got = gaussian_blur(x, sigma, padding=padding)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), _scipy(x, sigma, mode), rtol=1e-5, atol=1e-6)
    # a ready kernel gives the same result as its sigma
    assert torch.equal(gaussian_blur(x, gaussian_kernel1d(sigma), padding=padding), got)


def test_blur_rejects_bad_arguments() -> None:
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="padding"):
        gaussian_blur(x, 1.0, padding="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, torch.ones(4) / 4)


def test_each_user_keeps_its_numerics_bit_for_bit() -> None:
    """PatchCore (reflect), AnomalyCLIP (replicate) and the diffusion generator's surface blur (reflect, radius
    max(1, ceil(3 sigma)), kernel in the input's dtype) give exactly what their former private copies gave."""
    from frugalvision.inspect.synthesis.diffusion import _blur

    g = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 1, 64, 64, generator=g)
    for sigma, mode in ((4.0, "reflect"), (1.0, "replicate"), (4.0, "replicate")):
        r = int(4.0 * sigma + 0.5)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = (k / k.sum()).float()
        assert torch.equal(gaussian_kernel1d(sigma), k)
        ref = F.conv2d(F.pad(maps, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
        ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
        assert torch.equal(gaussian_blur(maps, k, padding=mode), ref)  # type: ignore[arg-type]
    x = torch.rand(4, 3, 32, 32, generator=g)
    for sigma in (0.7, 4.0):
        r = max(1, math.ceil(3 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        ref = F.pad(x, (r, r, r, r), mode="reflect")
        ref = F.conv2d(ref, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        ref = F.conv2d(ref, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        assert torch.equal(_blur(x, sigma), ref)
    # and the diffusion rule is scipy's mirror blur whenever scipy's radius rule gives the same radius
    torch.testing.assert_close(_blur(x, 4.0).double(), _scipy(x, 4.0, "mirror", truncate=3.0), rtol=1e-5, atol=1e-6)

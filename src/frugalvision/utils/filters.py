"""The one Gaussian blur of the package: a normalised 1-D kernel and a separable, depth-wise blur.

Every smoothing step (PatchCore's and AnomalyCLIP's anomaly maps, the diffusion defect generator's surface
context) goes through :func:`gaussian_blur`, so they differ only by their sigma, radius rule and border mode:

* the radius is scipy's rule ``int(truncate * sigma + 0.5)`` unless given explicitly;
* ``padding="reflect"`` mirrors without repeating the edge pixel (scipy ``mode="mirror"``), ``"replicate"``
  repeats it (scipy ``mode="nearest"``);
* the blur runs along the width, then along the height, each channel on its own (``groups=C``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "gaussian_kernel1d"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, radius: int | None = None, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                      compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian ``exp(-x^2 / (2 sigma^2))`` on the taps ``-radius..radius``.

    Args:
        sigma: Standard deviation in pixels (> 0).
        truncate: Radius in standard deviations (scipy's rule ``int(truncate * sigma + 0.5)``).
        radius: Explicit radius in taps; overrides ``truncate``.
        dtype: Dtype of the returned kernel.
        device: Device the kernel is computed on.
        compute_dtype: Dtype the exponentials and the normalisation are computed in (then cast to ``dtype``).

    Example:
        >>> k = gaussian_kernel1d(4.0); k.numel(), round(float(k.sum()), 6)
        (33, 1.0)
        >>> gaussian_kernel1d(0.5, radius=2).numel()
        5
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = int(truncate * sigma + 0.5) if radius is None else int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {r}")
    x = torch.arange(-r, r + 1, dtype=compute_dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma_or_kernel: float | torch.Tensor,
                  padding: Literal["reflect", "replicate"] = "reflect", truncate: float = 4.0) -> torch.Tensor:
    """Separable, depth-wise Gaussian blur of ``(B, C, H, W)`` tensors, output the size of the input.

    Args:
        x: The images or maps.
        sigma_or_kernel: A standard deviation (kernel from :func:`gaussian_kernel1d` with ``truncate``) or a ready
            1-D kernel (odd length, e.g. a model's buffer so that the exported graph holds it as a constant).
        padding: ``reflect`` (scipy ``mirror``) or ``replicate`` (scipy ``nearest``).
        truncate: Radius in standard deviations when a sigma is given.

    Example:
        >>> m = torch.zeros(1, 1, 9, 9); m[0, 0, 4, 4] = 1
        >>> round(float(gaussian_blur(m, 1.0, padding="replicate").sum()), 4)
        1.0
    """
    if padding not in ("reflect", "replicate"):
        raise ValueError(f"padding must be 'reflect' or 'replicate', got {padding!r}")
    if isinstance(sigma_or_kernel, torch.Tensor):
        k = sigma_or_kernel.to(device=x.device, dtype=x.dtype).flatten()
    else:
        k = gaussian_kernel1d(float(sigma_or_kernel), truncate, dtype=x.dtype, device=x.device)
    if k.numel() % 2 != 1:
        raise ValueError(f"a Gaussian kernel has an odd number of taps, got {k.numel()}")
    r = k.numel() // 2
    c = x.shape[1]
    kw, kh = k.view(1, 1, 1, -1), k.view(1, 1, -1, 1)
    if c != 1:  # one filter per channel; a single channel keeps a weight of static shape (exported graphs)
        kw, kh = kw.expand(c, 1, 1, -1), kh.expand(c, 1, -1, 1)
    x = F.pad(x, (r, r, 0, 0), mode=padding)
    x = F.conv2d(x, kw, groups=c)
    x = F.pad(x, (0, 0, r, r), mode=padding)
    return F.conv2d(x, kh, groups=c)

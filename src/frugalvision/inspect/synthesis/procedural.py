"""Procedural synthetic defects (DRAEM-style): Perlin-noise masks, texture transplant and the defect kinds.

A defect's *shape* comes from thresholding 2-D Perlin noise (blobs) or from a thin band around one of its level
sets (curvy lines for scratches and cracks); its *appearance* is either a texture transplanted from another image
(DRAEM's anomaly source) or a kind-specific change of the surface (darkening, tint, flat fill, colour shift).
``size`` scales the defects and ``contrast`` how strongly they differ from the surface (0 = invisible, 1 = full).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..defects import DEFECT_KINDS

__all__ = ["ProceduralConfig", "ProceduralSynthesizer", "perlin_mask", "perlin_noise"]


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with ``res`` lattice cells along each axis.

    Example:
        >>> n = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
        >>> n.shape, bool(-1.5 < n.min() < 0 < n.max() < 1.5)
        ((64, 64), True)
    """
    h, w = shape
    ry, rx = res
    gy, gx = int(np.ceil(h / ry)) * ry, int(np.ceil(w / rx)) * rx  # pad to a multiple of the lattice
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    yy, xx = np.mgrid[0:ry:complex(0, gy), 0:rx:complex(0, gx)] if False else np.meshgrid(
        np.arange(gy) * ry / gy, np.arange(gx) * rx / gx, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grads[y0 + oy, x0 + ox]
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    u, v = _fade(fy), _fade(fx)
    n0 = dot(0, 0) * (1 - v) + dot(0, 1) * v
    n1 = dot(1, 0) * (1 - v) + dot(1, 1) * v
    return (np.sqrt(2) * ((1 - u) * n0 + u * n1))[:h, :w]


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, scale_exp: tuple[int, int] = (0, 4),
                threshold: float = 0.5, rotate: bool = True) -> np.ndarray:
    """DRAEM's anomaly mask: Perlin noise at a random power-of-two scale, rotated, thresholded.

    Example:
        >>> m = perlin_mask((64, 64), np.random.default_rng(1))
        >>> m.dtype, m.shape
        (dtype('bool'), (64, 64))
    """
    sy, sx = 2 ** rng.integers(scale_exp[0], scale_exp[1] + 1, 2)
    n = perlin_noise(shape, (int(sy), int(sx)), rng)
    if rotate:
        n = ndi.rotate(n, rng.uniform(-90, 90), reshape=False, mode="reflect", order=1)
    return n > threshold


@dataclass
class ProceduralConfig:
    """Controls of the procedural generator.

    Attributes:
        size: Defect size multiplier (1.0: defects cover about 0.5-6 % of a tile).
        contrast: How strongly the defect differs from the surface, in [0, 1].
        kinds: Defect kinds to draw from.
    """

    size: float = 1.0
    contrast: float = 1.0
    kinds: tuple[str, ...] = DEFECT_KINDS

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be > 0, got {self.size}")
        if not 0 <= self.contrast <= 1:
            raise ValueError(f"contrast must be in [0, 1], got {self.contrast}")
        bad = [k for k in self.kinds if k not in DEFECT_KINDS]
        if bad:
            raise ValueError(f"unknown defect kind(s) {bad}; choose from {', '.join(DEFECT_KINDS)}")


class ProceduralSynthesizer:
    """Paint procedural defects onto defect-free images.

    Args:
        sources: Anomaly-source images (RGB ``uint8``) for texture transplant (DRAEM uses DTD; we use other real
            photos). Random noise textures are used when empty.
        config: Size, contrast and kinds.

    Example:
        >>> synth = ProceduralSynthesizer([np.full((64, 64, 3), 200, np.uint8)])
        >>> out, mask, kind = synth(np.full((64, 64, 3), 90, np.uint8), np.random.default_rng(0), kind="stain")
        >>> kind, bool(mask.any()), bool((out[~mask] == 90).all())
        ('stain', True, True)
    """

    def __init__(self, sources: Sequence[np.ndarray] = (), config: ProceduralConfig | None = None) -> None:
        self.sources = [np.asarray(s, np.uint8) for s in sources]
        self.cfg = config or ProceduralConfig()

    # shapes ---------------------------------------------------------------------------------------------
    def _blob(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        lo, hi = 0.004 * self.cfg.size**2, 0.06 * self.cfg.size**2
        for _ in range(50):
            m = perlin_mask(shape, rng, scale_exp=(1, 3), threshold=rng.uniform(0.45, 0.65))
            lab, n = ndi.label(m)
            if n == 0:
                continue
            comp = lab == rng.integers(1, n + 1)  # one connected defect, not a scattering
            if lo * h * w <= comp.sum() <= hi * h * w:
                return comp
        return self._fallback(shape, rng)

    def _line(self, shape: tuple[int, int], rng: np.random.Generator, width: float) -> np.ndarray:
        h, w = shape
        for _ in range(50):
            n = perlin_noise(shape, (int(2 ** rng.integers(1, 3)),) * 2, rng)
            band = np.abs(n - rng.uniform(-0.2, 0.2)) < width * 0.02
            lab, k = ndi.label(band)
            if k == 0:
                continue
            sizes = ndi.sum(band, lab, range(1, k + 1))
            comp = lab == (1 + int(np.argmax(sizes)))
            if 0.002 * h * w * self.cfg.size <= comp.sum() <= 0.05 * h * w * self.cfg.size**2:
                return comp
        return self._fallback(shape, rng)

    def _fallback(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        yy, xx = np.mgrid[:h, :w]
        r = max(3.0, 0.08 * self.cfg.size * min(h, w))
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    def _source(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        if not self.sources:
            noise = rng.integers(0, 255, (h, w, 3)).astype(np.float32)
            return ndi.gaussian_filter(noise, (1.5, 1.5, 0)).astype(np.uint8)
        src = self.sources[rng.integers(len(self.sources))]
        if src.shape[0] < h or src.shape[1] < w:
            reps = (int(np.ceil(h / src.shape[0])), int(np.ceil(w / src.shape[1])), 1)
            src = np.tile(src, reps)
        y, x = rng.integers(0, src.shape[0] - h + 1), rng.integers(0, src.shape[1] - w + 1)
        patch = np.rot90(src[y : y + h, x : x + w], rng.integers(0, 4))
        return np.ascontiguousarray(patch[:h, :w]) if patch.shape[:2] == (h, w) else src[y : y + h, x : x + w]

    # appearance -----------------------------------------------------------------------------------------
    def __call__(self, img: np.ndarray, rng: np.random.Generator, kind: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, str]:
        """Return ``(defective image, bool mask, kind)``; pixels outside the mask are unchanged."""
        img = np.asarray(img, np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got {img.shape}")
        kind = kind or str(rng.choice(self.cfg.kinds))
        if kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECT_KINDS)}")
        shape = img.shape[:2]
        f = img.astype(np.float32)
        c = self.cfg.contrast
        if kind in ("scratch", "crack"):
            mask = self._line(shape, rng, width=1.0 if kind == "crack" else 0.7)
            bright = kind == "scratch" and rng.random() < 0.6  # scratches often catch the light
            target = np.full_like(f, 230.0) if bright else f * rng.uniform(0.1, 0.3)
        elif kind == "hole":
            mask = self._blob(shape, rng)
            depth = ndi.distance_transform_edt(mask)
            depth = depth / max(depth.max(), 1.0)
            target = f * (0.35 - 0.25 * depth[..., None])
        elif kind == "stain":
            mask = self._blob(shape, rng)
            tint = rng.uniform(20, 160, 3)
            target = 0.4 * f + 0.6 * tint
        elif kind == "contamination":
            mask = self._blob(shape, rng)
            target = self._source(shape, rng).astype(np.float32)
        elif kind == "missing":
            mask = self._blob(shape, rng)
            base = np.median(f.reshape(-1, 3), axis=0) * rng.uniform(0.3, 0.55)
            target = base + rng.normal(0, 4, f.shape)
        else:  # color
            mask = self._blob(shape, rng)
            target = f * rng.choice([rng.uniform(0.45, 0.65), rng.uniform(1.35, 1.6)]) + rng.normal(0, 25, 3)
        # DRAEM blending: beta keeps some of the surface; contrast scales the whole change
        beta = rng.uniform(0.0, 0.4)
        mixed = (1 - beta) * target + beta * f
        out = f + c * (mixed - f)
        out = np.where(mask[..., None], np.clip(out, 0, 255), f).round().astype(np.uint8)
        return out, mask, kind

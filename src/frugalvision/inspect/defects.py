"""Renderers of realistic surface defects on real texture tiles (used to build the bundled benchmark).

Each renderer takes an RGB ``uint8`` tile and a NumPy generator and returns the defective tile and the boolean
pixel mask of the defect. Shapes are geometric (curves, random walks, ellipses, polygons) and appearance is
shaded from the tile itself, so defects look like damage to *that* surface. These renderers are deliberately
different from the Perlin-noise generators of :mod:`frugalvision.inspect.synthesis.procedural`, which produce the
synthetic *training* data: the benchmark must not be drawn from the same distribution as the augmentation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage import draw

__all__ = ["DEFECT_KINDS", "RENDERERS", "describe_defect", "render_defect"]

DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "contamination", "missing", "color")


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _blend(img: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float32)
    return np.clip(img.astype(np.float32) * (1 - a) + target.astype(np.float32) * a, 0, 255).round().astype(np.uint8)


def _curve(rng: np.random.Generator, h: int, w: int, length: float) -> np.ndarray:
    """Points of a smooth random curve (quadratic Bezier) of about ``length`` pixels inside the tile."""
    start = rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w])
    angle = rng.uniform(0, 2 * np.pi)
    end = start + length * np.array([np.sin(angle), np.cos(angle)])
    ctrl = (start + end) / 2 + rng.normal(0, length * 0.25, 2)
    t = np.linspace(0, 1, max(8, int(length * 2)))[:, None]
    pts = (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end
    return np.clip(pts, 0, [h - 1, w - 1])


def _stroke(h: int, w: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased stroke intensity in [0, 1] along a polyline."""
    canvas = np.zeros((h, w), np.float32)
    for (r0, c0), (r1, c1) in itertools.pairwise(pts):
        rr, cc, val = draw.line_aa(round(r0), round(c0), round(r1), round(c1))
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        np.maximum.at(canvas, (rr[ok], cc[ok]), val[ok])
    if width > 1:
        canvas = ndi.grey_dilation(canvas, size=round(width))
        canvas = ndi.gaussian_filter(canvas, 0.5)
    return np.clip(canvas, 0, 1)


def scratch(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A long thin curved scratch, lighter or darker than the surface."""
    h, w = img.shape[:2]
    alpha = _stroke(h, w, _curve(rng, h, w, size * rng.uniform(0.35, 0.7) * min(h, w)), rng.uniform(1, 2.5))
    luma = _luma(img).mean()
    shade = 235.0 if luma < 150 and rng.random() < 0.7 else 25.0
    target = np.full_like(img, shade)
    alpha *= rng.uniform(0.6, 0.9)
    return _blend(img, target, alpha), alpha > 0.2


def crack(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A dark, jagged, branching crack (a persistent random walk)."""
    h, w = img.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    n_branches = rng.integers(1, 4)
    trunk = np.array([rng.uniform([0.2 * h, 0.2 * w], [0.8 * h, 0.8 * w])])
    heading = rng.uniform(0, 2 * np.pi)
    for b in range(n_branches):
        pos = trunk[0].copy() if b == 0 else trunk[rng.integers(len(trunk) // 3, len(trunk))].copy()
        direction = heading + (0 if b == 0 else rng.choice([-1, 1]) * rng.uniform(0.5, 1.2))
        steps = int(size * rng.uniform(0.3, 0.6) * min(h, w) / (1 + b))
        pts = [pos.copy()]
        for _ in range(max(steps, 4)):
            direction += rng.normal(0, 0.35)
            pos = pos + 1.5 * np.array([np.sin(direction), np.cos(direction)])
            if not (0 <= pos[0] < h and 0 <= pos[1] < w):
                break
            pts.append(pos.copy())
        pts = np.array(pts)
        if b == 0:
            trunk = pts
        if len(pts) > 1:
            alpha = np.maximum(alpha, _stroke(h, w, pts, rng.uniform(1.5, 3.0) / (1 + 0.5 * b)))
    target = (img.astype(np.float32) * rng.uniform(0.1, 0.3)).astype(np.uint8)
    return _blend(img, target, alpha), alpha > 0.25


def hole(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A hole: dark elliptical pit with radial shading and a lit rim on one side."""
    h, w = img.shape[:2]
    ry, rx = (size * rng.uniform(0.05, 0.12, 2) * min(h, w)).clip(3)
    cy, cx = rng.uniform([ry + 2, rx + 2], [h - ry - 2, w - rx - 2])
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    inside = d <= 1.0
    depth = np.clip(1.0 - d, 0, 1) ** 0.5
    dark = img.astype(np.float32) * (0.35 - 0.25 * depth[..., None])
    out = np.where(inside[..., None], dark, img.astype(np.float32))
    light = rng.uniform(0, 2 * np.pi)
    rim = (d > 0.85) & (d < 1.25) & (np.cos(np.arctan2(yy - cy, xx - cx) - light) > 0.3)
    out[rim] = np.minimum(out[rim] * 1.35 + 25, 255)
    return out.round().astype(np.uint8), inside | rim


def _blob(rng: np.random.Generator, h: int, w: int, radius: float, lobes: int = 5) -> np.ndarray:
    """A soft irregular blob in [0, 1] made of overlapping Gaussians."""
    field = np.zeros((h, w), np.float32)
    cy, cx = rng.uniform([radius, radius], [h - radius, w - radius])
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for _ in range(lobes):
        oy, ox = rng.normal(0, radius * 0.5, 2)
        s = radius * rng.uniform(0.35, 0.7)
        field += np.exp(-(((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * s * s)))
    return np.clip(field / field.max(), 0, 1)


def stain(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A translucent tinted stain (oil, rust, water mark) with a soft edge and a darker tide line."""
    h, w = img.shape[:2]
    field = _blob(rng, h, w, size * rng.uniform(0.1, 0.2) * min(h, w))
    tint = rng.choice([[120, 70, 20], [60, 50, 40], [150, 120, 40], [40, 60, 90]]).astype(np.float32)
    alpha = np.clip((field - 0.3) / 0.4, 0, 1) * rng.uniform(0.6, 0.85)
    tide = np.exp(-((field - 0.33) ** 2) / 0.002) * 0.3
    target = img.astype(np.float32) * 0.4 + tint * 0.6
    out = _blend(img, target, np.clip(alpha + tide, 0, 0.9))
    return out, (alpha + tide) > 0.2


def contamination(img: np.ndarray, rng: np.random.Generator, size: float = 1.0,
                  foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A foreign particle: a patch of another material with a hard irregular outline and a soft shadow."""
    h, w = img.shape[:2]
    field = _blob(rng, h, w, size * rng.uniform(0.06, 0.12) * min(h, w), lobes=3)
    mask = field > 0.5
    if foreign is None or foreign.shape[0] < h or foreign.shape[1] < w:
        src = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        src = ndi.gaussian_filter(src.astype(np.float32), (2, 2, 0)).astype(np.uint8)
    else:
        y, x = rng.integers(0, foreign.shape[0] - h + 1), rng.integers(0, foreign.shape[1] - w + 1)
        src = foreign[y : y + h, x : x + w]
    shadow = ndi.gaussian_filter(ndi.shift(mask.astype(np.float32), (2, 2), order=0), 1.5) * 0.5
    out = (img.astype(np.float32) * (1 - shadow[..., None])).astype(np.uint8)
    out[mask] = src[mask]
    return out, mask


def missing(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Missing material: a chipped polygon where the surface is gone and a flat, darker backing shows."""
    h, w = img.shape[:2]
    r = size * rng.uniform(0.08, 0.16) * min(h, w)
    cy, cx = rng.uniform([r, r], [h - r, w - r])
    n = rng.integers(5, 9)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.5, 1.0, n)
    rr, cc = draw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), (h, w))
    mask = np.zeros((h, w), bool)
    mask[rr, cc] = True
    base = np.median(img.reshape(-1, 3), axis=0) * rng.uniform(0.3, 0.55)
    backing = base + rng.normal(0, 4, (h, w, 3))
    out = img.astype(np.float32)
    out[mask] = backing[mask]
    edge = mask & ~ndi.binary_erosion(mask)
    out[edge] *= 0.6
    return np.clip(out, 0, 255).round().astype(np.uint8), mask


def color(img: np.ndarray, rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A discoloured patch (burn, bleach or oxidation): brightness and hue shift fading at the border."""
    h, w = img.shape[:2]
    field = _blob(rng, h, w, size * rng.uniform(0.12, 0.22) * min(h, w))
    alpha = np.clip((field - 0.35) / 0.4, 0, 1)
    gain = rng.choice([rng.uniform(0.45, 0.65), rng.uniform(1.35, 1.6)])
    shift = rng.normal(0, 25, 3)
    target = img.astype(np.float32) * gain + shift
    return _blend(img, np.clip(target, 0, 255), alpha), alpha > 0.3


RENDERERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "scratch": scratch, "crack": crack, "hole": hole, "stain": stain, "contamination": contamination,
    "missing": missing, "color": color,
}


def render_defect(kind: str, img: np.ndarray, rng: np.random.Generator, size: float = 1.0,
                  foreign: np.ndarray | None = None, min_pixels: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Render a defect of ``kind`` on ``img``; retries until the mask has at least ``min_pixels`` pixels.

    Example:
        >>> tile = np.full((64, 64, 3), 128, np.uint8)
        >>> out, mask = render_defect("hole", tile, np.random.default_rng(0))
        >>> out.shape, mask.dtype, bool(mask.any()), bool((out[~mask] == 128).all())
        ((64, 64, 3), dtype('bool'), True, True)
    """
    if kind not in RENDERERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(RENDERERS)}")
    fn = RENDERERS[kind]
    for _ in range(20):
        out, mask = fn(img, rng, size, foreign) if kind == "contamination" else fn(img, rng, size)
        if mask.sum() >= min_pixels:
            # pixels outside the mask are restored exactly: the mask is the complete record of the change
            out = np.where(mask[..., None], out, img)
            return out, mask
    raise RuntimeError(f"could not render a visible {kind} on a {img.shape[1]}x{img.shape[0]} tile")


def describe_defect(kind: str, mask: np.ndarray, category: str) -> str:
    """A Defect Spectrum-style caption: kind, location and size.

    Example:
        >>> m = np.zeros((100, 100), bool); m[5:15, 80:95] = True
        >>> describe_defect("hole", m, "brick")
        'A hole on the brick surface at the top right, about 15x10 pixels (1.5% of the image).'
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    where = "center" if (vert, horiz) == ("middle", "center") else f"{vert} {horiz}".replace("middle ", "middle-")
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    noun = {"color": "discoloured patch", "missing": "missing-material chip", "contamination": "contamination particle"}
    name = noun.get(kind, kind)
    article = "An" if name[0] in "aeiou" else "A"
    return (f"{article} {name} on the {category} surface at the {where}, about {bw}x{bh} pixels "
            f"({100 * mask.mean():.1f}% of the image).")

"""Pictures of predictions: class maps coloured over images, heat maps of scores."""

from __future__ import annotations

import numpy as np

__all__ = ["heat_map", "overlay"]

_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)

#: Pixels per row strip of :func:`overlay`.
OVERLAY_STRIP_PIXELS = 1 << 20


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Colour the defect classes of ``classes`` over ``image`` (background untouched).

    Example:
        >>> img = np.zeros((2, 2, 3), np.uint8); cls = np.array([[0, 1], [0, 0]])
        >>> overlay(img, cls)[0, 1].tolist(), overlay(img, cls)[0, 0].tolist()
        ([126, 14, 41], [0, 0, 0])
    """
    out = image.copy()
    rows = max(1, OVERLAY_STRIP_PIXELS // max(1, image.shape[1]))  # row strips: bounded memory on big images
    for r in range(0, image.shape[0], rows):
        cls, img, dst = classes[r:r + rows], image[r:r + rows], out[r:r + rows]
        m = cls > 0
        colors = _PALETTE[np.minimum(cls[m], len(_PALETTE) - 1)]
        mixed = ((1 - alpha) * img[m].astype(np.float32) + alpha * colors).astype(np.float32)
        dst[m] = mixed.round().astype(np.uint8)
    return out


def heat_map(score: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """An ``(H, W, 3)`` uint8 picture of scores in [0, 1] (clipped) with a matplotlib colour map.

    Example:
        >>> heat_map(np.array([[0.0, 1.0]])).shape
        (1, 2, 3)
    """
    import matplotlib

    return (matplotlib.colormaps[cmap](np.clip(score, 0, 1))[..., :3] * 255).astype(np.uint8)

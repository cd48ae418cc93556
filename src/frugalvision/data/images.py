"""Reading images safely: every failure names the file and says what to do."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3}
_HIGH_DEPTH = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path, channels: int = 3, convert: bool = True) -> Image.Image:
    """Open an image fully (decoding it now, not lazily) as ``RGB`` (3 channels) or ``L`` (1 channel).

    Args:
        path: Image file.
        channels: 3 for RGB, 1 for grayscale.
        convert: Convert other 8-bit modes (grayscale, palette, RGBA, CMYK) to the wanted channel count; when
            False an image whose channel count differs raises instead.

    Returns:
        A decoded PIL image in mode ``RGB`` or ``L``.

    Raises:
        DataError: If the file is missing, unreadable, truncated, of a high bit depth, or (with
            ``convert=False``) has the wrong number of channels.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"; Image.new("L", (4, 4)).save(p)
        >>> load_image(p).mode
        'RGB'
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}; the file is corrupt or not an image — replace or remove it"
        ) from None
    if img.mode in _HIGH_DEPTH:
        raise DataError(
            f"image {path} has mode {img.mode} (16-bit or float pixels); only 8-bit images are supported — convert "
            "it to 8-bit PNG first"
        )
    want = "RGB" if channels == 3 else "L"
    if img.mode == want:
        return img
    have = _CHANNELS.get(img.mode)
    if have is None:
        raise DataError(f"image {path} has unsupported mode {img.mode}; save it as 8-bit RGB or grayscale")
    if not convert and have != channels:
        raise DataError(
            f"image {path} has {have} channel(s) (mode {img.mode}) but {channels} are expected; convert the file or "
            "allow conversion (convert=True)"
        )
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(want)

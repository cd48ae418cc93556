"""Images as SVG text for language models, within a token budget.

Cai et al., *Leveraging Large Language Models for Scalable Vector Graphics-Driven Image Understanding* (ICLR 2024;
arXiv 2306.06094, whose v2 is titled *An Investigation on LLMs' Visual Understanding Ability Using SVG for
Image-Text Bridging*; code ``mu-cai/svg-llm``) feed an LLM the SVG text of an image, made by an off-the-shelf
tracer, instead of pixels. This module does the image -> SVG half, with the text's length under control:

- :func:`vectorize` traces an image with **vtracer** (PyPI ``vtracer``, the Rust tracer of visioncortex) in colour
  mode (the image quantised to ``colors`` palette colours first) or binary mode (foreground / background by Otsu's
  threshold), then writes a compact SVG: no XML declaration, comment or version, coordinates rounded to
  ``precision`` decimals (integers by default), the ``translate`` of every path folded into its coordinates,
  relative path commands after the first point with implicit repeats, 12-bit colours (``#rgb``), ``fill`` left
  out when black (the SVG default), consecutive layers of one colour merged into one ``<path>``, the background a
  ``<rect>`` (left out when white, the renderer's background).
- With ``max_tokens`` it searches fewer colours, stronger speckle filtering and coarser trace resolutions
  (:func:`search_space`) and keeps the closest SVG that fits; the settings it ended with are in
  :attr:`SVGResult.settings`.
- :func:`rasterize` renders SVG text with **resvg** (PyPI ``resvg-py``: a self-contained wheel, no system library)
  and :func:`fidelity` compares the rendering with the image (PSNR, foreground IoU).

Tokens are counted with the tokenizer given (a transformers tokenizer, e.g. :func:`smollm2_tokenizer`'s); without
one, :func:`estimate_tokens` divides the characters by :data:`CHARS_PER_TOKEN`.

Example:
    >>> import numpy as np
    >>> img = np.zeros((32, 32), np.uint8); img[8:24, 8:24] = 255
    >>> res = vectorize(img, mode="binary")
    >>> res.svg[res.svg.index(">") + 1:]
    '<rect width="32" height="32"/><path d="M8 8h16v16h-16z" fill="#fff"/></svg>'
    >>> round(fidelity(img, res.svg)["iou_fg"], 2) >= 0.9
    True
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .._deps import require
from ..errors import ConfigError, DataError

__all__ = [
    "CHARS_PER_TOKEN",
    "SVGResult",
    "compare",
    "count_tokens",
    "estimate_tokens",
    "fidelity",
    "foreground",
    "pixels_as_text",
    "psnr",
    "rasterize",
    "search_space",
    "smollm2_tokenizer",
    "vectorize",
]

CHARS_PER_TOKEN = 1.15
"""Characters per token of the estimate used without a tokenizer.

Measured on this module's SVGs with SmolLM2's tokenizer, which splits numbers into single digits (one token per
digit, one per space), so path data is close to one token per character: over the SVGs of
``benchmarks/svg_fidelity.py`` the ratio's 10th percentile is 1.17 and its median 1.35, so the estimate is above the
true count for about 90 % of them. Tokenizers that merge digits (GPT-4's, up to three per token) count fewer tokens.
"""

SVG_NS = "http://www.w3.org/2000/svg"
Tokenizer = Any  # a transformers tokenizer, a tokenizers.Tokenizer or a callable text -> token ids
ImageLike = np.ndarray | Image.Image | str | Path

_SPLINE = {"corner_threshold": 60, "length_threshold": 4.0, "splice_threshold": 45}  # vtracer's defaults
_SPECKLES = (4, 8, 16)
_SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125)
_MIN_TRACE_SIDE = 8


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SVGResult:
    """An image as SVG text.

    Attributes:
        svg: The SVG document (one line).
        paths: Number of ``<path>`` elements (a binary-mode SVG of an image without foreground has none: its
            background ``<rect>`` is the whole picture).
        chars: Length of ``svg`` in characters.
        tokens: Its length in tokens of the tokenizer given; ``None`` without one (see :attr:`estimated_tokens`).
        settings: The settings it was made with: ``mode``, ``colors``, ``precision``, ``scale`` (trace resolution
            / image resolution), ``filter_speckle`` (as applied), ``corner_threshold``, ``length_threshold``,
            ``splice_threshold``, ``trace`` (``polygon`` or ``spline``), ``max_tokens``, ``counted_by``
            (``tokenizer`` or ``estimate``), ``tried`` (settings vectorised); with a budget also ``fitting`` (how
            many searched settings fit) and ``psnr`` (colour) or ``iou_fg`` (binary) of the one kept.
    """

    svg: str
    paths: int
    chars: int
    tokens: int | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def estimated_tokens(self) -> int:
        """:func:`estimate_tokens` of the text (``chars / CHARS_PER_TOKEN``, rounded up)."""
        return estimate_tokens(self.svg)

    @property
    def budget_tokens(self) -> int:
        """The count the budget is checked against: :attr:`tokens` when counted, else the estimate."""
        return self.tokens if self.tokens is not None else self.estimated_tokens


# --------------------------------------------------------------------------------------------- tokens
def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` estimated from its length (:data:`CHARS_PER_TOKEN` characters per token).

    Example:
        >>> estimate_tokens("M10 20l3-4")
        9
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def count_tokens(text: str, tokenizer: Tokenizer | None = None) -> int | None:
    """Tokens of ``text`` (no special tokens added), or ``None`` without a tokenizer.

    Args:
        text: The text.
        tokenizer: A transformers tokenizer (``encode(text, add_special_tokens=False)``), a ``tokenizers.Tokenizer``
            (``encode(text).ids``) or a callable returning token ids.

    Example:
        >>> count_tokens("a b c", lambda t: t.split())
        3
        >>> count_tokens("a b c") is None
        True
    """
    if tokenizer is None:
        return None
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return len(tokenizer(text))
    try:
        ids = encode(text, add_special_tokens=False)
    except TypeError:
        ids = encode(text)
    return len(getattr(ids, "ids", ids))


def smollm2_tokenizer(path: str | Path = "smollm2") -> Any:
    """The tokenizer of a language model, without loading its weights (SmolLM2-135M-Instruct by default).

    Reads the de-quantised copy :func:`~frugalvision.language.load_llm` caches when there is one, else the GGUF
    file (or the transformers folder ``path``).

    Raises:
        MissingDependencyError: transformers (and gguf for a GGUF file) are missing (the ``[vlm]`` extra).
        CheckpointError: The files hold no readable tokenizer.
    """
    from ..errors import CheckpointError
    from ..models.llm import _resolve, llm_cache_path

    transformers = require("transformers", "counting SVG tokens with a language model's tokenizer", extra="vlm")
    file = _resolve(path)
    kw: dict[str, Any] = {"local_files_only": True}
    source: Path = file
    if file.is_file():
        cached = llm_cache_path(file)
        if (cached / "tokenizer.json").is_file() or (cached / "tokenizer_config.json").is_file():
            source = cached
        else:
            require("gguf", "reading a tokenizer from a GGUF file", extra="vlm")
            kw["gguf_file"], source = file.name, file.parent
    try:
        return transformers.AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the tokenizer of {file}: {exc}") from None


# --------------------------------------------------------------------------------------------- images
def _as_array(image: ImageLike) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an array (gray, RGB, RGBA; uint8, bool, floats in [0, 1]), a PIL image or a file."""
    if isinstance(image, str | Path):
        from ..data.images import load_image

        return np.asarray(load_image(image))
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise DataError("empty image (0 pixels): nothing to vectorise")
        if image.mode in ("RGBA", "LA", "P"):
            image = _on_white(np.asarray(image.convert("RGBA")))
            return image
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.size == 0:
        raise DataError(f"empty image (shape {arr.shape}): nothing to vectorise")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise DataError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError("the image holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise DataError(f"a float image must hold values in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"an integer image must hold values in [0, 255], got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 4:
        return _on_white(arr)
    return np.ascontiguousarray(arr)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _otsu(gray: np.ndarray) -> float | None:
    """Otsu's threshold of a gray image; ``None`` when it holds a single value (no foreground)."""
    lo, hi = float(gray.min()), float(gray.max())
    if hi - lo < 1e-6:
        return None
    from skimage.filters import threshold_otsu

    t = float(threshold_otsu(gray))
    low, high = gray[gray <= t], gray[gray > t]
    if low.size and high.size:  # the midpoint of the two classes' means: for a two-level image, half-way between
        t = 0.5 * (float(low.mean()) + float(high.mean()))
    return t


def foreground(image: ImageLike, threshold: float | None = None, dark: bool | None = None
               ) -> tuple[np.ndarray, float | None, bool]:
    """The foreground mask of an image: the gray levels on the other side of Otsu's threshold from the border's.

    Works for light-on-dark images (digits) and dark-on-light ones (ink): the side of the threshold that most border
    pixels are on is the background.

    Args:
        image: The image.
        threshold: Gray threshold (0-255); Otsu's when omitted.
        dark: Foreground is darker than the threshold; decided from the border when omitted.

    Returns:
        ``(mask, threshold, dark)``; an image of one gray level has an empty mask and threshold ``None``.

    Example:
        >>> img = np.zeros((8, 8), np.uint8); img[2:6, 2:6] = 200
        >>> m, t, dark = foreground(img); int(m.sum()), dark
        (16, False)
    """
    gray = _gray(_as_array(image))
    t = _otsu(gray) if threshold is None else float(threshold)
    if t is None:
        return np.zeros(gray.shape, bool), None, bool(dark)
    if dark is None:
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        dark = bool((border > t).mean() >= 0.5)  # the border is mostly light: the foreground is dark
    mask = gray <= t if dark else gray > t
    return mask, t, dark


# --------------------------------------------------------------------------------------------- SVG text
_TOKEN_RE = re.compile(r"[MLCZmlcz]|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PATH_RE = re.compile(r'<path d="([^"]*)" fill="(#[0-9A-Fa-f]{6})"(?: transform="translate\(([^,]+),([^)]+)\)")?')


def _num(v: float, precision: int) -> str:
    """A coordinate as short text: ``12``, ``-3``, ``.5``, ``-1.25``."""
    if precision <= 0:
        r = round(v)
        return str(int(r)) if r != 0 else "0"
    s = f"{v:.{precision}f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    if s.startswith("0."):
        s = s[1:]
    elif s.startswith("-0."):
        s = "-" + s[2:]
    return s


def _join(cmd: str, values: Sequence[float], precision: int) -> str:
    """``cmd`` followed by numbers, separated by a space only where a minus sign does not separate them."""
    out = cmd
    for i, v in enumerate(values):
        s = _num(v, precision)
        if i > 0 and not s.startswith("-") and not (s.startswith(".") and "." in _num(values[i - 1], precision)):
            out += " "
        out += s
    return out


def _compact_path(d: str, tx: float, ty: float, precision: int) -> str:
    """Compact path data from vtracer's (relative to a ``translate``): rounded absolute points, written relative.

    Coordinates are rounded in absolute terms first and the relative steps taken between rounded points, so
    rounding errors do not add up along a path; segments that collapse to a point are dropped.
    """
    q = 10.0 ** max(precision, 0)

    def rnd(v: float) -> float:
        return round(v * q) / q

    parts: list[str] = []
    items = _TOKEN_RE.findall(d)
    i, cmd = 0, ""
    cur = start = (0.0, 0.0)
    last_cmd = ""
    while i < len(items):
        tok = items[i]
        if tok.isalpha():
            cmd = tok
            i += 1
            if cmd in "Zz":
                if parts and parts[-1] != "z":
                    parts.append("z")
                    last_cmd = "z"
                cur = start
            continue
        n = {"M": 2, "L": 2, "C": 6}.get(cmd.upper(), 0)
        if n == 0 or i + n > len(items):
            break
        vals = [float(x) for x in items[i:i + n]]
        i += n
        pts = [(rnd(vals[k] + tx), rnd(vals[k + 1] + ty)) for k in range(0, n, 2)]
        if cmd.upper() == "M":
            if parts and parts[-1] not in ("z",):
                parts.append("z")
            parts.append(_join("M" if not parts else "m", [pts[0][0] - (cur[0] if parts else 0),
                                                           pts[0][1] - (cur[1] if parts else 0)], precision))
            cur = start = pts[0]
            last_cmd = "m"
            continue
        if all(p == cur for p in pts):
            continue  # collapsed by rounding
        rel = [c for p in pts for c in (p[0] - cur[0], p[1] - cur[1])]
        letter = "l" if n == 2 else "c"
        if n == 2 and rel[1] == 0:  # horizontal / vertical lines: one number
            letter, rel = "h", rel[:1]
        elif n == 2 and rel[0] == 0:
            letter, rel = "v", rel[1:]
        body = _join("", rel, precision)
        if last_cmd == letter:  # an implicit repeat of the previous command
            parts.append(body if body.startswith("-") else " " + body)
        else:
            parts.append(letter + body)
        last_cmd = letter
        cur = pts[-1]
    return "".join(parts)


def _hex12(rgb: Sequence[float]) -> str:
    """A colour as ``#rgb`` (4 bits per channel)."""
    return "#" + "".join(f"{min(15, max(0, round(float(c) / 17))):x}" for c in rgb)


def _snap(rgb: tuple[int, int, int], palette: np.ndarray) -> np.ndarray:
    d = ((palette.astype(np.int32) - np.array(rgb, np.int32)) ** 2).sum(1)
    return palette[int(d.argmin())]


def _header(width: int, height: int, vw: int, vh: int) -> str:
    box = f' viewBox="0 0 {vw} {vh}"' if (vw, vh) != (width, height) else ""
    return f'<svg xmlns="{SVG_NS}" width="{width}" height="{height}"{box}>'


# --------------------------------------------------------------------------------------------- vectorising
def _vtracer() -> Any:
    return require("vtracer", "vectorising images to SVG (frugalvision.language.svg)", extra="svg")


def _trace(rgb: np.ndarray, s: dict[str, Any], colormode: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=0)
    return _vtracer().convert_raw_image_to_svg(
        buf.getvalue(), img_format="png", colormode=colormode, hierarchical="stacked", mode=s["trace"],
        filter_speckle=int(s["filter_speckle"]), color_precision=8, layer_difference=1,
        corner_threshold=int(s["corner_threshold"]), length_threshold=float(s["length_threshold"]),
        max_iterations=10, splice_threshold=int(s["splice_threshold"]), path_precision=3)


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _is_canvas(d: str, tx: float, ty: float, vw: int, vh: int) -> bool:
    """Whether vtracer's path is the rectangle of the whole canvas (its stacked background layer)."""
    nums = [float(x) for x in _TOKEN_RE.findall(d) if not x.isalpha()]
    xs, ys = [x + tx for x in nums[0::2]], [y + ty for y in nums[1::2]]
    if not xs or min(xs) > 0.5 or min(ys) > 0.5 or max(xs) < vw - 0.5 or max(ys) < vh - 0.5:
        return False
    return all(min(abs(x), abs(x - vw)) < 0.5 or min(abs(y), abs(y - vh)) < 0.5 for x, y in zip(xs, ys, strict=False))


def _vectorize_once(rgb: np.ndarray, s: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """One trace with fixed settings: ``(svg, number of paths, settings as applied)``.

    The picture is a background ``<rect>`` (the largest colour layer) under the traced paths; an image of one colour
    (after quantisation or thresholding) is the rectangle alone.

    Raises:
        DataError: The vectoriser returned no path for an image of several colours.
    """
    height, width = rgb.shape[:2]
    small = _resize(rgb, s["scale"])
    vh, vw = small.shape[:2]
    s = {**s, "filter_speckle": int(min(s["filter_speckle"], max(1, min(vw, vh) // 4)))}
    precision = int(s["precision"])
    head = _header(width, height, vw, vh)

    def rect(color: Sequence[float] | str, always: bool = False) -> str:
        """The background; left out when white unless it is the whole picture (never an empty SVG)."""
        fill = color if isinstance(color, str) else _hex12(color)
        if fill == "#fff" and not always:
            return ""
        return f'<rect width="{vw}" height="{vh}"' + ("" if fill == "#000" else f' fill="{fill}"') + "/>"

    if s["mode"] == "binary":
        mask, t, dark = foreground(rgb)
        if t is None or not mask.any():  # one gray level: the background is the whole picture
            return head + rect(rgb.reshape(-1, 3).mean(0), always=True) + "</svg>", 0, s
        small_mask = foreground(small, t, dark)[0]
        ink = np.repeat(np.where(small_mask, 0, 255).astype(np.uint8)[..., None], 3, -1)
        ds = [_compact_path(d, float(tx or 0), float(ty or 0), precision)
              for d, _, tx, ty in _PATH_RE.findall(_trace(ink, s, "binary"))]
        ds = [d for d in ds if d]
        if not ds:
            raise DataError(f"the vectoriser returned no path for an image with {int(mask.sum())} foreground pixels "
                            f"(filter_speckle={s['filter_speckle']} at scale {s['scale']} removed them all)")
        fill = _hex12(rgb[mask].mean(0))
        attr = "" if fill == "#000" else f' fill="{fill}"'
        body = "".join(f'<path d="{d}"{attr}/>' for d in ds)
        return head + rect(rgb[~mask].mean(0)) + body + "</svg>", len(ds), s
    colors = int(s["colors"])
    pal_img = Image.fromarray(small).quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    index = np.asarray(pal_img)
    palette = np.asarray(pal_img.getpalette()[: 3 * colors], np.uint8).reshape(-1, 3)
    counts = np.bincount(index.ravel(), minlength=len(palette))[: len(palette)]
    if (counts > 0).sum() <= 1:
        return head + rect(palette[int(counts.argmax())], always=True) + "</svg>", 0, s
    used = palette[counts > 0]
    background = _hex12(palette[int(counts.argmax())])
    elems: list[tuple[str, str]] = []  # (fill, path data)
    for k, (d, fill, tx, ty) in enumerate(_PATH_RE.findall(_trace(np.asarray(pal_img.convert("RGB")), s, "color"))):
        col = _hex12(_snap(tuple(int(fill[j:j + 2], 16) for j in (1, 3, 5)), used))  # type: ignore[arg-type]
        if k == 0 and _is_canvas(d, float(tx or 0), float(ty or 0), vw, vh):
            background = col
            continue
        data = _compact_path(d, float(tx or 0), float(ty or 0), precision)
        if not data:
            continue
        if elems and elems[-1][0] == col:  # consecutive layers of one colour: one element, several sub-paths
            elems[-1] = (col, elems[-1][1] + data)
        else:
            elems.append((col, data))
    if not elems:
        raise DataError(f"the vectoriser returned an empty SVG for an image of {int((counts > 0).sum())} colours "
                        f"(filter_speckle={s['filter_speckle']} at scale {s['scale']} removed every patch)")
    body = "".join(f'<path d="{d}"' + ("" if c == "#000" else f' fill="{c}"') + "/>" for c, d in elems)
    return head + rect(background) + body + "</svg>", len(elems), s


def search_space(mode: str = "color", colors: int = 8, size: tuple[int, int] = (256, 256), filter_speckle: int = 2
                 ) -> dict[str, list[Any]]:
    """The settings :func:`vectorize` searches when a token budget is given, finest first in each list.

    ``colors``: the palette size asked for, halved down to 4, then 3 and 2 (binary mode: 2 only);
    ``filter_speckle``: the one asked for, then 4, 8 and 16 px (vtracer drops patches smaller than its square);
    ``scale``: the image traced at 1, 3/4, 1/2, 3/8, 1/4, 3/16 and 1/8 of its size (at least 8 px a side) and drawn
    at full size through a ``viewBox``.

    Example:
        >>> search_space("color", colors=8, size=(64, 64))
        {'colors': [8, 4, 3, 2], 'filter_speckle': [2, 4, 8, 16], 'scale': [1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125]}
    """
    palette = [colors]
    while mode == "color" and palette[-1] > 4:
        palette.append(max(4, palette[-1] // 2))
    palette += [c for c in (3, 2) if mode == "color" and c < palette[-1]]
    if mode == "binary":
        palette = [2]
    speckles = sorted({filter_speckle, *(v for v in _SPECKLES if v > filter_speckle)})
    scales = [sc for sc in _SCALES if min(size) * sc >= _MIN_TRACE_SIDE] or [1.0]
    return {"colors": palette, "filter_speckle": speckles, "scale": scales}


def _score(rgb: np.ndarray, svg: str, mode: str) -> tuple[float, float]:
    f = fidelity(rgb, svg)
    return (f["iou_fg"], f["psnr"]) if mode == "binary" else (f["psnr"], f["iou_fg"])


def vectorize(image: ImageLike, *, colors: int = 8, precision: int = 0, mode: Literal["color", "binary"] = "color",
              max_tokens: int | None = None, tokenizer: Tokenizer | None = None, filter_speckle: int = 2,
              trace: Literal["polygon", "spline"] = "polygon") -> SVGResult:
    """Vectorise an image into compact SVG text, optionally within a token budget.

    Without ``max_tokens`` the image is traced once with the settings given. With it, the settings of
    :func:`search_space` are searched: for every palette size and speckle filter, the largest trace scale whose SVG
    fits (bisection over the scales); among those that fit, the SVG closest to the image is kept (highest PSNR in
    colour mode, highest foreground IoU in binary mode; ties: fewer tokens). A palette size that fits at full scale
    is not tried with stronger speckle filters.

    Args:
        image: An ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array (uint8, bool, or floats in [0, 1]; alpha is
            composited on white), a PIL image or an image file.
        colors: Palette size in colour mode (the image is quantised by median cut first; 2-64).
        precision: Decimals of the coordinates (0: integers; 0-3); polygons traced at full scale lie on the pixel
            grid, so only splines and scaled traces have decimals to keep.
        mode: ``color`` (stacked colour layers) or ``binary`` (the foreground of :func:`foreground` on a background
            rectangle, each in its mean colour).
        max_tokens: Token budget (see above).
        tokenizer: Counts tokens (see :func:`count_tokens`); without one the budget is checked against
            :func:`estimate_tokens`.
        filter_speckle: vtracer drops patches smaller than this many pixels squared (at the trace's scale; at most a
            quarter of its shorter side).
        trace: ``polygon`` (straight segments: about half the tokens of splines at the same fidelity in
            ``benchmarks/svg_fidelity.py``) or ``spline`` (cubic curves, vtracer's corner / length / splice
            thresholds at its defaults 60 / 4 / 45).

    Returns:
        An :class:`SVGResult`; its ``settings`` say what the SVG was made with.

    Raises:
        DataError: The image is empty or unreadable; the vectoriser returned no path for an image of several colours
            (or with a foreground); no searched setting fits ``max_tokens`` (the message gives the smallest SVG).
        ConfigError: A setting is out of range.
        MissingDependencyError: vtracer or resvg-py is missing (the ``[svg]`` extra).

    An image of one colour (after quantisation; in binary mode: without foreground) is drawn as its background
    rectangle alone (``paths == 0``): that is the picture, not an error.
    """
    if mode not in ("color", "binary"):
        raise ConfigError(f"mode must be 'color' or 'binary', got {mode!r}")
    if trace not in ("polygon", "spline"):
        raise ConfigError(f"trace must be 'polygon' or 'spline', got {trace!r}")
    for key, value, low, high in (("colors", colors, 2, 64), ("precision", precision, 0, 3),
                                  ("filter_speckle", filter_speckle, 0, 128)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
            raise ConfigError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int | np.integer)
                                   or max_tokens < 1):
        raise ConfigError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    _vtracer()
    rgb = _as_array(image)
    counted_by = "tokenizer" if tokenizer is not None else "estimate"
    base = {"mode": mode, "colors": 2 if mode == "binary" else int(colors), "precision": int(precision),
            "scale": 1.0, "filter_speckle": int(filter_speckle), **_SPLINE, "trace": trace}
    extra = {"max_tokens": max_tokens, "counted_by": counted_by}
    if max_tokens is None:
        svg, n, s = _vectorize_once(rgb, base)
        return SVGResult(svg, n, len(svg), count_tokens(svg, tokenizer), {**s, **extra, "tried": 1})

    space = search_space(mode, int(colors), rgb.shape[:2], int(filter_speckle))
    scales = space["scale"]
    tried = 0
    smallest: tuple[int, dict[str, Any]] | None = None
    last_error: DataError | None = None
    memo: dict[tuple[int, int, int], tuple[str, int, dict[str, Any], int | None, int] | None] = {}

    def attempt(c: int, sp: int, i: int) -> tuple[str, int, dict[str, Any], int | None, int] | None:
        """Vectorise at (colours, speckle, scale index); None when the trace is empty or too long."""
        nonlocal tried, smallest, last_error
        key = (c, sp, i)
        if key not in memo:
            tried += 1
            try:
                svg, n, s = _vectorize_once(rgb, {**base, "colors": c, "filter_speckle": sp, "scale": scales[i]})
            except DataError as exc:  # every patch filtered out at this scale
                last_error = exc
                memo[key] = None
                return None
            tokens = count_tokens(svg, tokenizer)
            used = tokens if tokens is not None else estimate_tokens(svg)
            if smallest is None or used < smallest[0]:
                smallest = (used, s)
            memo[key] = (svg, n, s, tokens, used) if used <= max_tokens else None
        return memo[key]

    fitting: list[tuple[str, int, dict[str, Any], int | None, int]] = []
    for c in space["colors"]:
        for sp in space["filter_speckle"]:
            if attempt(c, sp, 0) is not None:
                fitting.append(memo[(c, sp, 0)])  # type: ignore[arg-type]
                break  # full scale fits: stronger speckle filters only lose detail
            lo, hi = 1, len(scales) - 1  # the first (largest) scale that fits, by bisection
            if hi < lo or attempt(c, sp, hi) is None:
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                if attempt(c, sp, mid) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            fitting.append(memo[(c, sp, hi)])  # type: ignore[arg-type]
    if not fitting:
        if smallest is None:
            raise last_error or DataError("the vectoriser returned an empty SVG for a non-empty image")
        used, s = smallest
        knobs = ", ".join(f"{k}={s[k]}" for k in ("colors", "scale", "filter_speckle"))
        raise DataError(f"no SVG of this {rgb.shape[1]}x{rgb.shape[0]} image fits max_tokens={max_tokens}: the "
                        f"smallest has {used} tokens ({counted_by}; {knobs}); raise max_tokens or pass a smaller image")
    scored = [(_score(rgb, f[0], mode), -f[4], f) for f in fitting]
    (best_score, _, (svg, n, s, tokens, _used)) = max(scored, key=lambda x: (x[0], x[1]))
    settings = {**s, **extra, "tried": tried, "fitting": len(fitting),
                ("iou_fg" if mode == "binary" else "psnr"): round(best_score[0], 4)}
    return SVGResult(svg, n, len(svg), tokens, settings)


# --------------------------------------------------------------------------------------------- rendering
def rasterize(svg: str, width: int, height: int, background: str = "#ffffff") -> np.ndarray:
    """Render SVG text to an ``(height, width, 3)`` uint8 RGB array with resvg (on ``background``).

    Raises:
        DataError: The text is not an SVG resvg can render.
        MissingDependencyError: resvg-py is missing (the ``[svg]`` extra).

    Example:
        >>> svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><path d="M0 0h2v4h-2z"/></svg>'
        >>> rasterize(svg, 4, 4)[0, :, 0].tolist()
        [0, 0, 255, 255]
    """
    resvg = require("resvg_py", "rendering SVG (frugalvision.language.svg)", extra="svg")
    if width < 1 or height < 1:
        raise ConfigError(f"width and height must be positive, got {width}x{height}")
    try:
        png = resvg.svg_to_bytes(svg_string=svg, width=int(width), height=int(height), background=background)
    except (ValueError, RuntimeError, OSError) as exc:
        raise DataError(f"cannot render the SVG: {exc}") from None
    with Image.open(io.BytesIO(bytes(png))) as im:
        arr = np.asarray(im.convert("RGBA"))
    if arr.shape[:2] != (height, width):  # resvg keeps the aspect ratio of the SVG; stretch to the asked size
        arr = np.asarray(Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR))
    return _on_white(arr)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (``inf`` when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(image: ImageLike, rendering: np.ndarray) -> dict[str, float]:
    """``psnr`` (dB, RGB; ``inf`` when equal) and ``iou_fg`` of an image and a rendering of the same size.

    The foreground of both is taken with the image's threshold and polarity (:func:`foreground`); for an image with
    no foreground, ``iou_fg`` is 1.0 when the rendering has none either, else 0.0.
    """
    rgb = _as_array(image)
    out = _as_array(rendering)
    if out.shape != rgb.shape:
        raise ConfigError(f"the rendering is {out.shape[1]}x{out.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
    mask, t, dark = foreground(rgb)
    other = foreground(out, t, dark)[0] if t is not None else np.zeros_like(mask)
    return {"psnr": psnr(rgb, out), "iou_fg": _iou(mask, other)}


def fidelity(image: ImageLike, svg: str | SVGResult) -> dict[str, float]:
    """How well an SVG reproduces an image: :func:`compare` of the image and the SVG rendered at its size.

    ``iou_fg`` (foreground IoU) is the measure for binary pictures (digits, masks, ink); ``psnr`` for the rest.

    Example:
        >>> img = np.zeros((16, 16), np.uint8); img[4:12, 4:12] = 255
        >>> svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><rect width="16" height="16"/>'
        ...        '<path d="M4 4h8v8h-8z" fill="#fff"/></svg>')
        >>> fidelity(img, svg)
        {'psnr': inf, 'iou_fg': 1.0}
    """
    rgb = _as_array(image)
    text = svg.svg if isinstance(svg, SVGResult) else svg
    return compare(rgb, rasterize(text, rgb.shape[1], rgb.shape[0]))


# --------------------------------------------------------------------------------------------- baseline
def pixels_as_text(image: ImageLike, max_tokens: int, tokenizer: Tokenizer | None = None, gray: bool | None = None,
                   count: Callable[[str], int] | None = None) -> tuple[str, np.ndarray, int]:
    """The "raw pixels as text" baseline: the image downsampled until its integers fit ``max_tokens``.

    Pixels are written as decimal integers (0-255), one row per line, separated by spaces (``r,g,b`` per pixel for a
    colour image); the side is shrunk (aspect kept) until the text fits.

    Args:
        image: The image.
        max_tokens: Token budget.
        tokenizer: As :func:`count_tokens`; the estimate without one.
        gray: Write one value per pixel; by default when the image's three channels are equal.
        count: Overrides the token count (testing).

    Returns:
        ``(text, the image it decodes to upsampled back to the full size (nearest), tokens)``.

    Raises:
        DataError: Not even a 1x1 image fits.

    Example:
        >>> text, back, n = pixels_as_text(np.full((16, 16), 7, np.uint8), max_tokens=40)
        >>> text.splitlines()[0], back.shape
        ('7 7 7 7', (16, 16, 3))
    """
    rgb = _as_array(image)
    h, w = rgb.shape[:2]
    if gray is None:
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())

    def n_tokens(text: str) -> int:
        if count is not None:
            return count(text)
        c = count_tokens(text, tokenizer)
        return c if c is not None else estimate_tokens(text)

    def render(side_w: int, side_h: int) -> tuple[str, np.ndarray]:
        small = np.asarray(Image.fromarray(rgb).resize((side_w, side_h), Image.Resampling.BOX))
        if gray:
            rows = [" ".join(str(int(v)) for v in row[:, 0]) for row in small]
        else:
            rows = [" ".join(f"{p[0]},{p[1]},{p[2]}" for p in row) for row in small]
        return "\n".join(rows), small

    lo, hi = 0, max(h, w)  # the largest long side that fits, by bisection (tokens grow with the side)
    best: tuple[str, np.ndarray, int] | None = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        sw, sh = max(1, round(w * mid / max(h, w))), max(1, round(h * mid / max(h, w)))
        text, small = render(sw, sh)
        n = n_tokens(text)
        if n <= max_tokens:
            lo, best = mid, (text, small, n)
        else:
            hi = mid - 1
    if best is None:
        raise DataError(f"not even a 1x1 image fits max_tokens={max_tokens} as pixel text")
    text, small, n = best
    back = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST))
    return text, back, n

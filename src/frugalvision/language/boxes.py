r"""MiniGPT-v2's boxes as text: ``{<x1><y1><x2><y2>}`` with integer coordinates 0-100 of the image width / height.

The format follows the official code (Vision-CAIR/MiniGPT-4): the datasets write
``"{{<{}><{}><{}><{}>}}".format(*[int(v / size * 100) ...])`` (``coco_dataset.py``, ``vg_dataset.py``), and the
referring evaluation (``eval_scripts/eval_ref.py``) accepts an answer only when it matches
``\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}`` and maps each number back with ``v / 100 * size``.

The official encoder truncates (``int``); :func:`box_to_text` rounds by default (half a bin of error instead of up to
one) and truncates with ``rounding="floor"``. Either way a round trip is within one bin (1 % of the side).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

__all__ = ["BINS", "BOX_RE", "ParsedBoxes", "box_to_text", "boxes_to_text", "parse_boxes"]

#: Number of coordinate bins (coordinates are integers 0..BINS).
BINS = 100
#: The official regular expression of one box (``eval_scripts/eval_ref.py``).
BOX_RE = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_BOX_GROUPS = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
# anything that looks like an attempt at a box: a brace followed by angle brackets, or a stray <number>
_BOX_LIKE = re.compile(r"\{\s*<[^{}]*\}?|<\s*-?\d[\d.\s]*>")


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0) or not (math.isfinite(width) and math.isfinite(height)):
        raise ConfigError(f"image size must be positive and finite, got width={width}, height={height}")


def box_to_text(box_xyxy: Sequence[float], width: float, height: float,
                rounding: Literal["round", "floor"] = "round") -> str:
    """One box in pixels ``(x1, y1, x2, y2)`` as MiniGPT-v2 text.

    Args:
        box_xyxy: Corners in pixels.
        width: Image width in pixels.
        height: Image height in pixels.
        rounding: ``"round"`` to the nearest bin, or ``"floor"`` (the official ``int()`` truncation).

    Returns:
        ``"{<x1><y1><x2><y2>}"`` with integers clipped to 0..100.

    Example:
        >>> box_to_text((10, 20, 110, 220), width=200, height=400)
        '{<5><5><55><55>}'
        >>> box_to_text((-5, 0, 500, 40), 200, 400)
        '{<0><0><100><10>}'
    """
    if len(box_xyxy) != 4:
        raise ConfigError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(box_xyxy)}")
    _check_size(width, height)
    if rounding not in ("round", "floor"):
        raise ConfigError(f"rounding must be 'round' or 'floor', not {rounding!r}")
    step = math.floor if rounding == "floor" else round
    sides = (width, height, width, height)
    bins = [min(BINS, max(0, int(step(float(v) / s * BINS)))) for v, s in zip(box_xyxy, sides, strict=True)]
    return "{<%d><%d><%d><%d>}" % tuple(bins)  # noqa: UP031 - the official format string


def boxes_to_text(boxes: Sequence[Sequence[float]], width: float, height: float,
                  rounding: Literal["round", "floor"] = "round", sep: str = "") -> str:
    """Several boxes, joined by ``sep`` (MiniGPT-v2's detection answers use ``<delim>`` between boxes).

    Example:
        >>> boxes_to_text([(0, 0, 50, 50), (50, 50, 100, 100)], 100, 100, sep="<delim>")
        '{<0><0><50><50>}<delim>{<50><50><100><100>}'
    """
    return sep.join(box_to_text(b, width, height, rounding) for b in boxes)


@dataclass
class ParsedBoxes:
    """Boxes read from model text.

    Attributes:
        boxes: Valid boxes in pixels ``(x1, y1, x2, y2)``, in the order they appear.
        malformed: Whether the text held something box-like that is not a valid box: a number over 100, a
            degenerate box (``x2 <= x1`` or ``y2 <= y1``), or a brace/angle pattern the regex rejects.
        invalid: The rejected box strings (for error analysis).
    """

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    malformed: bool = False
    invalid: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)


def parse_boxes(text: str, width: float, height: float) -> ParsedBoxes:
    """Read every ``{<x1><y1><x2><y2>}`` box of ``text`` back into pixels (``v / 100 * side``, as the official eval).

    Args:
        text: Model output.
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        :class:`ParsedBoxes` with the valid boxes and whether anything box-like was malformed.

    Example:
        >>> parse_boxes("a cat {<10><20><50><60>}", 200, 100).boxes
        [(20.0, 20.0, 100.0, 60.0)]
        >>> p = parse_boxes("{<10><20><5><60>} {<1><2><3>}", 200, 100)
        >>> p.boxes, p.malformed, p.invalid
        ([], True, ['{<10><20><5><60>}', '{<1><2><3>}'])
    """
    _check_size(width, height)
    out = ParsedBoxes()
    for m in _BOX_GROUPS.finditer(text):
        x1, y1, x2, y2 = (int(g) for g in m.groups())
        if max(x1, y1, x2, y2) > BINS or x2 <= x1 or y2 <= y1:
            out.invalid.append(m.group(0))
            continue
        out.boxes.append((x1 / BINS * width, y1 / BINS * height, x2 / BINS * width, y2 / BINS * height))
    rest = _BOX_GROUPS.sub(" ", text)
    leftovers = [m.group(0).strip() for m in _BOX_LIKE.finditer(rest)]
    out.invalid.extend(leftovers)
    out.malformed = bool(out.invalid)
    return out

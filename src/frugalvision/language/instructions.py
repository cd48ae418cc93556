"""MiniGPT-v2-style instruction data from the bundled inspection set and the deepforest tree images.

An :class:`Instruction` is one (image, task instruction, answer) triple. The instruction carries MiniGPT-v2's task
identifier (``[caption]``, ``[vqa]``, ``[refer]``, ``[identify]``, ``[detection]``, ``[grounding]``); the image is
put in front by :attr:`Instruction.prompt` as ``<Img><ImageHere></Img> [task] instruction``. Boxes in the text are
MiniGPT-v2's ``{<x1><y1><x2><y2>}`` with integers 0-100 relative to the sample's width and height.

**Box text.** A pixel coordinate ``x`` becomes ``floor(x * 100 / width + 0.5)`` (``y``: ``/ height``), clipped to
``0..100``; a bin ``b`` decodes to ``b * width / 100``, so a box round-trips within half a bin (``width / 200``
pixels). Boxes are read with the official regex :data:`BOX_PATTERN` (``eval_scripts/eval_ref.py``). Several boxes
of one phrase are joined with :data:`BOX_SEPARATOR` (``<delim>``, as ``demo_v2.py`` splits them) and a phrase with
its boxes is ``<p>phrase</p> {box}<delim>{box}`` (``PhraseToObjectDataset`` in ``minigpt4/datasets/datasets/
flickr.py``; grounded captions wrap each phrase the same way inside the sentence).

**Inspection** (:func:`inspection_instructions`, from :func:`~frugalvision.detect.datasets.defect_boxset`; the
texture category is the sample's ``group``). Per image: one ``[caption]`` and one ``[grounding]``; ``[vqa]``
``defect`` (yes/no), ``count`` (number of defect instances, digits), ``category`` (surface word of
:data:`CATEGORY_WORDS`) and, when all instances are of one kind, ``kind``; one ``[refer]`` per kind that occurs
exactly once (``the crack`` → its box); one ``[identify]`` per box (box → kind phrase; left out when another kind
has the same box text); one ``[detection]`` per kind present (phrase → all its boxes, largest first). Defects are
named by :data:`KIND_PHRASES`; a location word (:func:`location_word`) comes from the box centre on a 3x3 grid.

**Trees** (:func:`tree_instructions`, from :func:`~frugalvision.data.detection.load_deepforest`): each image is split
by region (:func:`~frugalvision.data.detection.split_by_region`, first 70 % of the height train, the rest test) and
each region is cut into tiles. Per tile: ``[caption]`` (``aerial view with N trees``), ``[vqa]`` ``count`` (the
exact number of tree boxes in the tile); when there is a tree, ``[detection]`` ``tree`` (the ``max_boxes`` largest
boxes, largest first; the others are kept in :attr:`Instruction.ignore` and are neither hits nor misses for the AP)
and, when the largest tree is unambiguous (area at least :data:`LARGEST_MARGIN` times the second's, or it is alone),
``[refer]`` ``the largest tree``.

**Templates.** Each task (and VQA question type) has a tuple of phrasings in :data:`INSPECTION_TEMPLATES` and
:data:`TREE_TEMPLATES`; training instructions draw one with ``random.Random(seed)`` (in sample order, so the output
is a function of the seed), test instructions always use the first one. The test split uses test images only.

Example:
    >>> _box_text((32.0, 0.0, 64.0, 128.0), 128, 128)
    '{<25><0><50><100>}'
    >>> _parse("<p>crack</p> {<25><0><50><100>}<delim>{<1><2><3><4>}")
    [(25, 0, 50, 100), (1, 2, 3, 4)]
    >>> inspection_caption("brick", ["crack"], [(0, 0, 20, 20)], 128, 128)
    'a brick surface with a crack in the upper left'
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..utils.io import atomic_path
from .boxes import BINS, BOX_RE, box_to_text
from .prompts import IMAGE_PROMPT as IMAGE_PLACEHOLDER

__all__ = [
    "BOX_PATTERN",
    "BOX_SEPARATOR",
    "CATEGORY_WORDS",
    "IMAGE_PLACEHOLDER",
    "INSPECTION_TEMPLATES",
    "KIND_PHRASES",
    "LARGEST_MARGIN",
    "LOCATIONS",
    "TASKS",
    "TREE_TEMPLATES",
    "Instruction",
    "detection_answer",
    "image_key",
    "inspection_caption",
    "inspection_instructions",
    "kind_phrase",
    "load_jsonl",
    "location_word",
    "save_jsonl",
    "tree_caption",
    "tree_instructions",
]

#: MiniGPT-v2's task identifiers, in the order instructions of one image are made.
TASKS = ("caption", "grounding", "vqa", "refer", "identify", "detection")
#: The official box regex (MiniGPT-4 repository, ``eval_scripts/eval_ref.py``).
BOX_PATTERN = BOX_RE.pattern
#: Separator of the boxes of one phrase (``demo_v2.py`` splits on it).
BOX_SEPARATOR = "<delim>"
#: The noun phrase that names each defect kind in every text (captions, refer, detection, identify, VQA).
KIND_PHRASES: dict[str, str] = {
    "scratch": "scratch", "crack": "crack", "hole": "hole", "stain": "stain", "contamination": "contamination",
    "missing": "missing area", "color": "color defect",
}
#: The surface word of each benchmark category (captions and the ``category`` question).
CATEGORY_WORDS: dict[str, str] = {"brick": "brick", "grass": "grass", "gravel": "gravel", "moon": "moon",
                                  "ihc": "tissue"}
#: The 9 location words (3x3 grid of the box centre), see :func:`location_word`.
LOCATIONS = ("upper left", "upper centre", "upper right", "centre left", "centre", "centre right", "lower left",
             "lower centre", "lower right")
#: ``[refer] the largest tree`` needs the largest box to have at least this times the area of the second largest.
LARGEST_MARGIN = 1.25

#: Phrasings of the inspection instructions; ``{}`` is the refer expression, the kind phrase or the box text.
#: The first one of each tuple is the test phrasing.
INSPECTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "[caption] briefly describe this surface",
        "[caption] describe this image in one sentence",
        "[caption] write a short caption for this inspection image",
        "[caption] what does this image show?",
    ),
    "grounding": (  # the official pool of GroundedDetailDataset, with our default first
        "[grounding] describe this image in detail",
        "[grounding] please describe this image in details",
        "[grounding] describe this image as detailed as possible",
        "[grounding] summarize this image in details",
        "[grounding] give a thorough description of what you see in this image",
    ),
    "vqa/defect": (
        "[vqa] is there a defect on this surface?",
        "[vqa] does this surface have any defect?",
        "[vqa] is this surface defective?",
        "[vqa] can you see a defect in this image?",
    ),
    "vqa/kind": (
        "[vqa] what kind of defect is this?",
        "[vqa] which type of defect does this surface have?",
        "[vqa] name the defect on this surface",
        "[vqa] what is wrong with this surface?",
    ),
    "vqa/count": (
        "[vqa] how many defects are there?",
        "[vqa] how many defects can you see?",
        "[vqa] count the defects on this surface",
        "[vqa] what is the number of defects in this image?",
    ),
    "vqa/category": (
        "[vqa] what surface is this?",
        "[vqa] what material is shown in this image?",
        "[vqa] which kind of surface is this?",
        "[vqa] what is this surface made of?",
    ),
    "refer": (  # the official pool of ReferCOCODataset, our expressions carry their article
        "[refer] give me the location of {}",
        "[refer] {}",
        "[refer] where is {} ?",
        "[refer] from this image, tell me the location of {}",
        "[refer] the location of {} is",
        "[refer] could you tell me the location for {} ?",
    ),
    "identify": (  # InvReferCOCODataset's pool, "object" made "defect"
        "[identify] what defect is in this location {}",
        "[identify] {}",
        "[identify] identify the defect present at this location {}",
        "[identify] what is it in {}",
        "[identify] the defect in {} is",
    ),
    "detection": (
        "[detection] {}",
        "[detection] find every {}",
        "[detection] locate all instances of {}",
    ),
}
#: Phrasings of the tree instructions (first = test phrasing).
TREE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "[caption] briefly describe this aerial image",
        "[caption] describe this image in one sentence",
        "[caption] write a short caption for this aerial view",
        "[caption] what does this image show?",
    ),
    "vqa/count": (
        "[vqa] how many trees are there?",
        "[vqa] how many trees can you see?",
        "[vqa] count the trees in this image",
        "[vqa] what is the number of trees in this aerial image?",
    ),
    "refer": INSPECTION_TEMPLATES["refer"],
    "detection": INSPECTION_TEMPLATES["detection"],
}

_BOX_RE = re.compile(BOX_PATTERN)
Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------- box text
def _box_text(box: Sequence[float], width: int, height: int) -> str:
    """``{<x1><y1><x2><y2>}`` of a pixel ``xyxy`` box (:func:`~frugalvision.language.boxes.box_to_text`).

    >>> _box_text((10, 20, 50, 60), 200, 100)
    '{<5><20><25><60>}'
    """
    return box_to_text(box, width, height)


def _parse(text: str) -> list[tuple[int, int, int, int]]:
    """The bins of every box in ``text`` matched by :data:`BOX_PATTERN`, in order (bins are not range-checked).

    >>> _parse("{<5><20><25><60>} and {<1 ><2><3><4>}")  # a space inside a box breaks the pattern
    [(5, 20, 25, 60)]
    """
    return [tuple(int(v) for v in re.findall(r"\d+", m)) for m in _BOX_RE.findall(text)]  # type: ignore[misc]


def _from_bins(bins: Sequence[int], width: int, height: int) -> Box:
    """Pixel ``xyxy`` of a box given in bins: ``b * size / 100``."""
    x1, y1, x2, y2 = bins
    return (x1 * width / BINS, y1 * height / BINS, x2 * width / BINS, y2 * height / BINS)


# ----------------------------------------------------------------------------------------------- records
def image_key(image: str | Path, window: Sequence[int] | None = None) -> str:
    """A string that names one sample: the image path, plus ``#x0,y0,x1,y1`` for a window of it.

    >>> image_key("a.png"), image_key("a.png", (0, 0, 400, 400))
    ('a.png', 'a.png#0,0,400,400')
    """
    return str(image) if window is None else f"{image}#{','.join(str(int(v)) for v in window)}"


@dataclass
class Instruction:
    """One instruction-following example of a sample (an image or a window of one).

    Attributes:
        image: Image file.
        window: ``(x0, y0, x1, y1)`` crop of the file that the sample is, or None for the whole file.
        width: Width of the sample in pixels (the window's if windowed); box texts are relative to it.
        height: Height of the sample.
        task: One of :data:`TASKS`.
        instruction: The task text with its identifier, e.g. ``[refer] give me the location of the crack``.
        answer: The target answer text.
        qtype: The question type: for ``vqa`` ``defect``, ``kind``, ``count`` or ``category``; else the task name.
        boxes: Target ``xyxy`` pixel boxes of the sample: the referred box (``refer``), the queried box
            (``identify``), the listed boxes in answer order (``detection``, ``grounding``); empty otherwise.
        label: The class name the instruction is about (kind for refer/identify/detection/``kind``, ``tree`` for
            trees, the category for captions, grounding and ``category``), else empty.
        source: ``inspection`` or ``trees``.
        ignore: Boxes of objects present but not listed in a ``detection`` answer (beyond its cap); the AP
            neither rewards nor punishes predictions on them (COCO ``iscrowd``).

    Example:
        >>> inst = Instruction("a.png", None, 128, 128, "vqa", "[vqa] how many defects are there?", "1", "count")
        >>> inst.prompt
        '<Img><ImageHere></Img> [vqa] how many defects are there?'
    """

    image: Path
    window: tuple[int, int, int, int] | None
    width: int
    height: int
    task: str
    instruction: str
    answer: str
    qtype: str = ""
    boxes: list[Box] = field(default_factory=list)
    label: str = ""
    source: str = ""
    ignore: list[Box] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.window = tuple(int(v) for v in self.window) if self.window is not None else None  # type: ignore
        self.width, self.height = int(self.width), int(self.height)
        self.boxes = [tuple(float(v) for v in b) for b in self.boxes]  # type: ignore[misc]
        self.ignore = [tuple(float(v) for v in b) for b in self.ignore]  # type: ignore[misc]
        self.qtype = self.qtype or self.task
        if self.task not in TASKS:
            raise DataError(f"instruction task {self.task!r} is not one of {', '.join(TASKS)}")

    @property
    def key(self) -> str:
        """:func:`image_key` of the sample (the key of a prediction dict)."""
        return image_key(self.image, self.window)

    @property
    def prompt(self) -> str:
        """``<Img><ImageHere></Img> [task] instruction``, MiniGPT-v2's input text."""
        return f"{IMAGE_PLACEHOLDER} {self.instruction}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings, tuples as lists)."""
        return {"image": str(self.image), "window": list(self.window) if self.window is not None else None,
                "width": self.width, "height": self.height, "task": self.task, "instruction": self.instruction,
                "answer": self.answer, "qtype": self.qtype, "boxes": [list(b) for b in self.boxes],
                "label": self.label, "source": self.source, "ignore": [list(b) for b in self.ignore]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "instruction") -> Instruction:
        """Check and build an instruction from :meth:`to_dict`'s output; unknown keys are ignored.

        Raises:
            DataError: Naming ``where`` and the field at fault.
        """
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        lack = [k for k in ("image", "width", "height", "task", "instruction", "answer") if k not in data]
        if lack:
            raise DataError(f"{where}: lacks the key(s) {lack}; every line needs image, width, height, task, "
                            "instruction and answer")
        for k in ("image", "task", "instruction", "answer", "qtype", "label", "source"):
            if k in data and not isinstance(data[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {data[k]!r}")
        for k in ("width", "height"):
            if not isinstance(data[k], int) or isinstance(data[k], bool) or data[k] < 1:
                raise DataError(f"{where}: {k!r} must be a positive integer, got {data[k]!r}")
        if data["task"] not in TASKS:
            raise DataError(f"{where}: task {data['task']!r} is not one of {', '.join(TASKS)}")
        window = data.get("window")
        if window is not None and not (isinstance(window, list) and len(window) == 4
                                       and all(isinstance(v, int) and not isinstance(v, bool) for v in window)):
            raise DataError(f"{where}: 'window' must be null or [x0, y0, x1, y1] integers, got {window!r}")
        for k in ("boxes", "ignore"):
            boxes = data.get(k, [])
            if not isinstance(boxes, list) or not all(
                    isinstance(b, list) and len(b) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                                and math.isfinite(v) for v in b) for b in boxes):
                raise DataError(f"{where}: {k!r} must be a list of [x1, y1, x2, y2] numbers, got {boxes!r}")
        return cls(Path(data["image"]), window, data["width"], data["height"], data["task"], data["instruction"],
                   data["answer"], data.get("qtype", ""), data.get("boxes", []), data.get("label", ""),
                   data.get("source", ""), data.get("ignore", []))


def save_jsonl(instructions: Iterable[Instruction], path: str | Path, overwrite: bool = False) -> Path:
    """Write instructions as JSON Lines (one :meth:`Instruction.to_dict` object per line), atomically.

    Raises:
        ConfigError: If ``path`` exists and ``overwrite`` is false.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "i.jsonl"
        >>> inst = Instruction("a.png", None, 8, 8, "refer", "[refer] the crack", "{<0><0><50><50>}",
        ...                    boxes=[(0, 0, 4, 4)], label="crack")
        >>> load_jsonl(save_jsonl([inst], p)) == [inst]
        True
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass overwrite=True to replace it or choose another file")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for inst in instructions:
            fh.write(json.dumps(inst.to_dict(), ensure_ascii=False) + "\n")
    return path


def load_jsonl(path: str | Path) -> list[Instruction]:
    """Read a file written by :func:`save_jsonl` (blank lines are skipped).

    Raises:
        DataError: If the file is missing or unreadable, or a line is not valid JSON or not a valid instruction
            (the message names the file and the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction file {path} does not exist; check the path")
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}); fix or remove the "
                                    "line") from None
                out.append(Instruction.from_dict(data, where))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); write it with save_jsonl") from None
    return out


# ----------------------------------------------------------------------------------------------- answer texts
def location_word(box: Sequence[float], width: int, height: int) -> str:
    """Where a box is: its centre on a 3x3 grid of the sample, one of :data:`LOCATIONS`.

    The centre ``(cx, cy)`` relative to the width and height is ``upper`` when ``cy < 1/3``, ``lower`` when
    ``cy > 2/3``, else ``centre``; ``left`` when ``cx < 1/3``, ``right`` when ``cx > 2/3``, else ``centre``. The
    word is ``"{vertical} {horizontal}"``, and just ``centre`` when both are ``centre``.

    >>> location_word((0, 0, 20, 20), 128, 128), location_word((50, 60, 70, 70), 128, 128)
    ('upper left', 'centre')
    >>> location_word((100, 50, 120, 70), 128, 128), location_word((50, 100, 70, 120), 128, 128)
    ('centre right', 'lower centre')
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    vertical = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "centre"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if vertical == horizontal == "centre" else f"{vertical} {horizontal}"


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _reading_order(boxes: Sequence[Sequence[float]]) -> list[int]:
    """Indices of boxes by centre, top to bottom then left to right."""
    return sorted(range(len(boxes)), key=lambda i: ((boxes[i][1] + boxes[i][3]) / 2, (boxes[i][0] + boxes[i][2]) / 2,
                                                    i))


def _area(box: Sequence[float]) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def _by_area(boxes: Sequence[Sequence[float]]) -> list[int]:
    """Indices of boxes by area, largest first (ties: reading order)."""
    order = _reading_order(boxes)
    return sorted(order, key=lambda i: -_area(boxes[i]))


def kind_phrase(kind: str) -> str:
    """The phrase of a defect kind (:data:`KIND_PHRASES`), the name itself for other classes."""
    return KIND_PHRASES.get(kind, kind)


def inspection_caption(category: str | None, kinds: Sequence[str], boxes: Sequence[Sequence[float]], width: int,
                       height: int, grounded: bool = False) -> str:
    """The caption of an inspection image: surface word, then every defect instance with its location.

    ``a {surface} surface with {a kind phrase} in the {location}[, ... and ...]`` listing the instances in reading
    order of their box centres (top to bottom, then left to right), or ``a defect-free {surface} surface``. The
    surface word is :data:`CATEGORY_WORDS` of the category (the category itself when unknown to it); without a
    category the caption says ``a surface``. ``grounded=True`` makes MiniGPT-v2's grounded caption: each defect
    phrase becomes ``<p>a crack</p> {box}``.

    Example:
        >>> inspection_caption("ihc", ["stain", "crack"], [(80, 90, 120, 120), (0, 0, 20, 20)], 128, 128)
        'a tissue surface with a crack in the upper left and a stain in the lower right'
        >>> inspection_caption("grass", [], [], 128, 128)
        'a defect-free grass surface'
        >>> inspection_caption("brick", ["hole"], [(0, 0, 64, 64)], 128, 128, grounded=True)
        'a brick surface with <p>a hole</p> {<0><0><50><50>} in the upper left'
    """
    surface = f"{CATEGORY_WORDS.get(category, category)} surface" if category else "surface"
    if not len(kinds):
        return f"a defect-free {surface}"
    parts = []
    for i in _reading_order(boxes):
        phrase = _article(kind_phrase(kinds[i]))
        if grounded:
            phrase = f"<p>{phrase}</p> {_box_text(boxes[i], width, height)}"
        parts.append(f"{phrase} in the {location_word(boxes[i], width, height)}")
    return f"{_article(surface)} with {_listing(parts)}"


def tree_caption(count: int) -> str:
    """``aerial view with N trees`` (``1 tree``, ``no trees``).

    >>> tree_caption(12), tree_caption(1), tree_caption(0)
    ('aerial view with 12 trees', 'aerial view with 1 tree', 'aerial view with no trees')
    """
    if count == 0:
        return "aerial view with no trees"
    return f"aerial view with {count} tree{'' if count == 1 else 's'}"


def detection_answer(phrase: str, boxes: Sequence[Sequence[float]], width: int, height: int) -> str:
    """``<p>phrase</p> {box}<delim>{box}...`` in the given order (MiniGPT-v2's phrase-to-boxes answer).

    >>> detection_answer("crack", [(0, 0, 64, 64), (64, 64, 128, 128)], 128, 128)
    '<p>crack</p> {<0><0><50><50>}<delim>{<50><50><100><100>}'
    """
    return f"<p>{phrase}</p> " + BOX_SEPARATOR.join(_box_text(b, width, height) for b in boxes)


# ----------------------------------------------------------------------------------------------- generators
class _Maker:
    """Makes the instructions of one sample: picks phrasings, fills the common fields."""

    def __init__(self, templates: dict[str, tuple[str, ...]], rng: random.Random, vary: bool, source: str,
                 tasks: Sequence[str]) -> None:
        self.templates, self.rng, self.vary, self.source, self.tasks = templates, rng, vary, source, set(tasks)
        self.out: list[Instruction] = []

    def add(self, s: Any, name: str, answer: str, fill: str = "", boxes: Sequence[Sequence[float]] = (),
            label: str = "", ignore: Sequence[Sequence[float]] = ()) -> None:
        task, _, qtype = name.partition("/")
        if task not in self.tasks:
            return
        pool = self.templates[name]
        text = self.rng.choice(pool) if self.vary else pool[0]
        self.out.append(Instruction(s.image, s.window, s.width, s.height, task, text.format(fill) if fill else text,
                                    answer, qtype or task, [tuple(map(float, b)) for b in boxes], label,
                                    self.source, [tuple(map(float, b)) for b in ignore]))


def _check_tasks(tasks: Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(allowed) if tasks is None else tuple(tasks)
    bad = [t for t in tasks if t not in allowed]
    if bad:
        raise ConfigError(f"unknown or unsupported task(s) {bad}; choose from {', '.join(allowed)}")
    return tasks


def _inspection_sample(make: _Maker, s: Any, class_names: Sequence[str]) -> None:
    w, h = s.width, s.height
    boxes = [tuple(float(v) for v in b) for b in s.boxes]
    kinds = [class_names[int(k)] for k in s.labels]
    cat = s.group
    make.add(s, "caption", inspection_caption(cat, kinds, boxes, w, h), label=cat)
    order = _reading_order(boxes)
    make.add(s, "grounding", inspection_caption(cat, kinds, boxes, w, h, grounded=True),
             boxes=[boxes[i] for i in order], label=cat)
    make.add(s, "vqa/defect", "yes" if boxes else "no")
    if kinds and len(set(kinds)) == 1:
        make.add(s, "vqa/kind", kind_phrase(kinds[0]), label=kinds[0])
    make.add(s, "vqa/count", str(len(boxes)))
    make.add(s, "vqa/category", CATEGORY_WORDS.get(cat, cat), label=cat)
    counts = Counter(kinds)
    present = sorted(counts, key=class_names.index)
    for kind in present:
        if counts[kind] == 1:
            box = boxes[kinds.index(kind)]
            make.add(s, "refer", _box_text(box, w, h), fill=f"the {kind_phrase(kind)}", boxes=[box], label=kind)
    texts = [_box_text(b, w, h) for b in boxes]
    for i in order:
        if any(texts[j] == texts[i] and kinds[j] != kinds[i] for j in range(len(boxes))):
            continue  # the box text cannot say which of two kinds is meant
        make.add(s, "identify", kind_phrase(kinds[i]), fill=texts[i], boxes=[boxes[i]], label=kinds[i])
    for kind in present:
        mine = [boxes[i] for i in range(len(boxes)) if kinds[i] == kind]
        mine = [mine[i] for i in _by_area(mine)]
        make.add(s, "detection", detection_answer(kind_phrase(kind), mine, w, h), fill=kind_phrase(kind),
                 boxes=mine, label=kind)


def inspection_instructions(split: str = "train", seed: int = 0, categories: str | Sequence[str] | None = None,
                            tasks: Sequence[str] | None = None, boxset: Any = None, vary: bool | None = None,
                            **boxset_kwargs: Any) -> list[Instruction]:
    """Instructions of every task from the bundled defect boxes (rules in the module docstring).

    Args:
        split: ``train`` or ``test`` (:func:`~frugalvision.detect.datasets.defect_boxset`'s splits; the test split
            holds only the benchmark's held-out test tiles).
        seed: Seed of the phrasing draws (train).
        categories: Benchmark categories; all when omitted.
        tasks: Subset of :data:`TASKS`; all when omitted.
        boxset: A :class:`~frugalvision.data.detection.BoxSet` to use instead of building ``defect_boxset(split,
            categories, **boxset_kwargs)``; every sample's ``group`` must be its category.
        vary: Draw phrasings from :data:`INSPECTION_TEMPLATES` (default: only for ``train``); else the first.
        **boxset_kwargs: Passed to ``defect_boxset`` (``tiles``, ``test_good``, ...).

    Returns:
        The instructions, sample by sample in the order of :data:`TASKS`.

    Example:
        >>> insts = inspection_instructions("test", categories="brick", tasks=["vqa"])
        >>> insts[0].instruction, insts[0].answer
        ('[vqa] is there a defect on this surface?', 'yes')
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    tasks = _check_tasks(tasks, TASKS)
    if boxset is None:
        from ..detect.datasets import defect_boxset

        boxset = defect_boxset(split, categories=categories, **boxset_kwargs)
    make = _Maker(INSPECTION_TEMPLATES, random.Random(seed), split == "train" if vary is None else vary,
                  "inspection", tasks)
    for s in boxset.samples:
        _inspection_sample(make, s, boxset.class_names)
    return make.out


def _tree_sample(make: _Maker, s: Any, max_boxes: int) -> None:
    w, h = s.width, s.height
    boxes = [tuple(float(v) for v in b) for b in s.boxes]
    make.add(s, "caption", tree_caption(len(boxes)))
    make.add(s, "vqa/count", str(len(boxes)))
    if not boxes:
        return
    order = _by_area(boxes)
    largest = boxes[order[0]]
    if len(boxes) == 1 or _area(largest) >= LARGEST_MARGIN * _area(boxes[order[1]]):
        make.add(s, "refer", _box_text(largest, w, h), fill="the largest tree", boxes=[largest], label="tree")
    listed = [boxes[i] for i in order[:max_boxes]]
    make.add(s, "detection", detection_answer("tree", listed, w, h), fill="tree", boxes=listed, label="tree",
             ignore=[boxes[i] for i in order[max_boxes:]])


def tree_instructions(split: str = "train", tile: int = 400, seed: int = 0, fraction: float = 0.7,
                      overlap: int | float = 0, max_boxes: int = 30, tasks: Sequence[str] | None = None,
                      boxset: Any = None, vary: bool | None = None) -> list[Instruction]:
    """Instructions from the deepforest aerial tree images: region split, then tiles (rules in the module docstring).

    Args:
        split: ``train`` (the first ``fraction`` of each image's height) or ``test`` (the rest); no pixel is in
            both.
        tile: Tile side in pixels (:func:`~frugalvision.data.detection.tile_boxset`; a region smaller than it is
            one sample).
        seed: Seed of the phrasing draws (train).
        fraction: Train share of each image's height.
        overlap: Overlap of neighbouring tiles inside a region (pixels, or a fraction of ``tile``).
        max_boxes: Most boxes listed in a ``[detection]`` answer: the largest ones; the rest go to ``ignore``.
        tasks: Subset of ``caption``, ``vqa``, ``refer``, ``detection``; all when omitted.
        boxset: Whole images to use instead of :func:`~frugalvision.data.detection.load_deepforest`.
        vary: Draw phrasings from :data:`TREE_TEMPLATES` (default: only for ``train``); else the first.

    Raises:
        MissingDependencyError: If ``boxset`` is not given and the ``deepforest`` wheel is not installed.
    """
    from ..data.detection import load_deepforest, split_by_region, tile_boxset

    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if max_boxes < 1:
        raise ConfigError(f"max_boxes must be >= 1, got {max_boxes}")
    tasks = _check_tasks(tasks, ("caption", "vqa", "refer", "detection"))
    whole = boxset if boxset is not None else load_deepforest()
    train, test = split_by_region(whole, fraction)
    tiles = tile_boxset(train if split == "train" else test, tile, overlap)
    make = _Maker(TREE_TEMPLATES, random.Random(seed), split == "train" if vary is None else vary, "trees", tasks)
    for s in tiles.samples:
        _tree_sample(make, s, max_boxes)
    return make.out

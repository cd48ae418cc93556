"""Scores of a model's answers (strings) to instructions, and the "detector + templates" baseline.

The instructions are :class:`~frugalvision.language.instructions.Instruction` s.

Rules (one answer per instruction; ``None`` counts as the empty answer):

- **Boxes in answers** are read as ``eval_scripts/eval_ref.py`` of MiniGPT-v2 does: ``<unk>`` and spaces removed,
  then the official regex (:data:`~frugalvision.language.instructions.BOX_PATTERN`); bins ``b`` become pixels
  ``b * size / 100``. IoU is the continuous-pixel IoU against the target box in pixels (the official script adds
  1 px to each side, which inflates small boxes' IoU). After the 1/100 rounding a perfect answer's box keeps IoU
  >= 0.77 on the inspection set and >= 0.58 on the 400 px tree tiles, so perfect answers score 1.
- **[refer]** is right when the first box of the answer has IoU > 0.5 with the target; an answer without a box is
  *malformed* (and wrong).
- **[vqa]** and **[identify]** are exact matches after :func:`normalize_answer` (lowercase, ``<unk>`` and
  punctuation removed, articles ``a an the`` dropped, number words to digits, ``center``/``colour`` spellings
  unified). The target's class name (``label``) is accepted too where it names the answer (``identify``, ``kind``,
  ``category``: ``missing`` for ``missing area``, ``ihc`` for ``tissue``). An empty answer is malformed; a
  ``count`` answer without a number is malformed, and ``count_mae`` is the mean absolute error of the first number
  of the others.
- **[detection]** is scored by COCO AP at IoU 0.5 (``pycocotools`` through
  :func:`~frugalvision.detect.coco_eval.coco_metrics`) over all detection instructions: each instruction is one
  COCO image (its phrase is given, as in MiniGPT-v2's ``[detection]`` data), its category is ``(source, label)``,
  its targets are :attr:`Instruction.boxes` and its :attr:`Instruction.ignore` boxes are ``iscrowd`` regions. The
  boxes of an answer carry no scores: the ``k``-th box (``k = 0, 1, ...``) gets score ``1 / (k + 1)``, so order
  within an answer ranks them, and ties across answers keep instruction order (COCOeval's stable sort); at most
  100 boxes per answer count (COCO's ``maxDets``). An answer without a box is malformed.
- **[caption]** of an inspection image is parsed into defect mentions: each occurrence of a kind phrase
  (:data:`~frugalvision.language.instructions.KIND_PHRASES`) or kind name, with the first location word
  (:data:`~frugalvision.language.instructions.LOCATIONS`, ``center`` accepted) between it and the next mention.
  ``kinds`` is right when the set of mentioned kinds equals the target's (a defect-free target needs no mention);
  ``locations`` when the multiset of ``(kind, location)`` pairs equals the target's; ``acc`` needs both.
  ``category`` (reported apart) is right when the first surface word named in the answer is the target's. A tree
  caption is right when its first number (``no trees`` = 0) is the target count (reported as ``count`` and
  ``acc``). An empty answer is malformed.
- **[grounding]** is right when the text without ``<p>``, ``</p>``, boxes and ``<delim>`` passes the caption rule and
  the ``(kind, box)`` pairs of the answer (``<p>phrase</p> {box}<delim>{box}``) match the target's one to one
  (same kind, IoU > 0.5, greedy in target order) with none left over; ``box_recall`` is the share of target boxes
  matched. An answer without a pair is malformed when the target has boxes.

``score_answers`` returns ``{task: {metric: value}}`` with ``n`` per task (rates in ``[0, 1]``, AP50 too) and
``all`` with the total count and malformed rate; :func:`format_table` prints one or several of them as Markdown.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .boxes import parse_boxes
from .instructions import (
    CATEGORY_WORDS,
    KIND_PHRASES,
    LOCATIONS,
    Instruction,
    _box_text,
    detection_answer,
    inspection_caption,
    kind_phrase,
    tree_caption,
)

__all__ = [
    "box_iou",
    "format_table",
    "normalize_answer",
    "parse_caption",
    "predictions_from_boxset",
    "score_answers",
    "template_answers",
]

_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_TENS = {w: 10 * i for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                                          "ninety"], 2)}
_SPELLING = {"center": "centre", "colour": "color", "middle": "centre"}
_ARTICLES = {"a", "an", "the"}
_PAIR_RE = re.compile(r"<p>\s*(.*?)\s*</p>\s*((?:\{[\s<>\d]*\}\s*(?:<delim>\s*)?)+)")
Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------- text
def normalize_answer(text: str | None) -> str:
    """Lowercase, drop ``<unk>``, punctuation and articles, number words to digits, unify spellings.

    >>> normalize_answer("Twenty-three trees."), normalize_answer("A crack!"), normalize_answer("The Center")
    ('23 trees', 'crack', 'centre')
    """
    words = re.sub(r"[^\w\s]|_", " ", (text or "").lower().replace("<unk>", " ")).split()
    out: list[str] = []
    for w in words:
        w = _SPELLING.get(w, w)
        if w in _ARTICLES:
            continue
        if w in _NUMBERS:
            unit = int(_NUMBERS[w])
            if out and out[-1].isdigit() and int(out[-1]) % 10 == 0 and int(out[-1]) >= 20 and 0 < unit < 10:
                out[-1] = str(int(out[-1]) + unit)  # twenty three
                continue
            w = _NUMBERS[w]
        elif w in _TENS:
            w = str(_TENS[w])
        out.append(w)
    return " ".join(out)


def _first_number(text: str, no_is_zero: bool = False) -> int | None:
    m = re.search(r"\b\d+\b", normalize_answer(text))
    if m:
        return int(m.group())
    return 0 if no_is_zero and re.search(r"\bno\b", normalize_answer(text)) else None


def _kind_names() -> dict[str, str]:
    """Normalised phrase or name → kind, longest first."""
    names = {normalize_answer(p): k for k, p in KIND_PHRASES.items()}
    names.update({normalize_answer(k): k for k in KIND_PHRASES})
    return dict(sorted(names.items(), key=lambda kv: -len(kv[0])))


_KINDS = _kind_names()
_KIND_RE = re.compile(r"\b(" + "|".join(re.escape(n) for n in _KINDS) + r")\b")
_LOC_RE = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(LOCATIONS, key=len, reverse=True)) + r")\b")
_SURFACES = {normalize_answer(w): c for c, w in CATEGORY_WORDS.items()} | {c: c for c in CATEGORY_WORDS}
_SURFACE_RE = re.compile(r"\b(" + "|".join(re.escape(n) for n in _SURFACES) + r")\b")


def parse_caption(text: str | None) -> tuple[list[tuple[str, str]], str | None]:
    """The ``(kind, location)`` mentions and the category of an inspection caption (rules: module docstring).

    The location of a mention is ``""`` when none is named before the next mention.

    >>> parse_caption("a brick surface with a crack in the upper left and a color defect in the center")
    ([('crack', 'upper left'), ('color', 'centre')], 'brick')
    >>> parse_caption("A defect-free tissue surface.")
    ([], 'ihc')
    """
    t = normalize_answer(text)
    mentions = list(_KIND_RE.finditer(t))
    out = []
    for i, m in enumerate(mentions):
        end = mentions[i + 1].start() if i + 1 < len(mentions) else len(t)
        loc = _LOC_RE.search(t, m.end(), end)
        out.append((_KINDS[m.group(1)], loc.group(1) if loc else ""))
    surface = _SURFACE_RE.search(t)
    return out, (_SURFACES[surface.group(1)] if surface else None)


def _strip_grounding(text: str) -> str:
    text = re.sub(r"\{[\s<>\d]*\}|<delim>|</?p>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _answer_boxes(answer: str | None, width: int, height: int) -> list[Box]:
    clean = (answer or "").replace("<unk>", "").replace(" ", "")
    return parse_boxes(clean, width, height).boxes


def _pairs(answer: str | None, width: int, height: int) -> list[tuple[str, Box]]:
    """``(kind, box)`` of every ``<p>phrase</p> {box}<delim>{box}`` group (phrases naming no kind are skipped)."""
    out = []
    for m in _PAIR_RE.finditer(answer or ""):
        kinds = _KIND_RE.findall(normalize_answer(m.group(1)))
        kind = _KINDS[kinds[0]] if kinds else normalize_answer(m.group(1))
        out += [(kind, b) for b in _answer_boxes(m.group(2), width, height)]
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``xyxy`` boxes in continuous coordinates (0 for empty boxes).

    >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))
    0.3333333333333333
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 and inter > 0 else 0.0


# ----------------------------------------------------------------------------------------------- per task
def _caption_marks(inst: Instruction, answer: str) -> dict[str, bool]:
    if inst.source == "trees":
        right = _first_number(answer, no_is_zero=True) == _first_number(inst.answer, no_is_zero=True)
        return {"acc": right, "count": right}
    got, cat = parse_caption(answer)
    want, want_cat = parse_caption(inst.answer)
    kinds = {k for k, _ in got} == {k for k, _ in want}
    locations = Counter(got) == Counter(want)
    return {"acc": kinds and locations, "kinds": kinds, "locations": locations, "category": cat == want_cat}


def _grounding_marks(inst: Instruction, answer: str) -> tuple[dict[str, bool | float], bool]:
    text = _caption_marks(inst, _strip_grounding(answer))
    target_kinds = [k for k, _ in parse_caption(_strip_grounding(inst.answer))[0]]
    want = list(zip(target_kinds, inst.boxes, strict=False))
    got = _pairs(answer, inst.width, inst.height)
    free = list(range(len(got)))
    hits = 0
    for kind, box in want:
        j = next((j for j in free if got[j][0] == kind and box_iou(got[j][1], box) > 0.5), None)
        if j is not None:
            free.remove(j)
            hits += 1
    boxes_right = hits == len(want) and not free
    marks = {"acc": bool(text["acc"]) and boxes_right,
             "box_recall": hits / len(want) if want else float(not got)}
    return marks, bool(want) and not got


def _vqa_right(inst: Instruction, answer: str) -> bool:
    got = normalize_answer(answer)
    accepted = {normalize_answer(inst.answer)}
    if inst.label and inst.qtype in ("kind", "category", "identify"):
        accepted.add(normalize_answer(inst.label))
    return got in accepted


def _detection_ap50(items: list[tuple[Instruction, list[Box]]]) -> float:
    from ..detect.coco_eval import coco_metrics

    cats = sorted({(inst.source, inst.label) for inst, _ in items})
    cat_id = {c: k for k, c in enumerate(cats, 1)}
    images, anns, preds = [], [], []
    for i, (inst, boxes) in enumerate(items, 1):
        images.append({"id": i, "width": inst.width, "height": inst.height})
        c = cat_id[(inst.source, inst.label)]
        for crowd, group in ((0, inst.boxes), (1, inst.ignore)):
            anns += [{"image_id": i, "category_id": c, "iscrowd": crowd,
                      "bbox": [x1, y1, x2 - x1, y2 - y1]} for x1, y1, x2, y2 in group]
        preds += [{"image_id": i, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0 / (k + 1)}
                  for k, (x1, y1, x2, y2) in enumerate(boxes[:100])]
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": cat_id[c], "name": f"{c[0]}/{c[1]}"} for c in cats]}
    ap50 = coco_metrics(gt, preds)["AP50"]
    return 0.0 if math.isnan(ap50) else ap50 / 100.0


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def score_answers(instructions: Sequence[Instruction], answers: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """Score one answer per instruction (rules in the module docstring).

    Args:
        instructions: The instructions (any mix of tasks; score each source apart to keep AP50 per source).
        answers: The model's answers, aligned with ``instructions``.

    Returns:
        ``{"all": {"n", "malformed"}, "refer": {"n", "acc", "malformed"}, "identify": {"n", "acc", "malformed"},
        "vqa": {"n", "acc", "malformed", "acc/<qtype>", "n/<qtype>", "count_mae"}, "detection": {"n", "ap50",
        "malformed"}, "caption": {"n", "acc", "malformed", "kinds", "locations", "category", "count"},
        "grounding": {"n", "acc", "box_recall", "malformed"}}``; a task without instructions is left out, and so
        is a metric without its instructions (``kinds`` without inspection captions, ...).

    Raises:
        DataError: If there are not as many answers as instructions.

    Example:
        >>> inst = Instruction("a.png", None, 100, 100, "refer", "[refer] the crack", "{<10><10><30><30>}",
        ...                    boxes=[(10, 10, 30, 30)], label="crack")
        >>> score_answers([inst, inst], ["{<10><10><30><31>}", "somewhere"])["refer"]
        {'n': 2, 'acc': 0.5, 'malformed': 0.5}
    """
    if len(instructions) != len(answers):
        raise DataError(f"{len(answers)} answers for {len(instructions)} instructions; give one answer per "
                        "instruction (None for no answer)")
    marks: dict[str, dict[str, list[float]]] = {}
    malformed: dict[str, list[bool]] = {}
    detections: list[tuple[Instruction, list[Box]]] = []
    for inst, raw in zip(instructions, answers, strict=True):
        answer = raw or ""
        task = inst.task
        m = marks.setdefault(task, {})
        bad = not normalize_answer(answer)
        if task == "refer":
            boxes = _answer_boxes(answer, inst.width, inst.height)
            bad = not boxes
            m.setdefault("acc", []).append(bool(boxes) and box_iou(boxes[0], inst.boxes[0]) > 0.5)
        elif task in ("identify", "vqa"):
            right = _vqa_right(inst, answer)
            m.setdefault("acc", []).append(right)
            if task == "vqa":
                m.setdefault(f"acc/{inst.qtype}", []).append(right)
                if inst.qtype == "count":
                    got = _first_number(answer)
                    bad = got is None
                    if got is not None:
                        m.setdefault("count_mae", []).append(abs(got - int(inst.answer)))
        elif task == "detection":
            boxes = _answer_boxes(answer, inst.width, inst.height)
            bad = not boxes
            detections.append((inst, boxes))
        elif task == "caption":
            for k, v in _caption_marks(inst, answer).items():
                m.setdefault(k, []).append(v)
        elif task == "grounding":
            g, bad_pairs = _grounding_marks(inst, answer)
            bad = bad or bad_pairs
            for k, v in g.items():
                m.setdefault(k, []).append(v)
        malformed.setdefault(task, []).append(bad)
    out: dict[str, dict[str, Any]] = {"all": {"n": len(instructions),
                                              "malformed": _mean([b for v in malformed.values() for b in v])}}
    for task in ("refer", "identify", "vqa", "detection", "caption", "grounding"):
        if task not in malformed:
            continue
        res: dict[str, Any] = {"n": len(malformed[task])}
        if task == "detection":
            res["ap50"] = _detection_ap50(detections)
        for k in ("acc", "box_recall", "kinds", "locations", "category", "count"):
            if k in marks[task]:
                res[k] = _mean(marks[task][k])
        res["malformed"] = _mean(malformed[task])
        for k in sorted(marks[task]):
            if k.startswith("acc/"):
                res[k] = _mean(marks[task][k])
                res["n/" + k[4:]] = len(marks[task][k])
        if "count_mae" in marks[task]:
            res["count_mae"] = _mean(marks[task]["count_mae"])
        out[task] = res
    return out


# ----------------------------------------------------------------------------------------------- table
_NOT_RATES = {"n", "count_mae"}


def format_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`score_answers` results: one row per (task, metric), one column per system.

    Args:
        results: One ``score_answers`` result, or ``{system name: result}`` for a comparison.

    Rates and AP50 are printed in percent with one decimal, ``count_mae`` with two, a missing value as ``–``; the
    ``n`` column is the first system's (per question type for ``acc/<qtype>`` and ``count_mae``).

    Example:
        >>> print(format_table({"all": {"n": 2, "malformed": 0.5}, "refer": {"n": 2, "acc": 0.5, "malformed": 0.5}}))
        | task | metric | n | result |
        |---|---|---:|---:|
        | refer | acc | 2 | 50.0 |
        | refer | malformed | 2 | 50.0 |
        | all | malformed | 2 | 50.0 |
    """
    systems = {"result": results} if "all" in results else dict(results)
    if not systems or not all(isinstance(r, Mapping) and "all" in r for r in systems.values()):
        raise ConfigError("format_table needs a score_answers result or a {name: result} mapping of them")
    rows: list[tuple[str, str]] = []
    for r in systems.values():
        for task, metrics in r.items():
            if task == "all":
                continue
            for k in metrics:
                if k != "n" and not k.startswith("n/") and (task, k) not in rows:
                    rows.append((task, k))
    rows.append(("all", "malformed"))
    first = next(iter(systems.values()))
    lines = ["| task | metric | n | " + " | ".join(systems) + " |", "|---|---|---:|" + "---:|" * len(systems)]
    for task, k in rows:
        part = first.get(task, {})
        sub = k[4:] if k.startswith("acc/") else "count" if k == "count_mae" else ""
        n = part.get("n/" + sub, part.get("n", ""))
        cells = []
        for r in systems.values():
            v = r.get(task, {}).get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            elif k in _NOT_RATES:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{100 * v:.1f}")
        lines.append(f"| {task} | {k} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- baseline
Prediction = tuple[Any, Any, Any]


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def predictions_from_boxset(boxset: Any, scores: float = 1.0) -> dict[str, Prediction]:
    """Ground truth of a :class:`~frugalvision.data.detection.BoxSet` as :func:`template_answers` predictions.

    Returns:
        ``{image_key: (boxes (N, 4) pixels, class names, scores)}`` with every score ``scores``.
    """
    from .instructions import image_key

    return {image_key(s.image, s.window): (s.boxes.copy(), [boxset.class_names[int(k)] for k in s.labels],
                                           np.full(len(s.boxes), float(scores))) for s in boxset.samples}


def _kept(pred: Prediction | None, class_names: Sequence[str] | None, threshold: float
          ) -> tuple[list[Box], list[str], list[float]]:
    """Predictions at or above the threshold, by descending score (stable), labels as lowercase names."""
    if pred is None:
        return [], [], []
    boxes = _numpy(pred[0]).astype(np.float64).reshape(-1, 4)
    labels = list(pred[1].tolist() if hasattr(pred[1], "tolist") else pred[1])
    scores = _numpy(pred[2]).astype(np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise DataError(f"a prediction has {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores; give "
                        "one of each per detection")
    names = []
    for lab in labels:
        if isinstance(lab, str):
            names.append(lab.lower())
        elif class_names is None:
            raise ConfigError("predictions with integer labels need class_names to name them")
        else:
            names.append(str(class_names[int(lab)]).lower())
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= threshold]
    return ([tuple(float(v) for v in boxes[i]) for i in order], [names[i] for i in order],  # type: ignore[misc]
            [float(scores[i]) for i in order])


def template_answers(instructions: Sequence[Instruction], predictions: Mapping[str, Prediction],
                     categories: Mapping[str, str] | None = None, class_names: Sequence[str] | None = None,
                     score_threshold: float = 0.5, max_boxes: int = 100) -> list[str]:
    """The answers a perfect language formatter would give from a detector's output: "detector + templates".

    Args:
        instructions: The instructions to answer.
        predictions: ``{image_key: (boxes, labels, scores)}`` per sample (:attr:`Instruction.key`): ``xyxy`` pixel
            boxes ``(K, 4)`` of the sample, labels (class names, or indices into ``class_names``), scores
            ``(K,)``; arrays, tensors or lists. A missing key means no detections.
        categories: ``{image_key: category}`` (e.g. from an image classifier) for the captions and the category
            question; without one the caption says ``a surface`` and the answer is ``unknown``.
        class_names: Names of integer labels.
        score_threshold: Detections below it are not used at all.
        max_boxes: Most boxes listed in a ``[detection]`` answer.

    Returns:
        One answer per instruction. From the kept detections, by descending score: ``refer`` the box of the best
        detection of the kind (trees: the largest box); ``identify`` the kind of the detection with the highest
        IoU with the queried box (``""`` when none overlaps); ``detection`` the boxes of that kind by score;
        ``vqa`` defect yes/no (any detection), kind (of the best detection), count (number of detections of the
        source's classes), category (from ``categories``); ``caption``/``grounding`` the captions of
        :func:`~frugalvision.language.instructions.inspection_caption` /
        :func:`~frugalvision.language.instructions.tree_caption` built from the detections. Where nothing is
        detected, ``refer`` and ``detection`` answer ``""`` (malformed).

    Example:
        >>> inst = Instruction("a.png", None, 100, 100, "refer", "[refer] the crack", "{<10><10><30><30>}",
        ...                    boxes=[(10, 10, 30, 30)], label="crack", source="inspection")
        >>> template_answers([inst], {"a.png": ([[10, 10, 30, 30], [0, 0, 5, 5]], ["crack", "hole"], [0.9, 0.8])})
        ['{<10><10><30><30>}']
    """
    categories = categories or {}
    out = []
    for inst in instructions:
        boxes, names, _ = _kept(predictions.get(inst.key), class_names, score_threshold)
        trees = inst.source == "trees"
        if trees:  # one class: every detection is a tree
            names = ["tree"] * len(boxes)
        w, h, label = inst.width, inst.height, inst.label.lower()
        answer = ""
        if inst.task == "refer":
            if trees and boxes:
                answer = _box_text(max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])), w, h)
            else:
                answer = next((_box_text(b, w, h) for b, n in zip(boxes, names, strict=True) if n == label), "")
        elif inst.task == "identify":
            ious = [box_iou(b, inst.boxes[0]) for b in boxes]
            if ious and max(ious) > 0:
                answer = kind_phrase(names[int(np.argmax(ious))])
        elif inst.task == "detection":
            mine = [b for b, n in zip(boxes, names, strict=True) if n == label][:max_boxes]
            answer = detection_answer(kind_phrase(label), mine, w, h) if mine else ""
        elif inst.task == "vqa":
            if inst.qtype == "defect":
                answer = "yes" if boxes else "no"
            elif inst.qtype == "kind":
                answer = kind_phrase(names[0]) if names else "none"
            elif inst.qtype == "count":
                answer = str(len(boxes))
            elif inst.qtype == "category":
                cat = categories.get(inst.key)
                answer = CATEGORY_WORDS.get(cat, cat) if cat else "unknown"
        elif inst.task in ("caption", "grounding"):
            if trees:
                answer = tree_caption(len(boxes))
            else:
                answer = inspection_caption(categories.get(inst.key), names, boxes, w, h,
                                            grounded=inst.task == "grounding")
        out.append(answer)
    return out

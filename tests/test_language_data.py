"""MiniGPT-v2-style instruction data (inspection defects, aerial trees): JSONL files, metrics, template baseline."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from frugalvision.data.detection import load_deepforest, split_by_region, tile_boxset
from frugalvision.detect.datasets import defect_boxset
from frugalvision.errors import DataError, MissingDependencyError
from frugalvision.language.instructions import (
    BOX_SEPARATOR,
    INSPECTION_TEMPLATES,
    LOCATIONS,
    TASKS,
    TREE_TEMPLATES,
    _from_bins,
    _parse,
    image_key,
    inspection_instructions,
    load_jsonl,
    save_jsonl,
    tree_instructions,
)
from frugalvision.language.metrics import (
    box_iou,
    format_table,
    normalize_answer,
    parse_caption,
    predictions_from_boxset,
    score_answers,
    template_answers,
)

TRAIN_CATS = ("brick", "grass")
TRAIN_TILES = 10


@pytest.fixture(scope="module")
def test_set():
    return defect_boxset("test")


@pytest.fixture(scope="module")
def test_insts(test_set):
    return inspection_instructions("test", boxset=test_set)


@pytest.fixture(scope="module")
def train_insts():
    return inspection_instructions("train", seed=3, categories=TRAIN_CATS, tiles=TRAIN_TILES)


@pytest.fixture(scope="module")
def trees():
    try:
        whole = load_deepforest()
    except MissingDependencyError:
        pytest.skip("the deepforest wheel (tree images) is not installed")
    return whole


@pytest.fixture(scope="module")
def tree_sets(trees):
    return {split: tree_instructions(split, seed=3, boxset=trees) for split in ("train", "test")}


def _answers(insts):
    return [i.answer for i in insts]


# ----------------------------------------------------------------------------------------------- generators
def test_every_task_and_question_type_is_made(test_insts, train_insts, tree_sets):
    for insts in (test_insts, train_insts):
        assert {i.task for i in insts} == set(TASKS)
        assert {i.qtype for i in insts if i.task == "vqa"} == {"defect", "kind", "count", "category"}
        assert {i.source for i in insts} == {"inspection"}
    for insts in tree_sets.values():
        assert {i.task for i in insts} == {"caption", "vqa", "refer", "detection"}
        assert {i.source for i in insts} == {"trees"}
    first = next(i for i in test_insts if i.task == "refer")
    assert first.prompt.startswith("<Img><ImageHere></Img> [refer] ")


def test_seeded_phrasings_are_deterministic_and_test_phrasing_is_fixed(train_insts, test_insts, tree_sets, trees):
    again = inspection_instructions("train", seed=3, categories=TRAIN_CATS, tiles=TRAIN_TILES)
    other = inspection_instructions("train", seed=4, categories=TRAIN_CATS, tiles=TRAIN_TILES)
    assert again == train_insts
    assert [i.answer for i in other] == _answers(train_insts)  # the seed changes phrasings only
    assert [i.instruction for i in other] != [i.instruction for i in train_insts]
    assert len({i.instruction for i in train_insts if i.qtype == "count"}) > 1  # phrasings vary in train
    for insts, templates in ((test_insts, INSPECTION_TEMPLATES), (tree_sets["test"], TREE_TEMPLATES)):
        for i in insts:
            name = f"vqa/{i.qtype}" if i.task == "vqa" else i.task
            first = templates[name][0]
            assert i.instruction.startswith(first.split("{}")[0]), (i.instruction, first)
    assert tree_instructions("train", seed=3, boxset=trees) == tree_sets["train"]


def test_test_images_are_held_out(test_insts, train_insts, tree_sets):
    assert not {i.image for i in test_insts} & {i.image for i in train_insts}
    # trees: the same photos, but train and test windows share no pixel
    train_windows = {(i.image, i.window) for i in tree_sets["train"]}
    test_windows = {(i.image, i.window) for i in tree_sets["test"]}
    assert train_windows and test_windows
    for image, (a0, b0, a1, b1) in test_windows:
        for other, (c0, d0, c1, d1) in train_windows:
            if other == image:
                assert min(a1, c1) <= max(a0, c0) or min(b1, d1) <= max(b0, d0), (image, (a0, b0, a1, b1))


def _within_one_bin(got, want, width, height):
    sizes = (width, height, width, height)
    return all(abs(g - w) <= size / 100 for g, w, size in zip(got, want, sizes, strict=True))


def test_every_answer_parses_back_to_its_target(test_insts, train_insts, tree_sets):
    for insts in (test_insts, train_insts, tree_sets["train"], tree_sets["test"]):
        for i in insts:
            if i.task in ("refer", "detection", "grounding"):
                boxes = [_from_bins(b, i.width, i.height) for b in _parse(i.answer)]
                assert len(boxes) == len(i.boxes), i
                assert all(_within_one_bin(g, w, i.width, i.height) for g, w in zip(boxes, i.boxes, strict=True)), i
            if i.task == "identify":
                (got,) = [_from_bins(b, i.width, i.height) for b in _parse(i.instruction)]
                assert _within_one_bin(got, i.boxes[0], i.width, i.height)
            if i.task == "detection":
                assert i.answer.startswith("<p>") and i.answer.count(BOX_SEPARATOR) == len(i.boxes) - 1
                areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in i.boxes]
                assert areas == sorted(areas, reverse=True)  # largest first
            if i.task == "vqa" and i.qtype == "count":
                assert i.answer.isdigit()
            if i.task in ("caption", "grounding") and i.source == "inspection":
                mentions, category = parse_caption(i.answer)
                assert category == i.label
                assert all(loc in LOCATIONS for _, loc in mentions)
                assert len(mentions) == len(i.boxes) or i.task == "caption"


def test_inspection_answers_follow_the_boxes(test_set, test_insts):
    by_key = {image_key(s.image, s.window): s for s in test_set.samples}
    for i in test_insts:
        s = by_key[i.key]
        kinds = [test_set.class_names[k] for k in s.labels]
        if i.qtype == "count":
            assert int(i.answer) == len(s.boxes)
        elif i.qtype == "defect":
            assert i.answer == ("yes" if len(s.boxes) else "no")
        elif i.task == "refer":
            assert kinds.count(i.label) == 1
        elif i.qtype == "kind":
            assert set(kinds) == {i.label}
        elif i.task == "caption":
            assert ("defect-free" in i.answer) == (len(s.boxes) == 0)
            assert Counter(k for k, _ in parse_caption(i.answer)[0]) == Counter(kinds)


def test_tree_detection_cap_keeps_the_largest(trees):
    tiles = tile_boxset(split_by_region(trees, 0.7)[1], 400, 0)
    capped = tree_instructions("test", boxset=trees, max_boxes=5, tasks=["detection"])
    assert len(capped) == sum(len(s.boxes) > 0 for s in tiles.samples)
    for i, s in zip(capped, [s for s in tiles.samples if len(s.boxes)], strict=True):
        assert len(i.boxes) == min(5, len(s.boxes)) and len(i.boxes) + len(i.ignore) == len(s.boxes)
        if i.ignore:
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            assert min(map(area, i.boxes)) >= max(map(area, i.ignore))
    # the capped ground truth still scores AP50 = 1: the unlisted trees are ignored regions
    assert score_answers(capped, _answers(capped))["detection"]["ap50"] == 1.0


def test_vlm_tree_data_follows_the_tiling_config(trees, monkeypatch):
    import frugalvision.data.detection as det
    from frugalvision.pipelines.vlm import TREE_MAX_BOXES, TREE_TILE, VLMConfig, vlm_data

    monkeypatch.setattr(det, "load_deepforest", lambda: trees)  # the fixture's images, loaded once
    for tile, cap in ((0, 0), (300, 2)):
        cfg = VLMConfig(action=["test"], data="trees", tree_tile=tile, tree_max_boxes=cap)
        insts = vlm_data("trees", None, "test", cfg, ["caption", "detection"])
        want_tile, want_cap = tile or TREE_TILE, cap or TREE_MAX_BOXES
        assert max(max(i.width, i.height) for i in insts) == want_tile
        found = [i for i in insts if i.task == "detection"]
        assert max(len(i.boxes) for i in found) == want_cap and any(i.ignore for i in found)
        assert len([i for i in insts if i.task == "caption"]) == len(tile_boxset(split_by_region(trees, 0.7)[1],
                                                                                 want_tile, 0).samples)


# ----------------------------------------------------------------------------------------------- JSONL
def test_jsonl_round_trip_and_bad_lines(tmp_path, test_insts):
    path = save_jsonl(test_insts[:50], tmp_path / "test.jsonl")
    assert load_jsonl(path) == test_insts[:50]
    with pytest.raises(Exception, match="already exists"):
        save_jsonl(test_insts[:5], path)
    save_jsonl(test_insts[:5], path, overwrite=True)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and not list(tmp_path.glob(".*.tmp"))
    bad = dict(json.loads(lines[1]), width=-3)
    path.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl, line 2: 'width'"):
        load_jsonl(path)
    path.write_text("\n".join([lines[0], lines[1], '{"image": "a.png", "width": 3,', *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl, line 3: not valid JSON"):
        load_jsonl(path)
    path.write_text(lines[0] + "\n" + json.dumps(dict(json.loads(lines[1]), task="chat")) + "\n")
    with pytest.raises(DataError, match=r"line 2: task 'chat'"):
        load_jsonl(path)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------------------- metrics
def test_perfect_answers_score_one(test_insts, tree_sets):
    for insts in (test_insts, tree_sets["test"]):
        res = score_answers(insts, _answers(insts))
        assert res["all"]["malformed"] == 0.0
        for task, metrics in res.items():
            for k, v in metrics.items():
                if k == "count_mae":
                    assert v == 0.0
                elif not k.startswith("n") and k != "malformed":
                    assert v == 1.0, (task, k, v)
    assert score_answers(test_insts, _answers(test_insts))["detection"]["ap50"] == 1.0


def test_normalisation_keeps_right_answers_right(test_insts):
    vqa = [i for i in test_insts if i.task == "vqa"][:40]
    words = {"0": "zero", "1": "One", "2": "two"}
    loud = [f"The {words.get(i.answer, i.answer).upper()}." for i in vqa]
    assert score_answers(vqa, loud)["vqa"]["acc"] == 1.0
    assert normalize_answer("Twenty-one") == "21"
    kinds = [i for i in test_insts if i.qtype == "kind"]
    assert score_answers(kinds, [i.label for i in kinds])["vqa"]["acc"] == 1.0  # class names are accepted too


def test_wrong_and_malformed_answers_drop_the_scores(test_insts):
    refer = [i for i in test_insts if i.task == "refer"]
    # a box of another image: right only where it happens to overlap the target enough
    shifted = [refer[(k + 1) % len(refer)].answer for k in range(len(refer))]
    expect = np.mean([box_iou(_from_bins(_parse(a)[0], i.width, i.height), i.boxes[0]) > 0.5
                      for i, a in zip(refer, shifted, strict=True)])
    res = score_answers(refer, shifted)["refer"]
    assert res["acc"] == pytest.approx(expect) and res["acc"] < 1 and res["malformed"] == 0
    k = len(refer) // 3
    res = score_answers(refer, ["in the middle"] * k + _answers(refer)[k:])["refer"]
    assert res["acc"] == pytest.approx(1 - k / len(refer)) and res["malformed"] == pytest.approx(k / len(refer))

    vqa = [i for i in test_insts if i.task == "vqa"]
    flipped = [{"yes": "no", "no": "yes"}.get(i.answer, i.answer) for i in vqa]
    res = score_answers(vqa, flipped)["vqa"]
    assert res["acc/defect"] == 0.0 and res["acc/count"] == 1.0
    counts = [i for i in vqa if i.qtype == "count"]
    res = score_answers(counts, [str(int(i.answer) + 2) for i in counts])["vqa"]
    assert res["acc"] == 0.0 and res["count_mae"] == 2.0

    identify = [i for i in test_insts if i.task == "identify"]
    assert score_answers(identify, ["banana"] * len(identify))["identify"]["acc"] == 0.0

    det = [i for i in test_insts if i.task == "detection"]
    half = len(det) // 2
    res = score_answers(det, [""] * half + _answers(det)[half:])["detection"]
    assert res["malformed"] == pytest.approx(half / len(det)) and 0 < res["ap50"] < 1
    # every answer shifted by half its box: all false positives
    moved = [f"<p>{i.label}</p> " + "".join(
        f"{{<{min(100, x2)}><{min(100, y2)}><{min(100, 2 * x2 - x1)}><{min(100, 2 * y2 - y1)}>}}"
        for x1, y1, x2, y2 in _parse(i.answer)) for i in det]
    assert score_answers(det, moved)["detection"]["ap50"] == 0.0

    caps = [i for i in test_insts if i.task == "caption"]
    other = {f"in the {loc}": f"in the {LOCATIONS[(k + 1) % len(LOCATIONS)]}" for k, loc in enumerate(LOCATIONS)}
    loc_re = re.compile("|".join(sorted(other, key=len, reverse=True)))
    wrong = [loc_re.sub(lambda m: other[m.group()], i.answer) for i in caps]
    defect_free = np.mean([not parse_caption(i.answer)[0] for i in caps])
    res = score_answers(caps, wrong)["caption"]
    assert res["kinds"] == 1.0 and res["category"] == 1.0
    assert res["locations"] == res["acc"] == pytest.approx(defect_free) and defect_free < 1
    res = score_answers(caps, [i.answer.replace("brick", "grass") for i in caps])["caption"]
    assert res["category"] == pytest.approx(1 - np.mean([i.label == "brick" for i in caps])) and res["acc"] == 1.0

    ground = [i for i in test_insts if i.task == "grounding"]
    stripped = [i.answer.replace("<p>", "").replace("</p>", "") for i in ground]
    res = score_answers(ground, stripped)["grounding"]
    with_boxes = np.mean([bool(i.boxes) for i in ground])
    assert res["malformed"] == pytest.approx(with_boxes) and res["acc"] == pytest.approx(1 - with_boxes)
    assert score_answers(test_insts, [None] * len(test_insts))["all"]["malformed"] == 1.0
    with pytest.raises(DataError, match="answers for"):
        score_answers(test_insts, [])


def test_format_table_compares_systems(test_insts):
    perfect = score_answers(test_insts, _answers(test_insts))
    empty = score_answers(test_insts, [""] * len(test_insts))
    table = format_table({"truth": perfect, "silent": empty})
    lines = table.splitlines()
    assert lines[0] == "| task | metric | n | truth | silent |"
    assert "| refer | acc | 209 | 100.0 | 0.0 |" in lines
    assert lines[-1] == "| all | malformed | 1990 | 0.0 | 100.0 |"


# ----------------------------------------------------------------------------------------------- baseline
def test_template_baseline_on_ground_truth(test_set, test_insts, tree_sets, trees):
    preds = predictions_from_boxset(test_set)
    cats = {image_key(s.image, s.window): s.group for s in test_set.samples}
    res = score_answers(test_insts, template_answers(test_insts, preds, categories=cats))
    assert res["refer"]["acc"] == res["identify"]["acc"] == res["vqa"]["acc/count"] == 1.0
    assert res["detection"]["ap50"] == res["caption"]["acc"] == res["vqa"]["acc"] == 1.0
    # integer labels + class names, below-threshold detections dropped, no category known
    as_ints = {k: (b, [test_set.class_names.index(n) for n in labels], s) for k, (b, labels, s) in preds.items()}
    answers = template_answers(test_insts, as_ints, class_names=test_set.class_names, score_threshold=0.5)
    assert answers == template_answers(test_insts, preds)
    assert all(a == "unknown" for a, i in zip(answers, test_insts, strict=True) if i.qtype == "category")
    low = template_answers(test_insts, preds, score_threshold=1.5)  # nothing kept
    res = score_answers(test_insts, low)
    assert res["refer"]["malformed"] == 1.0 and res["vqa"]["acc/defect"] == pytest.approx(
        np.mean([i.answer == "no" for i in test_insts if i.qtype == "defect"]))

    tiles = tile_boxset(split_by_region(trees, 0.7)[1], 400, 0)
    tree_test = tree_sets["test"]
    res = score_answers(tree_test, template_answers(tree_test, predictions_from_boxset(tiles)))
    assert res["refer"]["acc"] == res["vqa"]["acc/count"] == res["detection"]["ap50"] == 1.0

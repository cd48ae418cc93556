from __future__ import annotations

import importlib.util
import itertools
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.data.detection import (
    BoxSample,
    BoxSet,
    DetectionDataset,
    detection_collate,
    load_coco,
    load_deepforest,
    load_voc,
    load_yolo,
    split_by_region,
    tile_boxset,
    tile_windows,
    to_original,
    write_coco,
)
from frugalvision.errors import ConfigError, DataError, MissingDependencyError

HAS_DEEPFOREST = importlib.util.find_spec("deepforest") is not None


def _png(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _rect_masks(boxes, w, h):
    masks = np.zeros((len(boxes), h, w), dtype=bool)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, int)):
        masks[k, y1:y2, x1:x2] = True
    return masks


def _mask_box(mask):
    ys, xs = np.nonzero(np.asarray(mask))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


# ----------------------------------------------------------------------------------------------- COCO
def test_coco_round_trip_with_masks_and_windows(tmp_path):
    a, b = _png(tmp_path / "img" / "a.png", 40, 30), _png(tmp_path / "img" / "b.png", 50, 60)
    boxes_a = np.array([[1.5, 2.25, 10, 12], [20, 5, 39, 29]], np.float32)
    boxes_b = np.array([[3, 4, 20, 25]], np.float32)
    bs = BoxSet([
        BoxSample(a, boxes_a, [0, 2], 40, 30, 1, masks=_rect_masks(boxes_a, 40, 30), group="ga"),
        BoxSample(b, boxes_b, [1], 30, 40, 2, window=(10, 20, 40, 60), masks=_rect_masks(boxes_b, 30, 40)),
        BoxSample(b, np.zeros((0, 4)), [], 50, 60, 5, masks=np.zeros((0, 60, 50), bool)),
    ], ["x", "y", "z"], name="t")
    path = write_coco(bs, tmp_path / "gt.json")
    data = json.loads(path.read_text())
    assert [im["id"] for im in data["images"]] == [1, 2, 5]
    assert data["images"][0]["file_name"] == "img/a.png"
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert data["annotations"][1]["category_id"] == 3 and data["annotations"][0]["iscrowd"] == 0
    assert data["annotations"][0]["area"] == pytest.approx(float(bs.samples[0].masks[0].sum()))
    with pytest.raises(DataError, match="already exists"):
        write_coco(bs, path)
    write_coco(bs, path, overwrite=True)

    back = load_coco(path, with_masks=True)
    assert back.class_names == ["x", "y", "z"] and len(back) == 3
    for s, t in zip(bs.samples, back.samples, strict=True):
        assert t.image == s.image and t.image_id == s.image_id and t.window == s.window
        assert (t.width, t.height) == (s.width, s.height)
        np.testing.assert_allclose(t.boxes, s.boxes, atol=1e-5)
        np.testing.assert_array_equal(t.labels, s.labels)
        np.testing.assert_array_equal(t.masks, s.masks)
    assert back.samples[0].group == "ga"
    assert back.read(1).shape == (40, 30, 3)
    assert load_coco(path).samples[0].masks is None


def _coco(tmp_path, anns, images=None):
    _png(tmp_path / "a.png", 20, 10)
    images = images or [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 4, "name": "p"}, {"id": 9, "name": "q"}]}))
    return path


@pytest.mark.parametrize(("bbox", "cat", "pattern"), [
    ([1, 1, 5, 5], 7, r"annotation #0 \(id 11\): unknown category_id 7"),
    ([15, 1, 10, 5], 4, r"annotation #0 \(id 11\): box .* lies outside the 20x10 image"),
    ([3, 1, 0, 5], 4, r"annotation #0 \(id 11\): box .* is degenerate"),
    ([3, 1, float("nan"), 5], 4, r"annotation #0 \(id 11\): box .* non-finite"),
])
def test_coco_box_errors_name_file_and_annotation(tmp_path, bbox, cat, pattern):
    path = _coco(tmp_path, [{"id": 11, "image_id": 1, "category_id": cat, "bbox": bbox}])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + pattern):
        load_coco(path)
    skipped = load_coco(path, on_error="skip")
    assert len(skipped) == 0 and skipped.skipped[0][0] == path


def test_coco_file_errors(tmp_path):
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [19.5, 0, 1, 10.5]}])
    s = load_coco(path).samples[0]  # within the 1 px tolerance: clipped, labels mapped in id order
    assert s.boxes.tolist() == [[19.5, 0, 20, 10]] and s.labels.tolist() == [1]
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON \(line 2"):
        load_coco(bad)
    missing = _coco(tmp_path, [], images=[{"id": 1, "file_name": "nope.png", "width": 5, "height": 5}])
    with pytest.raises(DataError, match=r"c\.json: image id 1 \(nope\.png\): image file not found"):
        load_coco(missing)
    crowd = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 2], "iscrowd": 1}])
    assert load_coco(crowd).num_boxes() == 0


# ----------------------------------------------------------------------------------------------- VOC
def _voc(path, objects, filename="a.png", size=(20, 10)):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    path.write_text(f"<annotation><filename>{filename}</filename>{sz}{objs}</annotation>")
    return path


def test_voc_reader(tmp_path):
    _png(tmp_path / "a.png", 20, 10)
    _png(tmp_path / "JPEGImages" / "b.png", 30, 30)
    _voc(tmp_path / "a.xml", [("dog", (1, 2, 5, 8), 0), ("cat", (0, 0, 21, 10), 1)])
    (tmp_path / "Annotations").mkdir()
    _voc(tmp_path / "Annotations" / "b.xml", [], filename="b.png", size=None)
    bs = load_voc(tmp_path)
    assert bs.class_names == ["cat", "dog"] and len(bs) == 1
    s = bs.samples[0]
    assert s.boxes.tolist() == [[1, 2, 5, 8], [0, 0, 20, 10]] and s.labels.tolist() == [1, 0]
    assert (s.width, s.height, s.image_id, s.group) == (20, 10, 1, "a")
    assert load_voc(tmp_path / "a.xml", keep_difficult=False).num_boxes() == 1
    both = load_voc([tmp_path / "a.xml", tmp_path / "Annotations" / "b.xml"], class_names=["dog", "cat", "x"])
    assert both.samples[0].labels.tolist() == [0, 1] and both.samples[1].boxes.shape == (0, 4)
    assert both.samples[1].image.name == "b.png" and [s.image_id for s in both.samples] == [1, 2]


@pytest.mark.parametrize(("objects", "kwargs", "pattern"), [
    ([("dog", (1, 2, 5, 8), 0), ("cow", (1, 2, 5, 8), 0)], {"class_names": ["dog"]}, r"object #2 .*'cow'"),
    ([("dog", (1, 2, 5, 8), 0), ("dog", (1, 2, 25, 8), 0)], {}, r"object #2 \(dog\): box .* outside"),
    ([("dog", (5, 2, 5, 8), 0)], {}, r"object #1 \(dog\): box .* degenerate"),
    ([("dog", (1, 2, "nan", 8), 0)], {}, r"object #1 \(dog\): box .* non-finite"),
    ([("dog", (1, 2, "x", 8), 0)], {}, r"object #1 \(dog\): <bndbox> coordinates .* not numbers"),
])
def test_voc_errors_name_file_and_object(tmp_path, objects, kwargs, pattern):
    _png(tmp_path / "a.png", 20, 10)
    xml = _voc(tmp_path / "a.xml", objects)
    with pytest.raises(DataError, match=re.escape(str(xml)) + ".*" + pattern):
        load_voc(xml, **kwargs)
    bs = load_voc(xml, on_error="skip", **kwargs)
    assert len(bs) == 0 and bs.skipped[0][0] == xml


def test_voc_file_errors(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation>\n<filename>a.png</filename>\n<object></annotation>")
    with pytest.raises(DataError, match=r"bad\.xml is not well-formed XML \(line 3"):
        load_voc(bad)
    missing = _voc(tmp_path / "m.xml", [], filename="gone.png")
    with pytest.raises(DataError, match=r"m\.xml: image file not found .*gone\.png"):
        load_voc(missing)
    _png(tmp_path / "a.png", 20, 10)
    wrong = _voc(tmp_path / "w.xml", [], size=(40, 10))
    with pytest.raises(DataError, match=r"w\.xml: <size> says 40x10 but image .* is 20x10"):
        load_voc(wrong)
    good = _voc(tmp_path / "g.xml", [("dog", (1, 2, 5, 8), 0)])
    bs = load_voc([bad, missing, good], on_error="skip")
    assert len(bs) == 1 and [p.name for p, _ in bs.skipped] == ["bad.xml", "m.xml"]


# ----------------------------------------------------------------------------------------------- YOLO
def _yolo(root, labels, names_file=None):
    for stem, text in labels.items():
        _png(root / "images" / f"{stem}.png", 20, 10)
        if text is not None:
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{stem}.txt").write_text(text)
    if names_file:
        (root / names_file[0]).write_text(names_file[1])
    return root


@pytest.mark.parametrize("names_file", [("data.yaml", "names: [a, b]\n"), ("data.yaml", "names:\n  0: a\n  1: b\n"),
                                        ("classes.txt", "a\nb\n")])
def test_yolo_reader(tmp_path, names_file):
    root = _yolo(tmp_path, {"p": "1 0.5 0.5 0.5 0.4\n\n0 0.1 0.1 0.2 0.2\n", "q": None}, names_file)
    bs = load_yolo(root)
    assert bs.class_names == ["a", "b"] and len(bs) == 2
    np.testing.assert_allclose(bs.samples[0].boxes, [[5, 3, 15, 7], [0, 0, 4, 2]], atol=1e-5)
    assert bs.samples[0].labels.tolist() == [1, 0] and bs.samples[1].boxes.shape == (0, 4)


@pytest.mark.parametrize(("line", "pattern"), [
    ("0 0.5 0.5 0.2", r"line 2: 4 fields, expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.3 0.3", r"line 2: 7 fields, expected 5"),
    ("2 0.5 0.5 0.2 0.2", r"line 2: unknown class index 2, there are 2 class names"),
    ("0 0.5 0.5 0.2 zz", r"line 2: .* non-numbers"),
    ("0 0.97 0.5 0.2 0.2", r"line 2: box .* outside the 20x10 image"),
    ("0 0.5 0.5 0 0.2", r"line 2: box .* degenerate"),
    ("0 0.5 0.5 inf 0.2", r"line 2: box .* non-finite"),
])
def test_yolo_errors_name_file_and_line(tmp_path, line, pattern):
    root = _yolo(tmp_path, {"p": f"0 0.5 0.5 0.2 0.2\n{line}\n", "q": "1 0.5 0.5 0.2 0.2\n"})
    label = root / "labels" / "p.txt"
    with pytest.raises(DataError, match=re.escape(str(label)) + ", " + pattern):
        load_yolo(root, class_names=["a", "b"])
    bs = load_yolo(root, class_names=["a", "b"], on_error="skip")
    assert [s.image.stem for s in bs.samples] == ["q"] and bs.skipped[0][0] == label


def test_yolo_missing_image_and_names(tmp_path):
    root = _yolo(tmp_path, {"p": "0 0.5 0.5 0.2 0.2\n"})
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"labels/orphan\.txt has no image"):
        load_yolo(root, class_names=["a"])
    assert len(load_yolo(root, class_names=["a"], on_error="skip")) == 1
    with pytest.raises(DataError, match="no class names"):
        load_yolo(root)


# ----------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(("w", "h", "tile", "overlap"),
                         [(1000, 600, 256, 0.25), (513, 512, 512, 64), (300, 700, 128, 0), (100, 90, 128, 32)])
def test_tile_windows_cover_and_end_flush(w, h, tile, overlap):
    wins = tile_windows(w, h, tile, overlap)
    covered = np.zeros((h, w), int)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0, y1 - y0) == (min(tile, w), min(tile, h))
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert max(x1 for *_, x1, _ in wins) == w and max(y1 for *_, y1 in wins) == h
    xs = sorted({x0 for x0, *_ in wins})
    ov = round(overlap * tile) if isinstance(overlap, float) else overlap
    assert all(b - a == tile - ov for a, b in itertools.pairwise(xs[:-1]))  # regular stride but the last
    with pytest.raises(ConfigError):
        tile_windows(w, h, tile, tile)


def test_tile_boxset_clips_and_filters_by_visibility():
    boxes = [[10, 10, 30, 30], [90, 40, 110, 60], [94, 70, 114, 90], [150, 10, 160, 20]]
    masks = _rect_masks(boxes, 200, 100)
    bs = BoxSet([BoxSample("big.png", boxes, [0, 1, 2, 3], 200, 100, 1, masks=masks, group="g"),
                 BoxSample("small.png", [[1, 1, 5, 5]], [1], 80, 60, 2, group="s")], ["a", "b", "c", "d"])
    tiles = tile_boxset(bs, 100, 0, min_visibility=0.5)
    assert [t.window for t in tiles.samples] == [(0, 0, 100, 100), (100, 0, 200, 100), None]
    assert [t.image_id for t in tiles.samples] == [1, 2, 3] and [t.group for t in tiles.samples] == ["g", "g", "s"]
    left, right, small = tiles.samples
    assert left.boxes.tolist() == [[10, 10, 30, 30], [90, 40, 100, 60], [94, 70, 100, 90]][:2]  # 30 % visible: dropped
    assert left.labels.tolist() == [0, 1]
    assert right.boxes.tolist() == [[0, 40, 10, 60], [0, 70, 14, 90], [50, 10, 60, 20]]
    assert right.labels.tolist() == [1, 2, 3]
    for t in (left, right):
        assert t.masks.shape == (len(t.boxes), 100, 100)
        for m, b in zip(t.masks, t.boxes, strict=True):
            np.testing.assert_array_equal(_mask_box(m), b)
    assert small.boxes.tolist() == [[1, 1, 5, 5]] and small.width == 80
    assert tile_boxset(bs, 100, 0, min_visibility=0.2).samples[0].labels.tolist() == [0, 1, 2]


def test_split_by_region_then_tiles_never_overlap(tmp_path):
    boxes = [[5, 5, 15, 15], [5, 60, 15, 75], [5, 66, 15, 76], [20, 90, 40, 100]]
    src = BoxSet([BoxSample(tmp_path / "a.png", boxes, [0, 1, 2, 3], 60, 100, 1, group="a"),
                  BoxSample(tmp_path / "b.png", [], [], 90, 40, 2, group="b")], ["p", "q", "r", "s"])
    train, test = split_by_region(src, 0.7)
    assert [s.window for s in train.samples] == [(0, 0, 60, 70), (0, 0, 90, 28)]
    assert [s.window for s in test.samples] == [(0, 70, 60, 100), (0, 28, 90, 40)]
    assert train.samples[0].labels.tolist() == [0, 1] and test.samples[0].labels.tolist() == [2, 3]  # >= 50 % inside
    assert train.samples[0].boxes.tolist() == [[5, 5, 15, 15], [5, 60, 15, 70]]
    assert test.samples[0].boxes.tolist() == [[5, 0, 15, 6], [20, 20, 40, 30]]
    tr_tiles, te_tiles = tile_boxset(train, 32, 0.25), tile_boxset(test, 32, 0.25)
    assert len(tr_tiles) > 2 and len(te_tiles) > 2
    for group, (w, h) in {"a": (60, 100), "b": (90, 40)}.items():
        used = np.zeros((2, h, w), bool)
        for k, tiles in enumerate((tr_tiles, te_tiles)):
            for t in tiles.samples:
                if t.group == group:
                    x0, y0, x1, y1 = t.window
                    used[k, y0:y1, x0:x1] = True
        assert not (used[0] & used[1]).any() and (used[0] | used[1]).all()
    x_train, x_test = split_by_region(src, 0.5, axis="x")
    assert x_train.samples[0].window == (0, 0, 30, 100) and x_test.samples[0].window == (30, 0, 60, 100)
    with pytest.raises(ConfigError):
        split_by_region(src, 1.0)


# ----------------------------------------------------------------------------------------------- deepforest
@pytest.mark.skipif(not HAS_DEEPFOREST, reason="the deepforest wheel is not installed")
def test_deepforest_counts():
    bs = load_deepforest()
    counts = {s.group: len(s.boxes) for s in bs.samples}
    assert counts == {"2019_YELL_2_528000_4978000_image_crop2": 574, "2019_YELL_2_541000_4977000_image_crop": 279,
                      "OSBS_029": 61, "SOAP_061": 37}
    assert bs.num_boxes() == 951 and bs.class_names == ["Tree"]
    assert all(s.image.suffix == ".png" and s.image.is_file() for s in bs.samples)
    assert {(s.group, s.width, s.height) for s in bs.samples if s.width == 400} == {("OSBS_029", 400, 400),
                                                                                   ("SOAP_061", 400, 400)}
    assert bs.read(3).shape == (400, 400, 3)
    assert load_deepforest(("Alive",)).num_boxes() == 9


def test_deepforest_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepforest" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=re.escape("pip install --no-deps deepforest")):
        load_deepforest()


# ----------------------------------------------------------------------------------------------- dataset
def _dataset_set(tmp_path, masks=True):
    boxes = [[10, 20, 50, 60], [60, 5, 118, 38], [0, 70, 30, 79]]
    b2 = [[100, 10, 140, 50]]
    _png(tmp_path / "a.png", 120, 80)
    _png(tmp_path / "b.png", 200, 60, seed=1)
    return BoxSet([
        BoxSample(tmp_path / "a.png", boxes, [0, 1, 0], 120, 80, 1,
                  masks=_rect_masks(boxes, 120, 80) if masks else None),
        BoxSample(tmp_path / "b.png", b2, [1], 150, 60, 2, window=(50, 0, 200, 60),
                  masks=_rect_masks(b2, 150, 60) if masks else None),
    ], ["a", "b"])


def test_letterbox_eval_inverts_exactly(tmp_path):
    bs = _dataset_set(tmp_path)
    ds = DetectionDataset(bs, img_size=64)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["image_id"] == bs.samples[i].image_id
        np.testing.assert_allclose(to_original(target["boxes"], target).numpy(), bs.samples[i].boxes, atol=1e-3)
        np.testing.assert_allclose(to_original(target["boxes"].numpy(), target), bs.samples[i].boxes, atol=1e-3)
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(target["boxes"]), 64, 64)
        for m, b in zip(target["masks"], target["boxes"].numpy(), strict=True):
            np.testing.assert_allclose(_mask_box(m), b, atol=1.0)
    image, target = ds[0]  # 120x80 -> 64x43 (rounded), padded 10 above: the padding is gray 114
    assert target["scale"] == pytest.approx(64 / 120) and target["pad"] == (0.0, 10.0)
    gray = torch.tensor(114 / 255)
    assert torch.allclose(image[:, :10], gray) and torch.allclose(image[:, 53:], gray)
    assert torch.equal(ds[0][0], image)
    assert "masks" not in DetectionDataset(_dataset_set(tmp_path, masks=False), img_size=64)[0][1]
    images, targets = detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and [t["image_id"] for t in targets] == [1, 2]


def test_letterbox_train_keeps_boxes_inside_and_is_reproducible(tmp_path):
    bs = _dataset_set(tmp_path)
    ds = DetectionDataset(bs, img_size=64, train=True, hflip=0.5, vflip=0.5, scale=(0.5, 1.5), translate=0.3, seed=3)
    flips, kept = set(), 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 64, 64) and 0 <= image.min() <= image.max() <= 1
            b = target["boxes"]
            assert ((b >= 0) & (b <= 64)).all() and ((b[:, 2:] - b[:, :2]) >= 2).all()
            flips.add(target["flip"])
            for m, box in zip(target["masks"], b.numpy(), strict=True):
                np.testing.assert_allclose(_mask_box(m), box, atol=1.5)
            inside = (b > 0.5).all(1) & (b < 63.5).all(1)  # not clipped: the inverse maps back to an original box
            orig = to_original(b[inside], target).numpy()
            for o in orig:
                assert np.abs(bs.samples[i].boxes - o).max(1).min() < 1e-3
            kept += len(b)
    assert len(flips) > 1 and kept > 0
    ds.set_epoch(2)
    a_img, a_t = ds[0]
    again = DetectionDataset(bs, img_size=64, train=True, hflip=0.5, vflip=0.5, scale=(0.5, 1.5), translate=0.3,
                             seed=3)
    again.set_epoch(2)
    b_img, b_t = again[0]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    again.set_epoch(3)
    assert not torch.equal(again[0][0], a_img)


def test_read_checks_size_and_window(tmp_path):
    p = _png(tmp_path / "a.png", 20, 10)
    pixels = np.asarray(Image.open(p))
    bs = BoxSet([BoxSample(p, [], [], 5, 4, 1, window=(3, 2, 8, 6)), BoxSample(p, [], [], 21, 10, 2),
                 BoxSample(p, [], [], 5, 5, 3, window=(16, 6, 21, 11))], ["a"])
    np.testing.assert_array_equal(bs.read(0), pixels[2:6, 3:8])
    with pytest.raises(DataError, match=r"a\.png is 20x10 pixels but its annotation says 21x10"):
        bs.read(1)
    with pytest.raises(DataError, match=r"window \(16, 6, 21, 11\) of sample 3 exceeds image .*a\.png"):
        bs.read(2)
    with pytest.raises(DataError, match="2 boxes but 1 labels"):
        BoxSample(p, [[0, 0, 1, 1], [0, 0, 2, 2]], [0], 20, 10, 1)

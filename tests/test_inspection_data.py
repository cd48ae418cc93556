"""Loaders of the public inspection layouts, on small fixtures written in exactly those layouts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.data.inspection import (
    DefectDataset,
    load_defect_spectrum,
    load_mvtec,
    load_visa,
    segmentation_transforms,
)
from frugalvision.errors import DataError


def _img(path, size=(16, 16), value=100, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def _mask(path, size=(16, 16), box=(2, 2, 6, 6), value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size[::-1], np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = value
    Image.fromarray(m).save(path)


def make_mvtec(root, categories=("tile", "wood")):
    for cat in categories:
        for i in range(3):
            _img(root / cat / "train" / "good" / f"{i:03d}.png")
        _img(root / cat / "test" / "good" / "000.png")
        for d in ("crack", "hole"):
            for i in range(2):
                _img(root / cat / "test" / d / f"{i:03d}.png", value=50)
                _mask(root / cat / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    test = load_mvtec(root, split="test")
    assert len(test) == 2 * (1 + 4) and test.categories == ["tile", "wood"] and test.defects == ["crack", "hole"]
    assert all((s.mask is None) == (s.label == 0) for s in test.samples)
    train = load_mvtec(root, "wood", split="train")
    assert len(train) == 3 and {s.defect for s in train.samples} == {"good"}
    one = load_mvtec(root / "tile", split="test")  # a category folder works as the root too
    assert one.categories == ["tile"]
    with pytest.raises(DataError, match="no category plank"):
        load_mvtec(root, "plank")


def test_mvtec_missing_and_missized_masks(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", ("tile",))
    (root / "tile/ground_truth/hole/001_mask.png").unlink()
    with pytest.raises(DataError, match=r"hole/001_mask\.png for image .*hole/001\.png does not exist"):
        load_mvtec(root, split="test")
    skipped = load_mvtec(root, split="test", on_error="skip")
    assert len(skipped) == 4 and [p.name for p, _ in skipped.skipped] == ["001.png"]
    _mask(root / "tile/ground_truth/hole/001_mask.png", size=(8, 8))
    with pytest.raises(DataError, match=r"001_mask\.png is 8x8 but image .*001\.png is 16x16"):
        load_mvtec(root, split="test")
    (root / "tile/test/crack/000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"crack/000\.png.*corrupt or not an image"):
        load_mvtec(root, split="test", on_error="raise")


def test_defect_dataset_masks_and_transforms(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", ("tile",))
    samples = load_mvtec(root, split="test").samples
    ds = DefectDataset(samples, classes=["crack", "hole"], mask_mode="kind")
    item = ds[[s.defect for s in samples].index("hole")]
    assert item["image"].shape == (3, 16, 16) and item["image"].max() <= 1.0
    assert set(item["mask"].unique().tolist()) == {0, 2} and int((item["mask"] == 2).sum()) == 16
    good = ds[[s.defect for s in samples].index("good")]
    assert good["mask"].sum() == 0 and good["label"] == 0
    binary = DefectDataset(samples, segmentation_transforms(8, train=True), mask_mode="binary", cache=True)
    x = binary[1]
    assert x["image"].shape == (3, 8, 8) and set(x["mask"].unique().tolist()) <= {0, 1}
    with pytest.raises(DataError, match="not in the class list"):
        DefectDataset(samples, classes=["crack"], mask_mode="kind")


def test_transforms_keep_image_and_mask_aligned():
    tf = segmentation_transforms(16, train=True)
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, 3, 5] = 255
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[3, 5] = 1
    for _ in range(20):  # every flip/turn moves the bright pixel and the mask pixel together
        x, m = tf(img, mask)
        assert torch.equal((x[0] > x[0].min()).long(), m)


def make_visa(root):
    rows = []
    for i in range(2):
        _img(root / "candle/Data/Images/Normal" / f"{i:04d}.JPG")
        rows.append(["candle", "train", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""])
    _img(root / "candle/Data/Images/Anomaly/000.JPG")
    _mask(root / "candle/Data/Masks/Anomaly/000.png", value=1)
    anomaly = ["candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"]
    rows.append(["candle", "test", "anomaly", *anomaly])
    rows.append(["candle", "test", "normal", "candle/Data/Images/Normal/0000.JPG", ""])
    (root / "split_csv").mkdir()
    with open(root / "split_csv/1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa_layout(tmp_path):
    root = make_visa(tmp_path / "visa")
    test = load_visa(root, split="test")
    assert [(s.label, s.defect) for s in test.samples] == [(1, "anomaly"), (0, "good")]
    ds = DefectDataset(test.samples, mask_mode="binary")
    assert int(ds[0]["mask"].sum()) == 16  # VisA masks store 1, not 255
    assert len(load_visa(root, "candle", split="train")) == 2
    with pytest.raises(DataError, match="lists no test images"):
        load_visa(root, "pcb1", split="test")
    (root / "split_csv/1cls.csv").write_text("object,split\ncandle,test\n")
    with pytest.raises(DataError, match="must have the columns"):
        load_visa(root)


def test_defect_spectrum_layout(tmp_path):
    root = tmp_path / "DS-MVTec"
    _img(root / "capsule/image/good/000.png")
    _img(root / "capsule/image/crack/000.png")
    _mask(root / "capsule/mask/crack/000_mask.png", value=3)  # class-coded: defect class id 3
    (root / "captions.csv").write_text("image,caption\ncapsule/image/crack/000.png,a crack on the capsule\n")
    ds_list = load_defect_spectrum(root)
    crack = next(s for s in ds_list.samples if s.label)
    assert crack.caption == "a crack on the capsule"
    item = DefectDataset(ds_list.samples, mask_mode="stored")[[s.label for s in ds_list.samples].index(1)]
    assert set(item["mask"].unique().tolist()) == {0, 3}
    (root / "capsule/mask/crack/000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000_mask\.png for image"):
        load_defect_spectrum(root)

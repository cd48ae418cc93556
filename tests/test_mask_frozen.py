"""Mask Frozen on a frozen YOLOv6 and the bundled defect instance set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.data.detection import BoxSample, BoxSet, DetectionDataset, to_original
from frugalvision.detect.datasets import MIN_INSTANCE_PIXELS, defect_boxset, instances_of
from frugalvision.detect.mask_frozen import (
    HEAD_KEYS,
    MaskFrozen,
    MaskTrainConfig,
    build_mask_frozen_from_info,
    evaluate_masks,
    fit_mask_head,
    mask_targets,
    paste_masks,
    predict_masks,
)
from frugalvision.detect.yolov6 import create_detector
from frugalvision.errors import ConfigError, DataError
from frugalvision.inspect.defects import DEFECT_KINDS

NO_AUGMENT = dict(hflip=0.0, scale=(1.0, 1.0), translate=0.0, hsv=(0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def tiny_train() -> BoxSet:
    return defect_boxset("train", categories="grass", tiles=4)


@pytest.fixture(scope="module")
def fitted(tiny_train):
    torch.manual_seed(0)
    model = MaskFrozen(create_detector("yolov6_test", num_classes=len(DEFECT_KINDS)), mask_size=16, mask_dim=16)
    before = {k: v.clone() for k, v in model.detector.state_dict().items()}
    cfg = MaskTrainConfig(img_size=64, epochs=40, batch_size=4, lr=1e-2, device="cpu", progress=False,
                          augment=NO_AUGMENT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = fit_mask_head(model, tiny_train, cfg)
    finally:
        torch.set_num_threads(threads)
    return model, before, res


def _check_instances(bs: BoxSet) -> None:
    assert bs.class_names == list(DEFECT_KINDS)
    for s in bs.samples:
        assert s.masks is not None and s.masks.shape == (len(s.boxes), s.height, s.width)
        assert s.image.is_file()
        for box, mask, label in zip(s.boxes, s.masks, s.labels, strict=True):
            ys, xs = np.nonzero(mask)
            assert len(xs) >= MIN_INSTANCE_PIXELS
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # the box is its mask's bbox
            assert 0 <= label < len(DEFECT_KINDS)
            assert len(instances_of(mask)) == 1  # one 8-connected component


def test_defect_boxset_instances(tiny_train):
    test = defect_boxset("test", categories="brick")
    _check_instances(tiny_train)
    _check_instances(test)
    assert len(test) == 7 * 6 + 4 and sum(len(s.boxes) == 0 for s in test.samples) == 4  # defects + good tiles
    assert {DEFECT_KINDS[int(lb)] for s in test.samples for lb in s.labels} == set(DEFECT_KINDS)
    assert all(len(s.boxes) >= 1 for s in tiny_train.samples)
    train_files = {s.image.resolve() for s in tiny_train.samples}
    test_files = {s.image.resolve() for s in test.samples}
    assert len(train_files) == len(tiny_train) and not train_files & test_files
    again = defect_boxset("train", categories="grass", tiles=4)  # read back from the cache, same content
    assert [s.image for s in again.samples] == [s.image for s in tiny_train.samples]
    assert all(np.array_equal(a.masks, b.masks) for a, b in zip(again.samples, tiny_train.samples, strict=True))
    with pytest.raises(ConfigError, match="split"):
        defect_boxset("val")
    with pytest.raises(ConfigError, match="categories"):
        defect_boxset("test", categories="wood")


def test_detector_frozen_bit_identical(fitted):
    model, before, _ = fitted
    after = model.detector.state_dict()
    assert before.keys() == after.keys() and any("running_mean" in k for k in after)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # weights and BN buffers untouched
    model.train()
    assert not model.detector.training and model.head.training
    assert not any(p.requires_grad for p in model.detector.parameters())
    model.eval()


def test_head_overfits_tiny_set(fitted):
    _, _, res = fitted
    first, last = res.history[0], res.history[-1]
    assert first["rois_per_step"] > 0
    assert last["loss"] < 0.4 * first["loss"], (first, last)
    assert last["dice"] < 0.5 * first["dice"]
    assert res.train_seconds > 0 and res.steps == 40


def test_masks_at_image_size(fitted):
    model, _, _ = fitted
    model.conf_thres, model.max_det = 0.0, 7
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert len(out) == 2
    for d in out:
        assert d["masks"].shape == (7, 64, 64) and d["masks"].dtype == torch.float32
        assert float(d["masks"].min()) >= 0 and float(d["masks"].max()) <= 1
        assert d["boxes"].shape == (7, 4) and torch.all(d["scores"][:-1] >= d["scores"][1:])


def test_segm_metrics_and_original_pixels(fitted, tiny_train, tmp_path):
    model, _, _ = fitted
    m = evaluate_masks(model, tiny_train, 64, device="cpu", progress=False)
    for k in ("AP", "AP50", "mask_AP", "mask_AP50", "mask_AP75"):
        assert 0 <= m[k] <= 100
    # a non-square sample: masks come back at its own size, through the letterbox
    img = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 96, 3), 90, np.uint8)).save(img)
    mask = np.zeros((1, 40, 96), bool)
    mask[0, 10:30, 20:70] = True
    wide = BoxSet([BoxSample(img, [[20, 10, 70, 30]], [0], 96, 40, 1, masks=mask)], list(DEFECT_KINDS))
    dets = predict_masks(model, wide, 64, device="cpu", progress=False, conf_thres=0.0, max_det=3)
    assert dets[0]["masks"].shape == (3, 40, 96) and dets[0]["masks"].dtype == torch.bool


def test_letterbox_inverse_of_targets(tmp_path):
    """GT mask -> letterbox -> box-relative target -> back to original pixels recovers the GT mask."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(img)
    mask = np.zeros((1, 60, 100), bool)
    yy, xx = np.mgrid[:60, :100]
    mask[0] = (yy - 30) ** 2 / 15**2 + (xx - 50) ** 2 / 30**2 <= 1
    ys, xs = np.nonzero(mask[0])
    sample = BoxSample(img, [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0], 100, 60, 1, masks=mask)
    _, target = DetectionDataset(BoxSet([sample], ["a"]), img_size=64)[0]
    probs = mask_targets(target["masks"].float(), target["boxes"], 28)
    back = paste_masks(probs, to_original(target["boxes"], target), 60, 100)[0].numpy() >= 0.5
    iou = (back & mask[0]).sum() / (back | mask[0]).sum()
    assert iou > 0.9


def test_model_file_roundtrip_and_errors(fitted):
    model, _, _ = fitted
    info = {"name": "yolov6_test", "model_kwargs": {"num_classes": len(DEFECT_KINDS), **model.head_kwargs()}}
    assert set(model.head_kwargs()) == set(HEAD_KEYS)
    rebuilt = build_mask_frozen_from_info(info)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    model.conf_thres = rebuilt.conf_thres = 0.0
    model.max_det = rebuilt.max_det = 5
    with torch.no_grad():
        a, b = model(x)[0], rebuilt(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.allclose(a["masks"], b["masks"])
    with pytest.raises(ConfigError, match="mask_roi"):
        MaskFrozen(create_detector("yolov6_test", num_classes=2), mask_roi="p9")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="img_size"):
        MaskTrainConfig(img_size=100)
    no_masks = BoxSet([BoxSample("x.png", [[0, 0, 4, 4]], [0], 8, 8, 1)], ["a"])
    with pytest.raises(DataError, match="masks"):
        fit_mask_head(model, no_masks, MaskTrainConfig(img_size=64, progress=False))

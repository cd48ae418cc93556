from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.data.detection import BoxSample, BoxSet
from frugalvision.detect.baselines import (
    BASELINES,
    build_baseline,
    evaluate_baseline,
    fit_baseline,
    images_seen,
    predict_baseline,
)
from frugalvision.detect.train import DetectTrainConfig
from frugalvision.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPFOREST = importlib.util.find_spec("deepforest") is not None


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import torchvision._internally_replaced_utils as tv_utils
    import torchvision.models._api as tv_api

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tv_utils, "load_state_dict_from_url", refuse)


def _tiny_boxset(folder: Path, n: int = 3, size: int = 48) -> BoxSet:
    """Gray images with a red square (class 0) and a blue one (class 1)."""
    samples = []
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.full((size, size, 3), 90, np.uint8)
        x, y = (int(v) for v in rng.integers(2, size // 2 - 14, 2))
        pixels[y:y + 14, x:x + 14] = (220, 30, 30)
        pixels[y + size // 2:y + size // 2 + 12, x + 20:x + 32] = (30, 30, 220)
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        boxes = [[x, y, x + 14, y + 14], [x + 20, y + size // 2, x + 32, y + size // 2 + 12]]
        samples.append(BoxSample(path, boxes, [0, 1], size, size, i + 1))
    return BoxSet(samples, ["red", "blue"], name="tiny")


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_and_predicts_offline(name, tmp_path, no_download, one_thread):
    data = _tiny_boxset(tmp_path)
    det = build_baseline(name, num_classes=2, img_size=64)
    assert det.input_size == 64 and det.num_classes == 2
    assert det.label_offset == (0 if name.startswith("retinanet") else 1)
    assert not any(p.requires_grad is False for p in det.parameters())  # nothing frozen: trained from scratch
    cfg = DetectTrainConfig(img_size=64, epochs=1, batch_size=2, device="cpu", progress=False, ema=False)
    res = fit_baseline(det, data, cfg)
    assert res.steps == (1 if name.startswith("ssdlite") else 2)  # SSDlite skips a last batch of one image
    assert res.train_seconds > 0 and not res.model.training
    assert all(np.isfinite(v) for k, v in res.history[0].items() if k.startswith("loss"))
    dets = predict_baseline(res.model, data, 64, batch_size=2, device="cpu", progress=False, max_det=20)
    assert [d["image_id"] for d in dets] == [1, 2, 3]
    for d in dets:
        assert set(d) == {"boxes", "scores", "labels", "image_id"}
        assert d["boxes"].shape[-1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"]) <= 20
        if len(d["labels"]):
            assert int(d["labels"].min()) >= 0 and int(d["labels"].max()) <= 1
            assert float(d["boxes"].min()) > -48 and float(d["boxes"].max()) < 2 * 48  # sample pixels, not 64
    assert res.model.set_postprocess()["max_det"] == 300  # restored after predicting


def test_label_conventions_round_trip(no_download):
    """Each model's own label space: training targets are shifted in, detections shifted back to 0-based."""
    for name in BASELINES:
        det = build_baseline(name, num_classes=2, img_size=64).train()
        seen = {}

        def spy(images, targets=None, seen=seen, offset=det.label_offset):
            if targets is not None:
                seen["labels"] = targets[0]["labels"].tolist()
                return {"loss": torch.zeros(())}
            return [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([1 + offset])}]

        det.model.forward = spy
        det(torch.zeros(1, 3, 64, 64), [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([1])}])
        assert seen["labels"] == [1 + det.label_offset]
        assert det.eval()([torch.zeros(3, 64, 64)])[0]["labels"].tolist() == [1]


def test_evaluate_uses_coco_path_and_perfect_detections_score_100(tmp_path, no_download):
    data = _tiny_boxset(tmp_path, n=2)
    det = build_baseline("ssdlite320_mobilenet_v3_large", 2, 64).eval()
    # replace the network by an oracle that returns the letterboxed ground truth
    from frugalvision.data.detection import DetectionDataset

    ds = DetectionDataset(data, 64)
    truth = [ds[i][1] for i in range(len(ds))]
    calls = iter(range(len(ds)))

    def oracle(images):
        out = []
        for _ in images:
            t = truth[next(calls)]
            out.append({"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"] + 1})
        return out

    det.model.forward = oracle
    m = evaluate_baseline(det, data, 64, batch_size=1, device="cpu", progress=False)
    assert m["AP"] == pytest.approx(100.0) and m["num_predictions"] == data.num_boxes()


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown baseline"):
        build_baseline("yolo_v99", 2, 64)
    with pytest.raises(ConfigError, match="num_classes"):
        build_baseline(BASELINES[0], 0, 64)
    det = build_baseline("ssdlite320_mobilenet_v3_large", 1, 64)
    with pytest.raises(ConfigError, match="needs targets"):
        det.train()(torch.zeros(1, 3, 64, 64))
    empty = BoxSet([], ["a"])
    with pytest.raises(DataError, match="empty"):
        fit_baseline(det, empty, DetectTrainConfig(img_size=64, progress=False))
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        fit_baseline(det, _tiny_boxset(tmp_path, n=1), DetectTrainConfig(img_size=64, batch_size=1, progress=False))


def test_native_size_keeps_ssdlite_at_320():
    det = build_baseline("ssdlite320_mobilenet_v3_large", 1, 128, native_size=True)
    assert det.input_size == 320 and det.model.transform.fixed_size == (320, 320)


def test_images_seen():
    assert images_seen(0, 4, 10) == 0
    assert images_seen(3, 4, 10) == 10
    assert images_seen(7, 4, 10) == 24


def _compare_script():
    spec = importlib.util.spec_from_file_location("detection_compare", ROOT / "benchmarks" / "detection_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yolo_export_round_trips_windows(tmp_path):
    """The ultralytics path's data: every sample (a window of its image) as its own PNG + YOLO labels."""
    from frugalvision.data.detection import load_yolo, tile_boxset

    big = _tiny_boxset(tmp_path, n=1, size=96)
    tiles = tile_boxset(big, 64, 32)
    items = _compare_script().export_yolo(tiles, tmp_path / "yolo", "train")
    assert [i["image_id"] for i in items] == [s.image_id for s in tiles.samples]
    back = load_yolo(tmp_path / "yolo", class_names=tiles.class_names)
    by_name = {s.image.stem: s for s in back.samples}
    for s in tiles.samples:
        b = by_name[f"{s.image_id:06d}"]
        assert (b.width, b.height) == (s.width, s.height)
        np.testing.assert_allclose(b.boxes, s.boxes, atol=1e-3)
        assert b.labels.tolist() == s.labels.tolist()


def test_onnx_parity_check_tolerates_ties_only():
    parity = _compare_script()._parity_problem
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    scores, labels = np.array([0.9, 0.5], np.float32), np.array([0, 1])
    assert parity([boxes, scores, labels], [boxes[::-1].copy(), scores[::-1].copy(), labels[::-1].copy()]) is None
    assert "detections" in parity([boxes, scores, labels], [boxes[:1], scores[:1], labels[:1]])
    assert "scores differ" in parity([boxes, scores, labels], [boxes, scores + 0.1, labels])
    assert "eager boxes" in parity([boxes, scores, labels], [boxes + 5, scores, labels])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPFOREST, reason="the deepforest wheel (tree images) is not installed")
def test_detection_compare_quick(tmp_path):
    out = tmp_path / "detection_trees"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "detection_compare.py"), "--data", "trees", "--quick",
           "--out", str(out), "--threads", "1", "--train-threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.with_suffix(".json").read_text())
    names = {r["model"] for r in table["rows"]}
    assert {"yolov6_n", *BASELINES} <= names
    assert all(0 <= r["AP"] <= 100 for r in table["rows"] if r.get("AP") is not None)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# ") and "Command:" in md and "AP50" in md

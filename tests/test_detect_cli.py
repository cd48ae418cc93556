"""``frugalvision detect``: predict (tiled large images, COCO JSON + CSV + drawn images), no silent overwrite,
clear errors, user data formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.cli import main
from frugalvision.detect.yolov6 import create_detector
from frugalvision.weights import save_model_file


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny detector that fires everywhere (class bias high), saved as a ``detector`` model file."""
    torch.manual_seed(0)
    m = create_detector("yolov6_test", num_classes=2)
    with torch.no_grad():
        m.head.cls_preds[0].bias.fill_(3.0)  # stride-8 level: every point scores ~0.95
    path = tmp_path_factory.mktemp("det") / "model.safetensors"
    save_model_file(m, path, "detector", "yolov6_test", {"num_classes": 2}, classes=["a", "b"], img_size=64, tile=64,
                    overlap=16, data="defects", conf_thres=0.5, iou_thres=0.65, max_det=50)
    return path


def _images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_predict_writes_drawn_images_coco_and_csv_in_image_pixels(model_file, tmp_path, capsys):
    images = _images(tmp_path / "images", [(64, 48), (300, 140)])  # the second is tiled (> 2 x 64)
    out = tmp_path / "pred"
    assert main(["detect", "predict", str(images), f"model_file={model_file}", f"predict_out={out}",
                 "progress=false", "device=cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and res["detections"] > 0
    assert sorted(p.name for p in out.glob("*_det.png")) == ["im0_det.png", "im1_det.png"]
    coco = json.loads((out / "predictions.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert sizes == {1: (64, 48), 2: (300, 140)}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        W, H = sizes[ann["image_id"]]
        assert x >= -1 and x + w <= W + 1 and y >= -1 and y + h <= H + 1 and ann["score"] > 0.5
        assert ann["category_id"] in (1, 2)
    big = [a for a in coco["annotations"] if a["image_id"] == 2]
    assert max(a["bbox"][0] for a in big) > 64  # boxes from tiles right of the first, shifted into image pixels
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(coco["annotations"]) and {r["class"] for r in rows} <= {"a", "b"}
    # a second run refuses to replace anything without overwrite=true
    before = (out / "predictions.json").read_bytes()
    assert main(["detect", "predict", str(images), f"model_file={model_file}", f"predict_out={out}",
                 "progress=false"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (out / "predictions.json").read_bytes() == before


def test_export_is_one_graph_with_nms(model_file, tmp_path, capsys):
    onnx = tmp_path / "det.onnx"
    assert main(["detect", "export", f"model_file={model_file}", f"onnx_out={onnx}"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert onnx.is_file() and res["num_detections"] > 0 and res["max_score_err"] <= 1e-4
    from frugalvision.detect.onnx_export import OrtDetector

    det = OrtDetector(onnx)(np.random.default_rng(0).random((2, 3, 64, 96), dtype=np.float32))
    assert len(det) == 2 and len(det[0]["boxes"]) > 0


def test_bad_actions_and_data_are_one_line_errors(model_file, tmp_path, capsys):
    assert main(["detect", "fly"]) == 2
    assert "train, test, predict or export" in capsys.readouterr().err
    assert main(["detect", "predict", f"model_file={model_file}"]) == 2
    assert "needs images" in capsys.readouterr().err
    assert main(["detect", "train", f"data={tmp_path / 'nothing'}", f"out={tmp_path / 'r'}"]) in (1, 2)
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err


def test_train_on_a_yolo_folder_end_to_end(tmp_path, capsys):
    """User data in YOLO format: split by region, trained for a few steps, tested, model file written."""
    root = tmp_path / "yolo"
    _images(root / "images", [(96, 96)] * 4)
    (root / "labels").mkdir()
    for i in range(4):
        (root / "labels" / f"im{i}.txt").write_text("0 0.3 0.3 0.2 0.2\n1 0.6 0.8 0.3 0.2\n")
    (root / "data.yaml").write_text("names: [cat, dog]\n")
    out = tmp_path / "run"
    assert main(["detect", "train", f"data={root}", "model=yolov6_test", "img_size=64", "epochs=1", "batch_size=4",
                 f"out={out}", "progress=false", "device=cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train_images"] == 4 and 0 <= res["AP50"] <= 100
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    # test re-evaluates the run folder's model and exits 0 (its result has "images" but nothing "predicted")
    assert main(["detect", "test", f"out={out}", "progress=false", "device=cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] > 0
    assert main(["detect", "train", f"data={root}", "model=yolov6_test", f"out={out}", "progress=false"]) == 2
    assert "overwrite=true" in capsys.readouterr().err

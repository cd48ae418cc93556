"""Reliability probes on outputs, through the CLI: nothing is replaced without ``overwrite=true``, weights that do
not fit are an error, outputs get normal permissions, killed writes leave no litter, empty inputs and corrupt
images are found up front, and very large images are predicted in bounded memory with the same result."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.cli import main
from frugalvision.data.inspection import SegmentationTransform
from frugalvision.inspect import visualize
from frugalvision.inspect.bundled import build_benchmark
from frugalvision.inspect.segmentation import SegmentationPredictor
from frugalvision.inspect.visualize import overlay
from frugalvision.utils.io import atomic_write_text, clean_stale_temporaries

SMALL = ["progress=false", "device=cpu"]
TRAIN = ["data=faces", "img_size=32", "epochs=1", "max_steps=1", "batch_size=8", *SMALL]


def _ok(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"frugalvision {' '.join(argv)} -> {rc}: {err[-1500:]}"
    return json.loads(out) if out.strip().startswith("{") else {}


def _fails(argv: list[str], code: int, capsys: pytest.CaptureFixture, *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, f"frugalvision {' '.join(argv)} -> {rc} (wanted {code}): {err[-1500:]}"
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    for w in words:
        assert w in err, (w, err)
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "run"
    assert main(["train", "model=resnet10t", f"output_dir={out}", *TRAIN]) == 0
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("one", "two"):
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(root / f"{name}.png")
        paths.append(root / f"{name}.png")
    return paths


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = build_benchmark()
    root = tmp_path_factory.mktemp("mvtec")
    for sub, n in (("train/good", 6), ("test/good", 2), ("test/hole", 2)):
        (root / "brick" / sub).mkdir(parents=True)
        for f in sorted((src / "brick" / sub).glob("*.png"))[:n]:
            shutil.copy(f, root / "brick" / sub / f.name)
            if "good" not in sub:
                gt = root / "brick" / "ground_truth" / "hole"
                gt.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / "brick" / "ground_truth" / "hole" / f"{f.stem}_mask.png", gt)
    return root


# --------------------------------------------------------------------------------------------- 1. no data loss
def test_predict_into_an_earlier_prediction_is_refused(classifier, images, tmp_path, capsys):
    out = tmp_path / "pred"
    _ok(["predict", str(images[0]), f"model_file={classifier}", f"out={out}", *SMALL], capsys)
    before = _snapshot(out)
    _fails(["predict", str(images[1]), f"model_file={classifier}", f"out={out}", *SMALL], 2, capsys,
           "predictions.csv", "overwrite=true", "out=")
    assert _snapshot(out) == before  # the first run's results are intact
    _ok(["predict", str(images[1]), f"model_file={classifier}", f"out={out}", "overwrite=true", *SMALL], capsys)
    assert str(images[1]) in (out / "predictions.csv").read_text()


def test_anomaly_predict_into_an_earlier_prediction_is_refused(mvtec, images, tmp_path, capsys):
    run = tmp_path / "anomaly"
    _ok(["anomaly", "fit", "backbone=resnet10t", "backbone_weights=none", f"data={mvtec}", "img_size=32",
         "layers=[1,2]", "coreset_ratio=0.5", f"out={run}", "progress=false"], capsys)
    _ok(["anomaly", "predict", str(images[0]), f"out={run}"], capsys)
    before = _snapshot(run / "predict")
    _fails(["anomaly", "predict", str(images[1]), f"out={run}"], 2, capsys, "predictions.csv", "overwrite=true")
    assert _snapshot(run / "predict") == before


def test_export_onto_an_existing_onnx_is_refused(classifier, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"precious")
    _fails(["export", f"model_file={classifier}", f"out={target}"], 2, capsys, str(target), "overwrite=true")
    assert target.read_bytes() == b"precious"


# --------------------------------------------------------------------------------------------- 2. weights fit
def test_train_with_weights_of_another_architecture_is_an_error(classifier, tmp_path, capsys):
    out = tmp_path / "r26"
    _fails(["train", "model=resnet26t", f"weights={classifier}", f"output_dir={out}", *TRAIN], 1, capsys,
           str(classifier), "do not fit", "missing key")
    assert not (out / "model.safetensors").exists()


def test_train_new_classes_reinitialises_only_the_head(classifier, tmp_path, capsys):
    res = _ok(["train", "model=resnet10t", f"weights={classifier}", "data=textures", "img_size=32", "epochs=1",
               "max_steps=1", "batch_size=8", f"output_dir={tmp_path / 'ft'}", *SMALL], capsys)
    assert res["output_dir"]  # faces (2 classes) -> textures: the head alone is resized


def test_segment_with_a_backbone_file_of_another_architecture_is_an_error(classifier, mvtec, tmp_path, capsys):
    _fails(["segment", "segmenter=ours:repvgg_a0", f"backbone_weights={classifier}", f"data={mvtec}", "few_shot=1",
            "synthetic=none", "max_steps=1", "img_size=64", f"output_dir={tmp_path / 'seg'}", *SMALL], 1, capsys,
           str(classifier), "do not fit the backbone")


# --------------------------------------------------------------------------------------------- 5. smaller
def test_outputs_get_the_permissions_of_a_normal_write(classifier, images, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "pred"
        _ok(["predict", str(images[0]), f"model_file={classifier}", f"out={out}", *SMALL], capsys)
        assert stat.S_IMODE((out / "predictions.csv").stat().st_mode) == 0o644
        onnx = tmp_path / "m.onnx"
        _ok(["export", f"model_file={classifier}", f"out={onnx}"], capsys)
        assert stat.S_IMODE(onnx.stat().st_mode) == 0o644
        for f in classifier.parent.iterdir():  # the training run's files
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.umask(0o027)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "g.txt", "x").stat().st_mode) == 0o640
        os.chmod(tmp_path / "g.txt", 0o600)  # an existing file keeps its mode, as with open(path, "w")
        assert stat.S_IMODE(atomic_write_text(tmp_path / "g.txt", "y").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_stale_temporaries_of_killed_writes_are_removed(classifier, images, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    dead = out / ".predictions.csv.999999999.x1y2z3ab.tmp"  # a writer that no longer runs
    dead.write_text("half")
    staged = out / ".m.onnx.999999999.q9w8e7r6.tmp"  # an ONNX export's staging folder
    staged.mkdir()
    (staged / "m.onnx").write_bytes(b"half")
    live = out / f".predictions.csv.{os.getpid()}.abcdefgh.tmp"  # a running writer's file is never touched
    live.write_text("in progress")
    mine = out / "notes.tmp"  # not ours
    mine.write_text("keep")
    _ok(["predict", str(images[0]), f"model_file={classifier}", f"out={out}", *SMALL], capsys)
    assert not dead.exists() and not staged.exists() and live.exists() and mine.exists()
    assert clean_stale_temporaries(out) == []


def test_predict_on_a_folder_without_images_exits_1(classifier, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    _fails(["predict", str(empty), f"model_file={classifier}", f"out={tmp_path / 'p'}", *SMALL], 1, capsys,
           "no images found", str(empty))
    assert not (tmp_path / "p").exists()


def test_a_corrupt_training_image_is_found_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: read last in the epoch
    out = tmp_path / "run"
    _fails(["train", "model=resnet10t", f"data={root}", "img_size=32", "max_steps=1", "batch_size=2",
            f"output_dir={out}", *SMALL], 1, capsys, str(bad))
    assert not (out / "model.safetensors").exists()


def test_segment_finds_a_corrupt_image_up_front(mvtec, tmp_path, capsys):
    data = tmp_path / "mvtec"
    shutil.copytree(mvtec, data)
    bad = sorted((data / "brick" / "train" / "good").glob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:100])  # the header survives: only decoding finds it
    _fails(["segment", "segmenter=ours:resnet10t", "backbone_weights=none", "freeze=none", f"data={data}",
            "few_shot=1", "synthetic=none", "max_steps=1", "img_size=64", f"output_dir={tmp_path / 'seg'}", *SMALL],
           1, capsys, bad.name)


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_large_images_are_predicted_in_strips_with_the_same_result(threshold, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)  # per-pixel logits that vary across the image: classes differ
    image = np.random.default_rng(1).integers(0, 255, (301, 517, 3), dtype=np.uint8)
    pred = SegmentationPredictor(model, 64, (0.5,) * 3, (0.5,) * 3, threshold=threshold)
    whole = pred([image])[0]
    pred.strip_elements = 4 * 517 * 37  # rows of 37: the strip path, with a ragged last strip
    strips = pred([image])[0]
    np.testing.assert_allclose(strips.score, whole.score, atol=1e-6)
    assert len(np.unique(whole.classes)) > 1 and (strips.classes == whole.classes).mean() > 0.9999
    tf = SegmentationTransform(64, train=False)
    x = torch.from_numpy(image).permute(2, 0, 1)
    one = tf.image(x)
    tf.strip_pixels = 517 * 40  # two resize passes over row strips
    assert torch.equal(tf.image(x), one)
    monkeypatch.setattr(visualize, "OVERLAY_STRIP_PIXELS", 517 * 50)
    assert np.array_equal(overlay(image, whole.classes), _overlay_whole(image, whole.classes))


def _overlay_whole(image: np.ndarray, classes: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The overlay computed on the whole image at once (the reference for the strip-wise one)."""
    from frugalvision.inspect.visualize import _PALETTE

    colors = _PALETTE[np.minimum(classes, len(_PALETTE) - 1)]
    out = image.astype(np.float32)
    m = classes > 0
    out[m] = (1 - alpha) * out[m] + alpha * colors[m]
    return out.round().astype(np.uint8)

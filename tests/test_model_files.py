"""Every command that writes a model file: ``eval``, ``export`` (with the onnxruntime parity check) and ``predict``
open what it wrote, whatever its kind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
import timm

from frugalvision.cli import main
from frugalvision.inspect.bundled import build_benchmark
from frugalvision.weights import MODEL_KINDS, read_model_info, save_model_file

SMALL = ["progress=false", "device=cpu"]


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"frugalvision {' '.join(argv)} -> {rc}: {err[-1500:]}"
    return json.loads(out) if out.strip().startswith("{") else {}


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Part of the bundled benchmark in MVTec layout: brick, 6 train/good, 3 test/good, 2 kinds x 3 defects."""
    src = build_benchmark()
    root = tmp_path_factory.mktemp("mvtec")
    for sub, n in (("train/good", 6), ("test/good", 3), ("test/hole", 3), ("test/scratch", 3)):
        (root / "brick" / sub).mkdir(parents=True)
        for f in sorted((src / "brick" / sub).glob("*.png"))[:n]:
            shutil.copy(f, root / "brick" / sub / f.name)
            if "good" not in sub:
                gt = root / "brick" / "ground_truth" / sub.split("/")[1]
                gt.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / "brick" / "ground_truth" / sub.split("/")[1] / f"{f.stem}_mask.png", gt)
    return root


def _train(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["train", "model=resnet10t", "data=faces", "img_size=32", "epochs=1", "max_steps=2", "batch_size=16",
          f"output_dir={tmp / 'train'}", *SMALL], capsys)
    return tmp / "train" / "model.safetensors"


def _train_adapted(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["train", "model=resnet10t", "data=faces", "img_size=32", "epochs=1", "max_steps=2", "batch_size=16",
          "adapt=linear_probe", f"output_dir={tmp / 'adapt'}", *SMALL], capsys)
    return tmp / "adapt" / "model.safetensors"


def _train_vit(tmp: Path, mvtec: Path, capsys) -> Path:
    """A ViT is built for the training resolution (it used to crash on anything but 224)."""
    _run(["train", "model=vit_tiny_patch16_224", "data=faces", "img_size=32", "epochs=1", "max_steps=1",
          "batch_size=8", f"output_dir={tmp / 'vit'}", *SMALL], capsys)
    return tmp / "vit" / "model.safetensors"


def _surgery(tmp: Path, mvtec: Path, capsys) -> Path:
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 2}
    vit = save_model_file(timm.create_model("vit_tiny_patch16_224", **kwargs), tmp / "vit.safetensors",
                          "classifier", "vit_tiny_patch16_224", kwargs, classes=["face", "nonface"], img_size=32,
                          mean=[0.5] * 3, std=[0.5] * 3, data="faces")
    _run(["surgery", f"model_file={vit}", "blocks=[blocks.0]", "repeats=2", "threads=1", "distill_epochs=1",
          "max_steps=2", "data=faces", "batch_size=16", f"output_dir={tmp / 'surgery'}", *SMALL], capsys)
    return tmp / "surgery" / "model.safetensors"


def _segment(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["segment", "segmenter=ours:resnet10t", "backbone_weights=none", "freeze=all", f"data={mvtec}",
          "few_shot=1", "good_per_category=2", "synthetic=none", "epochs=1", "max_steps=2", "eval_every=0",
          "img_size=64", "batch_size=4", f"output_dir={tmp / 'segment'}", *SMALL], capsys)
    return tmp / "segment" / "model.safetensors"


def _patchcore(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["anomaly", "fit", "backbone=resnet10t", "backbone_weights=none", f"data={mvtec}", "img_size=64",
          "layers=[1,2]", "coreset_ratio=0.5", f"out={tmp / 'patchcore'}", "progress=false"], capsys)
    return tmp / "patchcore" / "brick" / "model.safetensors"


def _anomalyclip(tmp: Path, mvtec: Path, capsys) -> Path:
    from frugalvision.inspect.anomaly import AnomalyCLIP, AnomalyCLIPConfig, OpenCLIPBackbone
    from frugalvision.inspect.anomaly.anomalyclip import tiny_open_clip

    clip = AnomalyCLIP(OpenCLIPBackbone(tiny_open_clip()), AnomalyCLIPConfig(n_ctx=2, deep_depth=2, deep_n_ctx=1,
                                                                                 feature_layers=(1, 2)))
    source = save_model_file(clip, tmp / "clip.safetensors", "anomalyclip", "anomalyclip", clip.model_kwargs())
    _run(["anomaly", "fit", "method=anomalyclip", f"backbone_weights={source}", f"data={mvtec}", "img_size=32",
          f"out={tmp / 'anomalyclip'}", "progress=false"], capsys)
    return tmp / "anomalyclip" / "brick" / "model.safetensors"


def _detect(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["detect", "train", "model=yolov6_test", "data=defects", "epochs=1", "budget=3", "batch_size=8",
          f"out={tmp / 'detect'}", *SMALL], capsys)
    return tmp / "detect" / "model.safetensors"


def _detect_masks(tmp: Path, mvtec: Path, capsys) -> Path:
    _run(["detect", "train", "model=yolov6_test", "data=defects", "epochs=1", "budget=3", "batch_size=8", "masks=true",
          "mask_epochs=1", f"out={tmp / 'masks'}", *SMALL], capsys)
    return tmp / "masks" / "masks.safetensors"


WRITERS: dict[str, tuple[str, Callable[..., Path]]] = {
    "train": ("classifier", _train),
    "train adapt=linear_probe": ("classifier", _train_adapted),
    "train model=<a ViT> img_size=32": ("classifier", _train_vit),
    "surgery": ("surgery", _surgery),
    "segment": ("segmentation", _segment),
    "anomaly fit method=patchcore": ("patchcore", _patchcore),
    "anomaly fit method=anomalyclip": ("anomalyclip", _anomalyclip),
    "detect train": ("detector", _detect),
    "detect train masks=true": ("mask_frozen", _detect_masks),
}


#: Kinds that eval / export / predict refuse (in one line naming the commands that do run them), tested elsewhere.
OTHER_COMMANDS = {"vlm": "tests/test_vlm_cli.py: vlm test, ask, chat",
                  "svg_reader": "tests/test_svg_read.py: svg test, load_reader",
                  "seed_tokenizer": "tests/test_seed_cli.py: seed encode, seed decode, load_seed",
                  "seed_lm": "tests/test_seed_cli.py: seed lm, seed draw, ask, load_seed_lm",
                  "seed_pixel_decoder": "tests/test_seed_cli.py: seed pixels, seed decode decoder=, load_pixel_decoder"}


def test_every_kind_the_commands_write_is_covered():
    assert {kind for kind, _ in WRITERS.values()} | set(OTHER_COMMANDS) == set(MODEL_KINDS)


@pytest.mark.parametrize("command", list(WRITERS))
def test_eval_export_and_predict_open_what_a_command_wrote(command, tmp_path, mvtec, capsys, one_thread):
    pytest.importorskip("open_clip") if "anomalyclip" in command else None
    kind, write = WRITERS[command]
    path = write(tmp_path, mvtec, capsys)
    info = read_model_info(path)
    assert info["kind"] == kind
    task = MODEL_KINDS[kind].task
    data = [f"data={mvtec}"] if task not in ("classification", "detection") else []

    res = _run(["eval", f"model_file={path}", "batch_size=8", *data, *SMALL], capsys)
    assert res["kind"] == kind and res["images"] > 0
    metric = {"classification": "acc1", "segmentation": "mIoU", "anomaly": "image_AUROC", "detection": "AP50"}[task]
    assert 0.0 <= res[metric] <= 100.0

    onnx = tmp_path / "model.onnx"
    res = _run(["export", f"model_file={path}", f"out={onnx}"], capsys)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    if task == "detection":  # one graph with NMS inside, dynamic image size, checked against PyTorch
        assert [o.name for o in sess.get_outputs()][:3] == ["boxes", "scores", "labels"]
        assert res["max_raw_box_err"] < 1e-2 and res["checked_batch_sizes"]
    else:
        assert res["max_abs_err"] is not None and res["max_abs_err"] < 1e-3
        assert sess.get_inputs()[0].shape[-1] == info.get("img_size", info["model_kwargs"].get("img_size"))
    assert main(["export", f"model_file={path}", f"out={onnx}"]) == 2  # never replaced without overwrite=true
    assert "already exists" in capsys.readouterr().err

    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((mvtec / "brick" / "test" / "hole").glob("*.png"))[:2]:
        shutil.copy(f, images / f.name)
    out = tmp_path / "pred"
    res = _run(["predict", str(images), f"model_file={path}", f"out={out}", *SMALL[:1]], capsys)
    assert res["predicted"] == 2 and res["skipped"] == 0 and (out / "predictions.csv").is_file()
    if task == "detection":
        assert len(list(out.glob("*_det.png"))) == 2 and (out / "predictions.json").is_file()
    elif task != "classification":
        assert len(list(out.glob("*_mask.png"))) == 2

"""`frugalvision anomaly fit|test|predict` on a small MVTec AD-layout folder (tiny backbone, 64 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mvtec_subset import copy_subset
from PIL import Image

from frugalvision.cli import main
from frugalvision.errors import ConfigError
from frugalvision.pipelines.anomaly import (
    ANOMALY_METHODS,
    anomaly_spec,
    evaluate_anomaly_model,
    get_anomaly_method,
    predict_anomaly_model,
)
from frugalvision.weights import load_model_file, read_model_info

COMMON = ["backbone=resnet18", "backbone_weights=none", "layers=[2,3]", "img_size=64", "coreset_ratio=0.2",
          "batch_size=8", "progress=false", "report_images=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of part of the bundled benchmark: 2 categories, 6 train/good, 3 test/good, 2 kinds x 2."""
    return copy_subset(tmp_path_factory.mktemp("mvtec"), ("brick", "moon"),
                       (("train/good", 6), ("test/good", 3), ("test/hole", 2), ("test/scratch", 2)))


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "anomaly"
    assert main(["anomaly", "fit", f"data={data}", f"out={out}", "onnx=true", *COMMON]) == 0
    return out


def test_fit_writes_models_table_report_and_overlays(run: Path, data: Path) -> None:
    for cat in ("brick", "moon"):
        info = read_model_info(run / cat / "model.safetensors")
        assert info["kind"] == "patchcore" and info["threshold_source"] == "F1-optimal on the test split"
        assert info["category"] == cat and info["data"] == str(data)
        assert np.isfinite(info["pixel_threshold"]) and info["fit"]["bank"] == int(0.2 * 6 * 64)
        assert (run / cat / "model.onnx").is_file()
        assert len(list((run / "overlays" / cat).glob("*.png"))) == 2
    md = (run / "metrics.md").read_text()
    assert "| brick |" in md and "| mean |" in md and "AUPRO" in md
    html = (run / "report.html").read_text()
    assert html.count("<img") >= 4 and "pixel_AUROC" in html


def test_test_recomputes_with_a_given_threshold(run: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["anomaly", "test", f"data={data}", f"out={run}", "categories=[moon]", "threshold=0.25",
                 *COMMON]) == 0
    info = read_model_info(run / "moon" / "model.safetensors")
    assert info["pixel_threshold"] == 0.25 and info["threshold_source"] == "given"
    assert "moon" in capsys.readouterr().out


def test_predict_torch_and_onnx_give_the_same_masks(run: Path, data: Path, tmp_path: Path) -> None:
    images = data / "brick" / "test"
    a, b = tmp_path / "pt", tmp_path / "onnx"
    base = ["anomaly", "predict", str(images), f"out={run}", "category=brick", "progress=false"]
    assert main([*base, f"predict_out={a}"]) == 0
    assert main([*base, f"predict_out={b}", "onnx=true"]) == 0
    masks = sorted(a.rglob("*_mask.png"))
    assert len(masks) == 7 and (a / "predictions.csv").is_file() and len(list(a.rglob("*_overlay.png"))) == 7
    diff = [np.asarray(Image.open(m)) != np.asarray(Image.open(b / m.relative_to(a))) for m in masks]
    assert np.mean(np.concatenate([d.ravel() for d in diff])) < 1e-3
    assert set(np.unique(np.asarray(Image.open(masks[0])))) <= {0, 255}
    # never overwrite without overwrite=true
    assert main([*base, f"predict_out={a}"]) == 2
    assert main([*base, f"predict_out={a}", "overwrite=true"]) == 0


def test_clear_errors(run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["anomaly", "fit", f"data={data}", f"out={run}", *COMMON]) == 2  # run folder exists
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["anomaly", "explode", f"out={run}"]) == 2
    assert "fit, test or predict" in capsys.readouterr().err
    assert main(["anomaly", "predict", str(data), f"out={run}"]) == 2  # two categories: which one?
    assert "category=" in capsys.readouterr().err
    assert main(["anomaly", "test", f"out={tmp_path / 'nothing'}"]) == 2
    assert "no fitted model" in capsys.readouterr().err
    code = main(["anomaly", "fit", f"data={data}", f"out={tmp_path / 'clip'}", "method=anomalyclip", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "anomalyclip" in err and "backbone_weights" in err
    assert main(["anomaly", "fit", f"data={tmp_path / 'missing'}", f"out={tmp_path / 'x'}", *COMMON]) == 1


def test_method_registry_names_close_matches(run: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    assert sorted(ANOMALY_METHODS) == ["anomalyclip", "patchcore"]
    assert get_anomaly_method("patchcore").uses_train_images and not get_anomaly_method("anomalyclip").uses_train_images
    with pytest.raises(ConfigError, match=r"unknown anomaly method 'anomaly_clip'; did you mean anomalyclip\?"):
        get_anomaly_method("anomaly_clip")
    with pytest.raises(ConfigError, match=r"'knn' \(available: anomalyclip, patchcore\)"):
        get_anomaly_method("knn")
    # through the CLI, before anything is deleted: the run folder survives an unknown method with overwrite=true
    assert main(["anomaly", "fit", f"data={data}", f"out={run}", "method=patchcor", "overwrite=true", *COMMON]) == 2
    assert "did you mean patchcore?" in capsys.readouterr().err
    assert (run / "brick" / "model.safetensors").is_file()


def test_evaluate_anomaly_model_uses_the_stored_thresholds_and_writes_nothing(run: Path, data: Path) -> None:
    path = run / "brick" / "model.safetensors"
    before = path.read_bytes()
    model, info = load_model_file(path)
    res = evaluate_anomaly_model(model, info, progress=False)  # the data recorded in the file
    row = info["test_metrics"]  # what `anomaly fit` (its test) measured and stored
    for k in ("image_AUROC", "pixel_AUROC", "AUPRO", "image_F1_max", "pixel_F1_max"):
        assert res[k] == pytest.approx(row[k], abs=1e-9), k
    assert res["category"] == "brick" and res["data"] == str(data) and res["images"] == 7
    assert res["pixel_threshold"] == info["pixel_threshold"] and res["image_threshold"] == info["image_threshold"]
    # at the F1-optimal thresholds stored by `test`, F1 is the F1-max
    assert res["image_F1"] == pytest.approx(res["image_F1_max"]) and res["pixel_F1"] == pytest.approx(
        res["pixel_F1_max"], rel=1e-6)
    assert 0 <= res["image_accuracy"] <= 100
    assert path.read_bytes() == before and not list(run.glob("**/*.tmp"))
    bare = {k: v for k, v in info.items() if k not in ("pixel_threshold", "image_threshold")}
    assert np.isnan(evaluate_anomaly_model(model, bare, str(data), progress=False)["pixel_F1"])
    with pytest.raises(ConfigError, match="names no category"):
        evaluate_anomaly_model(model, {k: v for k, v in info.items() if k != "category"}, str(data))


def test_predict_anomaly_model_equals_the_anomaly_predict_command(run: Path, data: Path, tmp_path: Path) -> None:
    images = data / "brick" / "test"
    assert main(["anomaly", "predict", str(images), f"out={run}", "category=brick", "progress=false",
                 f"predict_out={tmp_path / 'cli'}"]) == 0
    model, info = load_model_file(run / "brick" / "model.safetensors")
    res = predict_anomaly_model(model, info, [str(images)], tmp_path / "api")
    assert (res["images"], res["predicted"], res["skipped"], res["category"]) == (7, 7, 0, "brick")
    assert res["pixel_threshold"] == info["pixel_threshold"] and res["backend"] == "torch"
    cli = sorted((tmp_path / "cli").rglob("*.png"))
    assert len(cli) == 14
    for f in cli:
        assert f.read_bytes() == (tmp_path / "api" / f.relative_to(tmp_path / "cli")).read_bytes()
    with pytest.raises(ConfigError, match="already exist"):
        predict_anomaly_model(model, info, [str(images)], tmp_path / "api")
    low = predict_anomaly_model(model, info, [str(images)], tmp_path / "low", threshold=-1.0, image_threshold=-1.0)
    assert low["pixel_threshold"] == -1.0
    assert all(np.asarray(Image.open(m)).min() == 255 for m in (tmp_path / "low").rglob("*_mask.png"))
    bare = {k: v for k, v in info.items() if k != "pixel_threshold"}
    with pytest.raises(ConfigError, match="no stored threshold"):
        predict_anomaly_model(model, bare, [str(images)], tmp_path / "none")


def test_anomaly_spec_of_a_model_file(run: Path) -> None:
    info = read_model_info(run / "brick" / "model.safetensors")
    spec = anomaly_spec(info)
    assert (spec.img_size, spec.method) == (64, "patchcore")
    assert (spec.pixel_threshold, spec.image_threshold) == (info["pixel_threshold"], info["image_threshold"])
    clip = {"kind": "anomalyclip", "model_kwargs": {"backbone": {"kind": "domain", "arch": {"image_size": 96}},
                                                    "config": {"image_size": None}}}
    assert anomaly_spec(clip).img_size == 96 and anomaly_spec({**clip, "img_size": 32}).img_size == 32
    with pytest.raises(ConfigError, match="no input size"):
        anomaly_spec({"kind": "anomalyclip", "model_kwargs": {"backbone": {"kind": "open_clip"}, "config": {}}})


def test_anomalyclip_fit_writes_self_contained_model_files(run: Path, data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("open_clip")
    import torch

    from frugalvision.inspect.anomaly import AnomalyCLIP, AnomalyCLIPConfig, OpenCLIPBackbone
    from frugalvision.inspect.anomaly.anomalyclip import tiny_open_clip
    from frugalvision.weights import save_model_file

    torch.manual_seed(0)
    clip = AnomalyCLIP(OpenCLIPBackbone(tiny_open_clip()), AnomalyCLIPConfig(n_ctx=2, deep_depth=2, deep_n_ctx=1,
                                                                             feature_layers=(2, 4), sigma=1.0)).eval()
    source = save_model_file(clip, tmp_path / "source.safetensors", "anomalyclip", "anomalyclip", clip.model_kwargs())
    out = tmp_path / "run"
    assert main(["anomaly", "fit", f"data={data}", f"out={out}", "method=anomalyclip", f"backbone_weights={source}",
                 "categories=[moon]", "img_size=32", "progress=false", "report_images=1"]) == 0
    source.unlink()  # the category's file does not refer to it
    model, info = load_model_file(out / "moon" / "model.safetensors")
    assert info["kind"] == "anomalyclip" and info["category"] == "moon" and info["fit"]["train_images"] == 0
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x).anomaly_map, clip(x).anomaly_map)
    res = evaluate_anomaly_model(model, info, progress=False)
    assert res["category"] == "moon" and 0 <= res["pixel_AUROC"] <= 100
    pred = predict_anomaly_model(model, info, [str(data / "moon" / "test" / "good")], tmp_path / "pred")
    assert pred["predicted"] == 3 and anomaly_spec(info).img_size == 32
    code = main(["anomaly", "fit", f"data={data}", f"out={tmp_path / 'run2'}", "method=anomalyclip",
                 f"backbone_weights={run / 'moon' / 'model.safetensors'}", "categories=[moon]", "progress=false"])
    assert code == 2 and "holds a patchcore model" in capsys.readouterr().err

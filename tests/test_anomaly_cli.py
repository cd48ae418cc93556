"""`frugalvision anomaly fit|test|predict` on a small MVTec AD-layout folder (tiny backbone, 64 px)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frugalvision.cli import main
from frugalvision.inspect.bundled import build_benchmark

COMMON = ["backbone=resnet18", "backbone_weights=none", "layers=[2,3]", "img_size=64", "coreset_ratio=0.2",
          "batch_size=8", "progress=false", "report_images=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of part of the bundled benchmark: 2 categories, 6 train/good, 3 test/good, 2 kinds x 2."""
    src = build_benchmark()
    root = tmp_path_factory.mktemp("mvtec")
    for cat in ("brick", "moon"):
        for sub, n in (("train/good", 6), ("test/good", 3), ("test/hole", 2), ("test/scratch", 2)):
            (root / cat / sub).mkdir(parents=True)
            for f in sorted((src / cat / sub).glob("*.png"))[:n]:
                shutil.copy(f, root / cat / sub / f.name)
                if "good" not in sub:
                    gt = root / cat / "ground_truth" / sub.split("/")[1]
                    gt.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src / cat / "ground_truth" / sub.split("/")[1] / f"{f.stem}_mask.png", gt)
    return root


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "anomaly"
    assert main(["anomaly", "fit", f"data={data}", f"out={out}", "onnx=true", *COMMON]) == 0
    return out


def test_fit_writes_models_table_report_and_overlays(run: Path) -> None:
    from frugalvision.models.factory import read_model_info

    for cat in ("brick", "moon"):
        info = read_model_info(run / cat / "model.safetensors")
        assert info["method"] == "patchcore" and info["threshold_source"] == "F1-optimal on the test split"
        assert np.isfinite(info["pixel_threshold"]) and info["fit"]["bank"] == int(0.2 * 6 * 64)
        assert (run / cat / "model.onnx").is_file()
        assert len(list((run / "overlays" / cat).glob("*.png"))) == 2
    md = (run / "metrics.md").read_text()
    assert "| brick |" in md and "| mean |" in md and "AUPRO" in md
    html = (run / "report.html").read_text()
    assert html.count("<img") >= 4 and "pixel_AUROC" in html


def test_test_recomputes_with_a_given_threshold(run: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    from frugalvision.models.factory import read_model_info

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
    assert code == 2 and "anomalyclip" in err
    assert main(["anomaly", "fit", f"data={tmp_path / 'missing'}", f"out={tmp_path / 'x'}", *COMMON]) == 1

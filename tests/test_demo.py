from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from frugalvision.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "quick=true", f"out_dir={out}", "segmenter=ours:resnet10t", "img_size=64"])
    return code, out


def test_demo_quick_runs_every_stage_and_writes_a_report(demo_run):
    code, out = demo_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["stage_seconds"]) == ["data", "backbone", "synthesise", "train", "fuse", "export", "bench",
                                              "report"]
    assert metrics["onnx"]["max_abs_err"] < 1e-4 and metrics["fuse_max_abs_err"] < 1e-4
    assert {"mIoU", "pixel_AUROC", "F1_max"} <= set(metrics["test"])
    assert {(r["model"], r["backend"], r["precision"]) for r in metrics["speed"]} == {
        ("training form", "eager", "fp32"), ("fused", "eager", "fp32"), ("fused", "onnxruntime", "fp32"),
        ("fused", "eager", "bf16"), ("fused", "onnxruntime", "int8")}
    # the precision rows of its own segmenter: quality on the held-out defects, agreement with fp32, speed-ups
    prec = {r["precision"]: r for r in metrics["precision"]}
    assert list(prec) == ["fp32 eager", "fp32 onnxruntime", "bf16 eager (autocast)", "int8 onnxruntime (QDQ)"]
    for r in prec.values():
        assert 0.0 <= float(r["pixel agreement"]) <= 1.0 and r["speed-up b1"].endswith("x")
        assert set(r) >= {"mIoU", "pixel_AUROC"}
    html = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 1 + 8  # training curve + one overlay row per defect kind and a good image
    assert "image | ground truth | prediction | defect score" in html
    assert (out / "model.onnx").is_file() and (out / "synthetic" / "manifest.json").is_file()
    assert (out / "model.int8.onnx").is_file() and "Precision: fp32, bf16, int8" in html


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from check_report import check_report

    _, out = demo_run
    info = check_report(out / "report.html", screenshot=tmp_path / "shot.png")
    assert info["images"] >= 9 and info["broken"] == 0, info
    assert info["errors"] == [], info["errors"]
    assert info["title"].startswith("frugalvision demo")
    assert (tmp_path / "shot.png").stat().st_size > 10_000

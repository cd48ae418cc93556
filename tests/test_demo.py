from __future__ import annotations

import json
import re

from frugalvision.cli import main


def test_demo_quick_runs_every_stage_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "quick=true", f"out_dir={out}", "dataset=faces", "model=resnet10t", "img_size=32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stage_seconds"]) == {"data", "train", "evaluate", "export", "bench", "report"}
    assert metrics["onnx"]["max_abs_err"] < 1e-4
    assert {r["backend"] for r in metrics["speed"]} == {"eager", "onnxruntime"}
    html = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 2 and all(len(b) > 1000 for b in images)  # curve + predictions, embedded
    assert "<table>" in html and (out / "model.onnx").is_file() and (out / "report.md").is_file()
    assert str(out / "report.html") in capsys.readouterr().out

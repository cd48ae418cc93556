"""``export precision=int8|bf16``, and ``eval`` / ``predict`` of the files it writes, for every kind it covers.

bf16 files run with OpenVINO, which is loaded only in fresh interpreters (see tests/test_openvino.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from frugalvision.cli import main
from frugalvision.export.onnx import read_onnx_metadata
from frugalvision.weights import MODEL_META
from test_model_files import (  # noqa: F401
    SMALL,
    _anomalyclip,
    _detect,
    _detect_masks,
    _patchcore,
    _run,
    _segment,
    _surgery,
    _train,
    mvtec,
)

WRITERS = {"train": _train, "surgery": _surgery, "segment": _segment, "patchcore": _patchcore,
           "anomalyclip": _anomalyclip, "detect": _detect, "detect masks=true": _detect_masks}


def _description(path: Path) -> dict:
    return json.loads(read_onnx_metadata(path)[MODEL_META])


@pytest.mark.parametrize("command", list(WRITERS))
def test_int8_export_is_quantised_checked_and_runs(command, tmp_path, mvtec, capsys, one_thread,  # noqa: F811
                                                    monkeypatch):
    model_file = WRITERS[command](tmp_path, mvtec, capsys)
    out = tmp_path / "model.int8.onnx"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    res = _run(["export", f"model_file={model_file}", f"out={out}", "precision=int8", "calibration_images=4"],
               capsys)
    assert not list(cwd.iterdir()), "the quantiser left files in the working folder"
    assert res["precision"] == "int8" and out.is_file()
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, "no int8 in the graph"
    desc = _description(out)
    assert desc["precision"] == "int8"
    q = desc["quantization"]
    assert q["calibration"] == "minmax" and q["calibration_images"] == 4 and sum(q["quantized_ops"].values()) > 0
    assert q["first_and_last_in_float"] is True and sum(q["float_ops"].values()) >= 2
    if command == "patchcore":  # the backbone only: memory-bank distances and map smoothing stay in float
        assert q["scope"] == "backbone" and set(q["quantized_ops"]) == {"Conv"} and q["float_ops"].get("MatMul", 0)
        graph = onnx.load(str(out)).graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        int8 = [n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                and made_by.get(n.input[0]) == "DequantizeLinear"]
        assert int8 and all(n.startswith("/backbone/") for n in int8), int8
        # the whole graph on request; a scope that names no submodule is one line naming the submodules
        _run(["export", f"model_file={model_file}", f"out={tmp_path / 'w.onnx'}", "precision=int8",
              "calibration_images=4", "int8_scope=all", "accuracy_check=false"], capsys)
        whole = _description(tmp_path / "w.onnx")["quantization"]
        assert whole["scope"] == "whole graph" and whole["quantized_ops"].get("MatMul", 0) > 0
        assert main(["export", f"model_file={model_file}", f"out={tmp_path / 'n.onnx'}", "precision=int8",
                     "calibration_images=4", "int8_scope=neck"]) != 0
        err = capsys.readouterr().err
        assert "int8 scope 'neck' holds no quantisable node" in err and "backbone" in err and "Traceback" not in err
        assert not (tmp_path / "n.onnx").exists()
    else:
        assert q["scope"] == "whole graph"
    check = desc["accuracy_check"]
    assert check == res["accuracy_check"] and check["images"] > 0
    agree = [v for k, v in check.items() if k.endswith("agreement") or k in ("score_correlation", "box_recall",
                                                                              "box_precision")]
    assert agree and all(-1.0 <= a <= 1.0 for a in agree)
    assert set(check["int8"]) == set(check["fp32"]) and check["fp32"]
    # eval of the int8 file reproduces the int8 column of the check; predict runs it
    ev = _run(["eval", f"model_file={out}", *SMALL], capsys)
    assert ev["precision"] == "int8" and ev["runtime"] == "onnxruntime"
    for k, v in check["int8"].items():
        assert ev[k] == pytest.approx(v, abs=1e-3, nan_ok=True), k
    images = sorted((mvtec / "brick" / "test" / "hole").glob("*.png"))[:2]
    pred = _run(["predict", *map(str, images), f"model_file={out}", f"out={tmp_path / 'pred'}", *SMALL], capsys)
    assert pred["predicted"] == 2 and pred["precision"] == "int8"


def test_calibration_method_and_size_are_recorded(tmp_path, mvtec, capsys, one_thread):  # noqa: F811
    model_file = _train(tmp_path, mvtec, capsys)
    out = tmp_path / "p.onnx"
    _run(["export", f"model_file={model_file}", f"out={out}", "precision=int8", "calibration=percentile",
          "calibration_images=3", "accuracy_check=false"], capsys)
    desc = _description(out)
    assert desc["quantization"]["calibration"] == "percentile" and desc["quantization"]["calibration_images"] == 3
    assert "accuracy_check" not in desc
    # the file is written once: a second export refuses without overwrite=true
    assert main(["export", f"model_file={model_file}", f"out={out}", "precision=int8"]) != 0
    assert "already exists" in capsys.readouterr().err


def test_bad_precision_options_are_one_line(tmp_path, mvtec, capsys):  # noqa: F811
    cases = [
        (["export", "precision=int4"], "precision must be one of fp32, bf16, int8"),
        (["export", "precision=int8", "calibration=kl"], "calibration must be one of minmax, entropy, percentile"),
        (["export", "precision=int8", "calibration_images=0"], "calibration_images must be a positive integer"),
        (["eval", "precision=int8"], "int8 is an export"),
        (["predict", "x.png", "runtime=tensorrt"], "runtime must be one of"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


def test_a_mask_frozen_export_is_its_detector(tmp_path, mvtec, capsys, one_thread):  # noqa: F811
    model_file = _detect_masks(tmp_path, mvtec, capsys)
    out = tmp_path / "d.onnx"
    _run(["export", f"model_file={model_file}", f"out={out}"], capsys)
    desc = _description(out)
    assert desc["kind"] == "detector" and desc["source_file"] == str(model_file)
    # eval of the graph gives the box metrics of the model file (no mask metrics: the graph has no mask head)
    ev = _run(["eval", f"model_file={out}", *SMALL], capsys)
    pt = _run(["eval", f"model_file={model_file}", *SMALL], capsys)
    assert "mask_AP" not in ev and "mask_AP" in pt
    assert ev["AP50"] == pytest.approx(pt["AP50"], abs=0.5) and ev["runtime"] == "onnxruntime"


def test_bf16_eval_of_a_model_file_is_close_to_fp32(tmp_path, mvtec, capsys, one_thread):  # noqa: F811
    model_file = _segment(tmp_path, mvtec, capsys)
    fp32 = _run(["eval", f"model_file={model_file}", *SMALL], capsys)
    bf16 = _run(["eval", f"model_file={model_file}", "precision=bf16", *SMALL], capsys)
    assert bf16["precision"] == "bf16"
    assert bf16["pixel_AUROC"] == pytest.approx(fp32["pixel_AUROC"], abs=2.0)


def test_bf16_export_runs_with_openvino(tmp_path, mvtec, capsys, one_thread):  # noqa: F811
    model_file = _train(tmp_path, mvtec, capsys)
    script = tmp_path / "bf16.py"
    script.write_text(f"""
import json, sys
from frugalvision.cli import main
out = {str(tmp_path / 'm.bf16.onnx')!r}
assert main(["export", "model_file={model_file}", "out=" + out, "precision=bf16"]) == 0
assert main(["eval", "model_file=" + out, "progress=false"]) == 0
rc = main(["eval", "model_file=" + out, "runtime=onnxruntime", "progress=false"])
assert rc != 0, rc
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    export, ev = (json.loads(b) for b in _json_blocks(res.stdout))
    assert export["precision"] == "bf16" and export["accuracy_check"]["runtime"] == "openvino"
    assert 0.0 <= export["accuracy_check"]["top1_agreement"] <= 1.0
    assert ev["precision"] == "bf16" and ev["runtime"] == "openvino"
    assert ev["acc1"] == pytest.approx(export["accuracy_check"]["bf16"]["acc1"], abs=1e-3)
    assert "runs with OpenVINO's bf16 kernels" in res.stderr


def _json_blocks(text: str) -> list[str]:
    """Top-level JSON objects printed one after the other."""
    blocks, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
    return blocks


def test_with_precision_wraps_for_autocast():
    from frugalvision.pipelines.model_file import with_precision

    lin = torch.nn.Linear(8, 3)
    x = torch.randn(4, 8)
    assert with_precision(lin, "fp32") is lin
    out = with_precision(lin, "bf16")(x)
    assert out.dtype == torch.float32 and not torch.equal(out, lin(x))  # computed in bf16, returned as fp32
    torch.testing.assert_close(out, lin(x), atol=5e-2, rtol=5e-2)


def test_detection_agreement_matches_boxes_by_class_and_overlap():
    from frugalvision.pipelines.model_file import detection_agreement

    p = torch.zeros(1, 3, 6)  # (x1, y1, x2, y2), two class scores
    p[0, :, :4] = torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60.0]])
    p[0, :, 4:] = torch.tensor([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0]])
    same = detection_agreement(list(p), list(p.clone()))
    assert same["box_recall"] == same["box_precision"] == same["box_iou"] == 1.0 and same["detections"] == 3
    q = p.clone()
    q[0, 0, :4] += 2.0  # overlaps 0.47: not a match at 0.5
    q[0, 1, 4:] = torch.tensor([0.8, 0.0])  # the right box, the wrong class
    q[0, 2, :4] += torch.tensor([0.0, 0.0, 1.0, 1.0])  # IoU 100/121
    moved = detection_agreement(list(p), list(q))
    assert moved["box_recall"] == moved["box_precision"] == round(1 / 3, 4)
    assert moved["box_iou"] == pytest.approx(100 / 121, abs=1e-4)
    none = detection_agreement(list(p), list(torch.zeros_like(p)))
    assert none["box_recall"] == 0.0 and none["box_precision"] == 1.0 and none["box_iou"] is None

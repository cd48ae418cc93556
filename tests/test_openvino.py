"""OpenVINO runner and benchmark rows, each run in a fresh interpreter.

OpenVINO's worker threads, once loaded, make a process that later forks DataLoader workers and reaps child
processes crash (segfault), so these tests never load it into the pytest process itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run_isolated(tmp_path, body: str) -> None:
    script = tmp_path / "check.py"
    script.write_text("import numpy as np\nimport torch\nfrom torch import nn\n" + textwrap.dedent(body))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"isolated check failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_openvino_runner_matches_pytorch_on_structured_outputs(tmp_path):
    _run_isolated(tmp_path, """
        import sys
        from pathlib import Path

        from frugalvision.export import OpenVinoRunner, export_onnx

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)

            def forward(self, x):
                a = self.conv(x)
                return a.mean((1, 2, 3)), a.amax(1)

        torch.manual_seed(0)
        m = TwoHeads().eval()
        res = export_onnx(m, Path(sys.argv[1]) / "m.onnx", (2, 3, 8, 8), output_names=["score", "amap"])
        runner = OpenVinoRunner(res.path, threads=1)
        x = torch.randn(3, 3, 8, 8)  # a batch size the export did not see
        s, a = runner(x)
        ref = m(x)
        torch.testing.assert_close(torch.from_numpy(s), ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(a), ref[1], atol=1e-5, rtol=1e-5)
        try:
            runner(x, x)
        except ValueError as e:
            assert "takes 1 input" in str(e), e
        else:
            raise AssertionError("two inputs for a one-input graph were accepted")
    """)


def test_openvino_runner_reports_bad_files_and_hints(tmp_path):
    _run_isolated(tmp_path, """
        import sys
        from pathlib import Path

        from frugalvision.export import ExportError, OpenVinoRunner

        bad = Path(sys.argv[1]) / "broken.onnx"
        bad.write_bytes(b"not an onnx file")
        for kwargs, exc, text in (({}, ExportError, "broken.onnx"), ({"hint": "FAST"}, ValueError, "hint must be")):
            try:
                OpenVinoRunner(bad, **kwargs)
            except exc as e:
                assert text in str(e), e
            else:
                raise AssertionError(f"no {exc.__name__} for {kwargs}")
    """)


def test_benchmark_openvino_rows_follow_their_model(tmp_path):
    _run_isolated(tmp_path, """
        from frugalvision.bench import benchmark

        models = {"a": nn.Conv2d(3, 4, 3), "b": nn.Conv2d(3, 8, 3)}
        rows, _ = benchmark(models, img_size=16, batch_size=2, warmup=1, repeats=3, throughput_repeats=2,
                            progress=False, onnx=True, openvino=True, memory=False)
        got = [(r.name, r.backend) for r in rows]
        assert got == [("a", "eager"), ("a", "onnxruntime"), ("a", "openvino"), ("b", "eager"),
                       ("b", "onnxruntime"), ("b", "openvino")], got
        assert all(r.latency_ms > 0 and r.gflops == rows[0 if r.name == "a" else 3].gflops for r in rows)
        rows, _ = benchmark(models, img_size=16, batch_size=2, warmup=1, repeats=2, throughput_repeats=1,
                            progress=False, openvino=True, memory=False)
        assert [r.backend for r in rows] == ["eager", "openvino", "eager", "openvino"]
    """)


def test_openvino_docstring_examples(tmp_path):
    _run_isolated(tmp_path, """
        import doctest

        import frugalvision.export.openvino as mod

        failed, attempted = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert attempted > 0 and failed == 0, (failed, attempted)
    """)


def test_isolation_reports_failures(tmp_path):
    with pytest.raises(AssertionError, match="isolated check failed"):
        _run_isolated(tmp_path, "assert 1 == 2, 'the check itself'\n")

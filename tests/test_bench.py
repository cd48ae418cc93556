from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from frugalvision.bench import benchmark, count_flops, count_params, peak_memory_mb, results_to_markdown, write_results


def test_flops_match_the_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: out pixels * out channels * (in channels * k * k)
    assert count_flops(conv, torch.randn(1, 3, 16, 16)) == 2 * 16 * 16 * 8 * 3 * 9
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert count_flops(mlp, torch.randn(4, 10)) == 2 * 4 * (10 * 20 + 20 * 5)
    assert count_params(mlp) == 10 * 20 + 20 + 20 * 5 + 5


def test_shared_parameters_counted_once():
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, lin)
    assert count_params(tied) == 20


def test_peak_memory_tracks_intermediates():
    x = torch.randn(2, 3, 32, 32)
    small = nn.Conv2d(3, 4, 3, padding=1)
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 3, padding=1))
    m_small, m_big = peak_memory_mb(small, x), peak_memory_mb(big, x)
    out_bytes = 2 * 4 * 32 * 32 * 4
    assert m_small * 2**20 >= out_bytes
    assert m_big * 2**20 >= 2 * 64 * 32 * 32 * 4  # the 64-channel activation was alive at the peak
    assert m_big > 4 * m_small


def test_side_by_side_ratios_and_tables(tmp_path):
    models = {"small": nn.Conv2d(3, 4, 3), "big": nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(6)])}
    rows, info = benchmark(models, img_size=32, batch_size=4, warmup=1, repeats=5, throughput_repeats=3,
                           progress=False, onnx=True)
    assert [(r.name, r.backend) for r in rows] == [("small", "eager"), ("small", "onnxruntime"), ("big", "eager"),
                                                    ("big", "onnxruntime")]
    assert rows[0].latency_ratio == 1.0 and rows[0].throughput_ratio == 1.0
    for r in rows:
        assert r.latency_ms > 0 and r.throughput > 0
        assert r.latency_ratio == pytest.approx(rows[0].latency_ms / r.latency_ms)
        assert r.achieved_gflops == pytest.approx(r.gflops * r.throughput)
        assert r.peak_fraction == pytest.approx(r.achieved_gflops / info.matmul_peak_gflops)
    assert rows[2].gflops > rows[0].gflops
    assert info.matmul_peak_gflops > 0 and info.cores >= 1 and info.torch == torch.__version__
    csv_path, md_path = write_results(rows, info, tmp_path / "out", title="T", command="frugalvision bench x")
    table = list(csv.DictReader(csv_path.open()))
    assert len(table) == 4 and table[0]["machine"] == info.line()
    md = md_path.read_text()
    assert "Machine:" in md and "frugalvision bench x" in md and md.count("| small |") == 2


class _ConvNet(nn.Module):
    """Dense conv, depth-wise conv, channels-last linear and an activation-activation matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.fc = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.dw(self.conv(x))).permute(0, 2, 3, 1)).flatten(1, 2)  # (B, HW, 24)
        return y.transpose(1, 2) @ y  # (B, 24, 24)


def test_ort_profile_counts_the_same_flops_as_torch(tmp_path):
    from frugalvision.bench import profile_onnx
    from frugalvision.export import export_onnx

    model, x = _ConvNet().eval(), torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, x, exporter="torchscript")
    prof = profile_onnx(path, x, threads=1, runs=4, warmup=2)
    assert prof.runs == 4 and prof.threads == 1
    assert prof.gflop * 1e9 == pytest.approx(count_flops(model, x), rel=1e-6)
    assert sum(o.share for o in prof.ops) == pytest.approx(1.0)
    assert prof.kernel_ms == pytest.approx(sum(o.ms for o in prof.ops)) and 0 < prof.kernel_ms <= prof.run_ms
    by = {o.op_type: o for o in prof.ops}
    dw = by["Conv (depth-wise)"]
    assert dw.calls == 1 and dw.gflop * 1e9 == pytest.approx(2 * 2 * 16 * 16 * 16 * 25)
    assert all(o.gflops_per_s > 0 for o in prof.ops if o.gflop)
    md = prof.to_markdown(peak_gflops=100.0, top=2)
    assert "of matmul peak" in md and "other (" in md and "**all kernels**" in md


def test_ort_profile_rejects_missing_inputs(tmp_path):
    from frugalvision.bench import profile_onnx
    from frugalvision.export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(nn.Linear(4, 2).eval(), path, torch.randn(1, 4), exporter="torchscript")
    with pytest.raises(ValueError, match="no array given"):
        profile_onnx(path, {"x": np.zeros((1, 4), np.float32)}, runs=1)
    with pytest.raises(ValueError, match="runs must be"):
        profile_onnx(path, np.zeros((1, 4), np.float32), runs=0)


def test_ort_profile_by_shape_splits_rows_and_keeps_totals(tmp_path):
    from frugalvision.bench import profile_onnx
    from frugalvision.export import export_onnx

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(16, 32)
    path = tmp_path / "mlp.onnx"
    export_onnx(model, path, x, exporter="torchscript")
    by_op = profile_onnx(path, x, threads=1, runs=3, warmup=1)
    by_shape = profile_onnx(path, x, threads=1, runs=3, warmup=1, group_by="shape")
    gemms = [o for o in by_shape.ops if "Gemm" in o.op_type]
    assert sorted(o.op_type for o in gemms) == ["FusedGemm (16, 32) x (64,)", "FusedGemm (16, 64) x (64,)",
                                                "Gemm (16, 64) x (8,)"]
    assert sum(o.calls for o in gemms) == 3 and by_shape.gflop == pytest.approx(by_op.gflop)
    assert by_shape.gflop * 1e9 == pytest.approx(count_flops(model, x))
    with pytest.raises(ValueError, match="group_by"):
        profile_onnx(path, x, group_by="node")


def test_precision_rows_and_their_peaks(tmp_path):
    from frugalvision.bench import int8_matmul_peak_gops, matmul_peak_gflops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(),
                          nn.LazyLinear(4)).eval()
    model(torch.randn(1, 3, 16, 16))
    rows, info = benchmark({"m": model}, img_size=16, batch_size=4, repeats=3, throughput_repeats=2, warmup=1,
                           onnx=True, precisions=("fp32", "bf16", "int8"), progress=False)
    assert [(r.backend, r.precision) for r in rows] == [("eager", "fp32"), ("eager", "bf16"),
                                                         ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    assert info.bf16_peak_gflops > 0 and "bf16 peak" in info.line()
    assert (info.int8_peak_gops is None) == (int8_matmul_peak_gops(sizes=(64,), seconds=0.01) is None)
    for r in rows:  # each row against the peak of its own precision
        peak = {"fp32": info.matmul_peak_gflops, "bf16": info.bf16_peak_gflops, "int8": info.int8_peak_gops}
        if peak[r.precision]:
            assert r.peak_fraction == pytest.approx(r.achieved_gflops / peak[r.precision])
    assert "| precision |" in results_to_markdown(rows, info)
    assert matmul_peak_gflops(sizes=(64,), seconds=0.01, dtype=torch.bfloat16) > 0
    with pytest.raises(ValueError, match="int8 rows run an exported graph"):
        benchmark({"m": model}, img_size=16, precisions=("int8",), progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        benchmark({"m": model}, img_size=16, precisions=("fp8",), progress=False)

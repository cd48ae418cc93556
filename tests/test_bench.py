from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from frugalvision.bench import benchmark, count_flops, count_params, peak_memory_mb, write_results


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

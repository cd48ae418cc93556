from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from frugalvision.export import ExportError, OrtRunner, export_onnx


class Out(NamedTuple):
    score: torch.Tensor
    amap: torch.Tensor


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Out:
        a = self.conv(x)
        return Out(a.mean((1, 2, 3)), a.amax(1))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_checks_parity_at_two_batch_sizes(tmp_path, exporter):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    res = export_onnx(m, tmp_path / "m.onnx", (1, 3, 16, 16), exporter=exporter)
    assert res.exporter == exporter and res.checked_batch_sizes == (1, 2) and res.max_abs_err < 1e-5
    out = OrtRunner(res.path)(torch.randn(5, 3, 16, 16))[0]
    assert out.shape == (5, 8)


def test_structured_outputs_are_flattened(tmp_path):
    m = TwoHeads().eval()
    res = export_onnx(m, tmp_path / "m.onnx", (2, 3, 8, 8), output_names=["score", "amap"])
    runner = OrtRunner(res.path)
    x = torch.randn(3, 3, 8, 8)
    s, a = runner(x)
    ref = m(x)
    torch.testing.assert_close(torch.from_numpy(s), ref.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(a), ref.amap, atol=1e-5, rtol=1e-5)
    assert runner.output_names == ["score", "amap"]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_batch_parallel_sessions_match_one_session(tmp_path, batch):
    m = TwoHeads().eval()
    res = export_onnx(m, tmp_path / "m.onnx", (2, 3, 8, 8), output_names=["score", "amap"])
    x = torch.randn(batch, 3, 8, 8)
    one = OrtRunner(res.path, threads=1)(x)
    split = OrtRunner(res.path, threads=2, batch_parallel=3)
    outs = split(x)
    assert len(split.sessions) == 3 and [o.shape for o in outs] == [o.shape for o in one]
    for a, b in zip(outs, one, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6, rtol=1e-6)
    split.close()


def test_batch_parallel_rejects_bad_values(tmp_path):
    res = export_onnx(TwoHeads().eval(), tmp_path / "m.onnx", (2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch_parallel"):
        OrtRunner(res.path, batch_parallel=0)
    with pytest.raises(ValueError, match="input"):
        OrtRunner(res.path)(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))


class BakedBatch(nn.Module):
    """Uses the batch size as a Python number: exported graphs bake the example's batch size in."""

    def forward(self, x):
        return x * float(x.shape[0])


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_unfaithful_export_is_refused_and_not_left_behind(tmp_path, exporter):
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="batch"):
        export_onnx(BakedBatch(), target, (2, 4), exporter=exporter)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # with a fixed batch size the same model exports faithfully
    assert export_onnx(BakedBatch(), target, (2, 4), dynamic_batch=False).checked_batch_sizes == (2,)


def test_export_restores_training_mode(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    export_onnx(m, tmp_path / "m.onnx", (1, 4))
    assert m.training

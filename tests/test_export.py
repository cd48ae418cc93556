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


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten()).eval()


def test_external_data_goes_to_one_file_per_model_and_exports_never_share_it(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    a, b = _convnet(0), _convnet(1)
    ra = export_onnx(a, tmp_path / "a.onnx", x, external_data=True)
    rb = export_onnx(b, tmp_path / "b.onnx", x, external_data=True)
    assert ra.data_path == tmp_path / "a.onnx.data" and rb.data_path == tmp_path / "b.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]
    assert ra.data_path.stat().st_size > ra.path.stat().st_size  # the weights really moved out of the graph
    for model, res in ((a, ra), (b, rb)):
        got = torch.from_numpy(OrtRunner(res.path, threads=1)(x)[0])
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    # the same name again, now self-contained: the old weights file is gone and the graph still runs
    res = export_onnx(a, tmp_path / "a.onnx", x)
    assert res.data_path is None and not (tmp_path / "a.onnx.data").exists()
    torch.testing.assert_close(torch.from_numpy(OrtRunner(res.path, threads=1)(x)[0]), a(x), atol=1e-5, rtol=1e-5)


def test_per_tensor_external_files_are_gathered_into_one(tmp_path):
    import onnx

    from frugalvision.export.onnx import _store_weights

    m, x = _convnet(2), torch.randn(1, 3, 8, 8)
    stage = tmp_path / "stage"
    stage.mkdir()
    path = export_onnx(m, stage / "m.onnx", x, check=False).path
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(stage.iterdir())) > 2  # one file per tensor, as exporters write graphs over 2 GB
    assert _store_weights(path, external=False)
    assert sorted(p.name for p in stage.iterdir()) == ["m.onnx", "m.onnx.data"]
    torch.testing.assert_close(torch.from_numpy(OrtRunner(path, threads=1)(x)[0]), m(x), atol=1e-5, rtol=1e-5)


def test_failed_export_leaves_no_stage_behind(tmp_path):
    class Unfaithful(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (2.0 if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() else 1.0)

    (tmp_path / "keep.onnx").write_bytes(b"previous content")
    with pytest.raises(ExportError):
        export_onnx(Unfaithful(), tmp_path / "keep.onnx", (1, 4), exporter="torchscript", external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.onnx"]
    assert (tmp_path / "keep.onnx").read_bytes() == b"previous content"


@pytest.mark.slow
def test_model_over_2gb_exports_with_one_weights_file(tmp_path):
    torch.manual_seed(0)
    h = 23200
    big = nn.Sequential(nn.Linear(256, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 4)).eval()
    assert sum(p.numel() for p in big.parameters()) * 4 > 2**31  # over protobuf's limit
    res = export_onnx(big, tmp_path / "big.onnx", torch.randn(1, 256))
    assert res.data_path == tmp_path / "big.onnx.data" and res.max_rel_err <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]

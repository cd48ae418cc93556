"""fv.fuse: re-parameterise + fold every Conv-BN / Linear-BN pair, verify, refuse (original untouched) on mismatch.

Whole networks with random BN statistics are compared relative to their largest output (see tests/test_rep.py).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import frugalvision as fv
from frugalvision.errors import ConfigError
from frugalvision.export import FuseError, export_onnx, fuse_with_report
from frugalvision.utils.testing import randomize_bn_stats


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _bns(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_byobnet", "test_efficientrep"])
def test_fuse_timm_and_our_models(name):
    model = randomize_bn_stats(timm.create_model(name)).train()
    before = _snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    fused, report = fuse_with_report(model, x)
    assert not fused.training and model.training  # original keeps its mode ...
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # ... and its weights
    assert _bns(fused) == [] and report.remaining_bn == []
    assert report.conv_bn or report.reparameterized
    assert report.max_rel_err is not None and report.max_rel_err <= 1e-5
    with torch.no_grad():
        assert _rel_err(fused(x), model.eval()(x)) <= 1e-5
    # still the same timm model: its methods work on the fused copy
    assert type(fused) is type(model)
    fused.reset_classifier(3)
    assert fused(x).shape == (2, 3)


def test_batchnorm_act_keeps_its_activation():
    model = randomize_bn_stats(timm.create_model("test_efficientnet")).eval()
    act = type(model.bn1.act)
    fused = fv.fuse(model, (2, 3, 32, 32))
    assert isinstance(fused.bn1, act) and fused.conv_stem.bias is not None


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_branch_models_become_single_conv(name):
    model = randomize_bn_stats(timm.create_model(name)).eval()
    x = torch.randn(1, 3, 64, 64)
    fused, report = fuse_with_report(model, x)
    assert report.reparameterized and _bns(fused) == []
    assert report.max_rel_err <= 1e-5
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert n_convs <= sum(isinstance(m, nn.Conv2d) for m in model.modules()) / 2


def test_sequential_conv_bn_and_linear_bn1d():
    model = randomize_bn_stats(nn.Sequential(
        nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.ReLU(),  # conv1d + bn1d
        nn.Flatten(), nn.Linear(6 * 14, 5), nn.BatchNorm1d(5),
    )).eval()
    x = torch.randn(3, 4, 16)
    fused, report = fuse_with_report(model, x)
    assert report.conv_bn == [("0", "1")] and report.linear_bn == [("4", "5")]
    assert report.traced == [""]
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_linear_bn1d_over_the_wrong_axis_is_not_folded():
    # Linear on (N, L, C) then BatchNorm1d(L): BN normalises L, not the linear's features: folding would be wrong
    model = randomize_bn_stats(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))).eval()
    x = torch.randn(2, 8, 8)
    fused, report = fuse_with_report(model, x)
    assert report.linear_bn == [] and len(_bns(fused)) == 1
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if x.mean() > -1e9:  # always true, but fx cannot know
            x = self.bn(self.conv(x))
        return x


def test_untraceable_model_uses_module_graph_fallback():
    model = randomize_bn_stats(_Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse_with_report(model, x)
    assert "" in report.untraced and "body" in report.traced
    assert report.conv_bn == [("body.0", "body.1")]
    assert report.remaining_bn == ["bn"]  # attribute pairs are only folded for registered containers
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_conv_output_with_two_users_is_not_folded():
    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the raw conv output is used too

    model = randomize_bn_stats(Tap()).eval()
    fused, report = fuse_with_report(model, torch.randn(2, 3, 4, 4))
    assert report.conv_bn == [] and len(_bns(fused)) == 1


def test_shared_and_stateless_bn_are_left_alone():
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    shared = nn.Sequential(conv, bn, conv, bn)  # the same modules twice
    stateless = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    for model in (randomize_bn_stats(shared), stateless):
        fused, report = fuse_with_report(model.eval(), torch.randn(2, 3, 4, 4))
        assert report.conv_bn == [] and _bns(fused)


class _BadFuse(nn.Module):
    """A block whose own ``fuse()`` is wrong: the check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def fuse(self) -> nn.Module:
        wrong = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            wrong.weight.copy_(self.conv.weight * 1.01)
            wrong.bias.copy_(self.conv.bias)
        return wrong


def test_mismatch_is_refused_and_original_untouched():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), _BadFuse()).train()
    randomize_bn_stats(model)
    before = _snapshot(model)
    with pytest.raises(FuseError, match=r"differs from the original by up to [0-9.e-]+") as err:
        fv.fuse(model, (2, 3, 8, 8))
    assert "unchanged" in str(err.value)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], _BadFuse) and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # with a loose enough tolerance (or without the check) it goes through
    assert isinstance(fv.fuse(model, (2, 3, 8, 8), rtol=0.1)[2], nn.Conv2d)
    assert isinstance(fv.fuse(model, (2, 3, 8, 8), verify=False)[2], nn.Conv2d)


def test_probe_errors_are_clear():
    with pytest.raises(ConfigError, match="pass example="):
        fv.fuse(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    with pytest.raises(ConfigError, match=r"fails on the probe input of shape \(2, 5, 8, 8\)"):
        fv.fuse(nn.Sequential(nn.Conv2d(3, 3, 1)), (2, 5, 8, 8))
    with pytest.raises(ConfigError, match="rtol and atol"):
        fv.fuse(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), rtol=-1)
    # the model's own pretrained_cfg gives the probe when no example is passed
    assert _bns(fv.fuse(timm.create_model("test_efficientrep"))) == []


def test_fuse_keeps_frozen_parameters_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[0].weight.requires_grad_(False)
    fused = fv.fuse(model, (1, 3, 8, 8))
    assert not fused[0].weight.requires_grad and not fused[0].bias.requires_grad


def test_fuse_features_only_model():
    model = randomize_bn_stats(timm.create_model("test_efficientrep", features_only=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = fv.fuse(model, x)
    assert _bns(fused) == []
    with torch.no_grad():
        for f, r in zip(fused(x), model(x), strict=True):
            assert _rel_err(f, r) <= 1e-5


def test_fused_model_exports_to_onnx_with_parity(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = randomize_bn_stats(timm.create_model("test_efficientrep")).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = fv.fuse(model, x)
    with torch.no_grad():
        scale = float(fused(x).abs().max())
    # tolerance relative to the output scale (random BN statistics make the logits large)
    res = export_onnx(fused, tmp_path / "fused.onnx", x, atol=1e-5 * scale, rtol=1e-4)
    assert res.checked_batch_sizes == (1, 2) and res.max_abs_err <= 1e-5 * scale
    graph = onnx.load(str(res.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops
    n_rep = sum(isinstance(m, fv.models.rep.RepConv) for m in model.modules())
    n_plain = sum(isinstance(m, fv.models.rep.ConvBNAct) for m in model.modules())
    assert ops.count("Conv") == n_rep + n_plain  # one Conv per block: the single-conv form reached the graph


def test_modules_timm_keeps_opaque_are_searched_too():
    # MobileViT-v2 blocks are registered in timm as not traceable: the graph holds them as leaves
    model = randomize_bn_stats(timm.create_model("mobilevitv2_050")).eval()
    fused, report = fuse_with_report(model, torch.randn(2, 3, 64, 64))
    assert "stages.2.1" in report.untraced and ("stages.2.1.conv_kxk.conv", "stages.2.1.conv_kxk.bn") in report.conv_bn
    assert _bns(fused) == [] and report.max_rel_err <= 1e-5

"""RepConv / EfficientRep: branch folding is exact, the fused form is a single conv, official YOLOv6 parity.

Tolerances: single blocks have O(1) outputs and are compared element-wise at 1e-5. Whole networks in eval mode
with random BN statistics (unrelated to their activations) grow geometrically with depth, so they are compared
relative to the largest output: max |fused - unfused| <= 1e-5 * max |unfused| (float32 epsilon is 1.2e-7).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

import frugalvision  # noqa: F401  (registers the models)
from frugalvision.models.rep import (
    BottleRep,
    ConvBNAct,
    CSPStackRep,
    EfficientRep,
    RepConv,
    RepStack,
    SimCSPSPPF,
    SimSPPF,
    checkpoint_filter_fn,
    efficientrep_config,
)
from frugalvision.utils.testing import randomize_bn_stats

VARIANTS = ["efficientrep_n", "efficientrep_s", "efficientrep_m"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _bns(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_chs=8, out_chs=8),  # all three branches
        dict(in_chs=8, out_chs=8, stride=2),  # no identity
        dict(in_chs=6, out_chs=10),  # no identity
        dict(in_chs=8, out_chs=8, groups=4),  # grouped identity kernel
        dict(in_chs=8, out_chs=8, kernel_size=5),  # 1x1 padded to 5x5
        dict(in_chs=8, out_chs=8, use_1x1=False),
        dict(in_chs=8, out_chs=8, act_layer=nn.SiLU),
    ],
    ids=["full", "stride2", "widen", "groups", "k5", "no1x1", "silu"],
)
def test_repconv_reparameterize_exact(kwargs):
    block = randomize_bn_stats(RepConv(**kwargs)).eval()
    x = torch.randn(2, kwargs["in_chs"], 13, 11)  # odd sizes: padding and stride alignment of the branches
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())
    # the single-conv form: one conv with bias, no BN, branches gone
    assert block.conv_kxk is None and block.conv_1x1 is None and block.identity is None
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].bias is not None and _bns(block) == 0
    assert convs[0].kernel_size == (kwargs.get("kernel_size", 3),) * 2
    assert block.num_branches == 1
    block.reparameterize()  # idempotent
    with torch.no_grad():
        assert torch.equal(block(x), out)


def test_repconv_branches_and_training_form():
    assert RepConv(8, 8).num_branches == 3
    assert RepConv(8, 8, stride=2).num_branches == 2
    assert RepConv(4, 8).identity is None
    # in training mode the block is really multi-branch: BN uses batch statistics in every branch
    block = RepConv(4, 4).train()
    block(torch.randn(4, 4, 8, 8)).sum().backward()
    assert block.conv_1x1.conv.weight.grad is not None and block.identity.weight.grad is not None


def test_repconv_inference_mode_loads_fused_weights():
    block = randomize_bn_stats(RepConv(8, 8)).eval()
    block.reparameterize()
    deploy = RepConv(8, 8, inference_mode=True).eval()
    deploy.load_state_dict(block.state_dict())
    x = torch.randn(1, 8, 7, 7)
    assert torch.equal(deploy(x), block(x))


def test_repconv_bad_arguments():
    with pytest.raises(ValueError, match="odd kernel_size"):
        RepConv(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        RepConv(6, 8, groups=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvBNAct(6, 8, 3),
        lambda: RepStack(6, 8, n=3),
        lambda: BottleRep(8, 8),
        lambda: BottleRep(6, 8),
        lambda: CSPStackRep(12, 12, n=4, e=2 / 3),
        lambda: SimSPPF(8, 8),
        lambda: SimCSPSPPF(8, 8),
    ],
    ids=["convbnact", "repstack", "bottlerep", "bottlerep_noshortcut", "cspstackrep", "simsppf", "simcspsppf"],
)
def test_blocks_fuse_exact_and_single_conv(make):
    block = randomize_bn_stats(make()).eval()
    cin = next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, cin, 12, 12)
    with torch.no_grad():
        ref = block(x)
        fused = reparameterize_model(nn.Sequential(block))  # timm's function visits children of its argument
        out = fused(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())
    assert _bns(fused) == 0
    assert all(m.reparam is not None for m in fused.modules() if isinstance(m, RepConv))
    assert _bns(block) > 0  # timm's function works on a copy by default


@pytest.mark.parametrize("name", ["test_efficientrep", "efficientrep_csp_tiny"]
                         + [pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_models_fuse_exact(name):
    if name == "efficientrep_csp_tiny":  # the M layout (CSPStackRep + SimSPPF) at test size
        model = timm.create_model("efficientrep_m", channels=(8, 16, 24, 32, 48), depths=(1, 4, 2, 2, 2))
    else:
        model = timm.create_model(name)
    model = randomize_bn_stats(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits = model(x)
        ref_feats = model.forward_intermediates(x, intermediates_only=True)
        fused = reparameterize_model(model)
        logits = fused(x)
        feats = fused.forward_intermediates(x, intermediates_only=True)
    assert _rel_err(logits, ref_logits) <= 1e-5
    for f, r in zip(feats, ref_feats, strict=True):
        assert _rel_err(f, r) <= 1e-5
    # single-conv form: one conv per RepConv, no BN anywhere, as many convs as RepConvs + plain convs
    reps = [m for m in fused.modules() if isinstance(m, RepConv)]
    assert reps and all(m.num_branches == 1 for m in reps)
    assert _bns(fused) == 0
    plain = sum(isinstance(m, ConvBNAct) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == len(reps) + plain


def test_variant_shapes_follow_yolov6_configs():
    # widths make_divisible(c * w, 8), depths round(n * d) (YOLOv6 build_network)
    assert efficientrep_config(0.5, 0.33) == {"channels": (32, 64, 128, 256, 512), "depths": (1, 2, 4, 6, 2)}
    m = timm.create_model("efficientrep_m")
    assert [f["num_chs"] for f in m.feature_info] == [48, 96, 192, 384, 768]
    assert [len(m.stages[i][1].m) for i in range(4)] == [2, 3, 5, 2]  # BottleReps = depth // 2
    assert isinstance(m.stages[3][2], SimSPPF)
    n = timm.create_model("efficientrep_n")
    assert [len(n.stages[i][1]) for i in range(4)] == [2, 4, 6, 2]
    assert isinstance(n.stages[3][2], SimCSPSPPF)
    assert [f["reduction"] for f in n.feature_info] == [2, 4, 8, 16, 32]


def test_features_only_gives_p2_to_p5_for_heads():
    m = timm.create_model("test_efficientrep", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    feats = m(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert m.feature_info.channels() == [16, 32, 48, 64]


def test_bad_config():
    with pytest.raises(ValueError, match="stage_block"):
        EfficientRep(stage_block="vgg")
    with pytest.raises(ValueError, match="5 entries"):
        EfficientRep(channels=(8, 16))


# ------------------------------------------------------------------------------- official implementation parity
def _official():
    """YOLOv6's own modules from the `yolov6detect` package, without its heavy package __init__ (cv2, ...)."""
    if "yolov6" not in sys.modules:
        spec = importlib.util.find_spec("yolov6")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("official YOLOv6 code not installed (pip install --no-deps yolov6detect)")
        pkg = types.ModuleType("yolov6")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["yolov6"] = pkg
    from yolov6.layers.common import RepVGGBlock
    from yolov6.models import efficientrep

    return efficientrep, RepVGGBlock


@pytest.mark.parametrize("layout", ["n", "m"])
def test_official_yolov6_parity(layout):
    efficientrep, RepVGGBlock = _official()
    if layout == "n":  # EfficientRep + SimCSPSPPF (YOLOv6-N/S v3.0), scaled down
        channels, depths = (8, 16, 24, 32, 48), (1, 2, 4, 2, 2)
        ref = efficientrep.EfficientRep(3, list(channels), list(depths), block=RepVGGBlock, fuse_P2=True,
                                        cspsppf=True)
        ours = timm.create_model("efficientrep_n", channels=channels, depths=depths, num_classes=0)
    else:  # CSPBepBackbone with BepC3 (e = 2/3) + SimSPPF (YOLOv6-M), scaled down
        channels, depths = (12, 24, 36, 48, 60), (1, 4, 2, 3, 2)
        ref = efficientrep.CSPBepBackbone(3, list(channels), list(depths), block=RepVGGBlock, csp_e=2 / 3,
                                          fuse_P2=True)
        ours = timm.create_model("efficientrep_m", channels=channels, depths=depths, num_classes=0)
    randomize_bn_stats(ref, seed=1).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.7)
    # an official detector checkpoint: backbone.* plus neck/head weights that must be dropped
    sd = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    sd["neck.reduce_layer0.conv.weight"] = torch.zeros(1)
    sd["detect.stems.0.conv.weight"] = torch.zeros(1)
    ours.load_state_dict(checkpoint_filter_fn(sd, ours), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)  # P2..P5
        got = ours.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        assert len(got) == len(expected) == 4
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and _rel_err(g, e) <= 1e-5
        # both sides' deploy forms agree too
        for m in ref.modules():
            if hasattr(m, "switch_to_deploy"):
                m.switch_to_deploy()
        ours = reparameterize_model(ours)
        for g, e in zip(ours.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True), ref(x),
                        strict=True):
            assert _rel_err(g, e) <= 1e-5


def test_checkpoint_filter_passes_our_keys_through():
    m = timm.create_model("test_efficientrep")
    sd = m.state_dict()
    assert checkpoint_filter_fn(sd, m).keys() == sd.keys()

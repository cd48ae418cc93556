"""FasterViT any resolution: parity with the reference ``faster_vit_any_res`` module, sizes, bad sizes."""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import timm
import torch

import frugalvision  # noqa: F401  (registers our models)
from fastervit_parity import assert_gradients_match, rel
from frugalvision.bench import count_flops, count_params
from frugalvision.models.fastervit import FasterViT, checkpoint_filter_fn
from frugalvision.utils.testing import perturb_parameters, randomize_bn_stats

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = pytest.importorskip("fastervit.models.faster_vit_any_res")

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: a second thread only adds overhead

_HAT2 = dict(dim=16, in_dim=8, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4], window_size=[8, 8, 4, 4], ct_size=2,
             mlp_ratio=4, hat=[False, False, True, True], layer_scale=0.5, layer_scale_conv=0.5, do_propagation=True)
TINY = {
    # 160x256: stage 3 10x16 -> padded 12x16, 3x4 windows (non-square 6x8 carrier grid: no carrier position
    # embedding, 6x6 bias grid + 12 zero-bias tokens, the reference's re-windowing); stage 4 5x8 -> 8x8, 2x2 windows
    # (square carrier grid, with padding); layer scale everywhere, propagation
    "hat2_160x256": (_HAT2, [160, 256]),
    # 113x160 (not a multiple of 32: maps are ceil(size / stride), the reference plans floor): stage 4 4x5 -> 1x2
    # windows, a 2x4 carrier grid
    "hat2_113x160": (_HAT2, [113, 160]),
    # 128x128 (no padding): stage 4 is a single window with HAT on, whose carrier conv exists but is unused
    "hat2_128_single_window": (_HAT2, [128, 128]),
    # the FasterViT-0..2 recipe: one carrier token per window, no layer scale, no propagation; LayerNorm last
    "plain_96x224": (dict(dim=16, in_dim=8, depths=[1, 2, 3, 1], num_heads=[1, 2, 4, 4], window_size=[4, 4, 4, 3],
                          ct_size=1, mlp_ratio=2, hat=[False, False, True, False], layer_norm_last=True), [96, 224]),
    # window attention only (the 21k recipe), windows that divide neither side, no qkv bias
    "local_only_200x136": (dict(dim=16, in_dim=8, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4],
                                window_size=[8, 8, 6, 4], ct_size=2, mlp_ratio=2, hat=[False, False, False, False],
                                qkv_bias=False, layer_scale=0.3, do_propagation=True), [200, 136]),
}


def _pair(cfg: dict, res: list[int]) -> tuple[torch.nn.Module, FasterViT]:
    torch.manual_seed(0)
    theirs = perturb_parameters(ref.FasterViT(**cfg, resolution=res, drop_path_rate=0.0)).eval()
    ours = FasterViT(**cfg, img_size=tuple(res), drop_path_rate=0.0, any_res=True).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    return theirs, ours


def _assert_parity(theirs: torch.nn.Module, ours: FasterViT, x: torch.Tensor) -> None:
    from timm.utils import reparameterize_model

    with torch.no_grad():
        f_ref, y_ref = theirs.forward_features(x), theirs(x)
        assert rel(f_ref, ours.forward_features(x)) <= 1e-5
        assert rel(y_ref, ours(x)) <= 1e-5
        fused = reparameterize_model(copy.deepcopy(ours))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.stages.modules())
        assert rel(f_ref, fused.forward_features(x)) <= 1e-5
        assert rel(y_ref, fused(x)) <= 1e-5


@pytest.mark.parametrize("cfg,res", TINY.values(), ids=TINY.keys())
def test_parity_with_reference(cfg, res):
    theirs, ours = _pair(cfg, res)
    assert count_params(ours) == count_params(theirs)
    _assert_parity(theirs, ours, torch.randn(2, 3, *res))


def test_parity_tests_see_the_carrier_reordering():
    """Without the reference's re-windowing of a non-square carrier grid, outputs differ (the check can fail)."""
    theirs, ours = _pair(*TINY["hat2_160x256"])
    for m in ours.modules():
        if getattr(m, "ct_shuffle", None) is not None:
            m.ct_shuffle = None
    x = torch.randn(1, 3, 160, 256)
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) > 1e-3


def test_gradients_match_reference():
    theirs, ours = _pair(*TINY["hat2_160x256"])
    assert_gradients_match(theirs, ours, torch.randn(2, 3, 160, 256))


def test_fastervit_0_any_res_matches_reference():
    """The full FasterViT-0 any-res at 160x256 (stage 3: 10x16 padded to 14x21, 2x3 windows, 4x6 carriers)."""
    torch.manual_seed(0)
    theirs = perturb_parameters(ref.faster_vit_0_any_res(resolution=[160, 256])).eval()
    ours = timm.create_model("fastervit_0_any_res", img_size=(160, 256)).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    assert ours.stages[2].blocks[0].ct_shuffle is not None
    _assert_parity(theirs, ours, torch.randn(1, 3, 160, 256))


def _reference_on_meta(name: str) -> torch.nn.Module:
    """Build a reference variant on the meta device (its drop-path schedule needs a CPU ``linspace``)."""
    real = torch.linspace
    with mock.patch.object(torch, "linspace", lambda *a, **k: real(*a, **{**k, "device": "cpu"})):
        return getattr(ref, name)()


SMALL = {"fastervit_0_any_res": "faster_vit_0_any_res", "fastervit_2_any_res": "faster_vit_2_any_res"}
ALL = {**SMALL, **{f"fastervit_{i}_any_res": f"faster_vit_{i}_any_res" for i in (1, 3, 4, 5, 6)},
       **{f"fastervit_4_21k_{r}_any_res": f"faster_vit_4_21k_{r}_any_res" for r in (224, 384, 512, 768)}}


@pytest.mark.parametrize("ours_name,ref_name", [
    pytest.param(o, r, id=o, marks=() if o in SMALL else pytest.mark.slow) for o, r in ALL.items()
])
def test_variant_sizes_match_reference(ours_name, ref_name):
    """Same parameters (names via the filter, count) and FLOPs as the reference at its default resolution."""
    with torch.device("meta"):
        theirs = _reference_on_meta(ref_name)
        ours = timm.create_model(ours_name)
        x = torch.empty(1, *ours.pretrained_cfg["input_size"])
    assert ours.img_size == tuple(ours.pretrained_cfg["input_size"][1:])
    assert count_params(ours) == count_params(theirs)
    assert set(checkpoint_filter_fn(theirs.state_dict())) == set(ours.state_dict())
    assert count_flops(ours, x) == count_flops(theirs, x)


@pytest.mark.slow
@pytest.mark.parametrize("ours_name", ["fastervit_0_any_res", "fastervit_2_any_res", "fastervit_3_any_res"])
def test_variant_outputs_match_reference_at_default_size(ours_name):
    """576x960 (541x960 for FasterViT-2: not a multiple of 32), generic and fused."""
    torch.manual_seed(0)
    theirs = perturb_parameters(getattr(ref, ALL[ours_name])()).eval()
    ours = timm.create_model(ours_name).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    _assert_parity(theirs, ours, torch.randn(1, *ours.pretrained_cfg["input_size"]))


def test_fixed_resolution_checkpoint_loads_into_any_res(tmp_path):
    """The reference initialises its any-res models from its 224 checkpoints (non-strict: no carrier position
    embedding on a non-square grid); ours loads such a file strictly through timm and matches it."""
    from safetensors.torch import save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastervit.models.faster_vit import FasterViT as FixedRef
    cfg, res = TINY["hat2_160x256"]
    torch.manual_seed(0)
    fixed = perturb_parameters(FixedRef(**cfg, resolution=256, drop_path_rate=0.0)).eval()  # HAT in both stages
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone().contiguous() for k, v in fixed.state_dict().items()}, str(path))
    theirs = ref.FasterViT(**cfg, resolution=res, drop_path_rate=0.0).eval()
    assert "levels.2.blocks.0.hat_pos_embed.cpb_mlp.0.weight" not in theirs.state_dict()
    ref._load_state_dict(theirs, fixed.state_dict(), strict=False, logger=mock.Mock())  # the reference's loader
    ours = timm.create_model("test_fastervit_any_res", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                             img_size=tuple(res), **{k: v for k, v in cfg.items() if k != "hat"},
                             hat=tuple(cfg["hat"])).eval()
    x = torch.randn(1, 3, *res)
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) <= 1e-5


def test_square_sizes_keep_the_fixed_resolution_layout():
    """At 224 the any-res FasterViT-0 is the fixed-resolution one (same parameters, same outputs)."""
    torch.manual_seed(0)
    fixed = randomize_bn_stats(timm.create_model("fastervit_0")).eval()
    anyres = timm.create_model("fastervit_0_any_res", img_size=224).eval()
    anyres.load_state_dict(fixed.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fixed(x), anyres(x))


def test_resolution_keyword_and_feature_shapes():
    m = timm.create_model("test_fastervit_any_res", resolution=(113, 150), features_only=True).eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 113, 150))
    assert [tuple(f.shape[-2:]) for f in feats] == [(29, 38), (15, 19), (8, 10), (4, 5)]  # ceil(size / stride)


def test_size_the_reference_cannot_run_raises_clear_error():
    # width 130: stage 3 (stride 16, window 4) is planned as 8 wide (2 windows) but is 9 wide (3 windows)
    cfg = dict(dim=16, in_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=[4, 4, 4, 2], ct_size=2,
               mlp_ratio=2, hat=[False, False, True, False])
    with pytest.raises(RuntimeError):  # the reference itself fails on it
        ref.FasterViT(**cfg, resolution=[96, 130]).eval()(torch.randn(1, 3, 96, 130))
    with pytest.raises(ValueError, match=r"width 130 does not fit stage 3 \(window 4\).*such as 126, 127, 128"):
        FasterViT(**cfg, img_size=(96, 130), any_res=True)
    with pytest.raises(ValueError, match="width 130"):
        timm.create_model("test_fastervit_any_res", img_size=(96, 130))


def test_too_few_carrier_tokens_raise_clear_error():
    # a 1x2 window grid with one carrier token each: the reference's carrier attention bias is NaN there
    cfg = dict(dim=16, in_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=[4, 4, 4, 4], ct_size=1,
               mlp_ratio=2, hat=[False, False, True, False])
    with torch.no_grad():
        assert torch.isnan(ref.FasterViT(**cfg, resolution=[64, 128]).eval()(torch.randn(1, 3, 64, 128))).all()
    with pytest.raises(ValueError, match="fewer than 4 carrier tokens"):
        FasterViT(**cfg, img_size=(64, 128), any_res=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=(96, 0)), "positive int"),
    (dict(img_size=(96, 160, 3)), "positive int"),
    (dict(img_size=96.0), "positive int"),
    (dict(img_size=(96, 160), any_res=False), "use an \\*_any_res variant"),
])
def test_bad_sizes_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("test_fastervit_any_res", **kwargs)


def test_input_of_another_size_raises_clear_error():
    m = timm.create_model("test_fastervit_any_res").eval()
    with pytest.raises(ValueError, match=r"built for 96x160 inputs.*img_size=\(160, 96\)"):
        m(torch.randn(1, 3, 160, 96))
    with pytest.raises(ValueError, match="expects input of shape"):
        m(torch.randn(1, 1, 96, 160))

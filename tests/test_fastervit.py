"""FasterViT: parity with the reference implementation (``fastervit`` package), checkpoints, sizes, bad configs."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import timm
import torch

import frugalvision  # noqa: F401  (registers our models)
from fastervit_parity import assert_gradients_match, rel
from frugalvision.bench import count_flops, count_params
from frugalvision.errors import CheckpointError
from frugalvision.models.fastervit import FasterViT, checkpoint_filter_fn, load_official_checkpoint
from frugalvision.utils.testing import perturb_parameters, randomize_bn_stats

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = pytest.importorskip("fastervit.models.faster_vit")

TINY = {
    # HAT in stage 3 (2x2 windows, 2x2 carrier tokens each), layer scale everywhere, carrier-token propagation
    "hat_ls_prop": dict(dim=16, in_dim=8, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4], window_size=[8, 8, 4, 4],
                        ct_size=2, mlp_ratio=4, resolution=128, hat=[False, False, True, True], layer_scale=0.5,
                        layer_scale_conv=0.5, do_propagation=True),
    # HAT with 4x4 windows of one carrier token, no layer scale, no propagation (the FasterViT-0..2 recipe)
    "hat_plain": dict(dim=16, in_dim=8, depths=[1, 2, 3, 1], num_heads=[1, 2, 4, 4], window_size=[4, 4, 2, 4],
                      ct_size=1, mlp_ratio=2, resolution=128, hat=[False, False, True, False]),
    # window attention only (the 21k high-resolution recipe), LayerNorm last, no qkv bias
    "local_only": dict(dim=16, in_dim=8, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4], window_size=[8, 8, 8, 4],
                       ct_size=1, mlp_ratio=2, resolution=128, hat=[False, False, False, False],
                       layer_norm_last=True, qkv_bias=False, layer_scale=0.3, do_propagation=True),
}


def _pair(cfg: dict) -> tuple[torch.nn.Module, FasterViT]:
    torch.manual_seed(0)
    theirs = perturb_parameters(ref.FasterViT(**cfg, drop_path_rate=0.0)).eval()
    ours = FasterViT(**cfg, drop_path_rate=0.0).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    return theirs, ours


@pytest.mark.parametrize("cfg", TINY.values(), ids=TINY.keys())
def test_parity_with_reference(cfg):
    from timm.utils import reparameterize_model

    theirs, ours = _pair(cfg)
    x = torch.randn(2, 3, cfg["resolution"], cfg["resolution"])
    with torch.no_grad():
        f_ref, y_ref = theirs.forward_features(x), theirs(x)
        assert rel(f_ref, ours.forward_features(x)) <= 1e-5
        assert rel(y_ref, ours(x)) <= 1e-5
        fused = reparameterize_model(ours)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.stages.modules())
        assert rel(f_ref, fused.forward_features(x)) <= 1e-5
        assert rel(y_ref, fused(x)) <= 1e-5


def test_gradients_match_reference():
    theirs, ours = _pair(TINY["hat_ls_prop"])
    assert_gradients_match(theirs, ours, torch.randn(2, 3, 128, 128))


def test_fastervit_0_matches_reference_outputs():
    torch.manual_seed(0)
    theirs = randomize_bn_stats(ref.faster_vit_0_224()).eval()
    ours = timm.create_model("fastervit_0").eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel(theirs.forward_features(x), ours.forward_features(x)) <= 1e-5


def test_fastervit_0_params_and_flops():
    with torch.device("meta"):
        ours = timm.create_model("fastervit_0")
        x = torch.empty(1, 3, 224, 224)
    assert count_params(ours) == 31_404_840  # 31.40M, as the reference
    assert 3.3e9 <= count_flops(ours, x) / 2 <= 3.6e9  # ~3.3-3.5 GMACs (the paper rounds the attention matmuls away)


def _reference_on_meta(name: str) -> torch.nn.Module:
    """Build a reference variant on the meta device (its drop-path schedule needs a CPU ``linspace``)."""
    real = torch.linspace
    with mock.patch.object(torch, "linspace", lambda *a, **k: real(*a, **{**k, "device": "cpu"})):
        return getattr(ref, name)()


SMALL = {"fastervit_0": "faster_vit_0_224", "fastervit_1": "faster_vit_1_224", "fastervit_2": "faster_vit_2_224"}
ALL = {**SMALL, "fastervit_3": "faster_vit_3_224", "fastervit_4": "faster_vit_4_224",
       "fastervit_5": "faster_vit_5_224", "fastervit_6": "faster_vit_6_224",
       **{f"fastervit_4_21k_{r}": f"faster_vit_4_21k_{r}" for r in (224, 384, 512, 768)}}


@pytest.mark.parametrize("ours_name,ref_name", [
    pytest.param(o, r, id=o, marks=() if o in SMALL else pytest.mark.slow) for o, r in ALL.items()
])
def test_variant_sizes_match_reference(ours_name, ref_name):
    """Same parameter count and FLOPs as the reference variant (built on the meta device: no compute)."""
    with torch.device("meta"):
        theirs = _reference_on_meta(ref_name)
        ours = timm.create_model(ours_name)
        size = ours.pretrained_cfg["input_size"]
        x = torch.empty(1, *size)
    assert count_params(ours) == count_params(theirs)
    assert set(checkpoint_filter_fn(theirs.state_dict(), ours)) == set(ours.state_dict())
    if ours_name in SMALL:
        assert count_flops(ours, x) == count_flops(theirs, x)


@pytest.mark.slow
@pytest.mark.parametrize("ours_name,ref_name", [(o, ALL[o]) for o in ("fastervit_1", "fastervit_2", "fastervit_3",
                                                                      "fastervit_4_21k_224")])
def test_variant_outputs_match_reference(ours_name, ref_name):
    torch.manual_seed(0)
    theirs = perturb_parameters(getattr(ref, ref_name)()).eval()
    ours = timm.create_model(ours_name).eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours))
    x = torch.randn(1, *ours.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) <= 1e-5


def test_load_official_checkpoint_file(tmp_path):
    theirs, _ = _pair(TINY["hat_ls_prop"])
    path = tmp_path / "fastervit_tiny.pth.tar"
    # the reference training script wraps weights and prefixes them when trained with DDP
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}, "epoch": 3}, path)
    ours = load_official_checkpoint(FasterViT(**TINY["hat_ls_prop"]).eval(), path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) <= 1e-5
    with pytest.raises(CheckpointError, match=r"fastervit_tiny\.pth\.tar do not fit this FasterViT.*shape mismatch"):
        load_official_checkpoint(FasterViT(**TINY["hat_plain"]), path)


def test_pretrained_file_through_timm(tmp_path):
    """``timm.create_model(..., pretrained=True, pretrained_cfg_overlay={"file": ...})`` maps official keys."""
    from safetensors.torch import save_file

    cfg = {**TINY["hat_plain"], "resolution": 64, "window_size": [4, 4, 2, 2], "layer_scale": False,
           "layer_scale_conv": False, "do_propagation": False}  # (create_model drops None-valued kwargs)
    torch.manual_seed(0)
    theirs = perturb_parameters(ref.FasterViT(**cfg, drop_path_rate=0.0)).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone().contiguous() for k, v in theirs.state_dict().items()}, str(path))
    ours = timm.create_model("test_fastervit", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                             **{k: v for k, v in cfg.items() if k != "resolution"}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) <= 1e-5


def test_features_for_dense_heads():
    m = timm.create_model("test_fastervit", features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        feats = m(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    full = timm.create_model("test_fastervit").eval()
    with torch.no_grad():
        inter = full.forward_intermediates(torch.randn(1, 3, 64, 64), indices=2, intermediates_only=True)
    assert [f.shape[1] for f in inter] == [64, 128]


def test_img_size_builds_for_other_resolutions():
    m = timm.create_model("test_fastervit", img_size=128).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 128, 128)).shape == (1, 1000)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=100), "divisible by 32"),
    (dict(img_size=96), "divide the stage resolution 3"),
    (dict(window_size=(4, 4, 3, 2)), "window size 3"),
    (dict(num_heads=(1, 2, 3, 4)), "not divisible by 3 heads"),
    (dict(depths=(1, 1, 2)), "4 stages"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("test_fastervit", **kwargs)


def test_bad_inputs_raise_clear_errors():
    m = timm.create_model("test_fastervit").eval()
    with pytest.raises(ValueError, match="expects input of shape"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="built for 64x64"):
        m(torch.randn(1, 3, 96, 96))


def test_flop_count_sees_fused_kernels():
    """The fused CPU kernels (oneDNN linear/conv, flash attention) are counted like the generic path."""
    from timm.utils import reparameterize_model
    from torch.utils.flop_counter import FlopCounterMode

    fused = reparameterize_model(timm.create_model("test_fastervit").eval())
    x = torch.randn(1, 3, 64, 64)
    with FlopCounterMode(display=False) as generic:  # autograd on: the generic (unfused-kernel) path runs
        fused(x)
    assert count_flops(fused, x) == generic.get_total_flops() > 0

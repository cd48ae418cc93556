"""EfficientMod: official checkpoint mapping, paper params/FLOPs, block numerics, multi-scale features, bad input.

The registry-wide checks (forward/backward, features_only, forward_intermediates, batch invariance,
reparameterisation, ONNX parity) run on every EfficientMod variant in tests/test_models_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import frugalvision  # noqa: F401  (registers the models)
from frugalvision.bench import count_flops, count_params
from frugalvision.models import create_model
from frugalvision.models.efficientmod import (
    Attention,
    AttentionBlock,
    EfficientMod,
    Modulation,
    ModulationBlock,
    ModulationMixer,
    checkpoint_filter_fn,
    to_official_state_dict,
)

FIXTURE = Path(__file__).parent / "fixtures" / "efficientmod_official_keys.json"
VARIANTS = ["efficientmod_xxs", "efficientmod_xs", "efficientmod_s"]
ALL = [pytest.param(n, id=n) for n in VARIANTS]

# Paper (Table: ImageNet-1k, 224²): params (M) and FLOPs (G; the paper's FLOPs are multiply-accumulates).
PAPER = {"efficientmod_xxs": (4.7, 0.6), "efficientmod_xs": (6.6, 0.8), "efficientmod_s": (12.9, 1.4)}
# Exact parameter counts of the official model definitions (ma-xu/EfficientMod, models/EfficientMod.py).
OFFICIAL_PARAMS = {"efficientmod_xxs": 4_736_264, "efficientmod_xs": 6_627_544, "efficientmod_s": 12_897_184}


def _official_keys() -> dict[str, dict[str, list[int]]]:
    return json.loads(FIXTURE.read_text())


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial layer scales and norm affines, so folding and parity tests see every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize("name", ALL)
def test_official_keys_round_trip(name):
    official = _official_keys()[name]
    fake = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    mapped = checkpoint_filter_fn(fake)
    ours = _meta_model(name).state_dict()
    assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
    for k, v in mapped.items():
        assert tuple(v.shape) == tuple(ours[k].shape), k
    back = to_official_state_dict(mapped)
    assert {k: list(v.shape) for k, v in back.items()} == official
    assert sum(v.numel() for v in fake.values()) == OFFICIAL_PARAMS[name]


def test_official_checkpoint_loads_through_create_model(tmp_path):
    from safetensors.torch import save_file

    ref = _randomize(timm.create_model("test_efficientmod", num_classes=4)).eval()
    official = {k: v.contiguous() for k, v in to_official_state_dict(ref.state_dict()).items()}
    assert "layers.0.blocks.1.mlp.context_layer.context_list.0.weight" in official
    assert "layers.0.downsample.proj.weight" in official and "patch_embed.proj.weight" in official
    path = tmp_path / "official.safetensors"
    save_file(official, str(path))
    model = create_model("test_efficientmod", num_classes=4, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_checkpoint_filter_unwraps_training_checkpoints_and_rejects_foreign_keys():
    official = {k: torch.zeros(shape) for k, shape in _official_keys()["efficientmod_xxs"].items()}
    wrapped = {"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 3}
    assert checkpoint_filter_fn(wrapped).keys() == checkpoint_filter_fn(official).keys()
    ours = checkpoint_filter_fn(official)
    assert checkpoint_filter_fn(ours).keys() == ours.keys()  # already ours: unchanged
    with pytest.raises(ValueError, match="not part of an official EfficientMod"):
        checkpoint_filter_fn({**official, "fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="several context kernels"):
        checkpoint_filter_fn({**official, "layers.0.blocks.0.mlp.context_layer.context_list.1.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize("name", ALL)
def test_params_match_paper(name):
    n = count_params(_meta_model(name))
    assert n == OFFICIAL_PARAMS[name]
    assert round(n / 1e6, 1) == PAPER[name][0]


@pytest.mark.parametrize("name", ALL)
def test_macs_match_paper(name):
    # count_flops counts a multiply-add as 2 FLOPs; the paper's "FLOPs" are multiply-accumulates (MACs).
    # Explicit attention: every matmul is an op the counter knows, whichever fused kernel SDPA would pick.
    # The counter only needs shapes: the model runs on the meta device (no weights, no compute).
    model = _meta_model(name)
    model.set_fused_attn(False)
    macs = count_flops(model, torch.empty(1, 3, 224, 224, device="meta")) / 2
    assert round(macs / 1e9, 1) == PAPER[name][1], macs / 1e9


@pytest.mark.parametrize("name", ALL)
def test_variant_structure(name):
    model = _meta_model(name)
    info = model.feature_info
    assert [f["reduction"] for f in info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in info] == list(model.embed_dims)
    attn = [sum(isinstance(b, AttentionBlock) for b in s.blocks) for s in model.stages]
    assert attn[:2] == [0, 0] and min(attn[2:]) >= 1  # attention only in the two last stages
    for stage in model.stages:  # modulation blocks come first, alternating plain (ratio 1) and expanded
        ratios = [b.mixer.mlp_ratio for b in stage.blocks if isinstance(b, ModulationBlock)]
        assert ratios[0::2] == [1] * len(ratios[0::2]) and all(r > 1 for r in ratios[1::2])


# ------------------------------------------------------------------------------------- block numerics
def _modulation_by_formula(m: Modulation, x: torch.Tensor) -> torch.Tensor:
    """FC → DWConv → GELU → FC context, repeated to the value width, times GELU(FC(x)), then FC (NHWC)."""
    ctx = F.linear(x, m.ctx_in.weight, m.ctx_in.bias).permute(0, 3, 1, 2).contiguous()
    ctx = F.gelu(F.conv2d(ctx, m.ctx_conv.weight, m.ctx_conv.bias, padding=m.kernel_size // 2, groups=m.dim))
    ctx = F.linear(ctx.permute(0, 2, 3, 1), m.ctx_out.weight, m.ctx_out.bias)
    v = F.linear(x, m.fc1.weight, m.fc1.bias)
    if m.mlp_ratio > 1:
        v = F.gelu(v)
    return F.linear(v * ctx.repeat(1, 1, 1, m.mlp_ratio), m.fc2.weight, m.fc2.bias)


@pytest.mark.parametrize("ratio", [1, 4])
def test_modulation_matches_formula(ratio):
    m = _randomize(Modulation(12, mlp_ratio=ratio, kernel_size=5))
    x = torch.randn(2, 9, 7, 12)
    torch.testing.assert_close(m(x), _modulation_by_formula(m, x), rtol=1e-5, atol=1e-6)


def test_modulation_mixer_is_channels_first_modulation():
    mixer = _randomize(ModulationMixer(10, mlp_ratio=3, kernel_size=3))
    core = Modulation(10, mlp_ratio=3, kernel_size=3)
    core.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 10, 6, 5)
    y = mixer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, core(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=0, atol=0)
    y.sum().backward()
    assert all(p.grad is not None for p in mixer.parameters())


def test_modulation_context_is_local():
    # The mixer's receptive field is its kernel: a change at one position reaches only the k x k window.
    m = _randomize(ModulationMixer(4, mlp_ratio=2, kernel_size=3)).eval()
    x = torch.randn(1, 4, 9, 9)
    x2 = x.clone()
    x2[..., 4, 4] += 1.0
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().amax(dim=1)[0]
    assert (diff[3:6, 3:6] > 0).all()
    diff[3:6, 3:6] = 0
    assert diff.max() == 0


def test_fused_and_explicit_attention_agree():
    attn = _randomize(Attention(24, num_heads=3, min_head_dim=16)).eval()  # heads wider than 24 / 3
    assert attn.head_dim == 16 and attn.qkv.out_features == 3 * 48 and attn.proj.in_features == 48
    x = torch.randn(2, 13, 24)
    attn.fused_attn = True
    a = attn(x)
    attn.fused_attn = False
    torch.testing.assert_close(a, attn(x), rtol=1e-5, atol=1e-6)


def test_reparameterize_folds_layer_scales_exactly():
    model = _randomize(timm.create_model("test_efficientmod")).eval()
    blk = AttentionBlock(32, num_heads=2, min_head_dim=8, layer_scale_init=0.3)
    _randomize(blk).eval()
    x, t = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        ref, ref_blk = model(x), blk(t)
        fused = timm.utils.reparameterize_model(model)
        blk.reparameterize()
        out, out_blk = fused(x), blk(t)
    assert not any(n.endswith(".gamma") for n, _ in fused.named_parameters())
    assert isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_blk, ref_blk, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = _randomize(timm.create_model("test_efficientmod", num_classes=3))
    b = timm.create_model("test_efficientmod", num_classes=3)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------- multi-scale features
def test_features_only_selected_indices_and_layouts():
    model = timm.create_model("test_efficientmod", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [24, 48] and model.feature_info.reduction() == [8, 32]
    full = _randomize(timm.create_model("test_efficientmod")).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feats = model(x)
        nchw = full.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        nhwc = full.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True, stop_early=True)
        final, inter = full.forward_intermediates(x, norm=True)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 12, 8), (2, 48, 3, 2)]
    assert [tuple(f.shape) for f in nchw] == [(2, 24, 12, 8), (2, 48, 3, 2)]
    assert tuple(nhwc[0].shape) == (2, 24, 16, 16)
    torch.testing.assert_close(inter[-1], final)  # norm=True normalises the last stage like forward_features
    torch.testing.assert_close(inter[0], nhwc[0].permute(0, 3, 1, 2))


def test_pruned_backbone_accepts_sizes_divisible_by_its_own_stride():
    model = timm.create_model("test_efficientmod", features_only=True, out_indices=(0, 1)).eval()
    assert model.model.reduction == 8 and len(model.model.stages) == 2
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 40, 24))  # divisible by 8, not by 32
    assert [tuple(f.shape) for f in feats] == [(1, 16, 10, 6), (1, 24, 5, 3)]


# ------------------------------------------------------------------------------------- bad input / configs
def test_bad_inputs_raise_clear_errors():
    model = timm.create_model("test_efficientmod").eval()
    with pytest.raises(ValueError, match=r"divisible by its total stride 32, got 70x64.*96x64"):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"built for 3 input channels but got 1.*in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        model.forward_intermediates(torch.randn(1, 3, 64, 48))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NLC")
    with pytest.raises(ValueError, match=r"channels-last \(B, H, W, 8\)"):
        Modulation(8)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        ModulationMixer(8)(torch.randn(1, 4, 4, 8))
    gray = timm.create_model("test_efficientmod", in_chans=1, num_classes=2).eval()
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(embed_dims=(8, 16), depths=(1, 1, 1)), "one entry per stage"),
    (dict(depths=(1, 1, 1, 1), mlp_ratios=((1, 2), 2, 2, 2)), "stage 0 has depth 1 but 2 mlp_ratios"),
    (dict(attn_depths=(0, 1)), "attn_depths needs one entry per stage"),
    (dict(mlp_ratios=1.5), "mlp_ratio must be an integer"),
    (dict(kernel_size=4), "kernel_size must be a positive odd"),
    (dict(global_pool="max"), "global_pool"),
    (dict(in_chans=0), "in_chans"),
])
def test_bad_configs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EfficientMod(**{"embed_dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "attn_depths": 0, **kwargs})

"""Checks every model family of ours must pass, parametrised over the registry (as timm's own tests do).

Default suite: the tiny ``test_*`` variants of every family. ``pytest -m slow``: every registered variant.
"""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvision  # noqa: F401  (registers our models)
from frugalvision.utils.testing import randomize_bn_stats

OURS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("frugalvision"))
SMALL = [n for n in OURS if n.startswith("test_")]
BIG = [n for n in OURS if not n.startswith("test_")]
PARAMS = [pytest.param(n, id=n) for n in SMALL] + [pytest.param(n, id=n, marks=pytest.mark.slow) for n in BIG]


# Variants whose default input is large (576x960 for the any-resolution FasterViTs: several GB for a backward
# pass, tens of GB for the biggest) are built and tested at a smaller size of the same kind (rectangular here).
BUILD_SIZE = {n: (224, 320) for n in OURS if n.endswith("_any_res")}


def _create(name: str, **kwargs) -> torch.nn.Module:
    if name in BUILD_SIZE:
        kwargs.setdefault("img_size", BUILD_SIZE[name])
    return timm.create_model(name, **kwargs)


def _input(model: torch.nn.Module, batch: int = 2, name: str | None = None) -> torch.Tensor:
    if name in BUILD_SIZE:
        return torch.randn(batch, 3, *BUILD_SIZE[name])
    size = model.pretrained_cfg.get("test_input_size", model.pretrained_cfg["input_size"])
    return torch.randn(batch, *size)


def test_registry_not_empty_when_families_exist():
    # Every family module must register at least one tiny test variant for the default suite.
    families = {timm.models.model_entrypoint(n).__module__ for n in OURS}
    tiny = {timm.models.model_entrypoint(n).__module__ for n in SMALL}
    assert families == tiny, f"families without a test_* variant: {families - tiny}"


@pytest.mark.parametrize("name", PARAMS)
def test_forward_backward(name):
    model = _create(name, num_classes=7)
    x = _input(model, name=name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some parameters got no gradient"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", PARAMS)
def test_forward_features_and_head(name):
    model = _create(name, num_classes=5).eval()
    x = _input(model, name=name)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
    assert torch.allclose(out, model(x), atol=1e-5)
    assert pre.shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", PARAMS)
def test_features_only(name):
    model = _create(name, features_only=True).eval()
    x = _input(model, name=name)
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) == len(info.channels())
    for f, c, r in zip(feats, info.channels(), info.reduction(), strict=True):
        assert f.shape[1] == c
        assert f.shape[-1] == x.shape[-1] // r


@pytest.mark.parametrize("name", PARAMS)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = _input(model, name=name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref = model.forward_features(x)
    assert torch.allclose(final, ref, atol=1e-5)
    assert len(inter) == len(model.feature_info)


@pytest.mark.parametrize("name", PARAMS)
def test_batch_size_invariance(name):
    model = randomize_bn_stats(_create(name)).eval()
    x = _input(model, batch=3, name=name)
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    # relative to the output scale: random BN statistics can make deep models' logits large
    scale = max(1.0, float(full.abs().max()))
    assert torch.allclose(full, single, atol=1e-4 * scale, rtol=1e-4), float((full - single).abs().max()) / scale


@pytest.mark.parametrize("name", PARAMS)
def test_reparameterize_keeps_outputs(name):
    from timm.utils import reparameterize_model

    model = randomize_bn_stats(_create(name)).eval()
    x = _input(model, name=name)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize_model(model)
        out = fused(x)
    scale = max(1.0, float(ref.abs().max()))
    assert torch.allclose(out, ref, atol=1e-4 * scale, rtol=1e-4), float((out - ref).abs().max()) / scale


@pytest.mark.parametrize("name", PARAMS)
def test_onnx_export_parity(name, tmp_path):
    from frugalvision.export import export_onnx

    model = randomize_bn_stats(_create(name)).eval()
    res = export_onnx(model, tmp_path / "m.onnx", _input(model, batch=1, name=name), atol=1e-4, rtol=1e-4)
    assert res.checked_batch_sizes == (1, 2)  # the batch axis is really dynamic
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-4

"""Every registered family of ours runs in reduced precision, fused and unfused, close to its fp32 outputs.

CPU: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` and with bf16 weights and inputs. CUDA (when present):
under fp16 and bf16 autocast. Default suite: the tiny ``test_*`` variants; ``pytest -m slow``: every variant.

Tolerance: bf16 keeps 8 significant bits (relative rounding 2**-9 per operation); through tens of layers the
outputs of these random models move by about 1 % of their scale (measured 0.3-1.9 %), so the check is the largest
deviation against 5 % of the largest fp32 output (fp16 on CUDA: 1 %).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from frugalvision.utils.testing import randomize_bn_stats
from test_models_registry import OURS, PARAMS, SMALL, _create, _input

BF16_TOL = 5e-2
FP16_TOL = 1e-2


def _rel_dev(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def _models(name: str) -> list[tuple[str, torch.nn.Module]]:
    model = randomize_bn_stats(_create(name, num_classes=7)).eval()
    fused = reparameterize_model(randomize_bn_stats(_create(name, num_classes=7)).eval())  # its own weights
    return [("unfused", model), ("fused", fused)]


def test_every_family_has_a_tiny_variant_here():
    families = {timm.models.model_entrypoint(n).__module__.rsplit(".", 1)[-1] for n in OURS}
    assert {"fastervit", "efficientmod", "rep", "lm_encoder"} <= families
    assert families == {timm.models.model_entrypoint(n).__module__.rsplit(".", 1)[-1] for n in SMALL}


@pytest.mark.parametrize("name", PARAMS)
def test_cpu_bf16_autocast_and_bf16_weights(name):
    torch.manual_seed(0)
    x = _input(_create(name), name=name)
    for form, model in _models(name):
        with torch.no_grad():
            ref = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = model(x)
            assert torch.isfinite(auto).all(), f"{form}: non-finite outputs under bf16 autocast"
            assert _rel_dev(auto, ref) < BF16_TOL, f"{form} autocast: {_rel_dev(auto, ref):.3g}"
            low = model.to(torch.bfloat16)(x.bfloat16())
            assert low.dtype == torch.bfloat16
            assert _rel_dev(low, ref) < BF16_TOL, f"{form} bf16 weights: {_rel_dev(low, ref):.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast(name, dtype):
    torch.manual_seed(0)
    x = _input(_create(name), name=name).cuda()
    for form, model in _models(name):
        model = model.cuda()
        with torch.no_grad():
            ref = model(x)
            with torch.autocast("cuda", dtype=dtype):
                out = model(x)
        tol = FP16_TOL if dtype == torch.float16 else BF16_TOL
        assert torch.isfinite(out).all()
        assert _rel_dev(out, ref) < tol, f"{form} {dtype}: {_rel_dev(out, ref):.3g}"

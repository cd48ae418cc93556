"""Adaptation methods: what each freezes (requires_grad sets and which tensors change after a step), the
optimiser it builds, measured optimiser state, discovery on timm models, errors, stages and the CLI."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import frugalvision as fv
from frugalvision.adapt import (
    FrozenBackboneConfig,
    LPFTConfig,
    find_blocks,
    find_parts,
    get_method_config,
    list_methods,
)
from frugalvision.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def _vit() -> nn.Module:
    return timm.create_model("test_vit", num_classes=3, img_size=32)


def _resnet() -> nn.Module:
    return timm.create_model("test_resnet", num_classes=3)


def _step(a: fv.adapt.Adaptation, x: torch.Tensor | None = None) -> set[str]:
    """One optimisation step; returns the names of the parameters whose values changed."""
    model = a.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    x = torch.randn(4, 3, 32, 32) if x is None else x
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    a.optimizer.zero_grad()
    loss.backward()
    a.optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _all(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _under(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n in _all(model) if any(n == p or n.startswith(p + ".") for p in prefixes)}


EXPECTED = {  # method -> (optimiser class, momentum or None, trainable parameter names of the test ViT)
    "full_ft": (torch.optim.AdamW, None, lambda m: _all(m)),
    "sgd": (torch.optim.SGD, 0.9, lambda m: _all(m)),
    "freeze_embed": (torch.optim.SGD, 0.9, lambda m: _all(m) - _under(m, "patch_embed")),
    "freeze_embed_nomom": (torch.optim.SGD, 0.0, lambda m: _all(m) - _under(m, "patch_embed")),
    "linear_probe": (torch.optim.AdamW, None, lambda m: _under(m, "head")),
    "lp_ft": (torch.optim.AdamW, None, lambda m: _under(m, "head")),
    "frozen_backbone": (torch.optim.AdamW, None, lambda m: _under(m, "norm", "head")),
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_method_freezes_exactly_what_it_should(method):
    model = _vit()
    a = fv.adapt(model, method, verbose=False)
    opt_cls, momentum, expected = EXPECTED[method]
    want = expected(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want == set(a.trainable)
    assert type(a.optimizer) is opt_cls
    if momentum is not None:
        assert all(g["momentum"] == momentum for g in a.optimizer.param_groups)
    in_opt = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in want}
    assert _step(a) == want  # exactly the trainable tensors change after a step


def test_lp_ft_runs_both_stages():
    model = _vit()
    a = fv.adapt(model, LPFTConfig(lp_fraction=0.5), verbose=False)
    ds = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    head_before = model.head.weight.detach().clone()
    embed_before = model.patch_embed.proj.weight.detach().clone()
    seen = []
    res = a.fit(ds, ds, fv.TrainConfig(max_steps=4, batch_size=8, progress=False, device="cpu"),
                callbacks=[lambda tr, step, logs: seen.append(sum(p.requires_grad for p in tr.model.parameters()))])
    assert res.steps == 4 and [h["stage"] for h in res.history] == [0, 1]
    n_head = sum(1 for n, _ in model.named_parameters() if n.startswith("head"))
    assert seen[:2] == [n_head, n_head] and seen[2:] == [len(list(model.parameters()))] * 2
    assert not torch.equal(head_before, model.head.weight) and not torch.equal(embed_before,
                                                                               model.patch_embed.proj.weight)
    assert a.stage == 1 and type(a.optimizer) is torch.optim.AdamW and a.report.optimizer_state_bytes > 0


def test_frozen_parts_keep_their_batchnorm_statistics():
    model = _resnet()
    a = fv.adapt(model, "linear_probe", verbose=False)
    stats = model.bn1.running_mean.clone()
    changed = _step(a)
    assert changed == {"fc.weight", "fc.bias"}
    assert torch.equal(stats, model.bn1.running_mean) and not model.bn1.training
    # full fine-tuning updates them (the model trains normally)
    b = fv.adapt(model, "full_ft", verbose=False)
    _step(b)
    assert not torch.equal(stats, model.bn1.running_mean)


def test_frozen_backbone_any_head():
    model = _resnet()
    a = fv.adapt(model, FrozenBackboneConfig(backbone=["conv1", "bn1", "layer1", "layer2", "layer3"]), verbose=False)
    assert set(a.trainable) == _under(model, "layer4", "fc")
    a = fv.adapt(model, FrozenBackboneConfig(train=["layer4.0.conv2"]), verbose=False)
    assert _step(a) == _under(model, "layer4.0.conv2")
    with pytest.raises(ConfigError, match="backbone module 'layer5' does not exist"):
        fv.adapt(model, FrozenBackboneConfig(backbone=["layer5"]), verbose=False)


def test_optimizer_state_is_measured():
    n = {}
    for method in ("full_ft", "sgd", "freeze_embed", "freeze_embed_nomom", "linear_probe"):
        a = fv.adapt(_vit(), method, verbose=False)
        assert a.optimizer_state_bytes() == 0  # nothing before the first step
        _step(a)
        n[method] = (a.optimizer_state_bytes(), sum(p.numel() for p in a.model.parameters() if p.requires_grad))
    adam_bytes, adam_params = n["full_ft"]
    n_tensors = len(list(_vit().parameters()))
    assert adam_bytes == 8 * adam_params + 4 * n_tensors  # exp_avg + exp_avg_sq (fp32) + a step scalar per tensor
    assert n["sgd"][0] == 4 * n["sgd"][1]  # one momentum buffer
    assert n["freeze_embed"][0] == 4 * n["freeze_embed"][1] < n["sgd"][0]
    assert n["freeze_embed_nomom"][0] == 0


def test_report_lists_parts(capsys):
    fv.adapt(_vit(), "freeze_embed")
    out = capsys.readouterr().out
    assert "optimiser: SGD(lr=0.01, momentum=0.9" in out and "trainable params:" in out
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert any(r[0] == "patch_embed" and r[-1] == "frozen" for r in rows)


@pytest.mark.parametrize("name, blocks, embed, head", [
    ("test_vit", 6, ["patch_embed"], ["head"]),
    ("test_resnet", 4, ["conv1", "bn1"], ["fc"]),
    ("test_convnext", 9, ["stem"], ["head.fc"]),
    ("test_efficientnet", 5, ["conv_stem", "bn1"], ["classifier"]),
])
def test_discovery_on_timm_models(name, blocks, embed, head):
    model = timm.create_model(name)
    parts = find_parts(model)
    assert len(parts.blocks) == blocks and parts.embedding == embed and parts.classifier == head
    mods = dict(model.named_modules())
    assert all(b in mods for b in parts.blocks)


def test_discovery_overrides_and_errors():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)

    with pytest.raises(ConfigError, match=r"cannot find the blocks of Plain.*layers="):
        find_blocks(Plain())
    assert find_blocks(Plain(), ["a", "b"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="layer 'c' does not exist in Plain"):
        find_blocks(Plain(), ["a", "c"])
    a = fv.adapt(Plain(), "freeze_embed", layers=["a", "b"], embed=["a"], head=["out"], verbose=False)
    assert set(a.trainable) == {"b.weight", "b.bias", "out.weight", "out.bias"}
    with pytest.raises(ConfigError, match="cannot find the classifier"):
        fv.adapt(nn.Sequential(nn.Identity()), "linear_probe", layers=["0"], embed=["0"], verbose=False)


def test_registry_and_errors():
    assert {"full_ft", "sgd", "freeze_embed", "freeze_embed_nomom", "linear_probe", "lp_ft", "frozen_backbone",
            "subtuning"} <= set(list_methods())
    with pytest.raises(ConfigError, match="unknown adaptation method 'subtune'; did you mean subtuning"):
        get_method_config("subtune")
    with pytest.raises(ConfigError, match="sgd has no option"):
        get_method_config("sgd", nosuch=1)
    with pytest.raises(ConfigError, match="invalid sgd options"):
        get_method_config("sgd", momentum=1.5)
    cfg = fv.FreezeEmbedConfig(lr=0.05)
    a = fv.adapt(_vit(), cfg, verbose=False, momentum=0.5)
    assert a.optimizer.param_groups[0]["lr"] == 0.05 and a.optimizer.param_groups[0]["momentum"] == 0.5


def test_cli_train_with_adapt_and_profile(tmp_path, capsys):
    from frugalvision.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--adapt", "linear_probe", "model=test_resnet", "data=faces", "img_size=32", "max_steps=2",
               "batch_size=16", "progress=false", "device=cpu", f"output_dir={out}"])
    assert rc == 0
    capsys.readouterr()
    res = json.loads((out / "metrics.json").read_text())
    assert res["adapt"]["method"] == "linear_probe" and res["adapt"]["trainable_params"] < 1000
    prof = tmp_path / "profile"
    rc = main(["profile", "model=test_resnet", "data=faces", "img_size=32", "shots=8", "val_shots=8", "epochs=1",
               "device=cpu", "progress=false", "k=1", f"output_dir={prof}"])
    assert rc == 0
    chosen = json.loads((prof / "chosen_layers.json").read_text())
    assert len(chosen["chosen"]) == 1 and len(chosen["profile"]) == 4 and chosen["runs"] == 5
    assert (prof / "profile.png").read_bytes()[:4] == b"\x89PNG" and (prof / "profile.csv").exists()
    assert main(["profile", "model=test_vit", "data=faces", "img_size=32", "k=99", "progress=false",
                 f"output_dir={tmp_path / 'profile-k99'}"]) == 2
    assert "k=99 is larger than the 6 candidate blocks" in capsys.readouterr().err
    assert main(["train", "--adapt", "subtune", "model=test_resnet", "data=faces", "max_steps=1"]) == 2
    assert "unknown adaptation method 'subtune'; did you mean subtuning" in capsys.readouterr().err

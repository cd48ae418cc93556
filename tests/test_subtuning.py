"""SubTuning: the activation cache, the fine-tuning profile and greedy selection on a model whose best block is
known by construction."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import frugalvision as fv
from frugalvision.adapt import PrefixCache, SubTuningConfig, find_blocks, find_parts, plot_profile, subtuning_select
from frugalvision.adapt.subtuning import _BatchTask
from frugalvision.errors import ConfigError


class _Res(nn.Module):
    """``x + gain * mlp(x)``: with ``gain = 0`` (a buffer) the block's parameters cannot change the output."""

    def __init__(self, dim: int, gain: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.register_buffer("gain", torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.fc2(torch.relu(self.fc1(x)))


class OnlyOneBlockLearns(nn.Module):
    """Stem -> 4 residual blocks -> linear head. Only ``blocks.2`` is live; its MLP starts as the identity, so
    a head on the frozen features is linear in the input and cannot solve XOR, while tuning ``blocks.2`` can."""

    def __init__(self, live: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(2, dim)
        self.blocks = nn.Sequential(*[_Res(dim, 1.0 if i == live else 0.0) for i in range(4)])
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _xor(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    return TensorDataset(x, ((x[:, 0] * x[:, 1]) > 0).long())


def _cfg(**kw) -> SubTuningConfig:
    base = dict(data=_xor(128, 0), val_data=_xor(128, 1), profile_epochs=10, lr=5e-2, batch_size=32, device="cpu",
                progress=False)
    return SubTuningConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def test_profile_and_auto_k_pick_the_only_live_block():
    torch.manual_seed(0)
    model = OnlyOneBlockLearns(live=2)
    res = subtuning_select(model, _cfg())
    accs = {p.layers[0]: p.acc for p in res.profile}
    assert max(accs, key=accs.get) == "blocks.2"
    assert accs["blocks.2"] > 90 and res.baseline.acc < 75
    for b in ("blocks.0", "blocks.1", "blocks.3"):  # dead blocks do as well as the classifier alone
        assert abs(accs[b] - res.baseline.acc) < 1e-6
    assert res.chosen == ["blocks.2"]  # auto k stops: no other block adds anything
    assert res.rejected is not None and res.rejected.acc - res.steps[-1].acc < 1.0
    assert len(res.trials) == 1 + 4 + 3


def test_fixed_k_and_the_model_is_restored():
    model = OnlyOneBlockLearns(live=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = subtuning_select(model, _cfg(k=2))
    assert len(res.chosen) == 2 and "blocks.1" in res.chosen
    assert res.chosen == [b for b in find_blocks(model) if b in res.chosen]  # forward order
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cached_profile_equals_the_naive_profile():
    model = OnlyOneBlockLearns(live=2)
    cached = subtuning_select(model, _cfg(k=1, profile_epochs=5))
    naive = subtuning_select(model, _cfg(k=1, profile_epochs=5, cache=False))
    for a, b in zip(cached.profile, naive.profile, strict=True):
        assert a.layers == b.layers and abs(a.acc - b.acc) < 1e-6 and abs(a.loss - b.loss) < 1e-4


def test_budgets():
    model = OnlyOneBlockLearns()
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    res = subtuning_select(model, _cfg(k=3, max_params=2 * block_params, profile_epochs=2))
    assert len(res.chosen) == 2  # the parameter budget stops the search before k
    # only the last two blocks are cheap enough
    res = subtuning_select(model, _cfg(k=2, max_compute=0.5, profile_epochs=2))
    assert set(res.chosen) <= {"blocks.2", "blocks.3"} and "blocks.2" in res.chosen
    with pytest.raises(ConfigError, match="no single block fits the budget"):
        subtuning_select(model, _cfg(max_params=10))


def test_bad_input_is_a_clear_error():
    model = OnlyOneBlockLearns()
    with pytest.raises(ConfigError, match=r"k=5 is larger than the 4 candidate blocks"):
        fv.adapt(model, _cfg(k=5), verbose=False)
    with pytest.raises(ConfigError, match=r"layer 'blocks.9' does not exist in OnlyOneBlockLearns; close names"):
        fv.adapt(model, SubTuningConfig(tune=["blocks.9"]), verbose=False)
    with pytest.raises(ConfigError, match="does not exist"):
        fv.adapt(model, _cfg(layers=["blocks.0", "nosuch"]), verbose=False)
    with pytest.raises(ConfigError, match="needs data="):
        fv.adapt(model, SubTuningConfig(), verbose=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        SubTuningConfig(k=0)


def test_adapt_subtuning_trains_only_the_chosen_block(capsys):
    model = OnlyOneBlockLearns(live=2)
    a = fv.adapt(model, _cfg())
    out = capsys.readouterr().out
    assert "fine-tuning profile" in out and "chosen (auto k" in out
    assert set(a.trainable) == {"blocks.2.fc1.weight", "blocks.2.fc1.bias", "blocks.2.fc2.weight",
                                "blocks.2.fc2.bias", "head.weight", "head.bias"}
    model = OnlyOneBlockLearns()
    given = fv.adapt(model, SubTuningConfig(tune=["blocks.0"], lr=1e-3, head_lr=0.5), verbose=False)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in given.trainable if n.startswith("blocks")} == {"blocks.0"}
    lrs = {id(p): g["lr"] for g in given.optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.head.weight)] == 0.5 and lrs[id(model.blocks[0].fc1.weight)] == 1e-3


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_convnext", "test_efficientnet", "test_efficientmod",
                                  "test_efficientrep"])
def test_cached_forward_equals_the_full_forward(name):
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered")
    kw = {"img_size": 32} if "vit" in name else {}
    model = timm.create_model(name, num_classes=3, **kw).eval()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 3, (5,))
    blocks = find_blocks(model)
    stem = find_parts(model).embedding
    cache = PrefixCache(model, blocks, {"train": TensorDataset(x, y)}, batch_size=2, stubs=stem)
    with torch.no_grad():
        ref = model(x)
        for start in range(len(blocks) + 1):
            out = _BatchTask(start, cache).forward(model, (torch.arange(5), y, torch.zeros(1, dtype=torch.long)))
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the stubs are removed afterwards
    assert all("forward" not in vars(m) for m in model.modules())


def test_plot_and_json(tmp_path):
    res = subtuning_select(OnlyOneBlockLearns(), _cfg(k=1, profile_epochs=2))
    png = plot_profile(res, tmp_path / "profile.png", references={"full FT": 90.0})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(json.dumps(res.to_dict()))
    assert d["chosen"] == res.chosen and len(d["profile"]) == 4


def test_profile_speedup_measurement_compares_like_with_like():
    from frugalvision.adapt import measure_profile_speedup

    s = measure_profile_speedup(OnlyOneBlockLearns(), _cfg(profile_epochs=2))
    assert s["blocks"] == 4 and s["naive_s"] > 0 and s["cached_s"] > 0 and s["max_acc_diff"] < 1e-6
    assert s["full_ft_x_blocks_s"] == pytest.approx(4 * s["full_ft_run_s"])

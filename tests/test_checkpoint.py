from __future__ import annotations

import argparse
import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from frugalvision.engine import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint
from frugalvision.engine.checkpoint import capture_rng_state
from frugalvision.errors import CheckpointError
from frugalvision.weights import read_weights


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = build_optimizer(model, "adamw", lr=1e-2)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=3)
    return model, opt, sched


def _steps(model, opt, sched, n):
    for _ in range(n):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_restores_everything_and_continues_identically(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 5)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, step=5, epoch=1, extra={"note": "x"})
    _steps(model, opt, sched, 4)  # reference continuation: its random batches come from the RNG state saved above
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _setup(seed=123)  # different init, restored from the file
    state = load_checkpoint(path, model2, opt2, sched2)
    assert (state.step, state.epoch, state.extra["note"]) == (5, 1, "x")
    assert sched2.last_epoch == 5
    _steps(model2, opt2, sched2, 4)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_rng_state_restored(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    load_checkpoint(path, model)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    before = path.read_bytes()
    import frugalvision.weights as w

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(w, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors"):
        load_checkpoint(trunc, model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors"):
        load_checkpoint(garbage, model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors", model)


def test_foreign_files_are_never_unpickled(tmp_path):
    model, _, _ = _setup()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": Evil()}, evil)
    with pytest.raises(CheckpointError, match="PyTorch"):
        load_checkpoint(evil, model)
    with pytest.raises(CheckpointError, match="refusing"):
        read_weights(evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw, model)
    assert not marker.exists()


def test_plain_safetensors_is_not_a_training_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model, _, _ = _setup()
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
    with pytest.raises(CheckpointError, match="not a frugalvision training checkpoint"):
        load_checkpoint(p, model)
    assert set(read_weights(p)) == set(model.state_dict())


def test_mismatched_model_is_reported(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    other = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(path, other)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_weights_only_pytorch_files_and_wrappers(tmp_path):
    model, _, _ = _setup()
    sd = model.state_dict()
    for wrapper in ({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "epoch": 3}, {"model": sd}, sd):
        p = tmp_path / "w.pth.tar"
        torch.save(wrapper, p)
        loaded = read_weights(p)
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_scheduler_state_is_json(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, sched)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["frugalvision"])
    assert meta["scheduler"]["last_epoch"] == 2
    assert "rng" in meta and len(meta["rng"]) == 1
    assert capture_rng_state()["torch"].dtype == torch.uint8

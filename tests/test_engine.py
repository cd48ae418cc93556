from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from frugalvision.engine import ClassificationTask, TrainConfig, Trainer, evaluate, seed_everything
from frugalvision.engine.schedule import WarmupCosine
from frugalvision.errors import ConfigError

SCRIPT = Path(__file__).parent / "scripts" / "tiny_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, generator=g) + y[:, None].float()
    return TensorDataset(x, y)


def _model(seed=0, dropout=0.0):
    seed_everything(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, progress=False, device="cpu", optimizer="sgd", warmup_epochs=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_reports():
    ds = _data(128)
    model = _model()
    before = evaluate(model, ds, device="cpu")
    res = Trainer(model, _cfg(epochs=8), ds, ds).fit()
    assert res.steps == 8 * (128 // 16)
    assert res.final["acc1"] > before["acc1"] + 20
    assert res.final["loss"] < before["loss"]
    assert len(res.history) == 8 and all("val_acc1" in h for h in res.history)


def test_fit_trains_inside_no_grad():
    """A backbone trained on demand from feature-extraction code (under ``torch.no_grad``) must still train."""
    a, b = _model(), _model()
    Trainer(a, _cfg(), _data(), None).fit()
    with torch.no_grad():
        Trainer(b, _cfg(), _data(), None).fit()
        assert not torch.is_grad_enabled()
    flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b)]
    assert torch.equal(*flat)


def test_same_seed_same_weights_other_seed_differs():
    def run(seed):
        m = _model(dropout=0.3)
        Trainer(m, _cfg(seed=seed), _data(), None).fit()
        return torch.cat([p.flatten() for p in m.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_warmup_cosine_schedule_drives_lr():
    lrs = []
    m = _model()
    Trainer(m, _cfg(epochs=4, lr=0.1, warmup_epochs=1, min_lr_ratio=0.1), _data(), None,
            callbacks=[lambda tr, s, logs: lrs.append(logs["lr"])]).fit()
    spe = 64 // 16
    f = WarmupCosine(4 * spe, spe, 0.1)
    assert lrs == pytest.approx([0.1 * f(s) for s in range(1, 4 * spe + 1)])
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[:spe] == sorted(lrs[:spe]) and lrs[spe:] == sorted(lrs[spe:], reverse=True)
    assert lrs[-1] == pytest.approx(0.01)


def test_gradient_clipping_bounds_the_update():
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    norms = []
    cfg = _cfg(max_steps=1, lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=1e-3, warmup_epochs=0)
    Trainer(m, cfg, _data(), callbacks=[lambda tr, s, logs: norms.append(logs["grad_norm"])]).fit()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), before, strict=True)))
    assert norms[0] > 1e-3  # the raw gradient was larger than the clip ...
    assert float(step) == pytest.approx(1e-3, rel=1e-3)  # ... so the SGD step has exactly the clip norm


def test_bf16_autocast_on_cpu_trains():
    m = _model()
    res = Trainer(m, _cfg(amp="bf16", epochs=4), _data(128), _data(128)).fit()
    assert res.final["acc1"] > 50 and all(p.dtype == torch.float32 for p in m.parameters())


def test_bad_settings_are_clear():
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        Trainer(_model(), _cfg(amp="fp16"), _data())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(_model(), _cfg(device="cuda"), _data())
    with pytest.raises(ConfigError, match="larger than the training set"):
        Trainer(_model(), _cfg(batch_size=1000), _data())
    with pytest.raises(ValueError, match="lr must be > 0"):
        _cfg(lr=0)
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Trainer(frozen, _cfg(), _data())


def test_nonfinite_loss_stops_with_advice():
    m = _model()
    with torch.no_grad():
        m[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower lr"):
        Trainer(m, _cfg(), _data()).fit()


def test_evaluate_matches_manual_computation():
    ds = _data(50)
    m = _model().eval()
    got = evaluate(m, ds, ClassificationTask(topk=(1, 2)), batch_size=7, device="cpu")
    x, y = ds.tensors
    with torch.no_grad():
        logits = m(x)
    assert got["acc1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    top2 = logits.topk(2, 1).indices
    assert got["acc2"] == pytest.approx(100 * (top2 == y[:, None]).any(1).float().mean().item())
    assert got["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_crash_and_resume_in_process_is_exact(tmp_path, workers):
    from tiny_training import NoisyBlobs

    def build(out, resume=None, crash_at=None):
        seed_everything(0)
        m = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))

        def crash(tr, step, logs):
            if step == crash_at:
                raise RuntimeError("simulated crash")

        cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, output_dir=out, ckpt_every=2, progress=False,
                          device="cpu", num_workers=workers, resume=resume, seed=3)
        return m, Trainer(m, cfg, NoisyBlobs(), callbacks=[crash] if crash_at else [])

    ref, tr = build(tmp_path / "ref")
    tr.fit()
    m, tr = build(tmp_path / "run", crash_at=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tr.fit()
    m, tr = build(tmp_path / "run", resume="auto")
    assert tr.step == 0
    res = tr.fit()
    assert res.steps == 18
    for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def _ckpt_step(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as fh:
            return json.loads(fh.metadata()["frugalvision"])["step"]
    except Exception:
        return -1


def test_killed_training_resumes_bit_identically(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(SCRIPT), str(ref)], check=True, env=ENV, timeout=300)

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run), "--sleep", "0.15"], env=ENV)
    ckpt = run / "last.safetensors"
    deadline = time.time() + 240
    while time.time() < deadline and _ckpt_step(ckpt) < 6:
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean-up, like a power cut or OOM kill
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _ckpt_step(ckpt)
    assert 6 <= killed_at < 18 and not (run / "final.safetensors").exists()

    subprocess.run([sys.executable, str(SCRIPT), str(run), "--resume"], check=True, env=ENV, timeout=300)
    a, b = load_file(ref / "final.safetensors"), load_file(run / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_ddp_two_processes_match_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["--no-dropout", "--no-augment", "--optimizer", "sgd", "--epochs", "2"]
    subprocess.run([sys.executable, str(SCRIPT), str(single), *args], check=True, env=ENV, timeout=300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(ddp), *args]
    out = subprocess.run(cmd, env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_file(single / "final.safetensors"), load_file(ddp / "final.safetensors")
    with safe_open(str(ddp / "final.safetensors"), "pt") as fh:
        assert fh.metadata()["world_size"] == "2"
    init = _model_init_params()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
        moved += float((a[k] - init[k]).abs().sum())
    assert moved > 1e-2  # training really changed the weights, so equality is meaningful


def _model_init_params():
    seed_everything(0)
    m = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 4))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}

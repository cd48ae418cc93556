"""Training commands fail safely: no run is replaced by accident, bad numbers and sizes are refused up front with
one line, a diverging run keeps its last good checkpoint, and SyncBatchNorm converts and converts back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from frugalvision.cli import main
from frugalvision.engine import TrainConfig, Trainer
from frugalvision.engine.distributed import DistInfo, convert_sync_batchnorm
from frugalvision.engine.task import ClassificationTask
from frugalvision.errors import ConfigError

TINY = ["model=test_resnet", "data=faces", "img_size=32", "batch_size=16", "progress=false", "device=cpu"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ckpt_step(path: Path) -> int:
    with safe_open(str(path), "pt") as fh:
        return int(json.loads(fh.metadata()["frugalvision"])["step"])


# --------------------------------------------------------------------------------------------- A: no silent replace
def test_train_refuses_to_replace_a_run_and_keeps_its_files(tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    assert main(["train", *TINY, "max_steps=1", f"output_dir={run}"]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    assert {"model.safetensors", "last.safetensors", "metrics.json"} <= set(before)

    assert main(["train", *TINY, "max_steps=1", "seed=1", f"output_dir={run}"]) == 2
    err = _one_line_error(capsys)
    assert str(run) in err and "model.safetensors" in err and "overwrite=true" in err and "resume=auto" in err
    assert _snapshot(run) == before  # byte-identical

    assert main(["train", *TINY, "max_steps=2", "resume=auto", f"output_dir={run}"]) == 0  # continues the run
    capsys.readouterr()
    assert _ckpt_step(run / "last.safetensors") == 2
    assert main(["train", *TINY, "max_steps=1", "seed=1", "overwrite=true", f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert _ckpt_step(run / "last.safetensors") == 1
    assert (run / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.parametrize("argv,names", [
    (["segment", "segmenter=ours:resnet10t", "backbone_weights=none"], ("resume=auto",)),
    (["profile", "model=test_resnet", "data=faces"], ()),
    (["surgery", "model=test_vit", "speedup=1.2"], ()),
])
def test_other_commands_refuse_a_run_folder_before_any_work(tmp_path, capsys, argv, names):
    run = tmp_path / "run"
    run.mkdir()
    marker = {"segment": "model.safetensors", "profile": "chosen_layers.json", "surgery": "model.safetensors"}[argv[0]]
    (run / marker).write_bytes(b"an earlier run's output")
    before = _snapshot(run)
    assert main([*argv, "progress=false", f"output_dir={run}"]) == 2
    err = _one_line_error(capsys)
    assert marker in err and "overwrite=true" in err and all(n in err for n in names)
    assert ("resume=auto" in err) == bool(names)  # offered only where the command can resume
    assert _snapshot(run) == before


def test_resume_auto_without_a_checkpoint_does_not_replace_a_finished_run(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"finished")
    assert main(["train", *TINY, "max_steps=1", "resume=auto", f"output_dir={run}"]) == 2
    err = _one_line_error(capsys)
    assert "no checkpoint" in err and "last.safetensors" in err and "overwrite=true" in err
    assert (run / "model.safetensors").read_bytes() == b"finished"
    file_out = tmp_path / "file"
    file_out.write_text("x")
    assert main(["train", *TINY, "max_steps=1", f"output_dir={file_out}"]) == 2
    assert "is a file" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------------- B: image sizes
def test_fixed_size_models_are_built_for_img_size_and_weights_resample(tmp_path, capsys, one_thread):
    from frugalvision.pipelines.common import load_pretrained
    from frugalvision.weights import read_model_info, read_weights

    run = tmp_path / "vit"
    assert main(["train", *TINY, "model=test_vit", "max_steps=1", f"output_dir={run}"]) == 0  # default is 160
    capsys.readouterr()
    assert read_model_info(run / "model.safetensors")["model_kwargs"]["img_size"] == 32
    # weights trained at 32 load into the same ViT built at 48: the position embedding is resampled
    model = timm.create_model("test_vit", img_size=48, num_classes=2)
    load_pretrained(model, run / "model.safetensors")
    src = read_weights(run / "model.safetensors")
    want = timm.layers.resample_abs_pos_embed(src["pos_embed"], new_size=[3, 3], num_prefix_tokens=1, verbose=False)
    assert src["pos_embed"].shape != model.pos_embed.shape
    assert torch.allclose(model.pos_embed, want) and torch.equal(model.blocks[0].attn.qkv.weight,
                                                                 src["blocks.0.attn.qkv.weight"])


def test_bench_builds_fixed_size_models_at_img_size(tmp_path, capsys, one_thread):
    assert main(["bench", "test_vit", "img_size=32", "batch_size=2", "repeats=1", "throughput_repeats=1",
                 "warmup=0"]) == 0
    assert "| test_vit | eager |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,expect", [
    (["bench", "test_vit", "img_size=8"], ("test_vit", "img_size=8", "multiples of its patch size 16")),
    (["train", *TINY, "model=test_vit", "img_size=8"], ("test_vit", "img_size=8", "multiples of its patch size 16")),
    (["train", *TINY, "model=test_fastervit", "img_size=96"], ("test_fastervit", "multiples of 64")),
])
def test_sizes_a_model_cannot_take_are_refused_with_the_sizes_it_can(tmp_path, capsys, argv, expect):
    extra = [f"output_dir={tmp_path / 'r'}"] if argv[0] == "train" else []
    assert main([*argv, *extra]) == 2
    err = _one_line_error(capsys)
    assert all(e in err for e in expect), err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- C: segmenter names
@pytest.mark.parametrize("segmenter,expect", [
    ("ours:resnet19", ("'resnet19'", "resnet18", "frugalvision models")),
    ("foo:bar", ("'foo'", "ours:<timm backbone>", "smp:<arch>")),
])
def test_unknown_segmenters_exit_2_with_suggestions(tmp_path, capsys, segmenter, expect):
    assert main(["segment", f"segmenter={segmenter}", f"output_dir={tmp_path / 'seg'}"]) == 2
    err = _one_line_error(capsys)
    assert all(e in err for e in expect), err
    assert not (tmp_path / "seg").exists()


# --------------------------------------------------------------------------------------------- D: numbers, divergence
@pytest.mark.parametrize("override", ["lr=nan", "lr=1e30", "lr=-1", "img_size=0", "batch_size=0", "max_steps=-2",
                                      "weight_decay=inf", "warmup_epochs=-1", "label_smoothing=1.5", "grad_clip=nan"])
def test_bad_numbers_are_refused_up_front(tmp_path, capsys, override):
    assert main(["train", *TINY, "max_steps=1", override, f"output_dir={tmp_path / 'r'}"]) == 2
    err = _one_line_error(capsys)
    assert f"{override.split('=')[0]} must be" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("how", ["weights", "loss"])
def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, how,
                                                                          one_thread):
    original = ClassificationTask.loss
    calls = {"n": 0}

    def diverging_loss(self, outputs, batch):
        loss = original(self, outputs, batch)
        if loss.requires_grad:  # a training step
            calls["n"] += 1
            if calls["n"] == 2:
                if how == "loss":
                    return loss * float("nan")
                loss.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradients -> NaN weights
        return loss

    monkeypatch.setattr(ClassificationTask, "loss", diverging_loss)
    run = tmp_path / "r"
    assert main(["train", *TINY, "max_steps=3", "ckpt_every=1", f"output_dir={run}"]) == 1
    err = _one_line_error(capsys)
    assert ("non-finite" if how == "weights" else "loss became nan") in err
    assert "lower lr" in err and str(run / "last.safetensors") in err and "(step 1)" in err
    assert _ckpt_step(run / "last.safetensors") == 1 and not (run / "model.safetensors").exists()
    saved = load_file(run / "last.safetensors")
    assert all(torch.isfinite(v).all() for k, v in saved.items() if k.startswith("model/") and v.is_floating_point())


# --------------------------------------------------------------------------------------------- E: SyncBatchNorm
@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])  # nn.BatchNorm2d / timm's BatchNormAct2d
def test_sync_batchnorm_converts_and_converts_back(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    ref, keys = model(x), list(model.state_dict())
    kinds = {n: type(m) for n, m in model.named_modules()}
    restore = convert_sync_batchnorm(model)
    synced = [n for n, m in model.named_modules() if "SyncBatchNorm" in type(m).__name__]
    assert synced and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == keys and torch.equal(model(x), ref)  # same keys, same function
    with torch.no_grad():
        model.get_submodule(synced[0]).running_mean.add_(1.0)  # state changed while synchronised ...
    changed = model.get_submodule(synced[0]).running_mean.clone()
    restore()
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert torch.equal(model.get_submodule(synced[0]).running_mean, changed)  # ... is kept by the plain layers
    assert not torch.equal(model(x), ref)


def test_sync_bn_under_ddp_on_cpu_is_refused(monkeypatch):
    from torch.utils.data import TensorDataset

    monkeypatch.setattr("frugalvision.engine.trainer.init_distributed", lambda device: DistInfo(0, 2, 0))
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,)))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA"):
        Trainer(model, TrainConfig(batch_size=4, sync_bn=True, device="cpu", progress=False), data)

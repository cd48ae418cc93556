"""ViT surgery (attention -> modulation mixers under a latency budget) and the distillation task."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

from frugalvision import modulate
from frugalvision.engine import ClassificationTask, TrainConfig, Trainer, evaluate
from frugalvision.engine.distill import DistillationTask, DistillOutput, kd_loss
from frugalvision.errors import ConfigError
from frugalvision.surgery import (
    BlockCost,
    CostTable,
    TokenModulationMixer,
    find_attention_blocks,
    measure_block_costs,
    plan_surgery,
    replace_mixers,
)
from frugalvision.weights import load_model_file, save_model_file


def tiny_vit(depth: int = 4, **kw) -> nn.Module:
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": depth, "num_heads": 2, "num_classes": 5, **kw}
    return timm.create_model("vit_tiny_patch16_224", **kw)


def fake_costs(savings: list[float], attn: float = 2.0, base: float = 20.0) -> tuple[float, list[BlockCost]]:
    return base, [BlockCost(f"blocks.{i}", attn, attn - s, attn + 1.0) for i, s in enumerate(savings)]


# --------------------------------------------------------------------------------------------- selection
def test_plan_picks_exactly_the_largest_savings():
    base, costs = fake_costs([0.5, 1.5, 0.2, 1.0, -0.3])
    chosen, predicted = plan_surgery(costs, base, budget_ms=18.0)
    assert chosen == ["blocks.1", "blocks.3"]
    assert predicted == pytest.approx(17.5)
    chosen, predicted = plan_surgery(costs, base, budget_ms=17.0)
    assert chosen == ["blocks.1", "blocks.3", "blocks.0"] and predicted == pytest.approx(17.0)
    assert plan_surgery(costs, base, budget_ms=25.0) == ([], base)  # already within budget
    # savings timed in isolation are scaled to the whole model's time
    assert plan_surgery(costs, base, budget_ms=16.0, scale=2.0) == (["blocks.1", "blocks.3"], 15.0)
    table = CostTable(10.0, [BlockCost("a", 1.0, 0.5, 2.0), BlockCost("b", 1.0, 0.5, 2.0)], rest_ms=1.0)
    assert table.parts_ms == 5.0 and table.scale == 2.0 and CostTable(10.0, table.blocks).scale == 1.0


def test_plan_unreachable_budget_says_best_achievable():
    base, costs = fake_costs([0.5, 1.5, -0.3])
    with pytest.raises(ConfigError, match=r"unreachable.*best achievable is 18 ms.*2 of 3.*1 would get slower"):
        plan_surgery(costs, base, budget_ms=17.0)
    with pytest.raises(ConfigError, match="budget_ms must be > 0"):
        plan_surgery(costs, base, budget_ms=0.0)


def test_modulate_with_cost_table_replaces_chosen_blocks_only():
    model = tiny_vit(depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    new, rep = modulate(model, budget_ms=18.4, costs=fake_costs([0.3, 0.9, 0.1, 0.8]), measure_after=False,
                        progress=False)
    assert rep.replaced == ["blocks.1", "blocks.3"] and rep.predicted_ms == pytest.approx(18.3)
    kinds = [type(b.attn).__name__ for b in new.blocks]
    assert kinds == ["Attention", "TokenModulationMixer", "Attention", "TokenModulationMixer"]
    assert all(type(b.attn).__name__ == "Attention" for b in model.blocks)  # the original is untouched (copy)
    for b in (new.blocks[1], new.blocks[3]):
        assert b.attn.dim == 32 and b.attn.proj.out_features == 32 and b.attn.vf.in_features == 32
        assert b.attn.grid_size == (4, 4) and b.attn.num_prefix_tokens == 1
    y = new(x)
    assert y.shape == ref.shape
    # speedup= is a budget relative to the measured (here: given) latency
    _, rep2 = modulate(model, speedup=20 / 18.4, costs=fake_costs([0.3, 0.9, 0.1, 0.8]), measure_after=False,
                       progress=False)
    assert rep2.replaced == rep.replaced and rep2.budget_ms == pytest.approx(18.4)
    assert "| blocks.1 |" in rep.to_markdown() and json.dumps(rep.to_dict())


def test_modulate_argument_errors():
    model = tiny_vit(depth=2)
    with pytest.raises(ConfigError, match="exactly one of budget_ms"):
        modulate(model, progress=False)
    with pytest.raises(ConfigError, match="exactly one of budget_ms"):
        modulate(model, budget_ms=1.0, speedup=2.0, progress=False)
    with pytest.raises(ConfigError, match="speedup must be > 1"):
        modulate(model, speedup=0.5, progress=False)
    with pytest.raises(ConfigError, match="not a ViT-family model"):
        modulate(timm.create_model("resnet18"), budget_ms=1.0, progress=False)
    with pytest.raises(ConfigError, match="no replaceable attention"):
        modulate(model, budget_ms=1.0, costs=(5.0, [BlockCost("head", 1.0, 0.5)]), progress=False)
    with pytest.raises(ConfigError, match="unreachable"):
        modulate(model, budget_ms=1.0, costs=fake_costs([0.5, 0.5], base=5.0), progress=False)
    replace_mixers(model, ["blocks.0", "blocks.1"])
    with pytest.raises(ConfigError, match="no recognisable attention blocks"):
        find_attention_blocks(model)


def test_measured_costs_and_side_by_side_report(one_thread):
    model = tiny_vit(depth=2).eval()
    table = measure_block_costs(model, torch.randn(1, 3, 32, 32), kernel_size=3, repeats=3, warmup=1)
    assert table.base_ms > 0 and table.rest_ms > 0 and [c.name for c in table.blocks] == ["blocks.0", "blocks.1"]
    assert all(c.attn_ms > 0 and c.mixer_ms > 0 and c.block_ms > 0 for c in table.blocks)
    assert table.scale == pytest.approx(table.base_ms / (table.rest_ms + sum(c.block_ms for c in table.blocks)))
    torch.set_num_threads(2)
    _, rep = modulate(model, blocks=["blocks.0"], kernel_size=3, repeats=3, warmup=1, threads=1, progress=False)
    assert torch.get_num_threads() == 2 and rep.threads == 1  # restored
    assert rep.replaced == ["blocks.0"] and rep.measured_before_ms > 0 and rep.measured_after_ms > 0
    assert rep.predicted_ms == pytest.approx(rep.base_ms - rep.scale * rep.blocks[0].saving_ms)
    assert rep.measured_speedup == pytest.approx(rep.measured_before_ms / rep.measured_after_ms)


# --------------------------------------------------------------------------------------------- the mixer
def test_mixer_init_from_attention_is_value_projection():
    model = tiny_vit(depth=1, qkv_bias=True).eval()
    attn = model.blocks[0].attn
    mixer = TokenModulationMixer.from_attention(attn, 3, 1, (4, 4))
    with torch.no_grad():
        mixer.g.weight.zero_()  # context exactly 1
    x = torch.randn(2, 17, 32)
    v = nn.functional.linear(x[:, 1:], attn.qkv.weight[64:], attn.qkv.bias[64:])
    # patch tokens: their own value (self-only attention); class token: uniform attention over the patches
    expect = attn.proj(torch.cat([v.mean(1, keepdim=True), v], dim=1))
    torch.testing.assert_close(mixer(x), expect)
    lite = TokenModulationMixer.from_attention(attn, 3, 1, (4, 4), context_fc=False)
    with torch.no_grad():
        lite.dwconv.weight.zero_()  # GELU(bias) == 1
    torch.testing.assert_close(lite(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("context_fc", [True, False])
def test_mixer_is_local_on_the_grid_and_prefix_tokens_pool_the_patches(prefix, context_fc):
    mixer = TokenModulationMixer(8, kernel_size=3, num_prefix_tokens=prefix, grid_size=(5, 6), context_fc=context_fc)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_()  # no special init: a real dependence test
    x = torch.randn(1, prefix + 30, 8, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    # patch token (row 0, col 0) depends on itself and its 3x3 neighbours only
    (g,) = torch.autograd.grad(y[0, prefix + 0].sum(), x, retain_graph=True)
    dep = g[0, prefix:].abs().sum(-1).reshape(5, 6) > 0
    expect = torch.zeros(5, 6, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(dep, expect)
    if prefix:
        (g,) = torch.autograd.grad(y[0, 0].sum(), x)
        assert (g[0, prefix:].abs().sum(-1) > 0).all()  # mean over every patch


def test_mixer_gradients_reach_every_parameter_and_infers_square_grid():
    mixer = TokenModulationMixer(16, kernel_size=5, num_prefix_tokens=1)  # no grid: inferred (7x7)
    out = mixer(torch.randn(3, 50, 16))
    out.square().mean().backward()
    for n, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    with pytest.raises(ValueError, match="do not form the grid"):
        mixer(torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match="attention masks are not supported"):
        mixer(torch.randn(1, 50, 16), attn_mask=torch.ones(50, 50, dtype=torch.bool))
    with pytest.raises(ConfigError, match="odd"):
        TokenModulationMixer(16, kernel_size=4)


def test_modulated_vit_trains_end_to_end():
    model = tiny_vit(depth=2)
    replace_mixers(model, ["blocks.0", "blocks.1"])
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".attn." in n)


@pytest.mark.parametrize("name,prefix", [
    ("vit_tiny_patch16_224", 1),
    ("deit_tiny_patch16_224", 1),
    ("deit_tiny_distilled_patch16_224", 2),
    ("vit_little_patch16_reg4_gap_256", 4),
])
def test_timm_vit_and_deit_models_are_accepted(name, prefix):
    model = timm.create_model(name, img_size=32, depth=2, num_classes=4).eval()
    assert model.num_prefix_tokens == prefix
    names = find_attention_blocks(model)
    assert names == ["blocks.0", "blocks.1"]
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    replace_mixers(model, names, kernel_size=3)
    assert all(isinstance(b.attn, TokenModulationMixer) and b.attn.num_prefix_tokens == prefix for b in model.blocks)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == ref.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- distillation
def test_kd_loss_matches_definition():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    T = 3.0
    p_t = (t / T).softmax(-1)
    ref = (p_t * (p_t.log() - (s / T).log_softmax(-1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), ref)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_task_terms_and_weights():
    teacher, student = tiny_vit(depth=2).eval(), tiny_vit(depth=2)
    replace_mixers(student, ["blocks.1"])
    task = DistillationTask(teacher, features=["blocks.0", "blocks.1"], alpha_ce=0.0, alpha_kd=2.0, alpha_feat=3.0,
                            temperature=2.0)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    out = task.forward(student, batch)
    assert isinstance(out, DistillOutput) and set(out.features) == {"blocks.0", "blocks.1"}
    assert out.features["blocks.1"].shape == (4, 17, 32) and not out.teacher_logits.requires_grad
    total = task.loss(out, batch)
    mse = torch.stack([nn.functional.mse_loss(out.features[k], out.teacher_features[k]) for k in out.features]).mean()
    expect = 2.0 * kd_loss(out.logits, out.teacher_logits, 2.0) + 3.0 * mse
    torch.testing.assert_close(total, expect)
    assert sorted(out.terms) == ["loss_ce", "loss_feat", "loss_kd"]
    assert all(not p.requires_grad for p in teacher.parameters())
    # identical student and teacher: zero distillation terms
    out = task.forward(teacher, batch)
    task.loss(out, batch)
    assert float(out.terms["loss_kd"]) == pytest.approx(0.0, abs=1e-6) and float(out.terms["loss_feat"]) == 0.0
    with pytest.raises(ConfigError, match="teacher has no modules"):
        DistillationTask(teacher, features=["blocks.9"])
    with pytest.raises(ConfigError, match="temperature"):
        DistillationTask(teacher, temperature=0)


@pytest.mark.parametrize("weights,term", [((0.5, 1.0, 1.0), "loss"), ((0.0, 1.0, 0.0), "loss_kd"),
                                          ((0.0, 0.0, 1.0), "loss_feat")])
def test_distillation_with_the_engine_reduces_the_loss(one_thread, weights, term):
    torch.manual_seed(0)
    teacher = tiny_vit(depth=2).eval()
    with torch.no_grad():
        teacher.head.weight.mul_(30.0)  # confident teacher: informative soft targets
    student, _ = modulate(teacher, blocks=["blocks.0", "blocks.1"], costs=fake_costs([0.1, 0.1]), init="random",
                          measure_after=False, progress=False)
    student.train()
    images = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        labels = teacher(images).argmax(-1)
    ds = TensorDataset(images, labels)
    a_ce, a_kd, a_feat = weights
    task = DistillationTask(teacher, features=["blocks.0", "blocks.1"], alpha_ce=a_ce, alpha_kd=a_kd,
                            alpha_feat=a_feat)
    before = evaluate(student, ds, task, batch_size=48, device="cpu")
    assert {"loss", "loss_ce", "loss_kd", "loss_feat", "acc1"} <= set(before)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=3e-3, progress=False, device="cpu", weight_decay=0.0)
    Trainer(student, cfg, ds, None, task).fit()
    after = evaluate(student, ds, task, batch_size=48, device="cpu")
    assert after[term] < 0.7 * before[term]
    if term == "loss":
        assert evaluate(student, ds, ClassificationTask(), device="cpu")["acc1"] > before["acc1"]


# --------------------------------------------------------------------------------------------- CLI + files
def test_cli_surgery_writes_a_loadable_model_file(tmp_path, capsys, one_thread):
    from frugalvision.cli import main

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
    path = save_model_file(timm.create_model("vit_tiny_patch16_224", **kwargs), tmp_path / "vit.safetensors",
                           "classifier", "vit_tiny_patch16_224", kwargs, classes=["a", "b", "c"], img_size=32)
    rc = main(["surgery", f"model_file={path}", "blocks=[blocks.0]", "repeats=2", "threads=1", "distill_epochs=0",
               f"output_dir={tmp_path / 'out'}", "progress=false"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "report.json").read_text())
    assert res["report"]["replaced"] == ["blocks.0"] and (tmp_path / "out" / "report.md").is_file()
    model, info = load_model_file(tmp_path / "out" / "model.safetensors")
    assert isinstance(model.blocks[0].attn, TokenModulationMixer) and info["surgery"]["blocks"] == ["blocks.0"]
    assert info["kind"] == "surgery"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and info["classes"] == ["a", "b", "c"]
    rc = main(["surgery", "model=resnet18", "img_size=32", "budget_ms=1", "progress=false",
               f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "resnet18" in err and "Traceback" not in err
    rc = main(["surgery", "model=vit_tiny_patch16_224", "img_size=32", "progress=false"])
    assert rc == 2 and "exactly one of budget_ms" in capsys.readouterr().err


def test_run_surgery_on_a_model_file_distils_and_reports_accuracy(tmp_path, one_thread):
    from frugalvision.pipelines.surgery import SurgeryConfig, run_surgery

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 2}
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    path = save_model_file(model, tmp_path / "vit.safetensors", "classifier", "vit_tiny_patch16_224", kwargs,
                           classes=["face", "nonface"], img_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    cfg = SurgeryConfig(model_file=str(path), blocks=["blocks.1"], data="faces", distill_epochs=1, batch_size=40,
                        repeats=1, threads=1, progress=False, device="cpu", output_dir=tmp_path / "out")
    res = run_surgery(cfg)
    assert set(res["acc1"]) == {"original", "surgery", "distilled"}
    assert all(0.0 <= v <= 100.0 for v in res["acc1"].values())
    student, info = load_model_file(res["model_file"])
    assert info["classes"] == ["face", "nonface"] and isinstance(student.blocks[1].attn, TokenModulationMixer)
    assert not isinstance(student.blocks[0].attn, TokenModulationMixer)

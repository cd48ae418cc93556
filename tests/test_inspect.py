"""Defect rendering, the bundled benchmark, procedural synthesis, segmentation metrics/models, synth and predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score

from frugalvision.cli import main
from frugalvision.inspect.bundled import BENCHMARK_CATEGORIES, build_benchmark, load_benchmark
from frugalvision.inspect.defects import DEFECT_KINDS, describe_defect, render_defect
from frugalvision.inspect.metrics import ScoreHistogram, SegmentationMetrics, iou_from_confusion
from frugalvision.inspect.segmentation import SegmentationTask, build_segmenter, soft_dice_loss
from frugalvision.inspect.synthesis.procedural import ProceduralConfig, ProceduralSynthesizer, perlin_noise
from frugalvision.pipelines.inspection import SegmentConfig, few_shot_split, train_segmenter


def _texture(seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = rng.normal(120, 20, (size, size, 1)).clip(0, 255)
    return np.repeat(base, 3, 2).astype(np.uint8)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_renderers_change_only_the_masked_pixels(kind):
    img = _texture()
    out, mask = render_defect(kind, img, np.random.default_rng(1), foreign=_texture(5, 128))
    assert mask.dtype == bool and 12 <= mask.sum() < 0.5 * mask.size
    assert np.array_equal(out[~mask], img[~mask])
    assert np.abs(out[mask].astype(int) - img[mask]).mean() > 5  # the defect is visible
    again, mask2 = render_defect(kind, img, np.random.default_rng(1), foreign=_texture(5, 128))
    assert np.array_equal(again, out) and np.array_equal(mask, mask2)  # deterministic


def test_caption_names_kind_location_and_size():
    m = np.zeros((90, 90), bool)
    m[60:80, 5:25] = True
    cap = describe_defect("crack", m, "gravel")
    assert cap.startswith("A crack on the gravel surface at the bottom left") and "20x20 pixels" in cap


def test_bundled_benchmark_layout_and_captions():
    root = build_benchmark()
    test, train = load_benchmark("test"), load_benchmark("train")
    assert test.categories == sorted(BENCHMARK_CATEGORIES) and test.defects == sorted(DEFECT_KINDS)
    assert len(train) == 5 * 60 and len(test) == 5 * (20 + 7 * 6)
    bad = [s for s in test.samples if s.label]
    assert all(s.caption and s.defect in s.caption.replace("discoloured patch", "color")
               .replace("missing-material chip", "missing").replace("contamination particle", "contamination")
               for s in bad)
    m = np.asarray(Image.open(bad[0].mask))
    assert set(np.unique(m)) == {0, 255} and m.shape == (128, 128)
    assert json.loads((root / "manifest.json").read_text())["kinds"] == list(DEFECT_KINDS)


def test_perlin_noise_is_smooth_and_seeded():
    a = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert np.array_equal(a, perlin_noise((64, 64), (4, 4), np.random.default_rng(0)))
    assert np.abs(np.diff(a, axis=0)).max() < 0.2  # gradient noise: neighbouring pixels are close
    assert a.std() > 0.1


def test_procedural_size_and_contrast_controls():
    img = _texture(2, 96)
    src = [_texture(9, 128) + 60]

    def stats(size, contrast, kind="contamination", n=12):
        synth = ProceduralSynthesizer(src, ProceduralConfig(size=size, contrast=contrast))
        rng = np.random.default_rng(0)
        areas, diffs = [], []
        for _ in range(n):
            out, mask, k = synth(img, rng, kind)
            assert k == kind and np.array_equal(out[~mask], img[~mask])
            areas.append(mask.mean())
            diffs.append(np.abs(out[mask].astype(float) - img[mask]).mean())
        return np.mean(areas), np.mean(diffs)

    small, _ = stats(0.6, 1.0)
    big, _ = stats(1.6, 1.0)
    assert big > 2 * small
    _, faint = stats(1.0, 0.2)
    _, strong = stats(1.0, 1.0)
    assert strong > 3 * faint
    with pytest.raises(ValueError, match="contrast must be in"):
        ProceduralConfig(contrast=2)
    with pytest.raises(ValueError, match="unknown defect kind"):
        ProceduralConfig(kinds=("dent",))


def test_score_histogram_matches_sklearn():
    g = np.random.default_rng(0)
    y = g.random(50_000) < 0.1
    s = np.clip(g.random(50_000) * 0.8 + 0.25 * y, 0, 1)
    h = ScoreHistogram()
    h.update(torch.from_numpy(s), torch.from_numpy(y))
    assert h.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    p, r, _ = precision_recall_curve(y, s)
    assert h.f1_max()[0] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-12)), abs=2e-3)


def test_segmentation_metrics_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 10, 10, generator=g)
    target = torch.randint(0, 4, (3, 10, 10), generator=g)
    target[:, :5] = 0
    m = SegmentationMetrics(["bg", "a", "b", "c"])
    m.update(logits[:2], {"mask": target[:2]})
    m.update(logits[2:], {"mask": target[2:]})
    r = m.compute()
    pred = logits.argmax(1)
    for c, name in enumerate(["bg", "a", "b", "c"]):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        assert r[f"IoU/{name}"] == pytest.approx(100 * inter / union)
    assert r["mIoU"] == pytest.approx(np.mean([r[f"IoU/{n}"] for n in ["bg", "a", "b", "c"]]))
    score = (1 - logits.softmax(1)[:, 0]).flatten().numpy()
    assert r["pixel_AUROC"] == pytest.approx(100 * roc_auc_score((target > 0).flatten().numpy(), score), abs=0.2)
    assert torch.isnan(iou_from_confusion(torch.tensor([[5, 0], [0, 0]]))[1])  # absent class: undefined, not 0


def test_dice_and_task_loss_prefer_the_right_answer():
    t = torch.zeros(1, 8, 8, dtype=torch.long)
    t[0, 2:5, 2:5] = 1
    good = torch.nn.functional.one_hot(t, 2).permute(0, 3, 1, 2).float() * 8 - 4
    task = SegmentationTask(["bg", "hole"])
    assert soft_dice_loss(good, t) < soft_dice_loss(-good, t)
    assert task.loss(good, {"mask": t}) < task.loss(-good, {"mask": t})


def test_segmenters_and_frozen_backbone_fusion():
    from timm.utils import reparameterize_model

    from frugalvision.utils.testing import randomize_bn_stats

    m = build_segmenter("ours:repvgg_a0", 5, dim=16)
    m.freeze_backbone("all")
    randomize_bn_stats(m).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m.backbone = reparameterize_model(m.backbone)
        # random BN statistics make activations reach ~1e5: compare relative to that scale (float64 gives 1e-10)
        assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    m.freeze_backbone("all")
    m.train()
    assert not m.backbone.training and not any(p.requires_grad for p in m.backbone.parameters())
    assert build_segmenter("smp:unet", 3)(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="must look like"):
        build_segmenter("unet", 3)


def test_few_shot_split_keeps_test_images_out_of_training():
    samples = load_benchmark("test", "brick").samples
    train, test = few_shot_split(samples, 2, seed=0)
    assert len(train) == 2 * 7 and not set(train) & set(test) and len(train) + len(test) == len(samples)
    assert all(s.label for s in train) and sum(1 for s in test if not s.label) == 20


def test_segment_pipeline_trains_saves_and_predicts(tmp_path, capsys):
    cfg = SegmentConfig(segmenter="ours:resnet10t", backbone_weights="none", freeze="none", categories=["brick"],
                        synthetic="procedural", synthetic_per_kind=1, max_steps=4, epochs=1, eval_every=0,
                        img_size=64, output_dir=tmp_path / "seg", progress=False, batch_size=8)
    res = train_segmenter(cfg)
    assert res["real_defects_train"] == 14 and res["train_images"] == 14 + 10 + 7
    assert 0 <= res["test"]["mIoU"] <= 100 and (tmp_path / "seg/model.safetensors").is_file()

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, s in enumerate(load_benchmark("test", "brick").samples[:3]):
        Image.open(s.image).save(imgs / f"{i}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "pred"
    argv = ["predict", str(imgs), f"model_file={tmp_path / 'seg/model.safetensors'}", f"out={out}", "batch_size=2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["status"] for r in rows][:3] == ["ok"] * 3 and rows[3]["status"].startswith("skipped")
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["0.png", "1.png", "2.png", "broken.png"]
    mask = np.asarray(Image.open(out / "0_mask.png"))
    assert mask.shape == (128, 128) and mask.max() < 8 and (out / "0_overlay.png").is_file()
    before = (out / "0_mask.png").stat().st_mtime_ns
    assert main(argv) == 2  # refuses to overwrite
    assert "already exist" in capsys.readouterr().err and (out / "0_mask.png").stat().st_mtime_ns == before
    assert main([*argv, "overwrite=true"]) == 0


def test_synth_command_writes_mvtec_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "categories=grass", "per_kind=2", "kinds=hole,stain", f"out={out}"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["images"] == 4 and manifest["timings"]["generate_ms_per_image"] > 0
    from frugalvision.data.inspection import load_mvtec

    s = load_mvtec(out, split="test")
    assert s.defects == ["hole", "stain"] and len(s) == 4
    assert main(["synth", "categories=grass", "per_kind=1", f"out={out}"]) == 2  # no silent overwrite

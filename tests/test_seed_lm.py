"""The LM that reads and draws SEED codes (frugalvision.language.seed_lm), on a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from frugalvision.errors import ConfigError, DataError
from frugalvision.language.seed import text_to_codes
from frugalvision.language.seed_lm import SEEDLanguageModel, SEEDLMSettings, fit_seed_lm

K, Q = 16, 4


def lm(**kw) -> SEEDLanguageModel:
    torch.manual_seed(0)
    return SEEDLanguageModel(K, Q, "tiny", **{"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **kw})


def test_vocabulary_and_sequences():
    m = lm()
    ids = m.sequence([3, 1, 4, 15], "ab", image_first=True)
    assert ids[0] == m.start_id and ids[Q + 1] == m.end_id and ids[-1] == m.eos_id
    assert ids[1:Q + 1] == [m.first_image_id + c for c in (3, 1, 4, 15)]
    assert text_to_codes(m.tokenizer.decode(ids[:Q + 2]), Q, K).tolist() == [3, 1, 4, 15]
    text_first = m.sequence([3, 1, 4, 15], "ab", image_first=False)
    assert text_first[:2] == m.text_ids("ab") and text_first[2:-1] == ids[:Q + 2]
    assert len(m.tokenizer) == m.first_image_id + K + 2


def test_only_new_rows_and_lora_train_and_the_lm_rows_stay():
    m = lm()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "image_embed" in names and all(n == "image_embed" or "lora_" in n for n in names)
    assert m.tied and m.image_head is None  # the tiny LLaMA ties its input and output embeddings
    before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    rows = m.image_embed.detach().clone()
    fit_seed_lm(m, torch.randint(0, K, (4, Q)), ["ab", "cd", "ef", "gh"],
                SEEDLMSettings(steps=3, batch_size=2, progress=False))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert not torch.equal(rows, m.image_embed)


def test_untied_lm_gets_its_own_output_rows():
    transformers = pytest.importorskip("transformers")
    from frugalvision.language.llm import tiny_llm

    base, tok = tiny_llm()
    cfg = base.config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    untied = transformers.LlamaForCausalLM(cfg)
    m = SEEDLanguageModel(K, Q, model=untied, tokenizer=tok, lora=False)
    assert not m.tied and m.image_head is not None and m.image_head is not m.image_embed
    logits = m.logits(torch.randn(2, cfg.hidden_size))
    assert logits.shape == (2, len(tok))


def test_logits_over_the_extended_vocabulary_match_the_lm_on_text():
    m = lm(lora=False)
    ids = torch.tensor([m.text_ids("hello")])
    hidden = m._hidden(ids, torch.ones_like(ids)).last_hidden_state
    ours = m.logits(hidden)[..., :m.first_image_id]
    ref = m.causal_lm()(input_ids=ids).logits[..., :m.first_image_id]
    torch.testing.assert_close(ours, ref)


def test_kv_cached_reading_equals_recomputing_the_whole_sequence():
    m = lm()
    with torch.no_grad():
        m.image_embed.normal_(0, 1)  # distinct rows so that different codes give different continuations
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    got = m._decode([m.code_ids(c) for c in codes], 6, slice(0, m.first_image_id), None, False, 1.0, None)
    for c, row in zip(codes, got, strict=True):
        seq = m.code_ids(c)
        for _ in range(6):  # no cache, no padding: one full forward per token
            ids = torch.tensor([seq])
            logits = m.logits(m._hidden(ids, torch.ones_like(ids)).last_hidden_state[:, -1])[0]
            seq.append(int(logits[:m.first_image_id].argmax()))
        assert row == seq[Q + 2:]


def test_learns_to_read_and_draw_two_images():
    from frugalvision.language.llm import tiny_llm

    base, tok = tiny_llm()
    with torch.no_grad():  # the random tiny LM's text rows (std 0.02) are too small to predict text confidently;
        base.get_input_embeddings().weight.mul_(10)  # a pretrained LM's are not. Its own rows stay frozen.
    torch.manual_seed(0)
    m = SEEDLanguageModel(K, Q, model=base, tokenizer=tok, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    codes = torch.tensor([[1, 2, 3, 4], [9, 10, 11, 12]])
    caps = ["red", "blue"]
    fit_seed_lm(m, codes, caps, SEEDLMSettings(steps=200, batch_size=4, lr=1e-2, rows_lr=3e-2, progress=False))
    assert m.read(codes, max_new_tokens=8) == caps
    assert m.draw(caps).tolist() == codes.tolist()


def test_draw_and_read_outputs_are_well_formed():
    m = lm()
    g = torch.Generator().manual_seed(0)
    drawn = m.draw(["ab", "a longer caption"], do_sample=True, temperature=2.0, generator=g)
    assert drawn.shape == (2, Q) and drawn.dtype == torch.long
    assert bool(((drawn >= 0) & (drawn < K)).all())
    texts = m.read(drawn, max_new_tokens=5)
    assert len(texts) == 2 and all("<img" not in t for t in texts)


def test_continuous_features_replace_the_code_tokens():
    m = lm(feature_dim=6)
    seqs = [m.sequence([0] * Q, "ab", True), m.sequence([0] * Q, "cd", True)]
    f = torch.randn(2, Q, 6)
    a, b = m.loss(seqs, features=f), m.loss(seqs, features=f * 3)
    assert not torch.isclose(a, b)
    # placeholder codes are not targets: another placeholder code changes nothing but the (replaced) inputs
    other = [m.sequence([5] * Q, "ab", True), m.sequence([5] * Q, "cd", True)]
    torch.testing.assert_close(m.loss(other, features=f), a)
    fit_seed_lm(m, None, ["ab", "cd"], SEEDLMSettings(steps=2, batch_size=2, progress=False), features=f)
    assert len(m.read_features(f, max_new_tokens=3)) == 2


def test_clear_errors():
    m = lm()
    with pytest.raises(DataError, match="4 codes"):
        m.code_ids([1, 2, 3])
    with pytest.raises(DataError, match=r"\[0, 16\)"):
        m.code_ids([1, 2, 3, 16])
    with pytest.raises(DataError, match="empty caption"):
        m.sequence([1, 2, 3, 4], "  ", True)
    with pytest.raises(DataError, match="non-empty captions"):
        m.draw([""])
    with pytest.raises(ConfigError, match="feature_dim"):
        m.loss([m.sequence([0] * Q, "ab", True)], features=torch.randn(1, Q, 6))
    with pytest.raises(DataError, match="do not pair up"):
        fit_seed_lm(m, torch.zeros(3, Q, dtype=torch.long), ["a", "b"], SEEDLMSettings(steps=1, progress=False))
    with pytest.raises(ConfigError, match="already has"):
        SEEDLanguageModel(K, Q, model=m.causal_lm(), tokenizer=m.tokenizer, lora=False)

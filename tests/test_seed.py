"""SEED image tokenizer (frugalvision.language.seed): causal Q-Former, quantiser, de-tokeniser, losses, image text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from frugalvision.errors import ConfigError, DataError
from frugalvision.language.minigpt4 import QFormer
from frugalvision.language.seed import (
    CausalQFormer,
    SEEDConfig,
    SEEDTokenizer,
    VectorQuantizer,
    codes_to_text,
    image_token_strings,
    text_to_codes,
    visual_tokens,
)
from frugalvision.weights import read_safetensors, write_weights


def tiny(**kw) -> SEEDTokenizer:
    return SEEDTokenizer(SEEDConfig.tiny(**kw))


def visual(b: int = 3, n: int = 10, c: int = 16) -> torch.Tensor:
    return torch.randn(b, n, c)


# ------------------------------------------------------------------------------------------ causal Q-Former
def test_causal_qformer_query_sees_only_earlier_queries():
    q = CausalQFormer(vision_dim=16, width=32, num_layers=2, num_heads=4, num_queries=6).eval()
    full = QFormer(16, 32, 2, 4, 6).eval()
    full.load_state_dict(q.state_dict())  # the same weights without the mask
    v = visual()
    base, full_base = q(v), full(v)
    j = 3
    with torch.no_grad():
        q.query_tokens[0, j] += torch.randn(32)
        full.query_tokens[0, j] = q.query_tokens[0, j]
    moved = q(v)
    assert torch.allclose(moved[:, :j], base[:, :j], atol=1e-6)  # earlier queries untouched
    assert not torch.allclose(moved[:, j:], base[:, j:], atol=1e-3)  # this and later ones change
    # without the mask the perturbation leaks backwards: the check above can fail
    assert (full(v)[:, :j] - full_base[:, :j]).abs().max() > 1e-3


def test_causal_qformer_state_dict_matches_blip2_qformer():
    a, b = CausalQFormer(16, 32, 2, 4, 6), QFormer(16, 32, 2, 4, 6)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


# -------------------------------------------------------------------------------------------------- quantiser
@pytest.mark.parametrize("l2", [False, True])
def test_quantizer_picks_nearest_code(l2):
    vq = VectorQuantizer(32, 6, l2_normalize=l2)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(4, 7, 6)
    out = vq(z)
    flat, codes = z.reshape(-1, 6), vq.embedding.weight
    if l2:
        expect = (F.normalize(flat, dim=-1) @ F.normalize(codes, dim=-1).t()).argmax(1)
        chosen = F.normalize(codes, dim=-1)[out.indices]
    else:
        expect = torch.cdist(flat, codes).argmin(1)
        chosen = codes[out.indices]
    assert out.indices.shape == (4, 7)
    assert torch.equal(out.indices.reshape(-1), expect)
    assert torch.allclose(out.quantized, chosen, atol=1e-6)  # forward value: the code itself


def test_straight_through_gradient_reaches_encoder():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(2, 5, 4)
    (vq(z).quantized * w).sum().backward()
    assert torch.allclose(z.grad, w)  # identity backward through the quantiser
    # through the whole tokenizer: a loss on the de-tokeniser only trains the Q-Former and the down-projection
    m = tiny()
    out = m(visual())
    (1 - F.cosine_similarity(out.reconstructed, torch.randn_like(out.reconstructed), dim=-1)).mean().backward()
    for p in (m.qformer.query_tokens, m.encode_task_layer[0].weight, m.encode_task_layer[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_matches_hand_computation(legacy):
    beta = 0.25
    vq = VectorQuantizer(8, 3, beta=beta, legacy_beta=legacy)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(5, 3, requires_grad=True)
    out = vq(z)
    e = vq.embedding.weight[out.indices].detach()
    sq = ((z.detach() - e) ** 2).mean()
    assert torch.allclose(out.commitment, sq) and torch.allclose(out.codebook, sq)
    assert torch.allclose(out.loss, sq * (1 + beta))
    out.loss.backward()
    # d/dz: only the commitment term; d/de: only the codebook term; beta sits on one of them
    wz, we = (1.0, beta) if legacy else (beta, 1.0)
    assert torch.allclose(z.grad, wz * 2 * (z.detach() - e) / z.numel(), atol=1e-6)
    grad_e = torch.zeros_like(vq.embedding.weight).index_add_(0, out.indices, we * 2 * (e - z.detach()) / z.numel())
    assert torch.allclose(vq.embedding.weight.grad, grad_e, atol=1e-6)


def test_codebook_usage_and_perplexity():
    vq = VectorQuantizer(8, 2)
    u = vq.codebook_usage(torch.tensor([0, 1, 2, 3] * 5))
    assert (u.used, u.fraction) == (4, 0.5) and u.perplexity == pytest.approx(4.0)
    assert vq.codebook_usage(torch.tensor([5, 5, 5])).perplexity == pytest.approx(1.0)
    with pytest.raises(DataError, match="code indices"):
        vq.codebook_usage(torch.tensor([8]))


def collapsed(vq: VectorQuantizer) -> VectorQuantizer:
    """All codes but code 0 far from the data: every input picks code 0."""
    with torch.no_grad():
        vq.embedding.weight.normal_().add_(50.0)
        vq.embedding.weight[0] = 0.0
    return vq.train()


def test_dead_code_restart_revives_unused_codes():
    vq = collapsed(VectorQuantizer(16, 4, dead_after=3))
    data = torch.randn(64, 4) * 3
    for _ in range(3):
        idx = vq(data).indices
    before = vq.codebook_usage(idx)
    assert (before.used, before.dead) == (1, 15)
    revived = vq.restart_dead_codes()  # from the recent encoder outputs it kept
    assert revived == before.dead
    assert vq.codebook_usage(idx).dead == 0
    after = vq.codebook_usage(vq(data, track=False).indices)
    assert after.used > before.used + 8
    # the restarted codes are encoder outputs
    d = (vq.embedding.weight.detach()[:, None] - data[None]).norm(dim=-1).min(1).values
    assert (d < 1e-5).sum() >= revived


def test_automatic_restart_every():
    vq = collapsed(VectorQuantizer(16, 4, dead_after=2, restart_every=2))
    data = torch.randn(64, 4) * 3
    vq(data)
    assert vq.codebook_usage(vq(data, track=False).indices).used == 1
    vq(data)  # second training forward: restart
    assert vq.codebook_usage(vq(data, track=False).indices).used > 8


def test_restart_without_samples_is_a_clear_error():
    vq = VectorQuantizer(4, 2, dead_after=1)
    vq.steps_unused += 1
    with pytest.raises(DataError, match="no encoder outputs"):
        vq.restart_dead_codes()


@pytest.mark.parametrize("l2", [False, True])
def test_kmeans_init_puts_codes_on_clusters(l2):
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])
    data = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 3))[torch.randperm(200)]
    vq = VectorQuantizer(4, 3, l2_normalize=l2)
    vq.kmeans_init(data)
    target = F.normalize(centres, dim=-1) if l2 else centres
    d = torch.cdist(target, vq.codes().detach())
    assert d.min(1).values.max() < 0.1  # every cluster has a code on it ...
    assert len(set(d.argmin(1).tolist())) == 4  # ... a different one
    assert vq.codebook_usage(vq(data, track=False).indices).perplexity == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(DataError, match="needs >= 4 samples"):
        VectorQuantizer(4, 3).kmeans_init(data[:3])


def test_model_kmeans_init_uses_every_code():
    m = tiny(codebook_size=16)
    usage = m.kmeans_init(visual(4))  # 4 x 8 queries = 32 vectors >= 16 codes
    assert usage.used >= 14


# ------------------------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("kw", [{}, {"image_head": "query"}, {"l2_normalize": True}])
def test_encode_decode_shapes_and_consistency(kw):
    m = tiny(**kw).eval()
    v = visual()
    codes = m.encode(v)
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    emb = m.decode(codes)
    assert emb.shape == (3, 24)
    out = m(v)  # the straight-through pass gives what decoding its codes gives
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.image_embedding, emb, atol=1e-5)
    assert torch.allclose(out.reconstructed, m.decode_features(codes), atol=1e-5)
    assert torch.allclose(m.decode(codes.tolist()), emb)


def test_visual_tokens_from_feature_map():
    fmap = torch.randn(2, 16, 3, 4)
    tokens = visual_tokens(fmap)
    assert tokens.shape == (2, 12, 16) and torch.equal(tokens[0, 5], fmap[0, :, 1, 1])
    assert tiny().encode(tokens).shape == (2, 8)
    with pytest.raises(DataError):
        visual_tokens(torch.zeros(3, 4))


def test_codes_text_round_trip():
    codes = torch.randint(0, 8192, (32,))
    text = codes_to_text(codes)
    assert text.startswith("<img><img_") and text.endswith("></img>") and text.count("<img_") == 32
    assert codes_to_text([0, 12, 8191]) == "<img><img_00000><img_00012><img_08191></img>"
    assert torch.equal(text_to_codes(text, 32, 8192), codes)
    spaced = "Here: " + text.replace("><", "> <") + " done <img><img_00001></img>"
    assert torch.equal(text_to_codes(spaced, 32, 8192), codes)  # first span, whitespace allowed


def test_image_token_strings():
    toks = image_token_strings(8192)
    assert len(toks) == len(set(toks)) == 8194
    assert toks[0] == "<img_00000>" and toks[8191] == "<img_08191>" and toks[-2:] == ["<img>", "</img>"]
    with pytest.raises(ConfigError):
        image_token_strings(200_000)


@pytest.mark.parametrize(("text", "match"), [
    ("no image here", "no <img>"),
    ("<img><img_00001><img_00002></img>", "expected 3 image tokens, got 2"),
    ("<img><img_00001><img_00002><img_00070></img>", "< codebook_size=64"),
    ("<img><img_00001><img_0002><img_00003></img>", "malformed"),
    ("<img><img_00001>cat<img_00002><img_00003></img>", "malformed"),
])
def test_text_to_codes_errors(text, match):
    with pytest.raises(DataError, match=match):
        text_to_codes(text, 3, 64)


def test_codes_errors():
    m = tiny().eval()
    good = m.encode(visual(2))
    with pytest.raises(DataError, match=r"in \[0, 64\)"):
        m.decode(good.clone().fill_(64))
    with pytest.raises(DataError, match=r"in \[0, 64\)"):
        m.decode(good.clone().fill_(-1))
    with pytest.raises(DataError, match=r"shape \(B, 8\)"):
        m.decode(good[:, :7])
    with pytest.raises(DataError, match=r"shape \(B, 8\)"):
        m.decode(good[0])
    with pytest.raises(DataError, match="integers"):
        m.decode(good.float())
    with pytest.raises(DataError, match="float tensor"):
        m.encode(torch.randn(2, 16, 3, 4))
    with pytest.raises(DataError, match="vision_dim=16"):
        m.encode(torch.randn(2, 5, 15))
    with pytest.raises(DataError, match="flat sequence"):
        codes_to_text(good)
    with pytest.raises(DataError, match="in \\[0, 64\\)"):
        codes_to_text([1, 64], codebook_size=64)
    with pytest.raises(ValueError):  # DataError is a ValueError
        codes_to_text([1.5])


def test_config_errors():
    with pytest.raises(ConfigError, match="multiple"):
        SEEDConfig.tiny(width=30)
    with pytest.raises(ConfigError, match="image_head"):
        SEEDConfig.tiny(image_head="mean")
    with pytest.raises(ConfigError, match="codebook_size"):
        SEEDConfig.tiny(codebook_size=0)
    with pytest.raises(ConfigError, match="stage 1 or 2"):
        tiny().set_stage(3)
    assert SEEDConfig().codebook_size == 8192 and SEEDConfig().num_queries == 32 and SEEDConfig().beta == 0.25


# ------------------------------------------------------------------------------------------------------ losses
def test_stage1_loss_matches_hand_computation():
    m = tiny()
    with torch.no_grad():
        m.logit_scale.fill_(math.log(200.0))  # clamped at 100, as CLIP
    v, t = visual(4), torch.randn(4, 12)
    out = m.stage1_loss(v, t)
    img = F.normalize(m.vision_proj(m.query_features(v)[:, -1]), dim=-1)  # the LAST query
    txt = F.normalize(m.text_proj(t), dim=-1)
    logits = 100.0 * img @ txt.t()

    def smoothed_ce(lg):
        logp = lg.log_softmax(1)
        return (0.9 * -logp.diagonal() + 0.1 * -logp.mean(1)).mean()

    assert torch.allclose(out["image_to_text"], smoothed_ce(logits), atol=1e-5)
    assert torch.allclose(out["text_to_image"], smoothed_ce(logits.t()), atol=1e-5)
    assert torch.allclose(out["loss"], (smoothed_ce(logits) + smoothed_ce(logits.t())) / 2, atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(100.0)
    with pytest.raises(DataError, match="shape"):
        m.stage1_loss(v, torch.randn(3, 12))
    with pytest.raises(DataError, match=">= 2"):
        m.stage1_loss(v[:1], t[:1])


def test_stage2_loss_terms():
    m = tiny()
    v, target = visual(), torch.randn(3, 24)
    out = m.stage2_loss(v, target)
    fwd = m(v)
    recon = (1 - F.cosine_similarity(fwd.reconstructed, fwd.query_features, dim=-1)).mean()
    image = ((fwd.image_embedding - target) ** 2).mean()
    assert torch.allclose(out["recon"], recon, atol=1e-6) and torch.allclose(out["image"], image, atol=1e-6)
    assert torch.allclose(out["loss"], 5 * out["vq"] + 2 * recon + 0.5 * image, atol=1e-5)
    assert set(out) >= {"loss", "vq", "commitment", "codebook", "recon", "image", "perplexity"}
    with pytest.raises(DataError, match="shape"):
        m.stage2_loss(v, torch.randn(3, 23))


def _train(m, loss_of, steps: int = 15) -> float:
    """Adam steps on the trainable parameters; returns the first loss."""
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(steps):
        loss = loss_of()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first


def test_stage1_training_reduces_loss_and_freezes_the_rest():
    m = tiny().set_stage(1)
    v, t = visual(6), torch.randn(6, 12)
    first = _train(m, lambda: m.stage1_loss(v, t)["loss"])
    assert m.stage1_loss(v, t)["loss"].item() < first - 0.1
    assert m.quantize.embedding.weight.grad is None and m.blocks_image[0].attn.qkv.weight.grad is None
    assert m.qformer.query_tokens.grad is not None


def test_stage2_training_reduces_loss_and_freezes_the_qformer():
    m = tiny().set_stage(2)
    v, target = visual(8), torch.randn(8, 24)
    m.kmeans_init(v)  # 8 images x 8 queries = 64 vectors, one per code
    frozen = m.qformer.query_tokens.detach().clone()
    first = _train(m, lambda: m.stage2_loss(v, target)["loss"])
    assert m.stage2_loss(v, target)["loss"].item() < 0.8 * first
    assert torch.equal(m.qformer.query_tokens, frozen) and m.qformer.query_tokens.grad is None
    assert m.vision_proj.weight.grad is None


# ---------------------------------------------------------------------------------------------- persistence
def test_safetensors_round_trip(tmp_path):
    m = tiny(image_head="query").train()
    m(visual())  # some tracked usage state
    with torch.no_grad():
        m.pos_embed.normal_()
    path = write_weights(tmp_path / "seed.safetensors", m)
    tensors, _ = read_safetensors(path)
    other = tiny(image_head="query")
    other.load_state_dict(tensors, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert int(other.quantize.step) == 1
    m.eval(), other.eval()
    v = visual()
    assert torch.equal(m.encode(v), other.encode(v))
    assert torch.equal(m.decode(m.encode(v)), other.decode(other.encode(v)))

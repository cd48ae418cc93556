"""Anomaly metrics against scikit-learn and a straightforward loop implementation of MVTec AD's AUPRO."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from frugalvision.inspect.anomaly import AnomalyMetrics, aupro, f1_max, image_auroc, pixel_auroc


def _regions_naive(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by flood fill (independent of scipy)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                stack, comp = [(y, x)], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    comp.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
                regions.append(comp)
    return regions


def _aupro_naive(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Every distinct score as a threshold; PRO = mean per-region overlap, FPR over all good pixels."""
    regions = [(i, r) for i in range(len(masks)) for r in _regions_naive(masks[i])]
    ok = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        fpr = above[ok].sum() / ok.sum()
        pro = np.mean([np.mean([above[i, y, x] for y, x in r]) for i, r in regions])
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate the last segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def _random_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if rng.random() < 0.3:
            continue  # some defect-free images
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, y : y + h, x : x + w] = 1
    masks[0, 1:3, 1:3] = 1  # at least one region
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantize", [False, True])
def test_aupro_matches_naive_reference(seed: int, quantize: bool) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 5, 10)
    maps = rng.random(masks.shape) + 0.6 * masks  # informative but imperfect scores
    if quantize:  # many ties between defect and good pixels
        maps = np.round(maps * 6) / 6
    ours = aupro(torch.from_numpy(maps), torch.from_numpy(masks))
    ref = _aupro_naive(maps, masks)
    assert ours == pytest.approx(ref, abs=1e-9)
    assert 0.0 < ours < 1.0
    # (N, 1, H, W) layout and another FPR limit
    assert aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None], 0.1) == pytest.approx(
        _aupro_naive(maps, masks, 0.1), abs=1e-9)


def test_aupro_extremes() -> None:
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[1, 5:7, 0:3] = 1
    assert aupro(torch.from_numpy(masks * 1.0), torch.from_numpy(masks)) == pytest.approx(1.0)
    assert aupro(torch.from_numpy(1.0 - masks), torch.from_numpy(masks)) == pytest.approx(0.0)
    assert np.isnan(aupro(torch.rand(1, 4, 4), torch.zeros(1, 4, 4)))
    with pytest.raises(ValueError, match="same size"):
        aupro(torch.rand(2, 4, 4), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="NaN"):
        aupro(torch.full((1, 4, 4), float("nan")), torch.ones(1, 4, 4))


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # ties
    assert image_auroc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    maps, masks = rng.random((3, 1, 16, 16)), rng.random((3, 1, 16, 16)) > 0.8
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert np.isnan(image_auroc(torch.rand(4), torch.zeros(4)))
    with pytest.raises(ValueError, match="one label per score"):
        image_auroc(torch.rand(4), torch.zeros(5))


def test_f1_max_matches_sklearn_curve() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.5 * y, 2)
    p, r, t = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    best = int(np.argmax(f1[:-1]))
    got = f1_max(torch.from_numpy(s), torch.from_numpy(y))
    assert got.f1 == pytest.approx(f1[best], abs=1e-12)
    assert got.threshold == pytest.approx(t[best])
    pred = s >= got.threshold
    assert 2 * (pred & (y == 1)).sum() / (pred.sum() + y.sum()) == pytest.approx(got.f1)


def test_anomaly_metrics_accumulates_batches() -> None:
    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 6, 12)
    maps = torch.from_numpy(rng.random(masks.shape) + 0.8 * masks).float()[:, None]
    labels = torch.from_numpy(masks.reshape(6, -1).max(1))
    scores = maps.flatten(1).amax(1)
    m = AnomalyMetrics()
    for sl in (slice(0, 4), slice(4, 6)):
        m.update(scores[sl], maps[sl], labels[sl], torch.from_numpy(masks[sl]))
    r = m.compute()
    assert r["image_AUROC"] == pytest.approx(100 * roc_auc_score(labels.numpy(), scores.numpy()))
    assert r["pixel_AUROC"] == pytest.approx(100 * roc_auc_score(masks.ravel(), maps.numpy().ravel()))
    assert r["AUPRO"] == pytest.approx(100 * _aupro_naive(maps[:, 0].double().numpy(), masks), abs=1e-6)
    assert set(r) >= {"image_F1_max", "image_threshold", "pixel_F1_max", "pixel_threshold"}
    with pytest.raises(ValueError, match="do not match"):
        m.update(scores[:1], maps[:1], labels[:1], torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="update"):
        AnomalyMetrics().compute()

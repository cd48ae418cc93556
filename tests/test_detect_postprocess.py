"""Detection post-processing: NMS definition, tile merging, COCO metrics and results, the ONNX detector graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from frugalvision.detect.coco_eval import coco_metrics, detections_to_coco, write_coco_results
from frugalvision.detect.onnx_export import OUTPUT_NAMES, OrtDetector, export_detector_onnx
from frugalvision.detect.postprocess import merge_tile_detections, postprocess, predict_tiled
from frugalvision.errors import ConfigError, DataError
from frugalvision.export.onnx import ExportError


class ToyDetector(nn.Module):
    """A tiny conv net on a stride-8 anchor grid: (B, 3, H, W) -> (B, A, 4 + C), xyxy pixels then sigmoid scores."""

    def __init__(self, num_classes: int = 3, score_bias: float = -0.5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4 + num_classes, 3, stride=8, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(6.0)  # spread the scores over the thresholds
            self.conv.bias[4:] = score_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        h, w = f.shape[2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        cx, cy = ((xs + 0.5) * 8).reshape(1, -1), ((ys + 0.5) * 8).reshape(1, -1)
        dist = nn.functional.softplus(f[:, :4]).flatten(2) * 12  # (B, 4, A): left, top, right, bottom
        boxes = torch.stack((cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]), -1)
        return torch.cat((boxes, f[:, 4:].flatten(2).transpose(1, 2).sigmoid()), -1)


class FixedPredictions(nn.Module):
    """The same predictions (A, 4 + C) for every image (edge cases the graph must reproduce exactly)."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pred", pred)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred.expand(x.shape[0], -1, -1) + 0 * x.mean()


# ---------------------------------------------------------------- postprocess against a brute-force reference


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(pred: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = True,
              agnostic: bool = False) -> list[list[tuple[int, int]]]:
    """Per image the (class, anchor) of each detection, in output order, by plain Python loops."""
    out = []
    for p in pred.tolist():
        num_anchors = len(p)
        cands = []  # (score, class, anchor)
        for a, row in enumerate(p):
            scores = row[4:]
            classes = range(len(scores)) if multi_label and not agnostic else [scores.index(max(scores))]
            cands += [(scores[c], c, a) for c in classes if scores[c] > conf]
        kept = []
        for group in sorted({0 if agnostic else c for _, c, _ in cands}):
            members = sorted((x for x in cands if agnostic or x[1] == group), key=lambda x: (-x[0], x[1], x[2]))
            chosen: list[tuple[float, int, int]] = []
            for s, c, a in members:
                if all(_iou(p[a][:4], p[ka][:4]) <= iou for _, _, ka in chosen):
                    chosen.append((s, c, a))
            kept += chosen
        kept.sort(key=lambda x: (-x[0], x[1] * num_anchors + x[2]))
        out.append([(c, a) for _, c, a in kept[:max_det]])
    return out


def random_predictions(seed: int, batch: int = 3, anchors: int = 120, classes: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, anchors, 2, generator=g) * 50
    wh = torch.rand(batch, anchors, 2, generator=g) * 30 + 10
    return torch.cat((xy, xy + wh, torch.rand(batch, anchors, classes, generator=g)), -1)


@pytest.mark.parametrize(("multi_label", "agnostic"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(("seed", "max_det"), [(0, 300), (1, 20)])
def test_postprocess_matches_brute_force_nms(seed, max_det, multi_label, agnostic):
    pred = random_predictions(seed)
    conf, iou = 0.6, 0.45
    dets = postprocess(pred, conf, iou, max_det, class_agnostic=agnostic, multi_label=multi_label)
    ref = reference(pred, conf, iou, max_det, multi_label, agnostic)
    assert [len(r) for r in ref] == [len(d["labels"]) for d in dets]
    candidates = (pred[..., 4:] > conf).sum((1, 2))
    for r, n in zip(ref, candidates.tolist(), strict=True):  # NMS removes many candidates; max_det caps the rest
        assert len(r) == 20 if max_det == 20 else 40 < len(r) < 0.8 * n
    for b, (d, r) in enumerate(zip(dets, ref, strict=True)):
        assert list(zip(d["labels"].tolist(), d["anchors"].tolist(), strict=True)) == r
        assert d["labels"].dtype == d["anchors"].dtype == torch.int64
        torch.testing.assert_close(d["boxes"], pred[b, d["anchors"], :4])
        torch.testing.assert_close(d["scores"], pred[b, d["anchors"], 4 + d["labels"]])
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])


def test_postprocess_threshold_edges_and_errors():
    # score == conf_thres is not a candidate; IoU == iou_thres does not suppress (both strict)
    pred = torch.tensor([[[0.0, 0, 2, 1, 0.9], [0, 0, 1, 1, 0.8], [5, 5, 6, 6, 0.25]]])
    det = postprocess(pred, conf_thres=0.25, iou_thres=0.5)[0]
    assert det["anchors"].tolist() == [0, 1]
    assert postprocess(pred, conf_thres=0.25, iou_thres=0.49)[0]["anchors"].tolist() == [0]
    empty = postprocess(pred, conf_thres=0.95)[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64
    with pytest.raises(DataError, match="4 \\+ classes"):
        postprocess(torch.zeros(2, 5, 4))
    with pytest.raises(ConfigError, match="iou_thres"):
        postprocess(pred, iou_thres=1.5)


# ---------------------------------------------------------------- tiles


def _bright_boxes(tile: np.ndarray) -> dict[str, np.ndarray]:
    """A stand-in detector: one box per colour channel (its class) around that channel's bright pixels."""
    boxes, scores, labels = [], [], []
    for c in range(3):
        ys, xs = np.nonzero(tile[..., c] > 128)
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            scores.append(0.5 + 0.1 * c)
            labels.append(c)
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores),
            "labels": np.asarray(labels)}


def test_tile_merge_removes_duplicates_and_keeps_distinct_objects():
    img = np.zeros((100, 150, 3), np.uint8)
    img[30:50, 60:90, 0] = 255  # class 0, in the overlap of both tiles: seen twice
    img[32:52, 62:88, 1] = 255  # class 1 on the same spot: a distinct object (class-wise NMS)
    windows = [(0, 0, 100, 100), (50, 0, 150, 100)]
    per_tile = [_bright_boxes(img[y0:y1, x0:x1]) for x0, y0, x1, y1 in windows]
    assert sum(len(t["boxes"]) for t in per_tile) == 4
    merged = merge_tile_detections(per_tile, windows)
    got = sorted(zip(merged["labels"].tolist(), merged["boxes"].tolist(), strict=True))
    assert got == [(0, [60.0, 30.0, 90.0, 50.0]), (1, [62.0, 32.0, 88.0, 52.0])]
    agnostic = merge_tile_detections(per_tile, windows, class_agnostic=True)
    assert agnostic["labels"].tolist() == [1]  # the two overlapping objects are one to an agnostic NMS

    img2 = np.zeros((100, 150, 3), np.uint8)
    img2[10:30, 5:25, 2] = 255  # left tile only
    img2[60:80, 125:145, 2] = 255  # right tile only, same class
    det = predict_tiled(_bright_boxes, img2, tile=100, overlap=50, windows=windows)
    assert sorted(det["boxes"].tolist()) == [[5.0, 10.0, 25.0, 30.0], [125.0, 60.0, 145.0, 80.0]]
    assert sorted(det["tiles"].tolist()) == [0, 1]
    default = predict_tiled(_bright_boxes, img2, tile=100, overlap=50)  # windows from tile_windows
    assert sorted(default["boxes"].tolist()) == sorted(det["boxes"].tolist())
    fraction = predict_tiled(_bright_boxes, img2, tile=100, overlap=0.5)  # overlap as a fraction of the tile
    assert sorted(fraction["boxes"].tolist()) == sorted(det["boxes"].tolist())
    with pytest.raises(DataError, match="uint8"):
        predict_tiled(_bright_boxes, img2.astype(np.float32), tile=100, overlap=50)
    with pytest.raises(DataError, match="window"):
        merge_tile_detections(per_tile, windows[:1])


# ---------------------------------------------------------------- COCO


def _coco_gt() -> dict:
    anns = [(1, 1, [10, 10, 40, 30]), (1, 2, [60, 50, 30, 40]), (2, 1, [5, 5, 20, 20]), (2, 2, [40, 40, 50, 50])]
    return {"images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for k, (i, c, b) in enumerate(anns)]}


def test_coco_metrics_perfect_shifted_empty(tmp_path):
    gt = _coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    m = coco_metrics(gt, perfect)
    assert m["AP"] == pytest.approx(100) and m["AP50"] == pytest.approx(100) and m["AR100"] == pytest.approx(100)
    assert "Average Precision" in m["summary"] and m["num_predictions"] == 4
    shifted = [{**p, "bbox": [p["bbox"][0] + 6, p["bbox"][1] + 4, *p["bbox"][2:]]} for p in perfect]
    s = coco_metrics(gt, shifted)
    assert 0 < s["AP"] < 90 and s["AP75"] < s["AP50"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    e = coco_metrics(path, [])
    assert e["AP"] == 0 and e["AP50"] == 0 and e["AR100"] == 0 and e["num_predictions"] == 0
    with pytest.raises(DataError, match="category"):
        coco_metrics(gt, [{**p, "category_id": 7} for p in perfect])
    assert perfect[0] == {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "score": 0.9}  # not modified


def test_coco_segm_from_detections_and_results_file(tmp_path):
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 40:60, 5:25] = True
    det = {"boxes": torch.tensor([[10.0, 10, 40, 30], [5, 40, 25, 60]]), "scores": torch.tensor([0.9, 0.8]),
           "labels": torch.tensor([0, 1])}
    res = detections_to_coco(3, det, category_ids=[5, 9], masks=masks)
    assert [r["category_id"] for r in res] == [5, 9] and res[0]["bbox"] == [10.0, 10.0, 30.0, 20.0]
    assert isinstance(res[0]["segmentation"]["counts"], str)
    gt = {"images": [{"id": 3, "width": 64, "height": 64}], "categories": [{"id": 5}, {"id": 9}],
          "annotations": [{"image_id": 3, "category_id": c, "bbox": r["bbox"], "segmentation": r["segmentation"]}
                          for c, r in zip((5, 9), res, strict=True)]}
    assert coco_metrics(gt, res, iou_type="segm")["AP"] == pytest.approx(100)
    eroded = masks.copy()
    eroded[:, :, ::2] = False  # half of each mask's pixels: mask IoU 0.5
    worse = detections_to_coco(3, det, category_ids=[5, 9], masks=eroded)
    segm = coco_metrics(gt, worse, iou_type="segm")
    assert segm["AP"] < 20 and coco_metrics(gt, worse)["AP"] == pytest.approx(100)  # boxes unchanged

    out = tmp_path / "results.json"
    write_coco_results(res, out)
    assert json.loads(out.read_text()) == res
    with pytest.raises(ConfigError, match=r"results\.json already exists; pass overwrite=true"):
        write_coco_results([], out)
    assert json.loads(out.read_text()) == res
    write_coco_results([], out, overwrite=True)
    assert json.loads(out.read_text()) == []


# ---------------------------------------------------------------- ONNX


def _keyed(det: dict) -> dict[tuple[int, int], tuple[list[float], float]]:
    return {(int(c), int(a)): (b, float(s)) for c, a, b, s in
            zip(det["labels"], det["anchors"], det["boxes"].tolist(), det["scores"], strict=True)}


def test_onnx_detector_parity_with_postprocess(tmp_path):
    model = ToyDetector()
    path = tmp_path / "toy.onnx"
    res = export_detector_onnx(model, path, img_size=(64, 64), conf_thres=0.3, iou_thres=0.5, max_det=40)
    assert res.checked_batch_sizes == (1, 3, 2) and res.checked_image_sizes[-1] == (96, 128)
    assert res.num_detections > 50 and res.threshold_flips == 0
    assert res.max_box_err <= 1e-3 and res.max_score_err <= 1e-4
    det = OrtDetector(path, threads=1)
    assert det.settings == {"conf_thres": 0.3, "iou_thres": 0.5, "max_det": 40, "multi_label": True,
                            "class_agnostic": False}
    assert tuple(det.runner.output_names) == OUTPUT_NAMES
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 3, 64, 64), (3, 3, 64, 64), (2, 3, 48, 80)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            pred = model(x)
        ref, got = postprocess(pred, 0.3, 0.5, 40), det(x.numpy())
        nms_mattered = False
        for r, o, p in zip(ref, got, pred, strict=True):
            kr, ko = _keyed(r), _keyed(o)
            assert kr.keys() == ko.keys() and len(kr) > 0
            nms_mattered |= len(kr) < int((p[:, 4:] > 0.3).sum())
            for k, (box, score) in kr.items():
                assert np.abs(np.subtract(box, ko[k][0])).max() <= 1e-3 and abs(score - ko[k][1]) <= 1e-4
            assert torch.all(o["scores"][:-1] >= o["scores"][1:])
        assert nms_mattered


def test_onnx_detector_no_detections(tmp_path):
    path = tmp_path / "silent.onnx"
    export_detector_onnx(ToyDetector(score_bias=-30.0), path, img_size=(32, 32), max_det=10)
    got = OrtDetector(path, threads=1)(np.random.default_rng(0).random((2, 3, 40, 48), dtype=np.float32))
    assert len(got) == 2
    for d in got:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].dtype == torch.int64
    assert postprocess(ToyDetector(score_bias=-30.0)(torch.rand(1, 3, 32, 32)))[0]["boxes"].shape == (0, 4)
    res = export_detector_onnx(ToyDetector(), tmp_path / "batch.onnx", img_size=(32, 32), dynamic="batch")
    assert res.checked_batch_sizes == (1, 3) and set(res.checked_image_sizes) == {(32, 32)}


@pytest.mark.parametrize(("multi_label", "agnostic"), [(True, False), (False, False), (True, True)])
def test_onnx_detector_edge_cases_exact(tmp_path, multi_label, agnostic):
    # exact threshold scores, an IoU exactly at iou_thres, equal scores, more candidates than max_det
    rows = [[0, 0, 2, 1, 0.9, 0.5], [0, 0, 1, 1, 0.8, 0.9], [8, 8, 9, 9, 0.25, 0.3], [5, 5, 6, 6, 0.7, 0.7],
            [5, 5, 6, 6, 0.7, 0.2], [20, 20, 30, 30, 0.6, 0.6], [21, 20, 31, 30, 0.6, 0.6]]
    rows += [[40 + 3 * i, 0, 42 + 3 * i, 2, 0.3 + 0.01 * i, 0.0] for i in range(8)]
    pred = torch.tensor(rows)
    path = tmp_path / "fixed.onnx"
    kwargs = {"conf_thres": 0.25, "iou_thres": 0.5, "max_det": 9}
    res = export_detector_onnx(FixedPredictions(pred), path, img_size=(16, 16), multi_label=multi_label,
                               class_agnostic=agnostic, **kwargs)
    assert res.threshold_flips == 0
    ref = postprocess(pred[None], multi_label=multi_label, class_agnostic=agnostic, **kwargs)[0]
    got = OrtDetector(path, threads=1)(np.zeros((1, 3, 16, 16), np.float32))[0]
    assert len(ref["labels"]) == 9
    assert got["labels"].tolist() == ref["labels"].tolist() and got["anchors"].tolist() == ref["anchors"].tolist()
    torch.testing.assert_close(got["boxes"], ref["boxes"], atol=0, rtol=0)
    torch.testing.assert_close(got["scores"], ref["scores"], atol=0, rtol=0)
    expected = reference(pred[None], 0.25, 0.5, 9, multi_label, agnostic)[0]
    assert list(zip(ref["labels"].tolist(), ref["anchors"].tolist(), strict=True)) == expected


class TraceShifted(ToyDetector):
    """Scores shifted by ``delta`` in the exported graph only (a stand-in for float differences of a runtime)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = super().forward(x)
        if torch.jit.is_tracing():
            pred = torch.cat((pred[..., :4], pred[..., 4:] + self.delta), -1)
        return pred


def test_onnx_check_accepts_rounding_flips_and_rejects_real_differences(tmp_path, monkeypatch):
    import frugalvision.detect.onnx_export as onnx_export

    model = TraceShifted(1e-6)
    with torch.no_grad():  # put one score of each checked batch exactly on the threshold in PyTorch
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        conf = float(model(x)[0, 0, 4])
    res = export_detector_onnx(model, tmp_path / "a.onnx", img_size=(64, 64), conf_thres=conf, iou_thres=0.99,
                               dynamic=False, max_det=300)
    assert res.threshold_flips == 1 and res.max_raw_score_err < 1e-4
    with pytest.raises(ExportError, match="predictions differ from PyTorch"):
        export_detector_onnx(TraceShifted(0.01), tmp_path / "b.onnx", img_size=(64, 64))
    assert not (tmp_path / "b.onnx").exists()

    append = onnx_export._append_nms
    monkeypatch.setattr(onnx_export, "_append_nms", lambda proto, conf, iou, *a: append(proto, conf, iou - 0.2, *a))
    with pytest.raises(ExportError, match="does not follow postprocess"):
        export_detector_onnx(ToyDetector(), tmp_path / "c.onnx", img_size=(64, 64), iou_thres=0.5)
    assert not (tmp_path / "c.onnx").exists()

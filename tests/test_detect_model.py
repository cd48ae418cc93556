"""YOLOv6 detector: shapes, official keys, fusion, losses, assigners; parity with the official code (slow)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import frugalvision as fv
from frugalvision.detect.assigner import ATSSAssigner, TaskAlignedAssigner
from frugalvision.detect.loss import DetectionLoss, bbox_iou_loss, dfl_loss
from frugalvision.detect.yolov6 import VARIANTS, create_detector, official_to_ours
from frugalvision.errors import ConfigError
from frugalvision.weights import load_weights

FIXTURE = Path(__file__).parent / "fixtures" / "yolov6_official_keys.json.gz"


def _official_keys() -> dict[str, dict[str, list[int]]]:
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


def test_output_is_boxes_then_scores_on_every_level():
    m = create_detector("yolov6_test", num_classes=3).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 96, 128))
    assert out.shape == (2, 12 * 16 + 6 * 8 + 3 * 4, 7)
    assert ((out[..., 4:] >= 0) & (out[..., 4:] <= 1)).all()
    raw = m.forward_raw(torch.rand(1, 3, 96, 128))
    assert raw.level_sizes == [(12, 16), (6, 8), (3, 4)]
    # at initialisation every box is (1, 1, 1, 1) grid units around its point (YOLOv6's bias init)
    half = raw.boxes[0, :, 2:] - raw.anchor_points
    assert torch.allclose(half, raw.strides.expand(-1, 2), atol=1e-4)


def test_official_keys_load_strictly_into_each_variant():
    """State dicts with the official YOLOv6 v3.0 names and shapes (recorded from the official code, 80 classes)."""
    for key, shapes in _official_keys().items():
        name = key.removesuffix("_distill_ns")
        model = create_detector(name, num_classes=80)
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(s, generator=g) if s else torch.tensor(0) for k, s in shapes.items()}
        mapped = official_to_ours(sd, model)
        fit = load_weights(model, mapped, source=key)  # raises on any missing, unexpected or misshapen tensor
        assert len(fit.loaded) >= len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
        probe = "neck.Rep_p4.0.conv_kxk.conv.weight"
        official = "neck.Rep_p4.conv1.rbr_dense.conv.weight" if VARIANTS[name].neck_block == "rep" else None
        if official:
            assert torch.equal(model.state_dict()[probe], sd[official])
        if key.endswith("distill_ns"):  # inference branch of the distilled head is the distance branch
            assert torch.equal(model.head.reg_preds[0].weight, sd["detect.reg_preds_lrtb.0.weight"])


def test_official_keys_of_the_wrong_variant_are_refused():
    shapes = _official_keys()["yolov6_m"]
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    model = create_detector("yolov6_n", num_classes=80)
    with pytest.raises(Exception, match=r"(?i)shape|missing|unexpected"):
        load_weights(model, official_to_ours(sd, model), source="yolov6m.pt")


def test_fused_detector_is_equal_and_smaller():
    m = create_detector("yolov6_test", num_classes=4)
    m.train()
    with torch.no_grad():  # move BN statistics off identity so the fold is not trivial
        for _ in range(2):
            m(torch.rand(2, 3, 64, 64))
    m.eval()
    x = torch.rand(2, 3, 64, 96)
    fused = fv.fuse(m, x)
    with torch.no_grad():
        ref, got = m(x), fused(x)
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4)
    n_ref = sum(p.numel() for p in m.parameters())
    n_fused = sum(p.numel() for p in fused.parameters())
    assert n_fused < n_ref
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())


def test_other_backbones_plug_in_and_bad_ones_are_refused():
    m = create_detector("yolov6_test", num_classes=2, backbone="test_efficientmod")
    with torch.no_grad():
        assert m.eval()(torch.rand(1, 3, 64, 64)).shape[-1] == 6
    vit = create_detector("yolov6_test", num_classes=2, backbone="test_fastervit", backbone_kwargs={"img_size": 128})
    with torch.no_grad():
        assert vit.eval()(torch.rand(1, 3, 128, 128)).shape == (1, 16 * 16 + 8 * 8 + 4 * 4, 6)
    with pytest.raises(ConfigError, match="yolov6_x"):
        create_detector("yolov6_x")
    with pytest.raises(ConfigError, match="num_classes"):
        create_detector("yolov6_test", num_classes=0)


def test_iou_losses_and_dfl():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    t = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    for kind in ("iou", "giou", "diou", "ciou", "siou"):
        loss = bbox_iou_loss(b, t, kind)
        assert loss[0].abs() < 1e-5 and loss[1] > 0.99, kind
    assert bbox_iou_loss(b, t, "giou")[1] > bbox_iou_loss(b, t, "iou")[1]
    logits = torch.zeros(1, 4, 17)
    logits[0, :, 3] = 20.0
    assert dfl_loss(logits, torch.full((1, 4), 3.0), 16).item() < 1e-6
    assert dfl_loss(logits, torch.full((1, 4), 9.0), 16).item() > 1.0


def test_assigners_pick_points_inside_the_box():
    m = create_detector("yolov6_test", num_classes=2)
    out = m.forward_raw(torch.rand(1, 3, 64, 64))
    gt = torch.tensor([[[4.0, 4.0, 36.0, 28.0]]])
    lab, ok = torch.tensor([[1]]), torch.tensor([[True]])
    tal = TaskAlignedAssigner(topk=13)(out.cls_logits.sigmoid(), out.boxes, out.anchor_points, gt, lab, ok)
    sizes = [h * w for h, w in out.level_sizes]
    atss = ATSSAssigner()(out.anchor_points, out.strides, sizes, gt, lab, ok, out.boxes, 2)
    for a in (tal, atss):
        pts = out.anchor_points[a.fg_mask[0]]
        assert len(pts) > 0
        assert ((pts[:, 0] > 4) & (pts[:, 0] < 36) & (pts[:, 1] > 4) & (pts[:, 1] < 28)).all()
        assert (a.labels[a.fg_mask] == 1).all() and (a.labels[~a.fg_mask] == 2).all()
        assert (a.scores[~a.fg_mask] == 0).all()
    assert int(tal.fg_mask.sum()) <= 13


def test_loss_trains_the_detector_on_one_image():
    torch.manual_seed(0)
    m = create_detector("yolov6_test", num_classes=2)
    crit = DetectionLoss(2, "siou")
    x = torch.rand(2, 3, 64, 64)
    targets = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 36.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss, _ = crit(m.forward_raw(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_self_distillation_adds_kl_terms():
    m = create_detector("yolov6_test", num_classes=2, reg_max=16, iou_type="giou")
    teacher = create_detector("yolov6_test", num_classes=2, reg_max=16, iou_type="giou")
    with torch.no_grad():
        for conv in [*teacher.head.cls_preds, *teacher.head.reg_preds]:
            conv.weight.normal_(0, 0.5)
    x = torch.rand(1, 3, 64, 64)
    targets = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 36.0]]), labels=torch.tensor([0]))]
    crit = DetectionLoss(2, "giou", reg_max=16)
    plain, _ = crit(m.forward_raw(x), targets)
    with torch.no_grad():
        t_out = teacher.forward_raw(x)
    kd, parts = crit(m.forward_raw(x), targets, teacher=t_out, distill={"epoch": 0, "epochs": 10})
    assert {"kd_cls", "kd_dfl"} <= set(parts) and kd >= plain
    _, parts_late = crit(m.forward_raw(x), targets, teacher=t_out, distill={"epoch": 10, "epochs": 10})
    assert parts_late["kd_cls"] < parts["kd_cls"]  # cosine-decayed weight


# ------------------------------------------------------------------------------------ parity with official YOLOv6
def _official_cfg(name: str, use_dfl: bool, reg_max: int):
    addict = pytest.importorskip("addict")
    v = VARIANTS[name]
    return addict.Dict(model=dict(
        type=name, depth_multiple=v.depth, width_multiple=v.width,
        backbone=dict(type="EfficientRep" if v.neck_block == "rep" else "CSPBepBackbone", num_repeats=[1, 6, 12, 18, 6],
                      out_channels=[64, 128, 256, 512, 1024], fuse_P2=True, cspsppf=v.neck_block == "rep", csp_e=2 / 3),
        neck=dict(type="RepBiFPANNeck" if v.neck_block == "rep" else "CSPRepBiFPANNeck", num_repeats=[12, 12, 12, 12],
                  out_channels=[256, 128, 128, 256, 256, 512], csp_e=2 / 3),
        head=dict(type="EffiDeHead", in_channels=[128, 256, 512], num_layers=3, begin_indices=24, anchors=1,
                  out_indices=[17, 20, 23], strides=[8, 16, 32], iou_type=v.iou_type, use_dfl=use_dfl,
                  reg_max=reg_max)), training_mode="repvgg")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov6_n", "yolov6_s", "yolov6_m"])
def test_parity_with_the_official_model(name):
    """Random official weights, mapped and loaded: the same boxes and scores (pip package ``yolov6detect``)."""
    yolo = pytest.importorskip("yolov6.models.yolo")
    v = VARIANTS[name]
    torch.manual_seed(0)
    off = yolo.build_model(_official_cfg(name, v.reg_max > 0, v.reg_max), 5, "cpu")
    with torch.no_grad():
        for m in off.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad:
                m.weight.normal_(0, 0.05)
    off.eval()
    ours = create_detector(name, num_classes=5).eval()
    load_weights(ours, official_to_ours(off.state_dict(), ours), source="official")
    x = torch.rand(2, 3, 160, 192)
    with torch.no_grad():
        ref, got = off(x)[0], ours(x)
    xyxy = torch.cat((ref[..., :2] - ref[..., 2:4] / 2, ref[..., :2] + ref[..., 2:4] / 2), -1)
    assert (xyxy - got[..., :4]).abs().max() <= 1e-4 * xyxy.abs().max()
    assert (ref[..., 5:] - got[..., 4:]).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("iou_type", "reg_max", "warmup"), [("siou", 0, 0), ("giou", 16, 0), ("giou", 16, 1)])
def test_loss_parity_with_the_official_loss(monkeypatch, iou_type, reg_max, warmup):
    """Official ``ComputeLoss`` (TAL / ATSS, VFL, SIoU / GIoU, DFL) on the same predictions and targets."""
    loss_mod = pytest.importorskip("yolov6.models.losses.loss")
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    torch.manual_seed(0)
    m = create_detector("yolov6_test", num_classes=3, reg_max=reg_max, iou_type=iou_type)
    with torch.no_grad():
        for conv in [*m.head.cls_preds, *m.head.reg_preds]:
            conv.weight.normal_(0, 0.02)
        for conv in m.head.reg_preds:
            conv.bias.add_(1.5)
    out = m.forward_raw(torch.rand(2, 3, 128, 128))
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 64.0, 120.0, 126.0]]),
                    labels=torch.tensor([1, 2])),
               dict(boxes=torch.tensor([[30.0, 30.0, 90.0, 100.0]]), labels=torch.tensor([0]))]
    ours, parts = DetectionLoss(3, iou_type, reg_max, warmup_epochs=warmup)(out, targets, epoch=0)
    rows = [[i, float(lab), float(b[0] + b[2]) / 256, float(b[1] + b[3]) / 256, float(b[2] - b[0]) / 128,
             float(b[3] - b[1]) / 128]
            for i, t in enumerate(targets) for b, lab in zip(t["boxes"], t["labels"], strict=True)]
    crit = loss_mod.ComputeLoss(num_classes=3, ori_img_size=128, warmup_epoch=warmup, use_dfl=reg_max > 0,
                                reg_max=reg_max, iou_type=iou_type)
    feats = [torch.zeros(2, 1, h, w) for h, w in out.level_sizes]
    ref, items = crit((feats, out.cls_logits.sigmoid(), out.reg), torch.tensor(rows), 0, 0)
    assert abs(float(ours) - float(ref)) <= 1e-4 * abs(float(ref))
    assert abs(parts["iou"] - float(items[0])) <= 1e-4 * max(1.0, abs(float(items[0])))

"""YOLOv6 (v3.0) detector: EfficientRep backbone + Rep-BiFPAN neck + efficient decoupled head, anchor-free.

The layout follows the official YOLOv6 configs (``configs/yolov6n.py``, ``yolov6s.py``, ``yolov6m.py``):

=========  =====  =====  ==================  ================  ========  ==========
name       width  depth  backbone            neck              box loss  reg_max
=========  =====  =====  ==================  ================  ========  ==========
yolov6_n   0.25   0.33   efficientrep_n      RepBiFPAN         SIoU      0 (no DFL)
yolov6_s   0.50   0.33   efficientrep_s      RepBiFPAN         SIoU      0 (no DFL)
yolov6_m   0.75   0.60   efficientrep_m      CSPRepBiFPAN 2/3  GIoU+DFL  16
=========  =====  =====  ==================  ================  ========  ==========

The neck takes the stride-4…32 maps (P2…P5; YOLOv6's ``fuse_P2``) and returns stride 8/16/32 maps; the head has a
1×1 stem and separate 3×3 class and box branches per level (SiLU), a class conv (sigmoid scores) and a box conv that
predicts the four distances left/top/right/bottom from each grid point, in grid units (with DFL: a distribution of
``reg_max + 1`` bins per side, read out by its expectation). Grid points sit at cell centres (offset 0.5).

Every ``RepConv`` trains with its three branches and fuses to one 3×3 conv for deployment (:func:`frugalvision.fuse`);
every Conv+BN+act folds too. BatchNorms use YOLOv6's ``eps=1e-3, momentum=0.03``.

Any timm ``features_only`` backbone with stride-4…32 levels plugs in (``backbone="fastervit_0"``,
``"efficientmod_xxs"``, ``"repvgg_a0"``…), with the neck's widths of the chosen size.

Example:
    >>> m = yolov6_test(num_classes=3).eval()
    >>> out = m(torch.rand(1, 3, 64, 64))
    >>> out.shape  # (batch, anchors = 8x8 + 4x4 + 2x2, 4 box coords + 3 class scores)
    torch.Size([1, 84, 7])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.rep import _BLOCK_RENAMES, ConvBNAct, CSPStackRep, RepStack, checkpoint_filter_fn

__all__ = [
    "VARIANTS",
    "BiFusion",
    "DetectorOutput",
    "EffiDeHead",
    "RepBiFPAN",
    "YOLOv6",
    "build_detector_from_info",
    "create_detector",
    "official_to_ours",
    "yolov6_m",
    "yolov6_n",
    "yolov6_s",
    "yolov6_test",
]


def _divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _repeats(n: int, depth: float) -> int:
    return max(round(n * depth), 1) if n > 1 else n


@dataclass(frozen=True)
class Variant:
    """Size and training recipe of one registered detector."""

    width: float
    depth: float
    backbone: str
    neck_block: str  # "rep" or "csp"
    iou_type: str
    reg_max: int
    csp_e: float = 2 / 3


VARIANTS: dict[str, Variant] = {
    "yolov6_n": Variant(0.25, 0.33, "efficientrep_n", "rep", "siou", 0),
    "yolov6_s": Variant(0.50, 0.33, "efficientrep_s", "rep", "siou", 0),
    "yolov6_m": Variant(0.75, 0.60, "efficientrep_m", "csp", "giou", 16),
    "yolov6_test": Variant(0.125, 0.33, "test_efficientrep", "rep", "siou", 0),
}


class BiFusion(nn.Module):
    """Fuse an upsampled deeper map, the same-level map and a downsampled shallower map (YOLOv6's BiFusion)."""

    def __init__(self, in_chs: Sequence[int], out_chs: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(in_chs[0], out_chs, 1)
        self.cv2 = ConvBNAct(in_chs[1], out_chs, 1)
        self.cv3 = ConvBNAct(out_chs * 3, out_chs, 1)
        self.upsample = nn.ConvTranspose2d(out_chs, out_chs, 2, 2, bias=True)
        self.downsample = ConvBNAct(out_chs, out_chs, 3, 2)

    def forward(self, deep: torch.Tensor, same: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        """``cv3(cat(up(deep), cv1(same), down(cv2(shallow))))``."""
        return self.cv3(torch.cat((self.upsample(deep), self.cv1(same), self.downsample(self.cv2(shallow))), 1))


class RepBiFPAN(nn.Module):
    """Rep-BiFPAN neck (YOLOv6 v3.0): top-down BiFusion path, then bottom-up PAN path; outputs P3, P4, P5.

    Args:
        in_chs: Channels of the backbone's P2, P3, P4, P5 maps.
        chs: Neck widths ``(c5, c6, c7, c8, c9, c10)`` (YOLOv6's ``channels_list[5:11]``).
        depths: Blocks of ``Rep_p4, Rep_p3, Rep_n3, Rep_n4``.
        block: ``rep`` (RepConv stacks, N/S) or ``csp`` (CSPStackRep, M/L).
        csp_e: Hidden ratio of the CSP blocks.
    """

    def __init__(self, in_chs: Sequence[int], chs: Sequence[int], depths: Sequence[int], block: str = "rep",
                 csp_e: float = 2 / 3) -> None:
        super().__init__()
        p2, p3, p4, p5 = in_chs
        c5, c6, c7, c8, c9, c10 = chs

        def stage(cin: int, cout: int, n: int) -> nn.Module:
            return RepStack(cin, cout, n) if block == "rep" else CSPStackRep(cin, cout, n, csp_e)

        self.reduce_layer0 = ConvBNAct(p5, c5, 1)
        self.Bifusion0 = BiFusion((p4, p3), c5)
        self.Rep_p4 = stage(c5, c5, depths[0])
        self.reduce_layer1 = ConvBNAct(c5, c6, 1)
        self.Bifusion1 = BiFusion((p3, p2), c6)
        self.Rep_p3 = stage(c6, c6, depths[1])
        self.downsample2 = ConvBNAct(c6, c7, 3, 2)
        self.Rep_n3 = stage(c6 + c7, c8, depths[2])
        self.downsample1 = ConvBNAct(c8, c9, 3, 2)
        self.Rep_n4 = stage(c5 + c9, c10, depths[3])
        self.out_chs = (c6, c8, c10)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """P2…P5 in, P3, P4, P5 (strides 8, 16, 32) out."""
        x3, x2, x1, x0 = feats
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(self.Bifusion0(fpn_out0, x1, x2))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1(fpn_out1, x2, x3))
        pan_out1 = self.Rep_n3(torch.cat((self.downsample2(pan_out2), fpn_out1), 1))
        pan_out0 = self.Rep_n4(torch.cat((self.downsample1(pan_out1), fpn_out0), 1))
        return [pan_out2, pan_out1, pan_out0]


class EffiDeHead(nn.Module):
    """Efficient decoupled head: per level a 1×1 stem, then a 3×3 class branch and a 3×3 box branch (SiLU)."""

    def __init__(self, in_chs: Sequence[int], num_classes: int, reg_max: int = 0, prior_prob: float = 1e-2) -> None:
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        silu: Callable[[], nn.Module] = nn.SiLU
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1, act_layer=silu) for c in in_chs)
        self.cls_convs = nn.ModuleList(ConvBNAct(c, c, 3, act_layer=silu) for c in in_chs)
        self.reg_convs = nn.ModuleList(ConvBNAct(c, c, 3, act_layer=silu) for c in in_chs)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_chs)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_chs)
        self.register_buffer("proj", torch.linspace(0, reg_max, reg_max + 1), persistent=False)
        with torch.no_grad():  # YOLOv6's initialize_biases
            for conv in self.cls_preds:
                conv.weight.zero_()
                conv.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            for conv in self.reg_preds:
                conv.weight.zero_()
                conv.bias.fill_(1.0)

    def forward(self, feats: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per level: stem features, class logits ``(N, C, H, W)``, box outputs ``(N, 4 (reg_max + 1), H, W)``."""
        stems, cls, reg = [], [], []
        for i, x in enumerate(feats):
            x = self.stems[i](x)
            stems.append(x)
            cls.append(self.cls_preds[i](self.cls_convs[i](x)))
            reg.append(self.reg_preds[i](self.reg_convs[i](x)))
        return stems, cls, reg

    def distances(self, reg: torch.Tensor) -> torch.Tensor:
        """Box distances ``(N, A, 4)`` in grid units from the flattened box outputs ``(N, A, 4 (reg_max + 1))``."""
        if self.reg_max == 0:
            return reg
        n, a, _ = reg.shape
        return F.softmax(reg.reshape(n, a, 4, self.reg_max + 1).float(), -1).matmul(self.proj.float()).to(reg.dtype)


@dataclass
class DetectorOutput:
    """Everything the losses, the mask head and the decoder need from one forward pass.

    Attributes:
        cls_logits: ``(N, A, C)`` class logits.
        reg: ``(N, A, 4 (reg_max + 1))`` raw box outputs (DFL bins or distances).
        boxes: ``(N, A, 4)`` decoded xyxy boxes in input pixels.
        anchor_points: ``(A, 2)`` grid points in input pixels.
        strides: ``(A, 1)`` stride of each grid point.
        neck: P3, P4, P5 neck maps.
        head: Per-level stem features of the head.
        level_sizes: ``(H, W)`` of each level.
    """

    cls_logits: torch.Tensor
    reg: torch.Tensor
    boxes: torch.Tensor
    anchor_points: torch.Tensor
    strides: torch.Tensor
    neck: list[torch.Tensor]
    head: list[torch.Tensor]
    level_sizes: list[tuple[int, int]]


def make_anchor_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device,
                       dtype: torch.dtype = torch.float32, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid-cell centres ``(A, 2)`` in pixels and their strides ``(A, 1)``, level by level, row-major.

    Example:
        >>> p, s = make_anchor_points([(2, 2)], [8], torch.device("cpu"))
        >>> p.tolist(), s.flatten().tolist()
        ([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]], [8.0, 8.0, 8.0, 8.0])
    """
    points, stride_list = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xx, yy), -1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_list)


class YOLOv6(nn.Module):
    """YOLOv6 detector on any stride-4…32 timm backbone.

    ``forward`` returns the decoded predictions ``(N, A, 4 + C)``: xyxy boxes in input pixels, then sigmoid class
    scores (feed them to :func:`frugalvision.detect.postprocess.postprocess`); :meth:`forward_raw` returns a
    :class:`DetectorOutput` for the losses and the mask head.

    Args:
        num_classes: Object classes.
        backbone: timm model name (``efficientrep_n`` for YOLOv6-N) or a module with ``feature_info`` returning
            4 maps of strides 4, 8, 16, 32.
        width: Width multiple of the neck (``channels_list[5:11]`` of YOLOv6 = 256, 128, 128, 256, 256, 512).
        depth: Depth multiple of the neck (12 blocks per stage before scaling).
        neck_block: ``rep`` or ``csp``.
        csp_e: Hidden ratio of the CSP neck blocks.
        reg_max: DFL bins minus one (0: plain distances).
        iou_type: Box loss the recipe uses (``siou`` or ``giou``); stored for the loss.
        backbone_kwargs: Extra arguments for ``timm.create_model``.
        in_chans: Image channels.
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(self, num_classes: int = 80, backbone: str | nn.Module = "efficientrep_n", width: float = 0.25,
                 depth: float = 0.33, neck_block: str = "rep", csp_e: float = 2 / 3, reg_max: int = 0,
                 iou_type: str = "siou", backbone_kwargs: Mapping[str, Any] | None = None, in_chans: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if neck_block not in ("rep", "csp"):
            raise ConfigError(f"neck_block must be 'rep' or 'csp', got {neck_block!r}")
        if iou_type not in ("siou", "giou", "ciou", "diou", "iou"):
            raise ConfigError(f"iou_type must be siou, giou, ciou, diou or iou, got {iou_type!r}")
        if reg_max < 0:
            raise ConfigError(f"reg_max must be >= 0, got {reg_max}")
        self.num_classes, self.reg_max, self.iou_type = num_classes, reg_max, iou_type
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = _features(backbone, in_chans, dict(backbone_kwargs or {}))
        else:
            self.backbone_name = type(backbone).__name__
        self.backbone = backbone
        info = backbone.feature_info
        reductions = list(info.reduction()) if hasattr(info, "reduction") else [f["reduction"] for f in info]
        if reductions != [4, 8, 16, 32]:
            raise ConfigError(f"backbone {self.backbone_name!r} gives feature strides {reductions}; the YOLOv6 neck "
                              "needs exactly 4, 8, 16, 32 (pick out_indices of those levels)")
        in_chs = list(info.channels()) if hasattr(info, "channels") else [f["num_chs"] for f in info]
        chs = [_divisible(c * width) for c in (256, 128, 128, 256, 256, 512)]
        depths = [_repeats(12, depth)] * 4
        self.neck = RepBiFPAN(in_chs, chs, depths, neck_block, csp_e)
        self.head = EffiDeHead(self.neck.out_chs, num_classes, reg_max)
        for m in self.modules():  # YOLOv6's BN settings (initialize_weights)
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03

    def forward_raw(self, x: torch.Tensor) -> DetectorOutput:
        """Backbone, neck and head, flattened over levels; boxes decoded in input pixels."""
        feats = self.backbone(x)
        neck = self.neck(feats)
        stems, cls, reg = self.head(neck)
        sizes = [(t.shape[-2], t.shape[-1]) for t in cls]  # not int(): the ONNX trace keeps H, W dynamic
        cls_logits = torch.cat([t.flatten(2) for t in cls], 2).transpose(1, 2)
        reg_out = torch.cat([t.flatten(2) for t in reg], 2).transpose(1, 2)
        points, strides = make_anchor_points(sizes, self.strides, x.device, torch.float32)
        dist = self.head.distances(reg_out).float()
        lt, rb = dist.split(2, -1)
        grid = points / strides
        boxes = torch.cat((grid - lt, grid + rb), -1) * strides
        return DetectorOutput(cls_logits, reg_out, boxes, points, strides, neck, stems, sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded predictions ``(N, A, 4 + C)``: xyxy boxes in input pixels, then sigmoid class scores."""
        out = self.forward_raw(x)
        return torch.cat((out.boxes, out.cls_logits.float().sigmoid()), -1)


def _features(name: str, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        raise ConfigError(f"backbone {name!r} cannot give feature maps (features_only): {e}") from e
    reductions = probe.feature_info.reduction()
    wanted = [reductions.index(r) for r in (4, 8, 16, 32) if r in reductions]
    if len(wanted) != 4:
        raise ConfigError(f"backbone {name!r} has feature strides {reductions}; the YOLOv6 neck needs 4, 8, 16, 32")
    indices = [probe.feature_info.out_indices[i] for i in wanted]
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, in_chans=in_chans,
                             **kwargs)


def create_detector(name: str = "yolov6_n", num_classes: int = 80, backbone: str | None = None,
                    **kwargs: Any) -> YOLOv6:
    """A registered detector variant (``yolov6_n``, ``yolov6_s``, ``yolov6_m``, ``yolov6_test``).

    ``backbone`` swaps the EfficientRep of the variant for another timm model (the neck keeps the variant's widths).

    Example:
        >>> create_detector("yolov6_test", num_classes=2).neck.out_chs
        (16, 32, 64)
    """
    if name not in VARIANTS:
        raise ConfigError(f"unknown detector {name!r}; choose from {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    args: dict[str, Any] = dict(backbone=backbone or v.backbone, width=v.width, depth=v.depth, neck_block=v.neck_block,
                                csp_e=v.csp_e, reg_max=v.reg_max, iou_type=v.iou_type)
    args.update(kwargs)
    return YOLOv6(num_classes=num_classes, **args)


def yolov6_n(num_classes: int = 80, **kwargs: Any) -> YOLOv6:
    """YOLOv6-N v3.0: EfficientRep-N, Rep-BiFPAN (width 0.25, depth 0.33), SIoU, no DFL."""
    return create_detector("yolov6_n", num_classes, **kwargs)


def yolov6_s(num_classes: int = 80, **kwargs: Any) -> YOLOv6:
    """YOLOv6-S v3.0: EfficientRep-S, Rep-BiFPAN (width 0.5, depth 0.33), SIoU, no DFL."""
    return create_detector("yolov6_s", num_classes, **kwargs)


def yolov6_m(num_classes: int = 80, **kwargs: Any) -> YOLOv6:
    """YOLOv6-M v3.0: CSPBep backbone and CSPRepBiFPAN neck (width 0.75, depth 0.6, e = 2/3), GIoU + DFL 16."""
    return create_detector("yolov6_m", num_classes, **kwargs)


def yolov6_test(num_classes: int = 80, **kwargs: Any) -> YOLOv6:
    """A tiny variant for tests and examples."""
    return create_detector("yolov6_test", num_classes, **kwargs)


# ---------------------------------------------------------------------------------------- official weights
def _stage_body(rest: str) -> str:
    """RepBlock (``conv1``, ``block.j``) / BepC3 (``m.conv1``, ``m.block.j``) names to our stack indices."""
    rest = re.sub(r"^conv1\.", "0.", rest)
    rest = re.sub(r"^block\.(\d+)\.", lambda g: f"{int(g.group(1)) + 1}.", rest)
    rest = re.sub(r"^m\.conv1\.", "m.0.", rest)
    return re.sub(r"^m\.block\.(\d+)\.", lambda g: f"m.{int(g.group(1)) + 1}.", rest)


def official_to_ours(state_dict: Mapping[str, torch.Tensor], model: YOLOv6) -> dict[str, torch.Tensor]:
    """Map an official YOLOv6 detector ``state_dict`` (``backbone.*``, ``neck.*``, ``detect.*``) to our keys.

    Official checkpoints are pickled model objects: re-save their weights once with the official code, e.g.
    ``torch.save(torch.load("yolov6n.pt", weights_only=False)["model"].float().state_dict(), "yolov6n_sd.pt")``,
    then load the state dict with ``weights_only=True``. The v3.0 N/S release heads trained with self-distillation
    carry a DFL branch (``reg_preds_dist``) beside the distance branch that inference uses: the distance branch
    is taken, the DFL branch dropped. Constant buffers (``proj``, ``proj_conv``, ``stride``, ``anchors``) are dropped.
    """
    sd = dict(state_dict)
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out: dict[str, torch.Tensor] = {}
    if backbone:
        for k, v in checkpoint_filter_fn(backbone, model.backbone).items():
            if k.startswith("head."):
                continue
            k = re.sub(r"^stages\.(\d+)\.", r"stages_\1.", k)
            out[f"backbone.{k}"] = v
    has_lrtb = any(".reg_preds_lrtb." in k for k in sd)
    for k, v in sd.items():
        if k.endswith(("num_batches_tracked", "id_tensor")) and not k.startswith(("neck.", "detect.")):
            continue
        if k.startswith("neck."):
            rest = k[len("neck."):]
            m = re.match(r"(Rep_[pn]\d)\.(.*)", rest)
            if m:
                rest = f"{m.group(1)}.{_stage_body(m.group(2))}"
            rest = rest.replace("upsample.upsample_transpose.", "upsample.")
            k = "neck." + rest
        elif k.startswith("detect."):
            rest = k[len("detect."):]
            if rest.startswith(("proj", "stride", "anchors", "anchor")):
                continue
            if has_lrtb:
                if rest.startswith("reg_preds."):  # the distilled release: DFL branch under reg_preds
                    continue
                rest = rest.replace("reg_preds_lrtb.", "reg_preds.")
            k = "head." + rest
        else:
            continue
        if k.endswith("id_tensor"):
            continue
        k = "." + k
        for pat, rep in _BLOCK_RENAMES:
            k = re.sub(pat, rep, k)
        out[k[1:]] = v
    return out


def build_detector_from_info(info: Mapping[str, Any]) -> YOLOv6:
    """The detector a model file describes (kind ``detector``), weights not loaded."""
    kwargs = dict(info.get("model_kwargs", {}))
    return create_detector(str(info["name"]), **kwargs)

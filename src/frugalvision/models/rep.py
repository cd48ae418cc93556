"""Re-parameterisable blocks (RepVGG-style ``RepConv``) and the EfficientRep backbone of YOLOv6.

YOLOv6 trains multi-branch blocks and infers single convolutions: a :class:`RepConv` sums a 3×3 conv + BN, a
1×1 conv + BN and (when shapes allow) an identity BN; in eval mode every branch is affine in the input, so
:meth:`RepConv.reparameterize` folds all three into one 3×3 conv with bias. The stage blocks follow YOLOv6
(v3.0): ``RepStack`` (YOLOv6's ``RepBlock``), ``BottleRep`` (two RepConvs + scaled shortcut),
``CSPStackRep`` (YOLOv6's ``BepC3``), and the ReLU spatial-pyramid blocks ``SimSPPF`` / ``SimCSPSPPF``.

Variants (YOLOv6 configs: widths ``make_divisible(c * width_multiple, 8)`` of ``(64, 128, 256, 512, 1024)``,
depths ``round(n * depth_multiple)`` of ``(1, 6, 12, 18, 6)``):

=================  =====  =====  =================================  =================
name               width  depth  stage blocks                       last block
=================  =====  =====  =================================  =================
efficientrep_n     0.25   0.33   RepStack                           SimCSPSPPF
efficientrep_s     0.50   0.33   RepStack                           SimCSPSPPF
efficientrep_m     0.75   0.60   CSPStackRep (e = 2/3, BottleRep)   SimSPPF
=================  =====  =====  =================================  =================

Every model is a timm classification model too (global pool + linear head), with five feature levels
(strides 2, 4, 8, 16, 32) for ``features_only=True`` / ``forward_intermediates``: the stride-4…32 levels are the
P2…P5 maps YOLOv6's necks take (``fuse_P2``). ``timm.utils.reparameterize_model`` (or ``frugalvision.fuse``, which
also verifies) turns every ``RepConv`` into one conv and folds the BN of every plain conv.

Official YOLOv6 checkpoints are pickled model objects; re-save their ``state_dict()`` (e.g. ``torch.save(
ckpt["model"].float().state_dict(), "yolov6n_sd.pt")``) and :func:`checkpoint_filter_fn` maps the backbone keys.

Example:
    >>> import timm
    >>> m = timm.create_model("test_efficientrep")
    >>> [(f["num_chs"], f["reduction"]) for f in m.feature_info]
    [(8, 2), (16, 4), (32, 8), (48, 16), (64, 32)]
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "BottleRep",
    "CSPStackRep",
    "ConvBN",
    "ConvBNAct",
    "EfficientRep",
    "RepConv",
    "RepStack",
    "SimCSPSPPF",
    "SimSPPF",
    "checkpoint_filter_fn",
    "efficientrep_config",
]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias (float64) of ``bn(conv(x))`` in eval mode."""
    w, b = fuse_conv_bn_weights(
        conv.weight.detach().double(), None if conv.bias is None else conv.bias.detach().double(),
        bn.running_mean.double(), bn.running_var.double(), bn.eps,
        None if bn.weight is None else bn.weight.detach().double(),
        None if bn.bias is None else bn.bias.detach().double(),
    )
    return w.detach(), b.detach()


def _fused_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A conv with ``conv``'s geometry and the given (float64) weight and bias, in ``conv``'s dtype/device."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class ConvBN(nn.Sequential):
    """``Conv2d`` (no bias, 'same' padding) followed by ``BatchNorm2d``; one branch of a :class:`RepConv`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_chs),
        ))


class ConvBNAct(nn.Sequential):
    """``Conv2d`` + ``BatchNorm2d`` + activation; :meth:`reparameterize` folds the BN into the conv.

    Example:
        >>> m = ConvBNAct(4, 8, 3).eval()
        >>> x = torch.randn(1, 4, 8, 8)
        >>> ref = m(x); m.reparameterize()
        >>> isinstance(m.bn, nn.Identity), torch.allclose(m(x), ref, atol=1e-6)
        (True, True)
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_chs),
            act=act_layer(),
        ))

    def reparameterize(self) -> None:
        """Fold the BN into the conv (eval-mode statistics); the BN becomes ``nn.Identity``. Idempotent."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = _fused_conv(self.conv, *_fold(self.conv, self.bn))
            self.bn = nn.Identity()


class RepConv(nn.Module):
    """RepVGG block: ``act(bn(conv_kxk(x)) + bn(conv_1x1(x)) + bn(x))``, re-parameterisable to ``act(conv(x))``.

    The identity branch exists when ``in_chs == out_chs`` and ``stride == 1``. :meth:`reparameterize` (called by
    ``timm.utils.reparameterize_model``) folds every branch, with its BN's running statistics, into a single
    ``kernel_size`` conv with bias (``self.reparam``) and drops the branches.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Size of the main branch (odd).
        stride: Stride of every branch.
        groups: Groups of every conv.
        act_layer: Activation after the sum (YOLOv6 uses ReLU).
        use_1x1: Add the 1×1 branch.
        use_identity: Add the identity-BN branch when the shapes allow it.
        inference_mode: Build the single-conv form directly (e.g. to load fused weights).

    Example:
        >>> m = RepConv(8, 8).eval()
        >>> x = torch.randn(2, 8, 16, 16)
        >>> ref = m(x); m.reparameterize()
        >>> m.conv_kxk is None, type(m.reparam).__name__, torch.allclose(m(x), ref, atol=1e-5)
        (True, 'Conv2d', True)
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act_layer: Callable[[], nn.Module] = nn.ReLU, use_1x1: bool = True, use_identity: bool = True,
                 inference_mode: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"RepConv needs an odd kernel_size to align its branches, got {kernel_size}")
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"in_chs ({in_chs}) and out_chs ({out_chs}) must be divisible by groups ({groups})")
        self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups = (
            in_chs, out_chs, kernel_size, stride, groups)
        self.conv_kxk: ConvBN | None = None
        self.conv_1x1: ConvBN | None = None
        self.identity: nn.BatchNorm2d | None = None
        self.reparam: nn.Conv2d | None = None
        if inference_mode:
            self.reparam = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)
        else:
            self.conv_kxk = ConvBN(in_chs, out_chs, kernel_size, stride, groups)
            if use_1x1 and kernel_size > 1:
                self.conv_1x1 = ConvBN(in_chs, out_chs, 1, stride, groups)
            if use_identity and in_chs == out_chs and stride == 1:
                self.identity = nn.BatchNorm2d(in_chs)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the branches (training form) or the single conv (after :meth:`reparameterize`)."""
        if self.reparam is not None:
            return self.act(self.reparam(x))
        assert self.conv_kxk is not None
        out = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    @property
    def num_branches(self) -> int:
        """Branches summed before the activation (1 after :meth:`reparameterize`)."""
        return 1 if self.reparam is not None else sum(
            b is not None for b in (self.conv_kxk, self.conv_1x1, self.identity))

    @torch.no_grad()
    def scale_branches(self, factor: float) -> None:
        """Multiply the output of every branch by ``factor`` (scales the BN affine parameters)."""
        bns = [b.bn for b in (self.conv_kxk, self.conv_1x1) if b is not None] + (
            [self.identity] if self.identity is not None else [])
        for bn in bns:
            bn.weight.mul_(factor)
            bn.bias.mul_(factor)
        if self.reparam is not None:
            self.reparam.weight.mul_(factor)
            self.reparam.bias.mul_(factor)  # type: ignore[union-attr]

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``(out, in/groups, k, k)`` and bias of the single conv equal to the branches in eval mode."""
        if self.reparam is not None:
            return self.reparam.weight.detach(), self.reparam.bias.detach()  # type: ignore[union-attr]
        assert self.conv_kxk is not None
        kernel, bias = _fold(self.conv_kxk.conv, self.conv_kxk.bn)
        pad = self.kernel_size // 2
        if self.conv_1x1 is not None:
            k1, b1 = _fold(self.conv_1x1.conv, self.conv_1x1.bn)
            kernel = kernel + F.pad(k1, [pad, pad, pad, pad])
            bias = bias + b1
        if self.identity is not None:
            per_group = self.in_chs // self.groups
            eye = torch.zeros(self.in_chs, per_group, self.kernel_size, self.kernel_size, dtype=torch.float64,
                              device=kernel.device)
            idx = torch.arange(self.in_chs, device=kernel.device)
            eye[idx, idx % per_group, pad, pad] = 1.0
            bn = self.identity
            std = (bn.running_var.double() + bn.eps).sqrt()
            gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(std)
            beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(std)
            kernel = kernel + eye * (gamma / std).reshape(-1, 1, 1, 1)
            bias = bias + beta - bn.running_mean.double() * gamma / std
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one conv with the same eval-mode output. Idempotent."""
        if self.reparam is not None:
            return
        assert self.conv_kxk is not None
        self.reparam = _fused_conv(self.conv_kxk.conv, *self.equivalent_kernel_bias())
        self.conv_kxk = self.conv_1x1 = self.identity = None

    def extra_repr(self) -> str:
        """Whether the block is in its single-conv form."""
        return f"fused={self.reparam is not None}"


class RepStack(nn.Sequential):
    """``n`` RepConvs in a row (YOLOv6's ``RepBlock``); the first maps ``in_chs`` to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int, n: int = 1, act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(*(RepConv(in_chs if i == 0 else out_chs, out_chs, act_layer=act_layer)
                           for i in range(max(1, n))))


class BottleRep(nn.Module):
    """Two RepConvs with a learnable-scale shortcut: ``conv2(conv1(x)) + alpha * x`` (shortcut when shapes match).

    Example:
        >>> BottleRep(8, 8)(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, in_chs: int, out_chs: int, act_layer: Callable[[], nn.Module] = nn.ReLU,
                 learnable_alpha: bool = True) -> None:
        super().__init__()
        self.conv1 = RepConv(in_chs, out_chs, act_layer=act_layer)
        self.conv2 = RepConv(out_chs, out_chs, act_layer=act_layer)
        self.shortcut = in_chs == out_chs
        if learnable_alpha and self.shortcut:
            self.alpha = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("alpha", torch.ones(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus the scaled shortcut."""
        out = self.conv2(self.conv1(x))
        return out + self.alpha * x if self.shortcut else out


class CSPStackRep(nn.Module):
    """CSP block of BottleReps (YOLOv6's ``BepC3``): ``cv3(cat(m(cv1(x)), cv2(x)))``.

    ``n`` counts RepConvs as YOLOv6's depth does, so the block holds ``max(1, n // 2)`` BottleReps.

    Example:
        >>> CSPStackRep(12, 12, n=4, e=2 / 3)(torch.randn(1, 12, 8, 8)).shape
        torch.Size([1, 12, 8, 8])
    """

    def __init__(self, in_chs: int, out_chs: int, n: int = 1, e: float = 0.5,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        hidden = int(out_chs * e)
        self.cv1 = ConvBNAct(in_chs, hidden, 1, act_layer=act_layer)
        self.cv2 = ConvBNAct(in_chs, hidden, 1, act_layer=act_layer)
        self.cv3 = ConvBNAct(2 * hidden, out_chs, 1, act_layer=act_layer)
        self.m = nn.Sequential(*(BottleRep(hidden, hidden, act_layer) for _ in range(max(1, n // 2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the BottleRep path and the 1×1 path, then mix."""
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SimSPPF(nn.Module):
    """Simplified SPPF (ReLU): 1×1 conv, three chained 5×5 max-pools, concat, 1×1 conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 5,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        hidden = in_chs // 2
        self.cv1 = ConvBNAct(in_chs, hidden, 1, act_layer=act_layer)
        self.cv2 = ConvBNAct(hidden * 4, out_chs, 1, act_layer=act_layer)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool pyramid of the reduced input."""
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


class SimCSPSPPF(nn.Module):
    """CSP version of SimSPPF (YOLOv6 v3.0 N/S): a pooled branch with 3×3 convs next to a 1×1 branch."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 5, e: float = 0.5,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        hidden = int(out_chs * e)
        self.cv1 = ConvBNAct(in_chs, hidden, 1, act_layer=act_layer)
        self.cv2 = ConvBNAct(in_chs, hidden, 1, act_layer=act_layer)
        self.cv3 = ConvBNAct(hidden, hidden, 3, act_layer=act_layer)
        self.cv4 = ConvBNAct(hidden, hidden, 1, act_layer=act_layer)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.cv5 = ConvBNAct(4 * hidden, hidden, 1, act_layer=act_layer)
        self.cv6 = ConvBNAct(hidden, hidden, 3, act_layer=act_layer)
        self.cv7 = ConvBNAct(2 * hidden, out_chs, 1, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 3×3 branch next to a 1×1 branch."""
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.pool(x1)
        y2 = self.pool(y1)
        y3 = self.cv6(self.cv5(torch.cat((x1, y1, y2, self.pool(y2)), dim=1)))
        return self.cv7(torch.cat((y0, y3), dim=1))


_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


class EfficientRep(nn.Module):
    """EfficientRep backbone (YOLOv6) with a classification head, as a timm model.

    Args:
        channels: Output channels of the stem and the four stages.
        depths: RepConvs per stage body (index 0, the stem, is ignored as in YOLOv6).
        stage_block: ``"rep"`` (RepStack bodies, YOLOv6-N/S) or ``"csp"`` (CSPStackRep bodies, YOLOv6-M/L).
        csp_e: Hidden-channel ratio of the CSP bodies.
        sppf: Last block: ``"csp"`` (SimCSPSPPF) or ``"plain"`` (SimSPPF).
        act: Activation: ``relu`` (YOLOv6), ``silu`` or ``hardswish``.
        in_chans: Input channels.
        num_classes: Classifier outputs (0: no classifier).
        global_pool: timm pooling type of the head.
        drop_rate: Dropout before the classifier.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512, 1024), depths: Sequence[int] = (1, 6, 12, 18, 6),
                 stage_block: str = "rep", csp_e: float = 2 / 3, sppf: str = "csp", act: str = "relu",
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", drop_rate: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__()
        if len(channels) != 5 or len(depths) != 5:
            raise ValueError(f"channels and depths need 5 entries (stem + 4 stages), got {channels}, {depths}")
        if stage_block not in ("rep", "csp"):
            raise ValueError(f"stage_block must be 'rep' or 'csp', got {stage_block!r}")
        if sppf not in ("csp", "plain"):
            raise ValueError(f"sppf must be 'csp' or 'plain', got {sppf!r}")
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        act_layer = _ACTS[act]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = RepConv(in_chans, channels[0], stride=2, act_layer=act_layer)
        self.feature_info = [dict(num_chs=channels[0], reduction=2, module="stem")]
        stages = []
        for i in range(1, 5):
            cin, cout = channels[i - 1], channels[i]
            body: nn.Module = (RepStack(cout, cout, depths[i], act_layer) if stage_block == "rep"
                               else CSPStackRep(cout, cout, depths[i], csp_e, act_layer))
            blocks: list[nn.Module] = [RepConv(cin, cout, stride=2, act_layer=act_layer), body]
            if i == 4:
                blocks.append(SimCSPSPPF(cout, cout, 5, act_layer=act_layer) if sppf == "csp"
                              else SimSPPF(cout, cout, 5, act_layer=act_layer))
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=cout, reduction=2 ** (i + 1), module=f"stages.{i - 1}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = channels[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Variance-preserving at init in eval mode too (BN running statistics are still the identity there):
        # fan-in He init, branch BNs scaled by 1/sqrt(branches), BottleRep residual and shortcut by 1/sqrt(2).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, RepConv) and m.reparam is None:
                m.scale_branches(m.num_branches ** -0.5)
            elif isinstance(m, BottleRep) and m.shortcut:
                m.conv2.scale_branches(0.5**0.5)
                m.alpha.fill_(0.5**0.5)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the stages in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the feature maps of the levels in ``indices`` (0: stem, 1–4: stages).

        Args:
            x: Input images ``(N, C, H, W)``.
            indices: Take the last n levels if an int, all if None, the listed levels if a sequence.
            norm: Unused (the model has no final norm); kept for timm's interface.
            stop_early: Stop after the last requested level.
            output_fmt: Only ``NCHW``.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"EfficientRep returns NCHW features, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        inter: list[torch.Tensor] = []
        x = self.stem(x)
        if 0 in take:
            inter.append(x)
        stages = self.stages[:max_index] if stop_early and not torch.jit.is_scripting() else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                inter.append(x)
        if intermediates_only:
            return inter
        return x, inter

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the head)."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[:max_index]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-32 feature map ``(N, num_features, H/32, W/32)``."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify (``pre_logits=True``: the pooled features)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def efficientrep_config(width_multiple: float, depth_multiple: float,
                        channels: Sequence[int] = (64, 128, 256, 512, 1024),
                        depths: Sequence[int] = (1, 6, 12, 18, 6)) -> dict[str, tuple[int, ...]]:
    """Scaled channels and depths, exactly as YOLOv6's ``build_network`` computes them.

    Example:
        >>> efficientrep_config(0.25, 0.33)
        {'channels': (16, 32, 64, 128, 256), 'depths': (1, 2, 4, 6, 2)}
        >>> efficientrep_config(0.75, 0.6)
        {'channels': (48, 96, 192, 384, 768), 'depths': (1, 4, 7, 11, 4)}
    """
    return {
        "channels": tuple(_make_divisible(c * width_multiple) for c in channels),
        "depths": tuple(max(round(n * depth_multiple), 1) if n > 1 else n for n in depths),
    }


# ---------------------------------------------------------------------------------------- official weights
_BLOCK_RENAMES = (
    (r"\.rbr_dense\.", ".conv_kxk."), (r"\.rbr_1x1\.", ".conv_1x1."), (r"\.rbr_identity\.", ".identity."),
    (r"\.rbr_reparam\.", ".reparam."), (r"\.block\.(conv|bn)\.", r".\1."),
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official YOLOv6 ``state_dict`` (whole detector or backbone only) to :class:`EfficientRep` keys.

    Neck and detection-head weights are dropped; ``head.*`` keeps the model's own classifier when the
    checkpoint has none. Checkpoints already in our key format pass through unchanged.
    """
    sd = dict(state_dict)
    if not any(k.startswith(("backbone.", "ERBlock_", "stem.rbr")) for k in sd):
        return sd
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        elif k.startswith(("neck.", "detect.")):
            continue
        if k.endswith("id_tensor"):
            continue
        m = re.match(r"ERBlock_(\d)\.(\d+)\.(.*)", k)
        if m:
            stage, idx, rest = int(m.group(1)) - 2, int(m.group(2)), m.group(3)
            if idx == 1:  # stage body: RepBlock (conv1, block.j) or BepC3 (cv*, m.conv1, m.block.j)
                rest = re.sub(r"^conv1\.", "0.", rest)
                rest = re.sub(r"^block\.(\d+)\.", lambda g: f"{int(g.group(1)) + 1}.", rest)
                rest = re.sub(r"^m\.conv1\.", "m.0.", rest)
                rest = re.sub(r"^m\.block\.(\d+)\.", lambda g: f"m.{int(g.group(1)) + 1}.", rest)
            elif idx == 2:  # SimSPPF / SimCSPSPPF wrappers
                rest = re.sub(r"^(sppf|cspsppf)\.", "", rest)
                rest = re.sub(r"^m\.", "pool.", rest)
            k = f"stages.{stage}.{idx}.{rest}"
        k = "." + k
        for pat, rep in _BLOCK_RENAMES:
            k = re.sub(pat, rep, k)
        out[k[1:]] = v
    own = model.state_dict()
    for k, v in own.items():  # classifier (absent from detectors) and BottleRep's non-learnable alpha
        if k not in out and (k.startswith("head.") or k.endswith("num_batches_tracked")):
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------- registry
def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientRep:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        EfficientRep, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv_kxk.conv", "classifier": "head.fc", "license": "gpl-3.0",
        "paper_ids": "arXiv:2301.05586", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "efficientrep_n": _cfg(),
    "efficientrep_s": _cfg(),
    "efficientrep_m": _cfg(),
    "test_efficientrep": _cfg(input_size=(3, 64, 64), test_input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def efficientrep_n(pretrained: bool = False, **kwargs: Any) -> EfficientRep:
    """YOLOv6-N (v3.0) backbone: width 0.25, depth 0.33, RepStack stages, SimCSPSPPF."""
    return _create("efficientrep_n", pretrained, **{**efficientrep_config(0.25, 0.33), "stage_block": "rep",
                                                    "sppf": "csp", **kwargs})


@register_model
def efficientrep_s(pretrained: bool = False, **kwargs: Any) -> EfficientRep:
    """YOLOv6-S (v3.0) backbone: width 0.50, depth 0.33, RepStack stages, SimCSPSPPF."""
    return _create("efficientrep_s", pretrained, **{**efficientrep_config(0.5, 0.33), "stage_block": "rep",
                                                    "sppf": "csp", **kwargs})


@register_model
def efficientrep_m(pretrained: bool = False, **kwargs: Any) -> EfficientRep:
    """YOLOv6-M (v3.0) backbone (CSPBep): width 0.75, depth 0.60, CSPStackRep stages (e = 2/3), SimSPPF."""
    return _create("efficientrep_m", pretrained, **{**efficientrep_config(0.75, 0.6), "stage_block": "csp",
                                                    "csp_e": 2 / 3, "sppf": "plain", **kwargs})


@register_model
def test_efficientrep(pretrained: bool = False, **kwargs: Any) -> EfficientRep:
    """Tiny RepStack variant for tests."""
    return _create("test_efficientrep", pretrained, **{"channels": (8, 16, 32, 48, 64), "depths": (1, 1, 1, 1, 1),
                                                       "stage_block": "rep", "sppf": "csp", **kwargs})

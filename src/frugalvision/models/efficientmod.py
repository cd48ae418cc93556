"""EfficientMod: efficient modulation networks (Ma et al., "Efficient Modulation for Vision Networks", ICLR 2024).

A four-stage hierarchical network (strides 4, 8, 16, 32). Every stage is a stack of *modulation blocks*: the
token mixer projects the input twice, once through a depth-wise convolution that gathers local context
(FC → DWConv → GELU → FC) and once through an expanding FC (the "value"); the two are multiplied
element-wise and projected back by a last FC. Stages 3 and 4 end with a few plain multi-head self-attention
blocks. All blocks work on channels-last ``(B, H, W, C)`` tensors, so every FC is a single GEMM.

Variants (ImageNet, 224²; FLOPs in multiply-accumulates, as in the paper):

======================  ========  =======
name                    params    MACs
======================  ========  =======
``efficientmod_xxs``    4.7 M     0.6 G
``efficientmod_xs``     6.6 M     0.8 G
``efficientmod_s``      12.9 M    1.4 G
======================  ========  =======

Official checkpoints load through :func:`checkpoint_filter_fn` (``create_model(name, weights=path)``);
:func:`to_official_state_dict` is its inverse. :class:`ModulationMixer` is the token mixer alone, for
``(B, C, H, W)`` tensors, to drop into other networks.

Example:
    >>> import timm, torch
    >>> m = timm.create_model("test_efficientmod", num_classes=3).eval()
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 3])
    >>> [f.shape[1] for f in m.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)]
    [16, 24, 32, 48]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

__all__ = [
    "Attention",
    "AttentionBlock",
    "EfficientMod",
    "Modulation",
    "ModulationBlock",
    "ModulationMixer",
    "checkpoint_filter_fn",
    "to_official_state_dict",
]

LayerType = Callable[..., nn.Module]


def _fold_scale(linear: nn.Linear, gamma: torch.Tensor) -> None:
    """``gamma * linear(x)`` → ``linear'(x)`` by scaling the output rows of the weight and the bias."""
    with torch.no_grad():
        linear.weight.mul_(gamma[:, None])
        if linear.bias is not None:
            linear.bias.mul_(gamma)


# --------------------------------------------------------------------------------------------- token mixers
class Modulation(nn.Module):
    """Efficient modulation on channels-last ``(B, H, W, C)`` tensors: FC → DWConv context ⊙ FC value → FC.

    ``context = FC(GELU(DWConv_k(FC(x))))`` has ``C`` channels; ``value = act(FC(x))`` has ``C * mlp_ratio``;
    the context modulates each of the ``mlp_ratio`` groups of ``C`` value channels (the official
    implementation's ``repeat``, done here by broadcasting), and a last FC maps back to ``C``. With
    ``mlp_ratio=1`` the value branch has no activation, as in the official code. Costs ``O(HWC²·r)``, linear
    in the number of tokens; the receptive field of one mixer is the ``kernel_size`` window.

    Args:
        dim: Channels ``C`` (input and output).
        mlp_ratio: Expansion of the value branch (integer >= 1).
        kernel_size: Odd kernel size of the depth-wise context convolution.
        act_layer: Activation of the context branch and (when ``mlp_ratio > 1``) of the value branch.
        bias: Bias of the value-branch FCs (the context FCs always have one).
        proj_drop: Dropout after the value activation.

    Example:
        >>> m = Modulation(8, mlp_ratio=4)
        >>> m(torch.randn(2, 5, 5, 8)).shape
        torch.Size([2, 5, 5, 8])
    """

    def __init__(self, dim: int, mlp_ratio: int = 1, kernel_size: int = 7, act_layer: LayerType = nn.GELU,
                 bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"Modulation: dim must be a positive integer, got {dim!r}")
        if int(mlp_ratio) != mlp_ratio or mlp_ratio < 1:
            raise ValueError(f"Modulation: mlp_ratio must be an integer >= 1 (the value branch has C * mlp_ratio "
                             f"channels), got {mlp_ratio!r}")
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Modulation: kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.dim, self.mlp_ratio, self.kernel_size = int(dim), int(mlp_ratio), int(kernel_size)
        hidden = self.dim * self.mlp_ratio
        self.ctx_in = nn.Linear(dim, dim)
        self.ctx_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.ctx_act = act_layer()
        self.ctx_out = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = act_layer() if self.mlp_ratio > 1 else nn.Identity()
        self.drop = nn.Dropout(proj_drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The context branch alone, ``(B, H, W, C) -> (B, H, W, C)``."""
        c = self.ctx_in(x).permute(0, 3, 1, 2)  # channels-last memory: the depth-wise conv runs in NHWC
        c = self.ctx_act(self.ctx_conv(c)).permute(0, 2, 3, 1)
        return self.ctx_out(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: expected a channels-last (B, H, W, {self.dim}) tensor, got "
                             f"shape {tuple(x.shape)}")
        return self._modulate(x)

    def _modulate(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context(x)
        v = self.drop(self.act(self.fc1(x)))
        if self.mlp_ratio > 1:
            v = (v.unflatten(-1, (self.mlp_ratio, self.dim)) * ctx.unsqueeze(-2)).flatten(-2)
        else:
            v = v * ctx
        return self.fc2(v)

    def extra_repr(self) -> str:
        """Shown in ``print(model)``."""
        return f"dim={self.dim}, mlp_ratio={self.mlp_ratio}, kernel_size={self.kernel_size}"


class ModulationMixer(Modulation):
    """Efficient modulation token mixer for ``(B, C, H, W)`` feature maps (a drop-in replacement for attention).

    The same computation and parameters as :class:`Modulation` (a state dict of one loads into the other),
    taking and returning channels-first maps: ``FC(act(FC_v(x)) ⊙ FC(GELU(DWConv_k(FC(x)))))``. Unlike
    self-attention it needs no token count fixed in advance and costs time linear in ``H * W``, so it can
    replace the attention of a ViT block once the tokens are laid out on their ``(H, W)`` grid. The output is a
    ``(B, C, H, W)`` tensor in channels-last memory format (no copy back).

    Args:
        dim: Channels ``C``.
        mlp_ratio: Expansion of the value branch (integer >= 1).
        kernel_size: Odd kernel size of the depth-wise context convolution.
        act_layer: Activation.
        bias: Bias of the value-branch FCs.
        proj_drop: Dropout after the value activation.

    Example:
        >>> mixer = ModulationMixer(16, mlp_ratio=2, kernel_size=3)
        >>> tokens = torch.randn(2, 49, 16)                      # (B, N, C) tokens of a 7x7 grid
        >>> grid = tokens.transpose(1, 2).reshape(2, 16, 7, 7)   # (B, C, H, W)
        >>> mixer(grid).shape
        torch.Size([2, 16, 7, 7])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"ModulationMixer: expected a (B, {self.dim}, H, W) tensor, got shape {tuple(x.shape)}")
        return self._modulate(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)`` tokens; head width ``max(C // num_heads, min_head_dim)``.

    The inner width ``num_heads * head_dim`` may exceed ``C`` (narrow stages keep 32-wide heads).

    Example:
        >>> Attention(64, num_heads=8, min_head_dim=16).qkv.out_features  # 8 heads of 16
        384
    """

    def __init__(self, dim: int, num_heads: int = 8, min_head_dim: int = 32, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"Attention: num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = max(dim // num_heads, min_head_dim)
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------------------------- blocks
class ModulationBlock(nn.Module):
    """Pre-norm residual block ``x + LayerScale(Modulation(LN(x)))`` on ``(B, H, W, C)``.

    :meth:`reparameterize` folds the layer scale into the mixer's last FC (exact; for inference).

    Example:
        >>> blk = ModulationBlock(8, mlp_ratio=2).eval()
        >>> x = torch.randn(1, 4, 4, 8)
        >>> ref = blk(x)
        >>> blk.reparameterize()
        >>> torch.allclose(blk(x), ref, atol=1e-6)
        True
    """

    def __init__(self, dim: int, mlp_ratio: int = 1, kernel_size: int = 7, act_layer: LayerType = nn.GELU,
                 norm_layer: LayerType = nn.LayerNorm, layer_scale_init: float | None = 1e-4, bias: bool = True,
                 proj_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mixer = Modulation(dim, mlp_ratio, kernel_size, act_layer, bias, proj_drop)
        self.ls = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return x + self.drop_path(self.ls(self.mixer._modulate(self.norm(x))))

    def reparameterize(self) -> None:
        """Fold the layer scale into ``mixer.fc2`` (inference only; removes one element-wise multiply)."""
        if isinstance(self.ls, LayerScale):
            _fold_scale(self.mixer.fc2, self.ls.gamma)
            self.ls = nn.Identity()


class AttentionBlock(nn.Module):
    """Pre-norm transformer block (attention + MLP) on ``(B, H, W, C)`` (tokens are the ``H * W`` positions).

    Example:
        >>> AttentionBlock(32, num_heads=4, min_head_dim=8)(torch.randn(2, 3, 3, 32)).shape
        torch.Size([2, 3, 3, 32])
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, num_heads: int = 8, min_head_dim: int = 32,
                 qkv_bias: bool = False, act_layer: LayerType = nn.GELU, norm_layer: LayerType = nn.LayerNorm,
                 layer_scale_init: float | None = None, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, min_head_dim, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)

    def reparameterize(self) -> None:
        """Fold the layer scales (when present) into ``attn.proj`` and ``mlp.fc2``."""
        if isinstance(self.ls1, LayerScale):
            _fold_scale(self.attn.proj, self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale):
            _fold_scale(self.mlp.fc2, self.ls2.gamma)
            self.ls2 = nn.Identity()


class ConvEmbed(nn.Module):
    """Strided convolution + LayerNorm, with a channels-last ``(B, H', W', C')`` output.

    The stem takes the ``(B, C, H, W)`` image; the downsampling between stages takes ``(B, H, W, C)``.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int,
                 norm_layer: LayerType = nn.LayerNorm, channels_last_input: bool = True) -> None:
        super().__init__()
        self.channels_last_input = channels_last_input
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding)
        self.norm = norm_layer(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class EfficientModStage(nn.Module):
    """Optional downsampling, then modulation blocks, then attention blocks (all channels-last)."""

    def __init__(self, in_dim: int, dim: int, mlp_ratios: Sequence[int], attn_depth: int, attn_mlp_ratio: float,
                 downsample: bool, drop_path: Sequence[float], kernel_size: int, num_heads: int, min_head_dim: int,
                 layer_scale_init: float | None, act_layer: LayerType, norm_layer: LayerType,
                 proj_drop: float) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvEmbed(in_dim, dim, 3, 2, 1, norm_layer) if downsample else nn.Identity()
        depth = len(mlp_ratios)
        blocks: list[nn.Module] = [
            ModulationBlock(dim, r, kernel_size, act_layer, norm_layer, layer_scale_init, proj_drop=proj_drop,
                            drop_path=drop_path[i])
            for i, r in enumerate(mlp_ratios)
        ]
        blocks += [
            AttentionBlock(dim, attn_mlp_ratio, num_heads, min_head_dim, act_layer=act_layer, norm_layer=norm_layer,
                           proj_drop=proj_drop, drop_path=drop_path[depth + j])
            for j in range(attn_depth)
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# --------------------------------------------------------------------------------------------- network
def _per_stage(value: Any, n: int, what: str) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"EfficientMod: {what} needs one entry per stage ({n}), got {len(value)}: {value!r}")
        return tuple(value)
    return (value,) * n


class EfficientMod(nn.Module):
    """EfficientMod backbone + classifier.

    The timm interface: ``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier`` and ``features_only=True`` through ``timm.create_model``.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0: no classifier; ``forward`` returns pooled features).
        global_pool: ``"avg"`` or ``""`` (no pooling in ``forward_head``).
        embed_dims: Channels of the four stages.
        depths: Modulation blocks per stage.
        attn_depths: Attention blocks appended to each stage.
        mlp_ratios: Value-branch expansion of the modulation blocks: an int per stage, or one sequence per stage
            with an entry per block (the official variants alternate 1 and r).
        attn_mlp_ratios: MLP expansion of the attention blocks, per stage.
        kernel_size: Depth-wise context kernel size.
        num_heads: Attention heads.
        min_head_dim: Minimum attention head width.
        layer_scale_init: Initial layer scale of the modulation blocks (None: no layer scale).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout inside the blocks.
        drop_path_rate: Stochastic depth, linearly increasing over all blocks.
        act_layer: Activation.
        norm_layer: Channels-last normalisation layer.

    Raises:
        ValueError: For inconsistent stage configurations, and at run time for inputs with the wrong channel
            count or a size not divisible by the network's total stride (32).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (2, 2, 6, 2),
        attn_depths: Sequence[int] = (0, 0, 1, 2),
        mlp_ratios: int | Sequence[int | Sequence[int]] = 4,
        attn_mlp_ratios: float | Sequence[float] = 4.0,
        kernel_size: int = 7,
        num_heads: int = 8,
        min_head_dim: int = 32,
        layer_scale_init: float | None = 1e-4,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: LayerType = nn.GELU,
        norm_layer: LayerType = nn.LayerNorm,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"EfficientMod: unknown arguments {sorted(kwargs)}")
        n = len(embed_dims)
        if n < 1 or len(depths) != n:
            raise ValueError(f"EfficientMod: embed_dims ({len(embed_dims)}) and depths ({len(depths)}) need one "
                             "entry per stage each")
        if any(int(d) != d or d < 1 for d in embed_dims):
            raise ValueError(f"EfficientMod: embed_dims must be positive integers, got {tuple(embed_dims)}")
        if any(d < 0 for d in depths) or any(d < 0 for d in _per_stage(attn_depths, n, "attn_depths")):
            raise ValueError("EfficientMod: depths and attn_depths must be >= 0")
        if in_chans < 1:
            raise ValueError(f"EfficientMod: in_chans must be >= 1, got {in_chans}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"EfficientMod: global_pool must be 'avg' or '', got {global_pool!r}")
        attn_depths = _per_stage(attn_depths, n, "attn_depths")
        attn_mlp_ratios = _per_stage(attn_mlp_ratios, n, "attn_mlp_ratios")
        per_block: list[tuple[int, ...]] = []
        for i, r in enumerate(_per_stage(mlp_ratios, n, "mlp_ratios")):
            rs = tuple(r) if isinstance(r, (list, tuple)) else (r,) * depths[i]
            if len(rs) != depths[i]:
                raise ValueError(f"EfficientMod: stage {i} has depth {depths[i]} but {len(rs)} mlp_ratios {rs}")
            per_block.append(rs)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = ConvEmbed(in_chans, self.embed_dims[0], 7, 4, 3, norm_layer, channels_last_input=False)
        total = sum(depths) + sum(attn_depths)
        dpr = [drop_path_rate * i / (total - 1) for i in range(total)] if total > 1 else [0.0] * total
        stages, start, prev = [], 0, self.embed_dims[0]
        self.feature_info: list[dict[str, Any]] = []
        for i, dim in enumerate(self.embed_dims):
            count = depths[i] + attn_depths[i]
            stages.append(EfficientModStage(
                prev, dim, per_block[i], attn_depths[i], attn_mlp_ratios[i], downsample=i > 0,
                drop_path=dpr[start:start + count], kernel_size=kernel_size, num_heads=num_heads,
                min_head_dim=min_head_dim, layer_scale_init=layer_scale_init, act_layer=act_layer,
                norm_layer=norm_layer, proj_drop=proj_drop_rate,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            start, prev = start + count, dim
        self.stages = nn.Sequential(*stages)
        self.reduction = 4 * 2 ** (n - 1)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official model: truncated-normal FC weights, zero FC biases; convolutions keep PyTorch's init.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Layer scales are not decayed."""
        return {n for n, _ in self.named_parameters() if n.endswith(".gamma")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: none) and optionally the pooling (``"avg"`` or ``""``)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"EfficientMod: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_fused_attn(self, enable: bool = True) -> None:
        """Use ``F.scaled_dot_product_attention`` (fast) or the explicit softmax(QKᵀ)V (countable by FLOP counters)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = enable

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"EfficientMod expects a (B, C, H, W) image batch, got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"EfficientMod was built for {self.in_chans} input channels but got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)}); convert the images or build the model with "
                             f"in_chans={x.shape[1]}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        r = self.reduction
        if h % r or w % r:
            fix = f"{-(-h // r) * r}x{-(-w // r) * r}"
            raise ValueError(f"EfficientMod needs an input size divisible by its total stride {r}, got {h}x{w}; "
                             f"resize or pad the images (e.g. to {fix})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` → normalised last-stage map ``(B, num_features, H/32, W/32)``."""
        self._check_input(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, h, w)`` map → logits (or pooled features with ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch ``(B, C, H, W)`` → logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) for dense heads, and optionally the final features.

        Args:
            x: Image batch ``(B, C, H, W)``.
            indices: Last ``n`` stages if an int, all if None, else the stage indices to return.
            norm: Apply the final norm to the last stage's output.
            stop_early: Stop after the last requested stage (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` or ``"NHWC"`` (the blocks' native layout, no transpose).
            intermediates_only: Return only the list of stage outputs.

        Returns:
            ``(final_features, [stage outputs])`` or just the list.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"EfficientMod: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if (stop_early and intermediates_only) else self.stages
        x = self.stem(x)
        out: list[torch.Tensor] = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if (norm and i == last) else x
                out.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        return self.norm(x).permute(0, 3, 1, 2), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) not needed to produce the stage outputs ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        self.reduction = self.feature_info[max_index]["reduction"]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


# --------------------------------------------------------------------------------------------- checkpoints
_OFFICIAL_BLOCK = {  # official name inside a modulation block -> ours
    "gamma_1": "ls.gamma",
    "mlp.context_layer.f.": "mixer.ctx_in.",
    "mlp.context_layer.g.": "mixer.ctx_out.",
    "mlp.context_layer.context_list.0.": "mixer.ctx_conv.",
    "mlp.fc1.": "mixer.fc1.",
    "mlp.fc2.": "mixer.fc2.",
}
_OUR_BLOCK = {v: k for k, v in _OFFICIAL_BLOCK.items()}


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            return _unwrap(inner)
    return state_dict


def _rename_block(rest: str, table: Mapping[str, str]) -> str:
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
                         ) -> dict[str, torch.Tensor]:
    """Map an official EfficientMod state dict (``ma-xu/EfficientMod`` names) onto this implementation's names.

    Accepts the bare state dict or a training checkpoint holding it (``model``/``state_dict``/``*_ema``),
    with or without a ``module.`` prefix; a state dict already in our naming passes through. Official
    ``layers.{i}.downsample`` (end of stage ``i``) becomes ``stages.{i+1}.downsample`` (start of the next).

    Args:
        state_dict: The official (or our) state dict.
        model: Unused; timm's filter signature.

    Returns:
        A state dict for :class:`EfficientMod`.

    Raises:
        ValueError: For keys this architecture has no place for (e.g. multi-kernel context layers).

    Example:
        >>> sd = {"patch_embed.proj.weight": torch.zeros(1), "layers.0.downsample.norm.bias": torch.zeros(1),
        ...       "layers.1.blocks.0.mlp.context_layer.f.weight": torch.zeros(1)}
        >>> sorted(checkpoint_filter_fn(sd))
        ['stages.1.blocks.0.mixer.ctx_in.weight', 'stages.1.downsample.norm.bias', 'stem.proj.weight']
    """
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in _unwrap(state_dict).items()}
    if any(k.startswith(("stem.", "stages.")) for k in sd):
        return dict(sd)
    attention_blocks = {m.group(1, 2) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("patch_embed."):
            new = "stem." + key[len("patch_embed."):]
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.*)", key):
            new = f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            i, j, rest = m.groups()
            if re.match(r"mlp\.context_layer\.context_list\.[1-9]", rest):
                raise ValueError(f"checkpoint key {key!r}: several context kernels per block are not supported by "
                                 "this EfficientMod (the published variants use one 7x7 kernel)")
            if (i, j) not in attention_blocks:
                rest = _rename_block(rest, _OFFICIAL_BLOCK)
            new = f"stages.{i}.blocks.{j}.{rest}"
        elif key.startswith(("norm.", "head.")):
            new = key
        elif key.startswith("dist_head.") or key == "dist_token":
            continue  # distillation heads of training checkpoints
        else:
            raise ValueError(f"checkpoint key {key!r} is not part of an official EfficientMod state dict")
        out[new] = value
    return out


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`checkpoint_filter_fn`: our names → the official ``ma-xu/EfficientMod`` names.

    Example:
        >>> import timm
        >>> sd = timm.create_model("test_efficientmod").state_dict()
        >>> list(checkpoint_filter_fn(to_official_state_dict(sd))) == list(sd)
        True
    """
    attention_blocks = {m.group(1, 2) for k in state_dict
                        if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.attn\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            new = "patch_embed." + key[len("stem."):]
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
            new = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            i, j, rest = m.groups()
            if (i, j) not in attention_blocks:
                rest = _rename_block(rest, _OUR_BLOCK)
            new = f"layers.{i}.blocks.{j}.{rest}"
        elif key.startswith(("norm.", "head.")):
            new = key
        else:
            raise ValueError(f"state dict key {key!r} is not an EfficientMod parameter")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------- registry
def _alternating(r: int, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The official ratio pattern: blocks alternate a plain (ratio 1) and an expanded (ratio ``r``) modulation."""
    return tuple(tuple(1 if j % 2 == 0 else r for j in range(d)) for d in depths)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2403.19963", "paper_name": "Efficient Modulation for Vision Networks",
        "origin_url": "https://github.com/ma-xu/EfficientMod", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "efficientmod_xxs": _cfg(),
    "efficientmod_xs": _cfg(),
    "efficientmod_s": _cfg(),
    "test_efficientmod": _cfg(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 64, 64)),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        EfficientMod, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def efficientmod_xxs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xxs: 4.7 M params, 0.6 G MACs at 224²."""
    depths = (2, 2, 6, 2)
    args = dict(embed_dims=(32, 64, 128, 256), depths=depths, attn_depths=(0, 0, 1, 2),
                mlp_ratios=_alternating(6, depths), attn_mlp_ratios=4.0)
    return _create("efficientmod_xxs", pretrained, **dict(args, **kwargs))


@register_model
def efficientmod_xs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xs: 6.6 M params, 0.8 G MACs at 224²."""
    depths = (3, 3, 4, 2)
    args = dict(embed_dims=(32, 64, 144, 288), depths=depths, attn_depths=(0, 0, 3, 3),
                mlp_ratios=_alternating(4, depths), attn_mlp_ratios=4.0)
    return _create("efficientmod_xs", pretrained, **dict(args, **kwargs))


@register_model
def efficientmod_s(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-s: 12.9 M params, 1.4 G MACs at 224² (stochastic depth 0.02 by default, as trained)."""
    depths = (4, 4, 8, 4)
    args = dict(embed_dims=(32, 64, 144, 312), depths=depths, attn_depths=(0, 0, 4, 4),
                mlp_ratios=_alternating(6, depths), attn_mlp_ratios=(4.0, 4.0, 4.0, 5.0), drop_path_rate=0.02)
    return _create("efficientmod_s", pretrained, **dict(args, **kwargs))


@register_model
def test_efficientmod(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """Tiny EfficientMod for tests: every block kind (ratio-1 and expanded modulation, wide-head attention)."""
    depths = (2, 1, 1, 1)
    args = dict(embed_dims=(16, 24, 32, 48), depths=depths, attn_depths=(0, 0, 1, 1),
                mlp_ratios=((1, 3), (2,), (1,), (2,)), attn_mlp_ratios=2.0, kernel_size=3, num_heads=2,
                min_head_dim=20)
    return _create("test_efficientmod", pretrained, **dict(args, **kwargs))

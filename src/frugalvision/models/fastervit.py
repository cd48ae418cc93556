"""FasterViT: conv stages, then hierarchical attention (HAT) with carrier tokens (Hatamizadeh et al., ICLR 2024).

Stages 1-2 are residual conv blocks; stages 3-4 are windowed transformer blocks. Where a stage has more than one
window (and HAT is enabled for it), a small grid of *carrier tokens* summarises each window: the carrier tokens of
all windows first attend to each other (global, cheap: a few tokens per window), then each window attends over its
own tokens plus its carrier tokens, so information flows across windows at a cost linear in the number of windows.

Numerics follow the reference implementation exactly (the log-spaced continuous relative-position bias, the MLP
token position embeddings, layer scale, carrier-token pooling and propagation), so its checkpoints load through
:func:`checkpoint_filter_fn`. The inference path is lean: :meth:`reparameterize` (called by
``timm.utils.reparameterize_model``) folds every conv+BN pair and the layer-scale factors into the preceding
weights and caches the position terms; attention runs through ``scaled_dot_product_attention``; carrier tokens stay
in window order between blocks (the position terms are permuted once instead of the tokens every block).

The ``*_any_res`` variants (``any_res=True``) follow the reference's any-resolution model: rectangular inputs of any
size it can run, each transformer stage zero-padded to whole windows and cropped back, non-square window and
carrier-token grids with that model's numerics.

Example:
    >>> import timm, torch, frugalvision
    >>> m = timm.create_model("test_fastervit").eval()
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    >>> timm.create_model("test_fastervit_any_res", img_size=(80, 144)).eval()(torch.randn(1, 3, 80, 144)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..errors import ConfigError
from ..weights import load_weights

__all__ = ["FasterViT", "checkpoint_filter_fn", "load_official_checkpoint"]


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise")


def _onednn_ok(x: Tensor) -> bool:
    """Whether the fused CPU kernels (GEMM/conv with bias, activation and residual add in one pass) may run.

    Only for plain float32 CPU tensors outside autograd, autocast, tracing and export; everything else takes the
    generic path (same numerics up to float rounding). Under CPU autocast the generic path runs the GEMMs in the
    autocast dtype (bf16), which these fp32 kernels cannot take.
    """
    return (_ONEDNN and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())


def _cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for ints."""
    return -(-n // d)


def _linear(x: Tensor, layer: nn.Linear, act: str = "none", residual: Tensor | None = None) -> Tensor:
    """``act(layer(x))`` or ``residual + layer(x)`` as one oneDNN call (``x``, ``residual``: ``(..., C)``)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if residual is not None:
        out = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(x2.shape[0], -1), layer.weight,
                                                        layer.bias, "add")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x2, layer.weight, layer.bias, act, [], "none" if act == "gelu"
                                                 else "")
    return out.view(*shape[:-1], out.shape[-1])


def _conv(x: Tensor, conv: nn.Conv2d, act: str = "none", residual: Tensor | None = None) -> Tensor:
    """``act(conv(x))`` or ``residual + conv(x)`` as one oneDNN call (channels-last)."""
    args = (conv.padding, conv.stride, conv.dilation, conv.groups)
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, conv.weight, conv.bias, *args, "add",
                                                              None, None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args, act, [],
                                                   "none" if act == "gelu" else "")


# --------------------------------------------------------------------------------------------- position terms
def _window_order(grid: int | tuple[int, int], ct_size: int) -> Tensor:
    """Raster index of each carrier token when tokens are stored window by window.

    A ``grid x grid`` (or ``(rows, cols)``) carrier-token map is split into ``ct_size x ct_size`` windows; token
    ``t`` in window order (window row, window col, row in window, col in window) sits at raster position ``perm[t]``.

    Example:
        >>> _window_order((2, 4), 2).tolist()
        [0, 1, 4, 5, 2, 3, 6, 7]
    """
    g0, g1 = (grid, grid) if isinstance(grid, int) else grid
    idx = torch.arange(g0 * g1).view(g0 // ct_size, ct_size, g1 // ct_size, ct_size).permute(0, 2, 1, 3)
    return idx.reshape(-1)


def _rewindow_shuffle(sr: tuple[int, int], ct_size: int) -> Tensor | None:
    """Carrier-token reordering of the reference's any-resolution HAT blocks on a non-square window grid.

    After the global carrier attention, the reference puts the (raster-ordered) carrier tokens back into windows
    with the two window-grid sides swapped (rows ``sr[1]``, columns ``sr[0]``), so for ``sr[0] != sr[1]`` window
    ``w`` receives tokens from other windows' areas, and the next block reads them back as if they were in place.
    With tokens stored in window order, that is one gather: stored token ``p`` takes stored token ``shuffle[p]``.
    ``None`` when nothing moves (a square grid, or one carrier token per window).
    """
    s0, s1 = sr
    if s0 == s1:
        return None
    c = ct_size
    with torch.device("cpu"):  # (index arithmetic, also when the model is built on another device)
        back = torch.arange(s0 * s1 * c * c).view(s1, c, s0, c).permute(0, 2, 1, 3).reshape(-1)  # raster index
        shuffle = torch.argsort(_window_order((s0 * c, s1 * c), c))[back]
        if torch.equal(shuffle, torch.arange(len(shuffle))):  # (ct_size 1: everything stays in place)
            return None
    return shuffle.to(torch.empty(0).device)


class TokenPosEmbed(nn.Module):
    """Position embedding of a square token grid produced by an MLP on normalised coordinates; added to tokens.

    Coordinates are ``(i - s // 2) / (s // 2)`` for row and column of an ``s x s`` grid.

    Args:
        dim: Token channels.
        grid: Side of the token grid.
        order: Optional raster index of each stored token (tokens kept in a different order than raster).
    """

    def __init__(self, dim: int, grid: int, order: Tensor | None = None) -> None:
        super().__init__()
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(), nn.Linear(512, dim, bias=False))
        ar = torch.arange(grid, dtype=torch.float32)
        hh, ww = torch.meshgrid(ar, ar, indexing="ij")
        coords = (torch.stack([hh, ww], -1).view(-1, 2) - grid // 2) / (grid // 2)
        if order is not None:
            coords = coords[order]
        self.register_buffer("coords", coords.unsqueeze(0), persistent=False)
        self.register_buffer("fused", None, persistent=False)

    def embedding(self) -> Tensor:
        """The ``(1, tokens, dim)`` embedding."""
        return self.fused if self.fused is not None else self.cpb_mlp(self.coords)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.embedding()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Cache the embedding (inference)."""
        self.fused = self.cpb_mlp(self.coords).detach()


class RelPosBias(nn.Module):
    """Continuous relative-position attention bias of a ``window x window`` token grid (log-spaced coordinates).

    The bias is ``16 * sigmoid(mlp(log-coords))`` gathered per token pair; ``extra`` leading tokens (carrier tokens
    prepended to a window) get zero bias.

    Args:
        window: Side of the token grid.
        num_heads: Attention heads (one bias map each).
        extra: Number of extra tokens in front of the grid tokens.
        order: Optional raster index of each stored token.
    """

    def __init__(self, window: int, num_heads: int, extra: int = 0, order: Tensor | None = None) -> None:
        super().__init__()
        self.extra = extra
        self.num_heads = num_heads
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        rel = torch.arange(-(window - 1), window, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(rel, rel, indexing="ij"), -1) / (window - 1) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        self.register_buffer("table", table.view(-1, 2), persistent=False)
        ar = torch.arange(window)
        pos = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).flatten(1)  # 2, N
        d = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0) + (window - 1)
        index = d[..., 0] * (2 * window - 1) + d[..., 1]
        if order is not None and not extra:
            index = index[order][:, order]
        self.register_buffer("index", index.reshape(-1), persistent=False)
        # an order over extra + grid tokens (the reference's carrier attention on a non-square grid) permutes the
        # padded bias instead
        self.register_buffer("perm", order if order is not None and extra else None, persistent=False)
        self.n = window * window
        self.register_buffer("fused", None, persistent=False)

    def bias(self) -> Tensor:
        """The ``(1, heads, extra + N, extra + N)`` additive attention bias."""
        if self.fused is not None:
            return self.fused
        b = self.cpb_mlp(self.table)[self.index].view(self.n, self.n, self.num_heads).permute(2, 0, 1)
        b = 16 * torch.sigmoid(b)
        if self.extra:
            b = F.pad(b, (self.extra, 0, self.extra, 0))
        if self.perm is not None:
            b = b[:, self.perm][:, :, self.perm]
        return b.unsqueeze(0)

    def forward(self) -> Tensor:
        return self.bias()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Cache the bias (inference)."""
        self.fused = self.bias().detach().contiguous()


# --------------------------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Multi-head self-attention with a relative-position bias, through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, window: int, extra: int = 0, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 order: Tensor | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos = RelPosBias(window, num_heads, extra, order)

    def attend(self, x: Tensor, fast: bool = False) -> Tensor:
        """Attention before the output projection: ``(B, N, C)``."""
        B, N, C = x.shape
        qkv = _linear(x, self.qkv) if fast else self.qkv(x)
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos(), scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return x.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_drop(self.proj(self.attend(x)))


def _is_scale(value: Any) -> bool:
    """Layer scale is on for a number (``None`` / ``False`` switch it off, as ``create_model`` drops ``None``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fold_scale(linear: nn.Linear, gamma: Tensor) -> None:
    """``gamma * linear(x)`` == ``linear'(x)``: scale the output rows."""
    with torch.no_grad():
        linear.weight.mul_(gamma[:, None])
        if linear.bias is not None:
            linear.bias.mul_(gamma)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, gamma: Tensor | None = None) -> nn.Conv2d:
    """A conv with bias computing ``gamma * bn(conv(x))`` (eval-mode BN)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    w, b = conv.weight * scale.view(-1, 1, 1, 1), b * scale + shift
    if gamma is not None:
        w, b = w * gamma.view(-1, 1, 1, 1), b * gamma
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        fused.bias.copy_(b)
    return fused


class Stem(nn.Module):
    """Two stride-2 3x3 conv + BN + ReLU layers (stride 4); checks the input's channels and size."""

    def __init__(self, in_chans: int, in_dim: int, dim: int, img_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.conv1 = nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(in_dim, eps=1e-4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-4)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"FasterViT expects input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != self.img_size:
            h, w = self.img_size
            size = x.shape[-1] if x.shape[-2] == x.shape[-1] else (x.shape[-2], x.shape[-1])
            raise ValueError(f"this FasterViT was built for {h}x{w} inputs (its windows and carrier tokens depend on "
                             f"the resolution), got {x.shape[-2]}x{x.shape[-1]}; build it with img_size={size} or "
                             f"resize the input")
        if isinstance(self.norm1, nn.Identity) and _onednn_ok(x):  # fused inference: channels-last, conv+ReLU
            x = x.contiguous(memory_format=torch.channels_last)
            return _conv(_conv(x, self.conv1, "relu"), self.conv2, "relu")
        return self.act2(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))))

    def reparameterize(self) -> None:
        """Fold both BNs into their convs."""
        if isinstance(self.norm1, nn.Identity):
            return
        self.conv1 = _fold_bn(self.conv1, self.norm1).to(memory_format=torch.channels_last)
        self.conv2 = _fold_bn(self.conv2, self.norm2).to(memory_format=torch.channels_last)
        self.norm1, self.norm2 = nn.Identity(), nn.Identity()


class ConvBlock(nn.Module):
    """Residual ``conv3x3-BN-GELU-conv3x3-BN`` block with optional layer scale."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if _is_scale(layer_scale) else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm1, nn.Identity) and _onednn_ok(x):  # fused inference: conv+GELU, conv+residual
            x = x.contiguous(memory_format=torch.channels_last)
            return _conv(_conv(x, self.conv1, "gelu"), self.conv2, residual=x)
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    def reparameterize(self) -> None:
        """Fold BNs (and the layer scale) into the convs."""
        if isinstance(self.norm1, nn.Identity):
            return
        self.conv1 = _fold_bn(self.conv1, self.norm1).to(memory_format=torch.channels_last)
        self.conv2 = _fold_bn(self.conv2, self.norm2, self.gamma).to(memory_format=torch.channels_last)
        self.norm1, self.norm2, self.gamma = nn.Identity(), nn.Identity(), None


class Downsample(nn.Module):
    """LayerNorm over channels, then a stride-2 3x3 conv."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))


class CarrierInit(nn.Module):
    """Initial carrier tokens: depth-wise conv, then average pooling to ``ct_size x ct_size`` tokens per window.

    ``resolution``: the (padded) stage map, a whole number of windows per side (an int or ``(H, W)``; the pooling
    kernel and stride are per axis). Returns tokens ``(B, windows * ct_size**2, C)`` stored window by window.
    """

    def __init__(self, dim: int, resolution: int | tuple[int, int], window: int, ct_size: int) -> None:
        super().__init__()
        kernel, stride = [], []
        for r in (resolution, resolution) if isinstance(resolution, int) else resolution:
            out = int(ct_size * r / window)
            stride.append(int(r / out))
            kernel.append(r - (out - 1) * stride[-1])
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pool = nn.AvgPool2d(kernel_size=tuple(kernel), stride=tuple(stride))
        self.ct_size = ct_size

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv(x))
        B, C, H, W = x.shape
        s = self.ct_size
        return x.view(B, C, H // s, s, W // s, s).permute(0, 2, 4, 3, 5, 1).reshape(B, H * W, C)


class HATBlock(nn.Module):
    """Transformer block over window tokens; with more than one window also the carrier-token (HAT) path.

    Args:
        dim: Channels.
        num_heads: Attention heads.
        window: Window side.
        sr_ratio: Windows per side of the stage, an int or ``(rows, cols)`` (carrier tokens only when there is more
            than one window). A non-square window grid follows the reference's any-resolution model: no carrier
            position embedding, the carrier attention bias of an ``isqrt(tokens)``-sided grid (zero for the
            remaining leading tokens), and its re-windowing of the carrier tokens.
        ct_size: Carrier tokens per window side.
        last: Last block of its stage (carrier tokens may be propagated back into the windows).
        do_propagation: Add the upsampled carrier tokens to the window tokens after the last block.
    """

    def __init__(self, dim: int, num_heads: int, window: int, sr_ratio: int | tuple[int, int] = 1, ct_size: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 last: bool = False, do_propagation: bool = False) -> None:
        super().__init__()
        sr = (sr_ratio, sr_ratio) if isinstance(sr_ratio, int) else tuple(sr_ratio)
        self.window, self.sr_ratio, self.ct_size = window, sr, ct_size
        self.hat = hat = sr[0] > 1 or sr[1] > 1
        self.ct_per_window = ct_size**2 if hat else 0
        hidden = int(dim * mlp_ratio)
        use_ls = _is_scale(layer_scale)

        def gamma() -> nn.Parameter | None:
            return nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None

        self.pos_embed = TokenPosEmbed(dim, window)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, window, self.ct_per_window, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU, drop=drop)
        self.gamma3, self.gamma4 = gamma(), gamma()
        self.propagate = bool(hat and last and do_propagation)
        self.hat_pos_embed: TokenPosEmbed | None = None
        if hat:
            grid = (ct_size * sr[0], ct_size * sr[1])
            order = _window_order(grid, ct_size)
            tokens = grid[0] * grid[1]
            side = int(tokens**0.5)  # the bias grid (the whole carrier grid when it is square)
            self.hat_norm1 = nn.LayerNorm(dim)
            self.hat_norm2 = nn.LayerNorm(dim)
            self.hat_attn = Attention(dim, num_heads, side, tokens - side * side, qkv_bias, qk_scale, attn_drop, drop,
                                      order=order)
            self.hat_mlp = Mlp(dim, hidden, act_layer=nn.GELU, drop=drop)
            self.hat_drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
            if sr[0] == sr[1]:
                self.hat_pos_embed = TokenPosEmbed(dim, grid[0], order)
            self.register_buffer("ct_shuffle", _rewindow_shuffle(sr, ct_size), persistent=False)
            self.gamma1, self.gamma2 = gamma(), gamma()
            if self.propagate:  # nearest-neighbour upsampling of each window's carrier tokens, as a gather
                src = torch.arange(self.ct_per_window, dtype=torch.float32).view(1, 1, ct_size, ct_size)
                up = F.interpolate(src, size=window, mode="nearest").long().view(-1)
                self.register_buffer("up_index", up, persistent=False)
        self.fused = False

    def forward(self, x: Tensor, ct: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.fused and _onednn_ok(x):
            return self._forward_fused(x, ct)
        x = self.pos_embed(x)
        if self.hat:
            if ct is None:
                raise ValueError("a HAT block with several windows needs carrier tokens")
            if self.hat_pos_embed is not None:
                ct = self.hat_pos_embed(ct)
            a = self.hat_attn(self.hat_norm1(ct))
            ct = ct + self.hat_drop_path(a if self.gamma1 is None or self.fused else self.gamma1 * a)
            m = self.hat_mlp(self.hat_norm2(ct))
            ct = ct + self.hat_drop_path(m if self.gamma2 is None else self.gamma2 * m)
            if self.ct_shuffle is not None:
                ct = ct.index_select(1, self.ct_shuffle)
            x = torch.cat((ct.reshape(x.shape[0], self.ct_per_window, -1), x), dim=1)
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.gamma3 is None else self.gamma3 * a)
        m = self.mlp(self.norm2(x))
        x = x + self.drop_path(m if self.gamma4 is None else self.gamma4 * m)
        return self._split_carriers(x, ct)

    def _split_carriers(self, x: Tensor, ct: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Split the carrier tokens off the window tokens again; with propagation, add them back to their windows."""
        if self.hat:
            ctr, x = x.split([self.ct_per_window, self.window * self.window], dim=1)
            ct = ctr.reshape(ct.shape)
            if self.propagate:
                up = ctr.index_select(1, self.up_index)
                x = x + (up if self.gamma1 is None else self.gamma1 * up)
        return x, ct

    def _forward_fused(self, x: Tensor, ct: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Inference after :meth:`reparameterize`: layer scales folded, GEMM epilogues fuse bias, GELU, residual."""
        x = self.pos_embed(x)
        if self.hat:
            if self.hat_pos_embed is not None:
                ct = self.hat_pos_embed(ct)
            ct = _linear(self.hat_attn.attend(self.hat_norm1(ct), fast=True), self.hat_attn.proj, residual=ct)
            ct = _linear(_linear(self.hat_norm2(ct), self.hat_mlp.fc1, "gelu"), self.hat_mlp.fc2, residual=ct)
            if self.ct_shuffle is not None:
                ct = ct.index_select(1, self.ct_shuffle)
            x = torch.cat((ct.reshape(x.shape[0], self.ct_per_window, -1), x), dim=1)
        x = _linear(self.attn.attend(self.norm1(x), fast=True), self.attn.proj, residual=x)
        x = _linear(_linear(self.norm2(x), self.mlp.fc1, "gelu"), self.mlp.fc2, residual=x)
        return self._split_carriers(x, ct)

    def reparameterize(self) -> None:
        """Fold the layer-scale factors into the output projections (``gamma1`` stays for propagation)."""
        if self.fused:
            return
        if self.gamma3 is not None:
            _fold_scale(self.attn.proj, self.gamma3)
            _fold_scale(self.mlp.fc2, self.gamma4)
            self.gamma3 = self.gamma4 = None
        if self.hat and self.gamma1 is not None:
            _fold_scale(self.hat_attn.proj, self.gamma1)
            _fold_scale(self.hat_mlp.fc2, self.gamma2)
            self.gamma2 = None
        self.fused = True


class FasterViTStage(nn.Module):
    """One stage: optional downsampling, then conv blocks or (HAT) transformer blocks over windows.

    ``resolution`` is the stage map, an int or ``(H, W)``. A transformer stage whose map is not a whole number of
    windows zero-pads it at the bottom/right (carrier tokens are pooled from the padded map, padded tokens take part
    in attention, as in the reference's any-resolution model) and crops the output back. ``unused_carrier``: keep
    the carrier-token conv of a single-window HAT stage although no block reads it (the reference's any-resolution
    parameter layout).
    """

    def __init__(self, dim: int, depth: int, resolution: int | tuple[int, int], num_heads: int, window: int,
                 ct_size: int, conv: bool, in_dim: int | None, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, attn_drop: float, drop_path: Sequence[float],
                 layer_scale: float | None, layer_scale_conv: float | None, only_local: bool, do_propagation: bool,
                 unused_carrier: bool = False) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else nn.Identity()
        self.conv = conv
        self.window = window
        if conv:
            self.blocks = nn.Sequential(*[ConvBlock(dim, drop_path[i], layer_scale_conv) for i in range(depth)])
            self.carrier = None
            return
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        padded = (_cdiv(h, window) * window, _cdiv(w, window) * window)
        sr = (1, 1) if only_local else (padded[0] // window, padded[1] // window)
        self.blocks = nn.Sequential(*[
            HATBlock(dim, num_heads, window, sr, ct_size, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                     drop_path[i], layer_scale, last=i == depth - 1, do_propagation=do_propagation)
            for i in range(depth)
        ])
        hat = sr[0] > 1 or sr[1] > 1
        self.carrier = (CarrierInit(dim, padded, window, ct_size)
                        if depth and not only_local and (hat or unused_carrier) else None)
        self.use_carrier = self.carrier is not None and hat

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.conv:
            return self.blocks(x)
        B, C, H, W = x.shape
        ws = self.window
        pad_b, pad_r = -H % ws, -W % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        ct = self.carrier(x) if self.use_carrier else None
        x = x.permute(0, 2, 3, 1).reshape(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
        for blk in self.blocks:
            x, ct = blk(x, ct)
        x = x.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return x.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------- model
def _size_pair(size: Any) -> tuple[int, int]:
    """``(H, W)`` of an image size given as an int or a pair of positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in pair):
        raise ConfigError(f"FasterViT image size must be a positive int or an (H, W) pair of positive ints, got "
                          f"{size!r}")
    return pair[0], pair[1]


class FasterViT(nn.Module):
    """FasterViT image classifier / backbone (constructor arguments as in the reference implementation).

    Args:
        dim: Channels of stage 1 (doubling every stage).
        in_dim: Channels of the first stem conv.
        depths: Blocks per stage (4 stages).
        window_size: Window side per stage (stages 3-4 use it; it must divide the stage resolution unless
            ``any_res``).
        ct_size: Carrier tokens per window side.
        mlp_ratio: MLP hidden ratio.
        num_heads: Attention heads per stage.
        resolution: Input image size, an int or ``(H, W)`` (the model is built for one resolution). ``img_size``
            is an alias.
        drop_path_rate: Stochastic depth, linearly increasing over blocks.
        in_chans: Input channels.
        num_classes: Classes (0: no classifier).
        qkv_bias: Bias of the qkv projection.
        qk_scale: Attention scale (``head_dim ** -0.5`` when omitted).
        drop_rate: Dropout after attention projection and MLP.
        attn_drop_rate: Attention dropout.
        layer_scale: Layer-scale init of transformer blocks (``None`` or ``False``: off).
        layer_scale_conv: Layer-scale init of conv blocks (``None`` or ``False``: off).
        layer_norm_last: Final norm is a LayerNorm (else BatchNorm).
        hat: Per stage, whether hierarchical attention (carrier tokens) is used.
        do_propagation: Propagate carrier tokens into the windows after each HAT stage.
        global_pool: Classifier pooling.
        any_res: The reference's any-resolution model: the input may be rectangular and need not be a multiple of
            32 or of the windows; each transformer stage zero-pads its map to whole windows and crops back, the
            window grid (and carrier-token grid) may be non-square, and a HAT stage with a single window keeps its
            (unused) carrier-token conv, so that model's checkpoints load. Off: the square 224-style layout of the
            reference's fixed-resolution variants (sizes multiples of 32, windows dividing the stage maps).
    """

    def __init__(self, dim: int = 64, in_dim: int = 64, depths: Sequence[int] = (2, 3, 6, 5),
                 window_size: Sequence[int] = (7, 7, 7, 7), ct_size: int = 2, mlp_ratio: float = 4.0,
                 num_heads: Sequence[int] = (2, 4, 8, 16), resolution: int | Sequence[int] = 224,
                 drop_path_rate: float = 0.2,
                 in_chans: int = 3, num_classes: int = 1000, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, layer_scale: float | None = None,
                 layer_scale_conv: float | None = None, layer_norm_last: bool = False,
                 hat: Sequence[bool] | None = (False, False, True, False), do_propagation: bool = False,
                 global_pool: str = "avg", img_size: int | Sequence[int] | None = None,
                 any_res: bool = False) -> None:
        super().__init__()
        size = _size_pair(img_size if img_size is not None else resolution)
        depths, window_size, num_heads = list(depths), list(window_size), list(num_heads)
        hat = [True] * len(depths) if hat is None else list(hat)
        if any_res:
            self._check_any_res(dim, depths, window_size, num_heads, hat, size, ct_size, in_chans)
            maps, hw = [], size
            for i in range(len(depths)):  # stride-2 3x3 convs with padding 1: ceil(n / 2) each
                hw = tuple(_cdiv(n, 4 if i == 0 else 2) for n in hw)
                maps.append(hw)
        else:
            if size[0] != size[1]:
                raise ConfigError(f"FasterViT needs a square input; got img_size={img_size or resolution}; use an "
                                  f"*_any_res variant (any_res=True) for rectangular inputs")
            self._check_config(dim, depths, window_size, num_heads, hat, size[0], ct_size, in_chans)
            maps = [size[0] // 2 ** (2 + i) for i in range(len(depths))]
        self.any_res = any_res
        self.img_size = size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = int(dim * 2 ** (len(depths) - 1))
        self.stem = Stem(in_chans, in_dim, dim, size)
        dpr = [float(x) for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            d = int(dim * 2**i)
            stages.append(FasterViTStage(
                d, depth, maps[i], num_heads[i], window_size[i], ct_size, conv=i < 2,
                in_dim=d // 2 if i > 0 else None, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])],
                layer_scale=layer_scale, layer_scale_conv=layer_scale_conv, only_local=not hat[i],
                do_propagation=do_propagation, unused_carrier=any_res))
            self.feature_info.append(dict(num_chs=d, reduction=2 ** (2 + i), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features) if layer_norm_last else nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=0.0)
        self.apply(self._init_weights)

    @staticmethod
    def _check_common(dim: int, depths: list[int], window_size: list[int], num_heads: list[int], hat: list[bool],
                      ct_size: int, in_chans: int) -> None:
        n = len(depths)
        if n != 4 or len(window_size) != 4 or len(num_heads) != 4 or len(hat) != 4:
            raise ConfigError(f"FasterViT has 4 stages: depths, window_size, num_heads and hat need 4 entries each, "
                              f"got {depths}, {window_size}, {num_heads}, {hat}")
        if in_chans < 1 or dim < 1 or ct_size < 1:
            raise ConfigError(f"in_chans, dim and ct_size must be positive, got {in_chans}, {dim}, {ct_size}")
        for i in (2, 3):
            d = dim * 2**i
            if d % num_heads[i]:
                raise ConfigError(f"stage {i + 1}: {d} channels are not divisible by {num_heads[i]} heads")
            if depths[i] and window_size[i] < 2:
                raise ConfigError(f"stage {i + 1}: window size {window_size[i]} must be >= 2")

    @staticmethod
    def _check_any_res(dim: int, depths: list[int], window_size: list[int], num_heads: list[int], hat: list[bool],
                       size: tuple[int, int], ct_size: int, in_chans: int) -> None:
        """Checks of the any-resolution layout.

        The reference plans a stage from ``floor(input / stride)`` while its map is ``ceil(input / stride)``; a HAT
        stage runs only where both, padded to whole windows, give the same window grid.
        """
        FasterViT._check_common(dim, depths, window_size, num_heads, hat, ct_size, in_chans)
        hat_stages = [i for i in (2, 3) if hat[i] and depths[i]]

        def grid(n: int, i: int) -> tuple[int, int]:
            """(planned, actual) windows along one axis of stage ``i``."""
            stride, ws = 2 ** (2 + i), window_size[i]
            return _cdiv(n // stride, ws), _cdiv(_cdiv(n, stride), ws)

        def fits(n: int) -> bool:
            return all(len(set(grid(n, i))) == 1 for i in hat_stages)

        for i in hat_stages:
            stride, ws = 2 ** (2 + i), window_size[i]
            for axis, n in zip(("height", "width"), size, strict=True):
                planned, actual = grid(n, i)
                if planned != actual:
                    near = sorted((m for m in range(max(1, n - 4 * stride), n + 4 * stride + 1) if fits(m)),
                                  key=lambda m: (abs(m - n), m))[:3]
                    raise ConfigError(
                        f"input {axis} {n} does not fit stage {i + 1} (window {ws}): its map is {_cdiv(n, stride)} "
                        f"({actual} windows) but the reference any-resolution FasterViT plans {n // stride} "
                        f"({planned} windows) for it and cannot run such an input; choose a {axis} such as "
                        f"{', '.join(map(str, sorted(near)))}")
            sr = [_cdiv(n // stride, ws) for n in size]
            if sr[0] * sr[1] > 1:
                if ct_size > ws:
                    raise ConfigError(f"stage {i + 1}: ct_size {ct_size} exceeds the window size {ws}")
                if ct_size**2 * sr[0] * sr[1] < 4:
                    raise ConfigError(
                        f"stage {i + 1}: a {sr[0]}x{sr[1]} window grid with ct_size {ct_size} gives fewer than 4 "
                        f"carrier tokens, for which the reference's carrier attention bias is undefined (NaN); use "
                        f"ct_size >= 2, a larger input or hat=False for this stage")

    @staticmethod
    def _check_config(dim: int, depths: list[int], window_size: list[int], num_heads: list[int], hat: list[bool],
                      resolution: int, ct_size: int, in_chans: int) -> None:
        """Checks of the fixed (square) layout: windows must tile every transformer stage exactly."""
        FasterViT._check_common(dim, depths, window_size, num_heads, hat, ct_size, in_chans)
        step = math.lcm(32, *(2 ** (2 + i) * window_size[i] for i in (2, 3) if depths[i]))
        sizes = (f"input sizes that work with these windows: multiples of {step} ({step}, {2 * step}, {3 * step}, ...)"
                 ", or a *_any_res variant for any size")
        if resolution % 32:
            raise ConfigError(f"FasterViT needs an input size divisible by 32 (overall stride), got {resolution}; "
                              f"{sizes}")
        for i in (2, 3):
            r, ws = resolution // 2 ** (2 + i), window_size[i]
            if depths[i] == 0:
                continue
            if r % ws:
                raise ConfigError(
                    f"stage {i + 1}: window size {ws} must divide the stage resolution {r} "
                    f"(input {resolution} / {2 ** (2 + i)}); {sizes}; or choose window_size[{i}] among "
                    f"{[w for w in range(2, r + 1) if r % w == 0]}")
            if hat[i] and r // ws > 1 and ct_size > ws:
                raise ConfigError(f"stage {i + 1}: ct_size {ct_size} exceeds the window size {ws}")

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments excluded from weight decay (the position MLPs)."""
        return {"cpb_mlp"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                                          (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: pooled features)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def reparameterize(self) -> None:
        """Fuse for inference (every submodule that can); ``timm.utils.reparameterize_model`` does the same."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised stage-4 feature map ``(B, num_features, H/32, W/32)``."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify (``pre_logits``: the pooled features)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) for dense heads, and the final features.

        Args:
            x: Images.
            indices: Stages to return (all when omitted; an int ``n`` means the last ``n``).
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop after the last requested stage.
            output_fmt: Only ``NCHW``.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"FasterViT intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        out: list[Tensor] = []
        x = self.stem(x)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                out.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return out
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one (and optionally the norm/head)."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# --------------------------------------------------------------------------------------------- checkpoints
_RENAMES = (
    ("patch_embed.conv_down.0.", "stem.conv1."),
    ("patch_embed.conv_down.1.", "stem.norm1."),
    ("patch_embed.conv_down.3.", "stem.conv2."),
    ("patch_embed.conv_down.4.", "stem.norm2."),
    (".pos_emb_funct.", ".rel_pos."),
    (".global_tokenizer.to_global_feature.pos.", ".carrier.conv."),
    (".global_tokenizer.pos_embed.", ".carrier.conv."),  # the same conv, registered under two names
)
_DROPPED = ("relative_coords_table", "relative_position_index", "relative_bias")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Map a reference-implementation FasterViT state dict (or a wrapped checkpoint) to this module's names.

    Derived buffers (coordinate tables, cached biases) are dropped: they are recomputed here. State dicts that
    already use this module's names pass through unchanged. Given the ``model``, carrier-token position embeddings
    it does not have are dropped too: an any-resolution model with a non-square carrier grid has none, and the
    reference's any-resolution variants are initialised from its 224 checkpoints, which do.

    Example:
        >>> sd = {"levels.0.downsample.reduction.0.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
        >>> sorted(checkpoint_filter_fn(sd))
        ['head.fc.weight', 'stages.1.downsample.conv.weight']
    """
    for key in ("state_dict", "model", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = dict(state_dict) if "stem.conv1.weight" in state_dict else _rename(state_dict)
    if model is not None:
        own = model.state_dict()
        out = {k: v for k, v in out.items() if k in own or ".hat_pos_embed." not in k}
    return out


def _rename(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference names to ours (derived buffers dropped)."""
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if any(d in k for d in _DROPPED):
            continue
        for a, b in _RENAMES:
            k = k.replace(a, b)
        if k.startswith("levels."):
            _, i, rest = k.split(".", 2)
            if rest.startswith("downsample."):
                rest = rest.replace("downsample.reduction.0.", "downsample.conv.")
                k = f"stages.{int(i) + 1}.{rest}"
            else:
                k = f"stages.{i}.{rest}"
        if k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def load_official_checkpoint(model: FasterViT, path: str | Path) -> FasterViT:
    """Load a reference FasterViT checkpoint file (``.pth.tar`` read with ``weights_only=True``, or safetensors).

    Args:
        model: A model built with the checkpoint's configuration (e.g. ``timm.create_model("fastervit_0")``).
        path: The weights file.

    Raises:
        CheckpointError: If the file's keys or shapes do not fit this configuration (every key must fit).
    """
    load_weights(model, path, what="this FasterViT configuration (build the variant it was trained as)",
                 key_map=lambda sd: checkpoint_filter_fn(sd, model))
    return model


# --------------------------------------------------------------------------------------------- registry
def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> FasterViT:
    if "resolution" in kwargs and "img_size" in kwargs:
        raise ConfigError("pass either img_size or resolution, not both")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(FasterViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


def _cfg(size: int | tuple[int, int] = 224, crop_pct: float = 1.0, crop_mode: str = "center",
         **kwargs: Any) -> dict[str, Any]:
    h, w = (size, size) if isinstance(size, int) else size
    return {"num_classes": 1000, "input_size": (3, h, w), "pool_size": None, "crop_pct": crop_pct,
            "crop_mode": crop_mode, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv1",
            "classifier": "head.fc", "license": "other", **kwargs}


default_cfgs = generate_default_cfgs({
    "fastervit_0.in1k": _cfg(crop_pct=0.875),
    "fastervit_1.in1k": _cfg(),
    "fastervit_2.in1k": _cfg(),
    "fastervit_3.in1k": _cfg(),
    "fastervit_4.in1k": _cfg(),
    "fastervit_5.in1k": _cfg(),
    "fastervit_6.in1k": _cfg(),
    "fastervit_4_21k_224.in21k_ft_in1k": _cfg(crop_pct=0.95, crop_mode="squash"),
    "fastervit_4_21k_384.in21k_ft_in1k": _cfg(384, crop_mode="squash"),
    "fastervit_4_21k_512.in21k_ft_in1k": _cfg(512, crop_mode="squash"),
    "fastervit_4_21k_768.in21k_ft_in1k": _cfg(768, crop_pct=0.93, crop_mode="squash"),
    "test_fastervit.untrained": _cfg(64, test_input_size=(3, 64, 64)),
    # any resolution: input sizes are the reference's default resolutions, crops as its configs
    "fastervit_0_any_res.in1k": _cfg((576, 960), crop_pct=0.875),
    "fastervit_1_any_res.in1k": _cfg((576, 960)),
    "fastervit_2_any_res.in1k": _cfg((541, 960)),
    "fastervit_3_any_res.in1k": _cfg((576, 960)),
    "fastervit_4_any_res.in1k": _cfg((576, 960)),
    "fastervit_5_any_res.in1k": _cfg((576, 960)),
    "fastervit_6_any_res.in1k": _cfg((576, 960)),
    "fastervit_4_21k_224_any_res.in21k_ft_in1k": _cfg((576, 960), crop_pct=0.95, crop_mode="squash"),
    "fastervit_4_21k_384_any_res.in21k_ft_in1k": _cfg((576, 960), crop_mode="squash"),
    "fastervit_4_21k_512_any_res.in21k_ft_in1k": _cfg((576, 960), crop_mode="squash"),
    "fastervit_4_21k_768_any_res.in21k_ft_in1k": _cfg((576, 960), crop_pct=0.93, crop_mode="squash"),
    "test_fastervit_any_res.untrained": _cfg((96, 160), test_input_size=(3, 96, 160)),
})

_SMALL = dict(layer_scale=None, layer_scale_conv=None, do_propagation=False)
_LARGE = dict(layer_scale=1e-5, layer_scale_conv=None, do_propagation=True)
_ARCHS: dict[str, dict[str, Any]] = {
    "fastervit_0": dict(depths=(2, 3, 6, 5), num_heads=(2, 4, 8, 16), dim=64, in_dim=64, drop_path_rate=0.2, **_SMALL),
    "fastervit_1": dict(depths=(1, 3, 8, 5), num_heads=(2, 4, 8, 16), dim=80, in_dim=32, drop_path_rate=0.2, **_SMALL),
    "fastervit_2": dict(depths=(3, 3, 8, 5), num_heads=(2, 4, 8, 16), dim=96, in_dim=64, drop_path_rate=0.2, **_SMALL),
    "fastervit_3": dict(depths=(3, 3, 12, 5), num_heads=(2, 4, 8, 16), dim=128, in_dim=64, drop_path_rate=0.3,
                        **_LARGE),
    "fastervit_4": dict(depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32), dim=196, in_dim=64, drop_path_rate=0.3,
                        **_LARGE),
    "fastervit_5": dict(depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32), dim=320, in_dim=64, drop_path_rate=0.3,
                        **_LARGE),
    "fastervit_6": dict(depths=(3, 3, 16, 8), num_heads=(4, 8, 16, 32), dim=320, in_dim=64, drop_path_rate=0.5,
                        **_LARGE),
}
_NO_HAT = (False, False, False, False)
for _res, _ws in ((224, (7, 7, 14, 7)), (384, (7, 7, 24, 12)), (512, (7, 7, 32, 16)), (768, (7, 7, 48, 24))):
    _ARCHS[f"fastervit_4_21k_{_res}"] = dict(_ARCHS["fastervit_4"], drop_path_rate=0.42, window_size=_ws,
                                             resolution=_res, hat=_NO_HAT)
for _name in list(_ARCHS):  # the reference's any-resolution variants: same blocks, its default input sizes
    _ARCHS[f"{_name}_any_res"] = dict(_ARCHS[_name], any_res=True, resolution=(576, 960))
    if "_21k_" in _name:
        _ARCHS[f"{_name}_any_res"]["drop_path_rate"] = 0.3
_ARCHS["fastervit_2_any_res"]["resolution"] = (541, 960)


def _variant(name: str, pretrained: bool, kwargs: dict[str, Any]) -> FasterViT:
    args = {"window_size": (7, 7, 7, 7), "ct_size": 2, "mlp_ratio": 4, "resolution": 224,
            "hat": (False, False, True, False), **_ARCHS[name]}
    if "resolution" in kwargs and "img_size" not in kwargs:  # the reference's keyword for the input size
        kwargs = {k: v for k, v in kwargs.items() if k != "resolution"} | {"img_size": kwargs["resolution"]}
    if "img_size" in kwargs and "resolution" not in kwargs:
        args.pop("resolution")
    return _create(name, pretrained, **{**args, **kwargs})


@register_model
def fastervit_0(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-0 (31.4M params, 3.3 GMACs at 224)."""
    return _variant("fastervit_0", pretrained, kwargs)


@register_model
def fastervit_1(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-1 (53.4M params, 5.3 GMACs at 224)."""
    return _variant("fastervit_1", pretrained, kwargs)


@register_model
def fastervit_2(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-2 (75.9M params, 8.7 GMACs at 224)."""
    return _variant("fastervit_2", pretrained, kwargs)


@register_model
def fastervit_3(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-3 (159.5M params, 18.2 GMACs at 224)."""
    return _variant("fastervit_3", pretrained, kwargs)


@register_model
def fastervit_4(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4 (424.6M params, 36.6 GMACs at 224)."""
    return _variant("fastervit_4", pretrained, kwargs)


@register_model
def fastervit_5(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-5 (975.5M params, 113.0 GMACs at 224)."""
    return _variant("fastervit_5", pretrained, kwargs)


@register_model
def fastervit_6(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-6 (1360.0M params, 142.0 GMACs at 224)."""
    return _variant("fastervit_6", pretrained, kwargs)


@register_model
def fastervit_4_21k_224(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe, 224 input, window 14 in stage 3."""
    return _variant("fastervit_4_21k_224", pretrained, kwargs)


@register_model
def fastervit_4_21k_384(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe, 384 input, windows 24/12."""
    return _variant("fastervit_4_21k_384", pretrained, kwargs)


@register_model
def fastervit_4_21k_512(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe, 512 input, windows 32/16."""
    return _variant("fastervit_4_21k_512", pretrained, kwargs)


@register_model
def fastervit_4_21k_768(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe, 768 input, windows 48/24."""
    return _variant("fastervit_4_21k_768", pretrained, kwargs)


@register_model
def test_fastervit(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """Tiny FasterViT for tests: 64 px input, HAT with carrier tokens and propagation in stage 3."""
    args = dict(dim=16, in_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=(4, 4, 2, 2), ct_size=1,
                resolution=64, hat=(False, False, True, False), layer_scale=0.5, layer_scale_conv=0.5,
                do_propagation=True, drop_path_rate=0.0)
    if "img_size" in kwargs and "resolution" not in kwargs:
        args.pop("resolution")
    return _create("test_fastervit", pretrained, **{**args, **kwargs})


@register_model
def fastervit_0_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-0 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_0_any_res", pretrained, kwargs)


@register_model
def fastervit_1_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-1 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_1_any_res", pretrained, kwargs)


@register_model
def fastervit_2_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-2 for any input size (padding to whole windows); default input 541x960."""
    return _variant("fastervit_2_any_res", pretrained, kwargs)


@register_model
def fastervit_3_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-3 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_3_any_res", pretrained, kwargs)


@register_model
def fastervit_4_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_4_any_res", pretrained, kwargs)


@register_model
def fastervit_5_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-5 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_5_any_res", pretrained, kwargs)


@register_model
def fastervit_6_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-6 for any input size (padding to whole windows); default input 576x960."""
    return _variant("fastervit_6_any_res", pretrained, kwargs)


@register_model
def fastervit_4_21k_224_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe (windows 14/7), for any input size; default input 576x960."""
    return _variant("fastervit_4_21k_224_any_res", pretrained, kwargs)


@register_model
def fastervit_4_21k_384_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe (windows 24/12), for any input size; default input 576x960."""
    return _variant("fastervit_4_21k_384_any_res", pretrained, kwargs)


@register_model
def fastervit_4_21k_512_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe (windows 32/16), for any input size; default input 576x960."""
    return _variant("fastervit_4_21k_512_any_res", pretrained, kwargs)


@register_model
def fastervit_4_21k_768_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4, ImageNet-21k recipe (windows 48/24), for any input size; default input 576x960."""
    return _variant("fastervit_4_21k_768_any_res", pretrained, kwargs)


@register_model
def test_fastervit_any_res(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """Tiny any-resolution FasterViT for tests (96x160 input).

    Stage 3 (6x10 map, window 4) pads to a 2x3 window grid with a non-square 4x6 carrier grid (HAT, propagation);
    stage 4 (3x5 map, window 2) pads to 2x3 windows.
    """
    args = dict(dim=16, in_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=(4, 4, 4, 2), ct_size=2,
                resolution=(96, 160), hat=(False, False, True, False), layer_scale=0.5, layer_scale_conv=0.5,
                do_propagation=True, drop_path_rate=0.0, any_res=True)
    if "resolution" in kwargs and "img_size" not in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "resolution"} | {"img_size": kwargs["resolution"]}
    if "img_size" in kwargs:
        args.pop("resolution")
    return _create("test_fastervit_any_res", pretrained, **{**args, **kwargs})

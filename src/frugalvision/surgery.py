"""Automated ViT surgery: replace the most expensive attention token mixers with efficient-modulation mixers.

``modulate(model, budget_ms=...)`` measures, on the target device and with the model's real token shapes, the
batch-1 forward time of every attention token mixer and of a candidate :class:`TokenModulationMixer` of the same
width, then greedily swaps the mixers with the largest measured saving until the predicted latency
(measured whole-model latency minus the summed savings) meets the budget. The modified model is then measured
against the original, interleaved in one run, so the report gives predicted and measured latency side by side.
Accuracy is recovered by distillation from the original (:class:`frugalvision.engine.distill.DistillationTask`).

Works on timm's ``VisionTransformer`` family (``vit_*``, ``deit_*``, and models of ours derived from it): any
block with an ``attn`` module holding ``qkv`` and ``proj`` linear layers, in a model with ``patch_embed`` and
``num_prefix_tokens``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .bench.timing import interleaved, median_ms
from .engine.trainer import resolve_device
from .errors import CheckpointError, ConfigError

__all__ = [
    "BlockCost",
    "CostTable",
    "ModulateResult",
    "SurgeryReport",
    "TokenModulationMixer",
    "build_modulated",
    "find_attention_blocks",
    "measure_block_costs",
    "modulate",
    "plan_surgery",
    "replace_mixers",
    "surgery_record",
]

# GELU(b) == 1: the depth-wise context starts as a constant 1 when the context FCs are off (see _init_context).
_GELU_ONE = 1.1444507837295532


# --------------------------------------------------------------------------------------------- the mixer
class TokenModulationMixer(nn.Module):
    """Efficient-modulation token mixer on ViT tokens ``(B, N, C)``, a drop-in replacement for attention.

    ``out = proj(v(x) ⊙ ctx)`` with the context ``ctx = g(GELU(DWConv_k(f(x))))`` computed on the patch tokens
    laid out on their ``(H, W)`` grid (EfficientMod's modulation at the same width: no expansion, so no
    activation on the value branch). Prefix tokens (class / distillation / register tokens) have no grid
    position: their output is ``proj`` of the *mean* of the modulated patch tokens ``v ⊙ ctx``, i.e. attention
    with uniform weights over the patches, so a class-token head keeps a direct path to every patch. With
    ``context_fc=False`` the two context FCs are dropped (``ctx = GELU(DWConv_k(x))``), halving the FC cost.

    Args:
        dim: Token width ``C`` (input and output).
        kernel_size: Odd size of the depth-wise context convolution.
        num_prefix_tokens: Tokens before the patch tokens.
        grid_size: ``(H, W)`` of the patch tokens; inferred from a square token count when omitted or when the
            count does not match (dynamic image size).
        context_fc: Keep the context FCs ``f`` and ``g``.

    Example:
        >>> mixer = TokenModulationMixer(32, kernel_size=3, num_prefix_tokens=1, grid_size=(4, 4))
        >>> mixer(torch.randn(2, 17, 32)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, dim: int, kernel_size: int = 7, num_prefix_tokens: int = 1,
                 grid_size: tuple[int, int] | None = None, context_fc: bool = True) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if dim < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.kernel_size = kernel_size
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.context_fc = context_fc
        # v and f share one matmul: rows [0, C) are the value FC, rows [C, 2C) the context FC f.
        self.vf = nn.Linear(dim, 2 * dim if context_fc else dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.g = nn.Linear(dim, dim) if context_fc else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self._init_context()

    def _init_context(self) -> None:
        """Start with a context close to 1, so the mixer begins as ``proj(v(x))``."""
        nn.init.trunc_normal_(self.dwconv.weight, std=0.02)
        if self.context_fc:
            nn.init.zeros_(self.dwconv.bias)
            assert isinstance(self.g, nn.Linear)
            nn.init.trunc_normal_(self.g.weight, std=0.02)
            nn.init.ones_(self.g.bias)
        else:
            nn.init.constant_(self.dwconv.bias, _GELU_ONE)

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == n:
            return self.grid_size  # type: ignore[return-value]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"TokenModulationMixer: {n} patch tokens do not form the grid {self.grid_size} nor a square; "
                "set grid_size=(H, W) or num_prefix_tokens to the model's"
            )
        return side, side

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``; ``attn_mask``/``is_causal`` exist for the attention signature only."""
        if attn_mask is not None or is_causal:
            raise ValueError("TokenModulationMixer: attention masks are not supported (the mixer is not attention)")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TokenModulationMixer: expected (B, N, {self.dim}) tokens, got {tuple(x.shape)}")
        B, N, C = x.shape
        P = self.num_prefix_tokens
        H, W = self._grid(N - P)
        patches = x[:, P:] if P else x
        h = self.vf(patches)
        v = h[..., :C]
        c = h[..., C:] if self.context_fc else patches
        # (B, HW, C) -> (B, C, H, W) as a channels-last view: no copy, and the conv keeps that layout.
        c = c.reshape(B, H, W, C).permute(0, 3, 1, 2)
        c = self.act(self.dwconv(c)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        m = v * self.g(c)
        if P:  # prefix tokens pool the modulated patch tokens (uniform attention over the patches)
            m = torch.cat([m.mean(1, keepdim=True).expand(B, P, C), m], dim=1)
        return self.proj(m)

    @classmethod
    def from_attention(cls, attn: nn.Module, kernel_size: int = 7, num_prefix_tokens: int = 1,
                       grid_size: tuple[int, int] | None = None, context_fc: bool = True,
                       init: str = "attention") -> TokenModulationMixer:
        """A mixer of the attention's width; ``init="attention"`` copies its value and output projections.

        The value FC takes the ``v`` rows of ``qkv`` (and their bias), ``proj`` is copied, and the context starts
        at ~1, so the new block first computes what attention computes when every patch token attends only to
        itself and prefix tokens attend uniformly to the patches; distillation then teaches the context to mix
        neighbours. ``init="random"`` keeps a fresh initialisation.
        """
        dim = attn.proj.out_features
        mixer = cls(dim, kernel_size, num_prefix_tokens, grid_size, context_fc)
        ref = attn.proj.weight
        mixer.to(device=ref.device, dtype=ref.dtype)
        if init == "random":
            return mixer
        if init != "attention":
            raise ConfigError(f"unknown init {init!r}; use attention or random")
        qkv: nn.Linear = attn.qkv
        inner = qkv.out_features // 3
        if inner != dim or attn.proj.in_features != dim or qkv.in_features != dim:
            return mixer  # inner width differs from C: shapes do not allow copying; keep the fresh init
        with torch.no_grad():
            mixer.vf.weight[:dim].copy_(qkv.weight[2 * dim:])
            if qkv.bias is not None:
                mixer.vf.bias[:dim].copy_(qkv.bias[2 * dim:])
            else:
                mixer.vf.bias[:dim].zero_()
            mixer.proj.weight.copy_(attn.proj.weight)
            if attn.proj.bias is not None:
                mixer.proj.bias.copy_(attn.proj.bias)
            else:
                mixer.proj.bias.zero_()
        return mixer


# --------------------------------------------------------------------------------------------- structure
def _is_attention(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and not isinstance(m, TokenModulationMixer))


def find_attention_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose ``attn`` token mixer is replaceable (in forward order).

    Raises:
        ConfigError: The model is not a ViT-family model or has no recognisable attention blocks.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        >>> find_attention_blocks(m)
        ['blocks.0', 'blocks.1']
    """
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise ConfigError(
            f"{type(model).__name__} is not a ViT-family model (no patch_embed / num_prefix_tokens); surgery "
            "supports timm VisionTransformer models (vit_*, deit_*) and models derived from them"
        )
    names = [n for n, m in model.named_modules() if _is_attention(getattr(m, "attn", nn.Identity()))]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no recognisable attention blocks (a block with an `attn` module holding "
            "`qkv` and `proj` linear layers); nothing to replace"
        )
    return names


def _grid_of(model: nn.Module) -> tuple[int, int] | None:
    g = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(g[0]), int(g[1])) if g is not None else None


def replace_mixers(model: nn.Module, blocks: Sequence[str], kernel_size: int = 7, context_fc: bool = True,
                   init: str = "attention") -> nn.Module:
    """Replace the ``attn`` of the named blocks by :class:`TokenModulationMixer` in place; returns the model.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        >>> type(replace_mixers(m, ["blocks.1"]).blocks[1].attn).__name__
        'TokenModulationMixer'
    """
    valid = set(find_attention_blocks(model))
    modules = dict(model.named_modules())
    unknown = [b for b in blocks if b not in valid]
    if unknown:
        raise ConfigError(f"blocks {unknown} have no replaceable attention; replaceable: {sorted(valid)}")
    for b in blocks:
        blk = modules[b]
        blk.attn = TokenModulationMixer.from_attention(blk.attn, kernel_size, int(model.num_prefix_tokens),
                                                       _grid_of(model), context_fc, init)
    return model


# --------------------------------------------------------------------------------------------- timing
def _interleaved_ms(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
                    progress: bool = False, desc: str = "timing") -> dict[str, float]:
    """Median batch-1 time (ms) of each function, timed in interleaved rounds (:func:`frugalvision.bench.timing`)."""
    from tqdm.auto import tqdm

    with tqdm(total=(repeats + warmup) * len(fns), desc=desc, disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        times = interleaved(fns, repeats, warmup, device, on_call=bar.update, inference=True)
    return median_ms(times)


@dataclass
class BlockCost:
    """Measured batch-1 forward time of one block's attention and of its candidate mixer."""

    name: str
    attn_ms: float
    mixer_ms: float
    block_ms: float | None = None

    @property
    def saving_ms(self) -> float:
        """Predicted latency saved by replacing this block's attention (at most the block's own time)."""
        saving = self.attn_ms - self.mixer_ms
        return min(saving, self.block_ms) if self.block_ms is not None else saving


@dataclass
class CostTable:
    """Batch-1 latencies measured in one interleaved run: the whole model, each block, the rest of the model.

    The parts are timed in isolation; on a busy or cache-limited machine their sum differs from the whole
    model's time, so savings are scaled by ``scale = base_ms / parts_ms`` (1 when the rest was not measured).
    """

    base_ms: float
    blocks: list[BlockCost]
    rest_ms: float | None = None

    @property
    def parts_ms(self) -> float | None:
        """Sum of the separately timed parts (blocks + the rest), when all were measured."""
        if self.rest_ms is None or any(b.block_ms is None for b in self.blocks):
            return None
        return self.rest_ms + sum(b.block_ms for b in self.blocks)  # type: ignore[misc]

    @property
    def scale(self) -> float:
        """Whole-model time over the sum of its parts."""
        parts = self.parts_ms
        return self.base_ms / parts if parts else 1.0


def _example(model: nn.Module, img_size: int | tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    if img_size is None:
        img_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))[1:]
        g = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if g is not None:
            img_size = tuple(g)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 3)
    return torch.randn(1, in_chans, *hw, device=device)


def measure_block_costs(model: nn.Module, example: torch.Tensor, kernel_size: int = 7, context_fc: bool = True,
                        repeats: int = 30, warmup: int = 5, progress: bool = False) -> CostTable:
    """Measure the whole model, every attention block, its attention and a candidate mixer, interleaved.

    Each block's attention and candidate mixer run on the real tokens that reach them in a forward of
    ``example`` (batch 1), on ``example``'s device, with the current threads; "the rest" is the model with its
    attention blocks skipped.

    Returns:
        A :class:`CostTable` (median latencies in ms).
    """
    names = find_attention_blocks(model)
    modules = dict(model.named_modules())
    device = example.device
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    block_in: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        hooks.append(modules[n].attn.register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())))
        hooks.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: block_in.__setitem__(n, a[0].detach())))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    rest = copy.deepcopy(model)
    rest_modules = dict(rest.named_modules())
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(rest_modules[parent] if parent else rest, child, nn.Identity())
    fns: dict[str, Callable[[], Any]] = {"model": lambda: model(example), "rest": lambda: rest(example)}
    mixers = {}
    for n in names:
        attn, blk = modules[n].attn, modules[n]
        mixers[n] = TokenModulationMixer.from_attention(attn, kernel_size, int(model.num_prefix_tokens),
                                                        _grid_of(model), context_fc).eval()
        fns[f"attn:{n}"] = lambda a=attn, x=inputs[n]: a(x)
        fns[f"mixer:{n}"] = lambda a=mixers[n], x=inputs[n]: a(x)
        fns[f"block:{n}"] = lambda a=blk, x=block_in[n]: a(x)
    t = _interleaved_ms(fns, device, repeats, warmup, progress, desc="per-block latency")
    costs = [BlockCost(n, t[f"attn:{n}"], t[f"mixer:{n}"], t[f"block:{n}"]) for n in names]
    return CostTable(t["model"], costs, t["rest"])


# --------------------------------------------------------------------------------------------- planning
def plan_surgery(costs: Sequence[BlockCost], base_ms: float, budget_ms: float, scale: float = 1.0
                 ) -> tuple[list[str], float]:
    """Greedy choice: replace the blocks with the largest saving until ``base - scale * savings <= budget``.

    Blocks whose mixer is not faster than their attention are never chosen. ``scale`` converts savings timed in
    isolation to the whole model's time (:attr:`CostTable.scale`).

    Returns:
        The chosen block names (largest saving first) and the predicted latency.

    Raises:
        ConfigError: The budget cannot be met even by replacing every block that saves time.

    Example:
        >>> c = [BlockCost("a", 2.0, 1.0), BlockCost("b", 3.0, 1.0), BlockCost("c", 1.0, 1.5)]
        >>> plan_surgery(c, base_ms=10.0, budget_ms=8.0)
        (['b'], 8.0)
    """
    if budget_ms <= 0:
        raise ConfigError(f"budget_ms must be > 0, got {budget_ms}")
    chosen: list[str] = []
    predicted = base_ms
    if predicted <= budget_ms:
        return chosen, predicted
    for c in sorted(costs, key=lambda c: -c.saving_ms):
        if c.saving_ms <= 0:
            break
        chosen.append(c.name)
        predicted -= scale * c.saving_ms
        if predicted <= budget_ms:
            return chosen, predicted
    best = base_ms - scale * sum(max(c.saving_ms, 0.0) for c in costs)
    n_help = sum(c.saving_ms > 0 for c in costs)
    raise ConfigError(
        f"latency budget {budget_ms:.3g} ms is unreachable: the model takes {base_ms:.3g} ms and the best "
        f"achievable is {best:.3g} ms (predicted, {n_help} of {len(costs)} attention blocks replaced; "
        f"{len(costs) - n_help} would get slower); raise budget_ms to >= {best:.3g} or use speedup <= "
        f"{base_ms / best:.3g}"
    )


# --------------------------------------------------------------------------------------------- modulate
@dataclass
class SurgeryReport:
    """What :func:`modulate` measured, chose and achieved (latencies in ms, batch 1)."""

    device: str
    input_shape: list[int]
    budget_ms: float
    base_ms: float
    predicted_ms: float
    replaced: list[str]
    blocks: list[BlockCost]
    measured_before_ms: float | None = None
    measured_after_ms: float | None = None
    kernel_size: int = 7
    context_fc: bool = True
    rest_ms: float | None = None
    scale: float = 1.0
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def predicted_speedup(self) -> float:
        """Base over predicted latency."""
        return self.base_ms / self.predicted_ms

    @property
    def measured_speedup(self) -> float | None:
        """Measured before over measured after (same interleaved run)."""
        if self.measured_before_ms is None or self.measured_after_ms is None:
            return None
        return self.measured_before_ms / self.measured_after_ms

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dictionary."""
        d = asdict(self)
        d["blocks"] = [{**asdict(b), "saving_ms": b.saving_ms} for b in self.blocks]
        d["predicted_speedup"] = self.predicted_speedup
        d["measured_speedup"] = self.measured_speedup
        return d

    def to_markdown(self) -> str:
        """Per-block table and the predicted vs measured summary."""
        def f(v: float | None, fmt: str = "{:.3f}") -> str:
            return "—" if v is None else fmt.format(v)

        lines = [f"Device {self.device}, {self.threads} threads, input {tuple(self.input_shape)}, budget "
                 f"{self.budget_ms:.3f} ms, mixer k={self.kernel_size}"
                 f"{'' if self.context_fc else ' (no context FCs)'}.", "",
                 "| block | block (ms) | attention (ms) | mixer (ms) | saving (ms) | replaced |",
                 "|---|---|---|---|---|---|"]
        for b in self.blocks:
            lines.append(f"| {b.name} | {f(b.block_ms)} | {b.attn_ms:.3f} | {b.mixer_ms:.3f} | {b.saving_ms:+.3f} | "
                         f"{'yes' if b.name in self.replaced else ''} |")
        lines += ["", "| | latency (ms) | speed-up |", "|---|---|---|",
                  f"| rest of the model (blocks skipped) | {f(self.rest_ms)} | |",
                  f"| before (measured at planning; parts scale {self.scale:.2f}) | {self.base_ms:.3f} | 1.00x |",
                  f"| after, predicted | {self.predicted_ms:.3f} | {self.predicted_speedup:.2f}x |",
                  f"| before, measured side by side | {f(self.measured_before_ms)} | 1.00x |",
                  f"| after, measured side by side | {f(self.measured_after_ms)} | "
                  f"{f(self.measured_speedup, '{:.2f}x')} |"]
        return "\n".join(lines) + "\n"


class ModulateResult(NamedTuple):
    """The modified model and the report."""

    model: nn.Module
    report: SurgeryReport


def modulate(
    model: nn.Module,
    budget_ms: float | None = None,
    *,
    speedup: float | None = None,
    device: str | torch.device = "cpu",
    img_size: int | tuple[int, int] | None = None,
    kernel_size: int = 7,
    context_fc: bool = True,
    init: str = "attention",
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    costs: CostTable | tuple[float, Sequence[BlockCost]] | None = None,
    blocks: Sequence[str] | None = None,
    measure_after: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> ModulateResult:
    """Replace the most expensive attention token mixers by modulation mixers until a latency budget is met.

    Args:
        model: A ViT-family model (timm ``vit_*``, ``deit_*``, or ours derived from ``VisionTransformer``).
        budget_ms: Target batch-1 latency in milliseconds on ``device``.
        speedup: Alternative to ``budget_ms``: target ``measured latency / speedup``.
        device: Where latency is measured (``cpu``, ``cuda[:N]`` or ``auto``; the model is moved there).
        img_size: Input resolution; the model's own when omitted.
        kernel_size: Depth-wise context kernel of the new mixers.
        context_fc: Keep the mixer's context FCs (``False``: cheaper mixer, ``ctx = GELU(DWConv(x))``).
        init: ``attention`` (copy v/proj weights) or ``random``.
        repeats: Timed interleaved rounds per measurement (median).
        warmup: Untimed runs before timing.
        threads: torch intra-op threads during the measurement (restored afterwards; current when omitted).
        costs: A :class:`CostTable` or ``(base_ms, [BlockCost, ...])`` to plan from instead of measuring (e.g. a
            table measured on the deployment device).
        blocks: Replace exactly these blocks instead of planning for a budget (then no budget is needed).
        measure_after: Measure the original and the modified model side by side at the end.
        inplace: Modify ``model`` itself instead of a copy.
        progress: Show progress bars.

    Returns:
        ``(model, report)``: the modified model (eval mode, on ``device``) and a :class:`SurgeryReport`.

    Raises:
        ConfigError: Not a ViT-family model, no attention blocks, no or two budgets, or an unreachable budget
            (the message gives the best achievable latency).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
        >>> fake = (10.0, [BlockCost("blocks.0", 2.0, 1.5), BlockCost("blocks.1", 3.0, 1.0),
        ...                BlockCost("blocks.2", 2.5, 1.0)])
        >>> new, rep = modulate(m, budget_ms=7.5, costs=fake, measure_after=False, progress=False)
        >>> rep.replaced, rep.predicted_ms
        (['blocks.1', 'blocks.2'], 6.5)
    """
    if blocks is None and (budget_ms is None) == (speedup is None):
        raise ConfigError("give exactly one of budget_ms (target latency in ms) or speedup (e.g. 1.5)")
    if blocks is not None and (budget_ms is not None or speedup is not None):
        raise ConfigError("give either blocks (a manual choice) or a budget (budget_ms / speedup), not both")
    if speedup is not None and speedup <= 1.0:
        raise ConfigError(f"speedup must be > 1, got {speedup}")
    find_attention_blocks(model)  # clear error before any work
    dev = resolve_device(device)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _modulate(model, budget_ms, speedup, dev, img_size, kernel_size, context_fc, init, repeats, warmup,
                         costs, blocks, measure_after, inplace, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _modulate(model: nn.Module, budget_ms: float | None, speedup: float | None, dev: torch.device,
              img_size: int | tuple[int, int] | None, kernel_size: int, context_fc: bool, init: str, repeats: int,
              warmup: int, costs: CostTable | tuple[float, Sequence[BlockCost]] | None, blocks: Sequence[str] | None,
              measure_after: bool, inplace: bool, progress: bool) -> ModulateResult:
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval().to(dev)
    x = _example(model, img_size, dev)
    if costs is None:
        table = measure_block_costs(model, x, kernel_size, context_fc, repeats, warmup, progress)
    else:
        table = costs if isinstance(costs, CostTable) else CostTable(float(costs[0]), list(costs[1]))
    base_ms, costs_, scale = table.base_ms, table.blocks, table.scale
    if costs is not None:
        known = set(find_attention_blocks(model))
        bad = [b.name for b in costs_ if b.name not in known]
        if bad:
            raise ConfigError(f"cost table names blocks {bad} that have no replaceable attention")
    if blocks is not None:
        known = {c.name: c for c in costs_}
        bad = [b for b in blocks if b not in known]
        if bad:
            raise ConfigError(f"blocks {bad} have no replaceable attention; replaceable: {sorted(known)}")
        chosen = list(dict.fromkeys(blocks))
        predicted = base_ms - scale * sum(known[b].saving_ms for b in chosen)
        budget = predicted
    else:
        budget = float(budget_ms) if budget_ms is not None else base_ms / float(speedup)  # type: ignore[arg-type]
        chosen, predicted = plan_surgery(costs_, base_ms, budget, scale)
    before_copy = copy.deepcopy(model) if (measure_after and inplace) else None
    replace_mixers(model, chosen, kernel_size, context_fc, init)
    model.eval()
    report = SurgeryReport(str(dev), list(x.shape), budget, base_ms, predicted, chosen, costs_,
                           kernel_size=kernel_size, context_fc=context_fc, rest_ms=table.rest_ms, scale=scale)
    if measure_after:
        ref = before_copy if before_copy is not None else original.eval().to(dev)
        t = _interleaved_ms({"before": lambda: ref(x), "after": lambda: model(x)}, dev, repeats, warmup, progress,
                            desc="before vs after")
        report.measured_before_ms, report.measured_after_ms = t["before"], t["after"]
    return ModulateResult(model, report)


# --------------------------------------------------------------------------------------------- files
def surgery_record(previous: Mapping[str, Any] | None, blocks: Sequence[str], kernel_size: int,
                   context_fc: bool) -> dict[str, Any]:
    """The ``surgery`` entry of a model file: every replaced block and its mixer, earlier surgeries included.

    ``mixers`` maps each replaced block to its mixer's ``kernel_size`` and ``context_fc`` (a second surgery on a
    surgery file keeps the first one's blocks, whatever their kernel); ``blocks`` lists them in replacement order.
    ``kernel_size`` / ``context_fc`` at the top level are the last surgery's (files written before ``mixers``
    existed have only those).

    Example:
        >>> first = surgery_record(None, ["blocks.1"], 7, True)
        >>> second = surgery_record(first, ["blocks.0"], 11, False)
        >>> second["blocks"], second["mixers"]["blocks.1"]["kernel_size"], second["mixers"]["blocks.0"]
        (['blocks.1', 'blocks.0'], 7, {'kernel_size': 11, 'context_fc': False})
    """
    mixers = dict(_recorded_mixers(previous)) if previous else {}
    for b in blocks:
        mixers[b] = {"kernel_size": int(kernel_size), "context_fc": bool(context_fc)}
    return {"blocks": list(mixers), "mixers": mixers, "kernel_size": int(kernel_size), "context_fc": bool(context_fc)}


def _recorded_mixers(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Block -> mixer settings of a surgery record (old records: one setting for all their blocks)."""
    if "mixers" in spec:
        return {str(b): dict(m) for b, m in spec["mixers"].items()}
    return {str(b): {"kernel_size": int(spec["kernel_size"]), "context_fc": bool(spec["context_fc"])}
            for b in spec["blocks"]}


def build_modulated(info: Mapping[str, Any]) -> nn.Module:
    """The architecture of a ``surgery`` model file: the original model with its recorded mixers in place.

    Every block in the record (:func:`surgery_record`) gets its own mixer settings, so files of repeated
    surgeries rebuild exactly. Weights are not loaded (:func:`frugalvision.weights.load_model_file` does that).
    """
    from .models import create_model

    spec = info.get("surgery")
    if not spec:
        raise CheckpointError("the model file has no surgery record (which blocks were replaced)")
    try:
        mixers = _recorded_mixers(spec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the model file's surgery record is incomplete or corrupt ({exc!r})") from None
    model = create_model(info["name"], **info.get("model_kwargs", {}))
    for block, m in mixers.items():
        replace_mixers(model, [block], int(m["kernel_size"]), bool(m["context_fc"]), init="random")
    return model

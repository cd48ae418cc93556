"""Inference-time fusion with a safety net: re-parameterise branches, fold every Conv–BN / Linear–BN, verify.

:func:`fuse` works on a deep copy of the model, in three steps:

1. ``timm.utils.reparameterize_model``: every module that defines ``fuse()`` / ``reparameterize()`` /
   ``switch_to_deploy()`` (RepVGG, MobileOne, FastViT, our ``RepConv`` ...) turns into its single-branch form.
2. Fold the BatchNorm that directly follows a ``Conv1d/2d/3d`` or a ``Linear`` into that layer's weight and bias
   and replace the BN by ``nn.Identity`` (timm's ``BatchNormAct2d`` keeps its dropout + activation). Pairs are
   found on the ``torch.fx`` graph where the model traces: the BN's only input is the conv's output and that
   output has no other user, and both modules are called once. Where a module does not trace, the search
   descends into its children (as it does into modules timm marks as not traceable, which the graph keeps
   opaque) and, at that level, uses the module graph: consecutive children of an
   ``nn.Sequential`` and the ``(conv, bn)`` attribute pairs of known containers (:func:`register_fusable`).
   ``Linear`` + ``BatchNorm1d`` is folded only when the linear's output is ``(N, C)`` on the probe batch.
3. Compare the fused copy with the original on a probe batch and refuse (:class:`FuseError`, the original
   untouched) if any output deviates by more than ``atol + rtol * max|reference|``.

BatchNorms without running statistics (``track_running_stats=False``) normalise with batch statistics even in
eval mode and are left alone. The fused model is returned in eval mode (folding uses the running statistics).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError, FrugalVisionError

__all__ = ["FuseError", "FuseReport", "fuse", "fuse_with_report", "register_fusable", "reparameterize_model"]


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``timm.utils.reparameterize_model``: call every module's ``fuse``/``reparameterize``/``switch_to_deploy``.

    Example:
        >>> from frugalvision.models.rep import RepConv
        >>> reparameterize_model(nn.Sequential(RepConv(4, 4)))[0].reparam.kernel_size
        (3, 3)
    """
    from timm.utils import reparameterize_model as _timm_reparameterize

    return _timm_reparameterize(model, inplace=inplace)


class FuseError(FrugalVisionError, RuntimeError):
    """The fused model does not reproduce the original on the probe batch."""


@dataclass
class FuseReport:
    """What :func:`fuse_with_report` did.

    Attributes:
        reparameterized: Modules whose own ``fuse``/``reparameterize``/``switch_to_deploy`` ran.
        conv_bn: ``(conv, bn)`` module names folded.
        linear_bn: ``(linear, bn)`` module names folded.
        traced: Module names (``""``: the whole model) whose pairs came from a ``torch.fx`` graph.
        untraced: Module names that did not trace (pairs searched in their module graph instead).
        remaining_bn: BatchNorm modules left in the fused model.
        max_abs_err: Largest absolute deviation on the probe batch.
        max_rel_err: ``max_abs_err`` divided by the largest absolute reference output.
    """

    reparameterized: list[str] = field(default_factory=list)
    conv_bn: list[tuple[str, str]] = field(default_factory=list)
    linear_bn: list[tuple[str, str]] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    remaining_bn: list[str] = field(default_factory=list)
    max_abs_err: float | None = None
    max_rel_err: float | None = None

    def summary(self) -> str:
        """One line for logs and reports."""
        err = "" if self.max_abs_err is None else f", max deviation {self.max_abs_err:.2e} (rel {self.max_rel_err:.2e})"
        return (f"{len(self.reparameterized)} blocks re-parameterised, {len(self.conv_bn)} conv+BN and "
                f"{len(self.linear_bn)} linear+BN folded, {len(self.remaining_bn)} BN left{err}")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KNOWN_PAIRS: dict[type, list[tuple[str, str]]] = {}


def register_fusable(cls: type, pairs: Sequence[tuple[str, str]]) -> None:
    """Declare that ``cls.forward`` applies attribute ``bn`` right after attribute ``conv`` for each pair.

    Used only for modules that ``torch.fx`` cannot trace (traced graphs are read directly).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        ...     def forward(self, x):
        ...         return self.bn(self.conv(x)) if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it
        >>> register_fusable(Block, [("conv", "bn")])
        >>> fuse(Block(), torch.randn(2, 3, 8, 8)).bn
        Identity()
    """
    _KNOWN_PAIRS[cls] = [(str(a), str(b)) for a, b in pairs]


def _register_timm() -> None:
    try:
        from timm.layers import ConvNormAct
    except ImportError:  # pragma: no cover - timm is a core dependency
        return
    _KNOWN_PAIRS.setdefault(ConvNormAct, [("conv", "bn")])


_register_timm()


def _foldable_bn(m: nn.Module) -> bool:
    if not isinstance(m, _BatchNorm) or m.running_mean is None or m.running_var is None:
        return False
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return True
    try:  # timm's BN + dropout + activation (a BatchNorm2d subclass)
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover
        return False
    return type(m) is BatchNormAct2d


def _matches(layer: nn.Module, bn: nn.Module) -> str | None:
    """``"conv"``/``"linear"`` when ``bn`` can be folded into ``layer``, else ``None``."""
    if not _foldable_bn(bn):
        return None
    if type(layer) in _CONVS and layer.out_channels == bn.num_features:  # channels are dim 1 for both
        return "conv"
    if type(layer) is nn.Linear and type(bn) is nn.BatchNorm1d and layer.out_features == bn.num_features:
        return "linear"
    return None


class _Tracer(fx.Tracer):
    """Keeps convs, linears, norms and timm's no-trace modules as leaves; wraps timm's no-trace functions."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            funcs, self._leaves = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except ImportError:  # pragma: no cover
            funcs, self._leaves = (), ()
        super().__init__(autowrap_functions=funcs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_CONVS, nn.Linear, _BatchNorm)) or (self._leaves and isinstance(m, self._leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _pairs_from_graph(graph: fx.Graph, root: nn.Module, prefix: str) -> list[tuple[str, str, str]]:
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs or calls[n.target] != 1:
            continue
        src = n.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or len(src.args) != 1 or src.kwargs:
            continue
        kind = _matches(root.get_submodule(src.target), root.get_submodule(n.target))
        if kind:
            pairs.append((kind, prefix + src.target, prefix + n.target))
    return pairs


def _pairs_from_modules(module: nn.Module, prefix: str) -> list[tuple[str, str, str]]:
    pairs = []
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        items = list(module.named_children())
        for (na, a), (nb, b) in itertools.pairwise(items):
            kind = _matches(a, b)
            if kind:
                pairs.append((kind, prefix + na, prefix + nb))
    for cls, attrs in _KNOWN_PAIRS.items():
        if type(module) is cls:
            for ca, ba in attrs:
                a, b = getattr(module, ca, None), getattr(module, ba, None)
                kind = _matches(a, b) if isinstance(a, nn.Module) and isinstance(b, nn.Module) else None
                if kind:
                    pairs.append((kind, prefix + ca, prefix + ba))
    return pairs


def _find_pairs(module: nn.Module, prefix: str, report: FuseReport) -> list[tuple[str, str, str]]:
    if not any(True for _ in module.children()):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(module)
    except Exception:  # any tracing failure means: look inside instead
        report.untraced.append(prefix.rstrip("."))
        pairs = _pairs_from_modules(module, prefix)
        for name, child in module.named_children():
            pairs += _find_pairs(child, f"{prefix}{name}.", report)
        return pairs
    report.traced.append(prefix.rstrip("."))
    pairs = _pairs_from_graph(graph, module, prefix)
    for target in dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"):  # opaque leaves
        sub = module.get_submodule(target)
        if not isinstance(sub, (*_CONVS, nn.Linear, _BatchNorm)):
            pairs += _find_pairs(sub, f"{prefix}{target}.", report)
    return pairs


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _after_bn(bn: nn.Module) -> nn.Module:
    """What remains of a BN once folded: nothing, or timm BatchNormAct2d's dropout + activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Identity() if not rest else rest[0] if len(rest) == 1 else nn.Sequential(*rest)


@torch.no_grad()
def _fold(model: nn.Module, kind: str, layer_name: str, bn_name: str) -> None:
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    args = (bn.running_mean, bn.running_var, bn.eps,
            bn.weight if bn.weight is not None else torch.ones_like(bn.running_var),
            bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean))
    dtype = layer.weight.dtype
    w64 = layer.weight.detach().double()
    b64 = None if layer.bias is None else layer.bias.detach().double()
    args64 = tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args)
    if kind == "conv":
        w, b = fuse_conv_bn_weights(w64, b64, *args64)
    else:
        w, b = fuse_linear_bn_weights(w64, b64, *args64)
    layer.weight = nn.Parameter(w.detach().to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(b.detach().to(dtype), requires_grad=layer.weight.requires_grad)
    _set_module(model, bn_name, _after_bn(bn))


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _probe(model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor] | tuple[int, ...] | None,
           device: torch.device) -> tuple[torch.Tensor, ...]:
    if example is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("test_input_size") or cfg.get("input_size")
        if not size:
            raise ConfigError(f"{type(model).__name__} has no pretrained_cfg input size: pass example=(N, C, H, W) "
                              "or an example tensor to verify the fused model on")
        example = (2, *size)
    if isinstance(example, torch.Tensor):
        return (example.to(device),)
    if isinstance(example, (tuple, list)) and example and all(isinstance(s, int) for s in example):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(*example, generator=g).to(device),)  # type: ignore[misc]
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(t.to(device) for t in example)  # type: ignore[union-attr]
    raise ConfigError(f"example must be a tensor, a sequence of tensors or a shape tuple, got {type(example).__name__}")


def _run(model: nn.Module, args: tuple[torch.Tensor, ...], what: str) -> list[torch.Tensor]:
    try:
        return _flat_tensors(model(*args))
    except Exception as exc:
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ConfigError(f"the {what} model fails on the probe input of shape {shapes} "
                          f"({type(exc).__name__}: {str(exc).strip()[:200]}); pass a fitting example=") from None


@torch.no_grad()
def fuse_with_report(
    model: nn.Module,
    example: torch.Tensor | Sequence[torch.Tensor] | tuple[int, ...] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    verify: bool = True,
) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse` that also returns a :class:`FuseReport` of what was folded and the measured deviation."""
    if rtol < 0 or atol < 0:
        raise ConfigError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    report = FuseReport()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    fused = copy.deepcopy(model).eval()
    args = _probe(model, example, device) if verify else ()
    ref = _run(fused, args, "original") if verify else []

    hooks = ("fuse", "reparameterize", "switch_to_deploy")
    report.reparameterized = [n for n, m in fused.named_modules() if any(hasattr(m, h) for h in hooks)]
    holder = nn.Sequential(fused)  # timm's pass visits children only: let it see the root as well
    fused = reparameterize_model(holder, inplace=True)[0]

    names: dict[int, int] = {}
    for _, m in fused.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    pairs = [p for p in _find_pairs(fused, "", report)
             if names[id(fused.get_submodule(p[1]))] == 1 and names[id(fused.get_submodule(p[2]))] == 1]
    linear = [p for p in pairs if p[0] == "linear"]
    if linear:  # Linear + BatchNorm1d folds only when BN normalises the linear's features: output (N, C)
        ndim: dict[str, int] = {}
        if not verify:
            args = _probe(model, example, device)
        handles = [fused.get_submodule(p[1]).register_forward_hook(
            lambda _m, _i, o, n=p[1]: ndim.__setitem__(n, o.dim())) for p in linear]
        try:
            _run(fused, args, "re-parameterised")
        finally:
            for h in handles:
                h.remove()
        pairs = [p for p in pairs if p[0] == "conv" or ndim.get(p[1]) == 2]
    for kind, layer_name, bn_name in pairs:
        _fold(fused, kind, layer_name, bn_name)
        (report.conv_bn if kind == "conv" else report.linear_bn).append((layer_name, bn_name))
    report.remaining_bn = [n for n, m in fused.named_modules() if isinstance(m, _BatchNorm)]

    if verify:
        out = _run(fused, args, "fused")
        if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref, strict=False)):
            raise FuseError(f"fusing {type(model).__name__} changed its outputs' structure: "
                            f"{[tuple(r.shape) for r in ref]} -> {[tuple(o.shape) for o in out]}; "
                            "the original model is unchanged")
        max_abs, max_rel, worst_ok = 0.0, 0.0, True
        for o, r in zip(out, ref, strict=True):
            if not r.is_floating_point():
                if not torch.equal(o, r):
                    worst_ok = False
                continue
            diff = float((o.double() - r.double()).abs().max()) if r.numel() else 0.0
            scale = float(r.double().abs().max()) if r.numel() else 0.0
            if not (diff <= atol + rtol * scale):  # also catches NaN
                worst_ok = False
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
        report.max_abs_err, report.max_rel_err = max_abs, max_rel
        if not worst_ok:
            raise FuseError(
                f"the fused {type(model).__name__} differs from the original by up to {max_abs:.3g} "
                f"({max_rel:.3g} of the largest output; allowed atol={atol:g} + rtol={rtol:g} x largest): "
                f"{report.summary()}. The original model is unchanged; a module whose forward is not "
                "what its children suggest can cause this — pass verify=False only if you know the folds are exact"
            )
    return fused, report


def fuse(
    model: nn.Module,
    example: torch.Tensor | Sequence[torch.Tensor] | tuple[int, ...] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    verify: bool = True,
) -> nn.Module:
    """An inference copy of ``model`` with branches re-parameterised and every Conv–BN / Linear–BN folded.

    Args:
        model: Any model (timm's, ours, or a plain ``nn.Module``); it is not modified.
        example: Probe input (tensor, tuple of tensors, or a shape) for the check; a batch of 2 at the model's
            ``pretrained_cfg`` input size when omitted.
        rtol: Allowed deviation relative to the largest absolute reference output.
        atol: Allowed absolute deviation on top of ``rtol``.
        verify: Compare the fused model with the original on the probe (and refuse if they differ).

    Returns:
        The fused copy, in eval mode.

    Raises:
        FuseError: The fused copy deviates from the original on the probe batch by more than allowed.
        ConfigError: No probe input can be made or the model fails on it.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        ...                   nn.Linear(8 * 6 * 6, 4), nn.BatchNorm1d(4)).eval()
        >>> f = fuse(m, (2, 3, 8, 8))
        >>> [type(x).__name__ for x in f]
        ['Conv2d', 'Identity', 'ReLU', 'Flatten', 'Linear', 'Identity']
    """
    return fuse_with_report(model, example, rtol=rtol, atol=atol, verify=verify)[0]

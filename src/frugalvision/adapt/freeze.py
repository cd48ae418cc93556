"""Finding a model's parts (embedding, blocks, head), freezing them, and reporting what trains.

Discovery is generic: it works on timm models (ViTs' ``blocks``, conv nets' ``stages`` / ``layerN`` / ``blocks``)
and on ours, and every rule can be overridden with explicit module names.

- **blocks**: the shallowest ``blocks`` / ``stages`` / ``layers`` / ``levels`` container (or ``layer1..N``),
  expanded one level when its children are stages (``stages.0.blocks.1``, ``layer2.0``, ``blocks.3.1``).
- **embedding**: the parameterised siblings of the block container registered before it (``patch_embed``,
  ``stem``, ``conv1`` + ``bn1``).
- **classifier**: timm's ``pretrained_cfg["classifier"]``, else ``get_classifier()``, else ``head``/``fc``/
  ``classifier``.
- **post-block modules**: the parameterised siblings registered after the block container (``norm``, ``head``).
"""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "AdaptReport",
    "ModelParts",
    "find_blocks",
    "find_classifier",
    "find_embedding",
    "find_parts",
    "optimizer_state_bytes",
    "set_trainable",
    "trainable_parameter_names",
]

_BLOCK_ATTRS = ("blocks", "stages", "layers", "levels")
_HEAD_ATTRS = ("head", "fc", "classifier")


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def check_module_names(model: nn.Module, names: Iterable[str], what: str = "layer") -> list[str]:
    """Return ``names`` if each is a sub-module of ``model``; otherwise raise a :class:`ConfigError` with hints.

    Example:
        >>> check_module_names(nn.Sequential(nn.Linear(2, 2)), ["0"])
        ['0']
        >>> check_module_names(nn.Sequential(nn.Linear(2, 2)), ["1"])
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: layer '1' does not exist in Sequential; list them with ...
    """
    mods = _modules(model)
    out = []
    for n in names:
        if n not in mods or n == "":
            close = difflib.get_close_matches(n, [m for m in mods if m], n=4, cutoff=0.5)
            hint = (f"close names: {', '.join(close)}" if close
                    else "list them with [n for n, _ in model.named_modules()]")
            raise ConfigError(f"{what} {n!r} does not exist in {type(model).__name__}; {hint}")
        out.append(n)
    return out


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_container(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Sequential | nn.ModuleList) and len(m) > 0


def _expand(prefix: str, container: nn.Module) -> list[str]:
    children = list(container.named_children())
    inner = [getattr(c, "blocks", None) for _, c in children]
    if all(_is_container(b) for b in inner):  # stages holding a `blocks` container (ConvNeXt, Swin, FasterViT)
        return [f"{prefix}.{n}.blocks.{j}" for (n, _), b in zip(children, inner, strict=True) for j, _ in
                b.named_children()]
    if all(isinstance(c, nn.Sequential) and len(c) > 0 for _, c in children):  # stages as plain Sequentials
        return [f"{prefix}.{n}.{j}" for n, c in children for j, _ in c.named_children()]
    return [f"{prefix}.{n}" for n, _ in children]


def _block_container(model: nn.Module) -> tuple[str, list[str]] | None:
    """``(parent name, container names)`` of the shallowest block container, or ``None``."""
    found: list[tuple[int, int, str, list[str]]] = []
    for order, (name, mod) in enumerate(model.named_modules()):
        depth = name.count(".") + 1 if name else 0
        for attr in _BLOCK_ATTRS:
            if _is_container(getattr(mod, attr, None)) and len(getattr(mod, attr)) >= 1:
                found.append((depth, order, name, [attr]))
                break
        else:
            numbered = sorted((int(m.group(1)), a) for a in dict(mod.named_children())
                              if (m := re.fullmatch(r"layer(\d+)", a)) and _is_container(getattr(mod, a)))
            if len(numbered) >= 2:
                found.append((depth, order, name, [a for _, a in numbered]))
    if not found:
        return None
    _, _, parent, attrs = min(found)
    return parent, attrs


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def find_blocks(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Names of the model's blocks in forward order (``layers`` overrides discovery and is checked).

    Example:
        >>> import timm
        >>> find_blocks(timm.create_model("test_vit"))[:2]
        ['blocks.0', 'blocks.1']
        >>> find_blocks(timm.create_model("test_resnet"))[:3]
        ['layer1.0', 'layer2.0', 'layer3.0']
    """
    if layers is not None:
        if not layers:
            raise ConfigError("layers is empty; give at least one module name or leave it unset")
        return check_module_names(model, layers)
    found = _block_container(model)
    if found is None:
        raise ConfigError(
            f"cannot find the blocks of {type(model).__name__} (no blocks/stages/layers/levels/layerN container); "
            "pass layers=[...] with the module names of its blocks in forward order"
        )
    parent, attrs = found
    mods = _modules(model)
    if len(attrs) > 1:  # layer1..N: each is a stage of blocks
        return [f"{_join(parent, a)}.{j}" for a in attrs for j, _ in mods[_join(parent, a)].named_children()]
    return _expand(_join(parent, attrs[0]), mods[_join(parent, attrs[0])])


def _siblings(model: nn.Module) -> tuple[str, list[str], list[str]] | None:
    """Parent name and the parameterised children before / after its block container(s)."""
    found = _block_container(model)
    if found is None:
        return None
    parent, attrs = found
    children = list(_modules(model)[parent].named_children())
    names = [n for n, _ in children]
    first, last = names.index(attrs[0]), names.index(attrs[-1])
    before = [_join(parent, n) for n, c in children[:first] if _has_params(c)]
    after = [_join(parent, n) for n, c in children[last + 1:] if _has_params(c)]
    return parent, before, after


def find_embedding(model: nn.Module, embed: Sequence[str] | None = None) -> list[str]:
    """Module names of the patch embedding / stem (what freeze-embed freezes).

    Example:
        >>> import timm
        >>> find_embedding(timm.create_model("test_vit")), find_embedding(timm.create_model("test_resnet"))
        (['patch_embed'], ['conv1', 'bn1'])
    """
    if embed is not None:
        return check_module_names(model, embed, "embedding module")
    sib = _siblings(model)
    if sib is not None and sib[1]:
        return sib[1]
    for attr in ("patch_embed", "stem", "conv_stem"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return [attr]
    raise ConfigError(f"cannot find the embedding/stem of {type(model).__name__}; pass embed=[...] module names")


def find_classifier(model: nn.Module, head: Sequence[str] | None = None) -> list[str]:
    """Module names of the final classifier (what a linear probe trains).

    Example:
        >>> import timm
        >>> find_classifier(timm.create_model("test_convnext"))
        ['head.fc']
    """
    if head is not None:
        return check_module_names(model, head, "head module")
    mods = _modules(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        names = [names] if isinstance(names, str) else list(names)
        if all(n in mods and _has_params(mods[n]) for n in names):
            return names
    get = getattr(model, "get_classifier", None)
    if callable(get):
        clf = get()
        clfs = clf if isinstance(clf, tuple | list) else (clf,)
        hits = [n for n, m in mods.items() if n and any(m is c for c in clfs) and _has_params(m)]
        if hits:
            return hits
    for attr in _HEAD_ATTRS:
        if attr in mods and _has_params(mods[attr]):
            return [attr]
    raise ConfigError(f"cannot find the classifier of {type(model).__name__}; pass head=[...] module names")


@dataclass
class ModelParts:
    """The parts of a model that adaptation methods freeze or train (module names).

    Attributes:
        blocks: Blocks in forward order.
        embedding: Patch embedding / stem.
        classifier: Final classifier layer(s).
        post: Parameterised modules after the blocks (final norm, head), classifier included.
    """

    blocks: list[str]
    embedding: list[str]
    classifier: list[str]
    post: list[str] = field(default_factory=list)


def find_parts(model: nn.Module, layers: Sequence[str] | None = None, embed: Sequence[str] | None = None,
               head: Sequence[str] | None = None) -> ModelParts:
    """Discover blocks, embedding, classifier and post-block modules (each overridable).

    Example:
        >>> import timm
        >>> p = find_parts(timm.create_model("test_vit"))
        >>> p.embedding, p.classifier, p.post
        (['patch_embed'], ['head'], ['norm', 'head'])
    """
    blocks = find_blocks(model, layers)
    classifier = find_classifier(model, head)
    embedding = find_embedding(model, embed)
    sib = _siblings(model)
    post = list(sib[2]) if sib is not None else []
    for c in classifier:
        if not any(c == p or c.startswith(p + ".") for p in post):
            post.append(c)
    return ModelParts(blocks, embedding, classifier, post)


# --------------------------------------------------------------------------------------------- freezing
def _covered(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


_EVAL_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[torch.utils.hooks.RemovableHandle]] = (
    weakref.WeakKeyDictionary())


def _keep_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.eval()


def set_trainable(model: nn.Module, train: Sequence[str], frozen_eval: bool = True) -> list[str]:
    """Make exactly the parameters under the module/parameter names ``train`` trainable; freeze the rest.

    With ``frozen_eval`` every maximal fully-frozen sub-module that holds parameters or buffers runs in eval
    mode even while the model trains (batch-norm statistics stay fixed, dropout/drop-path are off inside it),
    so a frozen part really is a fixed function. ``""`` in ``train`` means the whole model.

    Returns:
        The names of the trainable parameters.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        >>> set_trainable(m, ["2"])
        ['2.weight', '2.bias']
        >>> _ = m.train(); m(torch.randn(4, 2)).shape, m[1].training
        (torch.Size([4, 1]), False)
    """
    check_module_names(model, [t for t in train if t and t not in dict(model.named_parameters())])
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(_covered(n, train))
        if p.requires_grad:
            names.append(n)
    for h in _EVAL_HOOKS.pop(model, []):
        h.remove()
    if frozen_eval:
        handles = []

        def visit(mod: nn.Module) -> None:
            if not any(p.requires_grad for p in mod.parameters()):
                if _has_params(mod) or any(True for _ in mod.buffers()):
                    handles.append(mod.register_forward_pre_hook(_keep_eval))
                return
            for c in mod.children():
                visit(c)

        visit(model)
        _EVAL_HOOKS[model] = handles
    return names


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (measured: call it after at least one step).

    Example:
        >>> p = nn.Parameter(torch.zeros(10)); opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(10); opt.step(); optimizer_state_bytes(opt)
        40
    """
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                key = st.data_ptr() if st.nbytes() else id(v)
                if key in seen:
                    continue
                seen.add(key)
                total += st.nbytes()
    return total


# --------------------------------------------------------------------------------------------- report
@dataclass
class AdaptReport:
    """Trainable-parameter report of an adapted model (``str(report)`` is a table).

    Attributes:
        method: The method's registered name.
        optimizer: What optimiser it built (``SGD(lr=0.01, momentum=0.9)``).
        total: Parameters of the model.
        trainable: Trainable parameters.
        rows: ``(part, trainable, total)`` per top-level part, blocks listed one by one.
        optimizer_state_bytes: Measured bytes of the optimiser state (``None`` until a step was taken).
        notes: Extra lines (stages, chosen layers).
    """

    method: str
    optimizer: str
    total: int
    trainable: int
    rows: list[tuple[str, int, int]]
    optimizer_state_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        """Trainable / total parameters."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        w = max([len(r[0]) for r in self.rows] + [8])
        lines = [f"adapt: {self.method}  optimiser: {self.optimizer}",
                 f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.trainable_fraction:.2f} %)"]
        lines += [f"  {'part':<{w}}  {'trainable':>11}  {'total':>11}"]
        for name, t, n in self.rows:
            flag = "" if t == n else ("  frozen" if t == 0 else "  partly frozen")
            lines.append(f"  {name:<{w}}  {t:>11,}  {n:>11,}{flag}")
        if self.optimizer_state_bytes is not None:
            lines.append(f"optimiser state (measured): {self.optimizer_state_bytes / 2**20:.3f} MiB")
        lines += self.notes
        return "\n".join(lines)


def build_report(model: nn.Module, method: str, optimizer: str, blocks: Sequence[str] = ()) -> AdaptReport:
    """Count trainable / total parameters per top-level part of ``model`` (each block on its own row)."""
    rows: dict[str, list[int]] = {}
    total = trainable = 0
    for n, p in model.named_parameters():
        part = next((b for b in blocks if n.startswith(b + ".")), None) or n.split(".")[0]
        row = rows.setdefault(part, [0, 0])
        row[1] += p.numel()
        total += p.numel()
        if p.requires_grad:
            row[0] += p.numel()
            trainable += p.numel()
    return AdaptReport(method, optimizer, total, trainable, [(k, v[0], v[1]) for k, v in rows.items()])

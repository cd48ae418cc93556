"""SubTuning: fine-tune only a few blocks, chosen greedily from the fine-tuning profile.

The *fine-tuning profile* trains each block alone (with the classifier) and measures validation accuracy.
Greedy selection then adds, one at a time, the block whose addition gives the best validation accuracy, under an
optional parameter or compute budget; with ``k`` unset it stops by itself when the gain of the best next block
falls below ``min_gain`` accuracy points (the answer to "which few layers should we tune for this task and data?").

Profiling is cheap because the frozen prefix is computed once: a caching pass records the input of every block
(and the output of the last), and a run that tunes blocks ``S`` starts at the earliest block of ``S``: the blocks
before it are replaced by stubs returning zeros of the recorded shapes and the earliest block's input is swapped
for the cached activations. The stem (the embedding modules) is stubbed the same way, and the model is called on
a zero image, so any model whose blocks take the running activation as their first positional argument works,
with no per-architecture code; the cached forward equals the real forward (tested). Data are cached
without re-augmenting (``copies`` augmented passes when the dataset augments).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..engine.task import Accuracy, ClassificationTask, MeanLoss, Metric
from ..engine.trainer import TrainConfig, Trainer, build_optimizer, resolve_device, seed_everything
from ..errors import ConfigError
from .config import AdaptConfig, register_method
from .freeze import ModelParts, check_module_names, find_parts, set_trainable

__all__ = [
    "PrefixCache",
    "SubTuningConfig",
    "SubTuningResult",
    "block_costs",
    "measure_profile_speedup",
    "plot_profile",
    "subtuning_select",
]


# --------------------------------------------------------------------------------------------- cache
class PrefixCache:
    """Activations at every block boundary of a frozen model, for a few datasets ("splits").

    Args:
        model: The model (its current weights are the frozen prefix).
        blocks: Block names in forward order.
        datasets: ``{split: dataset of (image, label)}``.
        batch_size: Batch size of the caching pass.
        device: Where to run and keep the cache.
        copies: Passes over each dataset (more than 1 only makes sense when it augments randomly).
        progress: Show a progress bar.
        stubs: Frozen modules before the first block (the stem) that cached runs skip too (their outputs are
            replaced by zeros of the recorded shapes; the first block's input comes from the cache anyway).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], datasets: dict[str, Dataset], batch_size: int = 64,
                 device: str | torch.device = "cpu", copies: int = 1, progress: bool = False,
                 stubs: Sequence[str] = ()) -> None:
        self.blocks = list(blocks)
        self.stubs = [s for s in stubs if s not in self.blocks]
        self.device = resolve_device(device)
        self.inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.final: dict[str, list[Any]] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.out_spec: dict[str, tuple[Any, list[Any]]] = {}
        self.image_shape: tuple[int, ...] = ()
        self.splits = list(datasets)
        mods = dict(model.named_modules())
        model = model.to(self.device)
        was_training = model.training
        model.eval()
        try:
            for split, ds in datasets.items():
                self._cache_split(model, mods, split, ds, batch_size, copies, progress)
        finally:
            model.train(was_training)

    def _cache_split(self, model: nn.Module, mods: dict[str, nn.Module], split: str, ds: Dataset, batch_size: int,
                     copies: int, progress: bool) -> None:
        ins: dict[str, list[torch.Tensor]] = {b: [] for b in self.blocks}
        final: list[list[Any]] = []
        labels: list[torch.Tensor] = []
        last = self.blocks[-1]

        def pre(name: str) -> Any:
            def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ConfigError(f"block {name} does not take a tensor as its first positional argument; "
                                      "profile it with cache=False")
                ins[name].append(args[0].detach())
            return hook

        def post(name: str) -> Any:
            def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                leaves, spec = tree_flatten(out)
                self.out_spec[name] = (spec, [(tuple(v.shape[1:]), v.dtype) if isinstance(v, torch.Tensor) else v
                                              for v in leaves])
                if name == last:
                    final.append([v.detach() if isinstance(v, torch.Tensor) else v for v in leaves])
            return hook

        handles = []
        for b in self.blocks:
            handles.append(mods[b].register_forward_pre_hook(pre(b)))
            handles.append(mods[b].register_forward_hook(post(b)))
        for b in self.stubs:
            handles.append(mods[b].register_forward_hook(post(b)))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        from tqdm.auto import tqdm

        try:
            with torch.no_grad():
                for _ in range(copies):
                    for batch in tqdm(loader, desc=f"cache {split}", disable=not progress, leave=False):
                        x, y = batch[0].to(self.device), batch[1]
                        self.image_shape = tuple(x.shape[1:])
                        model(x)
                        labels.append(torch.as_tensor(y))
        finally:
            for h in handles:
                h.remove()
        missing = [b for b in self.blocks if not ins[b]]
        if missing:
            raise ConfigError(f"blocks {missing} were never called in the model's forward; check layers=")
        self.inputs[split] = {b: torch.cat(v) for b, v in ins.items()}
        self.final[split] = [torch.cat([f[i] for f in final]) if isinstance(final[0][i], torch.Tensor) else final[0][i]
                             for i in range(len(final[0]))]
        self.labels[split] = torch.cat(labels).long()

    def __len__(self) -> int:
        return sum(len(v) for v in self.labels.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached activations."""
        n = sum(t.numel() * t.element_size() for s in self.inputs.values() for t in s.values())
        return n + sum(t.numel() * t.element_size() for s in self.final.values() for t in s
                       if isinstance(t, torch.Tensor))

    @contextlib.contextmanager
    def inject(self, model: nn.Module, start: int, split: int, index: torch.Tensor) -> Iterator[torch.Tensor]:
        """Run ``model`` from block ``start`` (``len(blocks)``: from the head) on cached samples ``index``.

        Yields the zero image to call the model with.
        """
        name = self.splits[split]
        mods = dict(model.named_modules())
        b = len(index)
        index = index.to(self.device)
        stubbed: list[nn.Module] = []
        handle = None
        try:
            for blk in self.stubs:
                spec, leaves = self.out_spec[blk]
                vals = [torch.zeros((b, *v[0]), dtype=v[1], device=self.device) if isinstance(v, tuple)
                        and len(v) == 2 and isinstance(v[1], torch.dtype) else v for v in leaves]
                mods[blk].forward = _Const(tree_unflatten(vals, spec))  # type: ignore[method-assign]
                stubbed.append(mods[blk])
            for j in range(start):
                blk = self.blocks[j]
                spec, leaves = self.out_spec[blk]
                if j == len(self.blocks) - 1:
                    vals = [v[index] if isinstance(v, torch.Tensor) else v for v in self.final[name]]
                else:
                    vals = [torch.zeros((b, *v[0]), dtype=v[1], device=self.device) if isinstance(v, tuple)
                            and len(v) == 2 and isinstance(v[1], torch.dtype) else v for v in leaves]
                out = tree_unflatten(vals, spec)
                mods[blk].forward = _Const(out)  # type: ignore[method-assign]
                stubbed.append(mods[blk])
            if start < len(self.blocks):
                x = self.inputs[name][self.blocks[start]][index]
                handle = mods[self.blocks[start]].register_forward_pre_hook(lambda m, a: (x, *a[1:]))
            yield torch.zeros((b, *self.image_shape), device=self.device)
        finally:
            for m in stubbed:
                del m.forward
            if handle is not None:
                handle.remove()


class _Const:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


class _BatchItems(Dataset):
    """Each item is a whole batch ``(indices, labels, split code)`` of in-memory samples.

    Training items draw ``batch`` random indices (the engine seeds every item from ``(seed, epoch, index)``, so
    runs are reproducible); evaluation items are consecutive chunks covering every sample once. Serving whole
    batches keeps per-sample data-loading overhead out of the many short profiling runs.
    """

    def __init__(self, labels: torch.Tensor, code: int, batch: int, train: bool) -> None:
        self.labels, self.code, self.batch, self.train = labels, code, min(batch, len(labels)), train

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch if self.train else -(-n // self.batch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self.labels)
        if self.train:
            idx = torch.randperm(n)[: self.batch]
        else:
            idx = torch.arange(i * self.batch, min(n, (i + 1) * self.batch))
        return idx, self.labels[idx], torch.tensor(self.code)


class _FlatMeanLoss(MeanLoss):
    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        if loss is not None:
            n = batch[1].numel()
            self.state["sum"] += float(loss.detach()) * n
            self.state["count"] += n


class _BatchTask(ClassificationTask):
    """Classification on in-memory samples served as whole batches: ``(indices, labels, split code)``.

    With a cache the model runs from block ``start`` on cached activations; without, on the stored images.
    """

    def __init__(self, start: int, cache: PrefixCache | None = None,
                 images: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(topk=(1,))
        self.start, self.cache, self.images = start, cache, images

    def forward(self, model: nn.Module, batch: Any) -> Any:
        index, code = batch[0].reshape(-1), int(batch[2].reshape(-1)[0])
        if self.cache is None:
            assert self.images is not None
            return model(self.images[code][index.to(self.images[code].device)])
        with self.cache.inject(model, self.start, code, index) as stub:
            return model(stub)

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[1].reshape(-1))

    def metrics(self) -> list[Metric]:
        return [_FlatMeanLoss(), Accuracy(topk=(1,))]


# --------------------------------------------------------------------------------------------- costs
def block_costs(model: nn.Module, blocks: Sequence[str], example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{block: (parameters, forward FLOPs per sample)}``, FLOPs measured by ``torch.utils.flop_counter``.

    Example:
        >>> import timm
        >>> m = timm.create_model("test_vit")
        >>> c = block_costs(m, ["blocks.0"], torch.randn(1, 3, 160, 160)); c["blocks.0"][0] > 0 < c["blocks.0"][1]
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    mods = dict(model.named_modules())
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example[:1])
    finally:
        model.train(was)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {}
    for b in blocks:
        flops = sum(counts.get(f"{root}.{b}", {}).values())
        out[b] = (sum(p.numel() for p in mods[b].parameters()), int(flops))
    return out


# --------------------------------------------------------------------------------------------- selection
@dataclass
class Trial:
    """One training run of the profile or of a greedy step.

    Attributes:
        layers: The tuned blocks (the classifier always trains too).
        acc: Validation top-1 accuracy (percent).
        loss: Validation loss.
        params: Trainable parameters of the tuned blocks.
        compute: Forward FLOPs per sample that a step recomputes (from the earliest tuned block on), as a
            fraction of all blocks' FLOPs.
        seconds: Wall time of the run.
    """

    layers: tuple[str, ...]
    acc: float
    loss: float
    params: int
    compute: float
    seconds: float


@dataclass
class SubTuningResult:
    """What profiling and greedy selection found.

    Attributes:
        blocks: Candidate blocks in forward order.
        baseline: The classifier-only run (no block tuned).
        profile: One run per block, in block order (the fine-tuning profile).
        steps: The accepted greedy steps (``steps[i].layers`` is the selection after ``i + 1`` additions).
        rejected: The best candidate of the round that stopped the search (auto k), if any.
        chosen: The selected blocks.
        wall_time_s: Total time of caching, profiling and selection.
        cache_time_s: Time of the caching pass.
        cache_bytes: Size of the cached activations.
        trials: Every run, in order.
    """

    blocks: list[str]
    baseline: Trial
    profile: list[Trial]
    steps: list[Trial]
    rejected: Trial | None
    chosen: list[str]
    wall_time_s: float
    cache_time_s: float = 0.0
    cache_bytes: int = 0
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        def t(x: Trial | None) -> dict[str, Any] | None:
            return None if x is None else {"layers": list(x.layers), "val_acc": x.acc, "val_loss": x.loss,
                                           "params": x.params, "compute": x.compute, "seconds": x.seconds}
        return {"chosen": self.chosen, "baseline": t(self.baseline), "profile": [t(p) for p in self.profile],
                "steps": [t(s) for s in self.steps], "rejected": t(self.rejected), "wall_time_s": self.wall_time_s,
                "cache_time_s": self.cache_time_s, "cache_bytes": self.cache_bytes, "runs": len(self.trials)}


class _Runner:
    """Trains a selection of blocks + the classifier from the initial weights and measures validation accuracy."""

    def __init__(self, model: nn.Module, blocks: list[str], classifier: list[str], train: Dataset, val: Dataset,
                 cfg: SubTuningConfig, stem: Sequence[str] = ()) -> None:
        self.model, self.blocks, self.classifier, self.cfg = model, blocks, classifier, cfg
        self.device = resolve_device(cfg.device)
        self.init = copy.deepcopy(model.state_dict())
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        self.images: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}
        for code, ds in enumerate((train, val)):
            xs, ys = [], []
            for _ in range(cfg.copies if code == 0 else 1):
                for batch in DataLoader(ds, batch_size=cfg.batch_size, shuffle=False):
                    xs.append(batch[0])
                    ys.append(torch.as_tensor(batch[1]))
            self.images[code], self.labels[code] = torch.cat(xs).to(self.device), torch.cat(ys).long()
        self.load_time = time.perf_counter() - t0
        self.costs = block_costs(model, blocks, self.images[0][:1])
        self.total_flops = max(sum(f for _, f in self.costs.values()), 1)
        self.cache: PrefixCache | None = None
        self.cache_time = 0.0
        if cfg.cache:
            t0 = time.perf_counter()
            self.cache = PrefixCache(model, blocks, {s: TensorDataset(self.images[c], self.labels[c]) for c, s in
                                                     enumerate(("train", "val"))}, cfg.batch_size, self.device,
                                     progress=cfg.progress, stubs=stem)
            self.cache_time = time.perf_counter() - t0

    def params(self, layers: Sequence[str]) -> int:
        return sum(self.costs[b][0] for b in layers)

    def compute(self, layers: Sequence[str]) -> float:
        if not layers:
            return 0.0
        start = min(self.blocks.index(b) for b in layers)
        return sum(self.costs[b][1] for b in self.blocks[start:]) / self.total_flops

    def fits(self, layers: Sequence[str]) -> bool:
        c = self.cfg
        return ((c.max_params is None or self.params(layers) <= c.max_params)
                and (c.max_compute is None or self.compute(layers) <= c.max_compute + 1e-9))

    def run(self, layers: Sequence[str], cached: bool | None = None) -> Trial:
        cached = self.cache is not None if cached is None else cached
        t0 = time.perf_counter()
        self.model.load_state_dict(self.init)
        set_trainable(self.model, [*layers, *self.classifier], frozen_eval=True)
        c = self.cfg
        lr = c.profile_lr or c.lr
        groups = _param_groups(self.model, self.classifier, lr, c.head_lr or lr, c.weight_decay)
        opt = build_optimizer(groups, "adamw", lr, c.weight_decay)
        tc = TrainConfig(epochs=c.profile_epochs, batch_size=1, device=str(self.device), seed=c.seed, progress=False,
                         eval_every=0, amp="none", schedule="cosine")
        if cached and self.cache is None:
            raise ConfigError("no activation cache was built (cache=False)")
        start = min((self.blocks.index(b) for b in layers), default=len(self.blocks))
        task = _BatchTask(start, self.cache) if cached else _BatchTask(start, images=self.images)
        tr = _BatchItems(self.labels[0], 0, c.batch_size, train=True)
        va = _BatchItems(self.labels[1], 1, c.batch_size, train=False)
        res = Trainer(self.model, tc, tr, va, task, optimizer=opt).fit()
        return Trial(tuple(layers), float(res.final["acc1"]), float(res.final["loss"]), self.params(layers),
                     self.compute(layers), time.perf_counter() - t0)


def _param_groups(model: nn.Module, head: Sequence[str], lr: float, head_lr: float, weight_decay: float
                  ) -> list[dict[str, Any]]:
    """Trainable parameters in groups: (blocks | head) x (decayed | norms and biases)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            is_head = any(n == h or n.startswith(h + ".") for h in head)
            groups.setdefault((is_head, p.ndim <= 1), []).append(p)
    return [{"params": ps, "lr": head_lr if h else lr, "weight_decay": 0.0 if nd else weight_decay}
            for (h, nd), ps in sorted(groups.items())]


def subtuning_select(model: nn.Module, config: SubTuningConfig, parts: ModelParts | None = None) -> SubTuningResult:
    """Profile every candidate block and select blocks greedily (see :class:`SubTuningConfig`).

    The model's weights are restored afterwards; only ``requires_grad`` flags are left to the caller.
    """
    cfg = config
    parts = parts or find_parts(model, cfg.layers, cfg.embed, cfg.head)
    blocks = list(parts.blocks)
    candidates = check_module_names(model, cfg.candidates, "candidate layer") if cfg.candidates else blocks
    not_blocks = [c for c in candidates if c not in blocks]
    if not_blocks:
        raise ConfigError(f"candidates {not_blocks} are not blocks of the model ({', '.join(blocks)}); "
                          "pass them in layers= too")
    _check_k(cfg.k, candidates, model)
    _check_k(cfg.max_k, candidates, model, "max_k")
    train, val = _datasets(cfg)
    t0 = time.perf_counter()
    runner = _Runner(model, blocks, parts.classifier, train, val, cfg, _frozen_stem(parts, candidates))
    trials: list[Trial] = []
    from tqdm.auto import tqdm

    limit = cfg.k or cfg.max_k or len(candidates)
    bar = tqdm(total=1 + len(candidates), desc="subtuning profile", disable=not cfg.progress)

    def run(layers: Sequence[str]) -> Trial:
        t = runner.run(layers)
        trials.append(t)
        bar.update(1)
        bar.set_postfix({"last": ",".join(layers) or "head", "acc": f"{t.acc:.1f}"}, refresh=False)
        return t

    fitting_blocks = [b for b in candidates if runner.fits([b])]
    if not fitting_blocks:
        bar.close()
        model.load_state_dict(runner.init)
        raise ConfigError(f"no single block fits the budget (max_params={cfg.max_params}, "
                          f"max_compute={cfg.max_compute}); the smallest block has "
                          f"{min(runner.params([b]) for b in candidates):,} params and the cheapest recomputes "
                          f"{min(runner.compute([b]) for b in candidates):.0%} of the blocks' FLOPs")
    try:
        baseline = run([])
        profile = [run([b]) for b in candidates]
        fitting = [p for p in profile if p.layers[0] in fitting_blocks]
        selected: list[str] = []
        steps: list[Trial] = []
        current = baseline
        rejected = None
        round_trials = fitting
        while True:
            best = max(round_trials, key=lambda t: (t.acc, -t.loss))
            gain = best.acc - current.acc
            if cfg.k is None and gain < cfg.min_gain:
                rejected = best
                break
            selected = [b for b in blocks if b in best.layers]
            steps.append(best)
            current = best
            if len(selected) >= limit:
                break
            options = [b for b in candidates if b not in selected and runner.fits([*selected, b])]
            if not options:
                break
            bar.total += len(options)
            round_trials = [run([b2 for b2 in blocks if b2 in (*selected, b)]) for b in options]
    finally:
        bar.close()
        model.load_state_dict(runner.init)
    return SubTuningResult(blocks=candidates, baseline=baseline, profile=profile, steps=steps, rejected=rejected,
                           chosen=selected, wall_time_s=time.perf_counter() - t0, cache_time_s=runner.cache_time,
                           cache_bytes=runner.cache.nbytes if runner.cache else 0, trials=trials)


def _frozen_stem(parts: ModelParts, candidates: Sequence[str]) -> list[str]:
    """Embedding modules that never train during profiling (skipped by cached runs)."""
    return [e for e in parts.embedding if not any(c == e or c.startswith(e + ".") for c in candidates)
            and e not in parts.classifier]


def _check_k(k: int | None, candidates: Sequence[str], model: nn.Module, key: str = "k") -> None:
    if k is not None and k > len(candidates):
        raise ConfigError(f"{key}={k} is larger than the {len(candidates)} candidate blocks of "
                          f"{type(model).__name__} ({candidates[0]} ... {candidates[-1]}); use {key} <= "
                          f"{len(candidates)}")


def _datasets(cfg: SubTuningConfig) -> tuple[Dataset, Dataset]:
    if cfg.data is None:
        raise ConfigError("subtuning needs data= (training samples) to profile the blocks, or tune=[...] to "
                          "skip profiling")
    train, val = cfg.data, cfg.val_data
    if val is None:  # hold out a deterministic fraction of the training data
        n = len(train)
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(n, generator=g).tolist()
        n_val = max(1, round(cfg.val_fraction * n))
        if n - n_val < 2:
            raise ConfigError(f"the training data ({n} samples) are too few to hold out a validation set; "
                              "pass val_data=")
        train, val = Subset(cfg.data, perm[n_val:]), Subset(cfg.data, perm[:n_val])
    return train, val


@register_method("subtuning")
@dataclass
class SubTuningConfig(AdaptConfig):
    """SubTuning: train only the best few blocks (and the classifier), chosen from the fine-tuning profile.

    Attributes:
        head_lr: Learning rate of the (new) classifier, in profiling and training; ``lr`` when unset. A fresh
            head usually wants a larger rate than pretrained blocks (as a linear probe does).
        data: Training dataset of ``(image, label)`` used to profile the blocks.
        val_data: Validation dataset that scores the selections; ``val_fraction`` of ``data`` when unset.
        val_fraction: Held-out fraction of ``data`` when ``val_data`` is unset.
        k: Number of blocks to select; ``None`` chooses it automatically with ``min_gain``.
        min_gain: Auto k: stop when the best next block adds less than this many accuracy points.
        max_k: Auto k: never select more than this many blocks.
        max_params: Budget: at most this many trainable parameters in the selected blocks.
        max_compute: Budget: at most this fraction of the blocks' forward FLOPs recomputed per step (the part
            from the earliest selected block on).
        tune: Blocks to tune, skipping profiling (module names).
        candidates: Blocks that may be selected (default: every block).
        profile_epochs: Epochs of each profiling run.
        profile_lr: AdamW learning rate of the profiling runs (``lr`` when unset).
        batch_size: Batch size of caching and profiling.
        cache: Cache the frozen prefix's activations (much cheaper); ``False`` runs the full forward each step.
        copies: Augmented passes over ``data`` to cache (1: each sample once).
        seed: Seed of profiling.
        device: Device of profiling.
        progress: Show progress bars.

    Example:
        >>> SubTuningConfig(tune=["blocks.3"]).k is None
        True
    """

    lr: float = 1e-3
    head_lr: float | None = None
    data: Any = field(default=None, repr=False)
    val_data: Any = field(default=None, repr=False)
    val_fraction: float = 0.2
    k: int | None = None
    min_gain: float = 1.0
    max_k: int | None = None
    max_params: int | None = None
    max_compute: float | None = None
    tune: list[str] | None = None
    candidates: list[str] | None = None
    profile_epochs: int = 10
    profile_lr: float | None = None
    batch_size: int = 32
    cache: bool = True
    copies: int = 1
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    result: SubTuningResult | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("k", "max_k"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{key} must be >= 1, got {v}")
        if self.profile_epochs < 1 or self.copies < 1 or self.batch_size < 1:
            raise ValueError("profile_epochs, copies and batch_size must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for key in ("tune", "candidates"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])

    def trainable(self, model: nn.Module, parts: ModelParts) -> Sequence[str]:
        """The selected blocks + the classifier (profiles and selects unless ``tune`` is given)."""
        if self.tune is not None:
            tune = check_module_names(model, self.tune, "layer")
            _check_k(len(tune), parts.blocks, model, "len(tune)")
            return [*tune, *parts.classifier]
        if self.result is None:
            self.result = subtuning_select(model, self, parts)
        return [*self.result.chosen, *parts.classifier]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW (or SGD) with the classifier at ``head_lr``."""
        head = self.parts(model).classifier
        groups = _param_groups(model, head, self.lr, self.head_lr or self.lr, self.weight_decay)
        return build_optimizer(groups, self.optimizer, self.lr, self.weight_decay, self.momentum, False, self.betas)

    def report_notes(self) -> list[str]:
        """Lines for the report: the profile and the chosen blocks."""
        r = self.result
        if r is None:
            return [f"tuned blocks (given): {', '.join(self.tune or [])}"]
        lines = [f"fine-tuning profile (val acc %, classifier only: {r.baseline.acc:.1f}):"]
        lines += [f"  {p.layers[0]:<16} {p.acc:6.1f}" for p in r.profile]
        how = f"k={self.k}" if self.k else f"auto k (min_gain={self.min_gain:g} points)"
        lines.append(f"chosen ({how}): {', '.join(r.chosen) or 'none (classifier only)'} -> val acc "
                     f"{(r.steps[-1].acc if r.steps else r.baseline.acc):.1f}; {len(r.trials)} runs in "
                     f"{r.wall_time_s:.1f} s (cache {r.cache_time_s:.1f} s, {r.cache_bytes / 2**20:.1f} MiB)")
        return lines


# --------------------------------------------------------------------------------------------- plot
def plot_profile(result: SubTuningResult, path: str | Path, title: str = "SubTuning fine-tuning profile",
                 references: dict[str, float] | None = None) -> Path:
    """Write the profile (val accuracy per block) and the greedy path as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_path

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [max(len(result.profile), 3),
                                                                                        3]})
    names = [p.layers[0] for p in result.profile]
    accs = [p.acc for p in result.profile]
    colors = ["tab:orange" if n in result.chosen else "tab:blue" for n in names]
    ax1.bar(range(len(names)), accs, color=colors)
    ax1.axhline(result.baseline.acc, color="k", ls="--", lw=1, label=f"classifier only ({result.baseline.acc:.1f})")
    for label, v in (references or {}).items():
        ax1.axhline(v, ls=":", lw=1.2, label=f"{label} ({v:.1f})", color="tab:green")
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel("validation accuracy (%)")
    ax1.set_title("one block tuned at a time (chosen: orange)")
    lo = min([*accs, result.baseline.acc, *(references or {}).values()])
    ax1.set_ylim(max(0.0, lo - 10), min(100.0, max([*accs, *(references or {}).values(), lo]) + 5))
    ax1.legend(fontsize=8, loc="lower right")
    ks = [0] + [len(s.layers) for s in result.steps]
    path_acc = [result.baseline.acc] + [s.acc for s in result.steps]
    ax2.plot(ks, path_acc, "o-", color="tab:orange", label="greedy selection")
    prev: tuple[str, ...] = ()
    for s in result.steps:
        added = [b for b in s.layers if b not in prev]
        ax2.annotate("+" + ",".join(added), (len(s.layers), s.acc), textcoords="offset points", xytext=(4, -10),
                     fontsize=7)
        prev = s.layers
    if result.rejected is not None:
        ax2.plot([len(result.rejected.layers)], [result.rejected.acc], "x", color="tab:red",
                 label="best next (rejected)")
    ax2.set_xlabel("blocks tuned (k)")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_title("greedy selection")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def measure_profile_speedup(model: nn.Module, config: SubTuningConfig, parts: ModelParts | None = None
                            ) -> dict[str, Any]:
    """Time the fine-tuning profile with and without the activation cache, side by side, and one full fine-tune.

    For every block, the cached and the naive (full forward every step) run train that block + the classifier on
    identical batches; the order alternates from block to block. One run with every block trainable stands for a
    full fine-tune of the same length. The cached total includes building the cache.

    Returns:
        Seconds of each variant, the speed-up and the largest accuracy difference between the two profiles.
    """
    cfg = config
    parts = parts or find_parts(model, cfg.layers, cfg.embed, cfg.head)
    train, val = _datasets(cfg)
    runner = _Runner(model, list(parts.blocks), parts.classifier, train, val, dataclass_replace(cfg, cache=True),
                     _frozen_stem(parts, parts.blocks))
    naive, cached = [], []
    try:
        full = runner.run(parts.blocks, cached=False).seconds
        for i, b in enumerate(parts.blocks):
            pair = [(True, cached), (False, naive)] if i % 2 else [(False, naive), (True, cached)]
            for use_cache, sink in pair:
                sink.append(runner.run([b], cached=use_cache))
        full = (full + runner.run(parts.blocks, cached=False).seconds) / 2
    finally:
        model.load_state_dict(runner.init)
    t_naive = sum(t.seconds for t in naive)
    t_cached = sum(t.seconds for t in cached) + runner.cache_time
    return {"blocks": len(parts.blocks), "naive_s": t_naive, "cached_s": t_cached, "cache_build_s": runner.cache_time,
            "cache_bytes": runner.cache.nbytes if runner.cache else 0, "speedup": t_naive / max(t_cached, 1e-9),
            "full_ft_run_s": full, "full_ft_x_blocks_s": full * len(parts.blocks),
            "max_acc_diff": max(abs(a.acc - b.acc) for a, b in zip(naive, cached, strict=True))}

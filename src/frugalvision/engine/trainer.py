"""One train / evaluate loop for every feature of the package.

The :class:`Trainer` handles devices, mixed precision, gradient clipping, warm-up + cosine LR, progress
bars, safetensors checkpoints with exact resume, and distributed data parallel under ``torchrun``.
What is trained (the loss and metrics) comes from a :class:`~frugalvision.engine.task.Task`.

Exact resume: the data order is a pure function of ``(seed, epoch)`` and every sample's augmentation RNG
is seeded from ``(seed, epoch, index)``, so a run restarted from a checkpoint sees the same batches and the
same random augmentations as an uninterrupted run, and the model's own RNG state (dropout, drop-path) is
restored from the checkpoint. On CPU the result is bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import check_number, config_to_dict
from ..errors import ConfigError, TrainingDivergedError
from ..utils.io import atomic_write_text
from .checkpoint import capture_rng_state, load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_gather_objects, barrier, convert_sync_batchnorm, init_distributed
from .schedule import build_scheduler
from .task import ClassificationTask, Metric, Task, to_device

__all__ = [
    "MAX_LR",
    "FitResult",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "evaluate",
    "resolve_device",
    "seed_everything",
]


MAX_LR = 10.0
"""The largest learning rate a config accepts: beyond it every optimiser here diverges on the first steps."""


@dataclass
class TrainConfig:
    """Settings of one training run (all overridable as ``key=value`` on the CLI).

    Attributes:
        epochs: Passes over the training data.
        max_steps: Stop after this many optimisation steps (overrides ``epochs`` when set).
        batch_size: Global batch size (split evenly over distributed processes).
        eval_batch_size: Batch size for evaluation; ``batch_size`` when unset.
        optimizer: ``adamw`` or ``sgd``.
        lr: Peak learning rate.
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay; norms and biases are excluded.
        momentum: SGD momentum (0 disables it).
        nesterov: Use Nesterov momentum with SGD.
        betas: AdamW betas.
        schedule: ``cosine`` (warm-up then cosine decay) or ``constant`` (warm-up then flat).
        warmup_epochs: Linear warm-up length in epochs (fractions allowed).
        min_lr_ratio: Final LR as a fraction of ``lr`` for the cosine schedule.
        grad_clip: Clip the global gradient norm to this value (``None`` disables).
        amp: Mixed precision: ``auto`` (bf16/fp16 on CUDA, off on CPU), ``none``, ``bf16`` or ``fp16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: Seed for data order, augmentations and the model's RNG.
        num_workers: DataLoader worker processes.
        label_smoothing: Label smoothing of the default classification loss.
        output_dir: Where checkpoints and ``history.json`` go; nothing is written when unset.
        ckpt_every: Also checkpoint every this many steps (0: only at the end of each epoch).
        resume: Checkpoint to resume from, or ``auto`` for ``output_dir/last.safetensors`` when it exists.
        eval_every: Evaluate every this many epochs (0: only at the end).
        channels_last: Use the channels-last memory format for 4-D inputs and the model.
        progress: Show a progress bar.
        ddp_find_unused: Let DDP tolerate trainable parameters that get no gradient.
        sync_bn: Under ``torchrun`` on CUDA, synchronise BatchNorm statistics across processes (SyncBatchNorm).
            Needed when each process's share of the batch is small and the model has BatchNorm: without it every
            process normalises with its own batch's statistics, so the result differs from a single process with
            the same global batch. Costs one all-reduce per BatchNorm layer per step; the saved model has plain
            BatchNorm layers.
        overwrite: Let a command replace the outputs of an earlier run in ``output_dir`` (model file, checkpoints,
            metrics); without it, or ``resume=auto`` to continue that run, the command refuses before any work.
    """

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    label_smoothing: float = 0.0
    output_dir: Path | None = None
    ckpt_every: int = 0
    resume: str | None = None
    eval_every: int = 1
    channels_last: bool = False
    progress: bool = True
    ddp_find_unused: bool = False
    sync_bn: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_steps:  # 0 or unset: train for epochs
            check_number("max_steps", self.max_steps, 1, hint=" (or unset it to train for epochs)")
        else:
            check_number("epochs", self.epochs, 1)
        check_number("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            check_number("eval_batch_size", self.eval_batch_size, 1)
        too_big = isinstance(self.lr, int | float) and self.lr > MAX_LR
        check_number("lr", self.lr, 0, MAX_LR, low_open=True, hint="; a larger step diverges" if too_big else "")
        check_number("weight_decay", self.weight_decay, 0)
        check_number("momentum", self.momentum, 0, 1)
        for i, b in enumerate(self.betas):
            check_number(f"betas[{i}]", b, 0, 1, high_open=True)
        check_number("warmup_epochs", self.warmup_epochs, 0)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0, low_open=True, hint=" (or unset it)")
        check_number("num_workers", self.num_workers, 0)
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_number("ckpt_every", self.ckpt_every, 0)
        check_number("eval_every", self.eval_every, 0)
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    wall_time_s: float = 0.0
    checkpoint: Path | None = None


# --------------------------------------------------------------------------------------------- utilities
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(torch.rand(1) == a)
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda[:N]`` into a device, with a clear error when CUDA is absent.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use device=cpu")
    return dev


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type == "cpu":
        raise ConfigError("amp=fp16 needs CUDA; on CPU use amp=bf16 or amp=none")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def build_optimizer(
    params: nn.Module | Sequence[dict[str, Any]],
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; 1-D tensors (norms, biases) get no weight decay.

    Args:
        params: A model (its parameters with ``requires_grad`` are used) or explicit parameter groups.
        name: ``adamw`` or ``sgd``.
        lr: Learning rate.
        weight_decay: Weight decay for weights of dimension >= 2.
        momentum: SGD momentum.
        nesterov: SGD Nesterov flag.
        betas: AdamW betas.

    Example:
        >>> opt = build_optimizer(nn.Linear(4, 2), "sgd", lr=0.1)
        >>> [len(g["params"]) for g in opt.param_groups]
        [1, 1]
    """
    if isinstance(params, nn.Module):
        decay, no_decay = [], []
        for _, p in params.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        if not decay and not no_decay:
            raise ConfigError("the model has no trainable parameters (every requires_grad is False)")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = list(params)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use adamw or sgd")


# --------------------------------------------------------------------------------------------- data order
class _SeededSamples(Dataset):
    """Wrap a dataset so each sample's augmentation RNG is seeded from ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int, in_main_process: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.in_main_process = in_main_process

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])
        # the CPU generator only: torch.manual_seed would also (re)seed every CUDA device, per sample
        if not self.in_main_process:  # a worker owns its RNGs
            torch.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            return self.dataset[index]
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            torch.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class _EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` in an order fixed by ``(seed, epoch)``, sharded across ranks.

    The global batch ``b`` of an epoch is ``perm[b*B:(b+1)*B]``; rank ``r`` of ``W`` takes the ``r``-th of its
    ``W`` equal slices, so a distributed run sees exactly the batches of a single-process run with the same
    global batch size. Training batches are full (the incomplete last one is dropped); evaluation keeps every
    sample once, in order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, dist: DistInfo, train: bool) -> None:
        self.n, self.batch_size, self.seed, self.dist, self.train = n, batch_size, seed, dist, train
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip ``start_batch`` batches (for resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return self.n // self.batch_size - self.start_batch
        per_rank = len(range(self.dist.rank, self.n, self.dist.world_size))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if not self.train:
            idx = list(range(self.dist.rank, self.n, self.dist.world_size))
            for b in range(0, len(idx), self.batch_size):
                yield [(0, i) for i in idx[b : b + self.batch_size]]
            return
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        local = self.batch_size // self.dist.world_size
        for b in range(self.start_batch, self.n // self.batch_size):
            lo = b * self.batch_size + self.dist.rank * local
            yield [(self.epoch, i) for i in perm[lo : lo + local]]


# --------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    task: Task | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    amp: str = "none",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Evaluate ``model`` on ``data`` with the task's metrics (summed across processes when distributed).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> sorted(evaluate(nn.Linear(4, 2), ds, device="cpu"))
        ['acc1', 'acc5', 'loss']
    """
    task = task or ClassificationTask()
    dev = resolve_device(device)
    amp_dtype = _amp_dtype(amp, dev)
    if isinstance(data, DataLoader):
        loader = data
    else:
        dist_info = DistInfo(*_dist_triplet())
        sampler = _EpochBatchSampler(len(data), batch_size, 0, dist_info, train=False)
        loader = DataLoader(_SeededSamples(data, 0, num_workers == 0), batch_sampler=sampler, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0), collate_fn=_collate_fn(task))
    was_training = model.training
    model.eval()
    metrics: list[Metric] = task.metrics()
    bar = _progress(loader, desc=desc, enable=progress, leave=False)
    try:
        for batch in bar:
            batch = to_device(batch, dev)
            with _autocast(dev, amp_dtype):
                out = task.forward(model, batch)
                loss = task.loss(out, batch)
            for m in metrics:
                m.update(out, batch, loss)
    finally:
        model.train(was_training)
    result: dict[str, float] = {}
    for m in metrics:
        m.sync()
        result.update(m.compute())
    return result


def _collate_fn(task: Any) -> Callable[[list[Any]], Any] | None:
    """The task's ``collate`` (tasks that do not define one get the data loader's default)."""
    return getattr(task, "collate", None)


def _dist_triplet() -> tuple[int, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), 0
    return 0, 1, 0


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(it: Any, desc: str, enable: bool, total: int | None = None, initial: int = 0, leave: bool = True) -> Any:
    if not enable:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, leave=leave, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- trainer
Callback = Callable[["Trainer", int, dict[str, float]], None]


class Trainer:
    """Train a model on a dataset with a :class:`Task` (classification by default).

    Args:
        model: Any ``nn.Module``; only parameters with ``requires_grad`` are optimised.
        config: A :class:`TrainConfig`.
        train_data: Map-style training dataset returning what the task expects (``(image, label)``).
        val_data: Optional evaluation dataset.
        task: Loss and metrics; :class:`ClassificationTask` with the config's label smoothing by default.
        optimizer: A ready optimiser (e.g. from an adaptation method); built from the config when omitted.
        callbacks: Functions ``f(trainer, step, logs)`` called after every optimisation step.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        >>> cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd", progress=False, device="cpu")
        >>> result = Trainer(nn.Linear(8, 2), cfg, ds, ds).fit()
        >>> result.steps
        8
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Dataset,
        val_data: Dataset | None = None,
        task: Task | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg = config
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size={config.batch_size} must be divisible by the {self.dist.world_size} processes"
            )
        n_train = len(train_data)  # type: ignore[arg-type]
        if n_train < config.batch_size:
            raise ConfigError(f"batch_size={config.batch_size} is larger than the training set ({n_train} samples)")
        self.task = task or ClassificationTask(label_smoothing=config.label_smoothing)
        self.amp_dtype = _amp_dtype(config.amp, self.device)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optimizer or build_optimizer(
            self.model, config.optimizer, config.lr, config.weight_decay, config.momentum, config.nesterov, config.betas
        )
        self.steps_per_epoch = n_train // config.batch_size
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = round(config.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, config.min_lr_ratio, config.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.train_sampler = _EpochBatchSampler(n_train, config.batch_size, config.seed, self.dist, train=True)
        self.train_loader = DataLoader(
            _SeededSamples(train_data, config.seed, config.num_workers == 0),
            batch_sampler=self.train_sampler,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # A private generator: creating an iterator must not draw from the global RNG, or a resumed run's
            # dropout masks would shift relative to an uninterrupted one.
            generator=torch.Generator().manual_seed(config.seed),
            collate_fn=_collate_fn(self.task),
        )
        self.val_data = val_data
        self.callbacks = list(callbacks)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._loss_ema: float | None = None
        self.ddp_model: nn.Module = self.model
        self._last_saved: tuple[Path, int] | None = None
        self._plain_bn: Callable[[], None] | None = None
        if config.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("sync_bn=true needs CUDA (torch's SyncBatchNorm synchronises GPU tensors only); "
                                  "leave it off on CPU")
            self._plain_bn = convert_sync_batchnorm(self.model)
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.ddp_find_unused,
            )

    # ----------------------------------------------------------------------------------------- state
    @property
    def output_dir(self) -> Path | None:
        """Folder for checkpoints and history, if any."""
        return self.cfg.output_dir

    def save(self, path: Path | None = None) -> Path | None:
        """Checkpoint the full training state (every rank's RNG included); only rank 0 writes.

        Raises:
            TrainingDivergedError: The weights are not finite (nothing is written; the previous checkpoint stays).
        """
        self._check_finite()
        rng_states = all_gather_objects(capture_rng_state())
        if path is None:
            if self.output_dir is None:
                return None
            path = self.output_dir / "last.safetensors"
        if self.dist.is_main:
            save_checkpoint(
                path, self.model, self.optimizer, self.scheduler, self.scaler, step=self.step,
                epoch=self.step // self.steps_per_epoch, rng_states=rng_states,
                extra={"history": self.history, "config": config_to_dict(self.cfg), "loss_ema": self._loss_ema},
            )
        barrier()
        self._last_saved = (path, self.step)
        return path

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error for a run that diverged: what happened, what to change, which checkpoint is kept."""
        if self._last_saved is not None:
            kept = f"the last good checkpoint, {self._last_saved[0]} (step {self._last_saved[1]}), is kept"
        else:
            kept = "no checkpoint of this run was written"
        lr = self.scheduler.get_last_lr()[0]
        return TrainingDivergedError(f"{what}; lower lr (now {lr:.3g}) or set grad_clip; {kept}")

    def _check_finite(self) -> None:
        """Raise :class:`TrainingDivergedError` if a weight or buffer of the model is NaN or infinite."""
        named = [(k, v) for k, v in self.model.state_dict().items() if v.is_floating_point() and v.numel()]
        if not named:
            return
        ok = torch.stack([torch.isfinite(v).all() for _, v in named])
        if bool(ok.all()):
            return
        bad = [named[i][0] for i in (~ok).nonzero().flatten().tolist()]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise self._diverged(f"the weights became non-finite ({bad[0]}{more}) by step {self.step}")

    def resume(self, path: str | Path) -> None:
        """Restore model, optimiser, scheduler, scaler, step, history and RNG from a checkpoint."""
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler, rank=self.dist.rank)
        self.step = state.step
        self._last_saved = (Path(path), state.step)
        self.history = list(state.extra.get("history", []))
        self._loss_ema = state.extra.get("loss_ema")

    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r is None:
            return None
        if r == "auto":
            if self.output_dir is None:
                raise ConfigError("resume=auto needs output_dir")
            p = self.output_dir / "last.safetensors"
            return p if p.exists() else None
        return Path(r)

    # ----------------------------------------------------------------------------------------- loop
    def _train_step(self, batch: Any) -> tuple[float, float]:
        batch = to_device(batch, self.device)
        if self.cfg.channels_last and isinstance(batch, list | tuple) and batch[0].ndim == 4:
            batch = [batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]]
        with _autocast(self.device, self.amp_dtype):
            out = self.task.forward(self.ddp_model, batch)
            loss = self.task.loss(out, batch)
        if not torch.isfinite(loss):
            raise self._diverged(f"the loss became {loss.item()} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = float("nan")
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach()), grad_norm

    @torch.enable_grad()  # a caller inside ``torch.no_grad()`` (feature extraction that trains a backbone) still trains
    def fit(self) -> FitResult:
        """Train to ``total_steps``, evaluating, checkpointing and resuming as configured."""
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)
        resume_from = self._resume_path()
        if resume_from is not None:
            self.resume(resume_from)
        if self.cfg.sync_bn and self.dist.enabled and self._plain_bn is None:  # a second fit()
            self._plain_bn = convert_sync_batchnorm(self.model)
        start_time = time.perf_counter()
        self.ddp_model.train()
        show = cfg.progress and self.dist.is_main
        bar = _progress(None, desc="train", enable=show, total=self.total_steps, initial=self.step)
        last_eval: dict[str, float] = {}
        try:
            while self.step < self.total_steps:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                self.train_sampler.set_epoch(epoch, start_batch)
                for batch in self.train_loader:
                    loss, grad_norm = self._train_step(batch)
                    self.step += 1
                    self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
                    logs = {"step": self.step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                    if cfg.grad_clip is not None:
                        logs["grad_norm"] = grad_norm
                    if bar is not None and show:
                        post = {"loss": f"{self._loss_ema:.4f}", "lr": f"{logs['lr']:.2e}"}
                        if last_eval:
                            post[self.task.main_metric] = f"{last_eval.get(self.task.main_metric, float('nan')):.3f}"
                        bar.set_postfix(post, refresh=False)
                        bar.update(1)
                    for cb in self.callbacks:
                        cb(self, self.step, logs)
                    epoch_done = self.step % self.steps_per_epoch == 0
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not epoch_done:
                        self.save()
                    if self.step >= self.total_steps:
                        break
                epoch_end = {"epoch": epoch + 1, "step": self.step, "train_loss": self._loss_ema,
                             "lr": self.scheduler.get_last_lr()[0], "time_s": time.perf_counter() - start_time}
                is_last = self.step >= self.total_steps
                self._check_finite()  # before evaluating (and saving) weights that may have diverged
                if self.val_data is not None and (is_last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                    last_eval = self.evaluate()
                    epoch_end.update({f"val_{k}": v for k, v in last_eval.items()})
                self.history.append(epoch_end)
                self.save()
                if self.dist.is_main and self.output_dir is not None:
                    atomic_write_text(self.output_dir / "history.json", json.dumps(self.history, indent=2))
        finally:
            if bar is not None and show:
                bar.close()
            if self._plain_bn is not None:  # plain BatchNorm again: the model is saved, fused and exported as built
                self._plain_bn()
                self._plain_bn = None
        final = dict(last_eval)
        if self.val_data is not None and not final:
            final = self.evaluate()
        return FitResult(self.history, final, self.step, time.perf_counter() - start_time,
                         self.output_dir / "last.safetensors" if self.output_dir else None)

    def evaluate(self, data: Dataset | None = None) -> dict[str, float]:
        """Evaluate on ``data`` (the validation set by default)."""
        data = data if data is not None else self.val_data
        if data is None:
            raise ConfigError("no evaluation data given")
        return evaluate(
            self.model, data, self.task, self.cfg.eval_batch_size or self.cfg.batch_size, self.device,
            amp="none" if self.amp_dtype is None else ("bf16" if self.amp_dtype == torch.bfloat16 else "fp16"),
            num_workers=self.cfg.num_workers, progress=self.cfg.progress and self.dist.is_main,
        )

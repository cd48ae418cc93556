"""Distributed data parallel through ``torchrun``: process-group set-up and helpers.

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the trainer
calls :func:`init_distributed` and then behaves like a single process with an N-times larger batch.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "convert_sync_batchnorm",
           "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` prepared (gloo on CPU, NCCL on CUDA); no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(_shutdown)  # the group we created is ours to close
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def _shutdown() -> None:
    """Leave the process group together, at exit.

    Without it, a rank that exits first can tear gloo's threads down while another rank still talks to it, and
    that rank aborts ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all processes when distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes in place (no-op for one process) and return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every process (a one-element list for one process)."""
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def convert_sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Swap every BatchNorm layer inside ``model`` for a SyncBatchNorm, in place; returns the function undoing it.

    timm's ``BatchNormAct2d`` becomes ``SyncBatchNormAct`` (activation kept), others ``nn.SyncBatchNorm``; the new
    layers share the originals' parameters and buffers and have the same state-dict keys, so checkpoints written in
    between load into the plain model. The returned function copies each synchronised layer's state into its
    original layer and puts the original back (model files keep plain BatchNorm, which fusion and export know).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> restore = convert_sync_batchnorm(m); type(m[1]).__name__
        'SyncBatchNorm'
        >>> restore(); type(m[1]).__name__
        'BatchNorm2d'
    """
    from timm.layers import convert_sync_batchnorm as convert

    originals = {name: m for name, m in model.named_modules()
                 if name and isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not originals:
        return lambda: None
    convert(model)  # the root is not a BatchNorm, so its children are replaced in place

    def restore() -> None:
        for name, original in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            synced = parent.get_submodule(child)
            original.load_state_dict(synced.state_dict())
            original.train(synced.training)
            parent.add_module(child, original)

    return restore

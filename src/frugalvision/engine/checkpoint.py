"""Training checkpoints as safetensors: model, optimiser, scheduler, grad scaler, step and RNG state.

One file holds everything needed for an exact resume. Tensors go into the safetensors body; small
non-tensor state (hyper-parameters, counters, the Python RNG's bookkeeping) goes into the header as
JSON. Nothing is ever unpickled, so a checkpoint from an untrusted source cannot run code. Files are
written atomically: an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..weights import CHECKPOINT_META, load_weights, read_safetensors, unwrap_model, write_weights

__all__ = [
    "CheckpointState",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "frugalvision.checkpoint"
FORMAT_VERSION = 1
_META_KEY = CHECKPOINT_META


@dataclass
class CheckpointState:
    """What a checkpoint holds besides the tensors restored in place."""

    step: int = 0
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Snapshot the torch (CPU and CUDA), NumPy and Python RNG states.

    Example:
        >>> s = capture_rng_state(); a = torch.rand(1); restore_rng_state(s); bool(torch.rand(1) == a)
        True
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_meta": [py_state[0], py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a state captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    name, pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = state["python_meta"]
    random.setstate((version, tuple(int(x) for x in state["python_state"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _rng_to_flat(rng: Mapping[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"{prefix}/torch": rng["torch"], f"{prefix}/numpy_keys": rng["numpy_keys"],
               f"{prefix}/python_state": rng["python_state"]}
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"{prefix}/cuda/{i}"] = s
    meta = {"numpy_meta": rng["numpy_meta"], "python_meta": rng["python_meta"], "n_cuda": len(rng.get("cuda", []))}
    return tensors, meta


def _rng_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    state = {
        "torch": tensors[f"{prefix}/torch"],
        "numpy_keys": tensors[f"{prefix}/numpy_keys"],
        "python_state": tensors[f"{prefix}/python_state"],
        "numpy_meta": meta["numpy_meta"],
        "python_meta": meta["python_meta"],
    }
    if meta.get("n_cuda"):
        state["cuda"] = [tensors[f"{prefix}/cuda/{i}"] for i in range(meta["n_cuda"])]
    return state


# --------------------------------------------------------------------------------------------- helpers
def _json_safe(obj: Any, where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        raise CheckpointError(f"cannot store a {tuple(obj.shape)} tensor found in {where} as JSON")
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v, where) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} found in {where} in a checkpoint")


def _flatten_optimizer(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = _json_safe(value, f"optimizer.state.{pid}.{name}")
    meta = {"param_groups": _json_safe(sd["param_groups"], "optimizer.param_groups"), "scalars": scalars}
    return tensors, meta


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    step: int = 0,
    epoch: int = 0,
    extra: Mapping[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete training checkpoint atomically as one safetensors file.

    Args:
        path: Target file (``.safetensors``).
        model: The model (a DDP wrapper is unwrapped).
        optimizer: Optional optimiser whose state is saved.
        scheduler: Optional LR scheduler with ``state_dict()`` of JSON-able values.
        scaler: Optional ``torch.amp.GradScaler``.
        step: Global optimisation step reached.
        epoch: Epoch index reached.
        extra: JSON-able values to keep (history, config, ...).
        rng_states: RNG states to store, one per rank; the current process's state when omitted.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> m = torch.nn.Linear(2, 2); p = pathlib.Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> _ = save_checkpoint(p, m, step=3)
        >>> load_checkpoint(p, m).step
        3
    """
    path = Path(path)
    model_sd = unwrap_model(model).state_dict()
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model_sd.items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_keys": list(model_sd),
        "extra": _json_safe(dict(extra or {}), "extra"),
    }
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    if scheduler is not None:
        meta["scheduler"] = _json_safe(scheduler.state_dict(), "scheduler")
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = _json_safe(scaler.state_dict(), "scaler")
    states = rng_states if rng_states is not None else [capture_rng_state()]
    meta["rng"] = []
    for rank, rng in enumerate(states):
        rng_tensors, rng_meta = _rng_to_flat(rng, f"rng/{rank}")
        tensors.update(rng_tensors)
        meta["rng"].append(rng_meta)
    return write_weights(path, tensors, metadata={_META_KEY: json.dumps(meta)})


# --------------------------------------------------------------------------------------------- load
def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> CheckpointState:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects, in place.

    Args:
        path: The checkpoint file.
        model: Model to load the weights into (a DDP wrapper is unwrapped).
        optimizer: Optional optimiser to restore; must have the same parameter groups as when saved.
        scheduler: Optional LR scheduler to restore.
        scaler: Optional grad scaler to restore.
        restore_rng: Restore the RNG state of ``rank`` (falls back to rank 0's).
        rank: This process's rank in distributed training.

    Returns:
        The step, epoch and extra values stored.

    Raises:
        CheckpointError: If the file is missing, corrupt, not a frugalvision checkpoint, or does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    tensors, metadata = read_safetensors(path)
    if _META_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a frugalvision training checkpoint (no '{_META_KEY}' header); "
            "for plain weights use frugalvision.weights.load_weights"
        )
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt header: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a frugalvision checkpoint (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer frugalvision (format version {meta['version']} > {FORMAT_VERSION}); "
            "upgrade the package to read it"
        )

    target = unwrap_model(model)
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    load_weights(target, model_sd, source=path, what=f"the model ({type(target).__name__})")
    try:
        if optimizer is not None:
            if "optimizer" not in meta:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state; load it without an optimizer")
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        if scheduler is not None and "scheduler" in meta:
            scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the optimizer/scheduler given: {exc}") from None
    if restore_rng and meta.get("rng"):
        r = rank if rank < len(meta["rng"]) else 0
        restore_rng_state(_rng_from_flat(tensors, meta["rng"][r], f"rng/{r}"))
    return CheckpointState(step=int(meta["step"]), epoch=int(meta["epoch"]), extra=meta.get("extra", {}), path=path)

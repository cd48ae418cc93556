"""ONNX export with an onnxruntime parity check, and a small onnxruntime runner for inference and benchmarks."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .._deps import require
from ..errors import FrugalVisionError
from ..utils.io import clean_once, temp_prefix

__all__ = ["ExportResult", "OrtRunner", "export_onnx", "read_onnx_metadata", "write_onnx_metadata"]

log = logging.getLogger(__name__)


class ExportError(FrugalVisionError, RuntimeError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


@dataclass
class ExportResult:
    """Where the model went and how closely onnxruntime reproduces PyTorch."""

    path: Path
    exporter: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    checked_batch_sizes: tuple[int, ...] = ()
    data_path: Path | None = None  #: the weights file beside ``path`` when they are stored as external data


def session_options(ort: Any, threads: int) -> Any:
    """Session options shared by the runners here.

    ``threads`` intra-op threads, one inter-op thread, all graph optimisations, warnings off.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def to_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A graph input as a contiguous numpy array (tensors are detached and moved to the CPU)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)


def input_arrays(inputs: Sequence[np.ndarray | torch.Tensor], names: Sequence[str]) -> list[np.ndarray]:
    """Positional graph inputs as arrays, checked against the graph's input ``names``."""
    if len(inputs) != len(names):
        raise ValueError(f"the ONNX graph takes {len(names)} input(s) {list(names)}, got {len(inputs)}")
    return [to_array(x) for x in inputs]


class OrtRunner:
    """Run an ONNX file with onnxruntime on CPU (or CUDA when asked and available).

    With ``batch_parallel=n`` (CPU), the runner holds ``n`` sessions of ``threads // n`` intra-op threads each and
    runs the chunks of a batch on them concurrently (onnxruntime releases the GIL while it runs). For throughput
    on a few cores this scales better than one session's intra-op threads, which split each (often small)
    operator and wait for each other at every node; outputs are the same, concatenated in order. Each session
    holds its own copy of the weights.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads in all (``torch.get_num_threads()`` when omitted, so timings compare fairly).
        device: ``cpu`` or ``cuda``.
        batch_parallel: Sessions sharing a batch (CPU only; ``1``: one session with all the threads). Batches
            smaller than this use fewer sessions.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
        >>> _ = export_onnx(nn.Linear(4, 2).eval(), p, torch.randn(1, 4), exporter="torchscript")
        >>> OrtRunner(p)(np.zeros((3, 4), np.float32))[0].shape
        (3, 2)
        >>> OrtRunner(p, threads=2, batch_parallel=2)(np.zeros((3, 4), np.float32))[0].shape
        (3, 2)
    """

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu",
                 batch_parallel: int = 1) -> None:
        ort = require("onnxruntime", "running ONNX models")
        threads = threads or torch.get_num_threads()
        if int(batch_parallel) != batch_parallel or batch_parallel < 1:
            raise ValueError(f"batch_parallel must be a positive integer, got {batch_parallel!r}")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
            batch_parallel = 1  # one GPU stream: splitting the batch only adds launches
        self.batch_parallel = int(batch_parallel)
        opts = session_options(ort, max(1, threads // self.batch_parallel))
        try:
            self.sessions = [ort.InferenceSession(str(path), opts, providers=providers)
                             for _ in range(self.batch_parallel)]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path}: {exc}") from None
        self.session = self.sessions[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._pool = None
        if self.batch_parallel > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.batch_parallel, thread_name_prefix="ort-batch")

    def __call__(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Run the graph on numpy arrays or CPU tensors; returns the outputs as numpy arrays."""
        arrays = input_arrays(inputs, self.input_names)
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        parts = min(self.batch_parallel, n)
        if parts <= 1 or self._pool is None:
            return self.session.run(None, dict(zip(self.input_names, arrays, strict=True)))
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        jobs = [self._pool.submit(sess.run, None, {k: np.ascontiguousarray(a[lo:hi])
                                                    for k, a in zip(self.input_names, arrays, strict=True)})
                for sess, lo, hi in zip(self.sessions, bounds[:-1], bounds[1:], strict=False)]
        outs = [j.result() for j in jobs]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(self.output_names))]

    def close(self) -> None:
        """Stop the worker threads (also done when the runner is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, exporter: str, opset: int,
            dynamic_batch: bool, input_names: Sequence[str], output_names: Sequence[str] | None) -> None:
    if exporter == "dynamo":
        require("onnxscript", "ONNX export")
        dyn = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=4096)
            dyn = tuple({0: batch} for _ in args)
            # torch.export specialises size-1 dimensions: trace a batch of 2 so the batch axis stays symbolic
            args = tuple(a.expand(2, *a.shape[1:]).contiguous() if a.shape[0] == 1 else a for a in args)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                                     input_names=list(input_names), output_names=list(output_names or []) or None,
                                     verbose=False, optimize=True)
            prog.save(str(path))
    else:
        axes = {n: {0: "batch"} for n in [*input_names, *(output_names or [])]} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=min(opset, 20),
                              input_names=list(input_names), output_names=list(output_names or []) or None,
                              dynamic_axes=axes, do_constant_folding=True)


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Yield ``<stage>/<path.name>`` in a fresh folder beside ``path``; on success move it (and ``<name>.data``).

    The weights file moves first, then the graph, each by an atomic rename; on an exception nothing moves and the
    stage is removed, so ``path`` keeps its previous content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_once(path.parent)
    stage = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield stage / path.name
        staged = [stage / (path.name + ".data"), stage / path.name]
        for f in staged:
            if f.exists():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        data = path.with_name(path.name + ".data")
        external = staged[0].exists()
        if external:
            os.replace(staged[0], data)
        os.replace(staged[1], path)
        if not external and data.exists():
            data.unlink()  # left by an earlier, larger export of the same name; the new graph does not read it
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _uses_external_data(path: Path) -> bool:
    onnx = require("onnx", "ONNX export")
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _store_weights(model_path: Path, external: bool) -> bool:
    """Leave the graph self-contained, or put all weights in one ``<name>.data`` file beside it.

    Exporters write a graph over 2 GB with one file per tensor (named after the parameters) or their own data file;
    those are gathered into ``<name>.data``. Returns whether the weights are external.
    """
    onnx = require("onnx", "ONNX export")
    others = [p for p in model_path.parent.iterdir() if p != model_path]
    data_name = model_path.name + ".data"
    if not others and not external:
        return False
    if [p.name for p in others] == [data_name] and _uses_external_data(model_path):
        return True  # already in the layout we want
    proto = onnx.load(str(model_path), load_external_data=True)
    for p in others:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    onnx.save_model(proto, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return (model_path.parent / data_name).exists()  # tensors under 1 KiB stay in the graph


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor | Sequence[torch.Tensor] | tuple[int, ...] = (1, 3, 224, 224),
    dynamic_batch: bool = True,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] | None = None,
    external_data: bool = False,
) -> ExportResult:
    """Export ``model`` (in eval mode, on CPU) to ONNX and check it against PyTorch with onnxruntime.

    The file is written atomically. With ``check=True`` the graph is run on the example input and, when the
    batch axis is dynamic, on a batch of a different size too (catching graphs that baked the batch size
    in); any output differing by more than ``atol + rtol * |reference|`` raises and removes the file.

    Models over protobuf's 2 GB limit (FasterViT-5/6, for example) keep their weights in one file beside the graph,
    ``<name>.data`` (ONNX external data), which onnxruntime and OpenVINO find by that name: move the two together.
    Both are staged in a temporary folder and moved into place only after the check, so an export never leaves
    half-written or per-tensor files behind, and two exports into one folder never share weight files.

    Args:
        model: The model; exported as is (call ``fv.reparameterize_model`` first to export the fused form).
        path: Output ``.onnx`` file.
        example: Example input tensor(s) or an input shape.
        dynamic_batch: Make the batch axis dynamic.
        opset: ONNX opset version.
        check: Compare onnxruntime with PyTorch.
        atol: Absolute tolerance of the check.
        rtol: Relative tolerance of the check.
        exporter: ``dynamo`` (torch.export based), ``torchscript`` (legacy), or ``auto`` (torchscript, then
            dynamo if it fails or its graph is not faithful).
        input_names: Graph input names.
        output_names: Graph output names.
        external_data: Store the weights in ``<name>.data`` even when the model is under 2 GB.

    Returns:
        The path, the exporter used and the measured errors.

    Raises:
        ExportError: If export fails with every exporter tried, or the parity check fails.
    """
    path = Path(path)
    require("onnx", "ONNX export")
    if isinstance(example, tuple) and all(isinstance(s, int) for s in example):
        args: tuple[torch.Tensor, ...] = (torch.randn(*example),)
    elif isinstance(example, torch.Tensor):
        args = (example,)
    else:
        args = tuple(example)  # type: ignore[arg-type]
    args = tuple(a.detach().cpu() for a in args)
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model = model.eval().cpu()
    # auto: the TorchScript exporter first (seconds, and it handles every model family here), torch.export second
    tried = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    used = None
    try:
        with _staged(path) as tmp:
            for name in tried:  # the first exporter whose graph is faithful wins
                try:
                    _export(model, args, tmp, name, opset, dynamic_batch, input_names, output_names)
                    external = _store_weights(tmp, external_data)
                    result = ExportResult(path, name, data_path=path.with_name(path.name + ".data") if external
                                          else None)
                    if check:
                        _check(model, args, tmp, dynamic_batch, atol, rtol, result)
                    used = name
                    break
                except Exception as exc:  # exporters and onnxruntime raise many types
                    errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
                    log.info("ONNX export with %s failed: %s", name, errors[-1])
            if used is None:
                raise ExportError(f"ONNX export of {type(model).__name__} failed: " + " | ".join(errors))
    finally:
        model.to(device).train(was_training)
    return result


def _check(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, dynamic_batch: bool, atol: float,
           rtol: float, result: ExportResult) -> None:
    runner = OrtRunner(path, threads=torch.get_num_threads())
    batches = [args]
    if dynamic_batch:
        n = args[0].shape[0]
        other = 2 if n != 2 else 3
        g = torch.Generator().manual_seed(0)
        batches.append(tuple(
            torch.randn((other, *a.shape[1:]), generator=g, dtype=a.dtype) if a.is_floating_point() else
            a[:1].expand(other, *a.shape[1:]).clone() for a in args
        ))
    max_abs, max_rel = 0.0, 0.0
    for b in batches:
        ref = _flat_outputs(model(*b))
        try:
            got = runner(*b)
        except Exception as exc:  # onnxruntime's own exception types
            first = str(exc).splitlines()[0]
            raise ExportError(f"the ONNX graph fails on a batch of {b[0].shape[0]}: {first}") from None
        if len(ref) != len(got):
            raise ExportError(f"ONNX graph {path} returns {len(got)} outputs, PyTorch returns {len(ref)}")
        for i, (r, g_) in enumerate(zip(ref, got, strict=True)):
            g_t = torch.from_numpy(np.asarray(g_)).to(r.dtype)
            if g_t.shape != r.shape:
                raise ExportError(f"ONNX output {i} has shape {tuple(g_t.shape)}, PyTorch {tuple(r.shape)} "
                                  f"(batch {b[0].shape[0]})")
            diff = (g_t.double() - r.double()).abs()
            max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
            denom = r.double().abs().max().clamp_min(1e-12)
            max_rel = max(max_rel, float(diff.max() / denom) if diff.numel() else 0.0)
            if not torch.allclose(g_t.double(), r.double(), atol=atol, rtol=rtol):
                raise ExportError(
                    f"ONNX output {i} differs from PyTorch by up to {float(diff.max()):.3g} at batch {b[0].shape[0]} "
                    f"(atol={atol}, rtol={rtol}); the export is not faithful"
                )
    result.max_abs_err, result.max_rel_err = max_abs, max_rel
    result.checked_batch_sizes = tuple(b[0].shape[0] for b in batches)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (its weights are not read).

    Raises:
        CheckpointError: The file is missing or not an ONNX model.
    """
    from ..errors import CheckpointError

    onnx = require("onnx", "reading ONNX files")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"ONNX file {p} does not exist")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf's decode errors
        raise CheckpointError(f"{p} is not a readable ONNX file ({type(exc).__name__})") from None
    return {m.key: m.value for m in proto.metadata_props}


def write_onnx_metadata(path: str | Path, entries: dict[str, str]) -> Path:
    """Set ``metadata_props`` entries of an ONNX file in place, atomically (external weights stay where they are).

    Example:
        >>> import tempfile, pathlib
        >>> p = export_onnx(nn.Linear(4, 2).eval(), pathlib.Path(tempfile.mkdtemp()) / "m.onnx", (1, 4),
        ...                 exporter="torchscript").path
        >>> read_onnx_metadata(write_onnx_metadata(p, {"classes": "a,b"}))["classes"]
        'a,b'
    """
    from ..utils.io import atomic_path

    onnx = require("onnx", "writing ONNX files")
    p = Path(path)
    proto = onnx.load(str(p), load_external_data=False)  # external tensors keep their relative location
    kept = [(m.key, m.value) for m in proto.metadata_props if m.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(p) as tmp:
        onnx.save(proto, str(tmp))
    return p

"""Where an ONNX Runtime session spends its time: per operator type, with FLOPs and achieved GFLOP/s.

``profile_onnx`` runs a graph with onnxruntime's node profiler on, keeps the timed runs (warm-up runs are dropped)
and sums the kernel time of every node by operator type. For the compute operators (``MatMul``, ``FusedMatMul``,
``Gemm``, ``FusedGemm``, ``Conv``, ``FusedConv``) it also counts the multiply-adds from the shapes the profiler
records, so the table says how close each kind of kernel gets to the machine's matmul peak: the question that
decides whether a graph can still be made faster by removing memory-bound work, or only by removing FLOPs.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._deps import require

__all__ = ["OrtOpStats", "OrtProfile", "ort_matmul_peak_gflops", "profile_onnx"]

_MATMULS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm"}
_CONVS = {"Conv", "FusedConv"}  # FusedConv: onnxruntime's conv + activation


@dataclass
class OrtOpStats:
    """One operator type's share of a run."""

    op_type: str  #: operator type (followed by the input shapes when grouped by shape)
    calls: int  #: nodes of this type executed per run
    ms: float  #: kernel time per run
    share: float  #: fraction of the summed kernel time
    gflop: float | None = None  #: GFLOP per run (a multiply-add counts 2), for compute operators

    @property
    def gflops_per_s(self) -> float | None:
        """Achieved GFLOP/s inside this operator type's kernels."""
        return self.gflop / (self.ms / 1e3) if self.gflop is not None and self.ms > 0 else None


@dataclass
class OrtProfile:
    """Per-operator-type kernel time of an ONNX Runtime session, averaged over the timed runs."""

    path: str
    runs: int
    threads: int
    run_ms: float  #: wall time of one run as the profiler saw it (includes the small per-node profiling cost)
    ops: list[OrtOpStats] = field(default_factory=list)

    @property
    def kernel_ms(self) -> float:
        """Summed kernel time per run."""
        return sum(o.ms for o in self.ops)

    @property
    def gflop(self) -> float:
        """Counted GFLOP per run (compute operators only)."""
        return sum(o.gflop or 0.0 for o in self.ops)

    def to_markdown(self, peak_gflops: float | None = None, top: int = 12, total_label: str = "**all kernels**") -> str:
        """A table of the ``top`` operator types by time (the rest summed in one row) and a total row.

        Args:
            peak_gflops: The machine's matmul peak for the same threads; adds an "of peak" column.
            top: Operator types listed individually.
            total_label: Name of the total row (its share is the sum of the rows', 100 % for a whole profile).
        """
        head = "| operator | nodes / run | ms / run | share | GFLOP / run | GFLOP/s |"
        sep = "|---|---|---|---|---|---|"
        if peak_gflops:
            head, sep = head + " of matmul peak |", sep + "---|"
        rows = [head, sep]

        def fmt(o: OrtOpStats) -> str:
            rate = o.gflops_per_s
            cells = [o.op_type, str(o.calls), f"{o.ms:.3f}", f"{100 * o.share:.1f}%",
                     "—" if o.gflop is None else f"{o.gflop:.3f}", "—" if rate is None else f"{rate:.1f}"]
            if peak_gflops:
                cells.append("—" if rate is None else f"{100 * rate / peak_gflops:.0f}%")
            return "| " + " | ".join(cells) + " |"

        ops = sorted(self.ops, key=lambda o: -o.ms)
        rows += [fmt(o) for o in ops[:top]]
        rest = ops[top:]
        if rest:
            rows.append(fmt(OrtOpStats(f"other ({len(rest)} types)", sum(o.calls for o in rest),
                                       sum(o.ms for o in rest), sum(o.share for o in rest))))
        total = OrtOpStats(total_label, sum(o.calls for o in ops), self.kernel_ms, sum(o.share for o in ops),
                           self.gflop)
        rows.append(fmt(total))
        return "\n".join(rows)


def _shapes(entries: Sequence[Mapping[str, Any]] | None) -> list[list[int]]:
    return [list(next(iter(e.values()))) for e in entries or () if e]


def _node_gflop(op: str, ins: list[list[int]], outs: list[list[int]]) -> float | None:
    """Multiply-adds x 2 of one node from its recorded shapes, or None when they do not determine it."""
    if not outs or not ins:
        return None
    out = math.prod(outs[0])
    if op in _MATMULS:
        k = _contraction(ins, outs[0])
        return None if k is None else 2.0 * out * k / 1e9
    if op in _CONVS and len(ins) >= 2 and len(ins[1]) >= 3:  # weight (C_out, C_in / groups, *kernel)
        return 2.0 * out * math.prod(ins[1][1:]) / 1e9
    return None


def _contraction(ins: list[list[int]], out: list[int]) -> int | None:
    """K of ``out[..., M, N] = A[..., M, K] @ B[..., K, N]``, with either operand possibly transposed.

    A weight initializer is not among the recorded inputs, so ``B`` may be missing; then ``A`` decides.
    """
    a = ins[0]
    if not a or not out:
        return None
    if len(out) == 1 or len(a) == 1:
        return a[-1]
    m, n = out[-2], out[-1]
    if len(ins) >= 2 and len(ins[1]) >= 2:
        b = ins[1]
        if b[-1] == n and b[-2] != n:
            return b[-2]
        if b[-2] == n and b[-1] != n:
            return b[-1]
    if a[-1] == m and a[-2] != m:  # transposed A (FusedMatMul transA)
        return a[-2]
    return a[-1]


def _label(op: str, ins: list[list[int]]) -> str:
    if op in _CONVS and len(ins) >= 2 and len(ins[1]) >= 3 and ins[1][1] == 1 and len(ins[0]) > 1 and ins[0][1] > 1:
        return f"{op} (depth-wise)"
    return op


def profile_onnx(path: str | Path, inputs: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor],
                 threads: int | None = None, runs: int = 20, warmup: int = 3,
                 group_by: Literal["op", "shape"] = "op") -> OrtProfile:
    """Profile an ONNX file in onnxruntime (CPU, all graph optimisations, as :class:`~frugalvision.export.OrtRunner`).

    Args:
        path: The ``.onnx`` file.
        inputs: One array for a single-input graph, or ``{name: array}``.
        threads: Intra-op threads (``torch.get_num_threads()`` when omitted).
        runs: Timed runs averaged.
        warmup: Runs before the timed ones (their events are dropped).
        group_by: ``op``: one row per operator type; ``shape``: one row per operator type and input shapes
            (e.g. to see which matmuls fall short of the peak).

    Returns:
        The per-operator-type breakdown.

    Example:
        >>> import pathlib, tempfile
        >>> from torch import nn
        >>> from frugalvision.export import export_onnx
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
        >>> _ = export_onnx(nn.Linear(64, 32).eval(), p, torch.randn(8, 64), exporter="torchscript")
        >>> prof = profile_onnx(p, np.zeros((8, 64), np.float32), threads=1, runs=3)
        >>> [o.op_type for o in prof.ops if o.gflop], round(prof.gflop * 1e9)
        (['Gemm'], 32768)
    """
    ort = require("onnxruntime", "profiling ONNX models")
    from ..export.onnx import ExportError, session_options, to_array

    if group_by not in ("op", "shape"):
        raise ValueError(f"profile_onnx: group_by must be 'op' or 'shape', got {group_by!r}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"profile_onnx: runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    threads = threads or torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="fv_ortprof_"))
    try:
        opts = session_options(ort, threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / "prof")
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path}: {exc}") from None
        names = [i.name for i in sess.get_inputs()]
        if not isinstance(inputs, Mapping):
            if len(names) != 1:
                raise ValueError(f"profile_onnx: {path} takes {len(names)} inputs {names}; pass a {{name: array}} dict")
            inputs = {names[0]: inputs}
        missing = set(names) - set(inputs)
        if missing:
            raise ValueError(f"profile_onnx: no array given for input(s) {sorted(missing)} of {path}")
        feed = {k: to_array(v) for k, v in inputs.items() if k in names}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _aggregate(events, str(path), runs, threads, group_by == "shape")


def _aggregate(events: list[dict[str, Any]], path: str, runs: int, threads: int, by_shape: bool) -> OrtProfile:
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    if not run_events:
        raise RuntimeError("onnxruntime's profile has no model_run events; is this onnxruntime too old?")
    start = run_events[0]["ts"]
    time_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    gflop: dict[str, float | None] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        ins, outs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
        label = _label(op, ins)
        if by_shape:
            label += " " + " x ".join(str(tuple(i)) for i in ins)
        time_us[label] = time_us.get(label, 0.0) + e["dur"]
        calls[label] = calls.get(label, 0) + 1
        g = _node_gflop(op, ins, outs)
        if op in _MATMULS or op in _CONVS:  # one node without a FLOP count makes its row's count unknown
            prev = gflop.get(label, 0.0)
            gflop[label] = None if g is None or prev is None else prev + g
    total = sum(time_us.values()) or 1.0
    ops = [OrtOpStats(k, round(calls[k] / len(run_events)), v / len(run_events) / 1e3, v / total,
                      None if gflop.get(k) is None else gflop[k] / len(run_events))
           for k, v in time_us.items()]
    run_ms = float(np.mean([e["dur"] for e in run_events])) / 1e3
    return OrtProfile(path, len(run_events), threads, run_ms, sorted(ops, key=lambda o: -o.ms))


def ort_matmul_peak_gflops(threads: int | None = None, sizes: Sequence[int] = (512, 1024, 2048),
                           seconds: float = 0.5) -> float:
    """Achievable dense fp32 GFLOP/s of onnxruntime's own MatMul kernel (best over sizes and repeats).

    The yardstick for :func:`profile_onnx` tables: onnxruntime's GEMM and torch's differ by up to ~10 % on the
    same cores, so its kernels are best judged against its own peak.

    Example:
        >>> ort_matmul_peak_gflops(threads=1, sizes=(128,), seconds=0.05) > 0
        True
    """
    ort = require("onnxruntime", "measuring onnxruntime's matmul peak")
    onnx = require("onnx", "measuring onnxruntime's matmul peak")
    from onnx import TensorProto, helper, numpy_helper

    from ..export.onnx import session_options

    rng = np.random.default_rng(0)
    best = 0.0
    for n in sizes:
        weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "matmul",
                                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), session_options(ort, threads or torch.get_num_threads()),
                                    providers=["CPUExecutionProvider"])
        a = {"A": rng.standard_normal((n, n), dtype=np.float32)}
        sess.run(None, a)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run(None, a)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best

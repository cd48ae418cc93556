"""Side-by-side model benchmarks: params, FLOPs, latency, throughput, peak memory and a roofline column.

All models of one call are measured in the same process, with the same threads, in interleaved rounds
(every round times each model once, in a rotating order), so slow drifts of a noisy machine hit every model
alike; results are reported as ratios against the first model. A matmul probe run in the same call gives
the machine's achievable GFLOP/s, and each model's achieved GFLOP/s is reported as a fraction of it.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import shlex
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..utils.io import atomic_write_text
from .timing import interleaved, synchronize, time_call

__all__ = [
    "BenchResult",
    "MachineInfo",
    "benchmark",
    "count_flops",
    "count_params",
    "int8_matmul_peak_gops",
    "machine_info",
    "matmul_peak_gflops",
    "peak_memory_mb",
    "peak_of",
    "precision_peaks",
    "result_header",
    "results_to_markdown",
    "write_results",
]


# --------------------------------------------------------------------------------------------- machine
@dataclass
class MachineInfo:
    """The machine line of every result table."""

    cpu: str
    cores: int
    threads: int
    torch: str
    device: str
    onnxruntime: str | None = None
    matmul_peak_gflops: float | None = None
    torch_peak_gflops: float | None = None  #: torch.mm's fp32 peak, when the fp32 peak is the best of two runtimes
    ort_peak_gflops: float | None = None  #: onnxruntime's fp32 MatMul peak, measured in runs with ONNX rows
    bf16_peak_gflops: float | None = None  #: measured like the fp32 peak, with bf16 operands
    int8_peak_gops: float | None = None  #: int8 x int8 -> int32 matmul (``torch._int_mm``), giga-ops per second
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))
    load_avg: float | None = field(default_factory=lambda: os.getloadavg()[0] if hasattr(os, "getloadavg") else None)

    def line(self) -> str:
        """One human-readable line."""
        parts = [f"{self.date}", f"CPU: {self.cpu}", f"{self.cores} cores", f"{self.threads} threads",
                 f"torch {self.torch}", f"device {self.device}"]
        if self.onnxruntime:
            parts.append(f"onnxruntime {self.onnxruntime}")
        if self.matmul_peak_gflops:
            both = (f"; best of torch {self.torch_peak_gflops:.0f} and onnxruntime {self.ort_peak_gflops:.0f}"
                    if self.ort_peak_gflops and self.torch_peak_gflops else "")
            parts.append(f"matmul peak {self.matmul_peak_gflops:.1f} GFLOP/s (fp32, measured{both})")
        if self.bf16_peak_gflops:
            parts.append(f"bf16 peak {self.bf16_peak_gflops:.1f} GFLOP/s")
        if self.int8_peak_gops:
            parts.append(f"int8 peak {self.int8_peak_gops:.1f} GOP/s")
        if self.load_avg is not None:  # other work on the machine inflates absolute times; ratios stay comparable
            parts.append(f"load average {self.load_avg:.1f} at the start")
        return " · ".join(parts)


def _cpu_name() -> str:
    with_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return with_name


def machine_info(device: str | torch.device = "cpu") -> MachineInfo:
    """Describe the machine and software the benchmark runs on."""
    device = torch.device(device)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return MachineInfo(_cpu_name(), os.cpu_count() or 1, torch.get_num_threads(), torch.__version__, dev, ort_version)


@torch.no_grad()
def matmul_peak_gflops(device: str | torch.device = "cpu", sizes: Sequence[int] = (512, 1024, 2048),
                       seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """Achievable dense matmul GFLOP/s on ``device`` with the current threads (best over sizes and repeats).

    Example:
        >>> matmul_peak_gflops(sizes=(256,), seconds=0.05) > 0
        True
    """
    device = torch.device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=c)
        synchronize(device)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            best = max(best, 2 * n**3 / time_call(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device) / 1e9)
    return best


def int8_matmul_peak_gops(device: str | torch.device = "cpu", sizes: Sequence[int] = (512, 1024, 2048),
                          seconds: float = 0.5) -> float | None:
    """Achievable int8 matmul giga-ops/s (int8 operands, int32 accumulation; VNNI/DP4A kernels), or ``None``.

    Measured with ``torch._int_mm`` like :func:`matmul_peak_gflops`; ``None`` where this torch build has no int8
    matmul for the device.

    Example:
        >>> p = int8_matmul_peak_gops(sizes=(256,), seconds=0.05)
        >>> p is None or p > 0
        True
    """
    device = torch.device(device)
    if not hasattr(torch, "_int_mm"):
        return None
    best = 0.0
    with torch.no_grad():
        for n in sizes:
            a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
            try:
                torch._int_mm(a, b)
            except (RuntimeError, NotImplementedError):
                return None
            synchronize(device)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                best = max(best, 2 * n**3 / time_call(lambda a=a, b=b: torch._int_mm(a, b), device) / 1e9)
    return best


def precision_peaks(info: MachineInfo, device: str | torch.device = "cpu") -> MachineInfo:
    """Fill the bf16 and int8 peaks of ``info`` (the fp32 one too when missing), measured now; returns ``info``."""
    if info.matmul_peak_gflops is None:
        info.matmul_peak_gflops = matmul_peak_gflops(device)
    info.bf16_peak_gflops = matmul_peak_gflops(device, dtype=torch.bfloat16)
    info.int8_peak_gops = int8_matmul_peak_gops(device)
    return info


def peak_of(info: MachineInfo, precision: str) -> float | None:
    """The measured peak of ``precision`` (``fp32``, ``bf16``, ``int8``) in ``info``."""
    return {"fp32": info.matmul_peak_gflops, "bf16": info.bf16_peak_gflops, "int8": info.int8_peak_gops}.get(
        precision)


# --------------------------------------------------------------------------------------------- counters
def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once).

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Forward FLOPs (a multiply-add counts 2) of ``model`` on ``example``, by ``torch.utils.flop_counter``.

    Example:
        >>> count_flops(nn.Linear(3, 2, bias=False), torch.randn(1, 3))
        12
    """
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class _LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created by operators while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = st.nbytes()
                fin = weakref.finalize(st, self._free, key, n)
                fin.atexit = False
                self._seen[key] = fin
                self.live += n
                self.peak = max(self.peak, self.live)
        return out


@torch.no_grad()
def peak_memory_mb(model: nn.Module, example: torch.Tensor) -> float:
    """Peak memory of one forward pass beyond the weights and input, in MiB.

    CUDA: the caching allocator's peak. CPU: the peak of live bytes of tensors created by operators during
    the forward (intermediate activations and outputs), measured exactly by a dispatch-mode tracker.
    """
    device = example.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(example)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _LiveTensorBytes() as tracker:
        out = model(example)
        del out
    return tracker.peak / 2**20


# --------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchResult:
    """One row of a benchmark table."""

    name: str
    backend: str
    params_m: float
    gflops: float
    latency_ms: float
    latency_iqr_ms: float
    throughput: float
    batch_size: int
    peak_mem_mb: float | None
    achieved_gflops: float
    peak_fraction: float | None
    latency_ratio: float = 1.0
    throughput_ratio: float = 1.0
    precision: str = "fp32"  #: fp32, bf16 (autocast / OpenVINO bf16) or int8 (QDQ graph)
    extra: dict[str, Any] = field(default_factory=dict)


def _median_iqr(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return statistics.median(xs), 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


@dataclass
class _Entry:
    name: str
    backend: str
    run1: Callable[[], Any]
    runN: Callable[[], Any]
    params: int
    flops: int
    mem_mb: float | None
    precision: str = "fp32"
    lat: list[float] = field(default_factory=list)
    thr: list[float] = field(default_factory=list)


def benchmark(
    models: dict[str, nn.Module] | Sequence[str],
    img_size: int | tuple[int, int] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    throughput_repeats: int = 5,
    onnx: bool = False,
    openvino: bool = False,
    channels_last: bool = False,
    memory: bool = True,
    progress: bool = True,
    in_chans: int = 3,
    precisions: Sequence[str] = ("fp32",),
    calibration: dict[str, torch.Tensor] | None = None,
    quantize_options: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[BenchResult], MachineInfo]:
    """Benchmark several models side by side in one process, interleaved, with ratios against the first.

    Args:
        models: Model names for ``timm.create_model`` (ours are registered there too) or ``{name: module}``.
        img_size: Input resolution; each model's default config when omitted. Fixed-size models given by name
            (ViT, DeiT, FasterViT) are built for it.
        batch_size: Batch size for the throughput measurement (latency is always batch 1).
        device: ``cpu`` or ``cuda``.
        threads: torch (and onnxruntime) intra-op threads; unchanged when omitted.
        warmup: Untimed runs per model and batch size before timing.
        repeats: Timed batch-1 rounds.
        throughput_repeats: Timed batch-N rounds.
        onnx: Also export each model to ONNX and time it in onnxruntime (rows with backend ``onnxruntime``).
        openvino: Also time the exported file with OpenVINO's CPU plugin, f32 (rows with backend ``openvino``;
            needs ``frugalvision[openvino]``).
        channels_last: Run eager models in channels-last memory format.
        memory: Measure peak forward memory at batch N.
        progress: Show a progress bar.
        in_chans: Input channels.
        precisions: Which of ``fp32``, ``bf16``, ``int8`` to time. The fp32 eager row is always first (the
            reference of the ratios). ``bf16``: eager under autocast, and OpenVINO at bf16 inference precision
            (with ``openvino``); ``int8``: the exported graph quantised to QDQ int8, run by onnxruntime and/or
            OpenVINO (needs ``onnx`` or ``openvino``). The bf16 and int8 peaks are measured too, and each row's
            achieved throughput is reported against the peak of its precision.
        calibration: Per model name, inputs to calibrate the int8 graph on (the model's own data); random inputs
            otherwise, which is fine for timing but says nothing about accuracy.
        quantize_options: Per model name, keyword arguments of
            :func:`~frugalvision.export.quantize.quantize_onnx` (e.g. ``op_types``), so the timed graph is the
            one an export writes.

    Returns:
        One :class:`BenchResult` per model and backend, and the machine description.

    Example:
        >>> rows, info = benchmark({"a": nn.Conv2d(3, 8, 3), "b": nn.Conv2d(3, 16, 3)}, img_size=16, batch_size=2,
        ...                        repeats=3, throughput_repeats=2, warmup=1, progress=False)
        >>> [r.name for r in rows], rows[0].latency_ratio
        (['a', 'b'], 1.0)
    """
    from ..models.factory import create_model, size_kwargs

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    info = machine_info(dev)
    info.matmul_peak_gflops = matmul_peak_gflops(dev)
    unknown = sorted(set(precisions) - {"fp32", "bf16", "int8"})
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}: choose from fp32, bf16, int8")
    if "int8" in precisions and not (onnx or openvino):
        raise ValueError("int8 rows run an exported graph: pass onnx=True and/or openvino=True")
    if onnx and dev.type == "cpu":  # the fp32 peak is what the best runtime here reaches (torch's BLAS may lag)
        from .ort_profile import ort_matmul_peak_gflops

        info.torch_peak_gflops = info.matmul_peak_gflops
        info.ort_peak_gflops = ort_matmul_peak_gflops(torch.get_num_threads())
        info.matmul_peak_gflops = max(info.torch_peak_gflops or 0.0, info.ort_peak_gflops)
    if set(precisions) - {"fp32"}:
        precision_peaks(info, dev)
    named: dict[str, nn.Module] = (
        dict(models) if isinstance(models, dict)
        else {n: create_model(n, **(size_kwargs(n, img_size) if img_size else {})) for n in models}
    )
    if not named:
        raise ValueError("no models to benchmark")
    entries: list[_Entry] = []
    tmpdir = Path(tempfile.mkdtemp(prefix="fv-bench-")) if onnx or openvino else None
    try:
        for name, model in named.items():
            model = model.eval().to(dev)
            size = img_size
            if size is None:
                size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (in_chans, 224, 224)))[1:]
            hw = (size, size) if isinstance(size, int) else tuple(size)
            x1 = torch.randn(1, in_chans, *hw, device=dev)
            xN = torch.randn(batch_size, in_chans, *hw, device=dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x1, xN = (t.contiguous(memory_format=torch.channels_last) for t in (x1, xN))
            flops = count_flops(model, x1)
            params = count_params(model)
            mem = peak_memory_mb(model, xN) if memory else None

            def eager(m: nn.Module = model, x: torch.Tensor = x1) -> Callable[[], Any]:
                def run() -> Any:
                    with torch.inference_mode():
                        return m(x)
                return run

            def autocast(m: nn.Module = model, x: torch.Tensor = x1) -> Callable[[], Any]:
                def run() -> Any:
                    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
                        return m(x)
                return run

            entries.append(_Entry(name, "eager", eager(model, x1), eager(model, xN), params, flops, mem))
            if "bf16" in precisions:
                entries.append(_Entry(name, "eager", autocast(model, x1), autocast(model, xN), params, flops, None,
                                      "bf16"))
            if tmpdir is not None:
                from ..export import OpenVinoRunner, OrtRunner, export_onnx
                from ..export.quantize import quantize_onnx

                path = tmpdir / f"{len(entries)}.onnx"
                export_onnx(model.cpu(), path, x1.cpu(), check=True)
                model.to(dev)
                a1, aN = x1.cpu().numpy(), xN.cpu().numpy()
                runners: list[tuple[str, str, Callable[..., Any]]] = []
                nt = torch.get_num_threads()
                qpath = tmpdir / f"{len(entries)}.int8.onnx"
                if "int8" in precisions:
                    calib = (calibration or {}).get(name)
                    quantize_onnx(path, qpath, calib if calib is not None else xN.cpu()[:8],
                                  **(quantize_options or {}).get(name, {}))
                if onnx:
                    if "fp32" in precisions:
                        runners.append(("onnxruntime", "fp32", OrtRunner(path, threads=nt, device=dev.type)))
                    if "int8" in precisions:
                        runners.append(("onnxruntime", "int8", OrtRunner(qpath, threads=nt, device=dev.type)))
                if openvino:
                    if "fp32" in precisions:
                        runners.append(("openvino", "fp32", OpenVinoRunner(path, threads=nt)))
                    if "bf16" in precisions:
                        runners.append(("openvino", "bf16", OpenVinoRunner(path, threads=nt, precision="bf16")))
                    if "int8" in precisions:
                        runners.append(("openvino", "int8", OpenVinoRunner(qpath, threads=nt)))
                for backend, prec, runner in runners:
                    entries.append(_Entry(name, backend, lambda o=runner, a=a1: o(a), lambda o=runner, a=aN: o(a),
                                          params, flops, None, prec))

        from tqdm.auto import tqdm

        total = len(entries) * (warmup * 2 + repeats + throughput_repeats)
        bar = tqdm(total=total, desc="bench", disable=not progress, dynamic_ncols=True)
        for e in entries:  # warm-up, both batch sizes
            interleaved({1: e.run1, 2: e.runN}, rounds=0, warmup=warmup, on_call=bar.update)
        lat = interleaved({i: e.run1 for i, e in enumerate(entries)}, repeats, device=dev, on_call=bar.update)
        thr = interleaved({i: e.runN for i, e in enumerate(entries)}, throughput_repeats, device=dev,
                          on_call=bar.update)
        for i, e in enumerate(entries):
            e.lat = [t * 1e3 for t in lat[i]]
            e.thr = [batch_size / t for t in thr[i]]
        bar.close()
    finally:  # the ONNX sessions hold their graphs in memory; the files can go
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    rows: list[BenchResult] = []
    for e in entries:
        lat, iqr = _median_iqr(e.lat)
        thr = statistics.median(e.thr)
        achieved = e.flops * thr / 1e9
        peak = peak_of(info, e.precision)
        rows.append(BenchResult(
            name=e.name, backend=e.backend, params_m=e.params / 1e6, gflops=e.flops / 1e9, latency_ms=lat,
            latency_iqr_ms=iqr, throughput=thr, batch_size=batch_size, peak_mem_mb=e.mem_mb,
            achieved_gflops=achieved, peak_fraction=achieved / peak if peak else None, precision=e.precision,
        ))
    ref = rows[0]
    for r in rows:
        r.latency_ratio = ref.latency_ms / r.latency_ms  # >1: faster than the first row
        r.throughput_ratio = r.throughput / ref.throughput
    return rows, info


# --------------------------------------------------------------------------------------------- output
_COLUMNS = [
    ("name", "model", "{}"), ("backend", "backend", "{}"), ("precision", "precision", "{}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs (b1)", "{:.3f}"), ("latency_ms", "latency b1 (ms)", "{:.2f}"),
    ("latency_iqr_ms", "IQR (ms)", "{:.2f}"), ("throughput", "throughput (img/s)", "{:.1f}"),
    ("peak_mem_mb", "peak mem (MiB)", "{:.1f}"), ("achieved_gflops", "achieved GFLOP/s", "{:.1f}"),
    ("peak_fraction", "of its precision's peak", "{:.0%}"), ("latency_ratio", "speed-up b1", "{:.2f}x"),
    ("throughput_ratio", "speed-up bN", "{:.2f}x"),
]


def result_header(title: str, machine: MachineInfo | str | None = None, command: str | Sequence[str] | None = None,
                  notes: Sequence[str] = ()) -> str:
    """The header every committed result table starts with: title, machine line (with its date), command, notes.

    Args:
        title: The table's title (a Markdown ``#`` heading).
        machine: A :class:`MachineInfo` (its line carries the date), a line of text, or ``None`` for this machine
            (CPU, torch threads and versions; no matmul probe).
        command: The command that reproduces the table (``sys.argv`` as given, or one string).
        notes: Paragraphs after the command (conditions of the run, caveats).

    Example:
        >>> print(result_header("Speed", "2026-01-01 · CPU: x", "python b.py --fast"))
        # Speed
        <BLANKLINE>
        Machine: 2026-01-01 · CPU: x
        <BLANKLINE>
        Command:
        <BLANKLINE>
            python b.py --fast
        <BLANKLINE>
    """
    if machine is None:
        machine = machine_info("cpu")
    line = machine.line() if isinstance(machine, MachineInfo) else str(machine)
    lines = [f"# {title}", "", f"Machine: {line}", ""]
    if command:
        cmd = command if isinstance(command, str) else " ".join(shlex.quote(c) for c in command)
        lines += ["Command:", "", f"    {cmd}", ""]
    for note in notes:
        if note:
            lines += [note, ""]
    return "\n".join(lines) + "\n"


def results_to_markdown(rows: Sequence[BenchResult], info: MachineInfo, title: str = "Benchmark",
                        command: str | None = None) -> str:
    """A Markdown table with the machine line and the reproducing command."""
    lines = [result_header(title, info, command).rstrip("\n"), ""]
    bs = rows[0].batch_size if rows else 0
    lines += [f"Latency: batch 1, median of interleaved rounds. Throughput: batch {bs}. Speed-ups are relative "
              "to the first row (>1 is faster).", ""]
    lines.append("| " + " | ".join(h for _, h, _ in _COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in _COLUMNS) + "|")
    for r in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            v = getattr(r, key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[BenchResult], info: MachineInfo, out: str | Path, title: str = "Benchmark",
                  command: str | None = None) -> tuple[Path, Path]:
    """Write ``out.csv`` and ``out.md`` atomically; returns both paths."""
    out = Path(out)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    buf = io.StringIO()
    fields = [k for k in asdict(rows[0]) if k != "extra"] + ["machine"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        d = {k: v for k, v in asdict(r).items() if k != "extra"}
        d["machine"] = info.line()
        writer.writerow(d)
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, results_to_markdown(rows, info, title, command))
    return csv_path, md_path

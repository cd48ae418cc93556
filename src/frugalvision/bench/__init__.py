"""Latency, throughput, params, FLOPs, peak memory and roofline, side by side."""

from .core import (
    BenchResult,
    MachineInfo,
    benchmark,
    count_flops,
    count_params,
    machine_info,
    matmul_peak_gflops,
    peak_memory_mb,
    results_to_markdown,
    write_results,
)
from .flops import register_fused_cpu_flops
from .run import BenchConfig, run_bench

register_fused_cpu_flops()

__all__ = [
    "BenchConfig",
    "BenchResult",
    "MachineInfo",
    "benchmark",
    "count_flops",
    "count_params",
    "machine_info",
    "matmul_peak_gflops",
    "peak_memory_mb",
    "register_fused_cpu_flops",
    "results_to_markdown",
    "run_bench",
    "write_results",
]

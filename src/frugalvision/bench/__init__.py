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
from .ort_profile import OrtOpStats, OrtProfile, ort_matmul_peak_gflops, profile_onnx
from .run import BenchConfig, run_bench

register_fused_cpu_flops()

__all__ = [
    "BenchConfig",
    "BenchResult",
    "MachineInfo",
    "OrtOpStats",
    "OrtProfile",
    "benchmark",
    "count_flops",
    "count_params",
    "machine_info",
    "matmul_peak_gflops",
    "ort_matmul_peak_gflops",
    "peak_memory_mb",
    "profile_onnx",
    "register_fused_cpu_flops",
    "results_to_markdown",
    "run_bench",
    "write_results",
]

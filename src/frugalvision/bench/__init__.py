"""Latency, throughput, params, FLOPs, peak memory and roofline, side by side; the one timing utility."""

from .core import (
    BenchResult,
    MachineInfo,
    benchmark,
    count_flops,
    count_params,
    int8_matmul_peak_gops,
    machine_info,
    matmul_peak_gflops,
    peak_memory_mb,
    peak_of,
    precision_peaks,
    result_header,
    results_to_markdown,
    write_results,
)
from .flops import register_fused_cpu_flops
from .ort_profile import OrtOpStats, OrtProfile, ort_matmul_peak_gflops, profile_onnx
from .timing import interleaved, median_ms, time_call

register_fused_cpu_flops()

__all__ = [
    "BenchResult",
    "MachineInfo",
    "OrtOpStats",
    "OrtProfile",
    "benchmark",
    "count_flops",
    "count_params",
    "int8_matmul_peak_gops",
    "interleaved",
    "machine_info",
    "matmul_peak_gflops",
    "median_ms",
    "ort_matmul_peak_gflops",
    "peak_memory_mb",
    "peak_of",
    "precision_peaks",
    "profile_onnx",
    "register_fused_cpu_flops",
    "result_header",
    "results_to_markdown",
    "time_call",
    "write_results",
]

"""The ``frugalvision bench`` job: benchmark models by name and write CSV + Markdown tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._deps import require_all
from ..bench import BenchResult, MachineInfo, benchmark, results_to_markdown, write_results
from ..config import check_number
from ..errors import ConfigError
from ..models import create_model
from ..models.factory import check_input_size, size_kwargs

__all__ = ["BenchConfig", "run_bench"]


@dataclass
class BenchConfig:
    """Benchmark models side by side.

    Attributes:
        models: timm model names (ours included); the first is the reference of the ratios.
        img_size: Input resolution (each model's default when unset); fixed-size models (ViT, DeiT, FasterViT) are
            built for it, and a size a model cannot take is refused with the sizes it can.
        batch_size: Batch size of the throughput measurement.
        threads: Intra-op threads for torch and onnxruntime (current setting when unset).
        repeats: Timed batch-1 rounds.
        throughput_repeats: Timed batch-N rounds.
        warmup: Untimed runs before timing.
        device: cpu or cuda.
        onnx: Also export each model and time it in onnxruntime.
        openvino: Also time the exported file with OpenVINO's CPU plugin (``frugalvision[openvino]``).
        channels_last: Channels-last memory format for the eager models.
        precisions: Which of fp32, bf16, int8 to time (``precisions=[fp32,bf16,int8]``): bf16 as eager autocast
            (and OpenVINO bf16 with ``openvino=true``), int8 as the exported graph quantised to QDQ (with
            ``onnx=true`` and/or ``openvino=true``; calibrated on random inputs, so timings only: accuracy comes
            from ``frugalvision export precision=int8``). The bf16 and int8 peaks are measured as well.
        out: Write ``<out>.csv`` and ``<out>.md`` (e.g. ``benchmarks/results/mine``).
        title: Title of the Markdown table.
    """

    models: list[str] = field(default_factory=lambda: ["resnet18"])
    img_size: int | None = None
    batch_size: int = 32
    threads: int | None = None
    repeats: int = 20
    throughput_repeats: int = 5
    warmup: int = 3
    device: str = "cpu"
    onnx: bool = False
    openvino: bool = False
    channels_last: bool = False
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    out: str | None = None
    title: str = "Benchmark"

    def __post_init__(self) -> None:
        if self.img_size is not None:
            check_number("img_size", self.img_size, 1)
        for key in ("batch_size", "repeats", "throughput_repeats"):
            check_number(key, getattr(self, key), 1)
        check_number("warmup", self.warmup, 0)
        if self.threads is not None:
            check_number("threads", self.threads, 1)
        bad = sorted(set(self.precisions) - {"fp32", "bf16", "int8"})
        if bad:
            raise ConfigError(f"precisions: unknown {', '.join(bad)}; choose from fp32, bf16, int8")
        if "int8" in self.precisions and not (self.onnx or self.openvino):
            raise ConfigError("precisions=int8 times the exported int8 graph: add onnx=true and/or openvino=true")


def run_bench(cfg: BenchConfig, command: str | None = None) -> tuple[list[BenchResult], MachineInfo, str]:
    """Run :func:`~frugalvision.bench.benchmark` from a config; returns rows, machine and the Markdown table."""
    require_all([("openvino", "--openvino", "openvino")] if cfg.openvino else [])
    models = {}
    for n in cfg.models:
        models[n] = create_model(n, **(size_kwargs(n, cfg.img_size) if cfg.img_size else {}))
        if cfg.img_size:
            check_input_size(models[n], n, cfg.img_size)
    rows, info = benchmark(models, img_size=cfg.img_size, batch_size=cfg.batch_size, device=cfg.device,
                           threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats,
                           throughput_repeats=cfg.throughput_repeats, onnx=cfg.onnx, openvino=cfg.openvino,
                           channels_last=cfg.channels_last, precisions=tuple(cfg.precisions))
    md = results_to_markdown(rows, info, cfg.title, command)
    if cfg.out:
        write_results(rows, info, Path(cfg.out), cfg.title, command)
    return rows, info, md

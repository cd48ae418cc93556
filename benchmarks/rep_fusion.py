"""CPU speed of re-parameterisable models before and after ``fv.fuse``, eager PyTorch and ONNX Runtime.

Every model appears twice, as trained (multi-branch blocks, separate BNs) and fused (``fv.fuse``: single convs,
BNs folded, verified against the original on a probe batch). All rows are measured in one process, interleaved
(``frugalvision.bench.benchmark``), and each fused row is reported as a ratio against its own unfused row.

    python benchmarks/rep_fusion.py [--size 224] [--batch-size 8] [--repeats 30] [--threads 1] [--no-onnx]
"""

from __future__ import annotations

import argparse
import csv
import io
import shlex
import sys
from pathlib import Path

import timm
import torch

import frugalvision as fv
from frugalvision.bench import benchmark, result_header, results_to_markdown, write_results
from frugalvision.utils.io import atomic_write_text

MODELS = ["efficientrep_n", "efficientrep_s", "repvgg_a0", "mobileone_s0"]


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, size: int, batches: int = 4, batch_size: int = 8) -> torch.nn.Module:
    """Estimate BN running statistics on random images, as training would (fresh ones make eval outputs explode)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        model(torch.randn(batch_size, 3, size, size, generator=g))
    for bn, mom in zip(bns, momenta, strict=True):
        bn.momentum = mom
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--throughput-repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (1: robust on a shared machine, where spinning thread pools "
                        "of several processes make multi-threaded timings erratic)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--out", default="benchmarks/results/rep_fusion")
    p.add_argument("--note", default="Measured on an otherwise idle machine.", help="line on machine load")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    models: dict[str, torch.nn.Module] = {}
    fuse_notes: list[str] = []
    for name in a.models:
        m = calibrate_bn(timm.create_model(name, pretrained=False), a.size)
        fused, report = fv.export.fuse_with_report(m, (2, 3, a.size, a.size))
        models[f"{name}"] = m
        models[f"{name} (fused)"] = fused
        fuse_notes.append(f"| {name} | {report.summary()} |")
    rows, info = benchmark(models, img_size=a.size, batch_size=a.batch_size, repeats=a.repeats,
                           throughput_repeats=a.throughput_repeats, onnx=not a.no_onnx)
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    title = f"Re-parameterisation: CPU speed before/after fv.fuse at {a.size}x{a.size}"
    csv_path, md_path = write_results(rows, info, a.out, title=title, command=cmd)

    by_key = {(r.name, r.backend): r for r in rows}
    ratio_lines = ["| model | backend | latency b1 unfused (ms) | fused (ms) | speed-up b1 | throughput unfused "
                   f"(img/s, b{a.batch_size}) | fused | speed-up bN | GFLOPs unfused → fused | FLOP bound |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    ratio_rows = []
    for name in a.models:
        for backend in ("eager", "onnxruntime"):
            u, f = by_key.get((name, backend)), by_key.get((f"{name} (fused)", backend))
            if u is None or f is None:
                continue
            lat, thr = u.latency_ms / f.latency_ms, f.throughput / u.throughput
            ratio_rows.append({"model": name, "backend": backend, "latency_unfused_ms": u.latency_ms,
                               "latency_fused_ms": f.latency_ms, "latency_speedup": lat,
                               "throughput_unfused": u.throughput, "throughput_fused": f.throughput,
                               "throughput_speedup": thr, "gflops_unfused": u.gflops, "gflops_fused": f.gflops,
                               "flop_bound": u.gflops / f.gflops})
            ratio_lines.append(f"| {name} | {backend} | {u.latency_ms:.2f} ± {u.latency_iqr_ms:.2f} | "
                               f"{f.latency_ms:.2f} ± {f.latency_iqr_ms:.2f} | **{lat:.2f}x** | {u.throughput:.1f} | "
                               f"{f.throughput:.1f} | **{thr:.2f}x** | {u.gflops:.3f} → {f.gflops:.3f} | "
                               f"{u.gflops / f.gflops:.2f}x |")
    goal_lines = ["## The ≥ 1.5× goal", ""]
    for r in ratio_rows:
        met = r["latency_speedup"] >= 1.5
        goal_lines.append(f"- {r['model']} ({r['backend']}): {r['latency_speedup']:.2f}x at batch 1 — "
                          f"{'meets' if met else 'misses'} 1.5x (FLOP bound {r['flop_bound']:.2f}x)")
    goal_lines += ["", "A model whose branches hold a small share of its FLOPs (RepVGG-style 3x3 + 1x1 + identity: the "
                   "1x1 branch adds 1/9) cannot reach 1.5x in a backend that already folds Conv-BN and runs at its "
                   "compute peak (ONNX Runtime here); over-parameterised models (MobileOne: k parallel branches) can.",
                   ""]
    notes = [f"{a.note} Every row was measured in the same interleaved rounds, so the ratios below compare like "
             f"with like.\nThreads: {a.threads} (torch and onnxruntime). Random weights; BN statistics estimated on 4 "
             "random batches first (as training would), so eval-mode outputs have a realistic scale for the ONNX "
             "parity check."]
    md = [
        result_header(title, info, cmd, notes).rstrip("\n"),
        "",
        "## Fused vs unfused (ratios >1: fused is faster)",
        "",
        "Latency: batch 1, median (± IQR) of interleaved rounds. GFLOPs at batch 1 (a multiply-add counts 2).",
        "FLOP bound: unfused / fused GFLOPs, the speed-up fusion gives a compute-bound backend that runs both forms",
        "at the same GFLOP/s. Beyond it, fusion only gains by removing memory-bound work (BN passes, branch adds,",
        "separate activations) that the backend did not already fold.",
        "",
        *ratio_lines,
        "",
        *goal_lines,
        "## What fv.fuse did",
        "",
        "| model | fusion |",
        "|---|---|",
        *fuse_notes,
        "",
        "## All rows",
        "",
        results_to_markdown(rows, info, title="All rows", command=None).split("\n", 4)[4],
    ]
    atomic_write_text(md_path, "\n".join(md))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ratio_rows[0]))
    w.writeheader()
    w.writerows(ratio_rows)
    atomic_write_text(Path(a.out).with_name(Path(a.out).name + "_ratios.csv"), buf.getvalue())
    print(md_path.read_text())
    print(f"wrote {md_path}, {csv_path}")


if __name__ == "__main__":
    main()

"""Where ONNX Runtime spends its time in our exported models, per operator type, against the matmul peak.

The ONNX Runtime goals of the architecture work (FasterViT-0 at 1.5x the reference's batch-32 throughput; each
EfficientMod faster than the EfficientFormerV2 of its size) are limited by how much of a graph's time is FLOPs at
the machine's peak rather than memory-bound work that an export could still remove. This profiles, with
``frugalvision.bench.profile_onnx``:

* our FasterViT-0 (fused, the file ``benchmarks/fastervit_speed.py`` times), batch 32, ``--threads`` threads;
* EfficientMod xxs/xs/s and timm's EfficientFormerV2-S0/S1/S2 (re-parameterised), batch 1, 1 thread (the setting
  of ``benchmarks/efficientmod_cpu.py``);

and states, per model, the floor its counted FLOPs put on a run at the measured matmul peak.

    python benchmarks/ort_op_profile.py [--threads 2] [--runs 10] [--out benchmarks/results/ort_op_profile.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model

import frugalvision  # noqa: F401  (registers our architectures)
from frugalvision.bench import (
    OrtProfile,
    machine_info,
    matmul_peak_gflops,
    ort_matmul_peak_gflops,
    profile_onnx,
    result_header,
)
from frugalvision.export import export_onnx
from frugalvision.utils.io import atomic_write_text

PAIRS = [("efficientmod_xxs", "efficientformerv2_s0"), ("efficientmod_xs", "efficientformerv2_s1"),
         ("efficientmod_s", "efficientformerv2_s2")]
COMPUTE = ("MatMul", "FusedMatMul", "Gemm", "Conv")


def _profile(name: str, batch: int, threads: int, runs: int, tmp: Path, by_shape: bool = False
             ) -> tuple[OrtProfile, OrtProfile | None]:
    """The per-operator-type profile and, with ``by_shape``, a second run grouped by operator and input shapes."""
    torch.manual_seed(0)
    model = reparameterize_model(timm.create_model(name).eval())
    path = tmp / f"{name}.onnx"
    export_onnx(model, path, torch.randn(1, 3, 224, 224), check=True)
    x = torch.randn(batch, 3, 224, 224)
    prof = profile_onnx(path, x, threads=threads, runs=runs, warmup=2)
    shapes = profile_onnx(path, x, threads=threads, runs=runs, warmup=1, group_by="shape") if by_shape else None
    return prof, shapes


def _dense_share(prof: OrtProfile) -> float:
    """Fraction of kernel time in dense compute kernels (matmuls and non-depth-wise convs)."""
    return sum(o.share for o in prof.ops if o.op_type in COMPUTE)


def _summary_row(label: str, prof: OrtProfile, peak: float) -> str:
    dense = [o for o in prof.ops if o.op_type in COMPUTE and o.gflop]
    dense_ms, dense_gflop = sum(o.ms for o in dense), sum(o.gflop for o in dense)
    floor_ms = prof.gflop / peak * 1e3
    return (f"| {label} | {prof.run_ms:.2f} | {prof.gflop:.3f} | {100 * _dense_share(prof):.0f}% | "
            f"{100 * dense_gflop / (dense_ms / 1e3) / peak:.0f}% | {prof.kernel_ms - dense_ms:.2f} | {floor_ms:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads of the FasterViT-0 batch-32 profile")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/ort_op_profile.md")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ort-op-profile-") as d:  # exported graphs; removed at the end
        _run(a, Path(d))


def _run(a: argparse.Namespace, tmp: Path) -> None:
    info = machine_info()
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)

    peaks: dict[int, tuple[float, float]] = {}  # threads -> (onnxruntime MatMul, torch matmul) GFLOP/s

    def measure_peaks() -> None:  # a peak is a best case: keep the best of the probes before and after the profiles
        for t in sorted({1, a.threads}):
            torch.set_num_threads(t)
            o, tp = ort_matmul_peak_gflops(t, seconds=1.0), matmul_peak_gflops(seconds=1.0)
            peaks[t] = (max(o, peaks.get(t, (0.0, 0.0))[0]), max(tp, peaks.get(t, (0.0, 0.0))[1]))

    measure_peaks()
    torch.set_num_threads(a.threads)
    fv, fv_shapes = _profile("fastervit_0", a.batch, a.threads, max(3, a.runs // 2), tmp, by_shape=True)
    torch.set_num_threads(1)
    em = {n: _profile(n, 1, 1, a.runs, tmp)[0] for pair in PAIRS for n in pair}
    measure_peaks()
    peak_n, peak_1 = peaks[a.threads][0], peaks[1][0]

    head = ("| model | run ms | GFLOP counted | time in dense kernels | dense kernels' GFLOP/s of peak | "
            "other kernels ms | all FLOPs at peak, ms |")
    sep = "|---|---|---|---|---|---|---|"
    notes = ["Kernel times from onnxruntime's node profiler (all graph optimisations, as `OrtRunner`), averaged over "
             "the timed runs; FLOPs counted from the shapes it records (a multiply-add counts 2). \"Dense kernels\": "
             "MatMul / FusedMatMul / Gemm / dense Conv; depth-wise convs are listed separately. \"All FLOPs at "
             "peak\": the run time if every counted FLOP ran at the measured matmul peak and nothing else took time "
             "— the floor no export can go below without removing FLOPs. Peak: onnxruntime's own MatMul kernel on "
             "large squares, the best of probes before and after the profiles."]
    lines = [result_header("ONNX Runtime time per operator type, against the matmul peak", info, cmd, notes
                           ).rstrip("\n"), "",
             "## Summary", "", head, sep,
             _summary_row(f"FasterViT-0 (ours, fused), batch {a.batch}, {a.threads} threads", fv, peak_n)]
    lines += [_summary_row(f"{n}, batch 1, 1 thread", em[n], peak_1) for pair in PAIRS for n in pair]
    lines += ["", "Matmul peak (fp32, best over 512/1024/2048 squares and over probes before and after the "
              "profiles; the tables use onnxruntime's): " + ", ".join(
        f"{t} thread{'s' * (t > 1)}: onnxruntime {o:.1f}, torch {tp:.1f} GFLOP/s" for t, (o, tp) in peaks.items())
        + ".",
              "", "EfficientMod against the EfficientFormerV2 of its size in ONNX Runtime (1 thread):", "",
              "| pair | measured speed-up | best possible speed-up (EfficientMod's FLOPs at peak, nothing else) |",
              "|---|---|---|"]
    for ours, theirs in PAIRS:
        floor = em[ours].gflop / peak_1 * 1e3
        lines.append(f"| {ours} vs {theirs} | {em[theirs].run_ms / em[ours].run_ms:.2f}x | "
                     f"{em[theirs].run_ms / floor:.2f}x |")
    per_img = fv.gflop / a.batch
    lines += ["", f"FasterViT-0: {per_img:.3f} GFLOP per image; at the {a.threads}-thread matmul peak that is at most "
              f"{peak_n / per_img:.1f} img/s; profiled here {a.batch / fv.run_ms * 1e3:.1f} img/s "
              f"({100 * fv.gflop / (fv.run_ms / 1e3) / peak_n:.0f}% of peak over the whole run).", ""]
    lines += [f"## FasterViT-0 (ours, fused), batch {a.batch}, {a.threads} threads", "",
              fv.to_markdown(peak_n), ""]
    if fv_shapes is not None:
        mm = OrtProfile(fv_shapes.path, fv_shapes.runs, fv_shapes.threads, fv_shapes.run_ms,
                        [o for o in fv_shapes.ops if o.gflop])
        lines += [f"### FasterViT-0: dense kernels by input shape (a separate profiled run of {fv_shapes.runs} "
                  f"batches; share = of all kernel time)", "",
                  mm.to_markdown(peak_n, top=16, total_label="**dense kernels**"), ""]
    for n in em:
        lines += [f"## {n}, batch 1, 1 thread", "", em[n].to_markdown(peak_1), ""]
    out = atomic_write_text(a.out, "\n".join(lines))
    print("\n".join(lines[:30]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

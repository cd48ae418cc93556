"""The EfficientMod paper's CPU column in one run: batch-1 CPU latency, eager PyTorch and ONNX Runtime.

EfficientMod xxs/xs/s against timm's EfficientFormerV2-S0/S1/S2 (the paper's size-matched baselines),
MobileNetV2-1.0 and DeiT-T, all at 224x224, measured side by side in interleaved rounds. Every model is
re-parameterised for inference first (EfficientMod folds its layer scales). The paper's claim under test:
each EfficientMod is faster on CPU than the EfficientFormerV2 of its size.

    python benchmarks/efficientmod_cpu.py [--threads 1] [--repeats 40] [--out benchmarks/results/efficientmod_cpu]

``--threads 1`` by default: single-core latency, the setting least disturbed by other work on a shared machine
(the official repository has not published its latency script). ``--openvino`` adds OpenVINO rows on the same
ONNX files: a second compiled runtime, to tell a runtime's gap from the model's.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import timm
import torch
from timm.layers import set_fused_attn, use_fused_attn
from timm.utils import reparameterize_model

import frugalvision  # noqa: F401  (registers EfficientMod)
from frugalvision.bench import benchmark, count_flops, result_header, results_to_markdown, write_results
from frugalvision.utils.io import atomic_write_text

# name -> (label, paper CPU latency ms, paper params M, paper FLOPs G)
MODELS = {
    "mobilenetv2_100": ("MobileNetV2-1.0", 3.8, 3.5, 0.3),
    "efficientformerv2_s0": ("EfficientFormerV2-S0", 10.7, 3.6, 0.4),
    "efficientmod_xxs": ("EfficientMod-xxs", 10.2, 4.7, 0.6),
    "deit_tiny_patch16_224": ("DeiT-T", 16.5, 5.9, 1.2),
    "efficientformerv2_s1": ("EfficientFormerV2-S1", 15.4, 6.2, 0.7),
    "efficientmod_xs": ("EfficientMod-xs", 13.4, 6.6, 0.8),
    "efficientformerv2_s2": ("EfficientFormerV2-S2", 26.5, 12.7, 1.3),
    "efficientmod_s": ("EfficientMod-s", 23.5, 12.9, 1.4),
}
PAIRS = [("efficientmod_xxs", "efficientformerv2_s0"), ("efficientmod_xs", "efficientformerv2_s1"),
         ("efficientmod_s", "efficientformerv2_s2")]


def exact_gmacs(name: str) -> float:
    """Multiply-accumulates at 224², counted on the meta device with explicit (non-fused) attention matmuls."""
    was = use_fused_attn()
    set_fused_attn(False)
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
        return count_flops(model, torch.empty(1, 3, 224, 224, device="meta")) / 2e9
    finally:
        set_fused_attn(was)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--openvino", action="store_true", help="add OpenVINO (CPU plugin, f32) on the same ONNX files")
    p.add_argument("--note", default="", help="a line on the run (machine load, purpose), added under the title")
    p.add_argument("--out", default="benchmarks/results/efficientmod_cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    models = {n: reparameterize_model(timm.create_model(n).eval()) for n in MODELS}
    macs = {n: exact_gmacs(n) for n in MODELS}
    rows, info = benchmark(models, img_size=224, batch_size=1, threads=a.threads, warmup=a.warmup,
                           repeats=a.repeats, throughput_repeats=2, onnx=not a.no_onnx, openvino=a.openvino,
                           memory=False)
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    title = "EfficientMod vs EfficientFormerV2, MobileNetV2, DeiT-T: batch-1 CPU latency at 224x224"
    csv_path, md_path = write_results(rows, info, a.out, title=title, command=cmd)

    by = {(r.name, r.backend): r for r in rows}
    backends = [b for b in ("eager", "onnxruntime", "openvino") if any(r.backend == b for r in rows)]
    notes = (a.note,
             "All rows are timed in interleaved rounds, so the ratios between models stay meaningful when other "
             "work shares the machine (see the load average above); absolute times do not.",
             f"Batch 1, {a.threads} thread(s) for torch and onnxruntime, median of {a.repeats} interleaved rounds "
             "(IQR in brackets). MACs: multiply-accumulates with attention included (the paper's \"FLOPs\"); "
             "params and MACs computed here, paper values for reference.")
    lines = [result_header(title, info, cmd, notes).rstrip("\n"), ""]
    head = "| model | params (M) | MACs (G) | " + " | ".join(f"{b} ms" for b in backends) + \
        " | paper CPU ms | paper params / FLOPs |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for n, (label, p_ms, p_par, p_fl) in MODELS.items():
        lat = " | ".join(f"{by[n, b].latency_ms:.2f} ({by[n, b].latency_iqr_ms:.2f})" for b in backends)
        lines.append(f"| {label} | {by[n, backends[0]].params_m:.2f} | {macs[n]:.3f} | {lat} | {p_ms} | "
                     f"{p_par} / {p_fl} |")
    lines += ["", "## The paper's claim: EfficientMod faster than the EfficientFormerV2 of its size", "",
              "Speed-up = EfficientFormerV2 latency / EfficientMod latency (>1: EfficientMod is faster).", ""]
    head = "| pair | " + " | ".join(f"speed-up {b}" for b in backends) + " | paper speed-up | holds here? |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    verdicts = []
    for ours, theirs in PAIRS:
        sp = {b: by[theirs, b].latency_ms / by[ours, b].latency_ms for b in backends}
        paper = MODELS[theirs][1] / MODELS[ours][1]
        ok = [b for b in backends if sp[b] > 1.0]
        verdict = "yes (" + ", ".join(ok) + ")" if len(ok) == len(backends) else \
            ("no" if not ok else "only " + ", ".join(ok))
        verdicts.append(verdict)
        lines.append(f"| {MODELS[ours][0]} vs {MODELS[theirs][0]} | " +
                     " | ".join(f"{sp[b]:.2f}x" for b in backends) + f" | {paper:.2f}x | {verdict} |")
    lines += ["", "## All rows (frugalvision.bench)", "",
              "GFLOPs count a multiply-add as 2 (2 x the MACs above). Throughput is batch 1 here (= 1 / latency).",
              ""]
    full = results_to_markdown(rows, info, title, cmd).split("\n")
    lines += [ln for ln in full if ln.startswith("|")]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()

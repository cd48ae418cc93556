"""FasterViT-0 on CPU: our implementation (fused eager, and ONNX Runtime) against the reference package, side by side.

Same weights (the reference model's random weights with non-trivial BN statistics, loaded into ours through
``checkpoint_filter_fn``), same threads, one process, interleaved rounds (``frugalvision.bench.benchmark``). Rows:

* reference ``fastervit`` package, eager, as shipped (position biases recomputed every call);
* the same after its own ``switch_to_deploy`` (``timm.utils.reparameterize_model``: cached position biases);
* ours, eager, after ``reparameterize_model`` (conv+BN and layer scale folded, cached position terms,
  oneDNN GEMM/conv epilogues for bias+GELU and residual adds, ``scaled_dot_product_attention``, channels-last);
* ours exported to ONNX and run in ONNX Runtime (same thread count);
* with ``--batch-parallel N`` (default: the thread count), two more rows split each batch into N chunks run
  concurrently on N single-thread workers: ours in ONNX Runtime (``OrtRunner(batch_parallel=N)``) and, given the
  same treatment, the reference eager model (N Python threads, one torch thread each). These rows are for
  throughput; their batch-1 latency is one single-thread worker;
* with ``--openvino`` (needs the ``openvino`` package), the same ONNX file compiled by OpenVINO's CPU plugin
  (oneDNN kernels, f32 inference precision forced, same threads): a second backend that fuses element-wise work
  into its GEMM/conv kernels, to check whether the ONNX Runtime row is limited by its kernels or by the FLOPs.

Outputs of every row are checked against the reference on the benchmark input before timing.

    python benchmarks/fastervit_speed.py [--threads 2] [--batch 32] [--openvino] [--out PATH]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

import frugalvision  # noqa: F401  (registers our architectures)
from frugalvision.bench import benchmark, count_flops, results_to_markdown, write_results
from frugalvision.export import OpenVinoRunner, OrtRunner, export_onnx
from frugalvision.models.fastervit import checkpoint_filter_fn
from frugalvision.utils.io import atomic_write_text


class OrtModule(nn.Module):
    """An ONNX Runtime session behind an ``nn.Module`` call, so the harness times it like the eager rows."""

    def __init__(self, path: Path, threads: int, batch_parallel: int = 1) -> None:
        super().__init__()
        self.runner = OrtRunner(path, threads=threads, batch_parallel=batch_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.runner(x)[0]))


class SplitBatch(nn.Module):
    """Eager counterpart of ``OrtRunner(batch_parallel=n)``: batch chunks on ``n`` threads of one torch thread."""

    def __init__(self, model: nn.Module, parts: int) -> None:
        super().__init__()
        self.model, self.parts = model, parts
        self.pool = ThreadPoolExecutor(parts, initializer=torch.set_num_threads, initargs=(1,))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            chunks = x.tensor_split(min(self.parts, x.shape[0]))
            return torch.cat([f.result() for f in [self.pool.submit(self.model, c) for c in chunks]])
        finally:
            torch.set_num_threads(before)


class OpenVinoModule(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU (f32 inference precision, ``threads`` threads)."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        self.runner = OpenVinoRunner(path, threads=threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner(x)[0])


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.8 + 0.4)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--throughput-repeats", type=int, default=5)
    p.add_argument("--batch-parallel", type=int, default=None, help="workers of the batch-split rows "
                   "(default: --threads; 1: no such rows)")
    p.add_argument("--openvino", action="store_true", help="add a row: the ONNX file run by OpenVINO's CPU plugin")
    p.add_argument("--note", default="", help="line on machine load, added to the table")
    p.add_argument("--out", default="benchmarks/results/fastervit_speed")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastervit.models.faster_vit import faster_vit_0_224

        ref = faster_vit_0_224().eval()
    _randomize_bn(ref)
    ours = timm.create_model("fastervit_0").eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours))
    fused = reparameterize_model(ours)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y_ref = ref(x)
        deployed = reparameterize_model(ref)  # the reference's own switch_to_deploy (caches biases seen above)
        errs = {"reference, deployed": deployed(x), "ours, fused eager": fused(x)}
    tmp = Path(tempfile.mkdtemp(prefix="fastervit-bench-"))
    onnx_path = tmp / "fastervit_0.onnx"
    res = export_onnx(fused, onnx_path, x[:1], check=True)
    ort = OrtModule(onnx_path, a.threads)
    errs["ours, ONNX Runtime"] = ort(x)
    n_par = a.threads if a.batch_parallel is None else a.batch_parallel
    extra: dict[str, nn.Module] = {}  # timed with the main rows (no torch thread changes)
    split: dict[str, nn.Module] = {}  # timed on their own: SplitBatch changes torch's thread count per call
    if a.openvino:
        extra["ours fastervit_0 (OpenVINO, same ONNX file)"] = OpenVinoModule(onnx_path, a.threads)
    if n_par > 1:
        extra[f"ours fastervit_0 (ONNX Runtime, {n_par} sessions)"] = OrtModule(onnx_path, a.threads, n_par)
        split[f"reference fastervit (eager, batch split over {n_par} threads)"] = SplitBatch(ref, n_par)
        split[f"ours fastervit_0 (ONNX Runtime, {n_par} sessions)"] = extra[next(iter(extra))]
    with torch.no_grad():
        for k, m in {**extra, **split}.items():
            errs[k] = m(x)
    scale = float(y_ref.abs().max())
    rel = {k: float((v - y_ref).abs().max()) / scale for k, v in errs.items()}

    models = {"reference fastervit (eager)": ref, "reference fastervit (switch_to_deploy)": deployed,
              "ours fastervit_0 (fused eager)": fused, "ours fastervit_0 (ONNX Runtime)": ort, **extra}
    rows, info = benchmark(models, img_size=224, batch_size=a.batch, threads=a.threads, repeats=a.repeats,
                           throughput_repeats=a.throughput_repeats, warmup=2)
    split_rows = []
    if split:
        split_rows, _ = benchmark(split, img_size=224, batch_size=a.batch, threads=a.threads, repeats=a.repeats,
                                  throughput_repeats=a.throughput_repeats, warmup=2, memory=False)
    flops = count_flops(fused, torch.randn(1, 3, 224, 224))
    for r in [*rows, *split_rows]:
        onnx_row = "ONNX" in r.name or "OpenVINO" in r.name
        r.backend = "openvino" if "OpenVINO" in r.name else "onnxruntime" if "ONNX" in r.name else "eager"
        src = rows[2] if onnx_row else rows[0] if "batch split" in r.name else None
        if src is r:
            continue
        if src is not None:  # same operations as the model they came from (counters do not see worker threads)
            r.params_m, r.peak_mem_mb = src.params_m, None
            r.gflops = flops / 1e9 if onnx_row else src.gflops
            r.achieved_gflops = r.gflops * r.throughput
            r.peak_fraction = r.achieved_gflops / info.matmul_peak_gflops
    cmd = "python " + " ".join(shlex.quote(s) for s in sys.argv)
    _, md = write_results(rows, info, a.out, title="FasterViT-0 on CPU: ours vs the reference implementation",
                          command=cmd)
    notes = ["", "Output agreement with the reference eager model on the same input (max abs diff / max |output|):",
             ""]
    notes += [f"- {k}: {v:.2e}" for k, v in rel.items()]
    ref_tp = rows[0].throughput
    notes += ["", f"Batch-{a.batch} throughput against the reference eager model ({ref_tp:.1f} img/s, intra-op "
              "threads):", ""]
    notes += [f"- {r.name}: {r.throughput / ref_tp:.2f}x" for r in rows[1:]]
    if split_rows:
        split_ref, split_ours = split_rows
        ratio = split_ours.throughput / split_ref.throughput
        notes += ["", f"## Both split over {n_par} workers", "",
                  "The reference given the same batch splitting (its own interleaved run: the eager split changes "
                  "torch's thread count per call, which would disturb the rows above):", "",
                  results_to_markdown(split_rows, info, title="split", command=None).split("\n", 4)[4], "",
                  f"Ours in ONNX Runtime {ratio:.2f}x the reference eager model ({split_ref.throughput:.1f} img/s) "
                  f"when both split the batch over {n_par} single-thread workers."]
    if a.note:
        notes += ["", a.note]
    notes += ["", f"ONNX export: {res.exporter} exporter, onnxruntime parity {res.max_rel_err:.2e} (relative).",
              "", "Rows were timed in interleaved rounds, so the ratios stay comparable when other work shares the "
              "machine (see the load average in the machine line); absolute numbers do not."]
    atomic_write_text(md, md.read_text() + "\n".join(notes) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()

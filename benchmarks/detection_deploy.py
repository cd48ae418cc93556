"""Deployment speed of detectors on the CPU: YOLOv6 as trained vs fused (RepConv), vs torchvision baselines.

Every row is end to end: images in, final detections out (decoding and NMS included; torchvision's detectors run
their own resize-free transform and post-processing). Eager PyTorch and ONNX Runtime, batch 1 and batch N, at the
tile size and at 640 px. All rows of one input size are timed in one process, interleaved
(``frugalvision.bench.timing.interleaved``), and reported as ratios to the fused YOLOv6-N row.

Weights: a trained detector model file when ``--detector`` is given (its classes and weights), random otherwise
(BN statistics calibrated on random images); with random weights the score threshold leaves almost no detections,
so NMS costs little for every model. Baselines are random-initialised (only their speed is measured here).

    python benchmarks/detection_deploy.py [--sizes 320 640] [--batch 8] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import frugalvision as fv
from frugalvision.bench import count_flops, count_params, result_header
from frugalvision.bench.core import machine_info, matmul_peak_gflops
from frugalvision.bench.timing import interleaved, median_ms
from frugalvision.detect.onnx_export import OrtDetector, export_detector_onnx
from frugalvision.detect.postprocess import postprocess
from frugalvision.detect.yolov6 import create_detector
from frugalvision.utils.io import atomic_write_text
from frugalvision.weights import load_model_file

BASELINES = ["fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn"]


@torch.no_grad()
def calibrate(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """BN running statistics from a few random batches (fresh statistics make outputs explode)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.forward_raw(torch.rand(4, 3, size, size, generator=g))
    for bn in bns:
        bn.momentum = 0.03
    return model.eval()


class EndToEnd(torch.nn.Module):
    """Our detector + post-processing, so that eager rows include NMS like torchvision's."""

    def __init__(self, model: torch.nn.Module, conf: float) -> None:
        super().__init__()
        self.model, self.conf = model, conf

    def forward(self, x: torch.Tensor) -> Any:
        """Images to detections."""
        return postprocess(self.model(x), conf_thres=self.conf, iou_thres=0.65, max_det=100)


class Baseline(torch.nn.Module):
    """A torchvision detector called on a batch tensor (it takes a list of images)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        """Images to detections."""
        return self.model(list(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", default=None, help="a trained YOLOv6 model file (else random weights)")
    p.add_argument("--variants", nargs="+", default=["yolov6_n", "yolov6_s"])
    p.add_argument("--baselines", nargs="*", default=BASELINES)
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/detection_deploy")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from frugalvision.detect.baselines import build_baseline

    sys.path.insert(0, str(Path(__file__).parent))
    from detection_compare import export_baseline_onnx

    info = machine_info("cpu")
    info.matmul_peak_gflops = matmul_peak_gflops("cpu")
    trained: dict[str, torch.nn.Module] = {}
    num_classes = a.num_classes
    if a.detector:
        m, minfo = load_model_file(a.detector)
        trained[str(minfo["name"])] = m
        num_classes = len(minfo["classes"])
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fv-det-deploy-"))
    for size in a.sizes:
        eager: dict[str, torch.nn.Module] = {}
        meta: dict[str, dict[str, Any]] = {}
        for name in a.variants:
            det = trained.get(name) or calibrate(create_detector(name, num_classes=num_classes), size)
            fused = fv.fuse(det, (2, 3, size, size))
            for label, m in ((f"{name}", det), (f"{name} fused", fused)):
                eager[label] = EndToEnd(m, a.conf).eval()
                meta[label] = {"params_M": count_params(m) / 1e6,
                               "GFLOPs": count_flops(m, torch.rand(1, 3, size, size)) / 1e9}
        for name in a.baselines:
            b = build_baseline(name, num_classes, size).eval()
            eager[name] = Baseline(b).eval()
            meta[name] = {"params_M": count_params(b) / 1e6, "GFLOPs": None}
        ort: dict[str, OrtDetector] = {}
        for name in a.variants:
            label = f"{name} fused"
            path = tmp / f"{name}_{size}.onnx"
            try:
                export_detector_onnx(eager[label].model, path, img_size=(size, size), conf_thres=a.conf, max_det=100)
                ort[f"{label} (ORT)"] = OrtDetector(path, threads=a.threads)
            except Exception as e:  # report and go on: the eager rows stay valid
                meta[label]["onnx_error"] = str(e)[:200]
        base_ort: dict[str, Any] = {}  # torchvision graphs are exported for batch 1 (a list of one image)
        x1 = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        for name in a.baselines:
            try:
                base_ort[f"{name} (ORT)"] = export_baseline_onnx(eager[name].model, x1, tmp / f"{name}_{size}.onnx",
                                                                 a.threads)
            except Exception as e:
                meta[name]["onnx_error"] = str(e).splitlines()[0][:200]
        for batch in (1, a.batch):
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            xn = x.numpy()
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in eager.items()}
            fns.update({k: (lambda r=r, xn=xn: r(xn)) for k, r in ort.items()})
            if batch == 1:
                fns.update(base_ort)
                ort_names = set(ort) | set(base_ort)
            else:
                ort_names = set(ort)
            times = median_ms(interleaved(fns, rounds=a.repeats, warmup=2, inference=True))
            ref = times.get(f"{a.variants[0]} fused") or min(times.values())
            for k, ms in times.items():
                base = k.removesuffix(" (ORT)")
                g = meta.get(base, {}).get("GFLOPs")
                rows.append({"size": size, "batch": batch, "model": k, "backend": "onnxruntime" if k in ort_names else
                             "eager", "ms": round(ms, 2), "img_per_s": round(1000 * batch / ms, 2),
                             "ratio_to_ref": round(ms / ref, 2), "params_M": round(meta[base]["params_M"], 2),
                             "GFLOPs": None if g is None else round(g, 2),
                             "GFLOP_per_s": None if g is None else round(g * batch / (ms / 1000), 1)})
            print(json.dumps([r for r in rows if r["size"] == size and r["batch"] == batch], indent=1))
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    notes = [f"Threads: {a.threads}. Matmul peak of this machine: {info.matmul_peak_gflops:.0f} GFLOP/s.",
             "Weights: " + (f"trained detector {a.detector}" if a.detector else
                            "random (BN calibrated on random images)") + "; baselines random-initialised.",
             "Every row is end to end (decode + NMS). GFLOPs: our detector's forward counted with torch's FLOP "
             "counter at batch 1 (not the NMS); '—' where the counter does not apply (torchvision's detectors "
             "run data-dependent code).",
             f"ratio_to_ref: latency divided by the {a.variants[0]} fused eager row of the same size and batch.",
             "ONNX Runtime: ours as one graph with NMS inside (export_detector_onnx, dynamic batch); torchvision's "
             "detectors through torch.onnx for a batch of one image (their graphs take a list of images), checked "
             "against eager; a missing row says why below."]
    for name, m in meta.items():
        if "onnx_error" in m:
            notes.append(f"{name}: no ONNX Runtime row ({m['onnx_error']}).")
    md = [result_header("Detector deployment speed on the CPU", info, cmd, notes),
          "| size | batch | model | backend | ms | img/s | ratio | params (M) | GFLOPs | achieved GFLOP/s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['size']} | {r['batch']} | {r['model']} | {r['backend']} | {r['ms']} | {r['img_per_s']} | "
                  f"{r['ratio_to_ref']} | {r['params_M']} | {r['GFLOPs'] if r['GFLOPs'] is not None else '—'} | "
                  f"{r['GFLOP_per_s'] if r['GFLOP_per_s'] is not None else '—'} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"rows": rows, "args": vars(a)}, indent=1,
                                                           default=str) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

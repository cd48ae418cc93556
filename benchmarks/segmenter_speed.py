"""Batch-1 CPU latency of defect segmenters at the same input size, side by side in one run.

Ours (light all-MLP decoder on timm backbones, fused for inference) against segmentation_models_pytorch
baselines (UNet, PSPNet, DeepLabV3+, SegFormer), mirroring Defect Spectrum's inference-time table.

    python benchmarks/segmenter_speed.py [--size 256] [--out benchmarks/results/segmenter_speed]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import timm
import torch
from timm.utils import reparameterize_model

import frugalvision  # noqa: F401  (registers our architectures)
from frugalvision.bench import benchmark, write_results
from frugalvision.inspect.segmentation import build_segmenter

OURS = ["repvgg_a0", "efficientrep_n", "efficientrep_s", "efficientmod_xxs", "fastervit_0", "resnet18"]
BASELINES = ["smp:unet:resnet18", "smp:pspnet:resnet18", "smp:deeplabv3plus:resnet18", "smp:segformer:mit_b0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)  # FasterViT-0 needs windows that divide its stage maps
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--out", default="benchmarks/results/segmenter_speed")
    a = p.parse_args()
    torch.manual_seed(0)
    models = {}
    for name in OURS:
        if not timm.is_model(name):
            print(f"note: {name} is not registered in this checkout; left out", file=sys.stderr)
            continue
        kw = {"img_size": a.size} if name.startswith("fastervit") else {}
        m = build_segmenter(f"ours:{name}", a.classes, **kw).eval()
        models[f"ours:{name} (fused)"] = reparameterize_model(m)
    for name in BASELINES:
        models[name] = build_segmenter(name, a.classes).eval()
    rows, info = benchmark(models, img_size=a.size, batch_size=8, repeats=a.repeats, throughput_repeats=5,
                           onnx=a.onnx)
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    _, md = write_results(rows, info, a.out, title=f"Defect segmenters: CPU speed at {a.size}x{a.size}", command=cmd)
    print(md.read_text())


if __name__ == "__main__":
    main()

"""Why SLiMe's first look gives no defect: fit one annotated crack, then inspect losses, predictions and peaks.

For official and balanced class weights: the cross-entropy at the first and last epoch, the predicted defect
fraction and IoU on the annotated tile and two others with the official all-token softmax and with a softmax over
the part tokens only, and the peak cross-attention probabilities (all tokens) of the background and the part.

    python experiments/slime_diagnose.py --backbone runs/slime/backbone/model.safetensors
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from frugalvision.inspect.bundled import load_benchmark
from frugalvision.inspect.slime import AttentionRecorder, Slime, SlimeConfig, cross_maps
from frugalvision.inspect.text_diffusion import TextDiffusionBackbone
from frugalvision.pipelines.common import read_rgb
from frugalvision.pipelines.slime import read_mask
from frugalvision.utils.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", default="experiments/results/slime_diagnose.txt")
    a = p.parse_args()
    torch.set_num_threads(1)
    bb = TextDiffusionBackbone.from_file(a.backbone)
    samples = [s for s in load_benchmark("test", "brick").samples if s.defect == "crack"]
    img, m = read_rgb(samples[0].image), read_mask(samples[0].mask)
    lines = [f"python {' '.join(sys.argv)}", f"annotated: {samples[0].image}"]
    for weighting in ("official", "balanced"):
        s = Slime(bb, SlimeConfig(num_parts=2, epochs=a.epochs, train_mask_size=32, device="cpu",
                                  class_weighting=weighting))
        h = s.fit([img], [m], progress=False)
        lines.append(f"[{weighting} weights] cross-entropy {h[0]['cross_entropy']:.3f} -> {h[-1]['cross_entropy']:.3f}"
                     f", self-attention MSE {h[0]['self_attention']:.3f} -> {h[-1]['self_attention']:.3f}")
        for softmax in ("all", "parts"):
            s.config.test_softmax = softmax
            for smp in samples[:3]:
                pred = s.predict(read_rgb(smp.image)).numpy().astype(bool)
                gt = read_mask(smp.mask).astype(bool)
                iou = (pred & gt).sum() / max((pred | gt).sum(), 1)
                lines.append(f"  test_softmax={softmax} {smp.image.name}: defect IoU {100 * iou:.1f} %, predicted "
                             f"defect {100 * pred.mean():.1f} % of pixels (true {100 * gt.mean():.1f} %)")
        x = torch.nn.functional.interpolate(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255,
                                            size=bb.image_size)
        with AttentionRecorder(bb.unet, s.cross_layers + s.self_layers) as rec, torch.no_grad():
            scores, _ = s._run(x, 100, torch.Generator().manual_seed(0), False, rec)
        c = cross_maps(scores, s.cross_layers, 2, 16, softmax_all=True)
        lines.append(f"  peak probability over all tokens: background {float(c[0].max()):.3f}, "
                     f"defect {float(c[1].max()):.3f}")
    atomic_write_text(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

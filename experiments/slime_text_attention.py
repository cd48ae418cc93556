"""Does the backbone's cross-attention to a caption's defect words point at the defect? (SLiMe's premise.)

SLiMe assumes that a text-conditioned diffusion UNet's cross-attention to a word lands on what the word names in
the image (true of Stable Diffusion). This checks that premise on the backbone trained here, with no optimisation:
every defective test tile of the bundled benchmark (never seen in pretraining) is noised to timestep t and run
through the UNet with its own benchmark caption ("A crack on the brick surface at the top left, ..."); the attention
paid to the defect words (the tokens between "A"/"An" and "on", softmax over all tokens, mean over heads and those
tokens) is compared with the defect mask by pixel AUROC per tile (0.5: no localisation). Same for the UNet with
random weights.

    python experiments/slime_text_attention.py --backbone runs/slime/backbone/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from frugalvision.bench.core import result_header
from frugalvision.inspect.anomaly.metrics import pixel_auroc
from frugalvision.inspect.bundled import load_benchmark
from frugalvision.inspect.slime import AttentionRecorder
from frugalvision.inspect.text_diffusion import MiniLMStates, TextDiffusion, TextDiffusionBackbone, load_text_diffusion
from frugalvision.pipelines.common import read_rgb
from frugalvision.pipelines.slime import read_mask
from frugalvision.utils.io import atomic_write_text


def defect_tokens(tokenizer, caption: str, max_tokens: int, words: str = "defect") -> list[int]:
    """Positions of the defect words (the tokens after "a"/"an" and before "on"), or of the control word
    ``surface``."""
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_tokens)["input_ids"]
    toks = tokenizer.convert_ids_to_tokens(ids)
    if words == "surface":
        return [toks.index("surface")]
    start = next(i for i, w in enumerate(toks) if w in ("a", "an")) + 1
    end = toks.index("on", start)
    return list(range(start, end))


@torch.no_grad()
def attention_auroc(bb: TextDiffusionBackbone, samples, layers: list[str], t: int, seed: int,
                    words: str = "defect") -> list[float]:
    tok = bb.states.encoder.tokenizer
    out = []
    gen = torch.Generator().manual_seed(seed)
    n = int(bb.scheduler.config.num_train_timesteps)
    tt = torch.tensor([min(round(t * n / 1000), n - 1)])
    with AttentionRecorder(bb.unet, layers) as rec:
        for s in samples:
            img = torch.from_numpy(read_rgb(s.image)).permute(2, 0, 1).float()[None] / 255
            x = bb.encode_images(F.interpolate(img, size=bb.image_size, mode="bilinear", antialias=True))
            noisy = bb.scheduler.add_noise(x, torch.randn(x.shape, generator=gen), tt)
            bb.unet(noisy, tt, encoder_hidden_states=bb.prompt_states([s.caption]))
            scores = rec.pop()
            pos = defect_tokens(tok, s.caption, bb.states.max_tokens, words)
            maps = []
            for name in layers:
                a = scores[name][0].softmax(-1)[..., pos].mean((0, 2))  # mean over heads and defect tokens
                side = int(a.numel() ** 0.5)
                maps.append(F.interpolate(a.view(1, 1, side, side), size=128, mode="bilinear")[0, 0])
            out.append(pixel_auroc(torch.stack(maps).mean(0).numpy(), read_mask(s.mask) > 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--timesteps", default="100,300")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="experiments/results/slime_text_attention")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    trained, info = load_text_diffusion(a.backbone)
    states = MiniLMStates(trained.config.max_tokens)
    torch.manual_seed(0)
    backbones = {"pretrained here": TextDiffusionBackbone(trained, states, a.backbone),
                 "random weights": TextDiffusionBackbone(TextDiffusion(trained.config, states.width), states)}
    names = [n for n, _ in trained.unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn2")]
    layer_sets = {"cross 1/4 (SLiMe default: up_blocks.0.attentions.0)": [names[0]],
                  "cross 1/2 (up_blocks.1)": [n for n in names if n.startswith("up_blocks.1.")]}
    samples = [s for s in load_benchmark("test").samples if s.label]
    timesteps = [int(x) for x in a.timesteps.split(",")]
    rows = []
    runs = [(b, ln, t, "defect") for b in backbones for ln in layer_sets for t in timesteps]
    runs += [("pretrained here", ln, t, "surface") for ln in layer_sets for t in timesteps]
    for bname, lname, t, words in runs:
        v = np.asarray(attention_auroc(backbones[bname], samples, layer_sets[lname], t, a.seed, words))
        rows.append({"backbone": bname, "layers": lname, "t": t, "words": words, "auroc_mean": float(v.mean()),
                     "auroc_median": float(np.median(v)), "frac_above_0.7": float((v > 0.7).mean()), "tiles": len(v)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    note = (f"Backbone: {a.backbone} ({info.get('steps')} pretraining steps, final train loss "
            f"{info.get('final_train_loss'):.4f}). {len(samples)} defective test tiles of all 5 categories, each "
            "with its own benchmark caption; one noise draw per tile (seed "
            f"{a.seed}). AUROC of the attention paid to the defect words (and, as a control, to the word "
            "'surface') vs the defect mask, per tile.")
    lines = [result_header("Does cross-attention to the defect words point at the defect?",
                           command=["python", *sys.argv], notes=[note]), "",
             "| backbone | words attended | layers | t (of 1000) | mean AUROC | median AUROC | tiles AUROC > 0.7 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        words = "the defect words" if r["words"] == "defect" else "control: the word 'surface'"
        lines.append(f"| {r['backbone']} | {words} | {r['layers']} | {r['t']} | {r['auroc_mean']:.3f} | "
                     f"{r['auroc_median']:.3f} | {100 * r['frac_above_0.7']:.0f} % |")
    out = Path(a.out)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Cost of hierarchical attention (HAT) vs full global attention vs plain window attention as resolution grows.

The attention stages of FasterViT-0 (stages 3 and 4: 256/512 channels, 6 + 5 blocks) are built three ways at each
input resolution and run on the stride-8 feature map they would receive (batch 1, CPU); the conv stages are the
same in all three and left out:

* ``hat``: windows with carrier tokens (2x2 per window) in both stages: the FasterViT design;
* ``window``: the same windows without carrier tokens (no cross-window information at all);
* ``global``: one window covering the whole stage, i.e. full self-attention over every token.

Window side: 7 at 224 (stage resolutions 14/7), 8 elsewhere (the stage resolutions 32..64 are not multiples of 7).
Latency: median of interleaved runs of the fused models (flash ``scaled_dot_product_attention``). Peak memory:
``frugalvision.bench.peak_memory_mb`` (live bytes of tensors created during the forward) with the flash kernel and
with the math kernel, which materialises the attention matrix as the reference implementation does.

    python benchmarks/fastervit_complexity.py [--sizes 224 512 768 1024] [--out benchmarks/results/fastervit_complexity]
"""

from __future__ import annotations

import argparse
import csv
import io
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
from timm.utils import reparameterize_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from frugalvision.bench import count_flops, interleaved, machine_info, median_ms, peak_memory_mb, result_header
from frugalvision.models.fastervit import FasterViT
from frugalvision.utils.io import atomic_path, atomic_write_text

VARIANTS = ("hat", "window", "global")


def attention_stages(kind: str, size: int) -> tuple[nn.Module, int]:
    """Stages 3-4 of FasterViT-0 at input ``size`` for ``kind``; returns the module and the stage-3 window."""
    r3, r4 = size // 16, size // 32
    w = 7 if size % 7 == 0 and r4 % 7 == 0 else 8
    windows = {"hat": (w, w), "window": (w, w), "global": (r3, r4)}[kind]
    hat = (False, False, True, True) if kind == "hat" else (False, False, False, False)
    model = FasterViT(dim=64, in_dim=64, depths=(2, 3, 6, 5), num_heads=(2, 4, 8, 16), ct_size=2,
                      window_size=(7, 7, *windows), resolution=size, hat=hat, drop_path_rate=0.0).eval()
    return reparameterize_model(nn.Sequential(*model.stages[2:])), windows[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 768, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--math-memory-limit", type=int, default=4096,
                   help="skip the math-kernel memory run when its attention matrices alone exceed this many MiB")
    p.add_argument("--out", default="benchmarks/results/fastervit_complexity")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    bar = tqdm(total=len(a.sizes) * len(VARIANTS), desc="complexity")
    for size in a.sizes:
        models, inputs = {}, torch.randn(1, 128, size // 8, size // 8)
        for kind in VARIANTS:
            m, w = attention_stages(kind, size)
            r3 = size // 16
            tokens_per_window = r3 * r3 if kind == "global" else w * w + (4 if kind == "hat" else 0)
            flops = count_flops(m, inputs)  # (doubles as the warm-up run)
            mem = peak_memory_mb(m, inputs)
            windows3 = 1 if kind == "global" else (r3 // w) ** 2
            attn_mib = windows3 * 8 * tokens_per_window**2 * 4 / 2**20  # stage-3 attention matrices (8 heads)
            if attn_mib <= a.math_memory_limit:
                with sdpa_kernel(SDPBackend.MATH):
                    mem_math: float | None = peak_memory_mb(m, inputs)
            else:
                mem_math = None
            models[kind] = m
            rows.append(dict(size=size, variant=kind, window=w if kind != "global" else r3,
                             stage3_tokens=r3 * r3, tokens_per_window=tokens_per_window, gflops=flops / 1e9,
                             peak_mem_mb=mem, peak_mem_math_mb=mem_math))
            bar.update(1)
        lat = median_ms(interleaved({k: partial(m, inputs) for k, m in models.items()}, a.repeats, inference=True))
        for r in rows:
            if r["size"] == size:
                r["latency_ms"] = lat[r["variant"]]
        del models
    bar.close()
    info = machine_info()
    base = {r["size"]: r for r in rows if r["variant"] == "hat"}
    out = Path(a.out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*rows[0].keys(), "machine"])
    w.writeheader()
    for r in rows:
        w.writerow({**r, "machine": info.line()})
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())

    def fmt(v: float | None, f: str = "{:.1f}") -> str:
        return "not run (attention matrices > limit)" if v is None else f.format(v)

    cmd = "python " + " ".join(shlex.quote(s) for s in sys.argv)
    notes = ["Stages 3-4 of FasterViT-0 (batch 1, fused, CPU). Latency: median of interleaved runs with the flash "
             "attention kernel. Peak memory: live tensors created during the forward, with the flash kernel and "
             "with the math kernel (attention matrix materialised, as in the reference implementation). "
             "Compare within a resolution (the machine line gives the load average at the start)."]
    lines = [result_header("FasterViT attention stages: HAT vs window vs global attention", info, cmd, notes
                           ).rstrip("\n"), "",
             "| input | variant | window | stage-3 tokens | tokens / window | GFLOPs | latency (ms) | vs HAT | "
             "peak mem flash (MiB) | peak mem math (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['variant']} | {r['window']} | {r['stage3_tokens']} | "
                     f"{r['tokens_per_window']} | {r['gflops']:.2f} | {r['latency_ms']:.1f} | "
                     f"{r['latency_ms'] / base[r['size']]['latency_ms']:.2f}x | {fmt(r['peak_mem_mb'])} | "
                     f"{fmt(r['peak_mem_math_mb'])} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, color in zip(VARIANTS, ("tab:green", "tab:blue", "tab:red"), strict=True):
        sel = [r for r in rows if r["variant"] == kind]
        xs = [r["size"] for r in sel]
        axes[0].plot(xs, [r["latency_ms"] for r in sel], "o-", color=color, label=kind)
        axes[1].plot(xs, [r["gflops"] for r in sel], "o-", color=color, label=kind)
        mx = [(r["size"], r["peak_mem_math_mb"]) for r in sel if r["peak_mem_math_mb"] is not None]
        axes[2].plot([x for x, _ in mx], [y for _, y in mx], "o-", color=color, label=f"{kind} (math)")
        axes[2].plot(xs, [r["peak_mem_mb"] for r in sel], "s--", color=color, alpha=0.6, label=f"{kind} (flash)")
    for ax, title, unit in zip(axes, ("latency", "FLOPs", "peak memory"), ("ms", "GFLOPs", "MiB"), strict=True):
        ax.set_xlabel("input resolution")
        ax.set_ylabel(unit)
        ax.set_yscale("log")
        ax.set_title(f"FasterViT-0 stages 3-4: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

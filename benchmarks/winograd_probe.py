"""Winograd 3x3 convolution as an ONNX graph: does cutting the FLOPs pay in ONNX Runtime?

FasterViT-0's ten stride-1 3x3 convolutions (stages 1-2) are about a third of its FLOPs. Winograd's F(m, 3)
computes them with (m + 2)^2 / (9 m^2) of the multiplications (F(2, 3): 1/2.25, F(4, 3): 1/4), but ONNX Runtime
has no Winograd kernel, so an export would have to spell the transforms out as graph operators. This probe builds
that graph for the two layer shapes of FasterViT-0 (64 channels at 56x56, 128 at 28x28), checks it against the
direct convolution, and times both in ONNX Runtime, interleaved, at batch 32 on 2 threads and batch 16 on 1
thread (one of the two sessions of the batch-split runner).

The graph: input transform ``B^T d B`` as two depth-wise convolutions (rows, then columns: stride m, 6 taps),
the (m + 2)^2 products as one batched MatMul (``M``) or one grouped 1x1 convolution (``G``), and the output
transform ``A^T M A`` as a grouped transposed convolution (stride m), with two channel shuffles in between.

    python benchmarks/winograd_probe.py [--repeats 15] [--out benchmarks/results/winograd_probe.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frugalvision.bench import interleaved, machine_info, median_ms, result_header
from frugalvision.export import OrtRunner, export_onnx
from frugalvision.utils.io import atomic_write_text

# Lavin & Gray's transforms: y = A^T [(G g G^T) * (B^T d B)] A
_F23 = ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]])
_F43 = ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])


class WinogradConv3x3(nn.Module):
    """A stride-1, padding-1 3x3 convolution computed by Winograd F(m, 3) in exportable operators.

    Args:
        conv: The convolution to reproduce (3x3, stride 1, padding 1, no groups).
        m: Output tile size, 2 or 4. Input height and width must be multiples of it.
        products: ``matmul`` (batched MatMul over the tile positions) or ``grouped`` (grouped 1x1 conv).

    Example:
        >>> conv = nn.Conv2d(8, 4, 3, padding=1)
        >>> x = torch.randn(2, 8, 8, 8)
        >>> torch.allclose(WinogradConv3x3(conv, 4)(x), conv(x), atol=1e-4)
        True
    """

    def __init__(self, conv: nn.Conv2d, m: int = 4, products: str = "matmul") -> None:
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError(f"WinogradConv3x3: needs a 3x3, stride-1, padding-1 dense conv, got {conv}")
        if m not in (2, 4) or products not in ("matmul", "grouped"):
            raise ValueError(f"WinogradConv3x3: m must be 2 or 4 and products 'matmul' or 'grouped', got {m}, "
                             f"{products!r}")
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in (_F23 if m == 2 else _F43))
        t = m + 2
        c, co = conv.in_channels, conv.out_channels
        self.m, self.t, self.products = m, t, products
        u = torch.einsum("ia,ocab,jb->ijoc", g, conv.weight.detach().double(), g).reshape(t * t, co, c)
        self.register_buffer("u", (u.reshape(t * t * co, c, 1, 1) if products == "grouped" else u).float())
        self.register_buffer("rows", bt[None, :, :, None].expand(c, t, t, 1).reshape(c * t, 1, t, 1).float())
        self.register_buffer("cols", bt[None, :, None, :].expand(c * t, t, 1, t).reshape(c * t * t, 1, 1, t).float())
        out = torch.einsum("ri,sj->ijrs", at, at).reshape(1, t * t, 1, m, m).expand(co, t * t, 1, m, m)
        self.register_buffer("out", out.reshape(co * t * t, 1, m, m).float())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(co)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C_out, H, W)``."""
        b, c, h, w = x.shape
        m, tt = self.m, self.t * self.t
        th, tw = h // m, w // m
        v = F.conv2d(x, self.rows, stride=(m, 1), padding=1, groups=c)
        v = F.conv2d(v, self.cols, stride=(1, m), groups=c * self.t)  # (B, C * t * t, th, tw)
        if self.products == "grouped":
            v = v.reshape(b, c, tt, th, tw).transpose(1, 2).reshape(b, tt * c, th, tw)
            y = F.conv2d(v, self.u, groups=tt)
            y = y.reshape(b, tt, -1, th, tw).transpose(1, 2).reshape(b, -1, th, tw)
        else:
            v = v.reshape(b, c, tt, th * tw).permute(2, 1, 0, 3).reshape(tt, c, b * th * tw)
            y = torch.matmul(self.u, v)
            y = y.reshape(tt, -1, b, th, tw).permute(2, 1, 0, 3, 4).reshape(b, -1, th, tw)
        return F.conv_transpose2d(y, self.out, self.bias, stride=m, groups=self.bias.numel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results/winograd_probe.md")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="winograd-probe-") as d:  # exported graphs; removed at the end
        _run(a, Path(d))


def _run(a: argparse.Namespace, tmp: Path) -> None:
    info = machine_info()
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    rows = ["| layer | batch, threads | form | ms | vs direct | direct-equivalent GFLOP/s | max rel. error |",
            "|---|---|---|---|---|---|---|"]
    best: dict[str, tuple[float, str]] = {}  # layer and setting -> (speed-up, form) of the fastest Winograd form
    for c, hw in ((64, 56), (128, 28)):
        for batch, threads in ((32, 2), (16, 1)):
            torch.manual_seed(0)
            conv = nn.Conv2d(c, c, 3, padding=1).eval()
            x = torch.randn(batch, c, hw, hw)
            forms: dict[str, nn.Module] = {"direct Conv": conv}
            for m in (2, 4):
                for products in ("matmul", "grouped"):
                    forms[f"F({m},3), {products}"] = WinogradConv3x3(conv, m, products).eval()
            runners, errs = {}, {}
            with torch.no_grad():
                ref = conv(x).numpy()
            for k, mod in forms.items():
                path = tmp / f"{c}_{k.replace(' ', '').replace(',', '_')}.onnx"
                export_onnx(mod, path, x[:1], exporter="torchscript", check=False)
                runners[k] = OrtRunner(path, threads=threads)
                errs[k] = float(np.abs(runners[k](x)[0] - ref).max() / np.abs(ref).max())
            meds = median_ms(interleaved({k: partial(r, x) for k, r in runners.items()}, a.repeats))
            direct = meds["direct Conv"] / 1e3
            flops = 2 * batch * hw * hw * c * c * 9
            for k in forms:
                med = meds[k] / 1e3
                key = f"{c} ch, {hw}x{hw}, batch {batch}, {threads} thread{'s' * (threads > 1)}"
                if k != "direct Conv" and direct / med > best.get(key, (0.0, ""))[0]:
                    best[key] = (direct / med, k)
                rows.append(f"| {c} ch, {hw}x{hw} | {batch}, {threads} | {k} | {med * 1e3:.2f} | {direct / med:.2f}x | "
                            f"{flops / med / 1e9:.1f} | {errs[k]:.1e} |")
            print(rows[-5:], flush=True)
    notes = [f"Median of {a.repeats} interleaved runs per form. \"Direct-equivalent GFLOP/s\": the direct "
             "convolution's FLOPs divided by the time, so forms compare on one scale. Error: max |difference| / "
             "max |direct output|."]
    lines = [result_header("Winograd 3x3 convolution as an ONNX graph vs ONNX Runtime's direct convolution", info, cmd,
                           notes).rstrip("\n"), "", *rows, "",
             "Best Winograd form per layer and setting (vs the direct convolution):", "",
             *[f"- {k}: {v[1]} at {v[0]:.2f}x" for k, v in best.items()], "",
             ("Every form is slower than the direct convolution: the transforms and shuffles are memory-bound "
              "passes over tensors (t/m)^2 times the input, which cost more than the saved multiplications."
              if max(v[0] for v in best.values()) < 1.0 else
              "Where a form is faster, the gain is bounded by that layer's share of a model's time; the transforms "
              "and shuffles are memory-bound passes over tensors (t/m)^2 times the input, which eat most of the "
              "saved multiplications. A real gain needs one fused kernel that transforms tiles in cache, which "
              "ONNX Runtime's CPU provider does not have."), ""]
    out = atomic_write_text(a.out, "\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""EfficientMod in ONNX Runtime: one modulation block exported channels-last (linears) vs channels-first (1x1 convs).

A probe for the EfficientMod ONNX Runtime gap (benchmarks/results/efficientmod_cpu.md): ONNX Runtime runs
EfficientFormerV2's 1x1 convs with its blocked NCHWc conv kernels, EfficientMod's linears as Gemms. This builds one
stage-1 block of EfficientMod-xxs (C=32, 56x56, mlp ratio 4, layer scale folded) both ways with the same weights
(LayerNorm over channels stays channels-last in both), checks they agree, and times both sessions interleaved on
one thread.

    python benchmarks/efficientmod_nchw_probe.py [--out benchmarks/results/efficientmod_nchw_probe.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from frugalvision.bench import interleaved, machine_info, median_ms, result_header
from frugalvision.export import export_onnx
from frugalvision.models.efficientmod import ModulationBlock
from frugalvision.utils.io import atomic_write_text

C, H, R = 32, 56, 4


def _conv1x1(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


class ChannelsLast(nn.Module):
    """The block as implemented: (B, C, H, W) in, channels-last linears inside."""

    def __init__(self, block: ModulationBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirst(nn.Module):
    """The same block with its linears as 1x1 convs on (B, C, H, W)."""

    def __init__(self, block: ModulationBlock) -> None:
        super().__init__()
        m, self.norm = block.mixer, block.norm
        self.ctx_in, self.ctx_out = _conv1x1(m.ctx_in), _conv1x1(m.ctx_out)
        self.fc1, self.fc2, self.dw = _conv1x1(m.fc1), _conv1x1(m.fc2), m.ctx_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        ctx = self.ctx_out(F.gelu(self.dw(self.ctx_in(n))))
        v = F.gelu(self.fc1(n))
        b, _, h, w = v.shape
        v = (v.view(b, R, C, h, w) * ctx.unsqueeze(1)).view(b, R * C, h, w)
        return x + self.fc2(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/efficientmod_nchw_probe.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = ModulationBlock(C, mlp_ratio=R).eval()
    block.reparameterize()
    x = torch.randn(1, C, H, H)
    forms = {"channels-last linears (as exported today)": ChannelsLast(block),
             "channels-first 1x1 convs": ChannelsFirst(block)}
    with torch.no_grad():
        outs = [m(x) for m in forms.values()]
    diff = float((outs[0] - outs[1]).abs().max())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    runs = {}
    with tempfile.TemporaryDirectory(prefix="efficientmod-probe-") as tmp:  # exported graphs; removed at the end
        for i, (name, m) in enumerate(forms.items()):
            path = Path(tmp) / f"efficientmod_probe_{i}.onnx"
            export_onnx(m, path, x, dynamic_batch=False)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}
            runs[name] = lambda s=sess, f=feed: s.run(None, f)
    med = median_ms(interleaved(runs, rounds=200, warmup=20))
    a_ms, b_ms = med.values()
    notes = [f"One stage-1 block of EfficientMod-xxs (C={C}, {H}x{H}, mlp ratio {R}), batch 1, 1 thread, median of 200 "
             f"interleaved runs. Outputs agree to {diff:.1e} (max abs)."]
    md = [result_header("EfficientMod block in ONNX Runtime: channels-last linears vs channels-first 1x1 convs",
                        machine_info("cpu"), ["python", *sys.argv], notes).rstrip("\n"), "",
          "| export form | ONNX Runtime (ms) |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in med.items()], "",
          f"Channels-first 1x1 convs: {a_ms / b_ms:.2f}x the channels-last form.", ""]
    atomic_write_text(a.out, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

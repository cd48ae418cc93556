"""Grounded VLM (MiniGPT-v2 design) on CPU: time to first token and decode tokens/s, side by side in one run.

Eight configurations of one model are timed in the same interleaved rounds (``frugalvision.bench.interleaved``):
64 vs 256 visual tokens x fp32 vs bf16 weights x with vs without KV cache. Each call is ``VisionLanguageModel.generate``
on one image and one ``[grounding]`` prompt, greedy, and always makes exactly ``--new-tokens`` tokens: the end-of-
sequence token is ignored (the model's stop-id set is emptied), so every configuration does the same work.

Inside every timed call, timestamps are taken when the visual encoder starts and ends and each time the LM head runs
(one head call per generated token): time to first token (TTFT) is call start -> first head output (tokenising the
prompt, visual encoder, projector and the prompt prefill included); decode tokens/s is (N - 1) / (last head output -
first head output). Prefill FLOPs are counted with ``torch.utils.flop_counter`` (CPU fused attention included, see
``frugalvision.bench.flops``) and set against this machine's measured fp32 / bf16 matmul peak.

Visual encoder: a timm ViT with 16-pixel patches (random weights: speed does not depend on them), class token
dropped, 4 neighbouring patch tokens concatenated (MiniGPT-v2's grouping) -> 256 px input = 16x16 patches = 64 LLM
tokens; 512 px = 32x32 patches = 256 LLM tokens (the official MiniGPT-v2 count: EVA ViT-g/14 at 448 px).

    python benchmarks/vlm_speed.py [--threads 2] [--rounds 10] [--new-tokens 32] [--llm smollm2]
        [--visual vit_small_patch16_224] [--lora on|off] [--out benchmarks/results/vlm_speed] [--quick] [--note ...]
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from frugalvision.bench import interleaved, machine_info, matmul_peak_gflops, result_header
from frugalvision.language import MiniGPTv2, build_prompt, load_llm, tiny_llm
from frugalvision.utils.io import atomic_write_text

TOKENS = (256, 64)  # grouped visual tokens given to the LLM; the first is the reference
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = build_prompt("grounding", "describe this image in detail")  # MiniGPT-v2's grounded captioning


# --------------------------------------------------------------------------------------------- model
def build_visual(name: str, size: int) -> torch.nn.Module:
    """A timm ViT at ``size`` px (random weights); ``tiny`` is a 1-block, 32-wide ViT for smoke runs."""
    if name == "tiny":
        return timm.create_model("vit_tiny_patch16_224", img_size=size, embed_dim=32, depth=1, num_heads=2,
                                 num_classes=0)
    return timm.create_model(name, pretrained=False, img_size=size, num_classes=0)


def input_size(visual: torch.nn.Module, tokens: int) -> int:
    """Input side (px) at which the ViT's patch grid, grouped by 4, gives ``tokens`` LLM tokens."""
    side = math.isqrt(4 * tokens)
    if side * side != 4 * tokens:
        raise SystemExit(f"{tokens} visual tokens do not come from a square patch grid")
    if not hasattr(visual, "patch_embed") or not hasattr(visual, "set_input_size"):
        raise SystemExit(f"--visual must be a timm ViT (patch_embed, set_input_size); {type(visual).__name__} is not")
    patch = visual.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, Sequence) else patch
    return int(patch) * side


def bf16_support() -> str:
    """What this CPU offers for bf16 (cpuinfo flags, oneDNN's own check)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return (f"CPU bf16 instructions: {', '.join(have) or 'none (bf16 is emulated: slow)'}; "
            f"oneDNN bf16 supported: {onednn}; CPU capability {torch.backends.cpu.get_cpu_capability()}")


def build_models(llm_name: str, visual_name: str, lora: bool, dtypes: Sequence[str]) -> dict[tuple[int, str], Any]:
    """One MiniGPT-v2 per (visual tokens, dtype); the two token counts of a dtype share one LLM (and its LoRA)."""
    torch.manual_seed(0)
    llm, tok = tiny_llm() if llm_name == "tiny" else load_llm(llm_name)
    big = build_visual(visual_name, 224)  # resized once its patch size is known
    big.set_input_size(img_size=input_size(big, TOKENS[0]))
    ref = MiniGPTv2(big, llm, tok, group="raster", lora=lora).eval()
    models: dict[tuple[int, str], Any] = {}
    for d in dtypes:
        base = ref if d == "fp32" else copy.deepcopy(ref).to(DTYPES[d])  # same weights, cast
        for n in TOKENS:
            if n == TOKENS[0]:
                m = base
            else:  # its own ViT (resized position embeddings), the same LLM object
                m = copy.deepcopy(base, memo={id(base.llm): base.llm})
                m.visual.set_input_size(img_size=input_size(m.visual, n))
            m._stop_ids = set  # ignore end-of-sequence: every call makes exactly the requested tokens
            models[(n, d)] = m.eval()
    return models


# --------------------------------------------------------------------------------------------- probes
class Recorder:
    """Timestamps of the call in progress: visual encoder start / end and every LM-head output (+ greedy ids)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.visual: list[float] = []
        self.steps: list[float] = []
        self.ids: list[int] = []

    def reset(self) -> None:
        self.visual, self.steps, self.ids = [], [], []
        self.start = time.perf_counter()

    def head_hook(self, module: Any, args: Any, out: torch.Tensor) -> None:
        self.steps.append(time.perf_counter())
        self.ids.append(int(out[0].argmax()))

    def wrap_visual(self, visual: torch.nn.Module) -> None:
        inner = visual.forward_features

        def forward_features(x: torch.Tensor) -> torch.Tensor:
            self.visual.append(time.perf_counter())
            y = inner(x)
            self.visual.append(time.perf_counter())
            return y

        visual.forward_features = forward_features  # instance attribute: shadows the method


class Config:
    """One timed configuration and its per-round measurements (seconds); a plain class, no dataclass, so the
    script also runs when imported by path (tests)."""

    def __init__(self, tokens: int, dtype: str, cache: bool, size: int, seq_len: int) -> None:
        self.tokens, self.dtype, self.cache, self.size, self.seq_len = tokens, dtype, cache, size, seq_len
        self.ttft: list[float] = []
        self.visual: list[float] = []
        self.decode: list[float] = []  # seconds per token after the first
        self.total: list[float] = []
        self.ids: list[int] = []  # greedy tokens of the last call

    @property
    def key(self) -> str:
        return f"{self.tokens} tok · {self.dtype} · {'cache' if self.cache else 'no cache'}"


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def iqr(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


@torch.no_grad()
def count_prefill_flops(model: Any, pixels: torch.Tensor) -> tuple[int, int]:
    """FLOPs up to the first token (visual encoder + projector + prompt prefill + head) and of the encoder alone."""
    with FlopCounterMode(display=False) as c:
        model.generate(pixels, PROMPT, max_new_tokens=1)
    with FlopCounterMode(display=False) as v:
        model.visual.forward_features(pixels)
    return int(c.get_total_flops()), int(v.get_total_flops())


def llm_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.llm.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def agreement(ids: Sequence[int], ref: Sequence[int]) -> tuple[float, int]:
    """Share of positions with the same token, and the length of the common prefix."""
    same = [a == b for a, b in zip(ids, ref, strict=False)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return (sum(same) / len(same) if same else 1.0), prefix


# --------------------------------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (default 10; --quick: 2)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per call, end-of-sequence ignored (default 32; --quick: 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration first")
    p.add_argument("--llm", default="smollm2", help="'smollm2' (SmolLM2-135M-Instruct), 'tiny' (random tiny LLaMA "
                   "for tests), a .gguf file or a transformers folder")
    p.add_argument("--visual", default=None,
                   help="timm ViT name (input side = patch x 2 sqrt(tokens): 256 / 512 px with 16-px patches, "
                        "224 / 448 with 14-px ones) or 'tiny'; default vit_small_patch16_224, 'tiny' with --llm tiny")
    p.add_argument("--lora", choices=("on", "off"), default="on",
                   help="on: peft LoRA r64 on q/v, unmerged (MiniGPT-v2 as trained); off: plain LLM (the cost of "
                        "merged adapters)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    p.add_argument("--out", default="benchmarks/results/vlm_speed", help="writes OUT.md and OUT.csv")
    p.add_argument("--quick", action="store_true", help="fewer rounds and tokens, short matmul probe: a smoke run")
    p.add_argument("--note", default="Measured on an otherwise idle machine.", help="line on machine load")
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (2 if a.quick else 10)
    a.new_tokens = a.new_tokens if a.new_tokens is not None else (8 if a.quick else 32)
    a.visual = a.visual or ("tiny" if a.llm == "tiny" else "vit_small_patch16_224")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed needs a token after the first)")
    if "fp32" not in a.dtypes:
        p.error("--dtypes must include fp32 (the reference)")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    info = machine_info("cpu")
    probe_s = 0.1 if a.quick else 0.5
    peaks = {d: matmul_peak_gflops(seconds=probe_s, dtype=DTYPES[d]) for d in a.dtypes}
    info.matmul_peak_gflops = peaks["fp32"]

    models = build_models(a.llm, a.visual, a.lora == "on", a.dtypes)
    rec = Recorder()
    hooked: set[int] = set()
    for m in models.values():
        head = m.causal_lm().get_output_embeddings()
        if id(head) not in hooked:
            hooked.add(id(head))
            head.register_forward_hook(rec.head_hook)
        rec.wrap_visual(m.visual)
    g = torch.Generator().manual_seed(0)
    pixels = {n: torch.randn(1, 3, input_size(models[(n, "fp32")].visual, n),
                             input_size(models[(n, "fp32")].visual, n), generator=g) for n in TOKENS}
    ref_model = models[(TOKENS[0], "fp32")]
    enc = ref_model.encode(PROMPT, 1)[0]
    text_len = len(enc.before) + len(enc.after)

    configs: dict[str, Config] = {}
    for n in TOKENS:
        for d in a.dtypes:
            for cache in (True, False):
                c = Config(n, d, cache, pixels[n].shape[-1], text_len + n)
                configs[c.key] = c

    flops = {n: count_prefill_flops(models[(n, "fp32")], pixels[n]) for n in TOKENS}

    def call(c: Config) -> Callable[[], Any]:
        model, x = models[(c.tokens, c.dtype)], pixels[c.tokens]

        def run() -> None:
            rec.reset()
            model.generate(x, PROMPT, max_new_tokens=a.new_tokens, use_cache=c.cache)
            end = time.perf_counter()
            if len(rec.steps) != a.new_tokens or len(rec.visual) != 2:
                raise RuntimeError(f"{c.key}: {len(rec.steps)} head calls for {a.new_tokens} tokens, "
                                   f"{len(rec.visual) // 2} visual passes")
            c.ttft.append(rec.steps[0] - rec.start)
            c.visual.append(rec.visual[1] - rec.visual[0])
            c.decode.append((rec.steps[-1] - rec.steps[0]) / (a.new_tokens - 1))
            c.total.append(end - rec.start)
            c.ids = list(rec.ids)

        return run

    fns = {k: call(c) for k, c in configs.items()}
    t0 = time.perf_counter()
    interleaved(fns, rounds=0, warmup=a.warmup, inference=True)
    for c in configs.values():  # warm-up calls are not results
        c.ttft, c.visual, c.decode, c.total = [], [], [], []
    done = [0]

    def progress() -> None:
        done[0] += 1
        if done[0] % len(fns) == 0:
            print(f"round {done[0] // len(fns)}/{a.rounds} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    interleaved(fns, rounds=a.rounds, inference=True, on_call=progress)

    args = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join(shlex.quote(x) for x in ["python", "benchmarks/vlm_speed.py", *args])
    md, rows = report(a, configs, models, flops, peaks, info, cmd)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path = atomic_write_text(out.with_suffix(".md"), md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    csv_path = atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    print(md)
    print(f"wrote {md_path}, {csv_path}")
    return 0


# --------------------------------------------------------------------------------------------- report
def report(a: argparse.Namespace, configs: dict[str, Config], models: dict[tuple[int, str], Any],
           flops: dict[int, tuple[int, int]], peaks: dict[str, float], info: Any, cmd: str) -> tuple[str, list[dict]]:
    ref_ids = {c.tokens: c.ids for c in configs.values() if c.dtype == "fp32" and c.cache}
    first = next(iter(configs.values()))
    text_len = first.seq_len - first.tokens
    sizes = {c.tokens: c.size for c in configs.values()}
    patch = sizes[TOKENS[0]] // (2 * math.isqrt(TOKENS[0]))
    ref = models[(TOKENS[0], "fp32")]
    lm = ref.causal_lm()
    llm_params = sum(p.numel() for p in {id(p): p for p in ref.llm.parameters()}.values())
    vis_params = sum(p.numel() for p in ref.visual.parameters())
    wbytes = {d: llm_bytes(models[(TOKENS[0], d)]) for d in a.dtypes}
    peak_txt = ", ".join(f"{d} {peaks[d]:.1f} GFLOP/s" for d in a.dtypes)
    rows: list[dict[str, Any]] = []
    main_lines = [
        "| visual tokens | input (px) | prompt length (tokens) | dtype | KV cache | TTFT (ms) | visual encoder (ms) | "
        "visual share of TTFT | decode (tokens/s) | total for N tokens (ms) | weights read in decode (GB/s) | "
        "same tokens as fp32 cached | common prefix |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs.values():
        ttft, vis, dec, tot = med(c.ttft), med(c.visual), med(c.decode), med(c.total)
        same, prefix = agreement(c.ids, ref_ids[c.tokens])
        gbs = wbytes[c.dtype] / dec / 1e9 if c.cache else None
        fl, vfl = flops[c.tokens]
        rows.append({
            "visual_tokens": c.tokens, "input_px": c.size, "prompt_tokens": c.seq_len, "dtype": c.dtype,
            "kv_cache": c.cache, "new_tokens": a.new_tokens, "ttft_ms": ttft * 1e3, "ttft_iqr_ms": iqr(c.ttft) * 1e3,
            "visual_ms": vis * 1e3, "visual_share": vis / ttft, "decode_tok_s": 1 / dec,
            "decode_iqr_ms_per_tok": iqr(c.decode) * 1e3, "total_ms": tot * 1e3, "prefill_gflops": fl / 1e9,
            "visual_gflops": vfl / 1e9, "prefill_gflop_s": fl / ttft / 1e9,
            "prefill_peak_fraction": fl / ttft / 1e9 / peaks[c.dtype],
            "llm_prefill_gflop_s": (fl - vfl) / (ttft - vis) / 1e9, "visual_gflop_s": vfl / vis / 1e9,
            "decode_weights_gb_s": gbs, "token_agreement": same, "common_prefix": prefix,
            "rounds": len(c.ttft), "threads": a.threads, "machine": info.line(),
        })
        main_lines.append(
            f"| {c.tokens} | {c.size} | {c.seq_len} | {c.dtype} | {'yes' if c.cache else 'no'} | "
            f"{ttft * 1e3:.1f} ± {iqr(c.ttft) * 1e3:.1f} | {vis * 1e3:.1f} | {vis / ttft:.0%} | {1 / dec:.1f} | "
            f"{tot * 1e3:.0f} | {'—' if gbs is None else f'{gbs:.1f}'} | {same:.0%} | {prefix}/{len(c.ids)} |")

    def by(n: int, d: str, cache: bool) -> dict[str, Any]:
        return next(r for r in rows if r["visual_tokens"] == n and r["dtype"] == d and r["kv_cache"] == cache)

    ratio_lines = ["| comparison | at | TTFT speed-up | decode speed-up | total speed-up |", "|---|---|---|---|---|"]

    def ratio(name: str, at: str, slow: dict[str, Any], fast: dict[str, Any]) -> None:
        ratio_lines.append(f"| {name} | {at} | {slow['ttft_ms'] / fast['ttft_ms']:.2f}x | "
                           f"**{fast['decode_tok_s'] / slow['decode_tok_s']:.2f}x** | "
                           f"{slow['total_ms'] / fast['total_ms']:.2f}x |")

    for n in TOKENS:
        for d in a.dtypes:
            ratio("KV cache vs none", f"{n} tok, {d}", by(n, d, False), by(n, d, True))
    for d in a.dtypes:
        for cache in (True, False):
            ratio(f"{TOKENS[1]} vs {TOKENS[0]} visual tokens", f"{d}, {'cache' if cache else 'no cache'}",
                  by(TOKENS[0], d, cache), by(TOKENS[1], d, cache))
    for d in a.dtypes[1:]:
        for n in TOKENS:
            for cache in (True, False):
                ratio(f"{d} vs fp32", f"{n} tok, {'cache' if cache else 'no cache'}", by(n, "fp32", cache),
                      by(n, d, cache))

    flop_lines = ["| visual tokens | dtype | visual encoder GFLOPs | ms | GFLOP/s | LLM prefill GFLOPs (+ projector, "
                  "head) | ms | GFLOP/s | TTFT GFLOPs | GFLOP/s | of the dtype's matmul peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in TOKENS:
        for d in a.dtypes:
            r = by(n, d, True)
            flop_lines.append(
                f"| {n} | {d} | {r['visual_gflops']:.2f} | {r['visual_ms']:.1f} | {r['visual_gflop_s']:.1f} | "
                f"{r['prefill_gflops'] - r['visual_gflops']:.2f} | {r['ttft_ms'] - r['visual_ms']:.1f} | "
                f"{r['llm_prefill_gflop_s']:.1f} | {r['prefill_gflops']:.2f} | {r['prefill_gflop_s']:.1f} | "
                f"{r['prefill_peak_fraction']:.0%} |")

    llm_desc = ("a random tiny LLaMA (smoke run)" if a.llm == "tiny" else
                f"{a.llm} ({type(lm).__name__}, {getattr(lm.config, 'num_hidden_layers', '?')} layers, width "
                f"{getattr(lm.config, 'hidden_size', '?')}, vocabulary {getattr(lm.config, 'vocab_size', '?')})")
    notes = [
        f"{a.note} All {len(configs)} configurations were timed in the same {a.rounds} interleaved rounds (rotating "
        f"order; {a.warmup} untimed warm-up call each), {a.threads} torch thread(s); medians (± IQR) over rounds; "
        "ratios are ratios of medians.",
        f"Model: MiniGPT-v2 design (`frugalvision.language.MiniGPTv2`, raster grouping of 4 patch tokens, "
        f"`llama_proj`, LoRA {'r64 on q/v, unmerged peft adapters' if a.lora == 'on' else 'off'}). LLM: {llm_desc}, "
        f"{llm_params / 1e6:.1f} M parameters ({wbytes['fp32'] / 1e6:.1f} MB in fp32). Visual encoder: {a.visual} "
        f"(random weights, {vis_params / 1e6:.1f} M parameters), class token dropped; {patch}-px patches, so "
        + " and ".join(f"{sizes[n]} px -> {2 * math.isqrt(n)}x{2 * math.isqrt(n)} patches -> {n} LLM tokens"
                       for n in sorted(TOKENS))
        + " (256: the official MiniGPT-v2 count).",
        f"Generation: batch 1, greedy, exactly N = {a.new_tokens} new tokens per call (end-of-sequence ignored); "
        f"prompt `{PROMPT}` in the tokenizer's chat template ({text_len} text tokens + the visual tokens). "
        "TTFT: call start -> first LM-head output (prompt tokenising, visual encoder, projector, prefill). Decode: "
        "(N - 1) tokens / (last - first LM-head output); without a KV cache every step reruns the whole sequence, "
        "so its tokens/s is the mean over growing lengths. 'Weights read in decode': LLM parameter bytes x tokens/s "
        "(each cached decode step streams every weight once; the KV cache adds little at these lengths).",
        f"bf16: whole model cast to bfloat16 (weights and activations; logits compared in fp32). {bf16_support()}. "
        f"Measured matmul peak (best over 512-2048 square matmuls, same threads): {peak_txt}. Token agreement: share "
        "of the N positions whose greedy token equals the fp32 KV-cached run's (same visual tokens), and the length "
        "of the common prefix (after the first different token the sequences differ in context, so later "
        "positions need not match).",
        "FLOPs: `torch.utils.flop_counter` on the fp32 model (a multiply-add counts 2; attention counted as full, "
        "not causal, matrices); the LLM part is the TTFT count minus the visual encoder's, its time TTFT minus the "
        "encoder's.",
    ]
    title = "Grounded VLM (MiniGPT-v2 design) on CPU: time to first token and decode speed"
    md = "\n".join([
        result_header(title, info, cmd, notes).rstrip("\n"), "",
        "## Side by side (speed-ups > 1: the second setting is faster)", "", *ratio_lines, "",
        "## All configurations", "", *main_lines, "",
        "## Prefill compute (KV-cached runs)", "", *flop_lines, "",
    ])
    return md, rows


if __name__ == "__main__":
    sys.exit(main())

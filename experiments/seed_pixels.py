"""SEED codes back to pixels: a diffusion decoder on the image embedding, judged by a classifier trained on real tiles.

The decoder (:class:`frugalvision.language.seed_decoder.SEEDPixelDecoder`: a pixel-space diffusers UNet conditioned
like Stable unCLIP, on the image embedding as projection class embedding and cross-attention token) is trained on
the bundled inspection benchmark's 300 training tiles at ``--size`` px with their *true* image embeddings (the
frozen textures RepVGG-A0's pooled last level, as in ``seed_tokenizer.py``). Then it draws the 230 test tiles from:

    true embedding     the tile's own embedding (the decoder's ceiling)
    own codes          the tile's 32 codes through the SEED tokenizer of ``seed_lm.py`` (tokenize → de-tokenise)
    LM-drawn codes     the codes SmolLM2 wrote from the tile's caption (``seed_lm.jsonl``'s ``drawn_codes``, per seed)
    null               the learned null embedding (unconditional; what the decoder draws without being told)

A judge trained on *real* training tiles (logistic regression on the same frozen encoder's pooled features of the
tile resized to ``--size`` px and back to 128) names each image's category and defect kind; reported: accuracy
against the tile's (= the caption's) category and kind, and the judge on the real test tiles at that size.
Rows go to ``experiments/results/seed_pixels.jsonl``; ``--table`` writes ``seed_pixels.md``; samples go to
``seed_pixels_samples.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = ROOT.parent / "runs" / "seed_lm"


def _script(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiles(split: str, size: int) -> torch.Tensor:
    """The split's caption tiles as ``[0, 1]`` ``(N, 3, size, size)``."""
    from frugalvision.language.instructions import inspection_instructions
    from frugalvision.language.training import sample_image

    out = []
    for inst in inspection_instructions(split, tasks=["caption"]):
        img = sample_image(inst).convert("RGB").resize((size, size), 2)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)


class Judge:
    """Category and kind of ``[0, 1]`` images: the frozen encoder's pooled last level → logistic regressions."""

    def __init__(self, train_images: torch.Tensor, train: dict) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from frugalvision.language.visual import FeatureLevel
        from frugalvision.pipelines.classification import pretrain_backbone

        self.enc = FeatureLevel("repvgg_a0", stride=0)
        self.enc.load_classifier(pretrain_backbone("repvgg_a0", progress=False))
        self.enc.eval()
        feats = self.features(train_images)
        self.clfs = {k: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(feats, train[k])
                     for k in ("category", "kind")}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(self.enc.mean)[:, None, None]
        std = torch.tensor(self.enc.std)[:, None, None]
        out = []
        for i in range(0, len(images), 64):
            x = F.interpolate(images[i:i + 64], size=128, mode="bilinear", align_corners=False)
            out.append(self.enc((x - mean) / std).mean((2, 3)))
        return torch.cat(out).numpy()

    def score(self, images: torch.Tensor, truth: dict) -> dict[str, float]:
        f = self.features(images)
        return {k: 100 * float(np.mean(c.predict(f) == np.array(truth[k]))) for k, c in self.clfs.items()}


def grid(rows: list[torch.Tensor], path: Path) -> None:
    from PIL import Image

    big = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    arr = (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def table(path: Path) -> str:
    """The markdown table: one group per decoder setting (size, steps), mean ± std over decoder seeds (× LM seeds)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = rows[-1] if rows else {}
    out = ["# SEED codes back to pixels (small scale)", "",
           f"Pixel decoder: {head.get('params_m', '?')} M-parameter diffusers UNet at {head.get('size', '?')} px, "
           f"trained for the steps of each row (batch {head.get('batch_size', '?')}) on {head.get('train', '?')} "
           f"training tiles, DDIM {head.get('ddim', '?')} steps, guidance {head.get('guidance', '?')}; judged on "
           f"{head.get('test', '?')} test tiles by logistic regressions on the frozen encoder's features of real "
           f"training tiles at that size. {head.get('machine', '?')}. Each decoder seed trains its own decoder and "
           "draws with its own noise; LM-drawn rows pool every (decoder seed, LM seed) pair. Mean ± std over the "
           "runs. Chance: category 20 %, kind 12.5 %.", "",
           "| decoder steps | train s (mean) | images drawn from | decoder seeds | runs | "
           "category judged = the tile's % | kind judged = the tile's % |",
           "|---|---|---|---|---|---|---|"]
    by: dict[tuple[int, int, str], list] = {}
    seeds: dict[tuple[int, int], dict[int, float]] = {}
    for r in rows:
        key = (r["size"], r["steps"])
        seeds.setdefault(key, {})[r["seed"]] = r["fit_s"]
        for name, s in r["judged"].items():
            by.setdefault((*key, "LM-drawn codes" if name.startswith("LM-drawn") else name), []).append(s)

    def ms(v: list[float]) -> str:
        return f"{np.mean(v):.1f}" + (f" ± {np.std(v):.1f}" if len(v) > 1 else "")

    for (size, steps, name), ss in sorted(by.items(), key=lambda kv: kv[0][:2]):
        dec = seeds[(size, steps)]
        runs = (f"{len(ss)} ({len(dec)} decoder{'s' * (len(dec) > 1)} × {len(ss) // len(dec)} LM seeds)"
                if name == "LM-drawn codes" else str(len(ss)))
        out.append(f"| {steps} | {np.mean(list(dec.values())):.0f} | {name} | {', '.join(map(str, sorted(dec)))} | "
                   f"{runs} | {ms([s['category'] for s in ss])} | {ms([s['kind'] for s in ss])} |")
    real = next((v[0].get("kind") for (_, _, n), v in by.items() if n == "real test tiles"), None)
    out += ["", f"The kind judge is itself at chance on the real test tiles ({real:.1f} %): its column says nothing "
            "about the drawings; the category column is the measure." if real is not None and real < 25 else "",
            "Samples (`seed_pixels_samples.png`, decoder seed 0): one test tile per category per column; rows: real, "
            "true embedding, own codes, LM-drawn codes (first LM seed with drawn codes), null."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ddim", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=60, help="test tiles drawn (stratified by category; 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=str(RUNS / "tokenizer-small-s0-300-400.safetensors"))
    ap.add_argument("--lm-results", default=str(RESULTS / "seed_lm.jsonl"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true",
                    help="load the decoder this script saved under runs/seed_lm/ for these settings (no training)")
    ap.add_argument("--out", default=str(RESULTS / "seed_pixels.jsonl"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(table(out))
        print(out.with_suffix(".md").read_text())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from frugalvision.inspect.text_diffusion import TextDiffusionConfig
    from frugalvision.language.seed import SEEDConfig, SEEDTokenizer
    from frugalvision.language.seed_decoder import SEEDPixelDecoder, fit_pixel_decoder

    st = _script("seed_tokenizer")
    train, test = st.features("train"), st.features("test")
    img_tr, img_te = tiles("train", args.size), tiles("test", args.size)
    judge = Judge(img_tr, train)
    tok_path = Path(args.tokenizer)
    if tok_path.is_file():
        tok = SEEDTokenizer(SEEDConfig(**{k: v for k, v in json.loads(tok_path.with_suffix(".json").read_text())
                                          .items() if k != "fit_s"}))
        tok.load_state_dict(load_file(tok_path))
        tok.eval()
    elif tok_path == Path(ap.get_default("tokenizer")):  # seed_lm.py's tokenizer, trained (deterministically) once
        tok = _script("seed_lm").tokenizer(st, "small", 0, train)
    else:
        raise SystemExit(f"--tokenizer {tok_path}: no such file")
    torch.manual_seed(args.seed)
    dec = SEEDPixelDecoder(train["image"].shape[1], TextDiffusionConfig(image_size=args.size, channels=(32, 64, 64)))
    log: list = []
    saved = RUNS / f"pixel-decoder-{args.size}px-{args.steps}-s{args.seed}.safetensors"
    if args.reuse:
        dec.load_state_dict(load_file(saved))
        dec.eval()
        meta = json.loads(saved.with_suffix(".json").read_text())
        fit_s, log = meta["fit_s"], meta["loss"]
    else:
        fit_s = fit_pixel_decoder(dec, img_tr, train["image"], steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, progress=False, log=log)
        from frugalvision.weights import write_weights

        RUNS.mkdir(parents=True, exist_ok=True)
        write_weights(saved, dec)  # atomic, normal permissions
        saved.with_suffix(".json").write_text(json.dumps({"fit_s": round(fit_s, 1), "loss": log}))
    g = torch.Generator().manual_seed(args.seed)
    keep = list(range(len(img_te)))
    if args.limit:  # the first limit / 5 test tiles of each category
        cats_all = sorted(set(test["category"]))
        keep = sorted(i for c in cats_all for i in [j for j, x in enumerate(test["category"]) if x == c]
                      [:args.limit // len(cats_all)])
    test = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]) for k, v in test.items()}
    img_te = img_te[keep]
    with torch.no_grad():
        conds = {"true embedding": test["image"], "own codes": tok.decode(tok.encode(test["visual"]))}
    lm_rows = []
    if Path(args.lm_results).is_file():
        lm_rows = [json.loads(x) for x in Path(args.lm_results).read_text().splitlines() if '"drawn_codes"' in x]
    for r in lm_rows:
        with torch.no_grad():
            conds[f"LM-drawn codes, seed {r['seed']}"] = tok.decode(torch.tensor(r["drawn_codes"])[keep])
    judged = {"real test tiles": judge.score(img_te, test)}
    drawn = {}
    t0 = time.perf_counter()
    for name, emb in conds.items():
        imgs = torch.cat([dec.sample(emb[i:i + 64], steps=args.ddim, guidance=args.guidance, generator=g)
                          for i in range(0, len(emb), 64)])
        drawn[name] = imgs
        judged[name] = judge.score(imgs, test)
    with torch.no_grad():
        null = dec.null.detach().expand(len(test["image"]), -1)
        # the null embedding goes through the same LayerNorm inside sample()
        imgs = torch.cat([dec.sample(null[i:i + 64], steps=args.ddim, guidance=1.0, generator=g)
                          for i in range(0, len(null), 64)])
    drawn["null"] = imgs
    judged["null (unconditional)"] = judge.score(imgs, test)
    sample_s = time.perf_counter() - t0
    cats = sorted(set(test["category"]))
    pick = [test["category"].index(c) for c in cats]
    first_lm = next((k for k in drawn if k.startswith("LM-drawn")), None)
    rows = [img_te[pick]] + [drawn[k][pick] for k in ("true embedding", "own codes", first_lm, "null") if k]
    grid(rows, RESULTS / "seed_pixels_samples.png" if args.seed == 0 else RUNS / f"samples-s{args.seed}.png")
    row = {"size": args.size, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ddim": args.ddim,
           "guidance": args.guidance, "seed": args.seed, "train": len(img_tr), "test": len(img_te),
           "params_m": round(sum(p.numel() for p in dec.parameters()) / 1e6, 2), "fit_s": round(fit_s, 1),
           "sample_s": round(sample_s, 1), "judged": judged,
           "lm_seeds": [r["seed"] for r in lm_rows], "loss": log, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread"}
    # one row per (size, steps, seed): a --reuse run (re-drawing with the saved decoder) replaces its earlier row
    same = ("size", "steps", "seed")
    old = [line for line in (out.read_text().splitlines() if out.is_file() else []) if line.strip()
           and any(json.loads(line)[k] != row[k] for k in same)]
    out.write_text("".join(line + "\n" for line in [*old, json.dumps(row)]))
    print(json.dumps({k: v for k, v in row.items() if k != "loss"}), flush=True)


if __name__ == "__main__":
    main()

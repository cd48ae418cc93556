"""SEED on two bundled sources: the tokenizer and the LM trained on the inspection tiles *and* deepforest's trees.

``seed_lm.py`` reads and draws the inspection benchmark's captions (category, defect kinds, locations). This script
adds the other bundled real images that have labels — deepforest's aerial tiles with their hand-drawn tree boxes,
captioned ``aerial view with N trees`` — to the same recipe, and asks two questions: does the LM read and draw a
*count* from 32 codes, and does sharing the tokenizer and the LM with a second source cost the inspection captions?

Data: the inspection benchmark's 300 training / 230 test tiles and the trees' 40 training / 18 test tiles (400 px
tiles of the training / test regions of each image: no pixel in both); frozen features as in ``seed_tokenizer.py``
(textures RepVGG-A0 stride-16 tokens at 128 px; last level pooled as the image embedding). The tokenizer (``small``:
1024 codes, k-means + restarts, stage I 300 + stage II 400 steps of batch 64, seed 0) is trained once on the union
and cached under ``runs/seed_lm/``; the LM (``seed_lm.py``'s discrete arm: SmolLM2-135M-Instruct with the code
tokens, new rows + LoRA r 64, both orders, 300 steps of batch 8) on the union's 340 pairs, over ``--seeds``.

Measured:
    trees, read    greedy caption from a test tile's codes → its first number: exact count %, mean absolute error
                   (against the training mean as a constant prior), malformed (no number)
    trees, draw    ``aerial view with N trees <img>`` → 32 codes → de-tokeniser → embedding, judged by a logistic
                   regression over the union's training embeddings (is it a tree tile?) and a ridge regression on
                   the training tree tiles' embeddings (how many trees?): MAE of the judged count against the
                   asked one and their Pearson r. Reference rows: the judges on the true test embeddings and on
                   the tiles' own codes decoded.
    inspection     the same read (category %) and draw (category judged %) scores as ``seed_lm.py``, to compare
                   with the LM trained on the inspection tiles alone (``seed_lm.md``).

Rows go to ``experiments/results/seed_trees.jsonl``; ``--table`` writes ``seed_trees.md``.
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

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TAG = "-inspection+trees"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def union(a: dict, b: dict) -> dict:
    """Concatenate two feature dicts of ``seed_tokenizer.features`` (tensors along dim 0, lists in order)."""
    out = {}
    for k in a.keys() & b.keys():
        out[k] = torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else [*a[k], *b[k]]
    return out


def count_judge(train: dict):
    """Ridge regression from a tree tile's image embedding to its tree count (trained on the training tree tiles)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(train["image"].numpy(),
                                                                                        train["count"])


def judge_trees(tok, clfs: dict, counter, emb: torch.Tensor, asked: list[int]) -> dict[str, float]:
    """Judged as a tree tile (%), judged count's MAE against ``asked`` and the Pearson r between them."""
    x = emb.numpy()
    got = counter.predict(x)
    r = float(np.corrcoef(got, asked)[0, 1]) if np.std(got) > 0 else None  # constant judgements: no r
    return {"judged_trees": 100 * float(np.mean(clfs["category"].predict(x) == "trees")),
            "count_mae": float(np.mean(np.abs(got - np.array(asked)))), "count_r": r}


def read_trees(captions: list[str], truth: list[int]) -> dict[str, float]:
    from frugalvision.language.metrics import _first_number

    got = [_first_number(c, no_is_zero=True) for c in captions]
    ok = [(g, t) for g, t in zip(got, truth, strict=True) if g is not None]
    return {"exact": 100 * float(np.mean([g == t for g, t in zip(got, truth, strict=True)])),
            "mae": float(np.mean([abs(g - t) for g, t in ok])) if ok else None,  # no number in any answer
            "malformed": 100 * (1 - len(ok) / len(truth))}


def references(tok, clfs: dict, counter, train: dict, tr_t: dict, te_t: dict) -> dict:
    with torch.no_grad():
        own = tok.decode(tok.encode(te_t["visual"]))
        codes_te = tok.encode(te_t["visual"])
    prior = float(np.mean(tr_t["count"]))
    return {"arm": "_data", "train": len(train["captions"]), "train_trees": len(tr_t["captions"]),
            "test_trees": len(te_t["captions"]), "codebook": tok.config.codebook_size,
            "prior_count": prior,
            "read_prior": {"exact": 100 * float(np.mean([round(prior) == t for t in te_t["count"]])),
                           "mae": float(np.mean(np.abs(prior - np.array(te_t["count"]))))},
            "true_embedding": judge_trees(tok, clfs, counter, te_t["image"], te_t["count"]),
            "own_codes": judge_trees(tok, clfs, counter, own, te_t["count"]),
            "distinct_codes_trees_test": len(set(codes_te.flatten().tolist())),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads()}


def run(seed: int, args: argparse.Namespace, sl, tok, train: dict, te_i: dict, te_t: dict, test_insts: list,
        clfs: dict, counter) -> dict:
    from frugalvision.language.seed_lm import SEEDLanguageModel, SEEDLMSettings, fit_seed_lm

    torch.manual_seed(seed)
    cfg = tok.config
    with torch.no_grad():
        codes_tr, codes_i, codes_t = tok.encode(train["visual"]), tok.encode(te_i["visual"]), tok.encode(te_t["visual"])
    lm = SEEDLanguageModel(cfg.codebook_size, cfg.num_queries, args.llm)
    s = SEEDLMSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rows_lr=args.rows_lr, seed=seed,
                       progress=False)
    fit_s = fit_seed_lm(lm, codes_tr, train["captions"], s)
    t0 = time.perf_counter()
    with torch.no_grad():
        said_t = lm.read(codes_t)
        said_i = lm.read(codes_i if not args.limit_inspection else codes_i[:args.limit_inspection])
        drawn_t = lm.draw(te_t["captions"])
        drawn_i = lm.draw(te_i["captions"] if not args.limit_inspection else te_i["captions"][:args.limit_inspection])
        emb_t = tok.decode(drawn_t)
    n_i = len(said_i)
    sub_i = {k: v[:n_i] for k, v in te_i.items()}
    return {"arm": "discrete", "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
            "fit_s": round(fit_s, 1), "test_s": round(time.perf_counter() - t0, 1),
            "trees_read": read_trees(said_t, te_t["count"]), "trees_read_examples": said_t[:5],
            "trees_draw": {**judge_trees(tok, clfs, counter, emb_t, te_t["count"]),
                           "distinct": len({tuple(c) for c in drawn_t.tolist()})},
            "inspection_read": sl.read_scores(said_i, test_insts[:n_i]),
            "inspection_draw": sl.draw_scores(tok, clfs, drawn_i, sub_i, codes_tr),
            "inspection_test": n_i, "loss": s.log}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = next((r for r in rows if r["arm"] == "_data"), {})
    runs = [r for r in rows if r["arm"] == "discrete"]

    def ms(vals: list[float], digits: int = 1) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "—"
        return f"{np.mean(vals):.{digits}f}" + (f" ± {np.std(vals):.{digits}f}" if len(vals) > 1 else "")

    out = ["# SEED on inspection tiles + aerial tree tiles (one tokenizer, one LM)", "",
           "Tokenizer (1024 codes, k-means + restarts) and LM (SmolLM2-135M-Instruct + code tokens, LoRA) trained on "
           f"{data.get('train', '?')} pairs: the inspection benchmark's training tiles and "
           f"{data.get('train_trees', '?')} deepforest training tree tiles; tested on {data.get('test_trees', '?')} "
           "held-out tree tiles and the "
           f"inspection test tiles. {data.get('machine', '?')}, {data.get('threads', '?')} thread, "
           f"{data.get('date', '?')}. Mean ± std over LM seeds.", "",
           "## Trees: counts from codes (read) and codes for a count (draw)", "",
           "| source of the answer | LM seeds | read: count exact % | read: no count % | read: count MAE (answers with "
           "one) | draw: judged a tree tile % | draw: judged count MAE | draw: r(asked, judged) | draw: distinct |",
           "|---|---|---|---|---|---|---|---|---|"]
    if data:
        rp = data["read_prior"]
        out.append(f"| training mean count ({data['prior_count']:.1f}) as the answer | – | {rp['exact']:.1f} | 0.0 | "
                   f"{rp['mae']:.1f} | – | – | – | – |")
        for name, key in (("true embedding (the judges' own error)", "true_embedding"),
                          ("the tile's own codes, decoded", "own_codes")):
            j = data[key]
            out.append(f"| {name} | – | – | – | – | {j['judged_trees']:.1f} | {j['count_mae']:.1f} | "
                       f"{j['count_r']:.2f} | {data['test_trees']} tiles |")
    if runs:
        rd = [r["trees_read"] for r in runs]
        dr = [r["trees_draw"] for r in runs]
        out.append(f"| LM (codes in, caption out / caption in, codes out) | {len(runs)} | "
                   f"{ms([x['exact'] for x in rd])} | {ms([x['malformed'] for x in rd])} | "
                   f"{ms([x['mae'] for x in rd])} | "
                   f"{ms([x['judged_trees'] for x in dr])} | {ms([x['count_mae'] for x in dr])} | "
                   f"{ms([x['count_r'] for x in dr], 2)} | {ms([x['distinct'] for x in dr], 0)} |")
        out += ["", "## Inspection captions with the trees added (compare `seed_lm.md`, the LM on inspection alone)",
                "",
                "| LM seeds | test tiles | read: category % | read: kinds % | read: malformed % "
                "| draw: category judged % | draw: distinct drawings |", "|---|---|---|---|---|---|---|",
                f"| {len(runs)} | {runs[0]['inspection_test']} | "
                f"{ms([100 * r['inspection_read']['category'] for r in runs])} | "
                f"{ms([100 * r['inspection_read']['kinds'] for r in runs])} | "
                f"{ms([100 * r['inspection_read']['malformed'] for r in runs])} | "
                f"{ms([r['inspection_draw']['category'] for r in runs])} | "
                f"{ms([r['inspection_draw']['distinct'] for r in runs], 0)} |"]
        out += ["", "Examples (seed 0, tree tiles): " + "; ".join(f"`{c}`" for c in runs[0]["trees_read_examples"])]
    out += ["", "Commands: `python experiments/seed_trees.py` (seeds 0 1 2), "
            "`python experiments/seed_trees.py --table`."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="LoRA")
    ap.add_argument("--rows-lr", type=float, default=2e-3, help="the new rows")
    ap.add_argument("--tokenizer-steps", nargs=2, type=int, default=[300, 400], help="stage I and II steps")
    ap.add_argument("--limit-inspection", type=int, default=0, help="inspection test tiles read and drawn (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "seed_trees.jsonl"))
    ap.add_argument("--table", action="store_true", help="only write the .md table from the jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(table(out))
        print(out.with_suffix(".md").read_text())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from frugalvision.language.instructions import inspection_instructions

    st, sl = _script("seed_tokenizer"), _script("seed_lm")
    tr_i, te_i = st.features("train"), st.features("test")
    tr_t, te_t = st.features("train", "trees"), st.features("test", "trees")
    train = union(tr_i, tr_t)
    test_insts = inspection_instructions("test", tasks=["caption"])
    tok = sl.tokenizer(st, "small", 0, train, tuple(args.tokenizer_steps), tag=TAG)
    clfs, counter = sl.judges(train), count_judge(tr_t)
    lines = out.read_text().splitlines() if out.is_file() else []
    if not any('"_data"' in line for line in lines):
        meta = references(tok, clfs, counter, train, tr_t, te_t)
        out.write_text("".join(line + "\n" for line in [json.dumps(meta), *lines]))
        print(json.dumps(meta), flush=True)
    for seed in args.seeds:
        row = run(seed, args, sl, tok, train, te_i, te_t, test_insts, clfs, counter)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "loss"}), flush=True)


if __name__ == "__main__":
    main()

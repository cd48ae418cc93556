"""The LM reads and draws SEED codes: captions from 32 discrete codes vs from continuous features, and text → codes.

SEED-LLaMA's recipe at small scale (:class:`frugalvision.language.seed_lm.SEEDLanguageModel`): the real
SmolLM2-135M-Instruct with ``<img_00000>`` … ``<img_{K-1}>``, ``<img>``, ``</img>`` added (new input/output rows
trained, the LM's own rows frozen) and LoRA r 64 / alpha 16 on q/v; training pairs are a tile's codes and its
caption written image→text or text→image with probability 0.5, next-token loss on all tokens.

Data and tokenizer: the bundled inspection benchmark's 300 training / 230 test tiles with their captions and the
frozen features of ``seed_tokenizer.py`` (textures RepVGG-A0 stride-16 tokens; last level pooled as the image
embedding). The tokenizer is that script's ``--tokenizer`` arm (default ``small``: 1024 codes, k-means + restarts;
stage I 300 + stage II 400 steps of batch 64), trained **once** with ``--tokenizer-seed`` and cached under
``runs/seed_lm/``; the LM arms are repeated over ``--seeds`` (the tokenizer's own seed-to-seed spread is in
``seed_tokenizer.md``).

Arms (``--arms``), each ``--steps`` steps of batch ``--batch-size`` from the same pretrained LM:
    discrete     codes as tokens, both orders (it reads and draws)
    continuous   the tokenizer's 32 continuous Q-Former outputs (before quantisation) through a trained Linear into
                 the LM's width in place of the code tokens (MiniGPT-4's projector), image→text only (it reads);
                 it gets all its steps for reading, the discrete arm about half

Measured on the test tiles:
    read   greedy captions from the tile's codes (or features), scored by the benchmark's caption rule
           (:func:`frugalvision.language.metrics.score_answers`): all kinds and locations right (acc), kinds
           right, locations right, surface category right; against the training set's most frequent caption
    draw   each test caption → ``caption <img>`` → 32 greedy code tokens → the tokenizer's de-tokeniser → an image
           embedding, judged by logistic regressions trained on the *true* embeddings of the training tiles:
           category and defect kind asked for vs judged; cosine with the tile's true embedding; distinct drawings
           and drawings copied verbatim from a training tile. Reference rows: the tile's own codes decoded, and
           the codes of a random training tile of the asked category.

Rows go to ``experiments/results/seed_lm.jsonl``; ``--table`` writes ``seed_lm.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = ROOT.parent / "runs" / "seed_lm"
ARMS = ("discrete", "continuous")


def _tokenizer_script() -> object:
    spec = importlib.util.spec_from_file_location("seed_tokenizer", ROOT / "seed_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenizer(st, arm: str, seed: int, train: dict, stages: tuple[int, int] = (300, 400),
              tag: str = "") -> torch.nn.Module:
    """The SEED tokenizer of ``arm`` (trained once, then read from ``runs/seed_lm``; ``tag`` names other data)."""
    from safetensors.torch import load_file

    from frugalvision.language.seed import SEEDConfig, SEEDTokenizer
    from frugalvision.weights import write_weights

    path = RUNS / f"tokenizer-{arm}-s{seed}-{stages[0]}-{stages[1]}{tag}.safetensors"
    if path.is_file():
        cfg = {k: v for k, v in json.loads(path.with_suffix(".json").read_text()).items() if k != "fit_s"}
        tok = SEEDTokenizer(SEEDConfig(**cfg))
        tok.load_state_dict(load_file(path))
        return tok.eval()
    tok, fit_s, _ = st.train_tokenizer(arm, seed, train, stages[0], stages[1], 64, 3e-4)
    RUNS.mkdir(parents=True, exist_ok=True)
    write_weights(path, tok)  # atomic, normal permissions
    import dataclasses

    path.with_suffix(".json").write_text(json.dumps({**dataclasses.asdict(tok.config), "fit_s": round(fit_s, 1)}))
    return tok.eval()


def judges(train: dict) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for key in ("category", "kind"):
        out[key] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train["image"].numpy(),
                                                                                           train[key])
    return out


def judged(clfs: dict, emb: torch.Tensor, test: dict) -> dict[str, float]:
    return {k: 100 * float(np.mean(c.predict(emb.numpy()) == np.array(test[k]))) for k, c in clfs.items()}


def read_scores(captions: list[str], test_insts: list) -> dict[str, float]:
    from frugalvision.language.metrics import score_answers

    res = score_answers(test_insts, captions)["caption"]
    return {k: round(float(v), 2) for k, v in res.items() if isinstance(v, (int, float)) and k != "n"}


def draw_scores(tok, clfs: dict, codes: torch.Tensor, test: dict, train_codes: torch.Tensor) -> dict:
    with torch.no_grad():
        emb = tok.decode(codes)
    seqs = {tuple(c) for c in codes.tolist()}
    train_seqs = {tuple(c) for c in train_codes.tolist()}
    return {**judged(clfs, emb, test), "cos_true": float(F.cosine_similarity(emb, test["image"], dim=-1).mean()),
            "distinct": len(seqs), "copied": 100 * float(np.mean([tuple(c) in train_seqs for c in codes.tolist()]))}


def run(arm: str, seed: int, args: argparse.Namespace, tok, train: dict, test: dict, test_insts: list,
        clfs: dict) -> dict:
    from frugalvision.language.seed_lm import SEEDLanguageModel, SEEDLMSettings, fit_seed_lm

    torch.manual_seed(seed)
    cfg = tok.config
    with torch.no_grad():
        codes_tr, codes_te = tok.encode(train["visual"]), tok.encode(test["visual"])
        feats_tr, feats_te = tok.query_features(train["visual"]), tok.query_features(test["visual"])
    lm = SEEDLanguageModel(cfg.codebook_size, cfg.num_queries, args.llm,
                           feature_dim=cfg.width if arm == "continuous" else None)
    s = SEEDLMSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rows_lr=args.rows_lr, seed=seed,
                       progress=False)
    if arm == "continuous":
        fit_s = fit_seed_lm(lm, None, train["captions"], s, features=feats_tr)
    else:
        fit_s = fit_seed_lm(lm, codes_tr, train["captions"], s)
    t0 = time.perf_counter()
    with torch.no_grad():
        said = lm.read_features(feats_te) if arm == "continuous" else lm.read(codes_te)
    read_s = time.perf_counter() - t0
    row = {"arm": arm, "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "fit_s": round(fit_s, 1),
           "read_s": round(read_s, 1), "read": read_scores(said, test_insts), "read_examples": said[:5],
           "trainable_m": round(sum(p.numel() for p in lm.parameters() if p.requires_grad) / 1e6, 2),
           "loss": s.log}
    if arm == "discrete":
        t0 = time.perf_counter()
        with torch.no_grad():
            drawn = lm.draw(test["captions"])
        row["draw_s"] = round(time.perf_counter() - t0, 1)
        row["draw"] = draw_scores(tok, clfs, drawn, test, codes_tr)
        row["drawn_codes"] = drawn.tolist()  # for the pixel decoder (seed_pixels.py)
    return row


def references(tok, clfs: dict, train: dict, test: dict, test_insts: list) -> dict:
    """Rows that need no LM: the tile's own codes decoded, a random same-category training tile, the prior caption."""
    with torch.no_grad():
        codes_tr, codes_te = tok.encode(train["visual"]), tok.encode(test["visual"])
    g = np.random.default_rng(0)
    cats = np.array(train["category"])
    pick = [int(g.choice(np.flatnonzero(cats == c))) for c in test["category"]]
    prior = Counter(train["captions"]).most_common(1)[0][0]
    true_j = judged(clfs, test["image"], test)
    return {"arm": "_data", "train": len(train["captions"]), "test": len(test["captions"]),
            "codebook": tok.config.codebook_size, "queries": tok.config.num_queries,
            "judged_true_embeddings": true_j,
            "draw_own_codes": draw_scores(tok, clfs, codes_te, test, codes_tr),
            "draw_same_category_tile": draw_scores(tok, clfs, codes_tr[pick], test, codes_tr),
            "prior_caption": prior, "read_prior": read_scores([prior] * len(test_insts), test_insts),
            "mean_embedding_cos": float(F.cosine_similarity(train["image"].mean(0, keepdim=True), test["image"],
                                                            dim=-1).mean()),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads()}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta = next((r for r in rows if r.get("arm") == "_data"), {})
    rows = [r for r in rows if r.get("arm") != "_data"]

    def ms(vals: list[float], scale: float = 1.0) -> str:
        v = [x * scale for x in vals]
        return f"{np.mean(v):.1f}" + (f" ± {np.std(v):.1f}" if len(v) > 1 else "")

    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    first = rows[0] if rows else {}
    out = ["# The LM reads and draws SEED codes (small scale)", "",
           f"SmolLM2-135M-Instruct + LoRA r 64 on q/v + new rows; {meta.get('train', '?')} training / "
           f"{meta.get('test', '?')} test tiles; SEED tokenizer with {meta.get('codebook', '?')} codes x "
           f"{meta.get('queries', '?')} queries (trained once); {first.get('steps', '?')} steps of batch "
           f"{first.get('batch_size', '?')}; {meta.get('machine', '?')}, {meta.get('threads', '?')} thread, "
           f"{meta.get('date', '?')}. Mean ± std over seeds; all numbers are % on the test tiles.", "",
           "## Reading: captions of the test tiles", "",
           "| from | seeds | acc (kinds + locations) | kinds right | locations right | category right | train s |",
           "|---|---|---|---|---|---|---|"]
    if meta.get("read_prior"):
        rp = meta["read_prior"]
        out.append(f"| the most frequent training caption | – | {100 * rp['acc']:.1f} | {100 * rp['kinds']:.1f} | "
                   f"{100 * rp['locations']:.1f} | {100 * rp['category']:.1f} | – |")
    names = {"discrete": "32 discrete codes as tokens (SEED)", "continuous": "32 continuous features + projector"}
    for arm, rs in by.items():
        out.append(f"| {names.get(arm, arm)} | {len(rs)} | " + " | ".join(
            ms([r["read"][k] for r in rs], 100) for k in ("acc", "kinds", "locations", "category"))
            + f" | {np.mean([r['fit_s'] for r in rs]):.0f} |")
    out += ["", "## Drawing: caption → codes → decoded image embedding, judged by classifiers trained on true "
            "embeddings", "",
            "| codes | seeds | category judged = asked | kind judged = asked | cosine with the tile's embedding | "
            "distinct drawings | copied from a training tile |", "|---|---|---|---|---|---|---|"]
    if meta:
        jt = meta["judged_true_embeddings"]
        out.append(f"| (the tile's true embedding, not decoded) | – | {jt['category']:.1f} | {jt['kind']:.1f} | 1.000 "
                   f"| – | – |")
        for name, key in (("the tile's own codes", "draw_own_codes"),
                          ("a random training tile of the asked category", "draw_same_category_tile")):
            d = meta[key]
            out.append(f"| {name} | – | {d['category']:.1f} | {d['kind']:.1f} | {d['cos_true']:.3f} | "
                       f"{d['distinct']} | {d['copied']:.1f} |")
        out.append(f"| the training tiles' mean embedding | – | – | – | {meta['mean_embedding_cos']:.3f} | – | – |")
    for rs in by.values():
        if "draw" not in rs[0]:
            continue
        d = [r["draw"] for r in rs]
        out.append(f"| drawn by the LM from the caption | {len(rs)} | {ms([x['category'] for x in d])} | "
                   f"{ms([x['kind'] for x in d])} | {np.mean([x['cos_true'] for x in d]):.3f} | "
                   f"{ms([x['distinct'] for x in d])} | {ms([x['copied'] for x in d])} |")
    ex = next((r for r in rows if r["arm"] == "discrete"), None)
    if ex:
        out += ["", "Example captions read from codes (discrete, first seed): "
                + "; ".join(f"\"{t}\"" for t in ex["read_examples"][:3])]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tokenizer", default="small", choices=("official", "kmeans", "small"))
    ap.add_argument("--tokenizer-seed", type=int, default=0)
    ap.add_argument("--tokenizer-steps", nargs=2, type=int, default=[300, 400], help="stage I and II steps")
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="LoRA")
    ap.add_argument("--rows-lr", type=float, default=2e-3, help="the new rows and the projector")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "seed_lm.jsonl"))
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

    st = _tokenizer_script()
    train, test = st.features("train"), st.features("test")
    test_insts = inspection_instructions("test", tasks=["caption"])
    if [i.answer for i in test_insts] != test["captions"]:
        raise SystemExit("the test instructions and the features disagree")
    tok = tokenizer(st, args.tokenizer, args.tokenizer_seed, train, tuple(args.tokenizer_steps))
    clfs = judges(train)
    lines = out.read_text().splitlines() if out.is_file() else []
    if not any('"_data"' in line for line in lines):
        meta = references(tok, clfs, train, test, test_insts)
        out.write_text("".join(line + "\n" for line in [json.dumps(meta), *lines]))
        print(json.dumps(meta), flush=True)
    for arm in args.arms:
        for seed in args.seeds:
            row = run(arm, seed, args, tok, train, test, test_insts, clfs)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k not in ("loss", "drawn_codes")}), flush=True)


if __name__ == "__main__":
    main()

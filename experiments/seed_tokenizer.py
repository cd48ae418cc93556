"""The SEED tokenizer at small scale: do 32 discrete codes per image keep what the captions and the image say?

Data: the bundled inspection benchmark's tiles with their captions (category, defect kinds, locations:
``inspection_instructions(tasks=["caption"])``), training tiles for training, the held-out test tiles for every
number. Frozen inputs, computed once: the visual tokens are RepVGG-A0's stride-16 features (pre-trained on the bundled
textures; 8x8 tokens of 192 channels at 128 px); the target image embedding of stage II is the same network's last
level, average-pooled (1280-d; the official pipeline regresses unCLIP's 1024-d CLIP image embedding); the caption
embeddings are the real all-MiniLM-L6-v2's (mean-pooled, 384-d).

Tokenizer (:class:`frugalvision.language.seed.SEEDTokenizer`): causal Q-Former with 32 queries (width 256, 4 layers,
4 heads), codes of dimension 32. Stage I: ``--stage1`` steps of the contrastive loss (last query vs caption, label
smoothing 0.1, learnable temperature); stage II: ``--stage2`` steps of ``5 L_vq + 2 (1 - cos) + 0.5 MSE`` with the
Q-Former frozen. Arms (``--arms``):

    official    8192 codes, random initialisation, no restarts (the released code's quantiser)
    kmeans      8192 codes, k-means initialisation on the training queries + dead-code restarts every 50 steps
    small       1024 codes, k-means + restarts

Measured on the test tiles: image→text and text→image retrieval R@1 / R@5 (a retrieved caption counts when its text
is the true caption, so identical captions of different tiles are not penalised; chance given), from the continuous
last query (stage I) and from the codes (the last query's reconstruction after quantisation); codebook usage,
perplexity and dead codes; cosine of the decoded image embedding with the true one; category and defect kind of the
decoded embeddings as judged by logistic regressions trained on the true embeddings of the training tiles.

Rows go to ``experiments/results/seed_tokenizer.jsonl``; ``--table`` writes ``seed_tokenizer.md``.
"""

from __future__ import annotations

import argparse
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
ARMS = {"official": {"codebook_size": 8192, "kmeans": False, "restart_every": 0},
        "kmeans": {"codebook_size": 8192, "kmeans": True, "restart_every": 50},
        "small": {"codebook_size": 1024, "kmeans": True, "restart_every": 50}}


def caption_kind(caption: str) -> str:
    from frugalvision.language.metrics import parse_caption

    pairs, _ = parse_caption(caption)
    return pairs[0][0] if pairs else "none"


@torch.no_grad()
def features(split: str, source: str = "inspection") -> dict:
    """Visual tokens, image embeddings, caption embeddings, captions, categories and kinds of a split.

    ``source="trees"``: deepforest's aerial tiles (category ``trees``, kind ``none``, and their tree ``count``).
    """
    from transformers import AutoModel, AutoTokenizer

    from frugalvision.language.instructions import inspection_instructions
    from frugalvision.language.training import _ImageCache
    from frugalvision.language.visual import FeatureLevel
    from frugalvision.models.lm_encoder import minilm_path
    from frugalvision.pipelines.classification import pretrain_backbone

    if source == "trees":
        from frugalvision.language.instructions import tree_instructions

        insts = tree_instructions(split, tasks=["caption"])
    else:
        insts = inspection_instructions(split, tasks=["caption"])
    weights = pretrain_backbone("repvgg_a0", progress=False)
    enc, last = FeatureLevel("repvgg_a0", stride=16), FeatureLevel("repvgg_a0", stride=0)
    enc.load_classifier(weights)
    last.load_classifier(weights)
    enc.eval()
    last.eval()
    cache = _ImageCache(128, enc.mean, enc.std)
    toks, embs = [], []
    for i in range(0, len(insts), 32):
        x = torch.stack([cache(inst) for inst in insts[i:i + 32]])
        toks.append(enc(x).flatten(2).transpose(1, 2))
        embs.append(last(x).mean((2, 3)))
    tok = AutoTokenizer.from_pretrained(minilm_path())
    lm = AutoModel.from_pretrained(minilm_path()).eval()
    captions = [inst.answer for inst in insts]
    texts = []
    for i in range(0, len(captions), 64):
        b = tok(captions[i:i + 64], padding=True, truncation=True, return_tensors="pt")
        h = lm(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        texts.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    out = {"visual": torch.cat(toks), "image": torch.cat(embs), "text": torch.cat(texts), "captions": captions,
           "category": [inst.label for inst in insts], "kind": [caption_kind(c) for c in captions]}
    if source == "trees":
        out["category"] = ["trees"] * len(insts)
        out["kind"] = ["none"] * len(insts)
        from frugalvision.language.metrics import _first_number

        out["count"] = [_first_number(c, no_is_zero=True) for c in captions]
    return out


def recall(sim: torch.Tensor, rows: list[str], cols: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """R@k of ``sim`` (rows query, columns candidates): a hit when a top-k candidate's caption is the row's."""
    top = sim.topk(max(ks), dim=1).indices
    out = {}
    for k in ks:
        hits = [any(cols[j] == rows[i] for j in top[i, :k].tolist()) for i in range(len(rows))]
        out[f"R@{k}"] = 100 * float(np.mean(hits))
    return out


def retrieval(img: torch.Tensor, txt: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Image→text over the test set's distinct captions and text→image over its images."""
    distinct = sorted(set(captions))
    t = torch.stack([txt[next(j for j, c in enumerate(captions) if c == d)] for d in distinct])
    i2t = recall(img @ t.t(), captions, distinct)
    t2i = recall(t @ img.t(), distinct, captions)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


def chance(captions: list[str]) -> dict[str, float]:
    distinct = sorted(set(captions))
    counts = {d: captions.count(d) for d in distinct}
    n, m = len(captions), len(distinct)
    return {"i2t_R@1": 100 / m, "i2t_R@5": 100 * min(5, m) / m,
            "t2i_R@1": 100 * float(np.mean([counts[d] / n for d in distinct])),
            "t2i_R@5": 100 * float(np.mean([1 - np.prod([(n - counts[d] - i) / (n - i) for i in range(5)])
                                             for d in distinct]))}


def judge(train: dict, test_emb: np.ndarray, truth_test: dict) -> dict[str, float]:
    """Accuracy of logistic regressions (trained on true training embeddings) on test embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for key in ("category", "kind"):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(train["image"].numpy(), train[key])
        out[key] = 100 * float(np.mean(clf.predict(test_emb) == np.array(truth_test[key])))
    return out


def train_tokenizer(arm: str, seed: int, train: dict, stage1: int, stage2: int, batch_size: int, lr: float
                    ) -> tuple[torch.nn.Module, float, dict]:
    """Stage I then stage II of ``arm``'s tokenizer on the training features; ``(tokenizer, seconds, loss log)``."""
    from frugalvision.language.seed import SEEDConfig, SEEDTokenizer, fit_seed_tokenizer

    a = ARMS[arm]
    torch.manual_seed(seed)
    cfg = SEEDConfig(vision_dim=train["visual"].shape[2], width=256, num_layers=4, num_heads=4, num_queries=32,
                     code_dim=32, codebook_size=a["codebook_size"], decoder_layers=2, decoder_heads=4,
                     image_dim=train["image"].shape[1], text_dim=train["text"].shape[1], embed_dim=128,
                     restart_every=a["restart_every"], dead_after=50)
    tok = SEEDTokenizer(cfg)
    log: dict[str, list] = {}
    t0 = time.perf_counter()
    fit_seed_tokenizer(tok, train["visual"], train["text"], train["image"], stage1, stage2, batch_size, lr, seed,
                       kmeans=a["kmeans"], log=log)
    return tok.eval(), time.perf_counter() - t0, log


def run(arm: str, seed: int, train: dict, test: dict, args: argparse.Namespace) -> dict:
    tok, fit_s, log = train_tokenizer(arm, seed, train, args.stage1, args.stage2, args.batch_size, args.lr)
    cfg = tok.config
    with torch.no_grad():
        out = tok(test["visual"])
        img = F.normalize(tok.vision_proj(out.query_features[:, -1]), dim=-1)
        img_codes = F.normalize(tok.vision_proj(out.reconstructed[:, -1]), dim=-1)
        txt = F.normalize(tok.text_proj(test["text"]), dim=-1)
        usage = tok.quantize.codebook_usage(out.codes)
        train_codes = tok.encode(train["visual"])
        train_usage = tok.quantize.codebook_usage(train_codes)
        cos = float(F.cosine_similarity(out.image_embedding, test["image"], dim=-1).mean())
    cont = retrieval(img, txt, test["captions"])
    disc = retrieval(img_codes, txt, test["captions"])
    judged = judge(train, out.image_embedding.numpy(), test)
    return {"arm": arm, "seed": seed, "codebook": cfg.codebook_size, "fit_s": round(fit_s, 1),
            "retrieval_continuous": cont, "retrieval_codes": disc,
            "usage_test": usage._asdict(), "usage_train": train_usage._asdict(),
            "dead_after_training": int(tok.quantize.dead_codes().sum()), "image_cos": cos,
            "judged_decoded": judged, "recon_cos": float(F.cosine_similarity(out.reconstructed,
                                                                              out.query_features, dim=-1).mean()),
            "loss": log}


def table(path: Path, extra: dict) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta = next((r for r in rows if r.get("arm") == "_data"), {})
    rows = [r for r in rows if r.get("arm") != "_data"]

    def ms(vals: list[float]) -> str:
        return f"{np.mean(vals):.1f}" + (f" ± {np.std(vals):.1f}" if len(vals) > 1 else "")

    out = ["# SEED tokenizer on the bundled inspection tiles (small scale)", "",
           f"{meta.get('train', '?')} training / {meta.get('test', '?')} test tiles with captions "
           f"({meta.get('distinct_test_captions', '?')} distinct test captions); {meta.get('machine', '?')}, "
           f"{meta.get('threads', '?')} thread, {meta.get('date', '?')}; stage I {meta.get('stage1', '?')} + stage II "
           f"{meta.get('stage2', '?')} steps of batch {meta.get('batch_size', '?')}. Mean ± std over seeds.", "",
           "Retrieval on the test tiles (%, image→text over distinct captions / text→image over tiles):", "",
           "| arm | seeds | from | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |", "|---|---|---|---|---|---|---|"]
    if meta.get("chance"):
        c = meta["chance"]
        out.append(f"| chance | – | – | {c['i2t_R@1']:.1f} | {c['i2t_R@5']:.1f} | {c['t2i_R@1']:.1f} | "
                   f"{c['t2i_R@5']:.1f} |")
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    for arm, rs in by.items():
        for src, key in (("continuous last query", "retrieval_continuous"), ("32 codes", "retrieval_codes")):
            out.append(f"| {arm} | {len(rs)} | {src} | " + " | ".join(
                ms([r[key][m] for r in rs]) for m in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")) + " |")
    out += ["", "Codebook and reconstruction (test tiles unless said):", "",
            "| arm | codes | used (test) | perplexity (test) | used (train) | dead after training | feature cos | "
            "image-embedding cos | category of decoded % | kind of decoded % | fit s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    if meta.get("judged_true"):
        j = meta["judged_true"]
        out.append(f"| true embeddings | – | – | – | – | – | – | 1.000 | {j['category']:.1f} | {j['kind']:.1f} | – |")
    if "mean_embedding_cos" in meta:
        cos = meta["mean_embedding_cos"]
        out.append(f"| the training tiles' mean embedding | – | – | – | – | – | – | {cos:.3f} | – | – | – |")
    for arm, rs in by.items():
        out.append(f"| {arm} | {rs[0]['codebook']} | {ms([r['usage_test']['used'] for r in rs])} | "
                   f"{ms([r['usage_test']['perplexity'] for r in rs])} | {ms([r['usage_train']['used'] for r in rs])}"
                   f" | {ms([r['dead_after_training'] for r in rs])} | {np.mean([r['recon_cos'] for r in rs]):.3f} | "
                   f"{np.mean([r['image_cos'] for r in rs]):.3f} | {ms([r['judged_decoded']['category'] for r in rs])}"
                   f" | {ms([r['judged_decoded']['kind'] for r in rs])} | {np.mean([r['fit_s'] for r in rs]):.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--stage1", type=int, default=300)
    ap.add_argument("--stage2", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "seed_tokenizer.jsonl"))
    ap.add_argument("--table", action="store_true", help="only write the .md table from the jsonl")
    ap.add_argument("--meta-only", action="store_true", help="only (re)write the data row (chance, baselines)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(table(out, {}))
        print(out.with_suffix(".md").read_text())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    train, test = features("train"), features("test")
    meta = {"arm": "_data", "train": len(train["captions"]), "test": len(test["captions"]),
            "distinct_test_captions": len(set(test["captions"])), "chance": chance(test["captions"]),
            "judged_true": judge(train, test["image"].numpy(), test),
            "mean_embedding_cos": float(F.cosine_similarity(train["image"].mean(0, keepdim=True), test["image"],
                                                            dim=-1).mean()),
            "stage1": args.stage1, "stage2": args.stage2,
            "batch_size": args.batch_size, "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    lines = out.read_text().splitlines() if out.is_file() else []
    if args.meta_only or not any('"_data"' in line for line in lines):  # the data row first, replaced by --meta-only
        rest = [line for line in lines if '"_data"' not in line]
        out.write_text("".join(line + "\n" for line in [json.dumps(meta), *rest]))
    print(json.dumps(meta), flush=True)
    if args.meta_only:
        return
    for arm in args.arms:
        for seed in args.seeds:
            row = run(arm, seed, train, test, args)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "loss"}), flush=True)


if __name__ == "__main__":
    main()

"""Do language models reading SVG text resist distribution shift better than a pixel CNN? (digits, 3 seeds)

Real handwritten digits (scikit-learn, 8x8 scans upsampled to 32x32, dark ink on white), a fixed stratified split
(``--train`` per class for training, ``--test`` per class for testing). Test images get each shift of
:data:`frugalvision.language.svg_read.SHIFTS` before they become text; training never sees a shift.

Arms (``--arms``):
    cnn            timm resnet34 (21.3 M parameters) on the 32x32 pixels, from scratch
    minilm-svg     pretrained all-MiniLM-L6-v2 fine-tuned on the SVG text (binary vtracer, <= 256 SmolLM2 tokens)
    minilm-pixels  the same on the pixel grid as text (the same 256-token budget: an 8x8 grid)
    lora-svg       SmolLM2-135M-Instruct + LoRA (r 8, q/v) answering the digit from the SVG text
    lora-pixels    the same on the pixel text
    icl-svg        SmolLM2-135M-Instruct, frozen, k in {0, 1, 3, 10} in-context examples (shifts at the largest k)

Rows go to ``experiments/results/svg_reading.jsonl`` as each (arm, seed) finishes; ``--table`` writes
``svg_reading.md`` from them. Commands used for the committed table are in ``docs/svg.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
QUESTION = "Which digit (0-9) does this image show? Answer with the digit only."
NAMES = [str(i) for i in range(10)]


def load(data: str, train: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Training and test images and labels, and the class names."""
    from frugalvision.language.svg_read import defect_crops, digit_images

    if data == "digits":
        x, y = digit_images(32)
        tr, te = split(y, train, test)
        return x[tr], y[tr], x[te], y[te], NAMES
    if data == "shapes":
        x, y = shape_images(train + test)
        tr, te = split(y, train, test)
        return x[tr], y[tr], x[te], y[te], SHAPES
    xtr, ytr, names, _ = defect_crops("train")
    xte, yte, _, _ = defect_crops("test")
    tr = np.array([i for c in range(len(names)) for i in np.flatnonzero(ytr == c)[:train]])
    te = np.array([i for c in range(len(names)) for i in np.flatnonzero(yte == c)[:test]])
    return xtr[tr], ytr[tr], xte[te], yte[te], names


SHAPES = ["circle", "square", "triangle", "cross", "ring"]


def shape_images(per_class: int = 60, size: int = 32, seed: int = 4321) -> tuple[np.ndarray, np.ndarray]:
    """Generated outline-free filled shapes (``SHAPES``), dark ink on white, random size, position and rotation."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = size * 4  # drawn at 4x and downsampled: anti-aliased edges like the digits' scans
    xs, ys = [], []
    for c, name in enumerate(SHAPES):
        for _ in range(per_class):
            im = Image.new("L", (big, big), 255)
            d = ImageDraw.Draw(im)
            r = rng.uniform(0.22, 0.4) * big
            cx, cy = rng.uniform(r + 4, big - r - 4, size=2)
            turn = rng.uniform(0, 2 * np.pi)
            w = max(6.0, 0.35 * r)
            if name == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
            elif name == "ring":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
                d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=255)
            elif name in ("square", "triangle"):
                n = 4 if name == "square" else 3
                d.polygon([(cx + r * np.cos(turn + 2 * np.pi * i / n), cy + r * np.sin(turn + 2 * np.pi * i / n))
                           for i in range(n)], fill=0)
            else:  # a plus sign, rotated
                for a in (turn, turn + np.pi / 2):
                    dx, dy, px, py = r * np.cos(a), r * np.sin(a), w / 2 * -np.sin(a), w / 2 * np.cos(a)
                    d.polygon([(cx - dx + px, cy - dy + py), (cx + dx + px, cy + dy + py),
                               (cx + dx - px, cy + dy - py), (cx - dx - px, cy - dy - py)], fill=0)
            g = np.asarray(im.resize((size, size), Image.Resampling.BOX))
            xs.append(np.repeat(g[..., None], 3, 2))
            ys.append(c)
    return np.stack(xs).astype(np.uint8), np.array(ys, np.int64)


def split(y: np.ndarray, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    tr, te = [], []
    for c in range(int(y.max()) + 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        tr += idx[:train].tolist()
        te += idx[train:train + test].tolist()
    return np.array(sorted(tr)), np.array(sorted(te))


def texts_for(images: np.ndarray, form: str, tok, cache: dict, mode: str = "binary") -> tuple[list[str], float]:
    from frugalvision.errors import DataError
    from frugalvision.language.svg_read import image_texts

    key = (form, images.tobytes().__hash__())
    if key not in cache:  # an image whose text cannot fit the budget gets "" and is scored as wrong (see `failed`)
        texts, counts = [], []
        for img in images:
            try:
                (t,), (n,) = image_texts([img], form, 256, tok, mode=mode)
            except DataError:
                t, n = "", 0
            texts.append(t)
            counts.append(n)
        fitted = [c for c in counts if c]
        cache[key] = (texts, float(np.mean(fitted)) if fitted else 0.0)
    return cache[key]


def score(logits: np.ndarray, texts: list[str], y: np.ndarray) -> float:
    """Accuracy; images without a text (nothing fitted the budget) count as wrong."""
    pred = logits.argmax(1)
    pred[np.array([t == "" for t in texts])] = -1
    return float((pred == y).mean())


def append(row: dict, out: Path) -> None:
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run(args: argparse.Namespace) -> None:
    from frugalvision.language.svg import smollm2_tokenizer
    from frugalvision.language.svg_read import (
        SHIFTS,
        InContextReader,
        LMReader,
        MiniLMReader,
        PixelCNN,
        ReaderSettings,
        shift_image,
    )

    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte, names = load(args.data, args.train, args.test)
    mode = "color" if args.data == "defects" else "binary"
    question = {"digits": QUESTION, "shapes": f"Which shape ({', '.join(names)}) does this image show? Answer with "
                "the shape only."}.get(args.data, f"Which defect kind ({', '.join(names)}) does this image show? "
                                                  "Answer with the kind only.")
    ncls = len(names)
    shifted = {s: np.stack([shift_image(im, s) for im in xte]) for s in SHIFTS}
    tok = smollm2_tokenizer()
    cache: dict = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = {"data": args.data, "train": len(ytr), "test": len(yte), "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    llm = None

    def lm():
        nonlocal llm
        if llm is None:
            from frugalvision.language.llm import load_llm

            llm = load_llm("smollm2")
        return llm

    for arm in args.arms:
        for seed in args.seeds:
            row = {**base, "arm": arm, "seed": seed}
            form = arm.split("-")[1] if "-" in arm else "pixels"
            if arm in ("cnn", "cnn-std"):
                model = PixelCNN(ncls, normalize="per_image" if arm == "cnn-std" else "fixed")
                secs = model.fit(xtr, ytr, ReaderSettings(epochs=30, batch_size=32, lr=1e-3, seed=seed,
                                                          weight_decay=0.05, progress=False))
                acc = {s: float((model.predict_logits(shifted[s]).argmax(1) == yte).mean()) for s in SHIFTS}
                row.update(params=sum(p.numel() for p in model.parameters()), fit_s=round(secs, 1), acc=acc)
            elif arm.startswith("minilm"):
                model = MiniLMReader(ncls)
                ttr, ntr = texts_for(xtr, form, tok, cache, mode)
                keep = [i for i, t in enumerate(ttr) if t]
                secs = model.fit([ttr[i] for i in keep], ytr[keep],
                                 ReaderSettings(epochs=args.minilm_epochs, batch_size=16, lr=1e-4, seed=seed,
                                                progress=False))
                acc, tokens, no_text = {}, {}, {}
                for s in SHIFTS:
                    tte, tokens[s] = texts_for(shifted[s], form, tok, cache, mode)
                    acc[s] = score(model.predict_logits(tte), tte, yte)
                    if "" in tte:
                        no_text[s] = tte.count("")
                row.update(params=sum(p.numel() for p in model.parameters()), fit_s=round(secs, 1), acc=acc,
                           tokens=tokens, truncated=model.truncated, train_tokens=ntr, no_text=no_text)
            elif arm.startswith("lora"):
                m, t = lm()
                model = LMReader(names, question, model=m, tokenizer=t, rank=8)
                ttr, ntr = texts_for(xtr, form, tok, cache, mode)
                secs = model.fit(ttr, ytr, ReaderSettings(epochs=args.lora_epochs, batch_size=8, lr=1e-3,
                                                          seed=seed, progress=False))
                acc, tokens = {}, {}
                t0 = time.perf_counter()
                for s in SHIFTS:
                    tte, tokens[s] = texts_for(shifted[s], form, tok, cache, mode)
                    acc[s] = float((model.predict_logits(tte).argmax(1) == yte).mean())
                trainable = sum(p.numel() for p in model.lm.parameters() if p.requires_grad)
                row.update(trainable=trainable, fit_s=round(secs, 1), test_s=round(time.perf_counter() - t0, 1),
                           acc=acc, tokens=tokens, train_tokens=ntr)
                llm = (model.lm.unload(), t)  # take LoRA off again for the next arm / seed
            elif arm.startswith("icl"):
                m, t = lm()
                model = InContextReader(names, question, model=m, tokenizer=t)
                ttr, _ = texts_for(xtr, form, tok, cache, mode)
                rng = np.random.default_rng(seed)
                per_k = {}
                for k in args.ks:
                    if k >= ncls:
                        pick = [int(rng.choice(np.flatnonzero(ytr == c))) for c in range(ncls)] * (k // ncls)
                        pick = list(rng.permutation(pick))
                    else:
                        pick = rng.choice(len(ttr), size=k, replace=False).tolist()
                    n_prefix = model.set_examples([ttr[i] for i in pick], [int(ytr[i]) for i in pick])
                    shifts = SHIFTS if k == max(args.ks) else ("none",)
                    acc = {}
                    for s in shifts:
                        tte, _ = texts_for(shifted[s], form, tok, cache, mode)
                        acc[s] = float((model.predict_logits(tte).argmax(1) == yte).mean())
                    per_k[str(k)] = {"acc": acc, "prefix_tokens": n_prefix}
                    print(arm, seed, k, acc, flush=True)
                row.update(per_k=per_k, acc=per_k[str(max(args.ks))]["acc"])
            else:
                sys.exit(f"unknown arm {arm}")
            append(row, out)


def table(path: Path) -> str:
    from frugalvision.language.svg_read import SHIFTS

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)

    def ms(v: list[float]) -> str:
        return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"

    lines = ["| reader | seeds | " + " | ".join(SHIFTS) + " | mean shifted | tokens | fit (s) |",
             "|---|---|" + "---|" * (len(SHIFTS) + 3)]
    for arm, rs in by.items():
        cells = [ms([r["acc"][s] for r in rs]) if all(s in r["acc"] for r in rs) else "—" for s in SHIFTS]
        shifted = [np.mean([r["acc"][s] for s in SHIFTS[1:]]) for r in rs if all(s in r["acc"] for s in SHIFTS)]
        tok = f"{rs[0]['tokens']['none']:.0f}" if "tokens" in rs[0] else "—"
        fit = f"{np.mean([r['fit_s'] for r in rs]):.0f}" if "fit_s" in rs[0] else "0"
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {ms(shifted) if shifted else '—'} | {tok} "
                     f"| {fit} |")
    icl = by.get("icl-svg", [])
    if icl:
        ks = sorted({int(k) for r in icl for k in r["per_k"]})
        lines += ["", "| in-context examples k | " + " | ".join(str(k) for k in ks) + " |",
                  "|---|" + "---|" * len(ks),
                  "| accuracy, no shift (%) | " + " | ".join(ms([r["per_k"][str(k)]["acc"]["none"] for r in icl])
                                                         for k in ks) + " |",
                  "| prompt tokens before the query | " + " | ".join(
                      str(icl[0]["per_k"][str(k)]["prefix_tokens"]) for k in ks) + " |"]
    r0 = rows[0]
    head = (f"{r0.get('data', 'digits').capitalize()}, {r0['train']} training / {r0['test']} test images (fixed "
            f"split), accuracy % (mean ± std over seeds), {r0['machine']}, {r0['date']}.\n\n")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["cnn", "minilm-svg", "minilm-pixels", "icl-svg", "lora-svg"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train", type=int, default=30, help="training images per class")
    p.add_argument("--test", type=int, default=15, help="test images per class")
    p.add_argument("--ks", nargs="+", type=int, default=[0, 1, 3, 10])
    p.add_argument("--minilm-epochs", type=int, default=8)
    p.add_argument("--lora-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", choices=["digits", "defects", "shapes"], default="digits")
    p.add_argument("--out", default=None, help="default: results/svg_reading[_defects].jsonl")
    p.add_argument("--table", action="store_true", help="only write svg_reading.md from the jsonl")
    args = p.parse_args()
    stem = "svg_reading" if args.data == "digits" else f"svg_reading_{args.data}"
    args.out = args.out or str(RESULTS / f"{stem}.jsonl")
    if not args.table:
        run(args)
    md = RESULTS / f"{stem}.md"
    what = {"digits": "digits", "shapes": "generated shapes"}.get(args.data, "defect kinds")
    md.write_text(f"# Reading {what} as SVG text vs pixels under test-time shifts\n\n" + table(Path(args.out)))
    print(md.read_text())


if __name__ == "__main__":
    main()

"""Every MiniGPT-v2 task on both bundled sources: the VLM on a real LLM vs the same VLM on a random LLM vs templates.

``vlm_grounding.py`` answers the talk's question on ``[refer]``; this script measures the rest of the task set —
``[caption]``, ``[vqa]`` (per question type), ``[identify]``, ``[detection]`` (AP50), ``[grounding]`` and
``[refer]`` — on the bundled inspection tiles and on deepforest's real aerial tree tiles, with the same controls:

    text          MiniGPT-v2 on SmolLM2-135M-Instruct (``frugalvision vlm train``'s default stages: ``align`` on
                  captions, ``multitask`` every task equally often, ``mixed`` the natural mix; ``--steps`` per stage)
    text-random   the same with the LLM's weights random (does language pretraining help?)
    prior         no image and no model: each test question gets the most common training answer to the same task
                  and question type (for ``[refer]`` / ``[detection]``, whose question names the kind, the mean
                  training box of that kind) — what the question alone gives, e.g. the training majority "2" to
                  "how many defects?"
    detector      YOLOv6-n trained on the source (``frugalvision detect train data=defects|trees``, seed 0,
                  ``--detector-epochs``), its boxes turned into answers by the data's own templates (no language
                  model); answers that state a number (counts, captions) use the score threshold whose detection
                  counts best match the training split's count answers (``baseline_threshold=count``: the detector
                  file's 0.25 over-counts trees tenfold; the row "detector, file threshold" keeps it everywhere),
                  boxes, kinds and yes/no the file's; scored on the same test instructions as each text run (the
                  run's ``baseline_detector=``), or alone on a seed's draw (``--arms detector``, no VLM trained)

Every arm reads the same frozen encoder (RepVGG-A0 pre-trained on the bundled textures, stride 16). The test is a
seeded draw of ``--limit-test`` instructions per task (the run's seed; the detector row is scored on each text run's
draw). Rows go to ``experiments/results/vlm_tasks.jsonl`` as each (source, arm, seed) finishes; ``--table`` writes
``vlm_tasks.md``. ``--llm tiny`` (a small random LLaMA) with a few ``--steps`` is a smoke run of the whole script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = Path(os.environ.get("FV_RUNS", "runs")) / "vlm_tasks"
ARMS = ("text", "text-random", "prior", "detector")
SOURCES = {"inspection": "defects", "trees": "trees"}  # the VLM's data name → the detector's
#: (task, metric) pairs of the table, in order; the metric names are ``score_answers``'
COLUMNS = (("refer", "acc"), ("identify", "acc"), ("vqa", "acc"), ("detection", "ap50"), ("caption", "acc"),
           ("caption", "category"), ("caption", "kinds"), ("caption", "count"), ("grounding", "acc"),
           ("all", "malformed"))
#: VQA per question type (``score_answers``' ``acc/<type>``), a second table per source
VQA_TYPES = ("category", "count", "defect", "kind")


def detector(source: str, epochs: int, threads: int) -> Path:
    """The source's YOLOv6-n model file, trained once (seed 0) and kept under ``runs/vlm_tasks``."""
    from frugalvision.pipelines.detection import DetectConfig, run_detect

    out = RUNS / f"detector-{source}-{epochs}"
    if not (out / "model.safetensors").is_file():
        run_detect(DetectConfig(action=["train"], data=SOURCES[source], model="yolov6_n", epochs=epochs,
                                out=str(out), overwrite=True, seed=0, progress=False, threads=threads))
    return out / "model.safetensors"


def run_text(source: str, arm: str, seed: int, args: argparse.Namespace, det: Path) -> dict:
    """Train and test one VLM; its scores and the detector + templates scores on the same test draw."""
    from frugalvision.pipelines.vlm import VLMConfig, run_vlm

    out = RUNS / f"{source}-{arm}-{args.llm}-s{seed}"
    cfg = VLMConfig(action=["train"], data=source, out=str(out), overwrite=True, seed=seed, steps=list(args.steps),
                    batch_size=8, threads=args.threads, progress=False, test_batch_size=16,
                    limit_test=args.limit_test, llm=args.llm, baseline_detector=str(det), baseline_threshold="count",
                    llm_init="random" if arm == "text-random" else "pretrained")
    res = run_vlm(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    systems = metrics["scores"][source]
    hist = json.loads((out / "history.json").read_text())
    return {"scores": systems["VLM"], "detector_scores": systems.get("detector + templates"),
            "train_s": res["train_seconds"], "answer_s": metrics["answer_seconds"],
            "test_instructions": metrics["test_instructions"], "steps": [s["steps"] for s in hist["stages"]],
            "trainable_m": max(s.get("trainable_params", 0) for s in hist["stages"]) / 1e6}


def _prior_key(inst: Any) -> tuple[str, str, str]:
    """What a blind answerer may condition on: the task, the question type, and the kind where the question names it."""
    return inst.task, inst.qtype, inst.label if inst.task in ("refer", "detection") else ""


def prior_answers(train: list, test: list) -> list[str]:
    """Each test instruction's answer from the training answers alone (see the module docstring's ``prior``)."""
    from collections import Counter

    from frugalvision.language.instructions import detection_answer

    answers: dict[tuple[str, str, str], Counter] = {}
    boxes: dict[tuple[str, str, str], list[list[float]]] = {}
    for i in train:
        answers.setdefault(_prior_key(i), Counter())[i.answer] += 1
        boxes.setdefault(_prior_key(i), []).extend(
            [b[0] / i.width, b[1] / i.height, b[2] / i.width, b[3] / i.height] for b in i.boxes)
    out = []
    for i in test:
        key = _prior_key(i)
        if key not in answers:
            raise SystemExit(f"prior: no training instruction of task {key[0]!r}, type {key[1]!r}, kind {key[2]!r}")
        common = answers[key].most_common(1)[0][0]
        if i.task in ("refer", "detection") and boxes[key]:
            m = np.mean(boxes[key], 0)
            box = [m[0] * i.width, m[1] * i.height, m[2] * i.width, m[3] * i.height]
            phrase = common.split("</p>")[0].removeprefix("<p>") if common.startswith("<p>") else i.label
            common = detection_answer(phrase, [box], i.width, i.height)
            if i.task == "refer":
                common = common.split("</p> ", 1)[1]
        out.append(common)
    return out


def _split(source: str, split: str, seed: int, limit: int = 0) -> list:
    """A source's instructions as ``frugalvision vlm`` builds them for ``seed`` (test: its seeded draw of ``limit``)."""
    from frugalvision.language.training import limit_per_task
    from frugalvision.pipelines.vlm import VLMConfig, vlm_data

    insts = vlm_data(source, None, split, VLMConfig(action=["test"], data=source, seed=seed), None)
    return limit_per_task(insts, limit, seed) if split == "test" else insts


def run_prior(source: str, seed: int, args: argparse.Namespace) -> dict:
    """The blind prior on the same seeded test draw as the text run of ``seed``."""
    from frugalvision.language.metrics import score_answers

    train, test = _split(source, "train", seed), _split(source, "test", seed, args.limit_test)
    scores = score_answers(test, prior_answers(train, test))
    return {"scores": scores, "detector_scores": None, "train_s": 0.0, "answer_s": 0.0,
            "test_instructions": len(test), "steps": [0, 0, 0], "trainable_m": 0.0}


def run_detector(source: str, seed: int, args: argparse.Namespace, det: Path) -> dict:
    """Detector + templates alone on the seeded test draw of ``seed`` (the same draw as that seed's text run)."""
    from frugalvision.language.metrics import score_answers
    from frugalvision.pipelines.vlm import detector_answer_sets

    test = _split(source, "test", seed, args.limit_test)
    t0 = time.perf_counter()
    file_answers, answers, note = detector_answer_sets(
        str(det), test, calibrate=[i for i in _split(source, "train", seed) if i.task == "vqa"])
    answer_s = round(time.perf_counter() - t0, 1)
    return {"scores": None, "detector_scores": score_answers(test, answers),
            "detector_file_scores": score_answers(test, file_answers), "detector_note": note, "train_s": None,
            "answer_s": answer_s, "test_instructions": len(test), "steps": None, "trainable_m": None}


def table(path: Path) -> str:
    """The markdown table: per source, one row per arm (mean ± std over seeds), one column per task metric."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = next((r for r in reversed(rows) if r["arm"] not in ("prior", "detector")), rows[-1] if rows else {})
    tiles = {r["tree_tile"] for r in rows if r.get("tree_tile")}
    caps = {r["tree_max_boxes"] for r in rows if r.get("tree_max_boxes")}
    out = ["# Every MiniGPT-v2 task: SmolLM2 VLM vs random-init LLM vs detector + templates vs a blind prior", "",
           f"Frozen encoder RepVGG-A0 (textures, stride 16) for every VLM; {head.get('llm', '?')}; steps per stage "
           f"{head.get('steps', '?')} (batch 8); test: a seeded draw of {head.get('limit_test', '?')} instructions "
           f"per task (each run's seed; the detector row is scored once per seed's draw, the prior on the same "
           f"draws, from the training answers alone); {head.get('machine', '?')}, {head.get('threads', '?')} "
           f"thread per job, {head.get('date', '?')}. Percentages; mean ± std over runs. `detection` is AP50; "
           "caption `acc` needs the defect kinds and their locations right (a defect-free tile: no defect named), "
           "`category` the surface, trees' `count` the number of trees; malformed: answers without the task's "
           "format." + (f" Trees: {tiles.pop()}-px tiles, at most {caps.pop()} boxes per `[detection]` answer (the "
                        "largest; the others neither hit nor miss)." if len(tiles) == 1 == len(caps) else ""),
           "`detector + templates` counts (count question, captions) at the score threshold whose counts best match "
           "the training count answers, and keeps the detector file's 0.25 for boxes, kinds and yes/no; "
           "`detector, file threshold` uses 0.25 everywhere.", ""]

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
        if not vals:
            return "—"
        return f"{np.mean(vals):.1f}" + (f" ± {np.std(vals):.1f}" if len(vals) > 1 else "")

    for source in dict.fromkeys(r["source"] for r in rows):
        out += [f"## {source}", "", "| arm | runs | train s | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |",
                "|---|---|---|" + "---|" * len(COLUMNS)]
        src = [r for r in rows if r["source"] == source]
        arms: dict[str, list[dict]] = {}
        for r in src:
            if r.get("scores") is not None:  # a detector-only row has none
                arms.setdefault(r["arm"], []).append(r["scores"])
        # one detector score per test draw: runs of the same seed share their draw (and so the detector's answers)
        dets = list({r["seed"]: r["detector_scores"] for r in src if r.get("detector_scores")}.values())
        if dets:
            arms["detector + templates"] = dets
        dets = list({r["seed"]: r["detector_file_scores"] for r in src if r.get("detector_file_scores")}.values())
        if dets:
            arms["detector, file threshold"] = dets
        for arm, ss in arms.items():
            train_s = [r["train_s"] for r in src if r["arm"] == arm and r.get("train_s") is not None]
            out.append(f"| {arm} | {len(ss)} | {np.mean(train_s):.0f} | " if train_s else f"| {arm} | {len(ss)} | — | ")
            out[-1] += " | ".join(ms([s.get(t, {}).get(m) for s in ss]) for t, m in COLUMNS) + " |"
        types = [t for t in VQA_TYPES if any(f"acc/{t}" in s.get("vqa", {}) for ss in arms.values() for s in ss)]
        if types:
            first = next(ss[0] for ss in arms.values() if "vqa" in ss[0])
            out += ["", f"VQA by question type ({source}; questions per type in the first run's draw: "
                    + ", ".join(f"{t} {first['vqa'].get(f'n/{t}', 0)}" for t in types)
                    + "; count MAE in trees or defects, not %):", "",
                    "| arm | " + " | ".join(f"{t} acc" for t in types) + " | count MAE |",
                    "|---|" + "---|" * (len(types) + 1)]
            for arm, ss in arms.items():
                mae = [s["vqa"]["count_mae"] for s in ss if s.get("vqa", {}).get("count_mae") is not None]
                out.append(f"| {arm} | " + " | ".join(ms([s.get("vqa", {}).get(f"acc/{t}") for s in ss])
                                                     for t in types)
                           + (f" | {np.mean(mae):.2f} |" if mae else " | — |"))
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", nargs=3, type=int, default=[60, 120, 60], help="align, multitask, mixed steps")
    ap.add_argument("--limit-test", type=int, default=40, help="test instructions per task (seeded draw)")
    ap.add_argument("--detector-epochs", type=int, default=30)
    ap.add_argument("--llm", default="smollm2", help="smollm2, or tiny for a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "vlm_tasks.jsonl"))
    ap.add_argument("--table", action="store_true", help="only write the .md table from the jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(table(out))
        print(out.with_suffix(".md").read_text())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    base = {"llm": args.llm, "steps": args.steps, "limit_test": args.limit_test, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    from frugalvision.pipelines.vlm import TREE_MAX_BOXES, TREE_TILE

    tiling = {"trees": {"tree_tile": TREE_TILE, "tree_max_boxes": TREE_MAX_BOXES}}
    for source in args.sources:
        needs_det = any(arm != "prior" for arm in args.arms)
        det = detector(source, args.detector_epochs, args.threads) if needs_det else Path()
        for arm in args.arms:
            for seed in args.seeds:
                t0 = time.perf_counter()
                if arm in ("prior", "detector"):
                    res = run_prior(source, seed, args) if arm == "prior" else run_detector(source, seed, args, det)
                else:
                    res = run_text(source, arm, seed, args, det)
                row = {**base, "source": source, "arm": arm, "seed": seed, **res, **tiling.get(source, {}),
                       "wall_s": round(time.perf_counter() - t0, 1)}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("scores")}), flush=True)


if __name__ == "__main__":
    main()

"""Our YOLOv6 detectors against torchvision's (and optionally ultralytics'), same data, input size and training time.

Every detector is trained from scratch (no pre-trained weights anywhere) on the same training set, letterboxed to
the same ``--img-size`` with the same augmentation, for the same wall-clock ``--budget`` (the schedule, warm-up +
cosine, is compressed to fit the budget: ``frugalvision.detect.train``), one after the other in this process on
``--device``. All are evaluated by the same COCO code (pycocotools via ``frugalvision.detect.coco_eval``) on the
same test set. Then, on the CPU, batch-1 latency at the input size of every model, side by side in interleaved
rounds (``frugalvision.bench.timing.interleaved``): PyTorch eager (ours fused with ``fv.fuse``) and ONNX Runtime
(ours: ``export_detector_onnx``, NMS in the graph; baselines: ``torch.onnx``), with the ratio to the fastest
baseline of the same backend.

    python benchmarks/detection_compare.py --data trees   [--budget 600] [--img-size 320] [--seeds 0 1 2]
    python benchmarks/detection_compare.py --data defects [--budget 600] [--img-size 128] [--device cuda]
    python benchmarks/detection_compare.py --data trees --quick          # smoke run: tiny budget, one seed

``--data trees``: the deepforest sample images split by region (first 70 % of every image's height to train,
the rest to test: no pixel in both), then each part cut into tiles of ``--img-size`` overlapping by ``--overlap``.
``--data defects``: the bundled inspection benchmark as boxes (``frugalvision.detect.datasets.defect_boxset``).

``--ultralytics /path/to/venv/bin/python`` adds ultralytics' YOLOv8n (AGPL: benchmark only, never imported here;
it runs in its own virtualenv through a subprocess). It trains from ``yolov8n.yaml`` (no pre-trained weights) with
its own recipe for the same budget (``time=`` in hours), predicts the test images, and its detections are scored
by our COCO code. Set up the venv with e.g.::

    python -m venv /tmp/ulvenv && /tmp/ulvenv/bin/pip install ultralytics onnx torch==2.14.1 torchvision==0.29.1

(``onnx`` only for its ONNX Runtime latency.) Its training log is kept beside the results (``*_ultralytics_log.txt``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from frugalvision.bench import count_flops, count_params, machine_info, result_header
from frugalvision.bench.timing import interleaved
from frugalvision.data.detection import BoxSet, DetectionDataset, split_by_region, tile_boxset, write_coco
from frugalvision.detect import create_detector
from frugalvision.detect.baselines import BASELINES, build_baseline, evaluate_baseline, fit_baseline, images_seen
from frugalvision.detect.coco_eval import coco_metrics
from frugalvision.detect.postprocess import postprocess
from frugalvision.detect.train import DetectTrainConfig, coco_results, evaluate_detector, fit_detector
from frugalvision.engine.trainer import resolve_device, seed_everything
from frugalvision.export import fuse
from frugalvision.utils.io import atomic_write_text

OURS = ("yolov6_n", "yolov6_s")
DEFAULT_SIZE = {"trees": 320, "defects": 128}
#: post-processing when timing (a deployment setting; evaluation uses conf 0.001, max_det 300)
LAT_CONF, LAT_IOU, LAT_MAX_DET = 0.25, 0.65, 100


# ------------------------------------------------------------------------------------------------ data
def load_data(name: str, img_size: int, overlap: int, quick: bool) -> tuple[BoxSet, BoxSet, str]:
    if name == "trees":
        from frugalvision.data.detection import load_deepforest

        train_region, test_region = split_by_region(load_deepforest(), 0.7)
        train = tile_boxset(train_region, img_size, overlap)
        test = tile_boxset(test_region, img_size, overlap)
        what = (f"deepforest tree crowns (4 aerial images, 1 class): the first 70 % of every image's height for "
                f"training, the rest for testing; both cut into {img_size} px tiles overlapping by {overlap} px")
    elif name == "defects":
        try:
            from frugalvision.detect.datasets import defect_boxset  # type: ignore[import-not-found]
        except ImportError as exc:
            raise SystemExit(f"--data defects needs frugalvision.detect.datasets.defect_boxset ({exc})") from None
        # boxes only: the instance masks would cost every model's data loading and serve none
        train, test = (BoxSet([replace(s, masks=None) for s in b.samples], list(b.class_names), name=b.name)
                       for b in (defect_boxset("train"), defect_boxset("test")))
        what = (f"the bundled inspection benchmark as boxes (defect_boxset train / test: {len(train.class_names)} "
                "defect kinds on 128 px tiles; test tiles without defects included)")
    else:
        raise SystemExit(f"unknown --data {name!r}")
    if quick:  # a few tiles with objects (and the tiles' own ids) keep the smoke run short
        train = _subset(train, 24)
        test = _subset(test, 12)
        what += "; --quick: a subset of tiles with objects"
    for boxset in (train, test):  # decode the images now, so that no model's budget pays for it
        for i in range(len(boxset)):
            boxset.read(i)
    return train, test, what


def _subset(boxset: BoxSet, n: int) -> BoxSet:
    with_boxes = [s for s in boxset.samples if len(s.boxes)]
    step = max(1, len(with_boxes) // n)
    return BoxSet(with_boxes[::step][:n], list(boxset.class_names), name=boxset.name)


# ------------------------------------------------------------------------------------------------ training
def train_config(a: argparse.Namespace, seed: int, batch_size: int) -> DetectTrainConfig:
    return DetectTrainConfig(img_size=a.img_size, epochs=a.epochs, time_budget_s=a.budget, batch_size=batch_size,
                             optimizer=a.optimizer, lr=a.lr, ema_tau=a.ema_tau, device=a.device, seed=seed,
                             num_workers=a.workers, progress=not a.no_progress)


def run_one(kind: str, name: str, seed: int, train: BoxSet, test: BoxSet, a: argparse.Namespace
            ) -> tuple[dict[str, Any], nn.Module]:
    """Train one detector for the budget, evaluate it; returns the record and the trained model (on the CPU)."""
    seed_everything(seed)
    k = len(train.class_names)
    cfg = train_config(a, seed, a.batch_size)
    print(f"== {name} seed {seed}: training for {a.budget:g} s on {a.device}", flush=True)
    if kind == "ours":
        model = create_detector(name, num_classes=k)
        res = fit_detector(model, train, cfg)
        t0 = time.perf_counter()
        m = evaluate_detector(res.model, test, a.img_size, batch_size=a.batch_size, device=a.device,
                              progress=cfg.progress)
    else:
        det = build_baseline(name, num_classes=k, img_size=a.img_size)
        res = fit_baseline(det, train, cfg)
        t0 = time.perf_counter()
        m = evaluate_baseline(res.model, test, a.img_size, batch_size=a.batch_size, device=a.device,
                              progress=cfg.progress)
    eval_s = time.perf_counter() - t0
    rec = {"model": name, "kind": kind, "seed": seed, "train_seconds": round(res.train_seconds, 1),
           "steps": res.steps, "epochs": round(res.epochs_done, 2),
           "images_seen": images_seen(res.steps, a.batch_size, len(train)), "eval_seconds": round(eval_s, 1),
           **{key: m[key] for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100")}}
    print(f"   AP {m['AP']:.2f}  AP50 {m['AP50']:.2f}  steps {res.steps}  ({res.train_seconds:.0f} s train, "
          f"{eval_s:.0f} s eval)", flush=True)
    return rec, res.model.cpu().eval()


# ------------------------------------------------------------------------------------------------ ultralytics
ULTRA_DRIVER = textwrap.dedent('''
    """Runs in the ultralytics virtualenv: train yolov8n from its yaml for a time budget, predict, export raw ONNX."""
    import json, sys, time
    from pathlib import Path

    import torch

    args = json.loads(Path(sys.argv[1]).read_text())
    from ultralytics import YOLO, settings

    settings.update({"sync": False})
    import ultralytics.utils.torch_utils as tu

    tu.NUM_THREADS = args["threads"]  # its CPU training sets this many torch threads: the same as ours
    torch.set_num_threads(args["threads"])
    out = {}
    model = YOLO(args["cfg"])
    clock = {"batches": 0, "start": None, "last": None}

    def on_batch_end(trainer):  # its training loop's own clock and step count (no setup, no final validation)
        clock["batches"] += 1
        clock["start"], clock["last"] = trainer.train_time_start, time.time()

    model.add_callback("on_train_batch_end", on_batch_end)
    t0 = time.perf_counter()
    model.train(data=args["data"], imgsz=args["imgsz"], epochs=args["epochs"], time=args["hours"],
                batch=args["batch"], workers=args["workers"], device=args["device"], pretrained=False, amp=False,
                plots=False, val=False, seed=args["seed"], deterministic=False, project=args["project"], name="train",
                exist_ok=True, verbose=False)
    out["train_wall_seconds"] = time.perf_counter() - t0
    trainer = model.trainer
    out["epochs"] = int(trainer.epoch) + 1
    out["batches_per_epoch"] = len(trainer.train_loader)
    out["steps"] = clock["batches"]
    out["train_seconds"] = clock["last"] - clock["start"] if clock["batches"] else 0.0
    weights = Path(trainer.save_dir) / "weights" / "last.pt"
    model = YOLO(str(weights))
    preds = []
    t0 = time.perf_counter()
    for item in args["test"]:
        r = model.predict(item["file"], imgsz=args["imgsz"], conf=args["conf"], iou=args["iou"],
                          max_det=args["max_det"], device=args["device"], verbose=False)[0]
        preds.append({"image_id": item["image_id"], "boxes": r.boxes.xyxy.cpu().tolist(),
                      "scores": r.boxes.conf.cpu().tolist(), "labels": r.boxes.cls.cpu().int().tolist()})
    out["eval_seconds"] = time.perf_counter() - t0
    out["predictions"] = preds
    net = model.model.float().cpu().eval()
    out["params"] = sum(p.numel() for p in net.parameters())
    x = torch.zeros(1, 3, args["imgsz"], args["imgsz"])
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    out["flops"] = int(fc.get_total_flops())

    class Raw(torch.nn.Module):  # (B, 4 + C, A): cx, cy, w, h in input pixels, then class scores
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            y = self.m(x)
            return y[0] if isinstance(y, (list, tuple)) else y

    try:
        torch.onnx.export(Raw(net), (x,), args["onnx"], dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["pred"])
        out["onnx"] = args["onnx"]
    except Exception as exc:
        out["onnx_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    Path(args["result"]).write_text(json.dumps(out))
''')


def export_yolo(boxset: BoxSet, root: Path, split: str) -> list[dict[str, Any]]:
    """Write every sample (a tile: its window of the image) as a PNG and a YOLO label file; returns the files."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    items = []
    for i, s in enumerate(boxset.samples):
        img = root / "images" / split / f"{s.image_id:06d}.png"
        Image.fromarray(boxset.read(i)).save(img)
        lines = []
        for (x1, y1, x2, y2), c in zip(s.boxes.tolist(), s.labels.tolist(), strict=True):
            lines.append(f"{c} {(x1 + x2) / 2 / s.width:.6f} {(y1 + y2) / 2 / s.height:.6f} "
                         f"{(x2 - x1) / s.width:.6f} {(y2 - y1) / s.height:.6f}")
        (root / "labels" / split / f"{s.image_id:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        items.append({"file": str(img), "image_id": s.image_id})
    return items


def run_ultralytics(python: str, train: BoxSet, test: BoxSet, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Train and predict in the ultralytics venv; score its detections with our COCO code."""
    root = tmp / "yolo_data"
    export_yolo(train, root, "train")
    test_items = export_yolo(test, root, "test")
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(train.class_names))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/test\nnames:\n{names}\n")
    driver = tmp / "ultra_driver.py"
    driver.write_text(ULTRA_DRIVER)
    args = {"cfg": "yolov8n.yaml", "data": str(root / "data.yaml"), "imgsz": a.img_size, "epochs": a.epochs,
            "hours": a.budget / 3600, "batch": a.batch_size, "seed": a.baseline_seeds[0],
            "device": "cpu" if resolve_device(a.device).type == "cpu" else "0", "project": str(tmp / "ultra_runs"),
            "conf": 0.001, "iou": 0.65, "max_det": 300, "test": test_items, "onnx": str(tmp / "yolov8n_raw.onnx"),
            "result": str(tmp / "ultra_result.json"), "threads": torch.get_num_threads(), "workers": a.workers}
    (tmp / "ultra_args.json").write_text(json.dumps(args))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp / "ultra_config"), "YOLO_VERBOSE": "True"}
    env.pop("PYTHONPATH", None)
    print(f"== ultralytics yolov8n: training for {a.budget:g} s in {python}", flush=True)
    log = tmp / "ultra_log.txt"
    try:
        with log.open("w") as f:
            proc = subprocess.run([python, str(driver), str(tmp / "ultra_args.json")], env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=3 * a.budget + 900, cwd=tmp)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    text = log.read_text(errors="replace")
    downloads = sorted({ln.strip()[:160] for ln in text.splitlines() if "Downloading" in ln or "download" in ln})
    if proc.returncode != 0 or not Path(args["result"]).is_file():
        tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-6:])
        return {"error": f"exit {proc.returncode}: {tail[-600:]}", "downloads": downloads, "log": text}
    out = json.loads(Path(args["result"]).read_text())
    dets = [{"image_id": p["image_id"], "boxes": torch.tensor(p["boxes"]).reshape(-1, 4),
             "scores": torch.tensor(p["scores"]), "labels": torch.tensor(p["labels"], dtype=torch.int64)}
            for p in out["predictions"]]
    with tempfile.TemporaryDirectory() as gt_dir:
        gt = json.loads(write_coco(test, Path(gt_dir) / "gt.json").read_text())
    m = coco_metrics(gt, coco_results(test, dets))
    steps = int(out["steps"])
    return {"model": "ultralytics yolov8n", "kind": "ultralytics", "seed": args["seed"],
            "train_seconds": round(out["train_seconds"], 1), "train_wall_seconds": round(out["train_wall_seconds"], 1),
            "steps": steps, "epochs": round(steps / max(1, out["batches_per_epoch"]), 2),
            "images_seen": images_seen(steps, a.batch_size, len(train)), "eval_seconds": round(out["eval_seconds"], 1),
            "params": out["params"], "flops": out["flops"], "onnx": out.get("onnx"),
            "onnx_error": out.get("onnx_error"), "downloads": downloads, "log": text,
            **{key: m[key] for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100")}}


# ------------------------------------------------------------------------------------------------ latency
class _OnnxBaseline(nn.Module):
    """A baseline with one image in, its detections as tensors out (what ``torch.onnx`` can trace)."""

    def __init__(self, det: nn.Module) -> None:
        super().__init__()
        self.det = det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.det.model([x[0]])[0]
        return d["boxes"], d["scores"], d["labels"] - self.det.label_offset


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _parity_problem(ref: list[np.ndarray], got: list[np.ndarray], box_atol: float = 0.5,
                    min_match: float = 0.9) -> str | None:
    """None when the graph gives eager's detections: the same count and sorted scores, and at least ``min_match``
    of eager's boxes found among the graph's (same label, score within 1e-4, box within ``box_atol`` px). The rest
    may differ where candidates tie in score (a barely trained model): NMS then keeps either."""
    if len(ref[1]) != len(got[1]):
        return f"{len(got[1])} vs {len(ref[1])} detections"
    if not len(ref[1]):
        return None
    gap = float(np.abs(np.sort(ref[1]) - np.sort(got[1])).max())
    if gap > 1e-4:
        return f"scores differ by up to {gap:.3g}"
    found = [bool(((np.abs(got[1] - score) < 1e-4) & (got[2] == label)
                   & (np.abs(got[0] - box).max(-1) <= box_atol)).any()) for box, score, label in zip(*ref, strict=True)]
    if np.mean(found) < min_match:
        return f"only {np.mean(found):.0%} of the eager boxes are in the graph's detections"
    return None


def export_baseline_onnx(det: nn.Module, x: torch.Tensor, path: Path, threads: int) -> Callable[[], Any]:
    """``torch.onnx`` export of a baseline, checked against eager on ``x``; returns the onnxruntime call."""
    from frugalvision.export.onnx import OrtRunner

    wrapper = _OnnxBaseline(det).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["boxes", "scores", "labels"])
        ref = wrapper(x)
    runner = OrtRunner(path, threads=threads)
    arr = x.numpy()
    got = runner(arr)
    problem = _parity_problem([t.numpy() for t in ref], got)
    if problem:
        raise RuntimeError(f"the graph disagrees with eager: {problem}")
    return lambda: runner(arr)


def ultra_ort(path: str, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    """onnxruntime on ultralytics' raw graph + our NMS (its output: cx, cy, w, h, then class scores)."""
    from frugalvision.export.onnx import OrtRunner

    runner = OrtRunner(path, threads=threads)
    arr = x.numpy()

    def run() -> Any:
        pred = torch.from_numpy(runner(arr)[0]).transpose(1, 2)
        cxcy, wh = pred[..., :2], pred[..., 2:4]
        pred = torch.cat((cxcy - wh / 2, cxcy + wh / 2, pred[..., 4:]), -1)
        return postprocess(pred, LAT_CONF, LAT_IOU, LAT_MAX_DET)

    return run


def measure_cpu(kept: dict[str, tuple[str, nn.Module]], test: BoxSet, a: argparse.Namespace, tmp: Path,
                ultra: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], list[str], float]:
    """Params, GFLOPs and interleaved batch-1 CPU latencies (eager and onnxruntime) of one model per name.

    Returns the per-model figures, notes on what could not be measured, and the seconds spent before timing.
    """
    from frugalvision.detect.onnx_export import OrtDetector, export_detector_onnx

    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    ds = DetectionDataset(test, a.img_size)
    idx = next((i for i, s in enumerate(test.samples) if len(s.boxes)), 0)
    x = ds[idx][0][None]
    notes: list[str] = []
    info: dict[str, dict[str, Any]] = {}
    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, (kind, model) in kept.items():
        row: dict[str, Any] = {"kind": kind, "params_train": count_params(model)}
        if kind == "ours":
            deploy = fuse(model, x)
            fns[(name, "eager")] = lambda m=deploy: postprocess(m(x), LAT_CONF, LAT_IOU, LAT_MAX_DET)
            try:
                path = tmp / f"{name}.onnx"
                export_detector_onnx(deploy, path, (a.img_size, a.img_size), LAT_CONF, LAT_IOU, LAT_MAX_DET,
                                     dynamic=False, check_images=x)  # timed at one size only
                ort = OrtDetector(path, threads=a.threads)
                fns[(name, "onnxruntime")] = lambda o=ort: o(x)
            except Exception as exc:  # any exporter failure is reported, not fatal
                notes.append(f"{name}: no ONNX Runtime latency: export_detector_onnx failed ({_first_line(exc)}).")
        else:
            deploy = model
            deploy.set_postprocess(conf_thres=LAT_CONF, max_det=LAT_MAX_DET)
            fns[(name, "eager")] = lambda m=deploy: m(x)
            try:
                fns[(name, "onnxruntime")] = export_baseline_onnx(deploy, x, tmp / f"{name}.onnx", a.threads)
            except Exception as exc:
                notes.append(f"{name}: no ONNX Runtime latency: torch.onnx export or its check failed "
                             f"({_first_line(exc)}).")
        row["params"] = count_params(deploy)
        row["flops"] = count_flops(deploy, x)
        info[name] = row
    if ultra and "error" not in ultra:
        info[ultra["model"]] = {"kind": "ultralytics", "params": ultra["params"], "params_train": ultra["params"],
                                "flops": ultra["flops"]}
        if ultra.get("onnx"):
            try:
                fns[(ultra["model"], "onnxruntime")] = ultra_ort(ultra["onnx"], x, a.threads)
            except Exception as exc:
                notes.append(f"ultralytics: no ONNX Runtime latency ({_first_line(exc)}).")
        else:
            notes.append(f"ultralytics: no ONNX Runtime latency: its raw export failed ({ultra.get('onnx_error')}).")
        notes.append("ultralytics: no eager latency (it runs in its own virtualenv, outside these interleaved "
                     "rounds); its ONNX Runtime time is its raw graph plus our NMS (postprocess).")
    setup_seconds = time.perf_counter() - t0
    print(f"== CPU latency: {len(fns)} model/backend pairs, {a.rounds} interleaved rounds", flush=True)
    times = interleaved(fns, rounds=a.rounds, warmup=a.warmup, inference=True)
    for (name, backend), ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else [ms[0], 0, ms[-1]]
        info[name][backend] = {"ms": statistics.median(ms), "iqr_ms": q[2] - q[0]}
    for backend in ("eager", "onnxruntime"):
        base = [r[backend]["ms"] for r in info.values() if r["kind"] == "baseline" and backend in r]
        for r in info.values():
            if backend in r and base:
                r[backend]["vs_best_baseline"] = min(base) / r[backend]["ms"]
    return info, notes, setup_seconds


# ------------------------------------------------------------------------------------------------ report
def _mean_std(xs: list[float], fmt: str = "{:.2f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def summarise(runs: list[dict[str, Any]], lat: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == name]
        info = lat.get(name, {})
        row: dict[str, Any] = {"model": name, "kind": rs[0]["kind"], "seeds": [r["seed"] for r in rs]}
        for key in ("AP", "AP50", "AP75", "AR100", "train_seconds", "steps", "images_seen", "epochs"):
            vals = [float(r[key]) for r in rs]
            row[key] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        row["params_m"] = info["params"] / 1e6 if "params" in info else None
        row["params_train_m"] = info["params_train"] / 1e6 if "params_train" in info else None
        row["gflops"] = info["flops"] / 1e9 if "flops" in info else None
        for backend in ("eager", "onnxruntime"):
            row[backend] = info.get(backend)
        rows.append(row)
    return rows


def _lat_cell(v: dict[str, Any] | None) -> tuple[str, str]:
    if not v:
        return "—", "—"
    ratio = v.get("vs_best_baseline")
    return f"{v['ms']:.1f} ± {v['iqr_ms']:.1f}", f"{ratio:.2f}x" if ratio else "—"


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], header: str) -> str:
    lines = [header.rstrip("\n"), "",
             "| model | seeds | AP | AP50 | train (s) | steps | images seen | CPU eager b1 (ms) | vs best baseline "
             "| CPU ORT b1 (ms) | vs best baseline | params (M) | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rs = [x for x in runs if x["model"] == r["model"]]
        e, er = _lat_cell(r["eager"])
        o, orr = _lat_cell(r["onnxruntime"])
        params = f"{r['params_m']:.2f}" if r["params_m"] is not None else "—"
        if r["params_train_m"] is not None and r["params_m"] is not None and \
                abs(r["params_train_m"] - r["params_m"]) > 5e-3:
            params = f"{r['params_train_m']:.2f} → {r['params_m']:.2f}"
        gflops = f"{r['gflops']:.2f}" if r["gflops"] is not None else "—"
        lines.append(f"| {r['model']} | {len(rs)} | {_mean_std([x['AP'] for x in rs])} | "
                     f"{_mean_std([x['AP50'] for x in rs])} | {_mean_std([x['train_seconds'] for x in rs], '{:.0f}')} "
                     f"| {_mean_std([x['steps'] for x in rs], '{:.0f}')} | "
                     f"{_mean_std([x['images_seen'] for x in rs], '{:.0f}')} | {e} | {er} | {o} | {orr} | {params} | "
                     f"{gflops} |")
    lines += ["", "## Every run", "",
              "| model | seed | AP | AP50 | AP75 | AR100 | train (s) | steps | epochs | images seen | eval (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['seed']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | "
                     f"{r['AR100']:.2f} | {r['train_seconds']:.0f} | {r['steps']} | {r['epochs']} | "
                     f"{r['images_seen']} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def estimate_full(runs: list[dict[str, Any]], rows: list[dict[str, Any]], n_test: int, img_size: int,
                  setup_seconds: float, full_test: int, full_size: int) -> str:
    """Rough wall time of the full default run, scaled from what this run measured (compute ~ pixels)."""
    n_runs = len(OURS) * 3 + len(BASELINES)
    budget, rounds, warmup = 600.0, 30, 3
    scale = (full_size / img_size) ** 2
    per_img = statistics.mean(r["eval_seconds"] / max(1, n_test) for r in runs) if runs else 0.5
    eval_s = n_runs * per_img * full_test * scale
    one_round = sum(r[b]["ms"] for r in rows for b in ("eager", "onnxruntime") if r.get(b)) / 1e3 * scale
    lat_s = setup_seconds * scale + (rounds + warmup) * one_round * (len(OURS) + len(BASELINES)) / max(1, len(rows))
    total = n_runs * budget + eval_s + lat_s + 60
    return (f"estimated full run (--budget {budget:.0f}: {len(OURS)} models x 3 seeds + {len(BASELINES)} baselines "
            f"= {n_runs} trainings): {n_runs} x {budget:.0f} s training + ~{eval_s / 60:.0f} min evaluation + "
            f"~{lat_s / 60:.0f} min latency ≈ {total / 3600:.1f} h on this machine (evaluation is faster on a GPU; "
            "--ultralytics adds one more --budget + its evaluation)")


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("trees", "defects"), default="trees")
    p.add_argument("--budget", type=float, default=None, help="training seconds per run (default 600; --quick 6)")
    p.add_argument("--img-size", type=int, default=None, help="trees: 320 (tile size), defects: 128; --quick: 128")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (trees)")
    p.add_argument("--models", nargs="+", default=None, help=f"ours (default {' '.join(OURS)}; --quick: yolov6_n)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds of ours (default 0 1 2; --quick 0)")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES))
    p.add_argument("--baseline-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--device", default="cpu", help="training and evaluation device (cpu, cuda); latency: CPU")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers for every model (ultralytics too). On a GPU use several: with 0 the "
                        "training of every model is bound by data loading in the main process")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=1000, help="planned epochs (the budget ends the run first)")
    p.add_argument("--ema-tau", type=float, default=2000.0)
    p.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads for the CPU latency")
    p.add_argument("--train-threads", type=int, default=None,
                   help="torch threads while training, the same for every model (default: torch's default). On a "
                        "CPU shared with other jobs use fewer threads than cores: spinning thread pools then slow "
                        "training by orders of magnitude")
    p.add_argument("--rounds", type=int, default=None, help="interleaved latency rounds (default 30; --quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ultralytics", default=None, help="python of a virtualenv with ultralytics (optional)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, one seed, a subset of the data")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None,
                   help="output stem (default benchmarks/results/detection_<data>; --quick: in the temp folder)")
    p.add_argument("--note", default="", help="a line on the conditions of the run (machine load ...)")
    a = p.parse_args()
    q = a.quick
    a.budget = a.budget if a.budget is not None else (6.0 if q else 600.0)
    a.img_size = a.img_size or (128 if q else DEFAULT_SIZE[a.data])
    a.models = a.models or (["yolov6_n"] if q else list(OURS))
    a.seeds = a.seeds if a.seeds is not None else ([0] if q else [0, 1, 2])
    a.rounds = a.rounds or (3 if q else 30)
    a.warmup = 1 if q and a.warmup == 3 else a.warmup
    a.batch_size = min(a.batch_size, 8) if q else a.batch_size
    if a.overlap >= a.img_size:
        raise SystemExit(f"--overlap {a.overlap} must be smaller than the tile (--img-size {a.img_size})")
    # a smoke run's tables stay out of benchmarks/results unless --out says otherwise
    out = Path(a.out or (Path(tempfile.gettempdir()) / f"detection_{a.data}_quick" if q
                         else f"benchmarks/results/detection_{a.data}"))
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    dev = resolve_device(a.device)
    if a.train_threads:
        torch.set_num_threads(a.train_threads)
    a.train_threads = torch.get_num_threads()
    info = machine_info(dev)
    t_start = time.perf_counter()

    if dev.type == "cuda":  # the CUDA context, once, before any model's clock starts
        torch.zeros(1, device=dev)
        torch.cuda.synchronize(dev)
    train, test, what = load_data(a.data, a.img_size, a.overlap, q)
    print(f"data: {len(train)} train samples ({train.num_boxes()} boxes), {len(test)} test samples "
          f"({test.num_boxes()} boxes), {len(train.class_names)} classes", flush=True)
    n_train = len(a.models) * len(a.seeds) + len(a.baselines) * len(a.baseline_seeds) + bool(a.ultralytics)
    print(f"this run: {n_train} trainings x {a.budget:g} s = {n_train * a.budget / 60:.0f} min of training, plus "
          "evaluation and the CPU latency rounds", flush=True)
    runs: list[dict[str, Any]] = []
    kept: dict[str, tuple[str, nn.Module]] = {}
    for name in a.models:
        for seed in a.seeds:
            rec, model = run_one("ours", name, seed, train, test, a)
            runs.append(rec)
            kept.setdefault(name, ("ours", model))
            _free(dev)
    for name in a.baselines:
        for seed in a.baseline_seeds:
            rec, model = run_one("baseline", name, seed, train, test, a)
            runs.append(rec)
            kept.setdefault(name, ("baseline", model))
            _free(dev)
    with tempfile.TemporaryDirectory(prefix="fv-detcmp-") as tmp_name:
        tmp = Path(tmp_name)
        ultra = None
        ultra_note = None
        if a.ultralytics:
            ultra = run_ultralytics(a.ultralytics, train, test, a, tmp)
            if ultra.get("log"):
                atomic_write_text(out.parent / f"{out.name}_ultralytics_log.txt", ultra.pop("log"))
            if "error" in ultra:
                ultra_note = f"ultralytics did not run: {ultra['error']}"
                print(ultra_note, flush=True)
            else:
                runs.append({k: v for k, v in ultra.items() if k not in ("params", "flops", "onnx", "onnx_error",
                                                                          "downloads", "train_wall_seconds")})
                print(f"   AP {ultra['AP']:.2f}  AP50 {ultra['AP50']:.2f}  epochs {ultra['epochs']}", flush=True)
        lat, lat_notes, setup_seconds = measure_cpu(kept, test, a, tmp, ultra)
    rows = summarise(runs, lat)

    k = len(train.class_names)
    ssd_note = ("ssdlite320_mobilenet_v3_large runs at the same input size (its fixed 320x320 resize set to "
                f"{a.img_size}x{a.img_size}; its default boxes are relative, its network fully convolutional)")
    notes = [
        f"Data: {what}. Train: {len(train)} samples, {train.num_boxes()} boxes; test: {len(test)} samples, "
        f"{test.num_boxes()} boxes; {k} class(es).",
        f"Training: every model from scratch (no pre-trained weights), {a.budget:g} s of wall-clock training each "
        f"on {info.device if dev.type == 'cuda' else 'the CPU'} with {a.train_threads} torch thread(s), one after "
        "the other in one process; the same "
        f"letterboxed {a.img_size} px images, augmentation, {a.workers} DataLoader worker(s), batch size "
        f"{a.batch_size}, optimiser ({a.optimizer}, "
        f"lr {a.lr:g}), warm-up + cosine schedule fitted to the budget, EMA of the weights (tau {a.ema_tau:g}) "
        "and gradient clipping (frugalvision.detect.train / detect.baselines). Ours: seeds "
        f"{' '.join(map(str, a.seeds))} (mean ± std); baselines: seed(s) {' '.join(map(str, a.baseline_seeds))}.",
        "Baselines (torchvision, weights=None, weights_backbone=None): each model's own resize made a no-op at "
        f"{a.img_size} px (Faster R-CNN and RetinaNet: min_size = max_size = {a.img_size}; {ssd_note}); their own "
        "normalisation, anchors, losses and NMS IoU (0.5; SSDlite 0.55); labels 1..K with a background class "
        f"for Faster R-CNN and SSDlite (num_classes {k + 1}), 0..K-1 for RetinaNet (sigmoid, num_classes {k}).",
        "Metrics: COCO AP (IoU 0.50:0.95) and AP50 in percent, pycocotools on the test samples in their own pixels, "
        "the same code for every model; detections with score > 0.001, at most 300 per image (ours: NMS IoU 0.65).",
        f"CPU latency: batch 1, one letterboxed {a.img_size} px test image, {a.threads} thread(s), median ± IQR of "
        f"{a.rounds} interleaved rounds after {a.warmup} warm-up calls, each model with its post-processing (score "
        f"> {LAT_CONF}, at most {LAT_MAX_DET} detections; ours: fv.fuse'd, then postprocess / the NMS inside the "
        "ONNX graph of export_detector_onnx). 'vs best baseline': the fastest baseline's time / this time, per "
        "backend (> 1: faster than the best baseline).",
        "Params: of the deployed model (ours: trained → fused). GFLOPs: batch 1 at the input size, counted by "
        "torch.utils.flop_counter (a multiply-add is 2 FLOPs; convolutions, matmuls and linear layers; NMS, "
        "RoIAlign and box decoding are not counted); ours fused, baselines with their own transform and heads.",
    ]
    if a.note:
        notes.insert(0, a.note)
    if ultra_note:
        notes.append(ultra_note)
    elif ultra:
        dl = f" Download attempts in its log: {'; '.join(ultra['downloads'])[:400]}." if ultra["downloads"] else ""
        notes.append("ultralytics yolov8n (AGPL; in its own virtualenv, never imported here): trained from "
                     f"yolov8n.yaml with pretrained=False, amp=False, plots=False, val=False, time={a.budget:g} s "
                     "and its own recipe (mosaic, optimiser 'auto', its schedule), offline (YOLO_OFFLINE=1); its "
                     "predictions (conf 0.001, IoU 0.65, max_det 300) of its last (EMA) weights scored by our COCO "
                     f"code; {a.train_threads} torch thread(s) as ours. Train time: from its trainer's start to "
                     "its last step (its budget also covers the "
                     f"validation it runs on the test split at its final epoch(s), which it uses for nothing here); "
                     f"model.train() took {ultra['train_wall_seconds']:.0f} s in all.{dl}")
    notes += lat_notes
    header = result_header(f"Detection from scratch at equal training time: {a.data}, {a.img_size} px", info,
                           command, notes=notes)
    atomic_write_text(out.with_suffix(".md"), markdown(rows, runs, header))
    atomic_write_text(out.with_suffix(".json"), json.dumps(_clean(
        {"title": f"detection_{a.data}", "machine": info.line(), "command": command, "settings": vars(a),
         "notes": notes, "rows": rows, "runs": runs}), indent=1))
    print(markdown(rows, runs, header))
    print(f"wrote {out.with_suffix('.md')} and .json in {(time.perf_counter() - t_start) / 60:.1f} min")
    if q:
        full_train, full_test, _ = load_data(a.data, DEFAULT_SIZE[a.data], a.overlap, False)
        print(estimate_full(runs, rows, len(test), a.img_size, setup_seconds, len(full_test), DEFAULT_SIZE[a.data]))
        print(f"(full data: {len(full_train)} train / {len(full_test)} test samples at {DEFAULT_SIZE[a.data]} px)")


def _clean(x: Any) -> Any:
    """JSON-able values, NaN as null (COCOeval's -1: no object of that size)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x if isinstance(x, str | int | float | bool | type(None)) else str(x)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

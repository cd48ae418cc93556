"""fp32 vs bf16 vs int8 on every model family: speed side by side, accuracy on models trained here.

Two tables, one run:

* **Accuracy** (trained models, held-out data): classifiers trained here on the bundled real textures at 224 px
  (``--epochs`` epochs from scratch, cached), the demo's segmenter (``frugalvision demo``, cached), a PatchCore
  model of the bundled ``brick`` category and a YOLOv6-N trained on deepforest's aerial trees (320 px,
  ``--detector-budget`` seconds, cached). Each is exported with ``frugalvision export precision=int8`` (QDQ,
  per-channel weights, minmax calibration on 64 images of its own training data) and evaluated in fp32 eager,
  bf16 eager (autocast), int8 onnxruntime and int8 OpenVINO (the same file), and bf16 OpenVINO: the task metric and
  the agreement with fp32 (top-1 for classifiers, per pixel for the segmenter, image-score correlation for
  PatchCore, box recall at the deployed thresholds for the detector).
* **Speed** (:func:`frugalvision.bench.benchmark`, interleaved rounds, ratios against the first row of each group):
  fp32 eager, bf16 eager, fp32/int8 onnxruntime, fp32/bf16/int8 OpenVINO, batch 1 latency and batch-N
  throughput, each row's achieved throughput against the measured peak of its precision. The classifier group
  starts with the official FasterViT-0 (``fastervit`` package, eager fp32), the reference of the issue's goal.

    python benchmarks/precision.py [--threads 2] [--epochs 3] [--batch 32] [--out benchmarks/results/precision]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import frugalvision  # noqa: F401  (registers our architectures)
from frugalvision.bench import benchmark, result_header, results_to_markdown
from frugalvision.data.bundled import cache_dir
from frugalvision.export import reparameterize_model
from frugalvision.pipelines.model_file import (
    TASK_JOBS,
    EvalConfig,
    ExportConfig,
    _OnnxAnomalyModel,
    _OnnxDetector,
    _OnnxImageModel,
    _Recorder,
    detection_agreement,
    export_model_file,
    int8_scope_of,
    with_precision,
)
from frugalvision.utils.io import atomic_write_text
from frugalvision.weights import MODEL_KINDS, load_model_file

ALL_VARIANTS = ["fp32 eager", "bf16 eager", "int8 onnxruntime", "int8 OpenVINO", "bf16 OpenVINO",
                "int8 ORT, first+last also int8", "int8 ORT, unfused graph",
                "int8 ORT, whole graph"]
CLASSIFIERS = ["fastervit_0", "efficientmod_xxs", "efficientmod_s", "efficientformerv2_s0", "efficientformerv2_s2",
               "repvgg_a0"]


def trained_classifier(name: str, epochs: int, img_size: int = 224) -> Path:
    """A classifier of ``name`` trained on the bundled textures (cached per setting); its model file."""
    from frugalvision.pipelines.classification import ClassifyConfig, train_classifier

    folder = cache_dir() / "precision" / f"{name}-textures-e{epochs}-i{img_size}"
    if not (folder / "model.safetensors").is_file():
        print(f"training {name} on textures at {img_size} px, {epochs} epochs", file=sys.stderr, flush=True)
        train_classifier(ClassifyConfig(model=name, data="textures", img_size=img_size, epochs=epochs,
                                        batch_size=32, lr=2e-3, warmup_epochs=0.5, label_smoothing=0.1, seed=0,
                                        output_dir=folder, overwrite=True, progress=False))
    return folder / "model.safetensors"


def demo_segmenter() -> Path:
    from frugalvision.pipelines.demo import DemoConfig, run_demo

    folder = cache_dir() / "precision" / "demo"
    if not (folder / "segmenter" / "model.safetensors").is_file():
        print("running the demo for its segmenter", file=sys.stderr, flush=True)
        run_demo(DemoConfig(out_dir=str(folder), overwrite=True))
    return folder / "segmenter" / "model.safetensors"


def patchcore_model() -> Path:
    from frugalvision.pipelines.anomaly import AnomalyConfig, run_anomaly

    folder = cache_dir() / "precision" / "patchcore"
    if not (folder / "brick" / "model.safetensors").is_file():
        print("fitting PatchCore on brick", file=sys.stderr, flush=True)
        run_anomaly(AnomalyConfig(action=["fit"], categories=["brick"], out=str(folder), overwrite=True,
                                  progress=False))
    return folder / "brick" / "model.safetensors"


def trees_detector(budget: float) -> Path:
    """YOLOv6-N trained on deepforest's aerial trees at 320 px for ``budget`` seconds (cached); its model file."""
    from frugalvision.pipelines.detection import DetectConfig, run_detect

    folder = cache_dir() / "precision" / f"yolov6_n-trees-b{budget:g}"
    if not (folder / "model.safetensors").is_file():
        print(f"training yolov6_n on trees for {budget:g} s", file=sys.stderr, flush=True)
        run_detect(DetectConfig(action=["train"], data="trees", model="yolov6_n", epochs=100, budget=budget,
                                out=str(folder), overwrite=True, seed=0, progress=False))
    return folder / "model.safetensors"


def accuracy_rows(label: str, model_file: Path, tmp: Path) -> dict:
    """The task metric per precision/runtime and the agreement with fp32 eager, on the held-out data."""
    model, info = load_model_file(model_file)
    model = reparameterize_model(model.eval())
    task = MODEL_KINDS[info["kind"]].task
    jobs = TASK_JOBS[task]
    int8 = tmp / f"{model_file.parent.name}.int8.onnx"
    t0 = time.perf_counter()
    exp = export_model_file(ExportConfig(model_file=str(model_file), out=str(int8), precision="int8",
                                         accuracy_check=False, overwrite=True))
    quant_s = time.perf_counter() - t0
    fp32_onnx = tmp / f"{model_file.parent.name}.fp32.onnx"
    export_model_file(ExportConfig(model_file=str(model_file), out=str(fp32_onnx), overwrite=True))
    wrap = {"anomaly": _OnnxAnomalyModel, "detection": _OnnxDetector}.get(task, _OnnxImageModel)
    ecfg = EvalConfig(model_file=str(model_file), device="cpu", progress=False)
    variants = {"fp32 eager": lambda: model, "bf16 eager": lambda: with_precision(model, "bf16"),
                "int8 onnxruntime": lambda: wrap(int8, "onnxruntime"),
                "int8 OpenVINO": lambda: wrap(int8, "openvino"),
                "bf16 OpenVINO": lambda: _bf16_openvino(wrap, fp32_onnx)}
    # ablations of the int8 recipe (onnxruntime): every layer in int8; the unfused (multi-branch) graph
    all_int8 = tmp / f"{model_file.parent.name}.int8-all.onnx"
    export_model_file(ExportConfig(model_file=str(model_file), out=str(all_int8), precision="int8",
                                   keep_first_last=False, accuracy_check=False, overwrite=True))
    variants["int8 ORT, first+last also int8"] = lambda: wrap(all_int8, "onnxruntime")
    if int8_scope_of(jobs, info) is not None:  # a kind whose default int8 scope is a submodule: the whole graph
        whole = tmp / f"{model_file.parent.name}.int8-whole.onnx"
        export_model_file(ExportConfig(model_file=str(model_file), out=str(whole), precision="int8", int8_scope="all",
                                       accuracy_check=False, overwrite=True))
        variants["int8 ORT, whole graph"] = lambda: wrap(whole, "onnxruntime")
    if "repvgg" in label:
        unfused = tmp / f"{model_file.parent.name}.int8-unfused.onnx"
        export_model_file(ExportConfig(model_file=str(model_file), out=str(unfused), precision="int8",
                                       reparameterize=False, accuracy_check=False, overwrite=True))
        variants["int8 ORT, unfused graph"] = lambda: wrap(unfused, "onnxruntime")
    out: dict = {"model": label, "task": task, "quantization": exp.get("quantization"), "quantize_s": quant_s,
                 "variants": {}}
    ref_seen = None
    for name, make in variants.items():
        rec = _Recorder(make())
        metrics = jobs.evaluate(rec, info, ecfg)
        seen = rec.seen if task == "detection" else torch.cat(rec.seen)
        if ref_seen is None:
            ref_seen = seen
            out["data"], out["images"] = metrics.get("data") or info.get("data"), metrics.get("images")
        boxes = {}
        if task == "anomaly":
            agree = float(torch.corrcoef(torch.stack([ref_seen, seen]))[0, 1])
        elif task == "detection":  # at the deployed thresholds: the share of fp32's detections reproduced
            boxes = detection_agreement(ref_seen, seen, float(info.get("conf_thres", 0.25)),
                                        float(info.get("iou_thres", 0.65)))
            agree = boxes["box_recall"]
        else:
            agree = float((seen == ref_seen).float().mean())
        keep = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k in ("acc1", "mIoU", "pixel_AUROC", "image_AUROC", "AUPRO", "defect_IoU", "pixel_F1_max",
                          "AP", "AP50")}
        out["variants"][name] = {**keep, "agreement": agree, **({"boxes": boxes} if boxes else {})}
        print(f"{label} {name}: {keep} agreement {agree:.4f}", file=sys.stderr, flush=True)
    out["variants"] = {k: out["variants"].get(k, {}) for k in ALL_VARIANTS}
    return out


def _bf16_openvino(wrap, fp32_onnx: Path):
    """The fp32 graph run by OpenVINO at bf16 inference precision."""
    from frugalvision.export import OpenVinoRunner

    m = wrap(fp32_onnx, "onnxruntime")
    m.runner = OpenVinoRunner(m._graph(fp32_onnx), precision="bf16")  # a detector's graph without its NMS
    m.runtime = "openvino"
    return m


def _anomaly_size(info: dict) -> int:
    from frugalvision.pipelines.anomaly import anomaly_spec

    return int(anomaly_spec(info).img_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--throughput-repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(CLASSIFIERS))
    p.add_argument("--img-size", type=int, default=224, help="classifiers' training and benchmark resolution")
    p.add_argument("--skip-inspection", action="store_true", help="classifiers only")
    p.add_argument("--detector-budget", type=float, default=420.0, help="seconds of YOLOv6-N training on trees")
    p.add_argument("--out", default="benchmarks/results/precision")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    names = [n for n in a.models.split(",") if n]
    files = {n: trained_classifier(n, a.epochs, a.img_size) for n in names}
    if not a.skip_inspection:
        files["demo segmenter (ours:repvgg_a0, 128 px)"] = demo_segmenter()
        files["PatchCore (brick)"] = patchcore_model()
        files[f"YOLOv6-N (trees, {a.detector_budget:g} s)"] = trees_detector(a.detector_budget)
    tmp = Path(tempfile.mkdtemp(prefix="fv-precision-"))
    accuracy = [accuracy_rows(label, f, tmp) for label, f in files.items()]

    # ---- speed: classifiers at 224 with the official FasterViT-0 first; then each inspection model on its own
    torch.manual_seed(0)
    groups: list[tuple[str, dict, int, dict, dict]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastervit.models.faster_vit import faster_vit_0_224

        official = faster_vit_0_224(num_classes=17).eval()
    cls_models: dict = {"official FasterViT-0": official} if a.img_size == 224 else {}
    calib: dict = {}
    for n in names:
        model, info = load_model_file(files[n])
        cls_models[n] = reparameterize_model(model.eval())
        calib[n] = TASK_JOBS["classification"].calibration(info, 32)
    groups.append((f"classifiers, {a.img_size} px (trained on textures)", cls_models, a.img_size, calib, {}))
    if not a.skip_inspection:
        for label in list(files)[len(names):]:
            model, info = load_model_file(files[label])
            task = MODEL_KINDS[info["kind"]].task
            size = int(info["img_size"]) if "img_size" in info else _anomaly_size(info)
            groups.append((label, {label: reparameterize_model(model.eval())}, size,
                           {label: TASK_JOBS[task].calibration(info, 32)},
                           {label: {"op_types": TASK_JOBS[task].int8_ops,
                                   "scope": int8_scope_of(TASK_JOBS[task], info)}}))
    tables, all_rows = [], []
    for title, models, size, cal, qopts in groups:
        rows, info = benchmark(models, img_size=size, batch_size=a.batch, threads=a.threads, repeats=a.repeats,
                               throughput_repeats=a.throughput_repeats, warmup=2, onnx=True, openvino=True,
                               precisions=("fp32", "bf16", "int8"), calibration=cal, quantize_options=qopts,
                               memory=False)
        tables.append(results_to_markdown(rows, info, f"{title}: speed").split("\n", 4)[-1])
        all_rows.append((title, rows, info))
    cmd = " ".join(shlex.quote(c) for c in ["python", *sys.argv])
    atomic_write_text(Path(a.out).with_suffix(".json"), json.dumps(
        {"accuracy": accuracy, "speed": {t: [r.__dict__ for r in rows] for t, rows, _ in all_rows},
         "machine": all_rows[0][2].line()}, indent=1, default=str))
    atomic_write_text(Path(a.out).with_suffix(".md"), render(accuracy, all_rows, tables, cmd))
    print(Path(a.out).with_suffix(".md").read_text())


def render(accuracy: list[dict], all_rows: list, tables: list[str], cmd: str) -> str:
    info = all_rows[0][2]
    lines = [result_header("fp32, bf16 and int8 on every model family", info, cmd).rstrip(), ""]
    lines += ["## Accuracy on held-out data (trained models)", "",
              "Agreement with fp32 eager: top-1 (classifiers), per pixel (segmenter), image-score correlation "
              "(PatchCore), box recall (detector: the share of fp32's detections at the deployed thresholds, "
              "conf 0.25 and NMS IoU 0.65, that the variant reproduces with the same class and IoU >= 0.5). "
              "Metric: top-1 % (classifiers), mIoU-style IoU / AUROC % (inspection), COCO AP % (detector, every "
              "score above 0.001).", "",
              "| model | data | metric | " + " | ".join(accuracy[0]["variants"]) + " |",
              "|---|---|---|" + "---|" * len(accuracy[0]["variants"])]
    for acc in accuracy:
        metrics = [k for k in acc["variants"]["fp32 eager"] if k not in ("agreement", "boxes")]
        for k in metrics:
            cells = [f"{v[k]:.2f}" if k in v else "—" for v in acc["variants"].values()]
            lines.append(f"| {acc['model']} | {acc['data']} | {k} | " + " | ".join(cells) + " |")
        cells = [f"{v['agreement']:.4f}" if "agreement" in v else "—" for v in acc["variants"].values()]
        lines.append(f"| {acc['model']} | | agreement | " + " | ".join(cells) + " |")
    lines += ["", "Quantisation: " + "; ".join(f"{a['model']}: {a['quantization']} ({a['quantize_s']:.0f} s)"
                                              for a in accuracy), ""]
    lines += ["## Speed", ""]
    for (title, _, _), table in zip(all_rows, tables, strict=True):
        lines += [f"### {title}", "", table.strip(), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

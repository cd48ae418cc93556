"""``frugalvision demo``: the main job, end to end, on real data that ships with the install.

Stages: build the bundled inspection benchmark (real surface tiles with realistic defects) -> pre-train the
backbone on bundled real textures (cached after the first run) -> synthesise procedural defects -> train a
defect segmenter with a frozen backbone on a few real defects plus the synthetic ones -> re-parameterise / fuse
-> export to ONNX with an onnxruntime parity check -> benchmark the training form, the fused form and ONNX
Runtime side by side -> write a self-contained HTML report to ``runs/demo/``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import config_to_dict
from ..errors import ConfigError
from ..inspect.segmentation import SegmentationPredictor, check_segmenter_name
from ..inspect.visualize import heat_map, overlay
from ..report import HtmlReport, figure_png, markdown_table
from ..utils.io import atomic_write_text
from ..weights import read_model_info

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Run the inspection pipeline end to end on the bundled real benchmark.

    Attributes:
        out_dir: Where the report, model, ONNX file and synthetic data go.
        segmenter: ``ours:<timm backbone>``; the backbone is pre-trained on bundled textures and frozen.
        categories: Benchmark categories (all five when empty).
        img_size: Resolution.
        epochs: Training epochs of the segmenter.
        few_shot: Real defective images per category and kind used for training.
        synthetic_per_kind: Procedural synthetic images per category and kind.
        pretrain_epochs: Epochs of backbone pre-training (cached per setting).
        seed: Seed.
        device: auto, cpu or cuda.
        quick: Every stage on one category with a few images and steps (a check that the install works, about a
            minute on 2 cores; the numbers are meaningless).
        overwrite: Replace an existing run in ``out_dir``.
    """

    out_dir: str = "runs/demo"
    segmenter: str = "ours:repvgg_a0"
    categories: list[str] = field(default_factory=list)
    img_size: int = 128
    epochs: int = 20
    few_shot: int = 2
    synthetic_per_kind: int = 8
    pretrain_epochs: int = 6
    seed: int = 0
    device: str = "auto"
    quick: bool = False
    overwrite: bool = False


def _curve_png(history: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "o-")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("training loss (EMA)")
    ev = [h for h in history if "val_mIoU" in h]
    ax[1].plot([h["epoch"] for h in ev], [h["val_mIoU"] for h in ev], "s-", color="C2", label="mIoU")
    ax[1].plot([h["epoch"] for h in ev], [h["val_F1_max"] for h in ev], "^-", color="C1", label="pixel F1-max")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("test split (%)")
    ax[1].legend()
    fig.tight_layout()
    return figure_png(fig)


@torch.no_grad()
def _overlays(predictor: SegmentationPredictor, ds: Any, n_per_kind: int = 1, scale: int = 2
              ) -> tuple[list[bytes], list[str]]:
    """PNG rows image | ground truth | prediction | heat map, for one image per defect kind and a good one."""
    from PIL import Image

    picked: dict[str, list[int]] = {}
    for i, s in enumerate(ds.samples):
        kind = s.defect if s.label else "good"
        if len(picked.get(kind, [])) < n_per_kind:
            picked.setdefault(kind, []).append(i)
    pngs, captions = [], []
    for kind in sorted(picked):
        for i in picked[kind]:
            raw, mask = ds.load(i)
            img = raw.permute(1, 2, 0).numpy()
            pred = predictor([img])[0]
            panels = [img, overlay(img, mask.numpy()), overlay(img, pred.classes), heat_map(pred.score)]
            row = np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], 1)
            row = np.asarray(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST))
            buf = io.BytesIO()
            Image.fromarray(row).save(buf, format="PNG")
            pngs.append(buf.getvalue())
            s = ds.samples[i]
            captions.append(f"{s.category} / {s.defect}: {s.caption or 'defect-free'}  "
                            "(image | ground truth | prediction | defect score)")
    return pngs, captions


def _bf16_check(model: torch.nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """The segmenter's held-out metrics under bf16 autocast, and its per-pixel agreement with fp32."""
    from .model_file import TASK_JOBS, EvalConfig, _Recorder, with_precision

    jobs = TASK_JOBS["segmentation"]
    ecfg = EvalConfig(device="cpu", progress=False)
    ref, low = _Recorder(model), _Recorder(with_precision(model, "bf16"))
    m_ref, m_low = jobs.evaluate(ref, info, ecfg), jobs.evaluate(low, info, ecfg)
    agree = float((torch.cat(ref.seen) == torch.cat(low.seen)).float().mean())
    keys = [k for k in ("mIoU", "mIoU_defects", "pixel_AUROC") if k in m_ref]
    return {"fp32": {k: m_ref[k] for k in keys}, "bf16": {k: m_low[k] for k in keys}, "pixel_agreement": agree}


def _precision_rows(rows: list[Any], int8_check: dict[str, Any], bf16_check: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per precision of the fused segmenter: quality, agreement with fp32, speed (from the bench rows)."""
    def speed(backend: str, precision: str) -> tuple[str, str]:
        r = next((r for r in rows if r.name == "fused" and r.backend == backend and r.precision == precision), None)
        return (f"{r.latency_ratio / ref.latency_ratio:.2f}x", f"{r.throughput_ratio / ref.throughput_ratio:.2f}x") \
            if r is not None else ("—", "—")

    ref = next(r for r in rows if r.name == "fused" and r.backend == "eager" and r.precision == "fp32")
    out = []
    for label, backend, precision, metrics, agree in (
        ("fp32 eager", "eager", "fp32", bf16_check["fp32"], 1.0),
        ("fp32 onnxruntime", "onnxruntime", "fp32", bf16_check["fp32"], 1.0),
        ("bf16 eager (autocast)", "eager", "bf16", bf16_check["bf16"], bf16_check["pixel_agreement"]),
        ("int8 onnxruntime (QDQ)", "onnxruntime", "int8", int8_check["int8"], int8_check["pixel_agreement"]),
    ):
        b1, bn = speed(backend, precision)
        out.append({"precision": label, **{k: round(float(v), 2) for k, v in metrics.items()
                                           if k in ("mIoU", "mIoU_defects", "pixel_AUROC")},
                    "pixel agreement": f"{agree:.4f}", "speed-up b1": b1, "speed-up b8": bn})
    return out


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the metrics and the paths of the outputs."""
    from timm.utils import reparameterize_model
    from tqdm.auto import tqdm

    from ..bench import benchmark
    from ..export import export_onnx
    from ..export.onnx import write_onnx_metadata
    from ..export.quantize import quantize_onnx
    from ..inspect.bundled import build_benchmark
    from ..weights import MODEL_META
    from .classification import pretrain_backbone
    from .inspection import SegmentConfig, SynthConfig, synthesize, train_segmenter
    from .model_file import TASK_JOBS, ExportConfig, accuracy_check, describe_for_onnx

    check_segmenter_name(cfg.segmenter)
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a demo run; pass overwrite=true to replace it or choose another "
                          "out_dir=")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    categories = cfg.categories or (["brick"] if cfg.quick else [])
    backbone = cfg.segmenter.split(":", 1)[1] if cfg.segmenter.startswith("ours:") else None
    if backbone is None:
        raise ConfigError("the demo trains 'ours:<timm backbone>' segmenters (a frozen pre-trained backbone)")
    stages = tqdm(total=8, desc="demo", unit="stage", dynamic_ncols=True)

    def done(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        stages.set_postfix_str(f"{name} {timings[name]:.1f}s")
        stages.update(1)

    t0 = time.perf_counter()
    stages.set_description("demo: data")
    bench_root = build_benchmark()
    done("data", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: backbone")
    weights = pretrain_backbone(backbone, epochs=1 if cfg.quick else cfg.pretrain_epochs, seed=cfg.seed)
    done("backbone", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: synthesise")
    synth_dir = out / "synthetic"
    seg_cfg = SegmentConfig(
        segmenter=cfg.segmenter, backbone_weights=str(weights), freeze="all", categories=categories,
        img_size=cfg.img_size, few_shot=cfg.few_shot, synthetic="none", synthetic_dir=str(synth_dir),
        epochs=1 if cfg.quick else cfg.epochs, max_steps=3 if cfg.quick else None, seed=cfg.seed,
        device=cfg.device, output_dir=out / "segmenter", eval_every=0 if cfg.quick else 5, overwrite=cfg.overwrite,
    )
    synth = synthesize(SynthConfig(categories=categories, per_kind=1 if cfg.quick else cfg.synthetic_per_kind,
                                   out=str(synth_dir), overwrite=True, seed=cfg.seed))
    done("synthesise", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: train")
    res = train_segmenter(seg_cfg)
    model, test_ds, metrics = res["model"].cpu().eval(), res["test_dataset"], res["test"]
    done("train", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: fuse")
    fused = reparameterize_model(model)
    x = torch.stack([test_ds[i]["image"] for i in range(min(4, len(test_ds)))])
    with torch.no_grad():
        fuse_err = float((fused(x) - model(x)).abs().max())
    done("fuse", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: export")
    export = export_onnx(fused, out / "model.onnx", (1, 3, cfg.img_size, cfg.img_size), check=True,
                         output_names=["logits"])
    seg_file = Path(res["output_dir"]) / "model.safetensors"  # its description lets `predict model.onnx` run it
    seg_info = read_model_info(seg_file)
    write_onnx_metadata(export.path, describe_for_onnx(seg_info, seg_file))
    # int8: the same graph quantised (calibrated on its training images), checked on the held-out defects
    calib = TASK_JOBS["segmentation"].calibration(seg_info, 8 if cfg.quick else 32)  # type: ignore[misc]
    int8 = quantize_onnx(export.path, out / "model.int8.onnx", calib)
    int8_desc = {**json.loads(describe_for_onnx(seg_info, seg_file)[MODEL_META]), "precision": "int8"}
    write_onnx_metadata(int8.path, {MODEL_META: json.dumps(int8_desc, default=str)})
    precision_check = accuracy_check(fused, seg_info, TASK_JOBS["segmentation"], int8.path,
                                     ExportConfig(model_file=str(seg_file), precision="int8"))
    bf16_check = _bf16_check(fused, seg_info)
    done("export", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: bench")
    rows, machine = benchmark({"training form": model, "fused": fused}, img_size=cfg.img_size, batch_size=8,
                              repeats=5 if cfg.quick else 20, throughput_repeats=2 if cfg.quick else 5,
                              warmup=1 if cfg.quick else 3, onnx=True, progress=True,
                              precisions=("fp32", "bf16", "int8"), calibration={"fused": calib})
    rows = [r for r in rows if not (r.name == "training form" and (r.backend == "onnxruntime" or
                                                                   r.precision != "fp32"))]
    done("bench", t0)

    t0 = time.perf_counter()
    stages.set_description("demo: report")
    quality = [{"metric": k, "value": round(v, 2)} for k, v in metrics.items()
               if k in ("mIoU", "mIoU_defects", "pixel_AUROC", "F1_max")]
    per_class = [{"class": k.split("/", 1)[1], "IoU (%)": round(v, 2)} for k, v in metrics.items()
                 if k.startswith("IoU/")]
    speed = [{"model": r.name, "backend": r.backend, "precision": r.precision,
              "latency b1 (ms)": round(r.latency_ms, 2), "throughput b8 (img/s)": round(r.throughput, 1),
              "GFLOPs": round(r.gflops, 3), "of its precision's peak": f"{r.peak_fraction:.0%}" if r.peak_fraction
              else "—", "speed-up b1": f"{r.latency_ratio:.2f}x"} for r in rows]
    precision_rows = _precision_rows(rows, precision_check, bf16_check)
    setup = [{"item": "benchmark", "value": str(bench_root.name)},
             {"item": "categories", "value": ", ".join(categories) or "all 5"},
             {"item": "real defective training images", "value": res["real_defects_train"]},
             {"item": "synthetic training images", "value": synth["images"]},
             {"item": "training images in total", "value": res["train_images"]},
             {"item": "test images", "value": res["test_images"]},
             {"item": "trainable / total parameters", "value": f"{res['trainable_params']:,} / {res['params']:,}"},
             {"item": "backbone", "value": f"{backbone}, pre-trained on bundled textures, frozen"}]
    report = HtmlReport("frugalvision demo: few-shot defect segmentation", machine.line())
    report.heading("Quality on held-out real defects (%)")
    report.table(quality)
    report.table(per_class)
    report.heading("Set-up")
    report.table(setup)
    report.heading("Training curve")
    report.image(_curve_png(res["history"]), "training loss and test-split metrics per epoch",
                 alt="training curve")
    report.heading("Per-image results")
    # the pictures come from the written model file's description (its stored threshold), as `predict` would
    predictor = SegmentationPredictor.from_model(model, read_model_info(Path(res["output_dir"]) / "model.safetensors"))
    pngs, caps = _overlays(predictor, test_ds)
    for png, cap in zip(pngs, caps, strict=True):
        report.image(png, cap, alt=cap)
    report.heading("Speed (batch 1 latency, batch 8 throughput)")
    report.paragraph(f"Re-parameterisation changed outputs by at most {fuse_err:.2e}; ONNX ({export.exporter}) "
                     f"differs from PyTorch by at most {export.max_abs_err:.2e} on batches "
                     f"{export.checked_batch_sizes}.")
    report.table(speed)
    report.heading("Precision: fp32, bf16, int8 (held-out real defects)")
    report.paragraph(f"int8: {int8.summary()}. Agreement: the fraction of test pixels given the same class as fp32. "
                     "Speed-ups against the fused fp32 eager model, from the table above.")
    report.table(precision_rows)
    report.heading("Stage times (s)")
    report.table([{k: round(v, 1) for k, v in timings.items()}])
    html_path = report.save(out / "report.html")
    md = [f"# frugalvision demo: few-shot defect segmentation ({cfg.segmenter})", "", f"Machine: {machine.line()}",
          "", "## Quality (%)", "", markdown_table(quality), "", markdown_table(per_class), "", "## Speed", "",
          markdown_table(speed), "", "## Precision", "", markdown_table(precision_rows), ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    done("report", t0)
    summary = {"test": metrics, "speed": speed, "precision": precision_rows, "setup": setup, "machine": machine.line(),
               "fuse_max_abs_err": fuse_err,
               "onnx": {"path": str(export.path), "exporter": export.exporter, "max_abs_err": export.max_abs_err},
               "stage_seconds": timings, "total_seconds": time.perf_counter() - t_start,
               "config": config_to_dict(cfg)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    stages.close()
    return {"metrics": summary, "report_html": str(html_path), "out_dir": str(out)}

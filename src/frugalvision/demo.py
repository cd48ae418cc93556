"""``frugalvision demo``: the main job, end to end, on real data that ships with the install.

Stages: build the bundled real-image dataset -> train an efficient classifier with the engine -> evaluate
-> re-parameterise / fuse -> export to ONNX with an onnxruntime parity check -> benchmark PyTorch vs ONNX
Runtime side by side -> write a self-contained HTML report (plus Markdown and JSON) to ``runs/demo/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import config_to_dict
from .report import HtmlReport, figure_png, markdown_table
from .utils.io import atomic_write_text

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Run the main pipeline end to end on bundled real data.

    Attributes:
        out_dir: Where the report, model and ONNX file go.
        model: timm model name to train.
        dataset: Bundled dataset (textures, digits, faces).
        img_size: Training resolution.
        epochs: Training epochs.
        batch_size: Training batch size.
        lr: Peak AdamW learning rate.
        seed: Seed of data order and initialisation.
        device: auto, cpu or cuda.
        quick: A few steps only (smoke test; the numbers are meaningless).
    """

    out_dir: str = "runs/demo"
    model: str = "resnet18"
    dataset: str = "textures"
    img_size: int = 64
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    quick: bool = False


def _curve_png(history: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] for h in history]
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train (EMA)")
    if "val_loss" in history[-1]:
        ax[0].plot(ep, [h.get("val_loss", np.nan) for h in history], "s-", label="val")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[1].plot(ep, [h.get("val_acc1", np.nan) for h in history], "s-", color="C2")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("val top-1 (%)")
    fig.tight_layout()
    return figure_png(fig)


def _predictions_png(model: torch.nn.Module, ds: Any, classes: list[str], n: int = 16) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
    cols = 8
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(cols * 1.4, 1.7 * ((n + cols - 1) // cols)))
    model.eval()
    with torch.no_grad():
        for ax, i in zip(axes.ravel(), idx, strict=False):
            path, label = ds.samples[i]
            x, _ = ds[i]
            pred = int(model(x[None]).argmax(1))
            from PIL import Image

            ax.imshow(Image.open(path).convert("RGB"))
            ax.set_title(f"{classes[pred]}\n(true {classes[label]})", fontsize=7,
                         color="green" if pred == label else "red")
            ax.axis("off")
    fig.tight_layout()
    return figure_png(fig)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the metrics and the paths of the outputs."""
    from tqdm.auto import tqdm

    from .bench import benchmark
    from .data import build_bundled, data_config_of
    from .engine import TrainConfig, Trainer, evaluate, seed_everything
    from .engine.task import ClassificationTask
    from .export import export_onnx
    from .models import create_model, save_model_file
    from .pipelines.classification import load_splits

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    stages = tqdm(total=6, desc="demo", unit="stage", dynamic_ncols=True)

    def done(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        stages.set_postfix_str(f"{name} {timings[name]:.1f}s")
        stages.update(1)

    # 1. data
    t0 = time.perf_counter()
    stages.set_description("demo: data")
    folder = build_bundled(cfg.dataset)
    seed_everything(cfg.seed)
    probe = create_model(cfg.model)
    dc = data_config_of(probe)
    splits, classes = load_splits(cfg.dataset, cfg.img_size, dc["mean"], dc["std"])
    done("data", t0)

    # 2. train
    t0 = time.perf_counter()
    stages.set_description("demo: train")
    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes=len(classes))
    tcfg = TrainConfig(epochs=1 if cfg.quick else cfg.epochs, max_steps=3 if cfg.quick else None,
                       batch_size=cfg.batch_size, lr=cfg.lr, warmup_epochs=0 if cfg.quick else 0.5,
                       seed=cfg.seed, device=cfg.device, output_dir=out / "train", label_smoothing=0.1)
    fit = Trainer(model, tcfg, splits["train"], splits["val"]).fit()
    done("train", t0)

    # 3. evaluate
    t0 = time.perf_counter()
    stages.set_description("demo: evaluate")
    model = model.cpu().eval()
    test = splits["test"]
    test_metrics = evaluate(model, test, ClassificationTask(), batch_size=128, device="cpu", progress=True)
    per_class = _per_class_accuracy(model, test, classes)
    save_model_file(model, out / "model.safetensors", cfg.model, {"num_classes": len(classes)}, classes=classes,
                    img_size=cfg.img_size, mean=list(dc["mean"]), std=list(dc["std"]))
    done("evaluate", t0)

    # 4. re-parameterise + export
    t0 = time.perf_counter()
    stages.set_description("demo: export")
    from timm.utils import reparameterize_model

    fused = reparameterize_model(model)
    export = export_onnx(fused, out / "model.onnx", (1, 3, cfg.img_size, cfg.img_size), check=True)
    done("export", t0)

    # 5. speed
    t0 = time.perf_counter()
    stages.set_description("demo: bench")
    rows, machine = benchmark({cfg.model: fused}, img_size=cfg.img_size, batch_size=32,
                              repeats=5 if cfg.quick else 30, throughput_repeats=2 if cfg.quick else 8,
                              warmup=1 if cfg.quick else 5, onnx=True, progress=True)
    done("bench", t0)

    # 6. report
    t0 = time.perf_counter()
    stages.set_description("demo: report")
    speed = [{"backend": r.backend, "latency b1 (ms)": r.latency_ms, "throughput b32 (img/s)": r.throughput,
              "GFLOPs": r.gflops, "of matmul peak": f"{r.peak_fraction:.0%}" if r.peak_fraction else "—",
              "speed-up b1": f"{r.latency_ratio:.2f}x"} for r in rows]
    metrics = {
        "dataset": cfg.dataset, "dataset_folder": str(folder), "model": cfg.model, "classes": len(classes),
        "train_images": len(splits["train"]), "test_images": len(test), "val": fit.final, "test": test_metrics,
        "onnx": {"path": str(export.path), "exporter": export.exporter, "max_abs_err": export.max_abs_err},
        "speed": speed, "machine": machine.line(), "stage_seconds": timings, "config": config_to_dict(cfg),
    }
    report = HtmlReport(f"frugalvision demo: {cfg.model} on bundled '{cfg.dataset}'", machine.line())
    report.heading("Quality")
    report.table([{"split": "val", **fit.final}, {"split": "test", **test_metrics}])
    report.table(per_class)
    report.heading("Training curve")
    report.image(_curve_png(fit.history), "loss and validation top-1 per epoch", alt="training curve")
    report.heading("Predictions on test images")
    report.image(_predictions_png(model, test, classes), "green: correct, red: wrong", alt="predictions")
    report.heading("Export and speed")
    report.paragraph(f"ONNX ({export.exporter} exporter) max |ONNX - PyTorch| = {export.max_abs_err:.2e} on batches "
                     f"{export.checked_batch_sizes}.")
    report.table(speed)
    report.heading("Stage times (s)")
    report.table([{k: round(v, 1) for k, v in timings.items()}])
    html_path = report.save(out / "report.html")
    md = [f"# frugalvision demo: {cfg.model} on '{cfg.dataset}'", "", f"Machine: {machine.line()}", "",
          "## Quality", "", markdown_table([{"split": "val", **fit.final}, {"split": "test", **test_metrics}]), "",
          "## Speed", "", markdown_table(speed), ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    done("report", t0)
    metrics["stage_seconds"]["report"] = timings["report"]
    metrics["total_seconds"] = time.perf_counter() - t_start
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    stages.close()
    return {"metrics": metrics, "report_html": str(html_path), "out_dir": str(out)}


@torch.no_grad()
def _per_class_accuracy(model: torch.nn.Module, ds: Any, classes: list[str]) -> list[dict[str, Any]]:
    correct = np.zeros(len(classes))
    count = np.zeros(len(classes))
    loader = torch.utils.data.DataLoader(ds, batch_size=128)
    for x, y in loader:
        pred = model(x).argmax(1)
        for t, p in zip(y.tolist(), pred.tolist(), strict=True):
            count[t] += 1
            correct[t] += t == p
    return [{"class": c, "test images": int(count[i]), "top-1 (%)": 100 * correct[i] / max(count[i], 1)}
            for i, c in enumerate(classes)]

"""Anomaly-detection jobs on MVTec AD-layout folders: fit, test (metrics + report), predict (masks + overlays).

One model per category (PatchCore's memory bank describes one kind of surface). A run folder holds::

    <out>/<category>/model.safetensors   fitted model + thresholds (+ model.onnx with onnx=true)
    <out>/metrics.json, metrics.md         the metric table of the last test
    <out>/report.html                      table + overlays (self-contained)
    <out>/overlays/<category>/*.png        image | anomaly map | predicted mask (red) with ground truth (green)
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..config import config_to_dict
from ..errors import ConfigError, DataError
from ..utils.io import atomic_path, atomic_write_text

__all__ = ["AnomalyConfig", "fit_anomaly", "predict_anomaly", "run_anomaly", "test_anomaly"]

log = logging.getLogger(__name__)
_ACTIONS = ("fit", "test", "predict")


@dataclass
class AnomalyConfig:
    """Unsupervised anomaly detection: ``fit`` | ``test`` | ``predict`` on MVTec AD-layout data.

    Attributes:
        action: ``fit`` (fit one model per category, then test), ``test`` (metrics + report of a run folder) or
            ``predict`` followed by image files/folders.
        method: ``patchcore`` (memory bank on a frozen backbone) or ``anomalyclip`` (zero-shot, nothing to fit).
        data: ``bundled`` (the inspection benchmark) or an MVTec AD-layout folder.
        categories: Categories to use (all when empty).
        out: Run folder (models, metrics, report).
        backbone: timm backbone name (ours included), used frozen.
        backbone_weights: ``pretrain`` (classifier trained on the bundled real textures, cached), ``none``
            (random: meaningless scores) or a weights file of the backbone architecture.
        layers: The two backbone feature indices whose patches are used (``feature_info`` order, finest first).
        img_size: Input resolution (square).
        shots: Defect-free training images per category (0 = all of ``train/good``).
        coreset_ratio: Fraction of training patches kept in the memory bank.
        max_bank: Upper bound of the memory-bank size.
        projection_dim: Random-projection dimension of the coreset selection.
        num_neighbors: Neighbours of the image-score re-weighting (1 = plain max patch score).
        sigma: Gaussian smoothing of the anomaly map, in output pixels.
        fuse: Re-parameterise the frozen backbone before fitting (same outputs, faster).
        threshold: Pixel threshold; when unset, ``test`` stores the F1-optimal one of the test split.
        image_threshold: Image threshold; when unset, ``test`` stores the F1-optimal one of the test split.
        onnx: ``fit``/``test``: also write ``model.onnx`` (checked against PyTorch); ``predict``: run it.
        images: Images or folders for ``predict`` (also given positionally after ``predict``).
        category: Which category's model ``predict`` uses (needed when the run folder has several).
        predict_out: Output folder of ``predict`` (default ``<out>/predict``).
        report_images: Overlay images per category in the report.
        batch_size: Images per forward pass.
        overwrite: Allow replacing existing outputs.
        threads: CPU threads (0 = torch's default).
        seed: Random seed (shots, coreset).
        progress: Show progress bars.
    """

    action: list[str] = field(default_factory=lambda: ["fit"])
    method: Literal["patchcore", "anomalyclip"] = "patchcore"
    data: str = "bundled"
    categories: list[str] = field(default_factory=list)
    out: str = "runs/anomaly"
    backbone: str = "repvgg_a0"
    backbone_weights: str = "pretrain"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    img_size: int = 128
    shots: int = 0
    coreset_ratio: float = 0.1
    max_bank: int = 16384
    projection_dim: int = 128
    num_neighbors: int = 9
    sigma: float = 4.0
    fuse: bool = True
    threshold: float | None = None
    image_threshold: float | None = None
    onnx: bool = False
    images: list[str] = field(default_factory=list)
    category: str | None = None
    predict_out: str | None = None
    report_images: int = 4
    batch_size: int = 16
    overwrite: bool = False
    threads: int = 0
    seed: int = 0
    progress: bool = True


def run_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Dispatch ``cfg.action`` (``fit``, ``test`` or ``predict IMAGES...``)."""
    if not cfg.action or cfg.action[0] not in _ACTIONS:
        got = cfg.action[0] if cfg.action else "nothing"
        raise ConfigError(f"anomaly needs an action: fit, test or predict (got {got})")
    action, rest = cfg.action[0], cfg.action[1:]
    if rest and action != "predict":
        raise ConfigError(f"unexpected arguments after {action}: {' '.join(rest)}; give settings as key=value")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if action == "fit":
        return fit_anomaly(cfg)
    if action == "test":
        return test_anomaly(cfg)
    cfg.images = [*rest, *cfg.images]
    return predict_anomaly(cfg)


# --------------------------------------------------------------------------------------------- models
def _load_rgb(path: Path) -> np.ndarray:
    from ..data.images import load_image

    return np.asarray(load_image(path))


def _load_backbone_weights(model: Any, weights: str, progress: bool) -> dict[str, Any]:
    from ..engine.checkpoint import load_state_dict_file
    from .inspection import pretrain_backbone

    if weights == "none":
        log.warning("backbone_weights=none: a random backbone gives meaningless anomaly scores")
        return {"weights": "none"}
    file = pretrain_backbone(model.backbone_name, progress=progress) if weights == "pretrain" else Path(weights)
    if not Path(file).is_file():
        raise ConfigError(f"backbone_weights {weights!r} is not 'pretrain', 'none' or an existing file")
    sd = {re.sub(r"^(\w+)\.(\d+)\.", r"\1_\2.", k): v for k, v in load_state_dict_file(file).items()}
    own = model.backbone.state_dict()
    found = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in found]
    if missing:
        raise ConfigError(f"{file} does not fit backbone {model.backbone_name}: {len(missing)} tensors missing "
                          f"(e.g. {missing[0]}); is it a checkpoint of the same architecture?")
    model.backbone.load_state_dict(found)
    return {"weights": weights, "file": str(file), "tensors": len(found)}


def _build_patchcore(cfg: AnomalyConfig) -> tuple[Any, dict[str, Any]]:
    from ..inspect.anomaly.patchcore import PatchCoreModel

    model = PatchCoreModel(cfg.backbone, layers=cfg.layers, img_size=cfg.img_size, num_neighbors=cfg.num_neighbors,
                           sigma=cfg.sigma)
    model.backbone_name = cfg.backbone  # type: ignore[assignment]
    info = _load_backbone_weights(model, cfg.backbone_weights, cfg.progress)
    if cfg.fuse:
        from timm.utils import reparameterize_model

        model.backbone = reparameterize_model(model.backbone).requires_grad_(False)
    return model, info


def _anomalyclip_module() -> Any:
    """The AnomalyCLIP module's pipeline entry point ``build_for_pipeline(config: dict, category: str)``."""
    try:
        from ..inspect.anomaly import anomalyclip
    except ImportError as exc:
        raise ConfigError(f"method=anomalyclip is not available in this installation ({exc}); use "
                          "method=patchcore") from None
    if not hasattr(anomalyclip, "build_for_pipeline"):
        raise ConfigError("method=anomalyclip is not wired into the anomaly CLI yet (frugalvision.inspect.anomaly."
                          "anomalyclip has no build_for_pipeline(config, category)); use its Python API "
                          "(AnomalyCLIP) or method=patchcore")
    return anomalyclip


def _load_model(path: Path) -> tuple[Any, dict[str, Any]]:
    from ..engine.checkpoint import load_state_dict_file
    from ..inspect.anomaly.patchcore import load_patchcore
    from ..models.factory import read_model_info

    info = read_model_info(path)
    if info.get("method") == "anomalyclip":
        model = _anomalyclip_module().build_for_pipeline(info["pipeline_config"], info["category"])
        model.load_state_dict(load_state_dict_file(path))
        return model.eval(), info
    return load_patchcore(path)


def _save_model(model: Any, path: Path, info: dict[str, Any]) -> None:
    from ..inspect.anomaly.patchcore import save_patchcore
    from ..models import save_model_file

    meta = {k: v for k, v in info.items() if k not in ("name", "model_kwargs", "fused_backbone", "task", "method")}
    if info.get("method") == "anomalyclip":
        save_model_file(model, path, "anomalyclip", {}, task="anomaly", method="anomalyclip", **meta)
        return
    save_patchcore(model, path, info["model_kwargs"]["backbone"], fused=bool(info.get("fused_backbone")), **meta)


# --------------------------------------------------------------------------------------------- data
def _samples(cfg: AnomalyConfig, split: str) -> dict[str, list[Any]]:
    from .inspection import load_inspection_data

    samples, _ = load_inspection_data(cfg.data, split, "mvtec", cfg.categories)
    by_cat: dict[str, list[Any]] = {}
    for s in samples.samples:
        by_cat.setdefault(s.category, []).append(s)
    return by_cat


def _batches(paths: list[Path], size: int, batch: int) -> Any:
    from ..inspect.anomaly.export import preprocess

    for i in range(0, len(paths), batch):
        yield preprocess([_load_rgb(p) for p in paths[i : i + batch]], size)


def _category_dirs(out: Path, categories: list[str]) -> list[Path]:
    dirs = sorted(p.parent for p in out.glob("*/model.safetensors"))
    if categories:
        dirs = [d for d in dirs if d.name in categories]
    if not dirs:
        raise ConfigError(f"no fitted model under {out} (expected <out>/<category>/model.safetensors); run "
                          f"`frugalvision anomaly fit out={out}` first")
    return dirs


# --------------------------------------------------------------------------------------------- fit
def fit_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Fit one model per category on its ``train/good`` images, save them, then run :func:`test_anomaly`."""
    from ..inspect.anomaly.patchcore import fit_patchcore, save_patchcore

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"run folder {out} exists and is not empty; pass overwrite=true to replace it or "
                              "choose another out=")
        shutil.rmtree(out)
    train = _samples(cfg, "train")
    rng = np.random.default_rng(cfg.seed)
    fits: dict[str, Any] = {}
    for cat in sorted(train):
        paths = [s.image for s in train[cat] if s.label == 0]
        if cfg.shots:
            if cfg.shots > len(paths):
                raise DataError(f"{cat}: shots={cfg.shots} but train/good has only {len(paths)} images")
            paths = [paths[i] for i in sorted(rng.permutation(len(paths))[: cfg.shots])]
        if not paths:
            raise DataError(f"{cat} has no defect-free training images (train/good is empty)")
        folder = out / cat
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.method == "anomalyclip":  # zero-shot: nothing is fitted on the category's images
            from ..models import save_model_file

            t0 = time.perf_counter()
            clip = _anomalyclip_module().build_for_pipeline(config_to_dict(cfg), cat)
            fits[cat] = {"fit_s": time.perf_counter() - t0, "train_images": 0}
            save_model_file(clip, folder / "model.safetensors", "anomalyclip", {}, task="anomaly",
                            method="anomalyclip", img_size=cfg.img_size, category=cat,
                            pipeline_config=config_to_dict(cfg), fit=fits[cat])
            continue
        model, binfo = _build_patchcore(cfg)
        fit = fit_patchcore(model, _batches(paths, cfg.img_size, cfg.batch_size), cfg.coreset_ratio, cfg.max_bank,
                            cfg.projection_dim, cfg.seed, cfg.progress)
        fits[cat] = {"fit_s": fit.total_s, "extract_s": fit.extract_s, "coreset_s": fit.coreset_s,
                     "train_images": fit.train_images, "patches": fit.patches, "bank": fit.bank_size}
        save_patchcore(model, folder / "model.safetensors", cfg.backbone, fused=cfg.fuse, category=cat,
                       backbone_info=binfo, fit=fits[cat])
    atomic_write_text(out / "config.yaml", json.dumps(config_to_dict(cfg), indent=1))
    res = test_anomaly(cfg)
    res["fit"] = fits
    return res


# --------------------------------------------------------------------------------------------- test
def _overlay_panel(img: np.ndarray, amap: np.ndarray, pred: np.ndarray, gt: np.ndarray, vmax: float) -> np.ndarray:
    """Image | anomaly map (heat) | predicted mask in red over the image with the ground-truth outline in green."""
    from scipy.ndimage import binary_erosion

    from ..inspect.predict import overlay

    heat = np.clip(amap / max(vmax, 1e-12), 0, 1)
    heat_rgb = np.stack([heat, heat**2, 0.2 * (1 - heat)], -1) * 255
    over = overlay(img, pred.astype(np.uint8))
    edge = gt & ~binary_erosion(gt)
    over[edge] = (60, 220, 60)
    return np.concatenate([img, heat_rgb.astype(np.uint8), over], 1)


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


@torch.no_grad()
def test_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Evaluate every fitted category of ``cfg.out`` on its test split; store thresholds; write table + report."""
    from ..data.inspection import load_mask
    from ..inspect.anomaly import AnomalyMetrics
    from ..inspect.anomaly.export import AnomalyPredictor, AnomalySpec, export_anomaly_onnx
    from ..inspect.metrics import ScoreHistogram
    from ..report import HtmlReport, figure_png, markdown_table

    out = Path(cfg.out)
    test = _samples(cfg, "test")
    rows: list[dict[str, Any]] = []
    report = HtmlReport("Anomaly detection", f"{cfg.method} on {cfg.data}, {time.strftime('%Y-%m-%d %H:%M')}")
    figures: list[tuple[str, list[np.ndarray], bytes | None]] = []
    for folder in _category_dirs(out, cfg.categories):
        cat = folder.name
        if cat not in test:
            raise DataError(f"the model of category {cat} has no test images in {cfg.data}")
        model, info = _load_model(folder / "model.safetensors")
        samples = test[cat]
        spec = AnomalySpec(int(info.get("model_kwargs", {}).get("img_size", info.get("img_size", cfg.img_size))),
                           0.0, 0.0, str(info.get("method", "patchcore")))
        predictor = AnomalyPredictor.from_model(model, spec)
        metrics = AnomalyMetrics()
        t0 = time.perf_counter()
        scores, labels, keep = [], [], []
        for i in range(0, len(samples), cfg.batch_size):
            chunk = samples[i : i + cfg.batch_size]
            imgs = [_load_rgb(s.image) for s in chunk]
            preds = predictor(imgs)
            masks = [load_mask(s.mask, (a.shape[1], a.shape[0])) for s, a in zip(chunk, imgs, strict=True)]
            same = len({a.shape for a in imgs}) == 1
            if same:
                metrics.update(torch.tensor([p.score for p in preds]),
                               torch.from_numpy(np.stack([p.anomaly_map for p in preds]))[:, None],
                               torch.tensor([s.label for s in chunk]), torch.from_numpy(np.stack(masks)))
            else:
                for s, p, mk in zip(chunk, preds, masks, strict=True):
                    metrics.update(torch.tensor([p.score]), torch.from_numpy(p.anomaly_map)[None, None],
                                   torch.tensor([s.label]), torch.from_numpy(mk)[None])
            scores += [p.score for p in preds]
            labels += [s.label for s in chunk]
            for s, a, p, mk in zip(chunk, imgs, preds, masks, strict=True):
                if s.label and s.defect not in {k[0].defect for k in keep}:  # one defective image per kind
                    keep.append((s, a, p.anomaly_map, mk))
        infer_s = time.perf_counter() - t0
        r = metrics.compute()
        pix_thr = cfg.threshold if cfg.threshold is not None else r["pixel_threshold"]
        img_thr = cfg.image_threshold if cfg.image_threshold is not None else r["image_threshold"]
        source = "given" if cfg.threshold is not None else "F1-optimal on the test split"
        info.update(pixel_threshold=float(pix_thr), image_threshold=float(img_thr), threshold_source=source,
                    test_metrics=r)
        _save_model(model, folder / "model.safetensors", info)
        spec = AnomalySpec(spec.img_size, float(pix_thr), float(img_thr), spec.method)
        row = {"category": cat, "image_AUROC": r["image_AUROC"], "pixel_AUROC": r["pixel_AUROC"],
               "AUPRO": r["AUPRO"], "image_F1_max": r["image_F1_max"], "pixel_F1_max": r["pixel_F1_max"],
               "pixel_threshold": float(pix_thr), "image_threshold": float(img_thr),
               "fit_s": info.get("fit", {}).get("fit_s", float("nan")), "bank": info.get("fit", {}).get("bank", 0),
               "ms_per_image": 1000 * infer_s / len(samples)}
        if cfg.onnx:
            res = export_anomaly_onnx(model, folder / "model.onnx", spec)
            row["onnx_max_rel_err"] = res.max_rel_err
        rows.append(row)
        # overlays: one defective image per kind
        vmax = float(np.quantile(np.concatenate([k[2].ravel() for k in keep]), 0.999)) if keep else 1.0
        panels = []
        for s, img, amap, mk in keep[: max(cfg.report_images, 0)]:
            panel = _overlay_panel(img, amap, amap >= pix_thr, mk.astype(bool), vmax)
            _save_png(panel, out / "overlays" / cat / f"{s.defect}_{s.image.stem}.png")
            panels.append(panel)
        hist = ScoreHistogram(bins=40)
        lo, hi = min(scores), max(scores)
        hist.update((torch.tensor(scores) - lo) / max(hi - lo, 1e-12), torch.tensor(labels))
        figures.append((cat, panels, _score_figure(hist, lo, hi, img_thr, figure_png)))
        log.info("%s: %s", cat, row)
    mean = {"category": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "category"}}
    table = [*rows, mean] if len(rows) > 1 else rows
    cols = ["category", "image_AUROC", "pixel_AUROC", "AUPRO", "image_F1_max", "pixel_F1_max", "fit_s", "bank",
            "ms_per_image"]
    md = (f"# Anomaly detection: {cfg.method} on {cfg.data}\n\nMetrics in %, thresholds "
          f"{'given' if cfg.threshold is not None else 'F1-optimal on the test split'}.\n\n"
          + markdown_table(table, cols) + "\n")
    atomic_write_text(out / "metrics.md", md)
    atomic_write_text(out / "metrics.json", json.dumps({"rows": table}, indent=1, default=float))
    report.heading("Metrics (%)")
    report.table(table, cols)
    report.paragraph("Panels: image | anomaly map | predicted defect pixels (red, at the stored pixel threshold) "
                     "with the ground-truth outline (green).")
    for cat, panels, fig in figures:
        report.heading(cat)
        for p in panels:
            report.image(p)
        if fig:
            report.image(fig, caption="image scores of good (blue) and defective (red) test images; dashed: "
                                      "image threshold")
    report.save(out / "report.html")
    return {"rows": table, "metrics_md": str(out / "metrics.md"), "report": str(out / "report.html")}


def _score_figure(hist: Any, lo: float, hi: float, thr: float, figure_png: Any) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    edges = lo + (hi - lo) * np.arange(hist.bins) / hist.bins
    fig, ax = plt.subplots(figsize=(5, 2.4))
    width = (hi - lo) / hist.bins
    ax.bar(edges, hist.counts[0].numpy(), width=width, color="tab:blue", alpha=0.6, align="edge", label="good")
    ax.bar(edges, hist.counts[1].numpy(), width=width, color="tab:red", alpha=0.6, align="edge", label="defect")
    ax.axvline(thr, color="k", ls="--", lw=1)
    ax.set_xlabel("image score")
    ax.legend(fontsize=8)
    return figure_png(fig)


# --------------------------------------------------------------------------------------------- predict
@torch.no_grad()
def predict_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Masks (0/255 PNG), overlays and ``predictions.csv`` for images, with a run folder's stored thresholds."""
    from ..data.images import load_image
    from ..inspect.anomaly.export import AnomalyPredictor, AnomalySpec
    from ..inspect.predict import check_outputs, iter_images, overlay

    if not cfg.images:
        raise ConfigError("predict needs images: `frugalvision anomaly predict a.png folder/ out=RUN`")
    dirs = _category_dirs(Path(cfg.out), [cfg.category] if cfg.category else [])
    if len(dirs) > 1:
        raise ConfigError(f"{cfg.out} holds models of {len(dirs)} categories ({', '.join(d.name for d in dirs)}); "
                          "choose one with category=NAME")
    folder = dirs[0]
    if cfg.onnx:
        predictor = AnomalyPredictor.from_onnx(folder / "model.onnx")
        spec = predictor.spec
    else:
        model, info = _load_model(folder / "model.safetensors")
        if "pixel_threshold" not in info and cfg.threshold is None:
            raise ConfigError(f"{folder} has no stored threshold; run `frugalvision anomaly test` or give threshold=")
        spec = AnomalySpec(int(info.get("model_kwargs", {}).get("img_size", info.get("img_size", cfg.img_size))),
                           float(info.get("pixel_threshold", 0.0)), float(info.get("image_threshold", 0.0)),
                           str(info.get("method", "patchcore")))
        predictor = AnomalyPredictor.from_model(model, spec)
    if cfg.threshold is not None:
        spec.pixel_threshold = cfg.threshold
    if cfg.image_threshold is not None:
        spec.image_threshold = cfg.image_threshold
    out = Path(cfg.predict_out or Path(cfg.out) / "predict")
    check_outputs(cfg.images, lambda stem: [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"], cfg.overwrite,
                  "predict_out")
    out.mkdir(parents=True, exist_ok=True)
    n_ok = n_bad = 0
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "status", "score", "anomalous", "defect_fraction", "mask"])
        for path, stem in iter_images(cfg.images):
            try:
                arr = np.asarray(load_image(path))
            except DataError as exc:
                n_bad += 1
                w.writerow([str(path), f"skipped: {exc}", "", "", "", ""])
                print(f"skipped {path}: {exc}", file=sys.stderr)
                continue
            p = predictor([arr])[0]
            _save_png(p.mask.astype(np.uint8) * 255, out / f"{stem}_mask.png")
            _save_png(overlay(arr, p.mask.astype(np.uint8)), out / f"{stem}_overlay.png")
            w.writerow([str(path), "ok", f"{p.score:.6g}", int(p.anomalous), f"{p.mask.mean():.6f}",
                        str(out / f"{stem}_mask.png")])
            n_ok += 1
    return {"images": n_ok + n_bad, "predicted": n_ok, "skipped": n_bad, "csv": str(out / "predictions.csv"),
            "backend": predictor.backend, "pixel_threshold": spec.pixel_threshold,
            "image_threshold": spec.image_threshold, "category": folder.name}

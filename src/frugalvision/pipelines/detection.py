"""Object detection jobs: ``frugalvision detect train | test | predict IMAGES | export`` (masks too, ``masks=true``).

A run folder holds::

    <out>/model.safetensors       the detector (kind ``detector``): weights + classes, input size, tiling, thresholds
    <out>/masks.safetensors       with masks=true: frozen detector + Mask Frozen head (kind ``mask_frozen``)
    <out>/metrics.json, .md       COCO metrics of the test split (pycocotools): AP, AP50, AP75, APs/m/l (+ mask AP)
    <out>/predictions.json        the test split's detections as COCO results
    <out>/history.json            per-epoch losses
    <out>/model.onnx              after ``export``: one graph, images in, decoded + NMS'd detections out

Data (``data=``): ``defects`` (the bundled inspection benchmark: every defect instance a box of its kind, with its
mask), ``trees`` (real aerial images with hand-drawn tree crowns from the ``deepforest`` wheel, split by image
region 70/30, then tiled), or your own: a COCO JSON file, a folder of Pascal VOC XML files, or a YOLO folder
(``images/`` + ``labels/`` + ``data.yaml``). Your own data is split by image region unless ``test_data=`` is given.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.detection import BoxSet, load_coco, load_deepforest, load_voc, load_yolo, split_by_region, tile_boxset
from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_text
from ..weights import load_model_file, read_model_info, save_model_file
from .common import check_outputs, iter_images, read_rgb, save_png, size_kwargs

__all__ = ["DetectConfig", "detect_data", "evaluate_detector_file", "export_detector_file", "predict_detector",
           "run_detect", "train_detector"]

log = logging.getLogger(__name__)
_ACTIONS = ("train", "test", "predict", "export")
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


@dataclass
class DetectConfig:
    """Object detection with a YOLOv6 detector: ``train`` | ``test`` | ``predict IMAGES`` | ``export``.

    Attributes:
        action: ``train`` (train, then test), ``test`` (metrics of a run folder's model), ``predict`` followed by
            image files/folders, or ``export`` (ONNX with decoding and NMS inside).
        data: ``defects`` (bundled inspection benchmark), ``trees`` (deepforest's aerial images), a COCO JSON
            file, a Pascal VOC folder or a YOLO folder.
        test_data: Test set for your own data (same formats); by default the last ``1 - split`` of every image.
        split: Fraction of each image's height used for training when splitting by region.
        model: ``yolov6_n``, ``yolov6_s``, ``yolov6_m`` (or ``yolov6_test``, tiny).
        backbone: Another timm backbone with stride 4-32 features (e.g. ``efficientmod_xxs``); the variant's own
            EfficientRep when unset.
        img_size: Input size (square, letterboxed; a multiple of 32); 128 for ``defects``, 320 otherwise.
        tile: Window size for large images (default ``img_size``); images larger than twice ``img_size`` are tiled.
        overlap: Overlap of neighbouring windows in pixels.
        epochs: Planned epochs (the schedule).
        budget: Stop training after this many seconds (the schedule is compressed to fit); 0 = no limit.
        batch_size: Images per step.
        optimizer: ``sgd`` (YOLOv6's recipe) or ``adamw``.
        lr: Peak learning rate (default: 0.01 for sgd, 0.002 for adamw).
        teacher: A trained detector model file for self-distillation (same head layout).
        masks: Also train a Mask Frozen head on the frozen, trained detector (data with instance masks).
        mask_epochs: Epochs of the mask head.
        out: Run folder.
        model_file: The model file ``test``/``predict``/``export`` use (default ``<out>/masks.safetensors`` when
            ``masks=true``, else ``<out>/model.safetensors``).
        images: Images or folders for ``predict`` (also positional).
        predict_out: Output folder of ``predict`` (default ``<out>/predict``).
        conf_thres: Score threshold of ``predict`` and ``export`` (``test`` uses 0.001, the COCO convention).
        iou_thres: NMS IoU threshold.
        max_det: Most detections per image.
        onnx_out: The ``.onnx`` file of ``export`` (default ``<out>/model.onnx``).
        overwrite: Allow replacing existing outputs.
        device: auto, cpu or cuda.
        amp: auto, none, bf16 or fp16 (training).
        seed: Random seed.
        threads: CPU threads (0 = torch's default).
        progress: Show progress bars.
    """

    action: list[str] = field(default_factory=lambda: ["train"])
    data: str = "defects"
    test_data: str | None = None
    split: float = 0.7
    model: str = "yolov6_n"
    backbone: str | None = None
    img_size: int | None = None
    tile: int | None = None
    overlap: int = 64
    epochs: int = 30
    budget: float = 0.0
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float | None = None
    teacher: str | None = None
    masks: bool = False
    mask_epochs: int = 12
    out: str = "runs/detect"
    model_file: str | None = None
    images: list[str] = field(default_factory=list)
    predict_out: str | None = None
    conf_thres: float = 0.25
    iou_thres: float = 0.65
    max_det: int = 300
    onnx_out: str | None = None
    overwrite: bool = False
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    threads: int = 0
    progress: bool = True

    def size(self) -> int:
        """The input size (the data's default when unset)."""
        return int(self.img_size or (128 if self.data == "defects" else 320))

    def model_path(self) -> Path:
        """The model file of test/predict/export."""
        if self.model_file:
            return Path(self.model_file)
        return Path(self.out) / ("masks.safetensors" if self.masks else "model.safetensors")


# --------------------------------------------------------------------------------------------- data
def _load_any(data: str) -> BoxSet:
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".json":
        return load_coco(p, with_masks=True)
    if p.is_dir():
        if (p / "labels").is_dir() or (p / "data.yaml").is_file():
            return load_yolo(p)
        if any(p.glob("*.xml")):
            return load_voc(p)
        raise DataError(f"data folder {p} is neither a YOLO folder (images/ + labels/ + data.yaml) nor a folder of "
                        "Pascal VOC .xml files; for COCO give the .json file")
    raise DataError(f"data {data!r} is not 'defects', 'trees', a COCO .json file, a VOC folder or a YOLO folder")


def detect_data(data: str, test_data: str | None = None, split: float = 0.7, tile: int = 320, overlap: int = 64
                ) -> tuple[BoxSet, BoxSet]:
    """Train and test :class:`BoxSet` of a ``data=`` value (images larger than ``2 * tile`` are tiled).

    Example:
        >>> train, test = detect_data("defects")
        >>> train.class_names == test.class_names, len(train) > len(test) > 0
        (True, True)
    """
    if data == "defects":
        from ..detect.datasets import defect_boxset

        return defect_boxset("train"), defect_boxset("test")
    if data == "trees":
        whole = load_deepforest()
        train, test = split_by_region(whole, split)
    else:
        whole = _load_any(data)
        if test_data:
            train, test = whole, _load_any(test_data)
            if test.class_names != train.class_names:
                raise DataError(f"test_data {test_data} has classes {test.class_names} but data {data} has "
                                f"{train.class_names}; use the same class list")
        else:
            train, test = split_by_region(whole, split)
    big = any(max(s.width, s.height) > 2 * tile for s in [*train.samples, *test.samples])
    if big:
        train, test = tile_boxset(train, tile, overlap), tile_boxset(test, tile, overlap)
    return train, test


# --------------------------------------------------------------------------------------------- jobs
def run_detect(cfg: DetectConfig) -> dict[str, Any]:
    """Dispatch ``cfg.action``."""
    if not cfg.action or cfg.action[0] not in _ACTIONS:
        got = cfg.action[0] if cfg.action else "nothing"
        raise ConfigError(f"detect needs an action: train, test, predict or export (got {got})")
    action, rest = cfg.action[0], cfg.action[1:]
    if rest and action != "predict":
        raise ConfigError(f"unexpected arguments after {action}: {' '.join(rest)}; give settings as key=value")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if action == "train":
        return train_detector(cfg)
    if action == "test":
        model, info = load_model_file(cfg.model_path())
        return evaluate_detector_file(model, info, None, cfg.device, cfg.progress, out=Path(cfg.out))
    if action == "export":
        model, info = load_model_file(cfg.model_path())
        out = Path(cfg.onnx_out or Path(cfg.out) / "model.onnx")
        return export_detector_file(model, info, out, cfg.overwrite, cfg.conf_thres, cfg.iou_thres, cfg.max_det)
    images = [*rest, *cfg.images]
    if not images:
        raise ConfigError("detect predict needs images: pass image files or folders after predict")
    model, info = load_model_file(cfg.model_path())
    return predict_detector(model, info, images, cfg.predict_out or Path(cfg.out) / "predict", cfg.overwrite,
                            cfg.conf_thres, cfg.iou_thres, cfg.max_det, cfg.device, cfg.progress)


def _write_metrics(out: Path, metrics: dict[str, Any], title: str) -> None:
    rows = [k for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100", "mask_AP", "mask_AP50")
            if k in metrics]
    md = [f"# {title}", "", "| metric | value |", "|---|---|", *[f"| {k} | {metrics[k]:.2f} |" for k in rows]]
    atomic_write_text(out / "metrics.md", "\n".join(md) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")


def train_detector(cfg: DetectConfig) -> dict[str, Any]:
    """Train a detector (and, with ``masks=true``, its Mask Frozen head), test it, save the run folder."""
    from ..detect.train import DetectTrainConfig, fit_detector
    from ..detect.yolov6 import create_detector

    out = Path(cfg.out)
    model_path = out / "model.safetensors"
    if model_path.exists() and not cfg.overwrite:
        raise ConfigError(f"{model_path} already exists; pass overwrite=true to replace the run or choose another out=")
    teacher = None
    if cfg.teacher:
        teacher, t_info = load_model_file(cfg.teacher)
        if t_info["kind"] != "detector":
            raise ConfigError(f"teacher {cfg.teacher} is a {t_info['kind']} model file; give a detector model file")
    size = cfg.size()
    train, test = detect_data(cfg.data, cfg.test_data, cfg.split, cfg.tile or size, cfg.overlap)
    if cfg.masks and not any(s.masks is not None for s in train.samples):
        raise DataError(f"masks=true needs instance masks but data {cfg.data!r} has none (use data=defects or a COCO "
                        "file with segmentation polygons/RLE)")
    kwargs: dict[str, Any] = {"num_classes": len(train.class_names)}
    if cfg.backbone:
        kwargs["backbone"] = cfg.backbone
        if size_kwargs(cfg.backbone, size):  # vision transformers are built for one input size
            kwargs["backbone_kwargs"] = size_kwargs(cfg.backbone, size)
    torch.manual_seed(cfg.seed)
    model = create_detector(cfg.model, **kwargs)
    lr = cfg.lr or (0.01 if cfg.optimizer == "sgd" else 0.002)
    tcfg = DetectTrainConfig(img_size=size, epochs=cfg.epochs, time_budget_s=cfg.budget or None,
                             batch_size=cfg.batch_size, optimizer=cfg.optimizer,  # type: ignore[arg-type]
                             lr=lr, weight_decay=5e-4 if cfg.optimizer == "sgd" else 0.05, ema_tau=200.0,
                             amp=cfg.amp, device=cfg.device, seed=cfg.seed, progress=cfg.progress)  # type: ignore[arg-type]
    log.info("training %s on %d images (%d boxes), testing on %d", cfg.model, len(train), train.num_boxes(), len(test))
    res = fit_detector(model, train, tcfg, teacher=teacher)
    det = res.model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"classes": train.class_names, "img_size": size, "tile": cfg.tile or size, "overlap": cfg.overlap,
            "data": cfg.data, "test_data": cfg.test_data, "split": cfg.split, "conf_thres": cfg.conf_thres,
            "iou_thres": cfg.iou_thres, "max_det": cfg.max_det,
            "train": {"seconds": round(res.train_seconds, 1), "steps": res.steps, "epochs": round(res.epochs_done, 2),
                      "config": asdict(tcfg)}}
    save_model_file(det, model_path, "detector", cfg.model, model_kwargs=kwargs, **meta)
    atomic_write_text(out / "history.json", json.dumps(res.history, indent=2) + "\n")
    result: dict[str, Any] = {"model_file": str(model_path), "train_images": len(train),
                              "train_boxes": train.num_boxes(), "train_seconds": round(res.train_seconds, 1),
                              "steps": res.steps}
    metrics = evaluate_detector_file(det, read_model_info(model_path), (train, test), cfg.device, cfg.progress, out=out)
    result.update({k: metrics[k] for k in ("AP", "AP50", "AP75") if k in metrics})
    if cfg.masks:
        result.update(_train_masks(cfg, det, train, test, meta, kwargs))
    return result


def _train_masks(cfg: DetectConfig, det: torch.nn.Module, train: BoxSet, test: BoxSet, meta: dict[str, Any],
                 kwargs: dict[str, Any]) -> dict[str, Any]:
    from ..detect import mask_frozen as mf

    out = Path(cfg.out)
    model = mf.MaskFrozen(det)
    mcfg = mf.MaskTrainConfig(img_size=meta["img_size"], epochs=cfg.mask_epochs, device=cfg.device, seed=cfg.seed,
                              progress=cfg.progress)
    res = mf.fit_mask_head(model, train, mcfg)
    path = out / "masks.safetensors"
    save_model_file(model.cpu().eval(), path, "mask_frozen", cfg.model, model_kwargs={**kwargs, **model.head_kwargs()},
                    **{**meta, "mask_train": {"seconds": round(res.train_seconds, 1)}})
    m = mf.evaluate_masks(model, test, meta["img_size"], device=cfg.device, progress=cfg.progress)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.update({"mask_AP": m["mask_AP"], "mask_AP50": m["mask_AP50"],
                    "mask_head_seconds": round(res.train_seconds, 1)})
    _write_metrics(out, metrics, f"detect {cfg.model} on {cfg.data}")
    return {"masks_file": str(path), "mask_AP": m["mask_AP"], "mask_AP50": m["mask_AP50"],
            "mask_head_seconds": round(res.train_seconds, 1)}


def evaluate_detector_file(model: torch.nn.Module, info: dict[str, Any], sets: tuple[BoxSet, BoxSet] | None = None,
                           device: str = "auto", progress: bool = True, out: Path | None = None,
                           data: str | None = None) -> dict[str, Any]:
    """COCO metrics of a detector (or Mask Frozen) model file on its test split (or ``data``'s)."""
    from ..detect.coco_eval import write_coco_results
    from ..detect.train import evaluate_detector

    size = int(info["img_size"])
    if sets is None:
        sets = detect_data(data or info["data"], None if data else info.get("test_data"), info.get("split", 0.7),
                           int(info.get("tile", size)), int(info.get("overlap", 64)))
    test = sets[1]
    if [*test.class_names] != [*info["classes"]]:
        raise DataError(f"the test data has classes {test.class_names} but the model was trained on {info['classes']}")
    det = model.detector if info["kind"] == "mask_frozen" else model
    t0 = time.perf_counter()
    metrics = evaluate_detector(det, test, size, device=device, progress=progress, with_results=True)
    results = metrics.pop("results")
    metrics.update({"images": len(test), "boxes": test.num_boxes(), "eval_seconds": round(time.perf_counter() - t0, 1)})
    if info["kind"] == "mask_frozen":
        from ..detect.mask_frozen import evaluate_masks

        m = evaluate_masks(model, test, size, device=device, progress=progress)
        metrics.update({"mask_AP": m["mask_AP"], "mask_AP50": m["mask_AP50"]})
    metrics.pop("summary", None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_metrics(out, metrics, f"detect {info.get('name')} on {info.get('data')}")
        write_coco_results(results, out / "predictions.json", overwrite=True)
    return metrics


def _draw(pixels: np.ndarray, det: dict[str, Any], classes: list[str]) -> np.ndarray:
    masks = det.get("masks")
    if masks is not None and len(masks):  # instance masks: translucent fill in the class colour
        out = pixels.astype(np.float32)
        for m, label in zip(np.asarray(masks, dtype=bool), det["labels"].tolist(), strict=True):
            out[m] = 0.55 * out[m] + 0.45 * np.asarray(_PALETTE[int(label) % len(_PALETTE)], np.float32)
        pixels = out.round().astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 400))
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
        color = _PALETTE[int(label) % len(_PALETTE)]
        draw.rectangle(box, outline=color, width=width)
        draw.text((box[0] + 2, box[1] + 1), f"{classes[int(label)]} {score:.2f}", fill=color)
    return np.asarray(img)


def _mask_detections(model: torch.nn.Module, paths: list[Path], size: int, conf: float, iou: float, max_det: int,
                     device: str, progress: bool) -> list[dict[str, Any]]:
    """Mask Frozen on whole images (letterboxed, not tiled): boxes, scores, labels and boolean masks."""
    from ..data.detection import BoxSample
    from ..detect.mask_frozen import predict_masks

    samples = []
    for i, p in enumerate(paths):
        w, h = Image.open(p).size
        samples.append(BoxSample(p, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), w, h, i + 1))
    dets = predict_masks(model, BoxSet(samples, ["x"]), size, device=device, conf_thres=conf, iou_thres=iou,
                         max_det=min(max_det, 100), progress=progress)
    return [{**d, "width": s.width, "height": s.height} for d, s in zip(dets, samples, strict=True)]


def predict_detector(model: torch.nn.Module, info: dict[str, Any], images: list[str], out: str | Path,
                     overwrite: bool = False, conf_thres: float | None = None, iou_thres: float | None = None,
                     max_det: int | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Drawn images, ``predictions.json`` (COCO) and ``predictions.csv`` for image files and folders.

    A detector runs large images tile by tile (merged with NMS); a Mask Frozen file also predicts instance masks
    (drawn, and stored as RLE ``segmentation`` in the COCO JSON) on each whole image.
    """
    from ..detect.coco_eval import detections_to_coco
    from ..detect.infer import detect_images

    out = Path(out)
    extra = [out / "predictions.json", out / "predictions.csv"]
    total = check_outputs(images, lambda stem: [out / f"{stem}_det.png"], overwrite, out_key="predict_out",
                          extra=extra)
    if total == 0:
        raise ConfigError(f"no images found in {', '.join(map(str, images))}")
    paths = [(p, stem) for p, stem in iter_images(images)]
    size = int(info["img_size"])
    conf = info.get("conf_thres", 0.25) if conf_thres is None else conf_thres
    iou = iou_thres or info.get("iou_thres", 0.65)
    cap = max_det or info.get("max_det", 300)
    if info["kind"] == "mask_frozen":
        dets = _mask_detections(model, [p for p, _ in paths], size, conf, iou, cap, device, progress)
    else:
        dets = detect_images(model, [p for p, _ in paths], size, int(info.get("tile", size)),
                             int(info.get("overlap", 64)), conf_thres=conf, iou_thres=iou, max_det=cap,
                             device=device, progress=progress)
    classes = list(info["classes"])
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    rows = []
    for i, ((path, stem), det) in enumerate(zip(paths, dets, strict=True)):
        save_png(_draw(read_rgb(path), det, classes), out / f"{stem}_det.png")
        coco["images"].append({"id": i + 1, "file_name": str(path), "width": det["width"], "height": det["height"]})
        masks = det.get("masks")
        for ann in detections_to_coco(i + 1, det, masks=None if masks is None else np.asarray(masks)):
            x, y, w, h = ann["bbox"]
            ann.update(id=len(coco["annotations"]) + 1, area=round(w * h, 2), iscrowd=0,
                       bbox=[round(v, 2) for v in ann["bbox"]], score=round(float(ann["score"]), 5))
            coco["annotations"].append(ann)
            rows.append([str(path), round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2), ann["score"],
                         classes[int(ann["category_id"]) - 1]])
    atomic_write_text(out / "predictions.json", json.dumps(coco) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "x1", "y1", "x2", "y2", "score", "class"])
    w.writerows(rows)
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    return {"images": total, "predicted": len(dets), "skipped": 0, "detections": len(rows), "out": str(out),
            "masks": info["kind"] == "mask_frozen"}


def export_detector_file(model: torch.nn.Module, info: dict[str, Any], out: Path, overwrite: bool = False,
                         conf_thres: float | None = None, iou_thres: float | None = None, max_det: int | None = None
                         ) -> dict[str, Any]:
    """One ONNX graph (fused detector, decoding, NMS), checked against PyTorch with onnxruntime."""
    from ..detect.onnx_export import export_detector_onnx
    from ..export import fuse

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it or choose another out")
    det = model.detector if info["kind"] == "mask_frozen" else model
    size = int(info["img_size"])
    fused = fuse(det, (2, 3, size, size))
    res = export_detector_onnx(fused, out, img_size=(size, size),
                               conf_thres=conf_thres or info.get("conf_thres", 0.25),
                               iou_thres=iou_thres or info.get("iou_thres", 0.65),
                               max_det=max_det or min(100, int(info.get("max_det", 100))))
    return {"path": str(out), **{k: v for k, v in vars(res).items() if k != "path"}}

"""Industrial inspection jobs: synthesise defects, train and evaluate defect segmenters, predict on images."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from .._deps import require_all
from ..config import check_number, config_to_dict
from ..data.bundled import source_images
from ..data.inspection import (
    DefectDataset,
    DefectSample,
    SampleList,
    load_defect_spectrum,
    load_mvtec,
    load_visa,
    segmentation_transforms,
)
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..engine import TrainConfig, Trainer, evaluate, resolve_device, seed_everything
from ..errors import ConfigError, DataError
from ..inspect.bundled import build_benchmark, load_captions
from ..inspect.defects import DEFECT_KINDS, describe_defect
from ..inspect.segmentation import (
    DecoderOnly,
    SegmentationPredictor,
    SegmentationTask,
    build_segmenter,
    cache_features,
    check_segmenter_name,
)
from ..inspect.synthesis.procedural import ProceduralConfig, ProceduralSynthesizer
from ..inspect.visualize import overlay
from ..models import load_backbone_weights
from ..utils.io import atomic_path, atomic_write_text
from ..weights import save_model_file
from .classification import pretrain_backbone
from .common import RUN_OUTPUTS, check_outputs, check_run_dir, iter_images, read_rgb, save_png

__all__ = [
    "SegmentConfig",
    "SynthConfig",
    "evaluate_segmenter",
    "few_shot_split",
    "load_inspection_data",
    "predict_segmenter",
    "synthesize",
    "train_segmenter",
]

log = logging.getLogger(__name__)
_FOREIGN_SOURCES = ("coffee", "astronaut", "chelsea", "rocket", "hubble")


# --------------------------------------------------------------------------------------------- data
def load_inspection_data(data: str, split: str, fmt: str = "mvtec", categories: list[str] | None = None,
                         on_error: str = "raise") -> tuple[SampleList, Path]:
    """Samples of ``data`` (``bundled`` or a folder in ``fmt`` layout) and the dataset root."""
    cats = categories or None
    if data == "bundled":
        root = build_benchmark()
        return load_mvtec(root, cats, split=split, captions=load_captions(root), on_error=on_error), root  # type: ignore[arg-type]
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data {data!r} is neither 'bundled' nor an existing folder")
    if fmt == "mvtec":
        return load_mvtec(root, cats, split=split, on_error=on_error), root  # type: ignore[arg-type]
    if fmt == "visa":
        return load_visa(root, cats, split=split, on_error=on_error), root  # type: ignore[arg-type]
    if fmt == "defect_spectrum":
        if split == "train":
            raise ConfigError("Defect Spectrum has no train/ split; use its good images through split=test")
        return load_defect_spectrum(root, cats, on_error=on_error), root  # type: ignore[arg-type]
    raise ConfigError(f"unknown format {fmt!r}; use mvtec, visa or defect_spectrum")


def few_shot_split(samples: list[DefectSample], per_kind: int, seed: int
                   ) -> tuple[list[DefectSample], list[DefectSample]]:
    """Split defective images: ``per_kind`` of every (category, kind) for training, the rest for testing.

    Every good image stays in the test part.

    Example:
        >>> s = [DefectSample(Path(f"{i}.png"), None, 1, "hole", "tile") for i in range(5)]
        >>> train, test = few_shot_split(s, 2, seed=0); len(train), len(test)
        (2, 3)
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[DefectSample]] = {}
    for s in samples:
        if s.label:
            groups.setdefault((s.category, s.defect), []).append(s)
    train: list[DefectSample] = []
    for key in sorted(groups):
        items = groups[key]
        if len(items) <= per_kind:
            raise DataError(f"{key[0]}/{key[1]} has only {len(items)} defective images; few_shot={per_kind} would "
                            "leave none for testing")
        idx = rng.permutation(len(items))[:per_kind]
        train += [items[i] for i in sorted(idx)]
    chosen = set(train)
    return train, [s for s in samples if s not in chosen]


# --------------------------------------------------------------------------------------------- synthesis
@dataclass
class SynthConfig:
    """Synthesise defective images from defect-free ones into an MVTec AD-layout folder.

    Attributes:
        data: ``bundled`` or an MVTec AD-layout folder whose ``train/good`` images are the clean inputs.
        categories: Categories to use (all when empty).
        method: ``procedural`` (Perlin masks + texture transplant) or ``diffusion`` (learned from real defects).
        per_kind: Images per category and defect kind.
        kinds: Defect kinds (all when empty).
        size: Defect size multiplier (procedural).
        contrast: Defect contrast in [0, 1] (procedural).
        few_shot: Real defective images per kind that train the diffusion model.
        diffusion_steps: Training steps of the diffusion model.
        out: Output folder.
        overwrite: Replace an existing output folder.
        seed: Random seed.
    """

    data: str = "bundled"
    categories: list[str] = field(default_factory=list)
    method: Literal["procedural", "diffusion"] = "procedural"
    per_kind: int = 8
    kinds: list[str] = field(default_factory=list)
    size: float = 1.0
    contrast: float = 1.0
    few_shot: int = 2
    diffusion_steps: int = 800
    out: str = "runs/synth"
    overwrite: bool = False
    seed: int = 0

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages this job needs: ``(module, feature, extra)``."""
        return [("diffusers", "method=diffusion", "diffusion")] if self.method == "diffusion" else []


def synthesize(cfg: SynthConfig, progress: bool = True, exclude: set[Path] | None = None) -> dict[str, Any]:
    """Write synthetic defects in MVTec AD layout and return the manifest.

    Writes ``<out>/<category>/test/<kind>/``, ``ground_truth/``, ``captions.csv`` and ``manifest.json`` (timings).

    ``exclude``: clean images not to use (e.g. those a segmenter tests on).
    """
    from tqdm.auto import tqdm

    require_all(cfg.needs())
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"output folder {out} exists and is not empty; pass overwrite=true to replace it")
        shutil.rmtree(out)
    kinds = cfg.kinds or list(DEFECT_KINDS)
    good, _ = load_inspection_data(cfg.data, "train", categories=cfg.categories)
    clean_by_cat: dict[str, list[Path]] = {}
    for s in good.samples:
        if s.label == 0 and not (exclude and s.image in exclude):
            clean_by_cat.setdefault(s.category, []).append(s.image)
    rng = np.random.default_rng(cfg.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.method == "procedural":
        gen: Any = ProceduralSynthesizer(list(source_images(list(_FOREIGN_SOURCES)).values()),
                                         ProceduralConfig(cfg.size, cfg.contrast, tuple(kinds)))
    else:
        gen = _fit_diffusion(cfg, kinds, timings)
    captions: list[dict[str, str]] = []
    total = len(clean_by_cat) * len(kinds) * cfg.per_kind
    bar = tqdm(total=total, desc=f"synth ({cfg.method})", disable=not progress, dynamic_ncols=True)
    tmp_parent = out.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    gen_t0 = time.perf_counter()
    empty = 0
    for cat in sorted(clean_by_cat):
        clean = clean_by_cat[cat]
        (out / cat / "train" / "good").mkdir(parents=True, exist_ok=True)
        for k, kind in enumerate(kinds):
            imgs = [read_rgb(clean[rng.integers(len(clean))]) for _ in range(cfg.per_kind)]
            if cfg.method == "procedural":
                made = [gen(img, rng, kind)[:2] for img in imgs]
            else:  # batched sampling: one denoising loop for all of this kind's images
                made = gen.inpaint_many(imgs, [k] * len(imgs), rng)
            kept = [(new, mask) for new, mask in made if mask.any()]
            empty += len(made) - len(kept)  # a generator that painted nothing gives no training defect
            for i, (new, mask) in enumerate(kept):
                rel = f"{cat}/test/{kind}/{i:03d}.png"
                save_png(new, out / rel)
                save_png(mask.astype(np.uint8) * 255, out / cat / "ground_truth" / kind / f"{i:03d}_mask.png")
                captions.append({"image": rel, "category": cat, "defect": kind,
                                 "caption": describe_defect(kind, mask, cat)})
            bar.update(len(made))
    bar.close()
    timings["generate_s"] = time.perf_counter() - gen_t0
    timings["generate_ms_per_image"] = 1000 * timings["generate_s"] / max(total, 1)
    timings["total_s"] = time.perf_counter() - t0
    with atomic_path(out / "captions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "category", "defect", "caption"])
        w.writeheader()
        w.writerows(captions)
    manifest = {"method": cfg.method, "images": total - empty, "empty_masks_dropped": empty, "kinds": kinds,
                "categories": sorted(clean_by_cat), "timings": timings, "config": config_to_dict(cfg)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _fit_diffusion(cfg: SynthConfig, kinds: list[str], timings: dict[str, float]) -> Any:
    """Train the learned generator on the few real defects of every kind.

    Its training images are those :func:`few_shot_split` picks with the same seed, i.e. the segmenter's.
    """
    from ..inspect.synthesis.diffusion import DefectDiffusion, DefectDiffusionConfig

    test, _ = load_inspection_data(cfg.data, "test", categories=cfg.categories)
    train, _ = few_shot_split(test.samples, cfg.few_shot, cfg.seed)
    train = [s for s in train if s.defect in kinds]
    from ..data.inspection import load_mask

    images = [read_rgb(s.image) for s in train]
    masks = [load_mask(s.mask, (im.shape[1], im.shape[0])).astype(bool) for s, im in zip(train, images, strict=True)]
    gen = DefectDiffusion(DefectDiffusionConfig(steps=cfg.diffusion_steps, seed=cfg.seed))
    t0 = time.perf_counter()
    stats = gen.fit(images, masks, [kinds.index(s.defect) for s in train])
    timings["train_s"] = time.perf_counter() - t0
    timings.update({f"train_{k}": v for k, v in (stats or {}).items() if isinstance(v, int | float)})
    return gen


# --------------------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentConfig(TrainConfig):
    """Train a defect segmenter with few real defects (+ synthetic ones) and evaluate it (TrainConfig keys apply).

    Attributes:
        segmenter: ``ours:<timm backbone>`` or ``smp:<arch>`` (unet, pspnet, deeplabv3plus, segformer).
        backbone_weights: ``pretrain`` (a classifier trained on bundled real textures, cached), ``none``, or a
            weights file of the backbone architecture.
        freeze: ``all`` (frozen backbone + trained decoder), ``partial`` (last stage trained too) or ``none``.
        data: ``bundled`` or a dataset folder.
        format: Layout of ``data``: mvtec, visa or defect_spectrum.
        categories: Categories to use (all when empty).
        img_size: Training and evaluation resolution.
        few_shot: Real defective images per category and kind used for training; the rest are the test set.
        good_per_category: Defect-free training images per category (from the train split).
        synthetic: Synthetic defects added to training: none, procedural or diffusion.
        synthetic_per_kind: Synthetic images per category and kind.
        synthetic_dir: Use an existing folder written by ``frugalvision synth`` instead of generating.
        decoder_dim: Width of the decoder.
        mask_mode: ``kind`` (one class per defect kind) or ``binary`` (defect vs background).
        feature_cache: With ``freeze=all``, run the frozen backbone once per training image and each of its 8
            flips/quarter turns, then train the decoder on the cached features (the same augmentation
            distribution; the backbone's cost drops from one pass per epoch to 8 passes in all).
        split_seed: Seed of the few-shot split (kept fixed across training seeds to compare like with like).

    The test split is evaluated every ``eval_every`` epochs only to draw the learning curve; nothing is selected
    on it (the final model is the last one).
    """

    epochs: int = 25
    eval_every: int = 5
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    segmenter: str = "ours:repvgg_a0"
    backbone_weights: str = "pretrain"
    freeze: Literal["all", "partial", "none"] = "all"
    data: str = "bundled"
    format: Literal["mvtec", "visa", "defect_spectrum"] = "mvtec"
    categories: list[str] = field(default_factory=list)
    img_size: int = 128
    few_shot: int = 2
    good_per_category: int = 10
    synthetic: Literal["none", "procedural", "diffusion"] = "procedural"
    synthetic_per_kind: int = 8
    synthetic_dir: str | None = None
    decoder_dim: int = 64
    mask_mode: Literal["kind", "binary"] = "kind"
    feature_cache: bool = True
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("img_size", self.img_size, 1)
        check_number("few_shot", self.few_shot, 1)
        check_number("good_per_category", self.good_per_category, 0)
        check_number("synthetic_per_kind", self.synthetic_per_kind, 1)
        check_number("decoder_dim", self.decoder_dim, 1)

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages this job needs: ``(module, feature, extra)``."""
        out = []
        if self.segmenter.startswith("smp:"):
            out.append(("segmentation_models_pytorch", f"segmenter={self.segmenter}", "seg"))
        if self.synthetic == "diffusion" and not self.synthetic_dir:
            out.append(("diffusers", "synthetic=diffusion", "diffusion"))
        return out


_FEATURE_MEMO: dict[str, Any] = {}


def _feature_key_of(cfg: SegmentConfig, backbone_info: dict[str, Any], train: list[DefectSample]) -> tuple:
    """What the cached training features depend on: backbone, its weights file, resolution and every file."""
    weights = backbone_info.get("file")
    files = [p for s in train for p in (s.image, s.mask) if p is not None]
    return (cfg.segmenter, cfg.img_size, cfg.mask_mode, weights, weights and Path(weights).stat().st_mtime_ns,
            tuple((str(p), p.stat().st_mtime_ns) for p in files))


def train_segmenter(cfg: SegmentConfig) -> dict[str, Any]:
    """Train and evaluate a segmenter.

    Writes ``model.safetensors``, ``metrics.json``, ``config.yaml`` and ``history.json`` to ``output_dir``;
    returns the metrics, the model, the test dataset and the paths.
    """
    require_all(cfg.needs())
    check_segmenter_name(cfg.segmenter)
    out = Path(cfg.output_dir or f"runs/segment/{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out, cfg.overwrite, cfg.resume, outputs=(*RUN_OUTPUTS, "synthetic-*"))
    cfg.output_dir = out
    seed_everything(cfg.seed)
    test_all, _ = load_inspection_data(cfg.data, "test", cfg.format, cfg.categories)
    kinds = test_all.defects if cfg.mask_mode == "kind" else ["defect"]
    real_train, test = few_shot_split(test_all.samples, cfg.few_shot, cfg.split_seed)
    train: list[DefectSample] = list(real_train)
    if cfg.format != "defect_spectrum":
        good, _ = load_inspection_data(cfg.data, "train", cfg.format, cfg.categories)
        rng = np.random.default_rng(cfg.split_seed)
        by_cat: dict[str, list[DefectSample]] = {}
        for s in good.samples:
            by_cat.setdefault(s.category, []).append(s)
        for cat in sorted(by_cat):
            pick = rng.permutation(len(by_cat[cat]))[: cfg.good_per_category]
            train += [by_cat[cat][i] for i in sorted(pick)]
    synth_info: dict[str, Any] = {}
    if cfg.synthetic != "none" or cfg.synthetic_dir:
        sdir = Path(cfg.synthetic_dir) if cfg.synthetic_dir else out / f"synthetic-{cfg.synthetic}"
        if not cfg.synthetic_dir:
            synth_info = synthesize(SynthConfig(
                data=cfg.data, categories=cfg.categories, method=cfg.synthetic,  # type: ignore[arg-type]
                per_kind=cfg.synthetic_per_kind, kinds=[k for k in kinds if k in DEFECT_KINDS] or list(DEFECT_KINDS),
                few_shot=cfg.few_shot, out=str(sdir), overwrite=True, seed=cfg.split_seed), progress=cfg.progress)
        synthetic = load_mvtec(sdir, cfg.categories or None, split="test")
        train += [s for s in synthetic.samples if s.label and (cfg.mask_mode == "binary" or s.defect in kinds)]
    if cfg.mask_mode == "binary":
        train = [s if not s.label else DefectSample(s.image, s.mask, 1, s.defect, s.category) for s in train]
    class_names = ["background", *kinds]
    mode = "kind" if cfg.mask_mode == "kind" else "binary"
    tf_train = segmentation_transforms(cfg.img_size, train=True)
    tf_eval = segmentation_transforms(cfg.img_size, train=False)
    train_ds = DefectDataset(train, tf_train, classes=kinds, mask_mode=mode, cache=True)
    test_ds = DefectDataset(test, tf_eval, classes=kinds, mask_mode=mode, cache=True)

    seed_everything(cfg.seed)
    model = build_segmenter(cfg.segmenter, len(class_names), dim=cfg.decoder_dim)
    backbone_info: dict[str, Any] = {"weights": cfg.backbone_weights}
    if cfg.segmenter.startswith("ours:"):
        if cfg.backbone_weights == "pretrain":
            weights = pretrain_backbone(cfg.segmenter.split(":", 1)[1], progress=cfg.progress)
            backbone_info.update(load_backbone_weights(model.backbone, weights).summary(), file=str(weights))
        elif cfg.backbone_weights != "none":
            backbone_info.update(load_backbone_weights(model.backbone, cfg.backbone_weights).summary(),
                                 file=cfg.backbone_weights)
        model.freeze_backbone(cfg.freeze)  # type: ignore[operator]
        if cfg.freeze == "all":
            # A frozen backbone never changes, so fold its branches and BNs now: identical outputs, faster epochs.
            from timm.utils import reparameterize_model

            model.backbone = reparameterize_model(model.backbone)
            model.freeze_backbone("all")  # the fused tensors are new parameters: freeze them again
            backbone_info["fused_for_training"] = True
    elif cfg.freeze != "none" or cfg.backbone_weights not in ("none", "pretrain"):
        raise ConfigError("smp baselines train from scratch here: use freeze=none backbone_weights=none")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    task = SegmentationTask(class_names)
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})
    use_cache = cfg.feature_cache and cfg.freeze == "all" and cfg.segmenter.startswith("ours:")
    if use_cache:
        model.to(resolve_device(cfg.device))
        plain = DefectDataset(train, tf_eval, classes=kinds, mask_mode=mode, cache=False)
        t0 = time.perf_counter()
        key = _feature_key_of(cfg, backbone_info, train)
        if _FEATURE_MEMO.get("key") != key:  # runs that differ only in the training seed share one pass
            _FEATURE_MEMO.clear()
            _FEATURE_MEMO.update(key=key, feats=cache_features(model.backbone, plain, variants=8,
                                                               progress=cfg.progress))
        else:
            backbone_info["feature_cache_reused"] = True
        train_feats = _FEATURE_MEMO["feats"]
        test_feats = cache_features(model.backbone, test_ds, variants=1, progress=cfg.progress) if cfg.eval_every \
            else None
        backbone_info["feature_cache_s"] = time.perf_counter() - t0
        trainer = Trainer(DecoderOnly(model, cfg.img_size), train_cfg, train_feats, test_feats,
                          SegmentationTask(class_names, input_key="feats"))
    else:
        trainer = Trainer(model, train_cfg, train_ds, test_ds if cfg.eval_every else None, task)
    fit = trainer.fit()
    # the reported numbers always come from the whole model on the real test images
    metrics = evaluate(model, test_ds, task, batch_size=cfg.eval_batch_size or 32, device=trainer.device,
                       progress=cfg.progress, desc="test")
    result: dict[str, Any] = {
        "test": metrics, "train_images": len(train_ds), "real_defects_train": len(real_train),
        "test_images": len(test_ds), "trainable_params": n_train,
        "params": sum(p.numel() for p in model.parameters()), "wall_time_s": fit.wall_time_s,
        "backbone": backbone_info, "synthetic": synth_info.get("timings", {}), "classes": class_names,
    }
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        kind, _, backbone = cfg.segmenter.partition(":")
        if kind == "ours":
            save_model_file(model, out / "model.safetensors", "segmentation", cfg.segmenter,
                            {"backbone": backbone, "num_classes": len(class_names), "dim": cfg.decoder_dim},
                            fused_backbone=bool(backbone_info.get("fused_for_training")),
                            classes=class_names, img_size=cfg.img_size, mean=list(IMAGENET_MEAN),
                            std=list(IMAGENET_STD), threshold=_finite(metrics.get("F1_threshold"), 0.5),
                            data={"data": cfg.data, "format": cfg.format, "categories": cfg.categories,
                                  "few_shot": cfg.few_shot, "split_seed": cfg.split_seed, "mask_mode": cfg.mask_mode})
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    result.update(output_dir=str(out), model=model, test_dataset=test_ds, history=fit.history)
    return result


def _finite(v: Any, default: float) -> float:
    return float(v) if isinstance(v, int | float) and np.isfinite(v) else default


# --------------------------------------------------------------------------------------------- model files
def _held_out(info: dict[str, Any], data: str | None, fmt: str | None, split: str) -> tuple[list[DefectSample], str]:
    """Test samples for a segmenter file: the images its training did not see when ``data`` is its own data."""
    trained = info.get("data") or {}
    data = data or trained.get("data") or "bundled"
    fmt = fmt or trained.get("format") or "mvtec"
    cats = trained.get("categories") or None
    samples, _ = load_inspection_data(data, split, fmt, cats)
    same = data == trained.get("data") and fmt == trained.get("format") and split == "test"
    if same:  # the few real defects it was trained on are not test images
        _, test = few_shot_split(samples.samples, int(trained["few_shot"]), int(trained["split_seed"]))
        return test, f"{data} ({split} split without the {trained['few_shot']} training defects per kind)"
    return list(samples.samples), f"{data} ({split} split)"


def evaluate_segmenter(model: torch.nn.Module, info: dict[str, Any], data: str | None = None, fmt: str | None = None,
                       split: str = "test", threshold: float | None = None, batch_size: int = 32,
                       device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Metrics of a segmentation model file on inspection data, with the decision rule it is deployed with.

    The IoUs use the file's stored threshold (or ``threshold``), as ``predict`` does; the pixel AUROC and F1-max do
    not depend on it. On the data the model was trained on, the training defects are left out.
    """
    classes = list(info["classes"])
    mode = "binary" if (info.get("data") or {}).get("mask_mode") == "binary" else "kind"
    samples, described = _held_out(info, data, fmt, split)
    if mode == "binary":
        samples = [s if not s.label else DefectSample(s.image, s.mask, 1, s.defect, s.category) for s in samples]
    unknown = sorted({s.defect for s in samples if s.label and mode == "kind"} - set(classes[1:]))
    if unknown:
        raise DataError(f"the data has defect kinds the model does not know: {', '.join(unknown)} (it knows "
                        f"{', '.join(classes[1:])}); evaluate on data with the same kinds")
    thr = threshold if threshold is not None else info.get("threshold")
    ds = DefectDataset(samples, segmentation_transforms(int(info["img_size"]), False, info["mean"], info["std"]),
                       classes=classes[1:], mask_mode=mode)
    metrics = evaluate(model, ds, SegmentationTask(classes, threshold=thr), batch_size=batch_size,
                       device=resolve_device(device), progress=progress, desc="eval")
    return {**metrics, "threshold": thr, "data": described, "images": len(ds)}


def predict_segmenter(model: torch.nn.Module, info: dict[str, Any], images: list[str], out: str | Path,
                      overwrite: bool = False, batch_size: int = 8, threshold: float | None = None,
                      overlays: bool = True, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Stream images through a segmentation model file: class-coded mask PNGs, overlays and ``predictions.csv``.

    Outputs are checked before any image is read (nothing is replaced without ``overwrite``); an unreadable image
    is reported, recorded in the CSV and skipped.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    predictor = SegmentationPredictor.from_model(model, info, threshold, resolve_device(device))

    def outputs(stem: Path) -> list[Path]:
        return [out / f"{stem}_mask.png", *([out / f"{stem}_overlay.png"] if overlays else [])]

    total = check_outputs(images, outputs, overwrite, "out", extra=[out / "predictions.csv"])
    out.mkdir(parents=True, exist_ok=True)
    n_ok = n_bad = 0
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "status", "defect_fraction", "max_score", "classes", "mask"])
        batch: list[tuple[Path, Path, np.ndarray]] = []

        def flush() -> None:
            nonlocal n_ok
            if not batch:
                return
            for (path, stem, arr), p in zip(batch, predictor([a for _, _, a in batch]), strict=True):
                paths = outputs(stem)
                save_png(p.classes, paths[0])
                if overlays:
                    save_png(overlay(arr, p.classes), paths[1])
                names = sorted({info["classes"][c] for c in np.unique(p.classes) if c > 0})
                writer.writerow([str(path), "ok", f"{(p.classes > 0).mean():.6f}", f"{float(p.score.max()):.4f}",
                                 ";".join(names), str(paths[0])])
                n_ok += 1
            bar.update(len(batch))
            batch.clear()

        for path, stem in iter_images(images):
            try:
                arr = read_rgb(path)
            except DataError as exc:
                flush()  # keep the CSV in input order
                n_bad += 1
                writer.writerow([str(path), f"skipped: {exc}", "", "", "", ""])
                print(f"skipped {path}: {exc}", file=sys.stderr)
                bar.update(1)
                continue
            batch.append((path, stem, arr))
            if len(batch) >= batch_size:
                flush()
        flush()
    bar.close()
    return {"images": total, "predicted": n_ok, "skipped": n_bad, "csv": str(out / "predictions.csv"),
            "threshold": predictor.threshold}

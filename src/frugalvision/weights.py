"""The one home of weights and model files: reading, atomic writing, the fit check and model-file kinds.

Everything in the package that reads or writes tensors to disk goes through this module, which sits at the
bottom of the package (it imports only :mod:`frugalvision.errors` and :mod:`frugalvision.utils.io`):

* **Reading** (:func:`read_weights`): safetensors, or PyTorch files (``.pt``, ``.pth``, ``.pth.tar``, ``.bin``,
  ``.ckpt``) through ``torch.load(weights_only=True)``; nothing is ever unpickled, and any other file is refused
  with a message that says what it is. :func:`tensor_names` lists a file's tensors without reading them.
* **Writing** (:func:`write_weights`): safetensors, atomically (temporary file, fsync, rename).
* **The fit check** (:func:`check_fit`, :func:`load_weights`): missing keys, unexpected keys and shape mismatches,
  all reported in one message format that names the file. Weights that do not fit are an error; the only
  exceptions are the ones a caller names (tensors of the file the model does not use, e.g. a classifier head when
  a backbone is loaded; model keys it re-initialises, e.g. a head resized to new classes), and they are reported.
* **Model files** (:func:`save_model_file`, :func:`load_model_file`): a safetensors file whose header says which
  *kind* of model it holds and how to rebuild it. Each kind (:class:`ModelKind`, :func:`register_model_kind`) names
  the function that rebuilds the architecture from the header and the task (classification, segmentation,
  anomaly, ...) that tells ``eval``, ``export`` and ``predict`` what to do with it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

from .errors import CheckpointError
from .utils.io import atomic_path

__all__ = [
    "MODEL_KINDS",
    "ModelKind",
    "WeightsFit",
    "check_fit",
    "load_model_file",
    "load_weights",
    "model_kind_of",
    "read_header",
    "read_model_info",
    "read_safetensors",
    "read_weights",
    "register_model_kind",
    "save_model_file",
    "tensor_names",
    "unwrap_model",
    "write_weights",
]

#: Header key of a frugalvision training checkpoint (its model tensors are stored under ``model/``).
CHECKPOINT_META = "frugalvision"
#: Header key of a model file (weights + how to rebuild the model).
MODEL_META = "frugalvision.model"
TORCH_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module", "net")


# --------------------------------------------------------------------------------------------- reading
def _sniff(path: Path) -> str:
    """``safetensors``, ``torch-zip``, ``pickle`` or a short description of what else the file is."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    if head[:4] == b"\x93NUM":
        return "a NumPy array file"
    if head[:1] == b"\x08":
        return "an ONNX or other protobuf file"
    return "not a safetensors or PyTorch weights file (bad header), or it is truncated"


def _exists(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file.

    Raises:
        CheckpointError: If the file is missing, corrupt or not a safetensors file (the message says what it is).
    """
    path = _exists(Path(path), "weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path}: {_describe_unreadable(path)} ({exc})") from None
    return tensors, metadata


def _describe_unreadable(path: Path) -> str:
    kind = _sniff(path)
    if kind in ("torch-zip", "pickle"):
        return ("it is a PyTorch file, not a safetensors file; read weights from it with "
                "frugalvision.weights.read_weights (torch.load with weights_only=True)")
    if kind == "safetensors":
        return "it is a truncated or corrupt safetensors file"
    return f"it is {kind}" if kind.startswith("a") else kind


def read_header(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file's header, without reading its tensors.

    Example:
        >>> import tempfile, pathlib
        >>> p = write_weights(pathlib.Path(tempfile.mkdtemp()) / "w.safetensors", {"a": torch.ones(1)}, {"k": "v"})
        >>> read_header(p)
        {'k': 'v'}
    """
    path = _exists(Path(path), "weights file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {_describe_unreadable(path)} ({exc})") from None


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors ({first}); only weights-only "
            "files are read. Re-save it as a plain state_dict or as safetensors in a trusted environment."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        if mmap and "mmap" in str(exc):  # the legacy (non-zip) format cannot be memory-mapped
            return _torch_load(path, mmap=False)
        raise CheckpointError(f"cannot read weights file {path}: corrupt or truncated ({exc})") from None


def read_weights(path: str | Path, key: str | None = None, names: Iterable[str] | None = None,
                 mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` mapping.

    Safetensors files are read directly (for a frugalvision training checkpoint: its model part). PyTorch files
    are read with ``torch.load(weights_only=True)``: only tensors (and the ``argparse.Namespace`` that training
    scripts store beside them) are allowed; wrapped state dicts (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_ema": ...}``) are unwrapped. Any other file is refused with a message saying what it is.

    Args:
        path: ``.safetensors`` (any name), ``.pt``, ``.pth``, ``.pth.tar``, ``.bin`` or ``.ckpt``.
        key: Which entry of a wrapped PyTorch dict to use; the first of the usual names when omitted.
        names: Read only these tensors (safetensors reads nothing else; a missing name is an error).
        mmap: Memory-map PyTorch zip files (only the tensors used are paged in).

    Raises:
        CheckpointError: If the file is missing, corrupt, not a weights file or would need unsafe unpickling.

    Example:
        >>> import tempfile, pathlib
        >>> p = write_weights(pathlib.Path(tempfile.mkdtemp()) / "w.safetensors", nn.Linear(2, 2))
        >>> sorted(read_weights(p))
        ['bias', 'weight']
    """
    path = _exists(Path(path), "weights file")
    kind = _sniff(path)
    wanted = None if names is None else list(names)
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                prefix = "model/" if CHECKPOINT_META in meta else ""
                have = [k for k in fh.keys() if k.startswith(prefix)]  # noqa: SIM118
                if wanted is not None:
                    absent = [n for n in wanted if prefix + n not in have]
                    if absent:
                        raise CheckpointError(f"weights file {path} has no tensor {absent[0]!r}")
                    have = [prefix + n for n in wanted]
                return {k[len(prefix):]: fh.get_tensor(k) for k in have}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {path}: {_describe_unreadable(path)} ({exc})") from None
    if kind not in ("torch-zip", "pickle"):
        raise CheckpointError(f"cannot read weights file {path}: {kind}; give a .safetensors file or a PyTorch "
                              f"state_dict file ({', '.join(TORCH_SUFFIXES)})")
    obj = _torch_load(path, mmap=mmap and kind == "torch-zip")
    if isinstance(obj, Mapping):
        for k in ([key] if key else _WRAPPER_KEYS):
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
        else:
            if key:
                raise CheckpointError(f"weights file {path} has no entry {key!r}; it has {', '.join(map(str, obj))}")
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path} does not hold a state_dict of tensors")
    out = {str(k): v for k, v in obj.items()}
    if wanted is not None:
        absent = [n for n in wanted if n not in out]
        if absent:
            raise CheckpointError(f"weights file {path} has no tensor {absent[0]!r}")
        out = {n: out[n] for n in wanted}
    return out


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a weights file; a safetensors file's tensors are not read.

    Example:
        >>> import tempfile, pathlib
        >>> tensor_names(write_weights(pathlib.Path(tempfile.mkdtemp()) / "w.safetensors", nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    path = _exists(Path(path), "weights file")
    if _sniff(path) == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                return sorted(fh.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {_describe_unreadable(path)} ({exc})") from None
    return sorted(read_weights(path, mmap=True))


# --------------------------------------------------------------------------------------------- writing
def _detach_unique(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def write_weights(path: str | Path, weights: nn.Module | Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write a module's ``state_dict`` (or a tensor mapping) as safetensors, atomically.

    An interrupted write leaves the previous file intact; tensors sharing memory are stored separately.

    Example:
        >>> import tempfile, pathlib
        >>> p = write_weights(pathlib.Path(tempfile.mkdtemp()) / "w.safetensors", nn.Linear(2, 2))
        >>> p.name
        'w.safetensors'
    """
    tensors = unwrap_model(weights).state_dict() if isinstance(weights, nn.Module) else weights
    with atomic_path(path) as tmp:
        save_file(_detach_unique(tensors), str(tmp), metadata=dict(metadata or {}))
    return Path(path)


# --------------------------------------------------------------------------------------------- the fit check
def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


@dataclass
class WeightsFit:
    """How a set of weights fits a model: what was loaded and what was left out, with the reasons.

    Attributes:
        loaded: Model keys given a tensor from the file.
        missing: Model keys the file has no tensor for.
        unexpected: File tensors the model has no key for.
        mismatched: ``(key, file shape, model shape)`` of keys whose shapes differ.
        skipped: Model keys left as initialised because the caller allowed it (``reinit``).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        """Counts for logs and result files."""
        return {"loaded": len(self.loaded), "unused": len(self.unexpected), "reinitialised": len(self.skipped)}


def _show(keys: list[str]) -> str:
    head = ", ".join(keys[:6])
    return head + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("ch") else "s"))


def check_fit(expected: Mapping[str, Any], got: Mapping[str, Any], source: str | Path, what: str = "the model",
              allow_unused: bool = False, reinit: Iterable[str] = ()) -> WeightsFit:
    """Compare a model's keys and shapes with a file's; raise one clear error if they do not fit.

    Args:
        expected: The model's ``state_dict()`` (or ``{key: shape}``).
        got: The file's tensors (or ``{key: shape}``).
        source: The file (named in the message).
        what: The model (named in the message).
        allow_unused: File tensors the model does not use are fine (e.g. a classifier's head when loading its
            backbone); they are listed in :attr:`WeightsFit.unexpected`.
        reinit: Key prefixes of the model that may be absent from the file or differ in shape (e.g. a classifier
            head resized to new classes); they keep their initial values and are listed in ``skipped``.

    Returns:
        The fit (what loads, what is unused or left as initialised).

    Raises:
        CheckpointError: ``weights <file> do not fit <what>: N missing keys (...); M unexpected keys (...);
            K shape mismatches (key: file (..) vs model (..))``.

    Example:
        >>> check_fit({"a": (2,)}, {"a": (2,)}, "w.safetensors").loaded
        ['a']
        >>> check_fit({"a": (2,), "b": (1,)}, {"a": (3,)}, "w.safetensors", "toy")
        Traceback (most recent call last):
        ...
        frugalvision.errors.CheckpointError: weights w.safetensors do not fit toy: 1 missing key (b); 1 shape ...
    """
    prefixes = tuple(reinit)
    fit = WeightsFit()
    for k, v in expected.items():
        if k not in got:
            (fit.skipped if prefixes and k.startswith(prefixes) else fit.missing).append(k)
        elif _shape(got[k]) != _shape(v):
            if prefixes and k.startswith(prefixes):
                fit.skipped.append(k)
            else:
                fit.mismatched.append((k, _shape(got[k]), _shape(v)))
        else:
            fit.loaded.append(k)
    fit.unexpected = [k for k in got if k not in expected]
    problems = []
    if fit.missing:
        problems.append(f"{_plural(len(fit.missing), 'missing key')} ({_show(fit.missing)})")
    if fit.unexpected and not allow_unused:
        problems.append(f"{_plural(len(fit.unexpected), 'unexpected key')} ({_show(fit.unexpected)})")
    if fit.mismatched:
        shown = [f"{k}: file {a} vs model {b}" for k, a, b in fit.mismatched]
        problems.append(f"{_plural(len(shown), 'shape mismatch')} ({_show(shown)})")
    if problems:
        raise CheckpointError(f"weights {source} do not fit {what}: " + "; ".join(problems)
                              + ". Is the file a checkpoint of this architecture and configuration?")
    return fit


def load_weights(module: nn.Module, weights: str | Path | Mapping[str, torch.Tensor], source: str | Path | None = None,
                 what: str | None = None, key_map: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                 | None = None, allow_unused: bool = False, reinit: Iterable[str] = ()) -> WeightsFit:
    """Check that weights fit ``module`` (:func:`check_fit`), then load them; the module is unchanged on error.

    Args:
        module: The model (a DDP wrapper is unwrapped).
        weights: A weights file (:func:`read_weights`) or a tensor mapping.
        source: Names the weights in messages (the file's path by default).
        what: Names the model in messages (its class by default).
        key_map: Renames the file's keys first (e.g. a family's ``checkpoint_filter_fn``).
        allow_unused: See :func:`check_fit`.
        reinit: See :func:`check_fit`.

    Example:
        >>> src, dst = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> load_weights(dst, src.state_dict(), source="memory").summary()
        {'loaded': 2, 'unused': 0, 'reinitialised': 0}
        >>> bool((dst.weight == src.weight).all())
        True
    """
    target = unwrap_model(module)
    if isinstance(weights, str | Path):
        source = source or weights
        weights = read_weights(weights)
    tensors = dict(weights)
    if key_map is not None:
        tensors = key_map(tensors)
    own = target.state_dict()
    fit = check_fit(own, tensors, source or "(in memory)", what or type(target).__name__, allow_unused, reinit)
    target.load_state_dict({k: tensors[k] for k in fit.loaded}, strict=not fit.skipped)
    return fit


# --------------------------------------------------------------------------------------------- model files
@dataclass(frozen=True)
class ModelKind:
    """A kind of model file: how its architecture is rebuilt from the header, and what task it serves.

    Attributes:
        name: Stored in the file's header (``"kind"``).
        task: What ``eval``, ``export`` and ``predict`` do with it: ``classification`` (image -> logits),
            ``segmentation`` (image -> per-pixel logits), ``anomaly`` (image -> ``AnomalyOutput``), or a task that
            later work adds.
        build: ``"module:function"`` (imported when first used, so this module depends on nothing above it) or a
            callable; ``build(info)`` returns the architecture, weights not loaded, from the header's description.
    """

    name: str
    task: str
    build: str | Callable[[dict[str, Any]], nn.Module]

    def builder(self) -> Callable[[dict[str, Any]], nn.Module]:
        """The build function (imports its module on first use)."""
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind, replace: bool = False) -> ModelKind:
    """Add a kind of model file (see :class:`ModelKind`).

    Example:
        >>> k = register_model_kind(ModelKind("toy_demo", "classification", lambda info: nn.Linear(2, 2)))
        >>> MODEL_KINDS.pop("toy_demo").task
        'classification'
    """
    if kind.name in MODEL_KINDS and MODEL_KINDS[kind.name] != kind and not replace:
        raise ValueError(f"model-file kind {kind.name!r} is already registered")
    MODEL_KINDS[kind.name] = kind
    return kind


for _kind in (
    ModelKind("classifier", "classification", "frugalvision.models.factory:build_classifier"),
    ModelKind("segmentation", "segmentation", "frugalvision.models.heads.seg:build_segmentation_model"),
    ModelKind("surgery", "classification", "frugalvision.surgery:build_modulated"),
    ModelKind("patchcore", "anomaly", "frugalvision.inspect.anomaly.patchcore:build_patchcore"),
    ModelKind("anomalyclip", "anomaly", "frugalvision.inspect.anomaly.anomalyclip:build_anomalyclip_from_info"),
    ModelKind("detector", "detection", "frugalvision.detect.yolov6:build_detector_from_info"),
    ModelKind("mask_frozen", "detection", "frugalvision.detect.mask_frozen:build_mask_frozen_from_info"),
    ModelKind("vlm", "vlm", "frugalvision.language.vlm_file:build_vlm_from_info"),
    ModelKind("svg_reader", "svg_reader", "frugalvision.language.svg_read:build_reader_module"),
    ModelKind("seed_tokenizer", "seed_tokenizer", "frugalvision.language.seed_file:build_seed_from_info"),
    ModelKind("seed_lm", "seed_lm", "frugalvision.language.seed_file:build_seed_lm_from_info"),
    ModelKind("seed_pixel_decoder", "seed_pixel_decoder",
              "frugalvision.language.seed_decoder:build_pixel_decoder_from_info"),
):
    register_model_kind(_kind)


def save_model_file(model: nn.Module, path: str | Path, kind: str, name: str,
                    model_kwargs: Mapping[str, Any] | None = None, **meta: Any) -> Path:
    """Save weights plus what rebuilds the model: its ``kind``, ``name``, constructor ``model_kwargs`` and ``meta``.

    ``meta`` holds what the file's users need (classes, input size, normalisation, thresholds, ...); it must be
    JSON-serialisable. The file is written atomically.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> _ = save_model_file(nn.Linear(2, 3), p, "classifier", "toy", classes=["a", "b", "c"])
        >>> read_model_info(p)["classes"]
        ['a', 'b', 'c']
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model-file kind {kind!r}; registered: {', '.join(sorted(MODEL_KINDS))}")
    info = {"kind": kind, "name": name, "model_kwargs": dict(model_kwargs or {}), **meta}
    try:
        header = json.dumps(info)
    except TypeError as exc:
        raise ValueError(f"model-file description is not JSON-serialisable: {exc}") from None
    return write_weights(path, model, metadata={MODEL_META: header})


def model_kind_of(info: Mapping[str, Any]) -> str:
    """The kind of a model file's description (files written before kinds existed are recognised too).

    Example:
        >>> model_kind_of({"name": "resnet18"}), model_kind_of({"name": "segmentation"})
        ('classifier', 'segmentation')
    """
    if "kind" in info:
        return str(info["kind"])
    if info.get("surgery"):
        return "surgery"
    if info.get("name") in ("segmentation", "patchcore", "anomalyclip"):
        return str(info["name"])
    return "classifier"


def read_model_info(path: str | Path) -> dict[str, Any]:
    """The description stored in a model file by :func:`save_model_file` (with its ``kind``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    header = read_header(path)
    if MODEL_META not in header:
        raise CheckpointError(
            f"{path} has no model description (it is plain weights or a training checkpoint); give the model name "
            f"and load it as weights (model=NAME weights={path})"
        )
    try:
        info = json.loads(header[MODEL_META])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"model file {path} has a corrupt description: {exc}") from None
    info["kind"] = model_kind_of(info)
    return info


def load_model_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a model file (any registered kind), load its weights strictly; eval mode.

    Returns:
        The model and the file's description (``info["kind"]``, and ``MODEL_KINDS[info["kind"]].task``).

    Raises:
        CheckpointError: Missing or foreign file, an unknown kind, or weights that do not fit the description.
    """
    info = read_model_info(path)
    kind = MODEL_KINDS.get(info["kind"])
    if kind is None:
        raise CheckpointError(f"{path} holds a model of kind {info['kind']!r}, which this version of frugalvision "
                              f"does not know (known: {', '.join(sorted(MODEL_KINDS))}); upgrade the package")
    model = kind.builder()(info)
    load_weights(model, path, what=f"its description ({info['kind']} {info.get('name')})")
    return model.eval(), info

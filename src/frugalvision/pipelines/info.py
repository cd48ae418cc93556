"""Small jobs: ``frugalvision data`` (build the bundled datasets), ``models`` (list them) and ``info``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["DataConfig", "InfoConfig", "ModelsConfig", "build_data", "describe", "list_models"]


@dataclass
class DataConfig:
    """Build a bundled real-image dataset (no downloads) and print where it is.

    Attributes:
        name: textures, digits, faces, inspection (the defect benchmark), or all.
        rebuild: Rebuild even if the cached copy exists.
    """

    name: str = "all"
    rebuild: bool = False


@dataclass
class ModelsConfig:
    """List registered models.

    Attributes:
        pattern: Shell-style filter (e.g. ``fastervit*``).
        all: List every timm model, not only frugalvision's.
    """

    pattern: str | None = None
    all: bool = False


@dataclass
class InfoConfig:
    """Print versions, hardware and cache location."""


def build_data(cfg: DataConfig) -> str:
    """Build the named bundled datasets; one line per dataset (folder, sizes)."""
    from ..data import BUNDLED, build_bundled, load_bundled

    names = [cfg.name] if cfg.name != "all" else [*BUNDLED, "inspection"]
    unknown = [n for n in names if n not in BUNDLED and n != "inspection"]
    if unknown:
        raise ConfigError(f"unknown bundled dataset {unknown[0]!r}; available: {', '.join(BUNDLED)}, inspection, all")
    lines = []
    for n in names:
        if n == "inspection":
            from ..inspect.bundled import build_benchmark, load_benchmark

            folder = build_benchmark(force=cfg.rebuild)
            test = load_benchmark("test")
            lines.append(f"inspection: {folder}  train/good {len(load_benchmark('train'))}, test {len(test)} "
                         f"({len(test.categories)} categories x {len(test.defects)} defect kinds, MVTec AD layout)")
            continue
        folder = build_bundled(n, force=cfg.rebuild)
        sizes = {s: len(load_bundled(n, s)) for s in ("train", "val", "test")}
        lines.append(f"{n}: {folder}  {sizes}  ({BUNDLED[n].description})")
    return "\n".join(lines)


def list_models(cfg: ModelsConfig) -> str:
    """Registered model names matching the pattern, one per line."""
    import timm

    from .. import models

    pattern = cfg.pattern or "*"
    names = timm.list_models(pattern)
    if not cfg.all:
        names = [n for n in names if timm.models.model_entrypoint(n).__module__.startswith(models.__name__)]
    return "\n".join(names) if names else f"no registered model matches {pattern!r}"


def describe(cfg: InfoConfig) -> dict[str, Any]:
    """Versions, hardware and the cache folder."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ..bench import machine_info
    from ..data import cache_dir

    try:
        ours = version("frugalvision")
    except PackageNotFoundError:  # a source tree that is not installed
        ours = "unknown (not installed)"
    info = machine_info("cpu")
    return {"frugalvision": ours, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "cpu": info.cpu, "cores": info.cores, "threads": info.threads, "cache_dir": str(cache_dir())}

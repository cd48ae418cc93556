"""Optional dependencies: import on demand with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

#: module name -> (pip extra, what it is for)
_EXTRAS: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "transformers": "lm",
    "open_clip": "clip",
    "diffusers": "diffusion",
    "openvino": "openvino",
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

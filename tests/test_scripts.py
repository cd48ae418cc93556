"""Every benchmark and experiment script imports: a renamed or removed library name fails here, not in a long run.

The scripts are imported by path (their ``main`` does not run); a script whose import needs an optional package
that is not installed is skipped with the package's name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "experiments").glob("*.py")])
# Packages a script may import that the package's extras do not install (reference implementations, rival tools).
OPTIONAL = {"anomalib", "fastervit", "openvino", "segmentation_models_pytorch"}


@pytest.mark.parametrize("path", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_script_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # scripts import their neighbours
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in OPTIONAL:
            pytest.skip(f"{path.name} needs the optional package {top!r}, which is not installed")
        raise
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"

"""The package's import graph: layers, no imports of jobs from the library, no cycles.

Every import counts, including those inside functions (a lazy import is still a dependency). The layers, bottom
first; a module may import its own layer and the ones below, and the parts of one layer must not import each
other in a cycle:

0. ``errors``, ``_deps``, ``utils``         (no frugalvision imports but these)
1. ``weights``, ``config``                   (weights and model files; configs)
2. ``data``, ``models``                      (datasets; architectures: never the engine)
3. ``engine``                                (training loops, checkpoints)
4. ``export``, ``bench``, ``report``         (ONNX, fusion; timing; HTML)
5. ``adapt``, ``surgery``, ``inspect``, ``detect``, ``language``  (the library's methods)
6. ``pipelines``                             (every job behind a command)
7. ``cli`` and the package root
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "frugalvision"
LAYERS = [
    {"errors", "_deps", "utils"},
    {"weights", "config"},
    {"data", "models"},
    {"engine"},
    {"export", "bench", "report"},
    {"adapt", "surgery", "inspect", "detect", "language"},
    {"pipelines"},
    {"cli", ""},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / PKG).rglob("*.py")):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith(PKG):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                graph[name].update(subs or [target])
                if len(subs) < len(node.names):
                    graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith(PKG))
        graph[name].discard(name)
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = _graph()


def test_every_part_of_the_package_has_a_layer():
    assert {_part(m) for m in _modules()} <= set(LAYER_OF), "a new top-level module needs a place in LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    here = LAYER_OF[_part(module)]
    up = sorted(t for t in GRAPH[module] if LAYER_OF[_part(t)] > here)
    assert not up, f"{module} (layer {here}) imports from a higher layer: {up}"


def test_library_never_imports_jobs_and_models_never_import_the_engine():
    for module, targets in GRAPH.items():
        if _part(module) not in ("pipelines", "cli", ""):
            assert not [t for t in targets if _part(t) == "pipelines"], module
        if _part(module) == "models":
            assert not [t for t in targets if _part(t) in ("engine", "pipelines")], module
    assert {_part(t) for t in GRAPH["frugalvision.weights"]} <= {"errors", "utils"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles_between_modules():
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_cycles_between_the_parts_of_a_layer():
    parts: dict[str, set[str]] = defaultdict(set)
    for m, ts in GRAPH.items():
        parts[_part(m)].update(_part(t) for t in ts if _part(t) != _part(m))
    assert _cycle(parts) is None, " -> ".join(_cycle(parts) or [])


def test_the_checker_sees_lazy_imports():
    """The rules above would be empty if function-level imports were missed."""
    assert "frugalvision.pipelines.inspection" in GRAPH["frugalvision.pipelines.model_file"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]

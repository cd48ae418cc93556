"""Every ``>>>`` example in the package's docstrings runs and gives what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import frugalvision

#: Modules whose examples load a runtime that must stay out of this process; tests/test_openvino.py runs them
#: in a fresh interpreter.
ISOLATED = {"frugalvision.export.openvino"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(frugalvision.__path__, "frugalvision.")
                 if m.name not in ISOLATED)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"

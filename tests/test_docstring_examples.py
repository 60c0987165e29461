"""Every ``>>>`` example in medseg's docstrings runs and prints what it says.

An example that had drifted from its function (``unet_topology``'s kernel sizes) read as
documentation for months: nothing ran them."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import medseg


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(medseg.__path__, "medseg."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as handle:
            if ">>>" in handle.read():
                names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert "medseg.planning.network_topology" in MODULES and len(MODULES) >= 10


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for test in finder.find(module, name):  # each with a copy of its module's globals, as pytest's doctests
        if test.examples:
            examples += len(test.examples)
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert examples > 0 or ">>>" in (module.__doc__ or "")
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"

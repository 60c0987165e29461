"""Access to the reference implementation (Betti-Matching-3D, vendored in topolosses).

``topolosses==0.2.0`` is a test-only dependency, installed with ``--no-deps``; its
compiled ``betti_matching`` extension is loaded directly from the file so that
topolosses' own Python package (which imports torch and more) is never imported.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def load_reference():
    """The reference extension module, or None when topolosses is not installed."""
    spec = importlib.util.find_spec("topolosses")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = os.path.join(spec.submodule_search_locations[0], "losses", "betti_matching", "src")
    if not os.path.isdir(base):
        return None
    for name in sorted(os.listdir(base)):
        if name.startswith("betti_matching") and name.endswith(".so"):
            s = importlib.util.spec_from_file_location("betti_matching", os.path.join(base, name))
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
            return module
    return None


_REFERENCE = load_reference()


@pytest.fixture(scope="session")
def reference():
    if _REFERENCE is None:
        pytest.skip("reference implementation not installed (pip install topolosses==0.2.0 --no-deps)")
    return _REFERENCE

"""Access to the reference implementation (Betti-Matching-3D, vendored in topolosses).

``topolosses==0.2.0`` is a test-only dependency, installed with ``--no-deps``; its
compiled ``betti_matching`` extension is loaded directly from the file so that
topolosses' own Python package (which imports torch and more) is never imported.
Without topolosses the tests that use the ``reference`` fixture fail (see
``topolosses_spec`` in tests/conftest.py; ``MEDSEG_ALLOW_MISSING_REFERENCE=1`` skips them).
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def load_reference(spec):
    """The reference extension module of topolosses (its import ``spec``), or None when it has none."""
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


@pytest.fixture(scope="session")
def reference(topolosses_spec):
    module = load_reference(topolosses_spec)
    if module is None:
        pytest.fail(f"{topolosses_spec.origin}: topolosses without its compiled betti_matching extension "
                    "(reinstall: pip install --no-deps --force-reinstall topolosses==0.2.0)", pytrace=False)
    return module

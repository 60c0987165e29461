"""Shared fixtures: small synthetic datasets, generated once per test session.

Dataset fixtures return the dataset root (``dataset.json``, ``imagesTr/``,
``labelsTr/``, ``imagesTs/``, ``labelsTs/``); treat them as read-only, they are shared.
For other sizes use ``make_synthetic_dataset(**kwargs)`` (arguments of
:func:`medseg.data.synthetic.make_dataset`; results are cached per argument set).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import medseg  # noqa: F401
except ImportError:  # tests run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.synthetic import make_dataset  # noqa: E402

# 6 training + 2 test cases of 32^3 voxels, spacing (0.8, 0.8, 1.2) mm, LPS-like axes
SYNTHETIC_3D = dict(cases=6, test_cases=2, size=32, dims=3, seed=0)
# 8 training + 2 test cases of 64^2 pixels, 2D NIfTI
SYNTHETIC_2D = dict(cases=8, test_cases=2, size=64, dims=2, seed=0)


@pytest.fixture(scope="session", autouse=True)
def _medseg_cache(tmp_path_factory):
    """Every test's preprocessing cache lives in the session's temporary folder, never in
    the user's ``~/.cache/medseg`` (subprocesses inherit the variable)."""
    previous = os.environ.get("MEDSEG_CACHE")
    os.environ["MEDSEG_CACHE"] = str(tmp_path_factory.mktemp("medseg_cache"))
    yield
    if previous is None:
        os.environ.pop("MEDSEG_CACHE", None)
    else:
        os.environ["MEDSEG_CACHE"] = previous


@pytest.fixture
def one_thread():
    """One torch thread for the test, then the previous count: bitwise comparisons of runs
    (exact resume, cache contents, torchrun workers) need the same thread count everywhere.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def topolosses_spec():
    """The import spec of ``topolosses==0.2.0``, the reference implementations the
    independent cross-checks compare with (Betti matching, clDice).

    A test-only dependency that ``scripts/setup.sh`` installs (``pip install --no-deps
    topolosses==0.2.0``). Missing, it fails the tests that need it, so that CI cannot pass
    without the cross-checks; ``MEDSEG_ALLOW_MISSING_REFERENCE=1`` turns that into a skip.
    """
    import importlib.util

    spec = importlib.util.find_spec("topolosses")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        message = "topolosses is not installed (pip install --no-deps topolosses==0.2.0, as scripts/setup.sh does)"
        if os.environ.get("MEDSEG_ALLOW_MISSING_REFERENCE") == "1":
            pytest.skip(message)
        pytest.fail(message + "; MEDSEG_ALLOW_MISSING_REFERENCE=1 skips the cross-checks instead", pytrace=False)
    return spec


@pytest.fixture(scope="session")
def make_synthetic_dataset(tmp_path_factory):
    """Factory: ``make_synthetic_dataset(cases=4, size=48, ...) -> Path`` (cached)."""
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("synthetic") / "dataset"
            make_dataset(root, **kwargs)
            cache[key] = root
        return cache[key]

    return make


@pytest.fixture(scope="session")
def synthetic_dataset_3d(make_synthetic_dataset) -> Path:
    """Source-domain 3D vessel trees (:data:`SYNTHETIC_3D`)."""
    return make_synthetic_dataset(**SYNTHETIC_3D)


@pytest.fixture(scope="session")
def shifted_dataset_3d(make_synthetic_dataset) -> Path:
    """The same trees as ``synthetic_dataset_3d`` in the shifted domain (other
    contrast, noise, bias and spacing, hence other shapes; same case names)."""
    return make_synthetic_dataset(**SYNTHETIC_3D, shifted=True)


@pytest.fixture(scope="session")
def synthetic_dataset_2d(make_synthetic_dataset) -> Path:
    """2D vessel trees as 2D NIfTI (:data:`SYNTHETIC_2D`)."""
    return make_synthetic_dataset(**SYNTHETIC_2D)


@pytest.fixture(scope="session")
def synthetic_dataset_2d_png(make_synthetic_dataset) -> Path:
    """The 2D dataset as natural-image PNGs (uint8 images, 0/1 labels, no geometry)."""
    return make_synthetic_dataset(**SYNTHETIC_2D, file_ending=".png")

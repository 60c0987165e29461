"""Fixtures of the preprocessing tests (the cache lives in the session's temporary folder: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cache_helpers import make_padded_dataset


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs with one torch thread (tests/conftest.py's one_thread)."""


@pytest.fixture(scope="session")
def padded_dataset(tmp_path_factory) -> Path:
    return make_padded_dataset(tmp_path_factory.mktemp("padded") / "Dataset900_Padded")


@pytest.fixture(scope="session")
def binary_padded_dataset(tmp_path_factory) -> Path:
    """padded_dataset with one foreground class (the MIP loss's whole-volume target takes one)."""
    return make_padded_dataset(tmp_path_factory.mktemp("padded_binary") / "Dataset901_PaddedBinary", binary=True)

"""Fixtures of the preprocessing tests (the cache lives in the session's temporary folder: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_helpers import make_padded_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    # the cache is written with one torch thread; compare with the same
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def padded_dataset(tmp_path_factory) -> Path:
    return make_padded_dataset(tmp_path_factory.mktemp("padded") / "Dataset900_Padded")

"""Fixtures of the adaptation tests: a source run trained once per session, and a target domain.

The target domain is the source anatomy (same trees) in the shifted grid, imaged with
strongly reduced vessel contrast (:data:`adapt_helpers.LOW_CONTRAST`): the source model,
trained on bright vessels, under-segments it badly, which is where adaptation has
something to fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapt_helpers import make_target_dataset, train_source
from medseg.data.synthetic import make_dataset


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs with one torch thread (tests/conftest.py's one_thread)."""


@pytest.fixture(scope="session")
def source_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapt_src") / "dataset"
    make_dataset(root, cases=6, test_cases=0, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def target_dataset(tmp_path_factory) -> Path:
    return make_target_dataset(tmp_path_factory.mktemp("adapt_tgt") / "dataset")


@pytest.fixture(scope="session")
def shifted_target_dataset(tmp_path_factory) -> Path:
    """The generator's standard shifted domain (SHIFTED_DOMAIN): the source model over-segments noise there."""
    from medseg.data.synthetic import SHIFTED_DOMAIN

    return make_target_dataset(tmp_path_factory.mktemp("adapt_tgt_shifted") / "dataset", params=SHIFTED_DOMAIN)


@pytest.fixture(scope="session")
def source_run(tmp_path_factory, source_dataset) -> Path:
    """A tiny UNet trained for 200 steps on the source domain (about 10 s); read-only."""
    return train_source(source_dataset, tmp_path_factory.mktemp("adapt_run") / "source")

"""Fixtures of the input-fuzzing tests (helpers in fuzz_helpers.py): tiny datasets in every
file format medseg reads, and a tiny trained model for ``predict``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fuzz_helpers import TINY_TRAIN, run_cli

ENDINGS_3D = (".nii.gz", ".nii", ".nrrd", ".mha")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def datasets(make_synthetic_dataset) -> dict[str, Path]:
    """File ending -> a dataset of 2 training and 1 test case (16^3, or 32^2 PNG); read-only."""
    out = {e: make_synthetic_dataset(cases=2, test_cases=1, size=16, dims=3, seed=0, file_ending=e) for e in ENDINGS_3D}
    out[".png"] = make_synthetic_dataset(cases=2, test_cases=1, size=32, dims=2, seed=0, file_ending=".png")
    return out


@pytest.fixture(scope="session")
def tiny_model(datasets, tmp_path_factory) -> Path:
    """A 3D UNet trained for 2 iterations on the .nii.gz dataset (a run folder); read-only."""
    root = tmp_path_factory.mktemp("fuzz_model")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAIN(datasets[".nii.gz"], root / "run", iterations=2)))
    result = run_cli(["train", config])
    assert result.code == 0, result.err + (result.escaped or "")
    return root / "run"


def pytest_terminal_summary(terminalreporter):
    lines = [value for reports in terminalreporter.stats.values() for r in reports
             for key, value in getattr(r, "user_properties", ()) if key == "fuzzed" and getattr(r, "when", "") == "call"]
    if lines:
        terminalreporter.section("inputs fuzzed")
        for line in lines:
            terminalreporter.write_line(line)

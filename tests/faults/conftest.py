"""Fixtures of the fault-injection and input tests (helpers in fault_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fault_helpers import KillServer, Run, train_config


@pytest.fixture(scope="session")
def killer():
    server = KillServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_dataset(make_synthetic_dataset) -> Path:
    """3 training cases (2 train + 1 validation) and 2 test cases of 16^3 voxels."""
    return make_synthetic_dataset(cases=3, test_cases=2, size=16, dims=3, seed=0)


@pytest.fixture(scope="session")
def tiny_run(killer, tiny_dataset, tmp_path_factory) -> Path:
    """A finished tiny training run (the model of the predict, evaluate and adapt sweeps); read-only."""
    root = tmp_path_factory.mktemp("faults_run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(train_config(tiny_dataset, root / "run")))
    [done] = killer.run([Run(["train", config], root).spec("train")])
    assert done["code"] == 0, (root / "train.err").read_text()[-3000:]
    return root / "run"


@pytest.fixture(scope="session")
def tiny_target(make_synthetic_dataset) -> Path:
    """The tiny dataset's anatomy in the shifted domain (other contrast and spacing)."""
    return make_synthetic_dataset(cases=3, test_cases=0, size=16, dims=3, seed=0, shifted=True)


def pytest_terminal_summary(terminalreporter):
    lines = [value for reports in terminalreporter.stats.values() for r in reports
             for key, value in getattr(r, "user_properties", ()) if key == "reliability"
             and getattr(r, "when", "call") == "call"]
    if lines:
        terminalreporter.section("reliability")
        for line in lines:
            terminalreporter.write_line(line)

"""Fixtures of the study tests: a tiny 2D dataset, a tiny base config and a study writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

# 4 training + 2 test cases of 32x32 pixels (2D NIfTI)
TINY_2D = dict(cases=4, test_cases=2, size=32, dims=2, seed=0)

BASE = {
    "data": {"patch_size": [32, 32], "orientation": None, "val_fraction": 0.25, "num_workers": 0},
    "model": {"name": "unet", "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
    "train": {"iterations": 100, "batch_size": 2, "val_interval": 2, "checkpoint_interval": 1, "log_interval": 1},
    "output_dir": "ignored-by-the-study",
    "device": "cpu",
}

VARIANTS = {
    "cedice": {"losses": [{"name": "dice_ce", "weight": 1.0}]},
    "cldice": {"losses": [{"name": "dice_ce", "weight": 1.0}, {"name": "cldice", "weight": 0.5}]},
}


@pytest.fixture(scope="session")
def tiny_dataset(make_synthetic_dataset) -> Path:
    """Read-only: shared by the study tests."""
    return make_synthetic_dataset(**TINY_2D)


@pytest.fixture
def write_study(tiny_dataset, tmp_path):
    """``write_study(**changes) -> Path``: base.yaml and study.yaml in tmp_path (two variants, two seeds, 2 iterations)."""

    def write(base_config: dict | None = None, **changes) -> Path:
        base_path = tmp_path / "base.yaml"
        base_path.write_text(yaml.safe_dump(base_config if base_config is not None else BASE))
        study = {
            "base": str(base_path),
            "set": {"data.dataset": str(tiny_dataset), "train.iterations": 2},
            "variants": VARIANTS,
            "seeds": [0, 1],
            "test": {"synth": {"images": "{dataset}/imagesTs", "labels": "{dataset}/labelsTs"}},
            "output_dir": str(tmp_path / "study"),
        }
        study.update(changes)
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        return path

    return write

"""Validation Dice: a class no validation case contains is reported, not shown as a score."""

from __future__ import annotations

import logging

import torch

from medseg.config import validate_config
from medseg.training import validation


def test_a_class_absent_from_every_validation_case_is_reported(tmp_path, caplog, monkeypatch):
    """A validation split without foreground logged 'val Dice 0.0000 *best*' as a score,
    and best.pt stayed at the first validation, with no word."""
    monkeypatch.setattr(validation, "_ABSENT_REPORTED", set())
    cfg = validate_config({"data": {"dataset": str(tmp_path), "patch_size": [8, 8]}, "train": {"iterations": 1},
                           "output_dir": str(tmp_path / "run")})
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 3, 1)
    label = torch.zeros(1, 8, 8)
    label[0, :3, :3] = 1  # class 1 present, class 2 in no case
    cases = [{"image": torch.rand(1, 8, 8), "label": label}]
    with caplog.at_level(logging.WARNING, logger="medseg.training"):
        scores = validation.validate(model, cases, cfg, 3, torch.device("cpu"))
        validation.validate(model, cases, cfg, 3, torch.device("cpu"))
    assert scores[1] == 0.0
    warnings = [r.getMessage() for r in caplog.records if "no validation case contains" in r.getMessage()]
    assert len(warnings) == 1 and "class(es) 2:" in warnings[0]  # once, naming the class


def test_a_class_no_training_case_contains_is_reported(synthetic_dataset_3d, tmp_path, caplog):
    """All-background training labels trained in silence (only the validation split was
    checked)."""
    import shutil

    from medseg.data.io import read_image, write_image
    from medseg.training.data import prepare_data

    from test_trainer import _raw

    dataset = tmp_path / "data"
    shutil.copytree(synthetic_dataset_3d, dataset)
    for label in (dataset / "labelsTr").iterdir():
        array, geometry = read_image(label)
        write_image(label, array * 0, geometry)
    raw = _raw(dataset, tmp_path / "run", iterations=2)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="medseg.training"):
        prepare_data(validate_config(raw))
    warnings = [r.getMessage() for r in caplog.records if "no training case contains" in r.getMessage()]
    assert len(warnings) == 1 and "class(es) 1 (vessel)" in warnings[0]

"""Helpers of the adaptation tests (datasets, a tiny source run, configs, folder hashes)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from medseg.config import validate_config
from medseg.data.dataset import write_dataset_json
from medseg.data.io import write_image
from medseg.data.synthetic import LABELS, SOURCE_DOMAIN, make_case

# The source anatomy imaged with strongly reduced vessel contrast (300 -> 130 HU): the
# source model under-segments it (target Dice about 0.2 against 0.9 on the source).
LOW_CONTRAST = replace(SOURCE_DOMAIN, vessel=130.0)
TINY_UNET = {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}}


def make_target_dataset(out: Path, params=LOW_CONTRAST, cases: int = 6, size: int = 32, seed: int = 0,
                        channels: int = 1) -> Path:
    """The source trees in the shifted grid imaged with ``params``; labels in labelsTr (for evaluation only)."""
    import numpy as np

    for i in range(cases):
        case = make_case(i, seed=seed, size=size, shifted=True, params=params)
        for c in range(channels):
            write_image(out / "imagesTr" / f"{case['name']}_{c:04d}.nii.gz", case["image"] + np.float32(c), case["geometry"])
        write_image(out / "labelsTr" / f"{case['name']}.nii.gz", case["label"], case["geometry"])
    write_dataset_json(out, {c: "CT" for c in range(channels)}, LABELS, cases, name="LowContrastTarget")
    return out


def train_source(dataset: Path, out: Path, iterations: int = 200, model=TINY_UNET) -> Path:
    from medseg.training.trainer import run_training

    raw = {
        "data": {"dataset": str(dataset), "patch_size": [16, 16, 16], "val_fraction": 0.0,
                 "foreground_oversample": 0.5, "augmentation": {"affine_prob": 0.0}},
        "model": model,
        "train": {"iterations": iterations, "batch_size": 2, "val_interval": 1000, "checkpoint_interval": 1000,
                  "log_interval": 50, "optimizer": {"lr": 0.003}},
        "inference": {"overlap": 0.25, "sw_batch_size": 8},
        "output_dir": str(out), "seed": 0, "device": "cpu",
    }
    torch.set_num_threads(1)
    return run_training(validate_config(raw))


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> digest), and the folder listing itself."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def adapt_raw(source_run: Path, target: Path, out: Path, method: str, iterations: int = 6, **adapt) -> dict:
    return {
        "source_run": str(source_run),
        "target": {"dataset": str(target), "eval_labels": str(target / "labelsTr")},
        "adapt": {"method": method, "iterations": iterations, "batch_size": 2, "log_interval": 2,
                  "checkpoint_interval": 2, **adapt},
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
    }

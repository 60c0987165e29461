"""train -> predict -> evaluate on the synthetic vessel dataset, through the CLI.

The trained model must segment the held-out cases clearly better than the same network
with its initial weights (same config, preprocessing and inference), and every output
must have exactly its input's shape and affine.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main
from medseg.config import validate_config
from medseg.data.io import read_image
from medseg.models.factory import build_model
from medseg.runfolder.checkpoint import load_checkpoint, save_checkpoint

CONFIG = {
    "data": {"patch_size": [32, 32, 32], "cache_rate": 1.0},
    "model": {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
    "train": {
        "iterations": 40,
        "batch_size": 2,
        "val_interval": 20,
        "checkpoint_interval": 20,
        "optimizer": {"lr": 0.01},
    },
    "seed": 0,
    "device": "cpu",
}


def _untrained_copy(run: Path, target: Path) -> Path:
    """The trained run's checkpoint with the network's initial weights put back."""
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
    cfg = validate_config(checkpoint["config"])
    torch.manual_seed(cfg.seed)
    labels = checkpoint["dataset"]["labels"]
    net = build_model(cfg.model, cfg.spatial_dims, len(checkpoint["dataset"]["channel_names"]),
                      max(labels.values()) + 1, list(cfg.data.patch_size))
    checkpoint["model"] = net.state_dict()
    save_checkpoint(target / "checkpoints" / "best.pt", {k: v for k, v in checkpoint.items() if k != "format_version"})
    return target


def _mean_dice(folder: Path) -> float:
    summary = json.loads((folder / "summary.json").read_text())
    return summary["foreground_mean"]["Dice"]


@pytest.mark.slow
def test_train_predict_evaluate(synthetic_dataset_3d, tmp_path):
    dataset = synthetic_dataset_3d
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "dataset": str(dataset)},
                                      "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.pt").is_file()
    untrained = _untrained_copy(run, tmp_path / "untrained")

    scores = {}
    for name, model in (("trained", run), ("untrained", untrained)):
        pred = tmp_path / f"pred_{name}"
        assert main(["predict", "--model", str(model), "--input", str(dataset / "imagesTs"), "--output", str(pred)]) == 0
        for image_file in sorted((dataset / "imagesTs").iterdir()):
            image, geometry = read_image(image_file)
            seg, seg_geometry = read_image(pred / image_file.name.replace("_0000", ""))
            assert seg.shape == image.shape
            assert np.allclose(seg_geometry.affine, geometry.affine, atol=1e-5)
        out = tmp_path / f"eval_{name}"
        assert main(["evaluate", "--pred", str(pred), "--ref", str(dataset / "labelsTs"), "--output", str(out),
                     "--workers", "1"]) == 0
        scores[name] = _mean_dice(out)

    summary = json.loads((tmp_path / "eval_trained" / "summary.json").read_text())
    assert summary["labels"] == {"1": "vessel"}  # found in the dataset's dataset.json
    assert {"Dice", "HD95", "betti_0_error", "betti_1_error", "betti_2_error"} <= set(summary["mean"]["1"])
    assert scores["untrained"] < 0.3, scores
    assert scores["trained"] > scores["untrained"] + 0.3, scores

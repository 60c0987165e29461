"""Helpers for predict tests: a tiny untrained run folder and oblique, anisotropic scans.

Imported by tests/inference/conftest.py and tests/test_cli.py.
"""

from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from medseg.config import validate_config
from medseg.data.io import ImageGeometry
from medseg.models.factory import build_model
from medseg.runfolder.checkpoint import save_checkpoint


class Threshold(torch.nn.Module):
    """Logits (-4x, 4x) of the first channel: predicts foreground where the normalised image > 0
    (decisive, and flip-equivariant)."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1]], dim=1) * 4


def make_run(root: Path, patch=(16, 16, 16), target_spacing=(1.5, 1.5, 1.5), channels=("MR",), labels=None, seed=0,
             losses=None):
    """Write ``root/checkpoints/best.pt`` for a 2-level UNet (random weights, seeded)."""
    import torch

    labels = labels or {"background": 0, "vessel": 1}
    torch.manual_seed(seed)
    cfg = validate_config(
        {
            "data": {"dataset": str(root / "dataset"), "patch_size": list(patch), "target_spacing": list(target_spacing)},
            "model": {"name": "unet", "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
            "train": {"iterations": 1},
            "inference": {"sw_batch_size": 2},
            "output_dir": str(root),
            **({"losses": losses} if losses else {}),
        }
    )
    net = build_model(cfg.model, len(patch), len(channels), max(labels.values()) + 1, list(patch))
    save_checkpoint(
        root / "checkpoints" / "best.pt",
        {
            "iteration": 0,
            "config": cfg.model_dump(mode="json"),
            "dataset": {
                "channel_names": {str(i): c for i, c in enumerate(channels)},
                "labels": labels,
                "file_ending": ".nii.gz",
                "numTraining": 1,
            },
            "preprocessing": {"version": 1, "channels": [{"name": c, "scheme": "zscore"} for c in channels]},
            "model": net.state_dict(),
        },
    )
    return root


def oblique_geometry(shape=(21, 17, 11), spacing=(0.8, 1.1, 2.3)):
    rotation = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix()
    return ImageGeometry.from_spacing(shape, spacing, origin=(10.0, -5.0, 3.0), direction=rotation)


def blob_image(shape=(21, 17, 11), spacing=(0.8, 1.1, 2.3), centre=(9.0, 7.0, 5.0)):
    """A smooth blob (world-space ball) over noise: bright inside, dark outside."""
    grid = np.indices(shape).astype(np.float64)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return (np.exp(-d2 / (2 * 4.0**2)) * 10).astype(np.float32)


def reference_prediction(predictor, case, tta=False):
    """medseg predict before bounded memory, for comparisons: MONAI's eager transforms,
    ``sliding_window_inference`` per flip, float32 class maps averaged, ``Invertd``, argmax."""
    import itertools
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    pre = predictor.transforms({"image": case["image"], "geometry": case["geometry"], "name": case["name"]})
    batch = pre["image"].as_tensor()[None].float()
    dims = batch.ndim - 2
    flips = [c for k in range(dims + 1) for c in itertools.combinations(range(2, 2 + dims), k)] if tta else [()]
    total = None
    with torch.no_grad():
        for axes in flips:
            x = torch.flip(batch, axes) if axes else batch
            logits = sliding_window_inference(
                x, list(predictor.config.data.patch_size), predictor.config.inference.sw_batch_size, predictor.model,
                overlap=predictor.config.inference.overlap, mode=predictor.config.inference.mode,
                padding_mode="replicate",
            )
            if predictor.output_activation == "tanh":
                prob = (1 + torch.tanh(logits.float())) / 2
            else:
                prob = torch.softmax(logits.float(), dim=1)
            prob = torch.flip(prob, axes) if axes else prob
            total = prob if total is None else total + prob
    maps = (total / len(flips))[0]
    inverted = Invertd(keys="pred", transform=predictor.transforms, orig_keys="image", nearest_interp=False)(
        {"image": pre["image"], "pred": MetaTensor(maps)}
    )["pred"]
    prob = np.asarray(inverted.as_tensor(), dtype=np.float32)
    return prob.argmax(0), prob

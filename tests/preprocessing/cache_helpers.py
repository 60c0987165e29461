"""Helpers of the preprocessing tests: a small padded dataset, a config, the cache's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.data.dataset import write_dataset_json
from medseg.data.io import ImageGeometry, write_image

TINY_UNET = {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}


def make_padded_dataset(
    root: Path, cases: int = 5, shape=(40, 36, 24), seed: int = 0, channels=("CT",), border: int | None = None,
    binary: bool = False,
) -> Path:
    """CT-like cases inside a zero border (as a scan padded to a field of view), oblique
    affine, spheres and a tube as labels 1 and 2: the crop and both classes are exercised
    (``binary``: both label 1, one foreground class). The border is 3 or 4 voxels
    (alternating), or ``border`` in every case."""
    rng = np.random.default_rng(seed)
    a = 0.25
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
    geometry = ImageGeometry.from_spacing(shape, (0.9, 1.1, 1.7), origin=(5.0, -3.0, 2.0), direction=direction)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for i in range(cases):
        centre = np.array(shape) / 2 + rng.uniform(-3, 3, size=3)
        label = np.zeros(shape, np.uint8)
        label[np.sum((grid - centre[:, None, None, None]) ** 2, axis=0) < (4 + i % 3) ** 2] = 1
        label[shape[0] // 2 - 1 : shape[0] // 2 + 1, shape[1] // 3, 3:-3] = 1 if binary else 2
        image = rng.normal(40, 15, size=shape) + 250 * (label > 0)
        b = 3 + i % 2 if border is None else border
        body = np.zeros(shape, bool)
        body[b:-b, b + 1 : -b, 2:-2] = True
        image = np.where(body | (label > 0), image, 0.0).astype(np.int16)
        for c, _ in enumerate(channels):
            write_image(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", image + 7 * c, geometry)
        write_image(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, geometry)
    write_dataset_json(
        root, channel_names=dict(enumerate(channels)),
        labels={"background": 0, "foreground": 1} if binary else {"background": 0, "sphere": 1, "tube": 2},
        num_training=cases, file_ending=".nii.gz", name="Padded",
    )
    return root


def raw_config(dataset: Path, out: Path, cache: Path | None = None, **data) -> dict:
    return {
        "data": {
            "dataset": str(dataset),
            "patch_size": [16, 16, 16],
            "val_fraction": 0.4,
            "target_spacing": [1.0, 1.0, 1.5],
            **({"cache_dir": str(cache)} if cache is not None else {}),
            **data,
        },
        "model": TINY_UNET,
        "train": {"iterations": 4, "batch_size": 2, "val_interval": 4, "checkpoint_interval": 4, "log_interval": 2},
        "inference": {"overlap": 0.25, "sw_batch_size": 8},
        "output_dir": str(out),
        "seed": 1,
        "device": "cpu",
    }


def cache_files(cache_root: Path) -> dict[str, bytes]:
    """Every file under ``cache_root`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(cache_root)): p.read_bytes() for p in sorted(cache_root.rglob("*")) if p.is_file()}

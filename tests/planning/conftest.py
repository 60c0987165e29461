"""Tiny datasets for planning, written once per session by seed (treat them as read-only).

``iso``: 3D, 1 mm, 3 cases of 24^3. ``aniso``: 3D, 0.8 x 0.8 x 5 mm, 3 cases of
40 x 40 x 8. ``flat``: 2D NIfTI, 4 cases of 48^2. ``multi``: 3D, two channels (CT and
T2), three labels (vessel in every case, a small "lesion" blob in two of three).
"""

from __future__ import annotations

import numpy as np
import pytest

from medseg.data.dataset import write_dataset_json
from medseg.data.io import ImageGeometry, write_image
from medseg.data.synthetic import make_case, make_dataset

TINY = dict(test_cases=0, loops=0, seed=3)


@pytest.fixture(scope="session")
def iso_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "Dataset801_Iso"
    make_dataset(root, cases=3, size=24, dims=3, spacing=(1.0, 1.0, 1.0), **TINY)
    return root


@pytest.fixture(scope="session")
def aniso_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "Dataset802_Aniso"
    make_dataset(root, cases=3, size=(40, 40, 8), dims=3, spacing=(0.8, 0.8, 5.0), **TINY)
    return root


@pytest.fixture(scope="session")
def flat_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "Dataset803_Flat"
    make_dataset(root, cases=4, size=48, dims=2, **TINY)
    return root


def write_case(root, name, channels, label, geometry):
    for c, image in enumerate(channels):
        write_image(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", image.astype(np.float32), geometry)
    write_image(root / "labelsTr" / f"{name}.nii.gz", label.astype(np.uint8), geometry)


@pytest.fixture(scope="session")
def multi_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "Dataset804_Multi"
    rng = np.random.default_rng(4)
    for i in range(3):
        case = make_case(i, seed=4, size=24, dims=3, spacing=(1.0, 1.0, 1.5), loops=0)
        label = case["label"].astype(np.uint8)
        if i < 2:  # a lesion in two of three cases
            label[2:6, 2:6, 2:6] = 2
        t2 = 500.0 - case["image"] * 0.5 + rng.normal(0, 5, case["image"].shape)
        write_case(root, case["name"], [case["image"], t2], label, case["geometry"])
    write_dataset_json(root, {0: "CT", 1: "T2"}, {"background": 0, "vessel": 1, "lesion": 2}, 3, name="Multi")
    return root


@pytest.fixture(scope="session")
def extreme_dataset(tmp_path_factory):
    """Four ordinary 3D cases, one with 10x the slice spacing, one that is a single slice."""
    root = tmp_path_factory.mktemp("plan") / "Dataset805_Extreme"
    for i in range(4):
        case = make_case(i, seed=5, size=20, dims=3, spacing=(1.0, 1.0, 1.0), loops=0)
        write_case(root, case["name"], [case["image"]], case["label"], case["geometry"])
    case = make_case(4, seed=5, size=20, dims=3, spacing=(1.0, 1.0, 1.0), loops=0)
    thick = ImageGeometry.from_spacing((20, 20, 20), (1.0, 1.0, 10.0))
    write_case(root, "thick_slices", [case["image"]], case["label"], thick)
    flat = ImageGeometry.from_spacing((20, 20, 1), (1.0, 1.0, 1.0))
    write_case(root, "one_slice", [case["image"][:, :, 10:11]], case["label"][:, :, 10:11], flat)
    write_dataset_json(root, {0: "CT"}, {"background": 0, "vessel": 1}, 6, name="Extreme")
    return root

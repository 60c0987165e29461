"""Fixtures for predict tests (helpers in predict_helpers.py)."""

import pytest

from predict_helpers import blob_image, make_run, oblique_geometry
from medseg.data.io import write_image


@pytest.fixture
def tiny_run(tmp_path):
    return make_run(tmp_path / "run")


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "imagesTs"
    geometry = oblique_geometry()
    for i, name in enumerate(("case_a", "case_b", "case_c")):
        write_image(folder / f"{name}_0000.nii.gz", blob_image() + i, geometry)
    return folder

"""Slab-wise resampling gives what MONAI's whole-volume Orientation + Spacing give."""

import numpy as np
import pytest
import torch

from medseg.data.io import ImageGeometry
from medseg.inference.predictor import Predictor
from medseg.inference.resample import index_map, resample_slabs, run_transforms

from predict_helpers import blob_image, make_run, oblique_geometry


def _case(image, geometry):
    return {"image": image[None].astype(np.float32), "geometry": geometry, "name": "x"}


def _noise(shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


GEOMETRIES_3D = {
    "oblique": (blob_image(), oblique_geometry()),
    "oblique noise": (_noise((40, 33, 20), 0), oblique_geometry((40, 33, 20))),
    "lps": (_noise((30, 31, 12), 1), ImageGeometry(np.diag([-0.7, -0.9, 2.0, 1.0]), (30, 31, 12))),
    "already on the grid": (_noise((30, 31, 12), 2), ImageGeometry(np.diag([1.5, 1.5, 1.5, 1.0]), (30, 31, 12))),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES_3D))
def test_run_transforms_matches_monai_eager(tmp_path, name):
    predictor = Predictor.from_path(make_run(tmp_path / "run"), device="cpu")
    image, geometry = GEOMETRIES_3D[name]
    eager = predictor.transforms(_case(image, geometry))["image"]
    slabs = run_transforms(predictor.transforms, _case(image, geometry), max_voxels=500)["image"]
    assert slabs.shape == eager.shape
    assert torch.equal(slabs.affine, eager.affine)
    assert (slabs.as_tensor() - eager.as_tensor()).abs().max() < 1e-6  # float64 rounding, then float32


@pytest.mark.parametrize("affine", [np.eye(4), np.diag([-0.5, 1.1, 1.0, 1.0])])
def test_run_transforms_2d(tmp_path, affine):
    run = make_run(tmp_path / "run2d", patch=(16, 16), target_spacing=(0.7, 0.7))
    predictor = Predictor.from_path(run, device="cpu")
    image = np.random.default_rng(3).normal(size=(23, 30))
    geometry = ImageGeometry(affine, (23, 30))
    eager = predictor.transforms(_case(image, geometry))["image"]
    slabs = run_transforms(predictor.transforms, _case(image, geometry))["image"]
    assert slabs.shape == eager.shape and torch.equal(slabs.affine, eager.affine)
    assert (slabs.as_tensor() - eager.as_tensor()).abs().max() < 1e-6


def test_the_scan_array_is_released_once_resampled(tmp_path):
    import weakref

    predictor = Predictor.from_path(make_run(tmp_path / "run"), device="cpu")
    case = _case(*GEOMETRIES_3D["oblique noise"])
    scan = case["image"]
    alive = weakref.ref(scan)
    seen = []

    class Watch:  # the normalisation comes after the resample: is the scan gone by then?
        def __init__(self, transform):
            self.transform = transform

        def __call__(self, data):
            seen.append(alive() is not None)
            return self.transform(data)

    *spatial, normalise = predictor.transforms.transforms
    predictor.transforms.transforms = (*spatial, Watch(normalise))
    del scan
    pre = predictor.preprocess(case, consume=True)
    assert "image" not in case and pre["image"].shape[0] == 1
    assert seen == [False]


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_slabs_equal_one_grid_sample(padding):
    """Any affine (a rotation here), slabs along any axis: the whole-volume grid_sample's values."""
    rng = np.random.default_rng(4)
    src = torch.as_tensor(rng.normal(size=(2, 17, 13, 11)))
    angle = 0.3
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle) * 0.8, -np.sin(angle)], [np.sin(angle), np.cos(angle) * 1.2]]
    matrix[:3, 3] = [2.0, -3.0, 0.5]
    shape = (19, 14, 9)
    # the reference: one grid for the whole output, in grid_sample's normalised coordinates
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    coords = index @ matrix[:3, :3].T + matrix[:3, 3]
    norm = (2 * coords + 1) / np.array(src.shape[1:]) - 1
    grid = torch.as_tensor(norm[:, ::-1].copy()).reshape(1, *shape, 3)
    expected = torch.nn.functional.grid_sample(src[None], grid, padding_mode=padding, align_corners=False)[0]
    for axis in (0, 2):
        out = torch.empty_like(expected)
        pieces = list(resample_slabs(src, matrix, shape, axis=axis, padding_mode=padding, max_voxels=100))
        assert len(pieces) > 1
        for sl, values in pieces:
            out[(slice(None), *sl)] = values
        assert (out - expected).abs().max() < 1e-12


def test_index_map_and_bad_padding():
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    dst = np.diag([1.0, 1.0, 1.0, 1.0])
    assert np.allclose(index_map(dst, src, 3), np.diag([0.5, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="reflection"):
        next(resample_slabs(torch.zeros(1, 4, 4), np.eye(3), (4, 4), padding_mode="reflection"))

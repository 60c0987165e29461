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


@pytest.mark.filterwarnings("ignore:.*Orientationd.__init__:FutureWarning")
@pytest.mark.parametrize("name", sorted(GEOMETRIES_3D))
def test_a_label_map_is_resampled_nearest_as_spacingd_asks(name):
    """``Spacingd(mode=[..., "nearest"])`` records the label's mode in the operation's
    extra_info; the slabs read only the lazy kwargs and resampled the label bilinearly
    (0.57 between a 1 and a 0, cast to 0: objects shrank by up to a voxel per side)."""
    from monai.transforms import Compose, Orientationd, Spacingd

    from medseg.data.transforms import ToMetaTensord

    image, geometry = GEOMETRIES_3D[name]
    label = (np.abs(image) > 0.8).astype(np.float32)[None] * 2  # a two-valued map: any blend shows
    spatial = Compose([
        ToMetaTensord(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=["image", "label"], pixdim=[1.3, 1.1, 1.6], mode=["bilinear", "nearest"], padding_mode="border"),
    ])

    def case():
        return {**_case(image, geometry), "label": label.copy()}

    eager = spatial(case())
    slabs = run_transforms(spatial, case(), max_voxels=500)
    assert set(torch.unique(slabs["label"].as_tensor()).tolist()) <= {0.0, 2.0}
    # the same voxels but at ties: where a sample falls halfway between two voxels (this
    # geometry keeps axis 1's spacing, so a whole plane can), the slabs' and the eager
    # transform's coordinates, equal to float rounding (the image's 2e-7 below), may round
    # to either neighbour (40 of 23,100 voxels on one machine, 0 on the ones where this
    # test asked for equality; a bilinear label gave values between 0 and 2)
    differ = slabs["label"].as_tensor().float() != eager["label"].as_tensor().float()
    assert differ.float().mean() < 0.005
    assert (slabs["image"].as_tensor() - eager["image"].as_tensor()).abs().max() < 1e-6


def _slice_affine(rows, spacing=(0.6, 0.9), tilt_degrees=0.0):
    """A 2D slice's 4x4 affine: voxel axes 0 and 1 along world ``rows`` (signed, 1-based:
    -2 is -y), then tilted about the first axis out of its plane."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for column, (row, step) in enumerate(zip(rows, spacing)):
        affine[abs(row) - 1, column] = np.sign(row) * step
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    affine[:3, 2] = normal / np.linalg.norm(normal) * 3.0
    t = np.deg2rad(tilt_degrees)
    axis = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    rotation = np.cos(t) * np.eye(3) + np.sin(t) * np.cross(np.eye(3), axis) + (1 - np.cos(t)) * np.outer(axis, axis)
    affine[:3, :3] = rotation @ affine[:3, :3]
    affine[:3, 3] = [10.0, -4.0, 7.0]
    return affine


SLICES_2D = {
    "axial": _slice_affine((1, 2)),
    "axial, flipped and swapped": _slice_affine((-2, 1)),
    "coronal": _slice_affine((1, 3)),
    "sagittal": _slice_affine((-2, -3)),
    "axial tilted 40 degrees": _slice_affine((1, 2), tilt_degrees=40.0),
}


@pytest.mark.parametrize("name", sorted(SLICES_2D))
def test_2d_slices_of_any_plane_are_resampled_in_their_plane_and_mapped_back(tmp_path, name):
    """A coronal or sagittal slice made MONAI's x/y block singular (a traceback) and a tilted
    one was resampled at a shorter spacing; each is now resampled at its true spacing, and
    a mask predicted on the network's grid lands back on the mask it came from."""
    from medseg.data.io import planar_affine

    affine = SLICES_2D[name]
    geometry = ImageGeometry(affine, (46, 31))
    x, y = np.meshgrid(np.arange(46), np.arange(31), indexing="ij")
    mask = ((x - 14.0) ** 2 / 9.0**2 + (y - 19.0) ** 2 / 6.0**2 < 1).astype(np.float32)  # off-centre: flips show
    predictor = Predictor.from_path(make_run(tmp_path / "run2d", patch=(16, 16), target_spacing=(0.3, 0.3)), device="cpu")
    pre = predictor.preprocess(_case(mask, geometry))["image"]
    assert np.allclose(np.linalg.norm(planar_affine(pre.affine.numpy())[:2, :2], axis=0), 0.3)
    assert pre.shape[1] * pre.shape[2] == pytest.approx(46 * 0.6 * 31 * 0.9 / 0.3**2, rel=0.1)  # the true area
    foreground = (pre.as_tensor()[0] > pre.as_tensor()[0].mean()).float()
    maps = torch.stack([1 - foreground, foreground]) - 0.5
    back = predictor.to_original_grid(maps, pre.affine, geometry)
    assert back.shape == mask.shape
    dice = 2 * (back * mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.95, dice


@pytest.mark.parametrize("name", sorted(SLICES_2D))
def test_planar_affine_is_an_isometry_of_the_slice_plane(name):
    from medseg.data.io import planar_affine

    affine = SLICES_2D[name]
    planar = planar_affine(affine)
    gram = affine[:3, :2].T @ affine[:3, :2]  # lengths and angle of the voxel axes
    assert np.allclose(planar[:2, :2].T @ planar[:2, :2], gram)
    assert np.allclose(planar_affine(planar), planar)  # idempotent
    if name.startswith("axial") and "tilted" not in name:
        assert np.allclose(planar[:2, [0, 1, 3]], affine[:2, [0, 1, 3]])  # axial slices keep their x/y block


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

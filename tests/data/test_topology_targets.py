import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose, RandFlipd

from medseg.data.topology_targets import (
    LabelProjection,
    LabelProjectiond,
    SaunaTarget,
    SaunaTargetd,
    SkeletonTube,
    SkeletonTubed,
    label_projection,
    sauna_target,
    sauna_targets,
    skeleton_tube,
)

# ----------------------------------------------------------------------------- skeleton


def test_each_class_keeps_its_own_centreline():
    lab = np.zeros((9, 12), int)
    lab[1:4, 1:11] = 1
    lab[4:7, 1:11] = 2
    tube = skeleton_tube(lab, tube_radius=0)
    assert tube[2, 2:8].tolist() == [1] * 6  # middle row of class 1
    assert tube[5, 2:8].tolist() == [2] * 6  # middle row of class 2
    assert not tube[3:5, 2:8].any()  # nothing on the border between them


def test_tube_radius_and_clipping_to_the_class():
    lab = np.zeros((11, 20), int)
    lab[3:8, :] = 1  # a 5-row bar across the image: skeleton on row 5
    assert set(np.nonzero(skeleton_tube(lab, 0)[:, 10])[0]) == {5}
    assert set(np.nonzero(skeleton_tube(lab, 1)[:, 10])[0]) == {4, 5, 6}
    assert set(np.nonzero(skeleton_tube(lab, 4)[:, 10])[0]) == {3, 4, 5, 6, 7}  # clipped to the mask
    diamond = skeleton_tube(lab, 2, footprint="diamond")
    assert diamond.sum() <= skeleton_tube(lab, 2, footprint="ball").sum()


def test_3d_rod_skeleton_is_its_axis():
    lab = np.zeros((7, 7, 12), int)
    lab[2:5, 2:5, 1:11] = 3
    tube = skeleton_tube(lab, 0)
    assert set(np.unique(tube)) == {0, 3}
    assert tube[3, 3, 3:9].tolist() == [3] * 6
    assert tube[:, :, 5].sum() == 3  # one voxel per slice in the middle


def test_empty_label_gives_empty_skeleton():
    assert not skeleton_tube(np.zeros((5, 5), int)).any()


def test_array_and_dict_transforms_compose_with_monai():
    lab = np.zeros((1, 9, 12), np.int64)
    lab[0, 1:4, 1:11] = 1
    as_tensor = SkeletonTube(tube_radius=0)(torch.from_numpy(lab))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (1, 9, 12)
    as_array = SkeletonTube(tube_radius=0)(lab)
    assert isinstance(as_array, np.ndarray)
    assert np.array_equal(as_array[0], skeleton_tube(lab[0], 0))
    pipeline = Compose([RandFlipd(keys="label", prob=1.0, spatial_axis=1), SkeletonTubed(tube_radius=0)])
    out = pipeline({"label": MetaTensor(torch.from_numpy(lab))})
    assert set(out) == {"label", "skeleton"}
    flipped = np.flip(lab[0], axis=1)
    assert np.array_equal(np.asarray(out["skeleton"])[0], skeleton_tube(flipped, 0))
    with pytest.raises(ValueError, match="channel-first"):
        SkeletonTube()(np.zeros((2, 4, 4)))


# ----------------------------------------------------------------------------- SAUNA


def test_sauna_hand_computed_bar():
    m = np.zeros((7, 7), bool)
    m[2:5] = True
    # D_in: 1, 2, 1; M = 2. Inside: 1 - (T - D)/M -> 0.5, 1, 0.5.
    # Outside: D_out 1 (rows 1, 5), 2 (rows 0, 6); T_out (window 2M = 5 rows) 2 and 1:
    # -1 + (2 - 1)/2 = -0.5;  -1 + (1 - 2)/2 -> clipped to -1.
    expected = np.array([-1, -0.5, 0.5, 1, 0.5, -0.5, -1], np.float32)
    out = sauna_target(m)
    assert np.allclose(out, expected[:, None])


def _sauna_official(gt, kernel_ratio=2.0):
    """The authors' target (Oulu-IMEDS/SAUNA ``generate_uncertainty_masks.py``, ``hh``),
    restated with the exact distance transform: max-pool windows of ``int(ceil(M) * ratio)``
    pixels, made odd."""
    from scipy.ndimage import distance_transform_edt, maximum_filter

    def pooled(d, ratio=1.0):
        k = int(int(np.ceil(d.max())) * ratio)
        k = k + 1 if k % 2 == 0 else k
        return maximum_filter(d, size=k, mode="constant", cval=0.0)

    fg = distance_transform_edt(gt)
    m = fg.max()
    bg = -distance_transform_edt(1 - gt)
    bg[bg <= -m] = -m
    boundary = (fg + bg) / m
    thickness = np.where(gt > 0, pooled(fg), pooled(fg, kernel_ratio)) / m
    out = np.where(gt > 0, boundary + 1 - thickness, np.where(thickness > 0, boundary - 1 + thickness, -1.0))
    return np.clip(out, -1, 1)


def test_sauna_target_equals_the_authors_rounding_of_the_windows():
    """The outside window was ceil(2 M) pixels, made odd: 13 where the authors' int(ceil(M) * 2) gives 15
    (M = 6.08), up to 0.18 off at 144 background pixels."""
    from scipy.ndimage import binary_dilation

    yy, xx = np.mgrid[:40, :40]
    m = ((((yy - 12) ** 2 + (xx - 12) ** 2) <= 36) | ((yy == 30) & (xx > 3) & (xx < 36))).astype(np.uint8)
    rng = np.random.default_rng(0)
    blobs = binary_dilation(rng.random((48, 40)) > 0.985, iterations=3).astype(np.uint8)
    for mask in (m, blobs):
        np.testing.assert_allclose(sauna_target(mask), _sauna_official(mask), atol=1e-6)


def test_sauna_thin_line_is_hard():
    m = np.zeros((7, 7), bool)
    m[3] = True
    assert np.allclose(sauna_target(m)[:, 3], [-1, -1, -1, 1, -1, -1, -1])


@pytest.mark.parametrize("seed", range(6))
def test_sauna_sign_equals_mask_and_range(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 11) if seed % 2 else (6, 7, 8)
    mask = rng.random(shape) > 0.6
    spacing = tuple(rng.uniform(0.5, 3.0, size=len(shape)))
    g = sauna_target(mask, spacing=spacing)
    assert g.dtype == np.float32 and g.min() >= -1 and g.max() <= 1
    assert np.array_equal(g > 0, mask) and not np.any(g == 0)


def test_sauna_empty_and_full():
    assert np.all(sauna_target(np.zeros((4, 4))) == -1)
    assert np.all(sauna_target(np.ones((4, 4))) == 1)


def test_sauna_3d_slab_matches_2d_bar():
    m3 = np.zeros((7, 7, 5), bool)
    m3[2:5] = True
    assert np.allclose(sauna_target(m3)[:, 3, 2], [-1, -0.5, 0.5, 1, 0.5, -0.5, -1])


def test_sauna_respects_spacing():
    m = np.zeros((24, 16), bool)
    m[2:5, 1:15] = True  # horizontal bar, 3 voxels thick along axis 0
    m[7:23, 6:9] = True  # vertical bar, 3 voxels thick along axis 1
    iso = sauna_target(m)
    assert iso[3, 3] == iso[15, 7] == 1.0
    assert iso[2, 3] == pytest.approx(0.5) and iso[15, 6] == pytest.approx(0.5)
    # with 3 mm columns the vertical bar is physically 9 mm thick (M = 6 mm at its centre):
    # its edge (D = 3, T = 6) is 1 - 3/6 = 0.5, while the now relatively thin horizontal
    # bar's edge (D = 1, T = 2) becomes almost certain: 1 - 1/6
    aniso = sauna_target(m, spacing=(1.0, 3.0))
    assert aniso[15, 6] == pytest.approx(0.5) and aniso[2, 3] == pytest.approx(5 / 6)
    meta = MetaTensor(torch.from_numpy(m[None].astype(np.int64)), affine=torch.diag(torch.tensor([1.0, 3.0, 1.0, 1.0])))
    assert np.allclose(np.asarray(SaunaTarget()(meta))[0], aniso)


def test_sauna_targets_channels():
    lab = np.zeros((8, 8), int)
    lab[1:3] = 1
    lab[5:7] = 2
    binary = sauna_targets(lab, 1)
    assert binary.shape == (1, 8, 8) and np.array_equal(binary[0] > 0, lab > 0)
    multi = sauna_targets(lab, 3)
    assert multi.shape == (3, 8, 8)
    for k in range(3):
        assert np.array_equal(multi[k] > 0, lab == k)


def test_sauna_dict_transform():
    lab = torch.zeros(1, 8, 8, dtype=torch.long)
    lab[0, 2:5] = 1
    out = Compose([SkeletonTubed(), SaunaTargetd(num_classes=2)])({"label": lab})
    assert out["sauna"].shape == (2, 8, 8) and out["sauna"].dtype == torch.float32
    assert "skeleton" in out


# ----------------------------------------------------------------------------- label MIP


def test_label_projection_broadcast_and_crop():
    lab = np.zeros((4, 6, 10), int)
    lab[1, 2, 7] = 1
    proj = label_projection(lab, axes=(-1, 0))
    assert proj.shape == (2, 4, 6, 10) and proj.dtype == np.uint8
    assert proj[0, 1, 2].all() and proj[0].sum() == 10  # along z: the dot, repeated in z
    assert proj[1, :, 2, 7].all() and proj[1].sum() == 4
    # cropping the broadcast projection = projecting the whole volume, then cropping
    crop = proj[0, :, :, :5]
    assert np.array_equal(crop.max(axis=-1), lab.max(axis=-1))
    d = LabelProjectiond(axes=(2,))({"label": torch.from_numpy(lab[None])})
    assert d["label_mip"].shape == (1, 4, 6, 10)
    assert torch.equal(torch.as_tensor(LabelProjection((2,))(lab[None])), torch.as_tensor(d["label_mip"]))
    with pytest.raises(ValueError):
        label_projection(lab, axes=(3,))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ndim=st.sampled_from([2, 3]),
    density=st.floats(0.0, 0.3),
    radius=st.integers(1, 3),
    shape_name=st.sampled_from(["ball", "diamond"]),
)
def test_sparse_dilation_equals_scipy(seed, ndim, density, radius, shape_name):
    from scipy import ndimage

    from medseg.data.topology_targets import _footprint, dilate_sparse

    rng = np.random.default_rng(seed)
    mask = rng.random((17, 19) if ndim == 2 else (9, 11, 10)) < density
    structure = _footprint(ndim, radius, shape_name)
    np.testing.assert_array_equal(dilate_sparse(mask, structure), ndimage.binary_dilation(mask, structure=structure))

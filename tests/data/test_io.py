"""medseg.data.io: round trips keep array, affine and orientation; bad files are DataErrors."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.data.io import (
    SUPPORTED_ENDINGS,
    ImageGeometry,
    ending_of,
    read_geometry,
    read_image,
    read_image_channels,
    strip_ending,
    write_image,
)
from medseg.errors import DataError

VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, x/y flipped, anisotropic (0.7, 0.9, 2.5) mm, off-centre."""
    a, b = math.radians(20), math.radians(-9)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ np.diag([-1, -1, 1]) @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [112.5, -87.25, 41.0]
    return affine


@pytest.fixture
def volume() -> tuple[np.ndarray, ImageGeometry]:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 5, 4)).astype(np.float32)  # distinct sizes catch axis swaps
    return array, ImageGeometry(oblique_affine(), array.shape)


# --------------------------------------------------------------------------- geometry

def test_geometry_spacing_axcodes_and_serialisation():
    geom = ImageGeometry(oblique_affine(), (7, 5, 4))
    assert geom.spacing == pytest.approx((0.7, 0.9, 2.5))
    assert ImageGeometry.from_spacing((3, 4), (0.5, 2.0)).spacing == pytest.approx((0.5, 2.0))
    assert ImageGeometry.from_spacing((2, 2, 2), (1, 1, 1), direction=np.diag([-1, -1, 1])).axcodes == ("L", "P", "S")
    assert ImageGeometry.from_dict(geom.to_dict()).allclose(geom, atol=0)
    moved = np.array(geom.affine)
    moved[0, 3] += 0.01
    assert not ImageGeometry(moved, geom.shape).allclose(geom)
    assert not ImageGeometry(geom.affine, (7, 5, 5)).allclose(geom)
    with pytest.raises(ValueError):
        geom.affine[0, 0] = 1.0  # read-only: geometry is shared between arrays


@pytest.mark.parametrize("name,ending", [("a.nii.gz", ".nii.gz"), ("B.NII", ".nii"), ("x_0000.nrrd", ".nrrd"), ("c.mha", ".mha"), ("d.tiff", ".tiff"), ("e.jpg", ".jpg")])
def test_ending_of(name, ending):
    assert ending_of(name) == ending


def test_strip_ending():
    assert strip_ending("dir/case_001_0000.nii.gz") == "case_001_0000"
    assert strip_ending("case.v2.mha") == "case.v2"


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("ending", VOLUME_ENDINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_volume_round_trip_keeps_array_affine_orientation(tmp_path, volume, ending, dtype):
    array, geom = volume
    array = (array * 40).astype(dtype) if dtype != np.float32 else array
    path = tmp_path / f"img{ending}"
    write_image(path, array, geom)
    back, back_geom = read_image(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    assert back_geom.shape == (7, 5, 4)
    assert back_geom.allclose(geom, atol=1e-4), np.abs(back_geom.affine - geom.affine).max()
    assert back_geom.axcodes == geom.axcodes
    assert back_geom.spacing == pytest.approx((0.7, 0.9, 2.5), abs=1e-5)


def test_same_scan_reads_identically_from_nifti_and_itk_formats(tmp_path, volume):
    """A NIfTI converted to NRRD/MHA by SimpleITK itself (RAS->LPS in ITK's reader)
    reads back with medseg as the same array and the same RAS affine."""
    array, geom = volume
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(array, geom.affine), str(nii))
    ref_array, ref_geom = read_image(nii)
    for ending in (".nrrd", ".mha"):
        out = tmp_path / f"scan{ending}"
        sitk.WriteImage(sitk.ReadImage(str(nii)), str(out))
        other, other_geom = read_image(out)
        np.testing.assert_array_equal(other, ref_array)
        assert other_geom.allclose(ref_geom, atol=1e-4)


def test_itk_world_coordinates_are_converted_lps_to_ras(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), dtype=np.float32))  # sitk: [k, j, i]
    image.SetSpacing((0.5, 0.75, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    path = tmp_path / "itk.nrrd"
    sitk.WriteImage(image, str(path))
    array, geom = read_image(path)
    assert array.shape == (6, 5, 4) == geom.shape
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = geom.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_array_axes_are_voxel_order_consistent_with_itk(tmp_path):
    """Voxel (i, j, k) of medseg's array is sitk's image[i, j, k]."""
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    geom = ImageGeometry.from_spacing(data.shape, (1.0, 2.0, 3.0))
    path = tmp_path / "order.mha"
    write_image(path, data, geom)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (6, 5, 4)
    assert image[5, 1, 2] == data[5, 1, 2]
    assert image.GetSpacing() == pytest.approx((1.0, 2.0, 3.0))


def test_nifti_affine_uses_sform_as_nibabel_does(tmp_path, volume):
    array, geom = volume
    path = tmp_path / "img.nii.gz"
    write_image(path, array, geom)
    img = nib.load(str(path))
    assert int(img.header["sform_code"]) > 0
    np.testing.assert_allclose(img.affine, geom.affine, atol=1e-4)


def test_reference_header_is_copied(tmp_path, volume):
    array, geom = volume
    ref = tmp_path / "ref.nii.gz"
    hdr = nib.Nifti1Header()
    ref_img = nib.Nifti1Image(array, geom.affine, header=hdr)
    ref_img.header.set_sform(geom.affine, code="scanner")
    ref_img.header.set_qform(geom.affine, code="talairach")
    ref_img.header.set_xyzt_units("mm", "sec")
    ref_img.header["descrip"] = b"scanner X"
    nib.save(ref_img, str(ref))
    seg = (array > 0).astype(np.uint8)
    out = tmp_path / "seg.nii.gz"
    write_image(out, seg, geom, reference_path=ref)
    got = nib.load(str(out)).header
    want = nib.load(str(ref)).header
    for key in ("sform_code", "qform_code", "xyzt_units", "descrip", "srow_x", "srow_y", "srow_z", "quatern_b", "pixdim"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got.get_data_dtype() == np.uint8
    back, back_geom = read_image(out)
    np.testing.assert_array_equal(back, seg)
    assert back_geom.allclose(geom)


def test_reference_of_other_format_is_ignored(tmp_path, volume):
    array, geom = volume
    ref = tmp_path / "ref.nrrd"
    write_image(ref, array, geom)
    out = tmp_path / "seg.nii.gz"
    write_image(out, array, geom, reference_path=ref)
    assert read_image(out)[1].allclose(geom)


def test_bool_and_int64_are_stored(tmp_path):
    geom = ImageGeometry.from_spacing((4, 4, 2), (1.0, 1.0, 1.0))
    mask = np.zeros((4, 4, 2), dtype=bool)
    mask[1, 2, 1] = True
    write_image(tmp_path / "m.nii.gz", mask, geom)
    back, _ = read_image(tmp_path / "m.nii.gz")
    assert back.dtype == np.uint8 and back[1, 2, 1] == 1 and back.sum() == 1
    labels = np.arange(32, dtype=np.int64).reshape(4, 4, 2)
    write_image(tmp_path / "l.nii.gz", labels, geom)
    np.testing.assert_array_equal(read_image(tmp_path / "l.nii.gz")[0], labels)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    geom = ImageGeometry.identity((4, 3))
    path = tmp_path / "x.png"
    write_image(path, np.full((4, 3), 7, dtype=np.uint8), geom)
    before = path.read_bytes()
    with pytest.raises(DataError, match="x.png"):
        write_image(path, np.full((4, 3), 0.5, dtype=np.float32), geom)  # PNG can't hold 0.5
    assert path.read_bytes() == before
    with pytest.raises(DataError, match="shape"):
        write_image(tmp_path / "y.nii.gz", np.zeros((4, 4)), geom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    write_image(path, np.full((4, 3), 9, dtype=np.uint8), geom)  # overwrite works
    assert read_image(path)[0][0, 0] == 9


# --------------------------------------------------------------------------- 2D

@pytest.mark.parametrize("ending", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_2d_natural_image_round_trip(tmp_path, ending, dtype):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 250 if dtype == np.uint8 else 60000, size=(9, 6)).astype(dtype)
    path = tmp_path / f"img{ending}"
    write_image(path, array, ImageGeometry.identity(array.shape))
    back, geom = read_image(path)
    assert back.shape == (9, 6) and geom.shape == (9, 6)
    np.testing.assert_array_equal(back, array)
    assert geom.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(geom.affine, np.eye(4))


def test_2d_rows_are_the_first_axis_as_in_nnunet(tmp_path):
    array = np.zeros((3, 5), dtype=np.uint8)
    array[2, 4] = 1
    Image.fromarray(array).save(tmp_path / "p.png")
    back, _ = read_image(tmp_path / "p.png")
    assert back[2, 4] == 1 and back.shape == (3, 5)


def test_tif_float_round_trip(tmp_path):
    array = np.random.default_rng(2).normal(size=(8, 7)).astype(np.float32)
    write_image(tmp_path / "f.tif", array, ImageGeometry.identity(array.shape))
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[0], array)


def test_rgb_png_reads_as_three_channels(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, size=(6, 4, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    channels, geom = read_image_channels(tmp_path / "rgb.png")
    assert channels.shape == (3, 6, 4) and geom.shape == (6, 4)
    np.testing.assert_array_equal(channels[1], rgb[..., 1])
    with pytest.raises(DataError, match="rgb.png.*3 channels"):
        read_image(tmp_path / "rgb.png")


@pytest.mark.parametrize("shape", [(9, 6), (9, 6, 1)])
def test_2d_nifti_reads_as_2d_and_keeps_affine(tmp_path, shape):
    affine = np.diag([0.5, -0.25, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    array = np.arange(54, dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "s.nii.gz"))
    back, geom = read_image(tmp_path / "s.nii.gz")
    assert back.shape == (9, 6) and geom.shape == (9, 6)
    np.testing.assert_array_equal(back, array.reshape(9, 6))
    np.testing.assert_allclose(geom.affine, affine)
    assert geom.spacing == pytest.approx((0.5, 0.25))


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd"])
def test_2d_volume_formats_round_trip_with_spacing(tmp_path, ending):
    array = np.random.default_rng(4).normal(size=(8, 5)).astype(np.float32)
    geom = ImageGeometry.from_spacing(array.shape, (0.6, 1.7), origin=(4.0, -3.0), direction=np.diag([-1.0, 1.0, 1.0]))
    write_image(tmp_path / f"s{ending}", array, geom)
    back, back_geom = read_image(tmp_path / f"s{ending}")
    np.testing.assert_array_equal(back, array)
    assert back_geom.shape == (8, 5)
    np.testing.assert_allclose(back_geom.affine[:2, [0, 1, 3]], geom.affine[:2, [0, 1, 3]], atol=1e-5)


def test_msd_4d_nifti_reads_channels_first(tmp_path):
    data = np.random.default_rng(5).normal(size=(5, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "brats.nii.gz"))
    channels, geom = read_image_channels(tmp_path / "brats.nii.gz")
    assert channels.shape == (2, 5, 4, 3) and geom.shape == (5, 4, 3)
    np.testing.assert_array_equal(channels[1], data[..., 1])


# --------------------------------------------------------------------------- bad files

def _write_valid(path):
    array = np.random.default_rng(6).normal(size=(24, 20, 16)).astype(np.float32)
    if ending_of(path) in (".png", ".tif"):
        array = (np.abs(array[..., 0]) * 50).astype(np.uint8)
    write_image(path, array, ImageGeometry.identity(array.shape))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif"])
def test_truncated_file_is_data_error_naming_it(tmp_path, ending):
    path = tmp_path / f"case_007_0000{ending}"
    _write_valid(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"case_007_0000" + ending.replace(".", r"\.")) as info:
        read_image(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".png", ".tif"])
def test_garbage_file_is_data_error(tmp_path, ending):
    path = tmp_path / f"junk{ending}"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(DataError, match="junk"):
        read_image(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="nothere.nii.gz: file not found"):
        read_image(tmp_path / "nothere.nii.gz")
    (tmp_path / "scan.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="scan.jpg: unsupported file ending"):
        read_image(tmp_path / "scan.jpg")
    with pytest.raises(DataError, match="unsupported"):
        write_image(tmp_path / "out.jpg", np.zeros((2, 2)), ImageGeometry.identity((2, 2)))


def test_supported_endings_are_the_contract():
    assert SUPPORTED_ENDINGS == (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff")


def test_big_endian_nifti_reads_native(tmp_path):
    data = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_data_dtype(">i2")
    nib.save(img, str(tmp_path / "be.nii"))
    back, _ = read_image(tmp_path / "be.nii")
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, data)
    assert os.path.getsize(tmp_path / "be.nii") > 0


def test_reference_keeps_2d_nifti_on_disk_shape_and_resets_value_fields(tmp_path):
    ref = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image(np.random.default_rng(7).normal(size=(9, 6, 1)).astype(np.float32), np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_intent("vector")
    img.header["cal_max"] = 99.0
    nib.save(img, str(ref))
    array, geom = read_image(ref)
    assert array.shape == (9, 6)
    out = tmp_path / "seg.nii.gz"
    write_image(out, (array > 0).astype(np.uint8), geom, reference_path=ref)
    written = nib.load(str(out))
    assert written.shape == (9, 6, 1)
    assert written.header.get_intent()[0] == "none" and float(written.header["cal_max"]) == 0.0
    back, back_geom = read_image(out)
    np.testing.assert_array_equal(back, array > 0)
    assert back_geom.allclose(geom)


@pytest.mark.parametrize(
    ("dtype", "slope", "nifti2"), [(np.int16, None, False), (np.uint8, None, False), (np.int16, 0.5, False), (np.float32, None, True)]
)
def test_fast_gzip_reader_equals_nibabel(tmp_path, monkeypatch, dtype, slope, nifti2):
    """The ISA-L path gives nibabel's values, scaling and geometry; NIfTI-2 falls back."""
    import medseg.data.io as io

    rng = np.random.default_rng(0)
    data = np.asfortranarray(rng.integers(0, 200, (37, 21, 9)).astype(dtype))
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, oblique_affine())
    if slope is not None:
        img.header.set_slope_inter(slope, 3.0)
    path = tmp_path / "case.nii.gz"
    nib.save(img, path)
    fast, fast_geometry = read_image_channels(path)
    monkeypatch.setattr(io, "_igzip", None)
    slow, slow_geometry = read_image_channels(path)
    assert fast.dtype == slow.dtype and np.array_equal(fast, slow) and fast.flags.c_contiguous
    assert np.allclose(fast_geometry.affine, slow_geometry.affine)


def test_truncated_gzip_is_a_data_error_on_the_fast_path(tmp_path):
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.int16), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="case.nii.gz"):
        read_image_channels(path)


@pytest.mark.parametrize("shape", [(1, 300, 70, 60), (2, 129, 130, 64), (1, 8, 8, 20000)])
def test_blocked_c_order_copy_equals_ascontiguousarray(shape):
    from medseg.data.io import _c_order

    rng = np.random.default_rng(1)
    array = np.asfortranarray(rng.integers(-1000, 1000, shape).astype(np.int16))
    out = _c_order(array)
    assert out.flags.c_contiguous and np.array_equal(out, array)


def test_a_2d_geometry_compares_its_plane_not_its_slice_axis():
    """Two tools writing one slice with another thickness (or slice direction) describe the
    same pixels: image and label must not be refused for it; in-plane differences still count."""
    image = ImageGeometry(np.diag([0.5, 0.5, 3.0, 1.0]), (40, 30))
    label = ImageGeometry(np.diag([0.5, 0.5, 1.0, 1.0]), (40, 30))
    assert image.allclose(label) and image.max_affine_difference(label) == 0.0
    moved = ImageGeometry(np.diag([0.5, 0.6, 3.0, 1.0]), (40, 30))
    assert not image.allclose(moved) and image.max_affine_difference(moved) == pytest.approx(0.1)
    volume, other = ImageGeometry(np.diag([0.5, 0.5, 3.0, 1.0]), (40, 30, 5)), ImageGeometry(np.diag([0.5, 0.5, 1.0, 1.0]), (40, 30, 5))
    assert not volume.allclose(other)  # in 3D the third axis places voxels


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_a_single_slice_stored_3d_reads_2d_and_is_written_back_3d(tmp_path, ending):
    """A (X, Y, 1) MetaImage/NRRD read as 3D while the same slice in NIfTI read as 2D, so
    plan made a 3D network with a patch of 1 along z; a prediction written with it as
    reference keeps its on-disk (X, Y, 1) and its (here coronal) geometry."""
    data = (np.arange(30 * 20).reshape(1, 20, 30) % 7).astype(np.int16)  # SimpleITK order [k, j, i]
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.5, 0.7, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # a coronal slice
    source = tmp_path / f"scan{ending}"
    sitk.WriteImage(image, str(source))
    array, geometry = read_image(source)
    assert array.shape == (30, 20) and geometry.spacing == pytest.approx((0.5, 0.7))
    out = tmp_path / f"pred{ending}"
    write_image(out, (array > 3).astype(np.uint8), geometry, reference_path=source)
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize()
    assert np.allclose(written.GetSpacing(), image.GetSpacing()) and np.allclose(written.GetDirection(), image.GetDirection())
    assert np.allclose(written.GetOrigin(), image.GetOrigin())
    assert np.array_equal(read_image(out)[0], array > 3)


@pytest.mark.parametrize("codes", ["none", "qform_differs_from_sform"])
def test_a_prediction_keeps_its_scans_nifti_header_as_itk_reads_it(tmp_path, codes):
    """Codes 0/0 came back as an 'aligned' sform (nibabel's fallback affine), which ITK
    reads where it reads no sform at all: the mask moved off the scan in ITK viewers; a
    qform that differed from the sform was overwritten by it."""
    import nibabel as nib
    import SimpleITK as sitk

    data = np.random.default_rng(0).random((10, 12, 8)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [5.0, -3.0, 7.0]
    scan = nib.Nifti1Image(data, affine)
    if codes == "none":
        scan.header["qform_code"], scan.header["sform_code"] = 0, 0
        scan = nib.Nifti1Image(data, None, header=scan.header)
    else:
        shifted = affine.copy()
        shifted[:3, 3] += 1.0
        scan.header.set_qform(shifted, code=1)
        scan.header.set_sform(affine, code=2)
    nib.save(scan, tmp_path / "scan.nii.gz")
    array, geometry = read_image(tmp_path / "scan.nii.gz")
    write_image(tmp_path / "mask.nii.gz", (np.asarray(array) > 0.5).astype(np.uint8), geometry,
                reference_path=tmp_path / "scan.nii.gz")
    a, b = nib.load(tmp_path / "scan.nii.gz").header, nib.load(tmp_path / "mask.nii.gz").header
    assert (int(b["qform_code"]), int(b["sform_code"])) == (int(a["qform_code"]), int(a["sform_code"]))
    assert np.allclose(a.get_qform(), b.get_qform()) and np.allclose(a.get_sform(), b.get_sform())
    itk_scan, itk_mask = sitk.ReadImage(str(tmp_path / "scan.nii.gz")), sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert np.allclose(itk_scan.GetOrigin(), itk_mask.GetOrigin())
    assert np.allclose(itk_scan.GetDirection(), itk_mask.GetDirection())
    assert read_image(tmp_path / "mask.nii.gz")[1].allclose(geometry, atol=1e-5)


@pytest.mark.parametrize("unit, mm", [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0), ("unknown", 1.0)])
def test_nifti_units_are_read_in_mm_as_itk_reads_them_and_written_back_in_the_scans(tmp_path, unit, mm):
    """nibabel's affine is in the file's units: a scan stored in metres was 0.0008 mm a
    voxel (predicted as an empty mask), one in microns a 39001-voxel grid, and evaluate's
    HD95 of micron files was 1000 times too large. ITK scales spacing and origin to mm."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) / np.array([mm, mm, mm, 1.0])
    affine[:3, 3] = np.array([10.0, -20.0, 30.0]) / mm
    scan = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), affine)
    scan.header.set_xyzt_units(unit if unit != "unknown" else 0)
    nib.save(scan, tmp_path / "scan.nii.gz")
    array, geometry = read_image(tmp_path / "scan.nii.gz")
    itk = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    assert np.allclose(geometry.spacing, itk.GetSpacing(), rtol=1e-5)
    assert np.allclose(geometry.origin, np.array(itk.GetOrigin()) * [-1, -1, 1], rtol=1e-5)
    assert math.isclose(geometry.voxel_size, 0.8 * 0.8 * 2.5, rel_tol=1e-5)
    write_image(tmp_path / "mask.nii.gz", (array > 60).astype(np.uint8), geometry,
                reference_path=tmp_path / "scan.nii.gz")
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.header.get_xyzt_units()[0] == scan.header.get_xyzt_units()[0]
    assert np.allclose(mask.affine, scan.affine, rtol=1e-6)  # in the scan's own units
    assert read_image(tmp_path / "mask.nii.gz")[1].allclose(geometry, atol=1e-5)


def test_a_mask_keeps_its_scans_header_fields_as_stored_not_as_nibabel_fixes_them(tmp_path):
    """nibabel makes a negative pixdim positive on load: copied from the loaded header, the
    mask of a qform-only scan with pixdim[1] = -0.8 had +0.8, and ITK showed it mirrored."""
    from nibabel.openers import Opener

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    scan = nib.Nifti1Image(np.random.default_rng(1).random((6, 5, 4)).astype(np.float32), affine)
    scan.header.set_qform(affine, code=1)
    scan.header["sform_code"] = 0
    pixdim = scan.header["pixdim"].copy()
    pixdim[1] = -0.8
    scan.header["pixdim"] = pixdim
    scan.header.write_to(open(tmp_path / "raw.hdr", "wb"))  # the header exactly as set
    raw_header = nib.Nifti1Header.from_fileobj(open(tmp_path / "raw.hdr", "rb"), check=False)
    assert raw_header["pixdim"][1] < 0
    path = tmp_path / "scan.nii"
    with open(path, "wb") as handle:
        raw_header.write_to(handle)
        handle.write(b"\0" * (int(raw_header["vox_offset"]) - handle.tell()))
        handle.write(np.asarray(scan.dataobj).tobytes(order="F"))
    array, geometry = read_image(path)
    write_image(tmp_path / "mask.nii", (array > 0.5).astype(np.uint8), geometry, reference_path=path)
    with Opener(str(tmp_path / "mask.nii")) as handle:
        stored = nib.Nifti1Header.from_fileobj(handle, check=False)
    assert np.array_equal(stored["pixdim"][:4], raw_header["pixdim"][:4])
    itk_scan, itk_mask = sitk.ReadImage(str(path)), sitk.ReadImage(str(tmp_path / "mask.nii"))
    assert np.allclose(itk_scan.GetDirection(), itk_mask.GetDirection())
    assert np.allclose(itk_scan.GetOrigin(), itk_mask.GetOrigin())


def test_a_sheared_voxel_has_the_volume_of_its_parallelepiped():
    """A gantry tilt kept in the affine: the product of the column norms is 1/cos(tilt) too large."""
    tilt = math.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = [[0.5, 0, 0], [0, 0.5, 2.0 * math.sin(tilt)], [0, 0, 2.0 * math.cos(tilt)]]
    geometry = ImageGeometry(affine, (4, 4, 4))
    assert math.isclose(geometry.voxel_size, 0.5 * 0.5 * 2.0 * math.cos(tilt), rel_tol=1e-12)
    assert math.isclose(math.prod(geometry.spacing), 0.5 * 0.5 * 2.0, rel_tol=1e-12)
    planar = ImageGeometry(np.diag([0.3, 0.7, 1.0, 1.0]), (5, 5))
    assert math.isclose(planar.voxel_size, 0.21, rel_tol=1e-12)


# --------------------------------------------------------------------------- header-only reads

def _files_of_every_layout(tmp_path) -> list:
    """One file of every layout the readers lay out differently."""
    rng = np.random.default_rng(11)
    vol = rng.normal(size=(7, 5, 4)).astype(np.float32)
    paths = []
    for ending in VOLUME_ENDINGS:
        paths.append(tmp_path / f"vol{ending}")
        write_image(paths[-1], vol, ImageGeometry(oblique_affine(), vol.shape))
    for shape in [(9, 6), (9, 6, 1)]:  # 2D NIfTI, stored 2D and 3D
        paths.append(tmp_path / f"flat{len(shape)}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), oblique_affine()), str(paths[-1]))
    paths.append(tmp_path / "msd.nii.gz")  # channels last
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3, 2), np.float32), np.eye(4)), str(paths[-1]))
    paths.append(tmp_path / "single4d.nii.gz")  # one volume stored 4D
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3, 1), np.uint8), oblique_affine()), str(paths[-1]))
    paths.append(tmp_path / "vector.nii.gz")  # NIfTI vector intent (X, Y, Z, 1, C)
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3, 1, 3), np.float32), np.eye(4)), str(paths[-1]))
    vector = sitk.GetImageFromArray(rng.normal(size=(4, 5, 6, 3)).astype(np.float32), isVector=True)
    vector.SetSpacing((0.5, 0.7, 2.0))
    vector.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    paths.append(tmp_path / "vector.mha")
    sitk.WriteImage(vector, str(paths[-1]))
    slice3d = sitk.GetImageFromArray(np.zeros((1, 6, 8), np.int16))
    slice3d.SetSpacing((0.3, 0.4, 5.0))
    paths.append(tmp_path / "slice.nrrd")  # one slice stored 3D
    sitk.WriteImage(slice3d, str(paths[-1]))
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))])
    paths.append(tmp_path / "time1.nrrd")  # a trailing singleton 4th axis
    sitk.WriteImage(series, str(paths[-1]))
    for mode, shape in [("L", (6, 9)), ("RGB", (6, 9, 3)), ("LA", (6, 9, 2)), ("1", (6, 9)), ("P", (6, 9)), ("I;16", (6, 9))]:
        paths.append(tmp_path / f"img_{mode.replace(';', '')}.png")
        data = np.zeros(shape, np.uint16 if mode == "I;16" else np.uint8)
        image = Image.fromarray(data) if mode in ("L", "RGB", "LA", "I;16") else Image.new(mode, (9, 6))
        image.save(paths[-1])
    for shape in [(6, 9), (6, 9, 3), (4, 6, 9)]:
        import tifffile

        paths.append(tmp_path / f"stack{len(shape)}_{shape[-1]}.tif")
        tifffile.imwrite(paths[-1], np.zeros(shape, np.uint8), photometric="rgb" if shape[-1] == 3 else "minisblack")
    return paths


def test_header_only_reads_give_the_full_reads_channels_and_geometry(tmp_path):
    paths = _files_of_every_layout(tmp_path)
    for path in paths:
        channels, geometry = read_image_channels(path)
        count, header_geometry = read_geometry(path)
        assert count == channels.shape[0], path.name
        assert header_geometry.shape == geometry.shape == channels.shape[1:], path.name
        np.testing.assert_array_equal(header_geometry.affine, geometry.affine, err_msg=path.name)


def test_header_only_reads_refuse_what_the_full_reads_refuse(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 2), np.float32), np.eye(4)), str(tmp_path / "five.nii.gz"))
    path = tmp_path / "junk.nrrd"
    path.write_bytes(b"this is not an image" * 10)
    for path in (tmp_path / "five.nii.gz", path, tmp_path / "missing.nii.gz", tmp_path / "x.jpg"):
        with pytest.raises(DataError) as full:
            read_image_channels(path)
        with pytest.raises(DataError) as header:
            read_geometry(path)
        assert str(header.value).split(" (")[0] == str(full.value).split(" (")[0]


def test_palette_pngs_read_as_colours_for_scans_and_indices_for_labels_and_16_bit_colour_in_full(tmp_path):
    """A palette scan was segmented by its palette indices (Dice 0.05 against 0.54), and a
    16-bit RGB PNG read at 8 bits, where convert_2d.py read both right."""
    rng = np.random.default_rng(4)
    photo = Image.fromarray((rng.random((6, 9, 3)) * 255).astype(np.uint8)).quantize(16)
    photo.save(tmp_path / "scan.png")
    channels, geometry = read_image_channels(tmp_path / "scan.png")
    np.testing.assert_array_equal(channels, np.moveaxis(np.asarray(photo.convert("RGB")), -1, 0))
    assert read_geometry(tmp_path / "scan.png")[0] == 3 and geometry.shape == (6, 9)
    labels, _ = read_image(tmp_path / "scan.png")  # an indexed label map (VOC's): its classes
    np.testing.assert_array_equal(labels, np.asarray(photo))
    deep = (rng.random((6, 9, 3)) * 65535).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(deep, isVector=True), str(tmp_path / "deep.png"))
    channels, _ = read_image_channels(tmp_path / "deep.png")
    assert channels.dtype == np.uint16
    np.testing.assert_array_equal(channels, np.moveaxis(deep, -1, 0))
    assert read_geometry(tmp_path / "deep.png")[0] == 3


def test_headers_whose_voxels_are_in_another_file_are_refused(tmp_path):
    """SimpleITK reads a MetaImage's ElementDataFile or a NRRD's 'data file' wherever it
    is: a scan of a downloaded dataset read a private file of the machine into training,
    predictions and a report's pictures."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 16)
    (tmp_path / "evil.mha").write_text("ObjectType = Image\nNDims = 2\nDimSize = 64 64\nElementType = MET_UCHAR\n"
                                       f"ElementDataFile = {secret}\n")
    (tmp_path / "evil.nrrd").write_text("NRRD0004\ntype: uint8\ndimension: 2\nsizes: 64 64\nencoding: raw\n"
                                        "data file: secret.bin\n\n")
    for name, problem in (("evil.mha", "ElementDataFile"), ("evil.nrrd", "detached NRRD header")):
        for read in (read_image, read_geometry):
            with pytest.raises(DataError, match=problem):
                read(tmp_path / name)
    # the usual files hold their voxels: read as before
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    for ending in (".mha", ".nrrd"):
        sitk.WriteImage(image, str(tmp_path / f"ok{ending}"))
        assert read_image(tmp_path / f"ok{ending}")[0].shape == (4, 3)


def test_a_3d_tiff_with_an_nnunet_spacing_file_is_refused(tmp_path):
    """nnU-Net's Tiff3DIO keeps CASE_0000.tif's spacing in CASE.json; medseg reads TIFFs
    without geometry, and such a dataset was planned at spacing 1 (isotropic kernels) and
    evaluated in voxels without a word."""
    import json

    volume = np.zeros((4, 6, 5), np.float32)
    write_image(tmp_path / "c0_0000.tif", volume, ImageGeometry.identity(volume.shape))
    write_image(tmp_path / "c1.tif", volume, ImageGeometry.identity(volume.shape))
    assert read_image(tmp_path / "c0_0000.tif")[0].shape == (4, 6, 5)  # no spacing file: voxels, as before
    for sidecar, image in (("c0.json", "c0_0000.tif"), ("c1.json", "c1.tif")):
        (tmp_path / sidecar).write_text(json.dumps({"spacing": [4.0, 0.5, 0.5]}))
        with pytest.raises(DataError, match=rf"{image}: a 3D TIFF with a spacing file \({sidecar}, nnU-Net's Tiff3DIO"):
            read_image(tmp_path / image)
    flat = np.zeros((6, 5), np.float32)  # 2D TIFFs have no spacing in nnU-Net either
    write_image(tmp_path / "c2_0000.tif", flat, ImageGeometry.identity(flat.shape))
    (tmp_path / "c2.json").write_text("{}")
    assert read_image(tmp_path / "c2_0000.tif")[0].shape == (6, 5)

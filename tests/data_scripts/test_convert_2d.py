"""data_scripts/convert_2d.py: folders of PNG/TIFF/GIF images and masks -> nnU-Net v2 layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.data.dataset import check_dataset, load_case
from medseg.data.io import read_image
from medseg.data.prepare.natural2d import convert_2d_folders
from medseg.errors import DataError

SHAPE = (20, 24)


@pytest.fixture
def convert(load_script):
    return load_script("convert_2d").main


def _drive_like(tmp_path, rng):
    """DRIVE-style: RGB PNG images ``NN_training.png``, 0/255 masks ``NN_manual1`` (PNG and GIF)."""
    images, masks = tmp_path / "images", tmp_path / "1st_manual"
    images.mkdir()
    masks.mkdir()
    rgb, fg = {}, {}
    for i, key in enumerate(["01", "02", "03"]):
        rgb[key] = rng.integers(0, 256, SHAPE + (3,), dtype=np.uint8)
        Image.fromarray(rgb[key], "RGB").save(images / f"{key}_training.png")
        if key == "03":
            continue  # an image without a mask
        fg[key] = rng.random(SHAPE) > 0.6
        mask = Image.fromarray(fg[key].astype(np.uint8) * 255, "L")
        mask.save(masks / (f"{key}_manual1.gif" if i == 1 else f"{key}_manual1.png"))
    Image.fromarray(np.zeros(SHAPE, np.uint8), "L").save(masks / "04_manual1.png")  # a mask without an image
    return images, masks, rgb, fg


def test_rgb_png_pairs_become_three_channel_files_and_binary_labels(tmp_path, convert, capsys):
    images, masks, rgb, fg = _drive_like(tmp_path, np.random.default_rng(0))
    out = tmp_path / "Dataset101_DRIVE"
    rc = convert(["--images", str(images), "--masks", str(masks), "--out", str(out), "--image-suffix", "_training",
                  "--mask-suffix", "_manual1", "--label-names", "vessel", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipping 1 image(s) without a mask: 03_training.png" in err
    assert "skipping 1 mask(s) without an image: 04_manual1.png" in err

    info, cases = check_dataset(out)
    assert [c.name for c in cases] == ["01", "02"]
    assert info.channel_names == {0: "R", 1: "G", 2: "B"}
    assert info.labels == {"background": 0, "vessel": 1}
    assert json.loads((out / "dataset.json").read_text())["file_ending"] == ".png"
    for case in cases:
        assert [f.name for f in case.image_files] == [f"{case.name}_000{c}.png" for c in range(3)]
        for c, f in enumerate(case.image_files):
            plane, geometry = read_image(f)
            np.testing.assert_array_equal(plane, rgb[case.name][..., c])
            assert geometry.shape == SHAPE
        loaded = load_case(case, info)
        assert loaded["image"].shape == (3,) + SHAPE
        np.testing.assert_array_equal(loaded["label"][0], fg[case.name].astype(np.uint8))  # GIF one too


def test_grey_tiff_with_noisy_masks_needs_threshold(tmp_path, convert, capsys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "mortar"
    folder.mkdir()
    truth = {}
    for key in ("a", "b"):
        image = rng.integers(0, 4096, SHAPE, dtype=np.uint16)  # 12-bit grey, as microscopy TIFFs
        tifffile.imwrite(folder / f"{key}.tif", image)
        truth[key] = (image, rng.random(SHAPE) > 0.5)
        noisy = np.where(truth[key][1], 255 - rng.integers(0, 20, SHAPE), rng.integers(0, 20, SHAPE)).astype(np.uint8)
        tifffile.imwrite(folder / f"{key}_gt.tiff", noisy)
    args = ["--images", str(folder), "--masks", str(folder), "--mask-suffix", "_gt", "--quiet"]

    assert convert(args + ["--out", str(tmp_path / "no_threshold")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert_2d.py: error: ") and "distinct values" in err and "--foreground-threshold" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "no_threshold").exists()

    out = tmp_path / "Dataset200_Mortar"
    assert convert(args + ["--out", str(out), "--foreground-threshold", "127"]) == 0, capsys.readouterr().err
    info, cases = check_dataset(out)
    assert info.channel_names == {0: "gray"} and info.labels == {"background": 0, "foreground": 1}
    for case in cases:
        assert [f.name for f in case.image_files] == [f"{case.name}_0000.png"]
        image, _ = read_image(case.image_files[0])
        np.testing.assert_array_equal(image, truth[case.name][0])  # 16-bit values kept
        label, _ = read_image(case.label_file)
        np.testing.assert_array_equal(label, truth[case.name][1].astype(np.uint8))


def test_bad_inputs_are_one_line_errors(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(images / "x.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "x.png")
    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(images / "y.png")
    with pytest.raises(DataError, match=r"msk/x\.png: mask size \(10, 10\) differs from image x\.png \(20, 24\)"):
        convert_2d_folders(images, masks, tmp_path / "out", progress=False, log=lambda m: None)
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask: y\.png"):
        convert_2d_folders(images, masks, tmp_path / "out", strict=True, progress=False, log=lambda m: None)
    with pytest.raises(DataError, match="no image matches a mask"):
        convert_2d_folders(images, masks, tmp_path / "out", mask_suffix="_gt", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["parent", "images", "inside"])
def test_out_never_replaces_or_enters_an_input_folder(tmp_path, convert, capsys, where):
    """--force replaced --out whole: an --out holding the input folders deleted them (and
    everything beside them); one inside --images mixed the dataset into the input."""
    root = tmp_path / "work"
    root.mkdir()
    images, masks, _, _ = _drive_like(root, np.random.default_rng(0))
    (root / "thesis.txt").write_text("important")
    out = {"parent": root, "images": images, "inside": images / "converted"}[where]
    code = convert(["--images", str(images), "--masks", str(masks), "--image-suffix", "_training",
                    "--mask-suffix", "_manual1", "--out", str(out), "--force", "--quiet"])
    assert code != 0
    assert "must lie outside" in capsys.readouterr().err
    assert (root / "thesis.txt").read_text() == "important"
    assert sorted(p.name for p in images.iterdir()) == ["01_training.png", "02_training.png", "03_training.png"]


def test_out_in_an_unwritable_place_fails_before_the_work(tmp_path, convert, capsys):
    images, masks, _, _ = _drive_like(tmp_path, np.random.default_rng(0))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = convert(["--images", str(images), "--masks", str(masks), "--out", str(blocker / "ds"), "--quiet"])
    assert code != 0
    err = capsys.readouterr().err
    assert "cannot write there" in err and "Traceback" not in err


def test_anti_aliased_or_16_bit_0_255_masks_and_16_bit_colour_images(tmp_path):
    """0/128/255 masks declared 255 labels (a 256-class network), a 16-bit 0/255 mask kept
    255 where the 8-bit ones became 1, and a 16-bit RGB PNG lost its low bytes (PIL)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    colour = rng.integers(0, 65536, SHAPE + (3,), dtype=np.uint16)
    for key in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(images / f"{key}.png"))
    edges = np.zeros(SHAPE, np.uint8)
    edges[4:10, 4:8], edges[10, 4:8] = 255, 128
    Image.fromarray(edges).save(masks / "a.png")
    Image.fromarray((edges == 255).astype(np.uint16) * 255).save(masks / "b.png")  # 16 bits, 0/255
    with pytest.raises(DataError, match=r"msk/a\.png: mask value 128, .*\[0, 1, 128, 255\].*--foreground-threshold"):
        convert_2d_folders(images, masks, tmp_path / "out", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()
    Image.fromarray((edges == 255).astype(np.uint8) * 255).save(masks / "a.png")
    out = tmp_path / "Dataset102_Deep"
    convert_2d_folders(images, masks, out, progress=False, log=lambda m: None)
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "foreground": 1}
    for key in ("a", "b"):
        label, _ = read_image(out / "labelsTr" / f"{key}.png")
        assert np.array_equal(np.asarray(label), (edges == 255).astype(np.uint8))
        channels = [np.asarray(Image.open(out / "imagesTr" / f"{key}_{c:04d}.png")) for c in range(3)]
        assert np.array_equal(np.stack(channels, -1), colour)


def test_a_bad_flag_is_named_as_the_flag(tmp_path, convert, capsys):
    images, masks, _, _ = _drive_like(tmp_path, np.random.default_rng(0))
    code = convert(["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "o"), "--image-suffix",
                    "_training", "--mask-suffix", "_manual1", "--label-names", "vessel", "artery", "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("error: --label-names: 2 name(s) given but the masks use labels 1..1")


def _with_orientation(array: np.ndarray, path, orientation: int) -> None:
    """``array`` saved as stored pixels with an EXIF Orientation tag (PNG's eXIf: lossless)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


def test_camera_images_are_turned_upright_as_their_exif_orientation_says(tmp_path, convert, capsys):
    """A camera stores its pixels as the sensor read them and says in EXIF how to turn
    them; masks are drawn on the image as viewers show it. The tag was ignored: a
    non-square image's mask was refused as of another size, a square one's misaligned."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stored = np.zeros(SHAPE, np.uint8)  # 20 rows x 24 columns as stored
    stored[2:6, 3:9] = 200  # a bright block near the stored top left
    upright = np.rot90(stored, -1)  # orientation 6: turned 90° clockwise to be viewed (24 x 20)
    _with_orientation(stored, images / "crack.png", 6)
    Image.fromarray(((upright > 0) * 255).astype(np.uint8)).save(masks / "crack.png")  # drawn on the viewed image
    out = tmp_path / "ds"
    args = ["--images", str(images), "--masks", str(masks), "--quiet"]
    assert convert([*args, "--out", str(out)]) == 0
    assert "turned 1 image(s) upright by their EXIF orientation, as viewers show them: crack.png" in capsys.readouterr().err
    info, cases = check_dataset(out)
    loaded = load_case(cases[0], info)
    np.testing.assert_array_equal(loaded["image"][0], upright)
    np.testing.assert_array_equal(loaded["label"][0], (upright > 0).astype(np.uint8))  # block and mask line up

    # masks made from the stored arrays: refused with the hint, taken as they are with --exif ignore
    Image.fromarray(((stored > 0) * 255).astype(np.uint8)).save(masks / "crack.png")
    assert convert([*args, "--out", str(tmp_path / "refused")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask size (20, 24) differs from image crack.png (24, 20)" in err[0]
    assert err[0].endswith("the image is turned 90° clockwise by its EXIF orientation (6), as viewers show it, "
                           "and the mask fits the stored pixels: pass --exif ignore")
    assert not (tmp_path / "refused").exists()
    assert convert([*args, "--out", str(tmp_path / "stored"), "--exif", "ignore"]) == 0
    assert "by their EXIF orientation" not in capsys.readouterr().err
    info, cases = check_dataset(tmp_path / "stored")
    np.testing.assert_array_equal(load_case(cases[0], info)["image"][0], stored)
    with pytest.raises(Exception, match="exif"):
        convert_2d_folders(images, masks, tmp_path / "x", exif="rotate", progress=False, log=lambda m: None)

"""Synthetic vessel datasets: deterministic, anatomically sane, shifted domain = same trees."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage

from medseg.data.dataset import check_dataset, list_cases, load_case
from medseg.data.io import read_image
from medseg.data.synthetic import FAINT_DOMAIN, SHIFTED_SPACING_FACTOR, make_case, make_dataset


def n_components(label: np.ndarray) -> int:
    return ndimage.label(label > 0, structure=np.ones((3,) * label.ndim))[1]


def test_same_seed_same_arrays_other_seed_other_arrays():
    a = make_case(2, seed=7, size=24)
    b = make_case(2, seed=7, size=24)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["geometry"].allclose(b["geometry"], atol=0)
    c = make_case(2, seed=8, size=24)
    assert not np.array_equal(a["label"], c["label"])
    d = make_case(3, seed=7, size=24)
    assert not np.array_equal(a["label"], d["label"])


def test_dataset_files_are_deterministic(tmp_path):
    for out in ("a", "b"):
        make_dataset(tmp_path / out, cases=2, test_cases=1, size=20, seed=5)
    for sub in ("imagesTr/vessel_001_0000.nii.gz", "labelsTr/vessel_001.nii.gz", "imagesTs/vessel_002_0000.nii.gz"):
        x, gx = read_image(tmp_path / "a" / sub)
        y, gy = read_image(tmp_path / "b" / sub)
        np.testing.assert_array_equal(x, y)
        assert gx.allclose(gy, atol=0)


@pytest.mark.parametrize("dims,size", [(3, 48), (2, 96)])
def test_cases_are_sane_trees(dims, size):
    for i in range(4):
        case = make_case(i, seed=11, size=size, dims=dims)
        label, image = case["label"], case["image"]
        assert label.shape == image.shape == case["geometry"].shape
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert n_components(label) <= 2, f"case {i}: the tree fell apart"
        fraction = label.mean()
        assert 0.002 < fraction < 0.3, fraction
        vessel, background = image[label == 1], image[label == 0]
        assert np.median(vessel) - np.median(background) > 3 * background.std() / 2
        # there is noise: the background is not flat
        assert background.std() > 5


def betti_full_connectivity(label: np.ndarray) -> tuple[int, ...]:
    """(b0, b1[, b2]) of the foreground with 8/26-connectivity (background 4/6), from
    component counts and the Euler characteristic (skimage, independent of medseg)."""
    from skimage.measure import euler_number
    from skimage.measure import label as components

    b0 = int(components(label, connectivity=label.ndim).max())
    cavities = int(components(1 - label, connectivity=1).max()) - 1  # background pieces not outside
    chi = int(euler_number(label, connectivity=label.ndim))
    if label.ndim == 2:
        return b0, b0 - chi
    return b0, b0 + cavities - chi, cavities


@pytest.mark.parametrize("dims,size", [(3, 32), (3, 48), (2, 64)])
def test_label_topology_is_a_tree_plus_the_requested_loops(dims, size):
    for i in range(3):
        for loops in (0, 1):
            case = make_case(i, seed=0, size=size, dims=dims, loops=loops)
            betti = betti_full_connectivity(case["label"])
            assert betti[0] == 1, (i, loops, betti)
            assert betti[1] == case["tree"].num_loops, (i, loops, betti)
            if dims == 3:
                assert betti[2] == 0
    assert make_case(0, seed=0, size=48, loops=1)["tree"].num_loops == 1
    assert make_case(0, seed=0, size=64)["tree"].num_segments > 100  # it branches


def test_geometry_options():
    flipped = make_case(0, size=16)["geometry"]
    assert flipped.axcodes == ("L", "P", "S")
    assert flipped.spacing == pytest.approx((0.8, 0.8, 1.2))
    identity = make_case(0, size=16, affine="identity", spacing=(1.0, 1.0, 2.0))["geometry"]
    assert identity.axcodes == ("R", "A", "S") and identity.spacing == pytest.approx((1, 1, 2))
    oblique = make_case(0, size=16, affine="oblique")["geometry"]
    rotation = oblique.affine[:3, :3] / np.array(oblique.spacing)
    assert not np.allclose(np.abs(rotation), np.eye(3), atol=0.05)  # not axis-aligned
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-9)
    # field of view centred on world 0
    centre = oblique.affine @ np.array([*(np.array(oblique.shape) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_shifted_domain_same_anatomy_other_imaging():
    source = make_case(1, seed=4, size=40)
    shifted = make_case(1, seed=4, size=40, shifted=True)
    np.testing.assert_array_equal(source["tree"].p0, shifted["tree"].p0)
    expected_spacing = np.array(source["geometry"].spacing) * SHIFTED_SPACING_FACTOR[3]
    assert shifted["geometry"].spacing == pytest.approx(tuple(expected_spacing))
    assert shifted["label"].shape != source["label"].shape
    # same anatomy in world space: resample the shifted label onto the source grid
    to_shifted = np.linalg.inv(shifted["geometry"].affine) @ source["geometry"].affine
    grid = np.indices(source["label"].shape).reshape(3, -1)
    coords = to_shifted[:3, :3] @ grid + to_shifted[:3, 3:4]
    resampled = ndimage.map_coordinates(shifted["label"].astype(np.float32), coords, order=1).reshape(source["label"].shape) > 0.5
    a, b = source["label"] > 0, resampled
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.75, dice
    assert n_components(shifted["label"]) == n_components(source["label"])
    # physical vessel volume agrees
    vol = lambda c: c["label"].sum() * np.prod(c["geometry"].spacing)  # noqa: E731
    assert vol(shifted) == pytest.approx(vol(source), rel=0.15)

    def contrast_and_noise(case):
        img, lab = case["image"], case["label"] > 0
        core = ndimage.binary_erosion(lab)
        bg = ~ndimage.binary_dilation(lab, iterations=2)
        return np.median(img[core]) - np.median(img[bg]), img[bg].std()

    c_src, n_src = contrast_and_noise(source)
    c_sh, n_sh = contrast_and_noise(shifted)
    assert c_sh < 0.8 * c_src
    assert n_sh > 1.3 * n_src


def test_shifted_same_label_when_resolution_is_shared():
    """On the source grid only the imaging changes: identical label, other image."""
    source = make_case(0, seed=1, size=24)
    shifted = make_case(0, seed=1, size=24, shifted=True, shifted_spacing_factor=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(source["label"], shifted["label"])
    assert shifted["geometry"].allclose(source["geometry"])
    assert np.abs(source["image"] - shifted["image"]).mean() > 20


def test_fixture_datasets_are_readable(synthetic_dataset_3d, shifted_dataset_3d, synthetic_dataset_2d, synthetic_dataset_2d_png):
    info, cases = check_dataset(synthetic_dataset_3d, verify=True)
    info_s, cases_s = check_dataset(shifted_dataset_3d, verify=True)
    assert [c.name for c in cases] == [c.name for c in cases_s]
    assert info.labels == info_s.labels == {"background": 0, "vessel": 1}
    a, b = load_case(cases[0], info), load_case(cases_s[0], info_s)
    assert a["geometry"].spacing != b["geometry"].spacing
    assert len(list_cases(synthetic_dataset_3d, info, "Ts")) == 2
    for root in (synthetic_dataset_2d, synthetic_dataset_2d_png):
        info2, cases2 = check_dataset(root, verify=True)
        d = load_case(cases2[0], info2)
        assert d["image"].ndim == 3 and d["label"].shape == d["image"].shape


def test_png_dataset_has_uint8_images_and_binary_labels(synthetic_dataset_2d_png):
    img, geom = read_image(synthetic_dataset_2d_png / "imagesTr" / "vessel_000_0000.png")
    lab, _ = read_image(synthetic_dataset_2d_png / "labelsTr" / "vessel_000.png")
    assert img.dtype == np.uint8 and 20 < img.mean() < 200
    assert set(np.unique(lab)) == {0, 1}
    assert geom.spacing == (1.0, 1.0)


def test_faint_domain_same_label_thin_branches_near_the_noise():
    """The demo's domain: the source grid and label, half the contrast, and thin vessels fainter than thick ones."""
    source = make_case(2, seed=0, size=48, loops=2)
    faint = make_case(2, seed=0, size=48, loops=2, params=FAINT_DOMAIN)
    np.testing.assert_array_equal(source["label"], faint["label"])
    label = source["label"] > 0
    distance = ndimage.distance_transform_edt(label, sampling=source["geometry"].spacing)
    background = ~ndimage.binary_dilation(label, iterations=3)
    thin = label & ~ndimage.binary_erosion(label, iterations=2)  # rims and whole thin vessels
    thick = distance >= 2.0  # mm from the wall: the centre of the thick vessels only

    def contrast_to_noise(case, where):
        img = case["image"]
        return (np.median(img[where]) - np.median(img[background])) / img[background].std()

    assert contrast_to_noise(faint, thick) < 0.6 * contrast_to_noise(source, thick)
    assert contrast_to_noise(faint, thin) < 0.6 * contrast_to_noise(source, thin)
    assert contrast_to_noise(faint, thin) < contrast_to_noise(faint, thick)


def _script():
    """data_scripts/make_synthetic.py as a module."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "data_scripts" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_dataset_and_reports(tmp_path, capsys):
    module = _script()
    out = tmp_path / "Dataset005_Cli"
    assert module.main(["--out", str(out), "--cases", "2", "--test-cases", "1", "--size", "20", "--seed", "3", "--shifted"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "shifted domain" in printed and "2 cases" in printed
    info, cases = check_dataset(out)
    assert info.num_training == 2 and len(cases) == 2
    assert info.raw["medseg_synthetic"]["domain"] == "shifted"
    faint = tmp_path / "Dataset006_Faint"
    assert module.main(["--out", str(faint), "--cases", "1", "--test-cases", "0", "--size", "20", "--faint"]) == 0
    assert check_dataset(faint)[0].raw["medseg_synthetic"]["domain"] == "faint"
    with pytest.raises(SystemExit) as both:  # argparse: one domain at a time
        module.main(["--out", str(tmp_path / "both"), "--faint", "--shifted"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert module.main(["--out", str(tmp_path / "bad"), "--dims", "3", "--format", "png"]) == 2
    assert "PNG datasets are 2D" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "dataset.json").exists()


def test_cli_refuses_bad_arguments_and_existing_folders(tmp_path, capsys):
    module = _script()
    out = tmp_path / "Dataset007"
    for bad, message in [
        (["--spacing", "-1", "1", "1"], "--spacing: each value must be a positive number"),
        (["--spacing", "nan"], "--spacing: each value must be a positive number"),
        (["--size", "0"], "--size: each axis must be 8 to 1024"),
        (["--size", "100000"], "--size: each axis must be 8 to 1024"),
        (["--test-cases", "-2"], "--test-cases: must be 0 or more"),
        (["--loops", "-3"], "--loops: must be 0 or more"),
        (["--cases", "0"], "--cases: at least 1"),
    ]:
        assert module.main(["--out", str(out), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    dead = tmp_path / ".Dataset007.tmp-4194305"  # a killed generator's folder (no such process)
    (dead / "imagesTr").mkdir(parents=True)
    args = ["--out", str(out), "--cases", "2", "--test-cases", "0", "--size", "16"]
    assert module.main(args) == 0
    assert not dead.exists()
    first = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert module.main(["--out", str(out), "--cases", "1", "--test-cases", "0", "--size", "16"]) == 2
    assert "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == first
    # --force replaces the dataset whole: no case of the old one is left beside the new
    assert module.main(["--out", str(out), "--cases", "1", "--test-cases", "0", "--size", "16", "--force"]) == 0
    info, cases = check_dataset(out)
    assert info.num_training == 1 and len(cases) == 1
    assert len(list((out / "imagesTr").iterdir())) == 1
    assert not list(tmp_path.glob(".Dataset007.tmp-*"))

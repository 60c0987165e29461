"""The fingerprint against an independent numpy computation, and as a replacement for
``fit_preprocessing`` and ``label_statistics``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from medseg.config import validate_config
from medseg.data.dataset import check_dataset, label_statistics, split_cases
from medseg.data.transforms import fit_preprocessing
from medseg.planning import (
    compute_fingerprint,
    label_statistics_from_fingerprint,
    load_samples,
    preprocessing_from_fingerprint,
    read_fingerprint,
)
from medseg.planning.fingerprint import label_thickness
from medseg.planning.writer import write_fingerprint


@pytest.fixture(scope="module")
def multi_fp(multi_dataset):
    return compute_fingerprint(multi_dataset, workers=2, progress=False)


def _nifti(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), [float(z) for z in img.header.get_zooms()[:3]]


def _config(dataset, **normalization):
    return validate_config({
        "data": {"dataset": str(dataset), "patch_size": [16, 16, 16], "normalization": normalization},
        "train": {"iterations": 1}, "output_dir": "unused",
    })


def test_fingerprint_matches_numpy(multi_dataset, multi_fp):
    fingerprint, samples = multi_fp
    assert [r["name"] for r in fingerprint["cases"]] == ["vessel_000", "vessel_001", "vessel_002"]
    for record in fingerprint["cases"]:
        name = record["name"]
        label, zooms = _nifti(multi_dataset / "labelsTr" / f"{name}.nii.gz")
        images = [_nifti(multi_dataset / "imagesTr" / f"{name}_{c:04d}.nii.gz")[0] for c in range(2)]
        assert record["shape"] == list(label.shape)
        np.testing.assert_allclose(record["spacing"], zooms, rtol=1e-6)
        assert record["axcodes"] == "LPS"  # the generator's 'flipped' axes
        counts = np.bincount(label.ravel().astype(int))
        assert record["label_voxels"] == {str(v): int(n) for v, n in enumerate(counts) if n}
        assert record["num_voxels"] == label.size
        assert [f["path"] for f in record["files"]] == [
            f"imagesTr/{name}_0000.nii.gz", f"imagesTr/{name}_0001.nii.gz", f"labelsTr/{name}.nii.gz"
        ]
        assert record["files"][2]["bytes"] == (multi_dataset / "labelsTr" / f"{name}.nii.gz").stat().st_size
        fg = label > 0
        for c, image in enumerate(images):
            stats = record["intensity"][c]
            values = image[fg].astype(np.float64)
            assert stats["n"] == values.size
            assert stats["mean"] == pytest.approx(values.mean(), rel=1e-6)
            assert stats["std"] == pytest.approx(values.std(), rel=1e-5)
            assert stats["percentile_00_5"] == pytest.approx(np.percentile(values, 0.5), rel=1e-6)
            assert stats["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5), rel=1e-6)
        # fewer foreground voxels than the sample size: every one of them is kept
        assert samples[name].shape == (2, int(fg.sum()))
        np.testing.assert_allclose(np.sort(samples[name][1]), np.sort(images[1][fg].astype(np.float32)))

        from medseg.topology import skeletonize  # the statistic's skeleton; the rest is recomputed here

        for value in (1, 2):
            mask = label == value
            entry = record["thickness"].get(str(value))
            if not mask.any():
                assert entry is None
                continue
            edt = ndimage.distance_transform_edt(mask, sampling=zooms)
            radii = edt[skeletonize(mask) & mask]
            expected = np.percentile(radii, [10, 50, 90])
            got = [entry["radius_mm"][q] for q in ("p10", "p50", "p90")]
            np.testing.assert_allclose(got, expected, rtol=1e-6)
            assert entry["sampled"] is False


def test_dataset_summaries(multi_fp):
    fingerprint, samples = multi_fp
    lesion = fingerprint["labels"]["lesion"]
    assert lesion["presence"] == pytest.approx(2 / 3)
    assert lesion["voxels"] == 2 * 4**3
    # the 4^3 lesion cube: its skeleton sits 2 voxels (1 mm in-plane) inside the boundary
    assert 1.0 <= lesion["radius_mm"]["p50"] <= 3.0
    ct = fingerprint["intensity"][0]
    pooled = np.concatenate([s[0] for s in samples.values()]).astype(np.float64)
    assert ct["name"] == "CT" and ct["n"] == pooled.size
    assert ct["median"] == pytest.approx(np.median(pooled))
    assert ct["percentile_99_5"] == pytest.approx(np.percentile(pooled, 99.5))


def test_replaces_label_statistics_and_fit_preprocessing(multi_dataset, multi_fp, tmp_path):
    fingerprint, samples = multi_fp
    # through disk, as the trainer will read it
    json_path = write_fingerprint(tmp_path, fingerprint, samples)
    fingerprint, samples = read_fingerprint(json_path), load_samples(json_path)
    info, cases = check_dataset(multi_dataset)
    train, _ = split_cases(cases, 0.34, seed=0)
    assert len(train) == 2
    for subset in (cases, train):
        assert label_statistics_from_fingerprint(fingerprint, info, subset) == label_statistics(subset, info)
        for normalization in ({"scheme": "auto"}, {"scheme": "ct"}, {"scheme": "ct", "ct_clip": [-100, 400]}):
            cfg = _config(multi_dataset, **normalization)
            ours = preprocessing_from_fingerprint(fingerprint, samples, info, cfg, subset)
            theirs = fit_preprocessing(subset, info, cfg)
            assert ours["version"] == theirs["version"]
            for a, b in zip(ours["channels"], theirs["channels"]):
                assert a.keys() == b.keys() and a["scheme"] == b["scheme"]
                for key in ("clip", "mean", "std"):
                    if key in a:
                        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


def test_thickness_of_large_masks_is_sampled():
    """A rod of radius 6 voxels: exact on the whole box and on sampled tiles."""
    z, y, x = np.mgrid[:40, :40, :200]
    rod = (z - 20) ** 2 + (y - 20) ** 2 <= 36
    exact = label_thickness(rod, (1.0, 1.0, 1.0))
    sampled = label_thickness(rod, (1.0, 1.0, 1.0), budget=10_000)  # one 64-voxel tile of the rod
    assert exact["sampled"] is False and sampled["sampled"] is True
    assert exact["radius_mm"]["p50"] == pytest.approx(np.sqrt(37))  # the nearest background voxel: (6, 1) away
    assert sampled["radius_mm"]["p50"] == pytest.approx(exact["radius_mm"]["p50"], abs=0.5)
    assert label_thickness(np.zeros((8, 8), bool), (1.0, 1.0)) is None


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.lists(st.integers(3, 24), min_size=2, max_size=3),
    smooth=st.floats(0.5, 2.5),
    level=st.floats(0.3, 0.7),
)
def test_distance_to_background_equals_the_distance_transform(seed, shape, smooth, level):
    """The k-d tree over the background voxels touching the mask gives scipy's exact
    Euclidean distance transform at every mask voxel, with anisotropic spacing; a mask
    with no background falls back to the transform itself."""
    from medseg.planning.fingerprint import _distance_to_background

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random(shape), smooth) > level
    spacing = rng.uniform(0.3, 3.0, len(shape))
    where = np.nonzero(mask)
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)[where]
    np.testing.assert_allclose(_distance_to_background(mask, spacing)(where), expected, rtol=1e-12)

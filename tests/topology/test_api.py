"""medseg.topology's API: degenerate inputs, bad inputs, options, batches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import medseg.topology as topo


def ring2d():
    m = np.zeros((7, 7))
    m[1:6, 1:6] = 1
    m[3, 3] = 0
    return m


def test_import_needs_numpy_only():
    code = "import sys, medseg.topology; assert 'torch' not in sys.modules and 'gudhi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((5, 5)),
        np.ones((4, 4, 4)),
        np.full((3, 6), 0.7),
        np.zeros((1, 1)),
        np.ones((1, 1, 1)),
        np.zeros((1, 9, 9)),
        np.ones((6, 1, 6)),
    ],
    ids=["zeros2d", "ones3d", "constant", "voxel2d", "voxel3d", "slab-zeros", "slab-ones"],
)
@pytest.mark.parametrize("construction", ["V", "T"])
def test_constant_images_have_one_essential_class(image, construction):
    bc = topo.barcode(image, construction=construction)
    assert bc.num_pairs.tolist() == [0] * image.ndim
    assert len(bc.essential_births[0]) == 1 and bc.essential_births[0][0] == image.flat[0]
    m = topo.betti_matching(image, image, construction=construction)
    assert m.num_matched.tolist() == [0] * image.ndim
    assert m.error.tolist() == [0] * image.ndim
    assert m.loss() == 0.0


def test_empty_matching_and_masks():
    zeros, ones = np.zeros((8, 8, 8)), np.ones((8, 8, 8))
    assert topo.betti_matching_error(zeros, ones).tolist() == [0, 0, 0]
    shell = np.ones((8, 8, 8))
    shell[3, 3, 3] = 0
    assert topo.betti_matching_error(shell, ones).tolist() == [0, 0, 1]
    m = topo.betti_matching(shell, zeros)
    assert np.isfinite(m.loss()) and m.loss() == 1.0


def test_slab_loop_is_found_in_3d():
    slab = ring2d()[None]  # (1, 7, 7): a 1-voxel-thick 3D ring
    bc = topo.barcode(slab)
    assert bc.num_pairs.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(bc.birth_coordinates[1][:, 0], [0])


def test_ring_superlevel_values_and_coordinates():
    bc = topo.barcode(ring2d())
    assert bc.diagram(1).tolist() == [[1.0, 0.0]]
    assert bc.death_coordinates[1].tolist() == [[3, 3]]
    assert bc.birth_coordinates[1].dtype == np.int64 and bc.birth_coordinates[1].shape == (1, 2)


def test_V_and_T_connectivity():
    diag = np.zeros((6, 6))
    for i in range(1, 5):
        diag[i, i] = 1
    # superlevel on a mask: V = 4-connected foreground, T = 8-connected
    assert topo.barcode(diag, construction="V").num_pairs[0] == 3
    assert topo.barcode(diag, construction="T").num_pairs[0] == 0


def test_relative_counts_structures_touching_the_border():
    bar = np.zeros((9, 9))
    bar[:, 4] = 1  # a vessel crossing the image
    half = np.zeros((9, 9))
    half[:, :5] = 1
    plain = topo.betti_matching(bar, half)
    rel = topo.betti_matching(bar, half, relative=True)
    assert plain.error.tolist() == [0, 0]
    assert rel.error[1] >= 1  # with the border, the crossing vessel closes loops
    for coords in rel.unmatched_prediction_birth_coordinates + rel.unmatched_target_death_coordinates:
        assert coords.size == 0 or (coords.min() >= 0 and coords.max() < 9)


def test_include_unmatched_flags():
    rng = np.random.default_rng(0)
    a, b = rng.random((12, 12)), rng.random((12, 12))
    full = topo.betti_matching(a, b)
    part = topo.betti_matching(a, b, include_unmatched_prediction=False, include_unmatched_target=False)
    assert part.num_unmatched_prediction.tolist() == full.num_unmatched_prediction.tolist()
    assert all(len(c) == 0 for c in part.unmatched_prediction_birth_coordinates)
    matched_only = 2 * sum(
        ((full.matched_prediction_births[d] - full.matched_target_births[d]) ** 2).sum()
        + ((full.matched_prediction_deaths[d] - full.matched_target_deaths[d]) ** 2).sum()
        for d in range(2)
    )
    assert part.loss() == pytest.approx(matched_only)
    assert full.loss(dims=[0]) + full.loss(dims=1) == pytest.approx(full.loss())


def test_float32_and_dtypes():
    rng = np.random.default_rng(1)
    a = rng.random((6, 7, 5)).astype(np.float32)
    b = rng.random((6, 7, 5)).astype(np.float32)
    m32 = topo.betti_matching(a, b)
    m64 = topo.betti_matching(a.astype(np.float64), b.astype(np.float64))
    assert m32.num_matched.tolist() == m64.num_matched.tolist()
    assert m32.loss() == pytest.approx(m64.loss(), rel=1e-12)
    mixed = topo.betti_matching(a, b.astype(np.float64))
    assert mixed.num_matched.tolist() == m64.num_matched.tolist()
    mask = rng.random((10, 10)) > 0.5
    assert topo.barcode(mask).num_pairs.tolist() == topo.barcode(mask.astype(float)).num_pairs.tolist()
    assert topo.barcode(mask.astype(np.int64)).num_pairs.tolist() == topo.barcode(mask.astype(float)).num_pairs.tolist()


def test_batches_equal_single_calls():
    rng = np.random.default_rng(2)
    preds = rng.random((2, 3, 6, 6, 6))
    targets = (rng.random((2, 3, 6, 6, 6)) > 0.5).astype(float)
    nested = topo.betti_matching_batch(preds, targets, threads=2)
    assert len(nested) == 2 and len(nested[0]) == 3
    for i in range(2):
        for j in range(3):
            single = topo.betti_matching(preds[i, j], targets[i, j])
            assert nested[i][j].num_matched.tolist() == single.num_matched.tolist()
            assert nested[i][j].loss() == pytest.approx(single.loss(), rel=1e-12)
    flat = topo.betti_matching_batch(list(preds[0]), list(targets[0]), threads=1)
    assert [r.loss() for r in flat] == pytest.approx([r.loss() for r in nested[0]])
    errors = topo.betti_matching_error_batch(preds > 0.5, targets, threads=2)
    assert errors.shape == (2, 3, 3)
    assert errors[1, 2].tolist() == topo.betti_matching_error(preds[1, 2] > 0.5, targets[1, 2]).tolist()
    bcs = topo.barcode_batch(list(preds[0]), threads=2)
    assert [b.num_pairs.tolist() for b in bcs] == [topo.barcode(p).num_pairs.tolist() for p in preds[0]]
    assert topo.betti_matching_batch([], []) == []


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.array([1.0, np.nan, 0.0, 0.0]).reshape(2, 2), np.zeros((2, 2)), "NaN"),
        (np.array([1.0, np.inf, 0.0, 0.0]).reshape(2, 2), np.zeros((2, 2)), "infinite"),
        (np.zeros((3, 3)), np.zeros((3, 4)), "shape"),
        (np.zeros(5), np.zeros(5), "2D or 3D"),
        (np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)), "2D or 3D"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "empty"),
        (np.array([["a", "b"], ["c", "d"]]), np.zeros((2, 2)), "dtype"),
    ],
)
def test_bad_inputs_raise_value_error(a, b, match):
    with pytest.raises(ValueError, match=match):
        topo.betti_matching(a, b)
    if a.shape == b.shape:
        with pytest.raises(ValueError, match=match):
            topo.barcode(a)


def test_bad_options_raise():
    x = np.zeros((3, 3))
    with pytest.raises(ValueError, match="filtration"):
        topo.barcode(x, filtration="up")
    with pytest.raises(ValueError, match="construction"):
        topo.betti_matching(x, x, construction="X")
    with pytest.raises(ValueError, match="comparison"):
        topo.betti_matching(x, x, comparison="avg")
    with pytest.raises(ValueError, match="batch"):
        topo.barcode_batch(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="threads"):
        topo.betti_matching(x, x, threads=0)
    assert isinstance(topo.TopologyInputError("x"), ValueError)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def images(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 6 if ndim == 3 else 10)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    levels = draw(st.sampled_from([0, 2, 4]))
    a, b = rng.random(shape), rng.random(shape)
    if levels:
        a, b = np.floor(a * levels) / levels, np.floor(b * levels) / levels
    return a, b


@settings(max_examples=80, deadline=None)
@given(
    images(),
    st.sampled_from(["V", "T"]),
    st.sampled_from(["sublevel", "superlevel"]),
    st.sampled_from(["union", "intersection"]),
)
def test_matching_invariants(pair, construction, filtration, comparison):
    a, b = pair
    kw = dict(construction=construction, filtration=filtration, comparison=comparison)
    self_match = topo.betti_matching(a, a, **kw)
    assert self_match.num_matched.tolist() == topo.barcode(a, construction=construction, filtration=filtration).num_pairs.tolist()
    assert self_match.error.tolist() == [0] * a.ndim and self_match.loss() == 0.0
    ab, ba = topo.betti_matching(a, b, **kw), topo.betti_matching(b, a, **kw)
    assert ab.num_matched.tolist() == ba.num_matched.tolist()
    assert ab.num_unmatched_prediction.tolist() == ba.num_unmatched_target.tolist()
    assert ab.loss() == pytest.approx(ba.loss(), rel=1e-12, abs=1e-12)
    bkw = dict(construction=construction, filtration=filtration)
    bca, bcb = topo.barcode(a, **bkw), topo.barcode(b, **bkw)
    assert (ab.num_matched + ab.num_unmatched_prediction).tolist() == bca.num_pairs.tolist()
    assert (ab.num_matched + ab.num_unmatched_target).tolist() == bcb.num_pairs.tolist()
    for d in range(a.ndim):  # values are read back from the inputs
        np.testing.assert_array_equal(
            ab.matched_prediction_births[d], a[tuple(ab.matched_prediction_birth_coordinates[d].T)]
        )


def test_intersection_comparison():
    """The intersection sees only what both images share: a loop closed in the target
    and in the prediction but at places where the other is open is matched through the
    union (a closed ring) and not through the intersection (two open arcs)."""
    ring = np.zeros((9, 9))
    ring[2:7, 2:7] = 1
    ring[3:6, 3:6] = 0
    a, b = ring.copy(), ring.copy()
    a[2, 4] = 0.6  # each ring is weakened at a different place
    b[6, 4] = 0.6
    union = topo.betti_matching(a, b, comparison="union")
    inter = topo.betti_matching(a, b, comparison="intersection")
    assert union.num_matched.tolist() == [0, 1]
    assert inter.num_matched.tolist() == [0, 1]
    # the matched loop is born where the ring closes: at 0.6 in both images
    assert union.matched_prediction_births[1].tolist() == [0.6]
    a[2, 4] = 0.0  # now a is open: through the intersection nothing closes
    assert topo.betti_matching(a, b, comparison="intersection").num_matched.tolist() == [0, 0]
    assert topo.betti_matching(a, b, comparison="union").num_matched.tolist() == [0, 0]
    with pytest.raises(ValueError, match="comparison"):
        topo.betti_matching(a, b, comparison="both")


@pytest.mark.parametrize("construction,conn", [("V", {2: 4, 3: 6}), ("T", {2: 8, 3: 26})])
def test_barcode_of_a_mask_gives_its_betti_numbers(construction, conn):
    """On a binary mask, the pairs (1, 0) of the superlevel barcode (plus the essential
    class) are the Betti numbers of the foreground with the construction's connectivity."""
    from medseg.topology.betti_numbers import betti_numbers
    rng = np.random.default_rng(11)
    for shape in [(16, 16), (7, 7, 7)]:
        for _ in range(5):
            mask = rng.random(shape) > 0.45
            if not mask.any():
                continue
            bc = topo.barcode(mask, filtration="superlevel", construction=construction)
            counts = [int(((bc.births[d] == 1) & (bc.deaths[d] == 0)).sum()) for d in range(mask.ndim)]
            counts[0] += 1  # the essential component, born at 1
            expected = list(betti_numbers(mask, connectivity=conn[mask.ndim]))
            assert counts == expected


def test_working_memory_is_recycled_and_can_be_released():
    """Large arrays are kept for the next call (same results) until release_cached_memory()."""
    from medseg.topology import _inputs, release_cached_memory

    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    # 3 * 65^3 cells of 4-8 bytes: arrays of 3-7 MiB, above the 2 MiB from which arrays are recycled
    a, b = (gaussian_filter(rng.random((64, 64, 64)), 2) for _ in range(2))
    first = topo.betti_matching(a, b, construction="T")
    assert _inputs.engine().cached_memory_bytes() > 0
    again = topo.betti_matching(a, b, construction="T")  # on recycled (not zeroed by the kernel) memory
    for name in ("num_matched", "num_unmatched_prediction", "num_unmatched_target"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    for x, y in zip(first.matched_prediction_birth_coordinates, again.matched_prediction_birth_coordinates):
        assert np.array_equal(x, y)
    freed = release_cached_memory()
    assert freed > 0 and _inputs.engine().cached_memory_bytes() == 0
    assert release_cached_memory() == 0
    third = topo.betti_matching(a, b, construction="T")
    assert np.array_equal(third.num_matched, first.num_matched)


def test_batches_laid_out_differently_are_refused_not_paired():
    """The error batch handed flat lists on: a (2, 3) batch against a (3, 2) one paired
    prediction [1, 0] with target [1, 1] and returned errors in the predictions' layout."""
    rng = np.random.default_rng(0)
    preds, targets = rng.random((2, 3, 6, 6)) > 0.5, rng.random((3, 2, 6, 6)) > 0.5
    for function in (topo.betti_matching_error_batch, topo.betti_matching_batch):
        with pytest.raises(topo.TopologyInputError, match=r"batch layout: \(2, 3\) vs \(3, 2\)"):
            function(preds, targets)


def test_flags_and_dimensions_are_checked():
    """relative='no' turned relative persistence on (a truthy string), and dimensions out
    of range gave bare IndexErrors or counted the last dimension (-1) or one twice."""
    rng = np.random.default_rng(1)
    a, b = rng.random((8, 8)), (rng.random((8, 8)) > 0.5).astype(float)
    for key in ("relative", "include_unmatched_prediction", "include_unmatched_target"):
        with pytest.raises(topo.TopologyInputError, match=f"{key} must be True or False, got 'no'"):
            topo.betti_matching(a, b, **{key: "no"})
    with pytest.raises(topo.TopologyInputError, match="relative must be True or False"):
        topo.betti_matching_batch([a], [b], relative="yes")
    result = topo.betti_matching(a, b)
    assert result.loss(dims=[0, 1]) == result.loss() and result.loss(dims=np.int64(1)) == result.loss_per_dim()[1]
    for dims in (5, -1, [0, 0], [True]):
        with pytest.raises(ValueError, match="dims must be distinct dimensions from 0 to 1"):
            result.loss(dims=dims)
    barcode = topo.barcode(a)
    for method in (barcode.diagram, barcode.persistence):
        with pytest.raises(ValueError, match="dim must be a homology dimension from 0 to 1, got 2"):
            method(2)


def test_read_only_inputs_are_taken_as_they_are(tmp_path):
    """The engine only reads its inputs: a memory-mapped or write-protected array was
    refused by the bindings with "incompatible function arguments"."""
    rng = np.random.default_rng(2)
    a, b = rng.random((12, 10)), (rng.random((12, 10)) > 0.5).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    protected = b.copy()
    protected.setflags(write=False)
    assert not mapped.flags.writeable and not protected.flags.writeable
    got, want = topo.barcode(mapped), topo.barcode(a.copy())
    for d in range(2):
        assert np.array_equal(got.births[d], want.births[d]) and np.array_equal(got.deaths[d], want.deaths[d])
    expected = topo.betti_matching(a.copy(), b)
    for result in (topo.betti_matching(mapped, protected), topo.betti_matching_batch([mapped], [protected])[0]):
        assert np.array_equal(result.num_matched, expected.num_matched)
        assert result.loss() == expected.loss()
    full = np.ones((6, 6, 6), dtype=bool)  # foreground up to every face: no cropped copy is made
    full.setflags(write=False)
    assert np.array_equal(topo.skeletonize(full), topo.skeletonize(np.ones((6, 6, 6), dtype=bool)))


def test_an_error_batch_of_2d_and_3d_pairs_is_refused_by_name():
    rng = np.random.default_rng(3)
    preds = [rng.random((8, 8)) > 0.5, rng.random((6, 6, 6)) > 0.5]
    targets = [rng.random((8, 8)) > 0.5, rng.random((6, 6, 6)) > 0.5]
    with pytest.raises(topo.TopologyInputError, match=r"pred_masks: pairs of 2D and 3D images in one batch \(pairs 0, 1\)"):
        topo.betti_matching_error_batch(preds, targets)
    assert [len(r.error) for r in topo.betti_matching_batch(preds, targets)] == [2, 3]

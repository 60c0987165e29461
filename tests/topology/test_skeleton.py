"""medseg.topology.skeletonize: the guarantees of a topology-preserving thinning.

Each property is checked on random blobs (hypothesis), tubes of every thickness 1-8,
tori, hollow spheres and the shared reference masks: the skeleton is a subset of the
mask with the same Betti numbers (gudhi-checked betti_numbers, same connectivity),
every component keeps a voxel, it is thin (a remaining 2x2 / 2x2x2 block holds no
deletable voxel), thinning it again changes nothing, and the result does not depend on
the number of threads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from medseg.topology import TopologyInputError, betti_numbers, skeletonize, skeletonize_labels
from medseg.topology import _inputs

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"
CONNECTIVITIES = {2: (8, 4), 3: (26, 6)}


# --------------------------------------------------------------------------- shapes


def blob(seed: int, shape: tuple[int, ...], sigma: float, level: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


def bar(thickness: int, n: int = 24, ndim: int = 3) -> np.ndarray:
    """A straight square bar ``thickness`` voxels thick along the last axis."""
    a = np.zeros((n,) * ndim, bool)
    lo = 8
    index = tuple(slice(lo, lo + thickness) for _ in range(ndim - 1)) + (slice(2, n - 4),)
    a[index] = True
    return a


def round_tube(thickness: int, n: int = 28) -> np.ndarray:
    """A curved tube of diameter ``thickness`` voxels (a quarter circle in 3D)."""
    z, y, x = np.indices((n, n, n)).astype(float)
    dist = np.abs(np.hypot(y - 2, x - 2) - (n - 10)) ** 2 + (z - n / 2) ** 2
    return dist <= (thickness / 2) ** 2


def torus(n: int = 25, major: float = 7.0, minor: float = 2.5) -> np.ndarray:
    z, y, x = np.indices((n, n, n)) - n // 2
    return (np.sqrt(x**2 + y**2) - major) ** 2 + z**2 <= minor**2


def hollow_sphere(n: int = 21, outer: float = 8, inner: float = 5) -> np.ndarray:
    r = np.sqrt(sum((g - n // 2) ** 2 for g in np.indices((n, n, n))))
    return (r <= outer) & (r > inner)


def reference_masks() -> dict[str, np.ndarray]:
    masks = {}
    for path in sorted(REFERENCE.glob("*.npy")):
        arr = np.load(path)
        masks[path.stem] = arr > 0.5 if len(np.unique(arr)) > 2 else arr > 0
    return masks


STRUCTURED = {
    **{f"bar{t}_3d": bar(t) for t in range(1, 9)},
    **{f"bar{t}_2d": bar(t, 32, 2) for t in range(1, 9)},
    **{f"tube{t}": round_tube(t) for t in range(1, 9)},
    "torus": torus(),
    "thick_torus": torus(31, 9.0, 4.5),
    "hollow_sphere": hollow_sphere(),
    "thin_shell": hollow_sphere(15, 6, 5),
    "ring_2d": np.pad(np.ones((12, 14), bool), 3) & ~np.pad(np.ones((4, 6), bool), 7),
    **reference_masks(),
}


# --------------------------------------------------------------------------- properties


def deletable(skel: np.ndarray, connectivity: int) -> np.ndarray:
    """Voxels of ``skel`` that are simple and not end points (what thinning deletes)."""
    ndim = skel.ndim
    full = connectivity == CONNECTIVITIES[ndim][0]
    padded = np.pad(skel, 1)
    offsets = list(itertools.product((-1, 0, 1), repeat=ndim))
    engine = _inputs.engine()
    out = np.zeros(skel.shape, bool)
    for point in zip(*np.nonzero(skel)):
        config = 0
        for k, off in enumerate(offsets):
            if padded[tuple(p + 1 + o for p, o in zip(point, off))]:
                config |= 1 << k
        centre = len(offsets) // 2
        config &= ~(1 << centre)
        if full:
            neighbours = bin(config).count("1")
        else:
            neighbours = sum(1 for k, off in enumerate(offsets) if sum(map(abs, off)) == 1 and config >> k & 1)
        out[point] = neighbours > 1 and engine.is_simple_point(config, ndim, full)
    return out


def blocks(skel: np.ndarray) -> np.ndarray:
    """Voxels of ``skel`` that belong to a 2x2 (2x2x2) block of skeleton voxels."""
    corner = np.ones(tuple(s - 1 for s in skel.shape), bool)
    for off in itertools.product((0, 1), repeat=skel.ndim):
        corner &= skel[tuple(slice(o, s - 1 + o) for o, s in zip(off, skel.shape))]
    out = np.zeros(skel.shape, bool)
    for off in itertools.product((0, 1), repeat=skel.ndim):
        out[tuple(slice(o, s - 1 + o) for o, s in zip(off, skel.shape))] |= corner
    return out


def check_guarantees(mask: np.ndarray, connectivity: int) -> np.ndarray:
    skel = skeletonize(mask, connectivity=connectivity, threads=2)
    assert skel.dtype == bool and skel.shape == mask.shape
    assert not (skel & ~mask).any(), "skeleton leaves the mask"
    np.testing.assert_array_equal(betti_numbers(skel, connectivity), betti_numbers(mask, connectivity))
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if connectivity in (8, 26) else 1)
    labels, n = ndimage.label(mask, structure=structure)
    if n:
        kept = np.unique(labels[skel])
        assert set(kept.tolist()) == set(range(1, n + 1)), "a component lost its skeleton"
    assert not deletable(skel, connectivity).any(), "a deletable voxel remains"
    assert not (blocks(skel) & deletable(skel, connectivity)).any()
    np.testing.assert_array_equal(skeletonize(skel, connectivity=connectivity), skel, "thinning is not idempotent")
    for threads in (1, 3):
        np.testing.assert_array_equal(skeletonize(mask, connectivity=connectivity, threads=threads), skel)
    return skel


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_shapes_keep_their_topology(name):
    mask = STRUCTURED[name]
    for connectivity in CONNECTIVITIES[mask.ndim]:
        skel = check_guarantees(mask, connectivity)
        if mask.any():
            assert skel.any()


@pytest.mark.parametrize("thickness", range(1, 9))
def test_bars_thin_to_a_centreline(thickness):
    """The bars scikit-image loses (2, 4, 6, 8 voxels thick) keep a one-voxel line."""
    mask = bar(thickness)
    skel = skeletonize(mask)
    assert skel.any()
    # One voxel per slice along the bar, on a contiguous run, inside the bar's cross-section.
    per_slice = skel.sum(axis=(0, 1))
    assert per_slice.max() == 1
    run = np.flatnonzero(per_slice)
    assert np.array_equal(run, np.arange(run[0], run[-1] + 1))
    assert len(run) >= 18 - thickness  # shortened by at most about the radius at each end
    assert not blocks(skel).any()


def test_torus_becomes_a_loop_and_sphere_stays_closed():
    skel = skeletonize(torus(31, 9.0, 4.5))
    assert betti_numbers(skel).tolist() == [1, 1, 0]
    assert skel.sum() < 100  # a curve, not a surface (the torus has ~4000 voxels)
    shell = skeletonize(hollow_sphere())
    assert betti_numbers(shell).tolist() == [1, 0, 1]


def test_two_by_two_blocks_remain_only_where_forced():
    """Four diagonal branches meeting at a 2x2 block: no voxel of it can go (8/4)."""
    a = np.zeros((12, 12), bool)
    a[5:7, 5:7] = True
    for i in range(1, 5):
        a[5 - i, 5 - i] = a[5 - i, 6 + i] = a[6 + i, 5 - i] = a[6 + i, 6 + i] = True
    skel = skeletonize(a)
    np.testing.assert_array_equal(skel, a)
    assert blocks(skel).sum() == 4
    # A plain 2x2x2 cube thins to two voxels (both end points).
    cube = np.zeros((6, 6, 6), bool)
    cube[2:4, 2:4, 2:4] = True
    assert skeletonize(cube).sum() == 2


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ndim=st.sampled_from([2, 3]),
    sigma=st.floats(0.8, 3.0),
    level=st.floats(-0.8, 1.0),
    full=st.booleans(),
)
def test_random_blobs_keep_their_topology(seed, ndim, sigma, level, full):
    shape = (40, 44) if ndim == 2 else (18, 20, 16)
    mask = blob(seed, shape, sigma, level)
    check_guarantees(mask, CONNECTIVITIES[ndim][0 if full else 1])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ndim=st.sampled_from([2, 3]), density=st.floats(0.2, 0.8))
def test_random_noise_keeps_its_topology(seed, ndim, density):
    """Salt-and-pepper masks: many tiny components, holes and cavities."""
    rng = np.random.default_rng(seed)
    mask = rng.random((24, 24) if ndim == 2 else (12, 12, 12)) < density
    for connectivity in CONNECTIVITIES[ndim]:
        check_guarantees(mask, connectivity)


def test_scikit_image_loses_bars_that_medseg_keeps():
    """The defect this function exists for (scikit-image issue 3757), as a live check."""
    from skimage.morphology import skeletonize as skimage_skeletonize

    lost = [t for t in range(1, 9) if not skimage_skeletonize(bar(t)).any()]
    assert lost, "scikit-image no longer loses even-width bars; update the docstring"
    assert all(skeletonize(bar(t)).any() for t in lost)


def test_labels_are_thinned_per_class():
    lab = np.zeros((12, 20), np.int16)
    lab[1:5, 1:19] = 1
    lab[5:9, 1:19] = 3
    out = skeletonize_labels(lab)
    assert out.dtype == lab.dtype
    assert set(np.unique(out).tolist()) == {0, 1, 3}
    np.testing.assert_array_equal(out == 1, skeletonize(lab == 1))
    np.testing.assert_array_equal(out == 3, skeletonize(lab == 3))


def test_inputs_of_other_types():
    import torch

    mask = bar(3)
    expected = skeletonize(mask)
    np.testing.assert_array_equal(skeletonize(torch.from_numpy(mask)), expected)
    np.testing.assert_array_equal(skeletonize(mask.astype(np.float32)), expected)
    np.testing.assert_array_equal(skeletonize(np.asfortranarray(mask.astype(np.int64))), expected)


def test_empty_mask_gives_an_empty_skeleton():
    for shape in ((5, 6), (4, 5, 6), (0, 3)):
        out = skeletonize(np.zeros(shape, bool))
        assert out.shape == shape and not out.any()


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[0, 2], [1, 0]]), "found the value 2; use skeletonize_labels"),
        (np.array([[0.0, 0.5]]), "found the value 0.5"),
        (np.zeros(5, bool), "expected a 2D or 3D mask, got 1D"),
        (np.zeros((2, 2, 2, 2), bool), "got 4D"),
        (np.array([["a"]]), "dtype <U1"),
    ],
)
def test_bad_masks_are_rejected(bad, message):
    with pytest.raises(TopologyInputError, match=message):
        skeletonize(bad)


def test_bad_connectivity_and_threads():
    with pytest.raises(TopologyInputError, match="connectivity 6 is not valid for a 2D mask"):
        skeletonize(np.zeros((3, 3), bool), connectivity=6)
    with pytest.raises(TopologyInputError, match="threads must be a whole number from 1"):
        skeletonize(np.ones((3, 3), bool), threads=0)
    with pytest.raises(TopologyInputError, match="integer class values, found the value 0.5"):
        skeletonize_labels(np.array([[0.5, 1.0]]))
    with pytest.raises(TopologyInputError, match="integer class values, found the value inf"):
        skeletonize_labels(np.array([[np.inf, 1.0]]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ndim=st.sampled_from([2, 3]), shift=st.integers(0, 3))
def test_skeleton_moves_with_the_mask(seed, ndim, shift):
    """Padding or cropping around the mask changes nothing (the metrics crop)."""
    mask = blob(seed, (20, 22) if ndim == 2 else (14, 15, 16), 1.5, 0.3)
    padded = np.pad(mask, [(shift, 1)] + [(1, shift)] * (ndim - 1))
    inner = tuple(slice(shift, shift + s) if a == 0 else slice(1, 1 + s) for a, s in enumerate(mask.shape))
    np.testing.assert_array_equal(skeletonize(padded)[inner], skeletonize(mask))

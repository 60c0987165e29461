"""betti_numbers against gudhi's cubical complexes, on structured and random masks.

gudhi.CubicalComplex(top_dimensional_cells=f) is the complex of closed voxel cubes
(8/26-connected foreground); CubicalComplex(vertices=f) has the voxels as vertices
(4/6-connected). With f = 0 on foreground and 1 on background, the sublevel set at 0
is the foreground, and its Betti numbers are the persistence pairs alive at 0.
"""

import gudhi
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medseg.topology import TopologyInputError
from medseg.topology.betti_numbers import betti_numbers, euler_characteristic

FULL = {2: 8, 3: 26}
FACE = {2: 4, 3: 6}


def gudhi_betti(mask: np.ndarray, connectivity: int) -> list[int]:
    values = np.where(mask, 0.0, 1.0)
    if connectivity == FULL[mask.ndim]:
        complex_ = gudhi.CubicalComplex(top_dimensional_cells=values)
    else:
        complex_ = gudhi.CubicalComplex(vertices=values)
    complex_.compute_persistence(min_persistence=-1)
    return [int(b) for b in complex_.persistent_betti_numbers(0.0, 0.0)[: mask.ndim]]


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def torus(n=25, major=7.0, minor=2.5):
    z, y, x = np.indices((n, n, n)) - n // 2
    return (np.sqrt(x**2 + y**2) - major) ** 2 + z**2 <= minor**2


def hollow_sphere(n=21, outer=8, inner=5):
    c = (n // 2,) * 3
    return _ball((n,) * 3, c, outer) & ~_ball((n,) * 3, c, inner)


STRUCTURED = {
    # name: (mask, {connectivity: expected})
    "empty_2d": (np.zeros((6, 7), bool), {8: [0, 0], 4: [0, 0]}),
    "full_2d": (np.ones((6, 7), bool), {8: [1, 0], 4: [1, 0]}),
    "ring_2d": (np.pad(np.pad(np.zeros((2, 3), bool), 1, constant_values=True), 2), {8: [1, 1], 4: [1, 1]}),
    # Two pixels touching at a corner: one component with 8-connectivity, two with 4.
    "corner_2d": (np.array([[1, 0], [0, 1]], bool), {8: [1, 0], 4: [2, 0]}),
    # A diamond of pixels touching at corners encloses a hole only when 8-connected.
    "diamond_2d": (
        np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool),
        {8: [1, 1], 4: [4, 0]},
    ),
    "empty_3d": (np.zeros((4, 5, 6), bool), {26: [0, 0, 0], 6: [0, 0, 0]}),
    "torus": (torus(), {26: [1, 1, 0], 6: [1, 1, 0]}),
    "hollow_sphere": (hollow_sphere(), {26: [1, 0, 1], 6: [1, 0, 1]}),
    # Two voxels sharing one corner.
    "corner_3d": (np.pad(np.eye(2, dtype=bool)[:, :, None] * np.eye(2, dtype=bool)[:, None, :], 1), {}),
    # A square loop of voxels that touch along edges only: a loop with 26, four blobs with 6.
    "edge_loop_3d": (
        np.pad(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)[None], 1),
        {26: [1, 1, 0], 6: [4, 0, 0]},
    ),
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_masks_match_expectation_and_gudhi(name):
    mask, expected = STRUCTURED[name]
    for connectivity in (FULL[mask.ndim], FACE[mask.ndim]):
        ours = betti_numbers(mask, connectivity=connectivity).tolist()
        assert ours == gudhi_betti(mask, connectivity), (name, connectivity)
        if connectivity in expected:
            assert ours == expected[connectivity], (name, connectivity)


def test_corner_touching_voxels_3d():
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert betti_numbers(mask).tolist() == [1, 0, 0]
    assert betti_numbers(mask, connectivity=6).tolist() == [2, 0, 0]


def test_default_is_full_connectivity():
    mask = np.eye(4, dtype=bool)
    assert betti_numbers(mask).tolist() == betti_numbers(mask, connectivity=8).tolist() == [1, 0]


def test_two_tori_and_a_cavity():
    mask = np.zeros((26, 86, 26), bool)
    mask[:25, 1:26, :25] = torus(n=25)
    mask[:25, 30:55, :25] = torus(n=25)
    mask[2:23, 60:81, 2:23] = hollow_sphere(n=21)
    for connectivity in (26, 6):
        ours = betti_numbers(mask, connectivity).tolist()
        assert ours == [3, 2, 1]
        assert ours == gudhi_betti(mask, connectivity)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((2, 2, 2, 2))])
def test_rejects_wrong_dimension(bad):
    with pytest.raises(TopologyInputError, match="2D or 3D"):
        betti_numbers(bad)


@pytest.mark.parametrize("shape,connectivity", [((4, 4), 26), ((4, 4, 4), 8), ((4, 4), 6)])
def test_rejects_connectivity_of_other_dimension(shape, connectivity):
    with pytest.raises(TopologyInputError, match="connectivity"):
        betti_numbers(np.zeros(shape), connectivity=connectivity)


def test_accepts_torch_tensors():
    mask = torch.from_numpy(torus())
    assert betti_numbers(mask).tolist() == [1, 1, 0]


masks_2d = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(lambda s: arrays(bool, s))
masks_3d = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)).flatmap(lambda s: arrays(bool, s))


@settings(max_examples=150, deadline=None)
@given(mask=masks_2d, full=st.booleans())
def test_random_2d_matches_gudhi(mask, full):
    connectivity = 8 if full else 4
    assert betti_numbers(mask, connectivity).tolist() == gudhi_betti(mask, connectivity)


@settings(max_examples=150, deadline=None)
@given(mask=masks_3d, full=st.booleans())
def test_random_3d_matches_gudhi(mask, full):
    connectivity = 26 if full else 6
    ours = betti_numbers(mask, connectivity)
    assert ours.tolist() == gudhi_betti(mask, connectivity)
    assert ours[0] - ours[1] + ours[2] == euler_characteristic(mask, connectivity)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.2, 0.8), full=st.booleans())
def test_dense_random_3d_matches_gudhi(seed, density, full):
    mask = np.random.default_rng(seed).random((12, 11, 10)) < density
    connectivity = 26 if full else 6
    assert betti_numbers(mask, connectivity).tolist() == gudhi_betti(mask, connectivity)


@pytest.mark.parametrize("connectivity", [8.0, True, "8"])
def test_a_connectivity_that_is_no_whole_number_is_refused(connectivity):
    with pytest.raises(ValueError, match="is not valid for a 2D mask"):
        betti_numbers(np.ones((4, 4)), connectivity=connectivity)

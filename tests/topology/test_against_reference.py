"""Property tests against the live reference module (Betti-Matching-3D).

medseg must give the reference's answer on fresh random inputs, tie-free and with ties
(quantised values, binary masks): the same matched and unmatched pairs, as voxel
coordinates, per dimension, hence the same counts and loss.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medseg.topology as topo


def rows(birth, death):
    if len(birth) == 0:
        return []
    return sorted(map(tuple, np.concatenate([birth, death], axis=1).tolist()))


def reference_loss(a, b, r):
    out = []
    for d in range(a.ndim):
        def v(x, c):
            return x[tuple(c.T)] if len(c) else np.zeros(0)

        mb = v(a, r.input1_matched_birth_coordinates[d]) - v(b, r.input2_matched_birth_coordinates[d])
        md = v(a, r.input1_matched_death_coordinates[d]) - v(b, r.input2_matched_death_coordinates[d])
        ua = v(a, r.input1_unmatched_birth_coordinates[d]) - v(a, r.input1_unmatched_death_coordinates[d])
        ub = v(b, r.input2_unmatched_birth_coordinates[d]) - v(b, r.input2_unmatched_death_coordinates[d])
        out.append(2 * ((mb**2).sum() + (md**2).sum()) + (ua**2).sum() + (ub**2).sum())
    return np.array(out)


@st.composite
def image_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    hi = 7 if ndim == 3 else 12
    shape = tuple(draw(st.integers(1, hi)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    levels = draw(st.sampled_from([0, 0, 2, 3, 5]))  # 0: tie-free uniform values
    rng = np.random.default_rng(seed)
    a, b = rng.random(shape), rng.random(shape)
    if levels:
        a, b = np.floor(a * levels) / levels, np.floor(b * levels) / levels
    return a, b


def assert_same_as_reference(reference, a, b):
    r = reference.compute_matching(a, b)
    m = topo.betti_matching(a, b, filtration="sublevel", construction="V")
    assert m.num_matched.tolist() == list(r.num_matched)
    assert m.num_unmatched_prediction.tolist() == list(r.num_unmatched_input1)
    assert m.num_unmatched_target.tolist() == list(r.num_unmatched_input2)
    for d in range(a.ndim):
        assert rows(m.matched_prediction_birth_coordinates[d], m.matched_prediction_death_coordinates[d]) == rows(
            r.input1_matched_birth_coordinates[d], r.input1_matched_death_coordinates[d]
        )
        assert rows(m.matched_target_birth_coordinates[d], m.matched_target_death_coordinates[d]) == rows(
            r.input2_matched_birth_coordinates[d], r.input2_matched_death_coordinates[d]
        )
        assert rows(
            m.unmatched_prediction_birth_coordinates[d], m.unmatched_prediction_death_coordinates[d]
        ) == rows(r.input1_unmatched_birth_coordinates[d], r.input1_unmatched_death_coordinates[d])
        assert rows(m.unmatched_target_birth_coordinates[d], m.unmatched_target_death_coordinates[d]) == rows(
            r.input2_unmatched_birth_coordinates[d], r.input2_unmatched_death_coordinates[d]
        )
    np.testing.assert_allclose(m.loss_per_dim(), reference_loss(a, b, r), rtol=1e-9, atol=1e-12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image_pairs())
def test_matching_equals_reference(reference, pair):
    assert_same_as_reference(reference, *pair)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image_pairs())
def test_barcode_equals_reference(reference, pair):
    a, _ = pair
    r = reference.compute_barcode(a)
    bc = topo.barcode(a, filtration="sublevel", construction="V")
    for d in range(a.ndim):
        assert rows(bc.birth_coordinates[d], bc.death_coordinates[d]) == rows(
            r.birth_coordinates[d], r.death_coordinates[d]
        )


def test_masks_and_realistic_pair_equal_reference(reference):
    """Binary masks (every value tied) and a smooth 3D pair, larger than the property test."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7)
    for shape in [(40, 40), (14, 14, 14)]:
        field = gaussian_filter(rng.standard_normal(shape), 2.0)
        target = (field > 0.1).astype(np.float64)
        noise = gaussian_filter(rng.standard_normal(shape), 1.0)
        pred = 1 / (1 + np.exp(-(6 * (target - 0.5) + noise / noise.std())))
        assert_same_as_reference(reference, 1 - pred, 1 - target)
        assert_same_as_reference(reference, 1 - (pred > 0.5).astype(np.float64), 1 - target)


def test_images_of_many_values_equal_reference(reference):
    """More than 4096 distinct values (the engine then generates the sorted edges from the
    vertex order, in 2D from the vertex ranks alone): tie-free, with scattered ties, with
    plateaus, and a prediction against a mask as the loss sees them."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(11)
    shape = (100, 90)
    levels = np.floor(rng.random(shape) * 20000) / 20000
    plateaus = levels.copy()
    plateaus[10:40, 5:60] = 0.5
    plateaus[:, :3] = 0.25
    target = (gaussian_filter(rng.standard_normal(shape), 2.0) > 0.2).astype(np.float64)
    pred = 1 / (1 + np.exp(-(6 * (target - 0.5) + rng.standard_normal(shape))))
    for image in (pred, levels, plateaus):
        assert len(np.unique(image)) > 4096
    for a, b in [(rng.random(shape), rng.random(shape)), (levels, plateaus), (1 - pred, 1 - target),
                 (plateaus, 1 - target)]:
        assert_same_as_reference(reference, a, b)

"""The loss's form of a batch of matchings (``Backend.matching_batch_indices``): the CPU
engine's own flat indices equal the generic ones joined from ``matching_batch``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.topology import _backends

CPU = _backends.resolve_backend("cpu")


def batch(shape, n, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    preds = [ndimage.gaussian_filter(rng.random(shape), 0.8).astype(dtype) for _ in range(n)]
    targets = [(ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.5).astype(dtype) for _ in range(n)]
    return preds, targets


@pytest.mark.parametrize("shape", [(17, 23), (7, 6, 5)])
@pytest.mark.parametrize("superlevel", [True, False])
@pytest.mark.parametrize("construction", ["V", "T"])
@pytest.mark.parametrize("intersection", [False, True])
def test_engine_indices_equal_the_generic_join(shape, superlevel, construction, intersection):
    preds, targets = batch(shape, 3, seed=len(shape) + superlevel)
    generic = _backends.Backend.matching_batch_indices(CPU, preds, targets, superlevel, construction, 2, intersection)
    fast = CPU.matching_batch_indices(preds, targets, superlevel, construction, 2, intersection)
    for g, f in zip(generic, fast):
        assert f.dtype == np.int64 and f.shape == g.shape
        np.testing.assert_array_equal(f, g)
    sizes = fast[1]
    assert sizes.shape == (4, 3, len(shape)) and fast[0].size == 2 * sizes[[0, 2]].sum()
    assert fast[0].max() < 3 * np.prod(shape)  # flat indices into the batch
    # without the target's coordinates: the same prediction side and the same numbers
    index_a, sizes_a, index_b, sizes_b = CPU.matching_batch_indices(
        preds, targets, superlevel, construction, 2, intersection, report_target=False
    )
    assert index_b is None
    np.testing.assert_array_equal(index_a, fast[0])
    np.testing.assert_array_equal(sizes_a, fast[1])
    np.testing.assert_array_equal(sizes_b, fast[3])


def test_prepared_targets_give_the_same_indices():
    from medseg.topology.matching import _prepare_targets

    preds, targets = batch((20, 20), 2, seed=5)
    prepared = _prepare_targets(targets, True, "V", 1)
    with_prepared = CPU.matching_batch_indices(preds, targets, True, "V", 2, False, prepared)
    fresh = CPU.matching_batch_indices(preds, targets, True, "V", 2, False)
    for a, b in zip(with_prepared, fresh):
        np.testing.assert_array_equal(a, b)


def test_bad_batches():
    from medseg.topology import _inputs

    engine = _inputs.engine()
    preds, targets = batch((8, 8), 2, seed=1)
    with pytest.raises(ValueError, match="share one shape"):
        engine.matching_batch_indices([preds[0], np.zeros((8, 9), np.float32)], targets, True, "V", 1)
    with pytest.raises(ValueError, match="empty batch"):
        engine.matching_batch_indices([], [], True, "V", 1)
    with pytest.raises(ValueError, match="differ in length"):
        engine.matching_batch_indices(preds, targets[:1], True, "V", 1)


@pytest.mark.parametrize("target", ["labels", "soft"])
def test_loss_through_the_generic_join_equals_the_engine_path(target):
    """The CUDA backend's loss goes through ``Backend.matching_batch_indices``'s numpy
    join; the 'cpu-parallel' backend takes the same path on the CPU."""
    import torch

    from medseg.losses.betti_matching import BettiMatchingLoss

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 20, 17, generator=g)
    y = torch.randint(0, 2, (3, 1, 20, 17), generator=g) if target == "labels" else torch.rand(3, 2, 20, 17, generator=g)
    for options in ({}, {"filtration": "both"}, {"comparison": "intersection", "construction": "T"}):
        engine = BettiMatchingLoss(backend="cpu", reduction="none", **options)(x, y)
        generic = BettiMatchingLoss(backend="cpu-parallel", reduction="none", **options)(x, y)
        torch.testing.assert_close(generic, engine, rtol=0, atol=0)

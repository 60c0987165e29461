"""BettiMatchingLoss: value, gradients, options, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medseg.topology as topo
from medseg.topology import _inputs
from medseg.losses.betti_matching import BettiMatchingLoss


def logits_and_labels(shape=(2, 1, 12, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    y = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.6).long()
    return x, y


def test_value_equals_topology_api_and_gradients_sit_on_pairs():
    x, y = logits_and_labels()
    x.requires_grad_(True)
    loss = BettiMatchingLoss()(x, y)
    p = torch.sigmoid(x).detach().numpy()
    expected = np.mean([topo.betti_matching(p[i, 0], y[i, 0].numpy()).loss() for i in range(2)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    touched = set()
    for i in range(2):
        m = topo.betti_matching(p[i, 0], y[i, 0].numpy())
        for group in (
            m.matched_prediction_birth_coordinates,
            m.matched_prediction_death_coordinates,
            m.unmatched_prediction_birth_coordinates,
            m.unmatched_prediction_death_coordinates,
        ):
            for c in group:
                touched.update((i, *map(int, row)) for row in c)
    nz = {(int(b), *map(int, r)) for b, _, *r in torch.nonzero(x.grad).tolist()}
    assert nz and nz <= touched


def test_matches_reference_convention_sublevel(reference):
    rng = np.random.default_rng(4)
    a, b = rng.random((10, 10, 10)), (rng.random((10, 10, 10)) > 0.5).astype(np.float64)
    r = reference.compute_matching(a, b)
    m = topo.betti_matching(a, b, filtration="sublevel")
    loss = BettiMatchingLoss(sigmoid=False, filtration="sublevel")(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None].long()
    )
    assert m.num_matched.tolist() == list(r.num_matched)
    assert loss.item() == pytest.approx(m.loss(), rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 8, 8, 8)])
def test_finite_on_degenerate_inputs(shape):
    loss_fn = BettiMatchingLoss()
    for x in (torch.zeros(shape), torch.full(shape, -20.0), torch.full(shape, 5.0)):
        x = x.clone().requires_grad_(True)
        for y in (torch.zeros(shape, dtype=torch.long), torch.ones(shape, dtype=torch.long)):
            v = loss_fn(x, y)
            v.backward()
            assert torch.isfinite(v) and torch.isfinite(x.grad).all()
            assert v.item() == pytest.approx(0.0)


def test_multiclass_softmax_channels_and_reductions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 10, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 10, 10), generator=g)
    none = BettiMatchingLoss(reduction="none")(x, y)
    assert none.shape == (2, 2)  # background left out
    with_bg = BettiMatchingLoss(reduction="none", include_background=True)(x, y)
    assert with_bg.shape == (2, 3)
    torch.testing.assert_close(with_bg[:, 1:], none)
    total = BettiMatchingLoss(reduction="sum")(x, y)
    torch.testing.assert_close(total, none.sum())
    onehot = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(BettiMatchingLoss(reduction="none")(x, onehot), none)
    probs = torch.softmax(x, 1).detach().numpy()
    expected = topo.betti_matching(probs[1, 2], (y[1, 0] == 2).numpy()).loss()
    assert none[1, 1].item() == pytest.approx(expected, rel=1e-5)


def test_options_change_the_value_as_documented():
    x, y = logits_and_labels(shape=(1, 1, 10, 10, 10), seed=3)
    base = BettiMatchingLoss()(x, y)
    sup = BettiMatchingLoss(filtration="superlevel")(x, y)
    sub = BettiMatchingLoss(filtration="sublevel")(x, y)
    both = BettiMatchingLoss(filtration="both")(x, y)
    torch.testing.assert_close(both, sup + sub)
    torch.testing.assert_close(base, sup)
    weighted = BettiMatchingLoss(dimension_weights=[0.0, 0.0, 0.0])(x, y)
    assert weighted.item() == 0.0
    thresh = BettiMatchingLoss(barcode_length_threshold=0.99)(x, y)
    assert thresh.item() <= base.item()
    p = torch.sigmoid(x).detach().numpy()[0, 0]
    m = topo.betti_matching(p, y[0, 0].numpy())
    push = BettiMatchingLoss(push_unmatched_to_1_0=True)(x, y)
    expected = 2 * sum(
        ((m.matched_prediction_births[d] - m.matched_target_births[d]) ** 2).sum()
        + ((m.matched_prediction_deaths[d] - m.matched_target_deaths[d]) ** 2).sum()
        + (m.unmatched_prediction_births[d] ** 2).sum()
        + ((m.unmatched_prediction_deaths[d] - 1) ** 2).sum()
        + (m.unmatched_target_births[d] ** 2).sum()
        + ((m.unmatched_target_deaths[d] - 1) ** 2).sum()
        for d in range(3)
    )
    assert push.item() == pytest.approx(expected, rel=1e-5)
    t = BettiMatchingLoss(construction="T")(x, y)
    assert torch.isfinite(t)
    rel = BettiMatchingLoss(relative=True)(x, y)
    assert torch.isfinite(rel)
    inter = BettiMatchingLoss(comparison="intersection")(x, y)
    expected_inter = topo.betti_matching(p, y[0, 0].numpy(), comparison="intersection").loss()
    assert inter.item() == pytest.approx(expected_inter, rel=1e-5)


def test_target_cache_reuses_barcodes():
    x, y = logits_and_labels(shape=(2, 1, 8, 8, 8), seed=5)
    loss_fn = BettiMatchingLoss()
    first = loss_fn(x, y)
    second = loss_fn(x * 0.5, y)
    assert loss_fn.cache_misses == 2 and loss_fn.cache_hits == 2
    fresh = BettiMatchingLoss(target_cache_bytes=0)(x * 0.5, y)
    torch.testing.assert_close(second, fresh)
    assert first.item() != second.item()
    small = BettiMatchingLoss(target_cache_bytes=1)
    small(x, y)
    small(x, y[[1, 0]])
    assert len(small._cache) == 2  # only the targets of the last call are kept


def test_bad_arguments():
    with pytest.raises(ValueError):
        BettiMatchingLoss(reduction="avg")
    with pytest.raises(ValueError):
        BettiMatchingLoss(filtration="up")
    with pytest.raises(ValueError):
        BettiMatchingLoss(sigmoid=True, softmax=True)
    with pytest.raises(ValueError):
        BettiMatchingLoss(barcode_length_threshold=-1)
    with pytest.raises(ValueError):
        BettiMatchingLoss(comparison="avg")
    x, y = logits_and_labels(shape=(1, 1, 6, 6))
    with pytest.raises(ValueError):
        BettiMatchingLoss(dimension_weights=[1.0])(x, y)
    with pytest.raises(ValueError):
        BettiMatchingLoss()(x, y[:, :, :5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "cpu", "cuda"])
def test_cuda_tensors(backend):
    """CUDA tensors on every backend ("auto": the CPU engine until CUDA_FOR_AUTO), the
    CPU tensors' value, the gradient on the device."""
    if backend == "cuda" and not _inputs.cuda_available():
        pytest.skip("the CUDA backend was not built")
    x, y = logits_and_labels(shape=(1, 1, 8, 8, 8))
    xc = x.cuda().requires_grad_(True)
    v = BettiMatchingLoss(backend=backend)(xc, y.cuda())
    v.backward()
    assert v.item() == pytest.approx(BettiMatchingLoss(backend="cpu")(x, y).item(), rel=1e-5)
    assert xc.grad.is_cuda


@pytest.mark.parametrize("shape", [(2, 1, 24, 24), (2, 1, 8, 8, 8)])
def test_normalize_divides_by_the_pairs_or_the_voxels(shape):
    """'pairs' = the image's sum over pairs / its number of pairs (the matching's counts),
    'voxels' = / its voxels; both bounded by the largest term, 4."""
    x, y = logits_and_labels(shape, seed=3)
    per_image = BettiMatchingLoss(reduction="none")(x, y)[:, 0]
    by_pairs = BettiMatchingLoss(reduction="none", normalize="pairs")(x, y)[:, 0]
    by_voxels = BettiMatchingLoss(reduction="none", normalize="voxels")(x, y)[:, 0]
    p = torch.sigmoid(x).numpy()
    for i in range(shape[0]):
        m = topo.betti_matching(p[i, 0], y[i, 0].numpy())
        pairs = int(m.num_matched.sum() + m.num_unmatched_prediction.sum() + m.num_unmatched_target.sum())
        assert pairs > 0
        assert by_pairs[i].item() == pytest.approx(per_image[i].item() / pairs, rel=1e-5)
        assert by_voxels[i].item() == pytest.approx(per_image[i].item() / np.prod(shape[2:]), rel=1e-5)
        assert 0 < by_pairs[i].item() <= 4


def test_normalize_pairs_is_patch_size_free_and_rejects_unknown():
    """Tiling an image 2x2 doubles the features: the plain sum grows about 4x, the per-pair
    value stays the same."""
    x, y = logits_and_labels((1, 1, 20, 20), seed=5)
    # mirrored tiles keep every tile's features intact at the seams
    tile = lambda t: torch.cat([torch.cat([t, t.flip(-1)], -1)] * 2, -2)  # noqa: E731
    small = BettiMatchingLoss(normalize="pairs")(x, y).item()
    large = BettiMatchingLoss(normalize="pairs")(tile(x), tile(y)).item()
    assert BettiMatchingLoss()(tile(x), tile(y)).item() > 2.5 * BettiMatchingLoss()(x, y).item()
    assert large == pytest.approx(small, rel=0.35)
    with pytest.raises(ValueError, match="normalize"):
        BettiMatchingLoss(normalize="pair")


@pytest.mark.parametrize("filtration", ["superlevel", "sublevel"])
@pytest.mark.parametrize("construction", ["V", "T"])
@pytest.mark.parametrize("comparison", ["union", "intersection"])
@pytest.mark.parametrize("shape", [(2, 2, 14, 11), (1, 2, 6, 7, 5)])
def test_label_map_target_equals_the_formula_on_its_values(filtration, construction, comparison, shape):
    """A label map's one-hot target takes no coordinates from the engine (each of its
    pairs runs from 1 to 0, or 0 to 1): the value still equals the formula read at the
    coordinates the topology API returns, per option."""
    x, y = logits_and_labels(shape=shape, seed=11)
    x = x.double()
    p = torch.softmax(x, 1)[:, 1].numpy()
    loss = BettiMatchingLoss(filtration=filtration, construction=construction, comparison=comparison,
                             reduction="none", dimension_weights=[0.5, 2.0, 3.0][: len(shape) - 2])
    pushed = BettiMatchingLoss(filtration=filtration, construction=construction, comparison=comparison,
                               reduction="none", push_unmatched_to_1_0=True)
    got, got_pushed = loss(x, y), pushed(x, y)
    corner = (0.0, 1.0) if filtration == "superlevel" else (1.0, 0.0)
    for i in range(shape[0]):
        m = topo.betti_matching(p[i], y[i, 0].numpy().astype(np.float64), filtration=filtration,
                                construction=construction, comparison=comparison)
        weights = [0.5, 2.0, 3.0][: m.ndim]
        assert got[i, 0].item() == pytest.approx(float(np.dot(weights, m.loss_per_dim())), rel=1e-6, abs=1e-9)
        expected = 2 * sum(
            ((m.matched_prediction_births[d] - m.matched_target_births[d]) ** 2).sum()
            + ((m.matched_prediction_deaths[d] - m.matched_target_deaths[d]) ** 2).sum()
            + ((m.unmatched_prediction_births[d] - corner[0]) ** 2).sum()
            + ((m.unmatched_prediction_deaths[d] - corner[1]) ** 2).sum()
            + ((m.unmatched_target_births[d] - corner[0]) ** 2).sum()
            + ((m.unmatched_target_deaths[d] - corner[1]) ** 2).sum()
            for d in range(m.ndim)
        )
        assert got_pushed[i, 0].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_soft_target_reads_its_values():
    """A target with values other than 0 and 1 is read at its pairs' voxels."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 12, 12, generator=g, dtype=torch.float64)
    t = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
    got = BettiMatchingLoss(reduction="none")(x, t)
    p = torch.sigmoid(x).numpy()
    for i in range(2):
        assert got[i, 0].item() == pytest.approx(topo.betti_matching(p[i, 0], t[i, 0].numpy()).loss(), rel=1e-6)


def test_label_outside_the_classes_is_a_clear_error():
    x = torch.randn(1, 3, 8, 8)
    for bad in (3, -1):
        y = torch.zeros(1, 1, 8, 8, dtype=torch.long)
        y[0, 0, 2, 2] = bad
        with pytest.raises(ValueError, match=r"outside the 3 classes 0 to 2"):
            BettiMatchingLoss()(x, y)


def test_target_cache_turns_itself_off_when_targets_do_not_recur():
    """Random crops: every target new, the budget overflows with targets never hit, so
    the cache stops hashing and preparing (a miss costs more than a hit saves); targets
    that recur within the budget keep it on. Values are the same either way."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 24, 24, generator=g)
    labels = [(torch.rand(2, 1, 24, 24, generator=g) > 0.5).long() for _ in range(12)]
    probe = BettiMatchingLoss()
    probe(x, labels[0])
    per_target = probe._cache_nbytes // 2  # one prepared 24² target
    crops = BettiMatchingLoss(reduction="none", target_cache_bytes=3 * per_target)
    fresh = BettiMatchingLoss(reduction="none", target_cache_bytes=0)
    for y in labels:
        torch.testing.assert_close(crops(x, y), fresh(x, y), rtol=0, atol=0)
    assert not crops.cache_enabled and len(crops._cache) == 0
    misses = crops.cache_misses
    crops(x, labels[0])
    assert crops.cache_misses == misses  # no longer looked up
    recurring = BettiMatchingLoss(target_cache_bytes=8 * per_target)
    for _ in range(3):
        for y in labels[:3]:
            recurring(x, y)
    assert recurring.cache_enabled and recurring.cache_hits == 12 and recurring.cache_misses == 6


def test_a_script_that_exits_with_the_loss_graph_alive_prints_no_nanobind_leak():
    """A top-level `v = loss(x, y); v.backward()` printed "nanobind: leaked 2 instances ...
    reference counting issue" at exit: torch's graph keeps the prepared targets alive."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch, medseg.losses as L\n"
              "loss = L.get_loss('betti_matching'); x = torch.randn(2, 2, 16, 16, requires_grad=True)\n"
              "v = loss(x, torch.randint(0, 2, (2, 1, 16, 16))); v.backward()\n"
              "print(float(v) > 0)\n")
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr


def test_float64_inputs_are_matched_in_float64():
    """Rounded to float32 first, 1 - 1e-12 and 1 tied, and the loss of a confident float64
    network was not the Betti matching of its probabilities (up to 42 % off)."""
    p = np.array([[1 - 1e-12, 0.0, 0.5], [1 - 1e-12, 0.5, 0.0]])
    t = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    loss = BettiMatchingLoss(sigmoid=False, reduction="sum")
    value = float(loss(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None]))
    assert value == pytest.approx(topo.betti_matching(p, t).loss())
    assert value != pytest.approx(topo.betti_matching(p.astype(np.float32), t).loss())
    rng = np.random.default_rng(0)
    for _ in range(10):
        logits = torch.from_numpy(rng.normal(0, 30, (1, 1, 12, 12)))
        soft = torch.from_numpy(rng.random((1, 1, 12, 12)))  # a soft float64 target keeps its digits too
        got = float(BettiMatchingLoss(reduction="sum")(logits, soft))
        assert got == pytest.approx(topo.betti_matching(torch.sigmoid(logits)[0, 0].numpy(), soft[0, 0].numpy()).loss(),
                                    rel=1e-12)


@pytest.mark.parametrize("flag", ["push_unmatched_to_1_0", "sigmoid", "softmax", "to_onehot_y", "relative",
                                  "include_background"])
def test_flags_that_are_not_booleans_are_refused_when_built(flag):
    """'no' turned push_unmatched_to_1_0 on (the torch path) or failed at the first step
    with a pybind11 TypeError naming no argument; sigmoid='no' applied the sigmoid."""
    with pytest.raises(ValueError, match=f"^{flag} must be true or false"):
        BettiMatchingLoss(**{flag: "no"})
    for bad in ("64MB", -5, True):
        with pytest.raises(ValueError, match="target_cache_bytes must be a whole number of bytes"):
            BettiMatchingLoss(target_cache_bytes=bad)


def test_empty_batches_keep_their_layout():
    for shape in [(0, 1, 4, 4), (2, 0, 4, 4)]:
        z = np.zeros(shape)
        assert topo.betti_matching_batch(z, z) == topo.barcode_batch(z)
        errors = topo.betti_matching_error_batch(z, z)
        assert errors.shape == (*shape[:2], 2) and errors.dtype == np.int64


@pytest.mark.parametrize("dims", [True, False, 0.0, "0", [True]])
def test_loss_dims_that_are_not_dimensions_are_refused(dims):
    """dims=True gave dimension 1's loss, dims=0.0 a bare TypeError."""
    m = topo.betti_matching(np.random.default_rng(1).random((6, 6)), np.random.default_rng(2).random((6, 6)))
    with pytest.raises(ValueError, match="dims must be distinct dimensions"):
        m.loss(dims=dims)

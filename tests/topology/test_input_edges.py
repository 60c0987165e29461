"""Edge cases of the topology API's inputs and options: the relative matching's padding
values, integers beyond float64's exact range, bfloat16, thread counts, the engine's
cache setting, NaN and negative masks, the essential class of the matching error."""

import numpy as np
import pytest
import torch

import medseg.topology as topo
from medseg.losses.betti_matching import BettiMatchingLoss
from medseg.topology import _inputs
from medseg.topology._inputs import TopologyInputError


def test_relative_reads_the_padding_value_at_pairs_born_on_it():
    """A constant 0.3 prediction against an all-ones target: the padding (value 1) closes
    a loop around the image that dies at 0.3. Its birth is read as 1 (the padding), not
    at the clipped voxel (0.3, which made the pair and the loss vanish)."""
    m = topo.betti_matching(np.full((5, 5), 0.3), np.ones((5, 5)), relative=True)
    assert m.num_unmatched_prediction.tolist() == [0, 1]
    assert m.unmatched_prediction_births[1].tolist() == [1.0]
    assert m.unmatched_prediction_deaths[1].tolist() == pytest.approx([0.3])
    assert m.loss() == pytest.approx(0.49)
    p = torch.full((1, 1, 5, 5), 0.3, dtype=torch.float64, requires_grad=True)
    loss = BettiMatchingLoss(relative=True, sigmoid=False, softmax=False)(p, torch.ones(1, 1, 5, 5, dtype=torch.float64))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.49)
    assert float(p.grad.abs().sum()) == pytest.approx(2 * 0.7)  # one voxel, the death; none on the padding


@pytest.mark.parametrize("filtration", ["superlevel", "sublevel"])
@pytest.mark.parametrize("construction", ["V", "T"])
def test_relative_loss_equals_the_matchings_loss(filtration, construction):
    rng = np.random.default_rng(7)
    for _ in range(40):
        shape = tuple(int(s) for s in rng.integers(2, 8, size=int(rng.integers(2, 4))))
        a = rng.random(shape)
        b = (rng.random(shape) > 0.5).astype(float)
        m = topo.betti_matching(a, b, filtration=filtration, construction=construction, relative=True)
        loss = BettiMatchingLoss(relative=True, sigmoid=False, softmax=False, filtration=filtration,
                                 construction=construction, reduction="sum")
        value = float(loss(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]))
        assert value == pytest.approx(m.loss(), rel=1e-9, abs=1e-12)


def test_integers_beyond_float64_are_refused():
    big = np.array([[2**60, 2**60 + 1, 2**60]], dtype=np.int64)
    with pytest.raises(TopologyInputError, match=r"beyond ±2\*\*53"):
        topo.barcode(big, filtration="sublevel")
    ok = np.array([[2**52, 2**52 + 1, 2**52]], dtype=np.int64)
    assert topo.barcode(ok, filtration="sublevel").num_pairs.tolist() == [1, 0]
    # the device path's own conversion (as_device_image, for CUDA tensors) refuses them too
    from medseg.topology._inputs import as_device_image

    with pytest.raises(TopologyInputError, match=r"image: torch.int64 values beyond ±2\*\*53"):
        as_device_image(torch.from_numpy(big), "image")
    assert as_device_image(torch.from_numpy(ok), "image").dtype == torch.float64


def test_bfloat16_tensors():
    x = torch.rand(6, 6)
    assert topo.barcode(x.to(torch.bfloat16)).num_pairs.tolist() == topo.barcode(x.to(torch.bfloat16).float()).num_pairs.tolist()
    assert topo.betti_numbers(torch.eye(4, dtype=torch.bfloat16)).tolist() == [1, 0]


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True, 2**31])
def test_bad_thread_counts(threads):
    with pytest.raises(TopologyInputError, match="threads must be a whole number from 1 to"):
        topo.betti_matching(np.zeros((3, 3)), np.zeros((3, 3)), threads=threads)


def test_thread_counts_of_numpy_type():
    assert topo.betti_matching(np.zeros((3, 3)), np.zeros((3, 3)), threads=np.int64(2)).num_matched.tolist() == [0, 0]


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "", str(2**41)])
def test_bad_cache_setting_is_named(monkeypatch, value):
    monkeypatch.setenv("MEDSEG_TOPOLOGY_CACHE_MB", value)
    monkeypatch.setattr(_inputs, "_checked_cache_setting", None)
    with pytest.raises(TopologyInputError, match="MEDSEG_TOPOLOGY_CACHE_MB"):
        topo.barcode(np.zeros((3, 3)))
    monkeypatch.setenv("MEDSEG_TOPOLOGY_CACHE_MB", "64")
    assert topo.barcode(np.zeros((3, 3))).num_pairs.tolist() == [0, 0]


def test_masks_nan_refused_and_negative_is_background():
    with pytest.raises(TopologyInputError, match="NaN"):
        topo.betti_numbers(np.full((3, 3), np.nan))
    mask = np.zeros((7, 7))
    mask[1:3, 1:3] = 1
    mask[4:6, 4:6] = -1  # background, as betti_matching_error reads a mask
    assert topo.betti_numbers(mask).tolist() == [1, 0]
    assert topo.betti_matching_error(mask, (mask > 0).astype(float)).tolist() == [0, 0]


def test_matching_error_leaves_out_the_essential_component():
    """Documented convention (the reference's): the component that never dies is not
    counted, so a blob against an empty target has error 0; relative=True counts it."""
    blob = np.zeros((8, 8))
    blob[2:5, 2:5] = 1
    empty = np.zeros((8, 8))
    assert topo.betti_matching_error(blob, empty, construction="T").tolist() == [0, 0]
    assert topo.betti_matching_error(blob, empty, construction="T", relative=True).tolist() == [1, 0]
    assert topo.betti_numbers(blob)[0] - topo.betti_numbers(empty)[0] == 1


@pytest.mark.parametrize(
    "kwargs", [{"matched_weight": float("nan")}, {"dimension_weights": [float("nan"), 1.0]},
               {"barcode_length_threshold": float("nan")}, {"unmatched_weight": float("inf")}]
)
def test_loss_weights_must_be_finite(kwargs):
    with pytest.raises(ValueError, match="finite"):
        BettiMatchingLoss(**kwargs)


def test_forward_heads_names_the_shapes_given():
    loss = BettiMatchingLoss()
    with pytest.raises(ValueError, match=r"forward_heads: input \(2, 2, 8, 8\) and target \(3, 1, 8, 8\)"):
        loss.forward_heads(torch.randn(2, 3, 2, 8, 8), torch.zeros(3, 1, 8, 8, dtype=torch.long))


def test_a_batch_given_as_an_iterator_is_named():
    x = np.random.default_rng(0).random((4, 4))
    with pytest.raises(TopologyInputError, match="got list_iterator"):
        topo.barcode_batch(iter([x, x]))


def test_inputs_without_values_or_shape_are_one_line_naming_the_argument():
    """A meta tensor, a sparse one and ragged lists reached torch's and numpy's own errors
    (NotImplementedError, TypeError, ValueError), naming no argument; float128 was called
    not real-valued."""
    dense = torch.zeros(4, 4)
    dense[1:3, 1:3] = 1
    cases = [
        (torch.zeros(4, 4, device="meta"), "meta device"),
        (dense.to_sparse(), "sparse_coo tensor; give a dense one"),
        ([[0.0, 1.0], [1.0]], "not a rectangular array"),
    ]
    for value, problem in cases:
        for call, name in [(lambda v: topo.barcode(v), "image"), (lambda v: topo.betti_numbers(v), "mask"),
                           (lambda v: topo.skeletonize(v), "mask"),
                           (lambda v: topo.betti_matching_error(v, dense), "pred_mask")]:
            with pytest.raises(TopologyInputError, match=rf"^{name}: .*{problem}"):
                call(value)
    if hasattr(np, "float128"):
        with pytest.raises(TopologyInputError, match=r"dtype float128 is not supported .*astype\(np.float64\)"):
            topo.barcode(np.zeros((3, 3), np.float128))


@pytest.mark.parametrize("value, problem", [
    (np.array([[0, 1j], [1, 0]]), "expected a real-valued array .* complex128"),
    (np.array([["a", "b"], ["c", "d"]]), "expected a real-valued array .* <U1"),
    (np.array([[0, 1], [1, 0]], dtype=object), "expected a real-valued array .* object"),
    (np.array([[0, np.inf], [1, 0]]), "contains 0 NaN and 1 infinite values"),
])
def test_betti_numbers_refuses_what_the_matching_error_refuses(value, problem):
    """Complex masks were compared with 0 (or failed in numpy's words), and infinite values
    counted as foreground, where betti_matching_error refuses both."""
    with pytest.raises(TopologyInputError, match=rf"^mask: {problem}"):
        topo.betti_numbers(value)

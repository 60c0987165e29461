import numpy as np
import pytest

from medseg.evaluation.cldice_metric import cldice_metric
from medseg.topology import TopologyInputError


def _line():
    ref = np.zeros((9, 9), bool)
    ref[4, 1:8] = True
    return ref


def test_identical_masks():
    assert cldice_metric(_line(), _line()) == 1.0


def test_broken_line_hand_computed():
    ref = _line()
    pred = ref.copy()
    pred[4, 4] = False
    # Tprec = 6/6, Tsens = 6/7 -> 2·(6/7) / (13/7) = 12/13
    assert cldice_metric(pred, ref) == pytest.approx(12 / 13)
    assert cldice_metric(ref, pred) == pytest.approx(12 / 13)  # symmetric


def test_empty_conventions():
    empty = np.zeros((9, 9), bool)
    assert cldice_metric(empty, empty) == 1.0
    assert cldice_metric(empty, _line()) == 0.0
    assert cldice_metric(_line(), empty) == 0.0


def test_disjoint_structures_score_zero():
    other = np.zeros((9, 9), bool)
    other[1, 1:8] = True
    assert cldice_metric(other, _line()) == 0.0


def test_3d_tube_broken_in_the_middle():
    ref = np.zeros((7, 7, 14), bool)
    ref[2:5, 2:5, 1:13] = True
    pred = ref.copy()
    pred[:, :, 6:8] = False
    value = cldice_metric(pred, ref)
    assert 0.7 < value < 1.0
    assert cldice_metric(ref.astype(np.uint8) * 3, ref) == 1.0  # any positive value is foreground


def test_foreground_is_read_as_the_betti_numbers_read_it():
    """Values > 0 are foreground and NaN is refused, as betti_numbers and
    betti_matching_error read a mask: -mask scored clDice 1.0 against mask, and a mask
    of NaN 1.0 against anything."""
    ref = np.zeros((9, 9))
    ref[4, 1:8] = 1
    assert cldice_metric(-ref, ref) == 0.0
    assert cldice_metric(np.where(ref > 0, 0.5, -2.0), ref) == 1.0
    with pytest.raises(TopologyInputError, match="NaN"):
        cldice_metric(np.full((9, 9), np.nan), ref)


def test_shape_checks():
    with pytest.raises(TopologyInputError, match="shapes differ"):
        cldice_metric(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(TopologyInputError, match="2D or 3D"):
        cldice_metric(np.zeros(4), np.zeros(4))


def test_even_width_bars_are_scored():
    """The case scikit-image's 3D skeleton got wrong: a 4-voxel bar had no skeleton, so a
    prediction 5 voxels thick of it scored 0.0."""
    ref = np.zeros((24, 24, 24), bool)
    ref[8:12, 8:12, 2:20] = True
    pred = np.zeros_like(ref)
    pred[8:13, 8:13, 2:20] = True
    assert cldice_metric(pred, ref) > 0.95
    assert cldice_metric(ref, ref) == 1.0


def test_connectivity_is_passed_to_the_skeleton():
    diagonal = np.eye(6, dtype=bool)
    assert cldice_metric(diagonal, diagonal, connectivity=8) == 1.0
    assert cldice_metric(diagonal, diagonal, connectivity=4) == 1.0
    with pytest.raises(TopologyInputError, match="connectivity 26 is not valid for a 2D mask"):
        cldice_metric(diagonal, diagonal, connectivity=26)

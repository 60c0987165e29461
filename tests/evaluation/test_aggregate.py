"""Aggregates of per-case values: NaN-aware statistics and metric directions."""

import math

import numpy as np
import pytest

from medseg.evaluation.aggregate import STATISTICS, better_direction, describe


def test_describe_skips_and_counts_undefined_values():
    stats = describe([1.0, 2.0, float("nan"), 3.0, 4.0, None, float("inf")])
    assert list(stats) == list(STATISTICS)
    assert stats["n"] == 4 and stats["n_undefined"] == 3
    assert stats["mean"] == pytest.approx(2.5) and stats["median"] == pytest.approx(2.5)
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))  # sample std, 1.2910
    # numpy's linear interpolation on [1, 2, 3, 4]: position q/100 * 3
    assert (stats["p5"], stats["p25"], stats["p75"], stats["p95"]) == pytest.approx((1.15, 1.75, 3.25, 3.85))
    assert (stats["min"], stats["max"]) == (1.0, 4.0)


def test_describe_of_nothing_defined():
    stats = describe([float("nan"), float("nan")])
    assert stats["n"] == 0 and stats["n_undefined"] == 2
    assert all(math.isnan(stats[k]) for k in STATISTICS if k not in ("n", "n_undefined"))
    one = describe([0.5])
    assert one["mean"] == 0.5 and one["p95"] == 0.5 and math.isnan(one["std"])


def test_better_direction():
    assert [better_direction(m) for m in ("Dice", "clDice", "NSD")] == [1, 1, 1]
    assert [better_direction(m) for m in ("HD95", "betti_error", "betti_1_error", "betti_matching_error",
                                          "betti_matching_2_error")] == [-1] * 5
    assert better_direction("components_pred") == 0 and better_direction("volume_difference_relative") == 0

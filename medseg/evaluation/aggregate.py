"""Aggregates of per-case metric values: mean, median, spread, percentiles, undefined cases.

Values that are NaN (or infinite, or missing) are *undefined*: Dice of a case whose
reference and prediction are both empty, the relative volume difference of an empty
reference. They are counted (``n_undefined``) and left out of every statistic, the way
nnU-Net's ``np.nanmean`` leaves them out of its means.

Which direction is better for a metric (:data:`HIGHER_IS_BETTER`,
:data:`LOWER_IS_BETTER`) is used to rank worst cases and to say which of two runs
wins in ``medseg report compare``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np

__all__ = [
    "PERCENTILES",
    "STATISTICS",
    "STATISTICS_CONVENTION",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "describe",
    "better_direction",
    "better_side",
    "is_number",
    "finite_values",
]

PERCENTILES = (5, 25, 75, 95)
STATISTICS = ("mean", "std", "median", *(f"p{q}" for q in PERCENTILES), "min", "max", "n", "n_undefined")
STATISTICS_CONVENTION = (
    "over the evaluated cases with a defined (finite) value; std is the sample standard deviation (ddof=1, NaN "
    "for one case); pN are numpy's linearly interpolated percentiles; n_undefined counts NaN/undefined cases; "
    "cases without a prediction or whose evaluation failed are in no statistic (listed under "
    "missing_predictions and failed_cases; the command then exits 1)"
)

HIGHER_IS_BETTER = frozenset({"Dice", "IoU", "NSD", "clDice"})
_LOWER = re.compile(r"^(HD95|betti(_\d+)?_error|betti_matching(_\d+)?_error|FP|FN)$")
LOWER_IS_BETTER = "HD95, betti_error, betti_k_error, betti_matching_error, betti_matching_k_error, FP, FN"


def better_direction(metric: str) -> int:
    """+1 when higher values of ``metric`` are better, -1 when lower are, 0 when neither."""
    if metric in HIGHER_IS_BETTER:
        return 1
    if _LOWER.match(metric):
        return -1
    return 0


def better_side(metric: str, stats: dict[str, Any]) -> int:
    """+1 when the second run's mean of ``metric`` is the better, -1 when the first's, 0
    when they are equal, 2 when the metric has no direction or the difference is not
    finite. ``stats``: :func:`medseg.evaluation.compare.paired_tests`'s (``mean_a``,
    ``mean_b``, ``mean_difference``). Differences within float rounding of the means
    (1e-9 of their size) are equal: means of 0.1/0.7/0.3 and 0.2/0.6/0.3 differ by 9e-18,
    and "better mean B" was shown for it."""
    diff, direction = stats["mean_difference"], better_direction(metric)
    if direction == 0 or not math.isfinite(diff):
        return 2
    scale = max(1.0, abs(stats.get("mean_a", 0.0)), abs(stats.get("mean_b", 0.0)))
    if abs(diff) <= 1e-9 * scale:
        return 0
    return 1 if diff * direction > 0 else -1


def is_number(value: Any) -> bool:
    """A real number (bools and strings are not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def finite_values(values: Iterable[Any]) -> np.ndarray:
    """The finite numbers among ``values`` as a float64 array."""
    out = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    return np.asarray(out, dtype=np.float64)


def describe(values: Iterable[Any]) -> dict[str, float]:
    """The :data:`STATISTICS` of ``values`` (undefined ones counted, not used).

    Examples
    --------
    >>> stats = describe([0.5, float("nan"), 1.0, None])
    >>> stats["mean"], stats["n"], stats["n_undefined"]
    (0.75, 2, 2)
    """
    values = list(values)
    finite = finite_values(values)
    out: dict[str, float] = {"n": int(finite.size), "n_undefined": len(values) - int(finite.size)}
    if finite.size == 0:
        for key in STATISTICS:
            out.setdefault(key, math.nan)
        return {key: out[key] for key in STATISTICS}
    out["mean"] = float(finite.mean())
    out["std"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    out["median"] = float(np.median(finite))
    for q, value in zip(PERCENTILES, np.percentile(finite, PERCENTILES)):
        out[f"p{q}"] = float(value)
    out["min"] = float(finite.min())
    out["max"] = float(finite.max())
    return {key: out[key] for key in STATISTICS}

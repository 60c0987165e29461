"""A prediction and its reference, read as a checked pair of label maps.

:func:`read_case_pair` is where ``medseg evaluate`` (:mod:`~medseg.evaluation.evaluate`)
and the worst-case pictures of ``report.html`` (:mod:`~medseg.evaluation.report`) read a
case: the same checks (shape, affine, integer labels), the same masks per label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError

__all__ = ["AFFINE_TOLERANCE_MM", "geometry_mismatch", "read_label_map", "read_case_pair", "label_masks",
           "undeclared_values"]

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference of any affine entry (mm) between prediction and reference."""


def geometry_mismatch(geometry: Any, other: Any, whose: str, other_file: Path | str | None = None) -> str | None:
    """Why a label of ``geometry`` cannot be scored against ``other`` (another shape, or
    an affine entry more than :data:`AFFINE_TOLERANCE_MM` off), as the end of a message
    after the label's path (``whose``: ``"the reference's"``, ``"its scan's"``); None
    when they fit. The one rule of evaluate, a study's test folders and adapt's
    ``target.eval_labels``."""
    where = f" ({other_file})" if other_file is not None else ""
    if tuple(geometry.shape) != tuple(other.shape):
        return f"shape {tuple(geometry.shape)} differs from {whose} {tuple(other.shape)}{where}"
    if not geometry.allclose(other, atol=AFFINE_TOLERANCE_MM):
        at = f"; {other_file}" if other_file is not None else ""
        return (f"affine differs from {whose} by up to {geometry.max_affine_difference(other):.3g} mm "
                f"(tolerance {AFFINE_TOLERANCE_MM} mm{at})")
    return None


def read_label_map(path: Path) -> tuple[np.ndarray, Any]:
    """A label map and its geometry; a float file must hold integers only.

    Raises
    ------
    DataError
        Unreadable, or not a label map (non-integer or non-finite values).
    """
    from medseg.data.io import read_image

    array, geometry = read_image(path)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise DataError(f"{path}: not a label map (non-integer or non-finite values)")
        array = array.astype(np.int32)
    return array, geometry


#: The connectivities of each dimension: full, then faces only.
CONNECTIVITIES = {2: (8, 4), 3: (26, 6)}


def read_case_pair(pred_file: Path, ref_file: Path, connectivity: int | None = None):
    """Prediction and reference label maps checked against each other: ``(pred, ref, ref_geometry)``.

    Raises
    ------
    DataError
        A file is unreadable or not a label map, a ``connectivity`` that does not fit the
        image's dimension, or the two differ in shape or affine (beyond
        :data:`AFFINE_TOLERANCE_MM`).
    """
    ref, ref_geometry = read_label_map(ref_file)
    if connectivity is not None and connectivity not in CONNECTIVITIES[ref.ndim]:
        raise DataError(
            f"{ref_file}: connectivity {connectivity} does not fit a {ref.ndim}D image "
            f"(use {' or '.join(map(str, CONNECTIVITIES[ref.ndim]))})"
        )
    pred, pred_geometry = read_label_map(pred_file)
    mismatch = geometry_mismatch(pred_geometry, ref_geometry, "the reference's", ref_file)
    if mismatch is not None:
        raise DataError(f"{pred_file}: {mismatch}")
    return pred, ref, ref_geometry


def label_masks(pred: np.ndarray, ref: np.ndarray, label: int, ignore_label: int | None = None):
    """Boolean masks of one label; prediction voxels where the reference is ``ignore_label`` are dropped."""
    pred_mask = pred == label
    if ignore_label is not None:
        pred_mask &= ref != ignore_label
    return pred_mask, ref == label


def undeclared_values(array: np.ndarray, declared: set[int]) -> list[int]:
    """Label values of ``array`` outside ``declared`` (one counting pass; negatives included)."""
    flat = np.asarray(array).ravel()
    if flat.size == 0:
        return []
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high > 1 << 20:
        return sorted({int(v) for v in np.unique(flat)} - declared)
    # by chunks: bincount works on an int64 copy of its input, 600 MB for a 512x512x300 mask
    seen = np.zeros(high + 1, dtype=bool)
    for start in range(0, flat.size, 1 << 22):
        seen |= np.bincount(flat[start : start + (1 << 22)].astype(np.int64, copy=False), minlength=high + 1) > 0
    return [int(v) for v in np.flatnonzero(seen) if int(v) not in declared]

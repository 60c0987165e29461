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

__all__ = ["AFFINE_TOLERANCE_MM", "read_label_map", "read_case_pair", "label_masks", "undeclared_values"]

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference of any affine entry (mm) between prediction and reference."""


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
    if connectivity is not None and connectivity not in {2: (8, 4), 3: (26, 6)}[ref.ndim]:
        raise DataError(
            f"{ref_file}: connectivity {connectivity} does not fit a {ref.ndim}D image "
            f"(use {'8 or 4' if ref.ndim == 2 else '26 or 6'})"
        )
    pred, pred_geometry = read_label_map(pred_file)
    if pred.shape != ref.shape:
        raise DataError(f"{pred_file}: shape {pred.shape} differs from the reference's {ref.shape} ({ref_file})")
    if not pred_geometry.allclose(ref_geometry, atol=AFFINE_TOLERANCE_MM):
        diff = pred_geometry.max_affine_difference(ref_geometry)
        raise DataError(
            f"{pred_file}: affine differs from the reference's by up to {diff:.3g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm; {ref_file})"
        )
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
    low = int(flat.min())
    if low < 0:
        return sorted({int(v) for v in np.unique(flat)} - declared)
    present = np.flatnonzero(np.bincount(flat.astype(np.int64, copy=False)))
    return [int(v) for v in present if int(v) not in declared]

"""The per-label metric registry: cropping to the foreground changes no value."""

import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation.metrics import (
    LABEL_METRICS,
    MetricContext,
    compute_label_metrics,
    confusion_counts,
    register_metric,
    resolve_metrics,
)


def _blobs(seed, shape):
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return noise > np.quantile(noise, 0.85)


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [26, 6])
def test_cropping_changes_no_metric(seed, connectivity):
    pred = np.zeros((30, 28, 26), bool)
    ref = np.zeros((30, 28, 26), bool)
    pred[8:20, 5:17, 9:21] = _blobs(seed, (12, 12, 12))
    ref[9:21, 6:18, 9:21] = _blobs(seed + 100, (12, 12, 12))
    context = MetricContext(spacing=(0.7, 1.0, 2.0), connectivity=connectivity, shape=pred.shape)
    cropped = compute_label_metrics(pred, ref, context)
    full = confusion_counts(pred, ref, context)
    for fn in LABEL_METRICS.values():
        full.update(fn(pred, ref, context))
    assert set(cropped) == set(full)
    for key in full:
        assert _same(cropped[key], full[key]), key


def test_masks_touching_the_border_and_empty_masks():
    ref = np.zeros((10, 10), bool)
    ref[0:4, 0:4] = True
    ref[1:3, 1:3] = False  # a ring in the corner: one hole
    metrics = compute_label_metrics(ref, ref, MetricContext(spacing=(1.0, 1.0)))
    assert metrics["betti_1_ref"] == 1 and metrics["Dice"] == 1.0 and metrics["TN"] == 100 - 12
    empty = compute_label_metrics(np.zeros((5, 5), bool), np.zeros((5, 5), bool), MetricContext(spacing=(1.0, 1.0)))
    assert math.isnan(empty["Dice"]) and math.isnan(empty["HD95"]) and empty["TN"] == 25 and empty["betti_error"] == 0


def test_registering_a_metric_is_one_entry():
    @register_metric("volume_ratio")
    def volume_ratio(pred, ref, context):
        return {"volume_ratio": pred.sum() / max(ref.sum(), 1)}

    try:
        mask = np.zeros((6, 6), bool)
        mask[1:3, 1:3] = True
        assert compute_label_metrics(mask, mask, MetricContext(spacing=(1.0, 1.0)))["volume_ratio"] == 1.0
    finally:
        del LABEL_METRICS["volume_ratio"]


# --------------------------------------------------------------------------- hand-computed values

SPACING = (2.0, 1.0, 1.0)


def _cube(lo, hi, shape=(12, 12, 12)):
    a = np.zeros(shape, bool)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return a


def test_iou_and_volume_difference():
    ref = _cube((2, 2, 2), (6, 6, 6))  # 64 voxels of 2 mm^3
    pred = _cube((3, 2, 2), (6, 6, 6))  # 48 voxels, all inside ref
    m = compute_label_metrics(pred, ref, MetricContext(spacing=SPACING), ["iou", "volume"])
    assert m["IoU"] == pytest.approx(48 / 64)
    assert m["volume_ref_mm3"] == pytest.approx(128.0) and m["volume_pred_mm3"] == pytest.approx(96.0)
    assert m["volume_difference_mm3"] == pytest.approx(-32.0)
    assert m["volume_difference_relative"] == pytest.approx(-0.25)
    shifted = _cube((3, 2, 2), (7, 6, 6))  # overlap 48 of union 80
    assert compute_label_metrics(shifted, ref, MetricContext(spacing=SPACING), ["iou"])["IoU"] == pytest.approx(0.6)
    empty_ref = compute_label_metrics(pred, np.zeros_like(ref), MetricContext(spacing=SPACING), ["volume"])
    assert math.isnan(empty_ref["volume_difference_relative"]) and empty_ref["volume_difference_mm3"] == pytest.approx(96.0)


@pytest.mark.parametrize("tolerance, expected", [(2.0, 0.6), (5.0, 0.75), (6.0, 1.0)])
def test_surface_dice_at_a_tolerance_in_mm(tolerance, expected):
    # One-voxel slabs (every voxel is a boundary voxel). The prediction keeps the
    # reference's slab for y < 6 and puts the rest 3 voxels (6 mm) away along axis 0.
    # Reference boundary voxels at y = 6..10 are 1..5 mm from the prediction's kept
    # half; the prediction's moved half is 6 mm from the reference. At 2 mm: reference
    # 70/100 within, prediction 50/100: NSD = 120/200.
    ref = _cube((2, 1, 1), (3, 11, 11))
    pred = _cube((2, 1, 1), (3, 6, 11)) | _cube((5, 6, 1), (6, 11, 11))
    m = compute_label_metrics(pred, ref, MetricContext(spacing=SPACING, tolerance_mm=tolerance), ["surface_dice"])
    assert m["NSD"] == pytest.approx(expected)


def test_surface_dice_of_empty_masks():
    ctx = MetricContext(spacing=(1.0, 1.0))
    empty = np.zeros((6, 6), bool)
    square = empty.copy()
    square[1:4, 1:4] = True
    assert math.isnan(compute_label_metrics(empty, empty, ctx, ["nsd"])["NSD"])
    assert compute_label_metrics(empty, square, ctx, ["nsd"])["NSD"] == 0.0


def test_components_follow_the_connectivity():
    ref = np.zeros((8, 8, 8), bool)
    ref[2, 2, 2] = ref[3, 3, 3] = True  # corner-touching: one 26-component, two 6-components
    pred = ref.copy()
    pred[6, 6, 6] = True
    full = compute_label_metrics(pred, ref, MetricContext(spacing=(1.0,) * 3), ["components"])
    face = compute_label_metrics(pred, ref, MetricContext(spacing=(1.0,) * 3, connectivity=6), ["components"])
    assert (full["components_pred"], full["components_ref"]) == (2, 1)
    assert (face["components_pred"], face["components_ref"]) == (3, 2)


def test_betti_matching_error_counts_a_missed_component_and_loop():
    ref = np.zeros((16, 16), bool)
    ref[2:5, 2:5] = True  # kept
    ref[2:5, 10:13] = True  # missed
    ref[9:14, 3:8] = True
    ref[11, 5] = False  # a ring: missed component and missed loop
    pred = np.zeros_like(ref)
    pred[2:5, 2:5] = True
    m = compute_label_metrics(pred, ref, MetricContext(spacing=(1.0, 1.0)), ["betti_matching", "betti"])
    assert (m["betti_matching_0_error"], m["betti_matching_1_error"], m["betti_matching_error"]) == (2, 1, 3)
    assert (m["betti_0_error"], m["betti_1_error"]) == (2, 1)


def test_metric_subset_and_unknown_names():
    assert resolve_metrics("dice, hd95") == ["dice", "hd95"]
    assert resolve_metrics("overlap,nsd,bme") == ["dice", "iou", "surface_dice", "betti_matching"]
    assert resolve_metrics(None) == list(LABEL_METRICS) == resolve_metrics("all")
    with pytest.raises(MedsegError, match="unknown metric 'hausdorff'.*hd95"):
        resolve_metrics("dice,hausdorff")
    with pytest.raises(MedsegError, match="no metric"):
        resolve_metrics(" , ")
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    m = compute_label_metrics(mask, mask, MetricContext(spacing=(1.0, 1.0)), ["dice", "hd95"])
    assert set(m) == {"Dice", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}


@pytest.mark.parametrize("connectivity", [26, 6])
def test_cldice_of_a_tube_against_itself_shifted_is_one_at_every_connectivity(connectivity):
    """The centre line of a tube 5 voxels wide lies inside the tube shifted by a voxel. At
    6-connectivity the thinning keeps one-voxel spurs that reach the wall, and clDice on
    that skeleton was 0.615; the metric takes the full-connectivity skeleton."""
    tube = np.zeros((20, 20, 60), bool)
    zz, yy = np.mgrid[:20, :20]
    tube[(zz - 10) ** 2 + (yy - 10) ** 2 <= 6.25, 5:55] = True
    shifted = np.roll(tube, 1, axis=0)
    out = compute_label_metrics(tube, shifted, MetricContext(spacing=(1.0, 1.0, 1.0), connectivity=connectivity), ["cldice"])
    assert out["clDice"] == pytest.approx(1.0)

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.config import LossTerm
from medseg.data.topology_targets import (
    SkeletonDistance,
    SkeletonDistanced,
    inner_distance,
    skeleton_distance,
)
from medseg.errors import ConfigError
from medseg.losses import build_loss, get_loss, required_target_transforms
from medseg.losses.cbdice import CenterlineBoundaryDiceLoss, radius_weights
from medseg.topology import skeletonize

# ----------------------------------------------------------------- independent reference


def _morphological_skeleton(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Lantuejoul's skeleton of a binary mask: what clDice's soft skeleton gives for 0/1 input.

    Erosion by the cross and opening with the 3^n box; voxels outside the image are ignored
    (erosion never eats from the image border).
    """
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    box = np.ones((3,) * mask.ndim, bool)

    def opening(x):
        return ndimage.binary_dilation(ndimage.binary_erosion(x, cross, border_value=1), box, border_value=0)

    img = mask.astype(bool)
    skel = img & ~opening(img)
    for _ in range(iterations):
        img = ndimage.binary_erosion(img, cross, border_value=1)
        skel |= img & ~opening(img)
    return skel


def _edt(mask):
    return np.ones(mask.shape) if mask.all() else ndimage.distance_transform_edt(mask)


def _geometry(skel, dist, k):
    radius = np.where(skel, dist, 0.0)
    r_max = max(radius.max(), 1.0)
    r_min = max(radius[skel].min(), 1.0) if skel.any() else 1.0
    weight = np.where(skel, ((r_max - radius + r_min) / r_max) ** k, 0.0)
    return np.minimum(dist, r_max) / r_max, radius / r_max, weight


def cbdice_reference(p, label, label_skel, pred, pred_skel, smooth_nr=0.0, smooth_dr=0.0):
    """1 - cbDice of one class, from the formula in the class docstring (float64 NumPy)."""
    k = p.ndim - 1
    dn_l, rn_l, w_l = _geometry(label_skel, _edt(label) * label, k)
    dn_p, rn_p, w_p = _geometry(pred_skel, _edt(pred) * pred, k)
    rho_prec = np.where(label_skel, rn_l, rn_p * p)
    rho_sens = np.where(pred_skel, rn_p * p, rn_l)
    tprec = (np.sum(w_p * p * dn_l) + smooth_nr) / (np.sum(w_p * p * rho_prec) + smooth_dr)
    tsens = (np.sum(w_l * dn_p * p) + smooth_nr) / (np.sum(w_l * rho_sens) + smooth_dr)
    return 1.0 - 2.0 * tprec * tsens / (tprec + tsens)


def _vessels(shape, seed=0):
    """Two tubes of different widths in a label map, and noisy logits around it."""
    g = np.random.default_rng(seed)
    label = np.zeros(shape, np.int64)
    label[2:7, 1:-1] = 1  # thick
    label[9:11, 2:-2] = 2 if shape[0] > 12 else 1  # thin
    return label, g


# ----------------------------------------------------------------- hand-computed


def test_hand_computed_band_over_the_label_skeleton():
    # label: a 3-row bar across a 5x7 image (rows 1-3); its soft skeleton is row 2 (the
    # image border is never eroded). D_L = 2 on row 2 and 1 on rows 1 and 3,
    # r_max = r_min = 2, W_L = 1. The distances come from the batch key.
    label = torch.zeros(1, 1, 5, 7, dtype=torch.long)
    label[..., 1:4, :] = 1
    label_skeleton = np.zeros((5, 7), bool)
    label_skeleton[2] = True
    assert np.array_equal(_morphological_skeleton(label[0, 0].numpy() > 0, 10), label_skeleton)
    sd = torch.zeros(1, 2, 5, 7)
    sd[0, 1, 1:4] = torch.tensor([1.0, 2.0, 1.0])[:, None]
    # prediction: rows 1-2 with p = q. Its soft skeleton is the whole 2-row band (nothing
    # survives one erosion), D_P = 1, so D~_P = R~_P = W_P = 1 there.
    q = 0.9
    probs = torch.zeros(1, 1, 5, 7)
    probs[..., 1:3, :] = q
    loss = CenterlineBoundaryDiceLoss(sigmoid=False, smooth_nr=0, smooth_dr=0)
    # Tprec = Σ_{S_P} p·D~_L / Σ_{S_P} p·ρ: numerator 7q·0.5 + 7q·1; ρ = R~_L = 1 on the
    # 7 skeleton voxels of row 2, R~_P·p = q on the 7 of row 1: denominator 7q + 7q²
    tprec = 10.5 * q / (7 * q + 7 * q * q)
    # Tsens = Σ_{S_L} D~_P·p / Σ_{S_L} R~_P·p = 7q / 7q
    tsens = 1.0
    expected = 1 - 2 * tprec * tsens / (tprec + tsens)
    assert float(loss(probs, label, skeleton_distance=sd)) == pytest.approx(expected, rel=1e-5)
    reference = cbdice_reference(
        probs[0, 0].double().numpy(),
        label[0, 0].numpy() > 0,
        label_skeleton,
        probs[0, 0].numpy() > 0.5,
        _morphological_skeleton(probs[0, 0].numpy() > 0.5, 10),
    )
    assert reference == pytest.approx(expected, rel=1e-6)


def test_hand_computed_radius_weights_2d_and_3d():
    skel = torch.zeros(1, 1, 1, 6)
    skel[..., 1] = skel[..., 4] = 1
    dist = torch.tensor([[[[0.0, 1.0, 2.0, 3.0, 3.0, 0.0]]]])
    dn, rn, w = radius_weights(skel, dist)
    # r_max = 3, r_min = 1: W = (3 - R + 1)/3 on the skeleton
    assert torch.allclose(w[0, 0, 0], torch.tensor([0, 1.0, 0, 0, 1 / 3, 0]))
    assert torch.allclose(rn[0, 0, 0], torch.tensor([0, 1 / 3, 0, 0, 1.0, 0]))
    assert torch.allclose(dn[0, 0, 0], torch.tensor([0, 1 / 3, 2 / 3, 1.0, 1.0, 0]))
    # in 3D the weight is squared (cross-section area)
    _, _, w3 = radius_weights(skel[..., None], dist[..., None])
    assert torch.allclose(w3[0, 0, 0, :, 0], torch.tensor([0, 1.0, 0, 0, 1 / 9, 0]))
    # r_min is the thinnest radius on the skeleton, not 1: a lone radius-2 skeleton weighs 1
    _, _, w2 = radius_weights(skel[..., 4:5], dist[..., 3:4] - 1.0)
    assert float(w2.sum()) == pytest.approx(1.0)


def test_perfect_hard_prediction_scores_zero_and_missing_one():
    label = torch.zeros(1, 1, 5, 7, dtype=torch.long)
    label[..., 2, 1:6] = 1  # a 1-pixel line: its own skeleton in any method
    probs = label.float()
    loss = CenterlineBoundaryDiceLoss(sigmoid=False, smooth_nr=0, smooth_dr=0)
    assert float(loss(probs, label)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(torch.zeros_like(probs), label)) == pytest.approx(1.0, abs=1e-6)


def test_shifted_prediction_is_penalised_where_cldice_is_not():
    # paper, translation scenario: a 5-row prediction inside a 7-row vessel, centred or
    # shifted by one row. Both hold the label's centreline (row 4) and lie inside the label,
    # so clDice is 1 for both; cbDice sees the shift.
    label = torch.zeros(1, 1, 9, 12, dtype=torch.long)
    label[..., 1:8, :] = 1
    sd = torch.zeros(1, 2, 9, 12)
    sd[0, 0, 4, 1:11] = 1
    sd[0, 1] = torch.from_numpy(inner_distance(label[0, 0].numpy()))
    centred = torch.zeros(1, 1, 9, 12)
    centred[..., 2:7, :] = 1.0
    shifted = torch.zeros(1, 1, 9, 12)
    shifted[..., 1:6, :] = 1.0
    loss = CenterlineBoundaryDiceLoss(sigmoid=False)
    assert loss(centred, label, skeleton_distance=sd).item() == pytest.approx(0.0, abs=1e-6)
    # shifted: its skeleton (row 3) is 3 deep in the label (D~_L = 3/4) where its own radius
    # is 3 (R~_P = 1), and the label's centreline is 2 deep in it (D~_P = 2/3)
    tprec, tsens = 0.75, 2 / 3
    expected = 1 - 2 * tprec * tsens / (tprec + tsens)
    assert loss(shifted, label, skeleton_distance=sd).item() == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------- against the reference


def _reference_loss(logits, label, channels, include_background=False, iterations=10, smooth=1e-3):
    """The loss over a batch from the NumPy reference, per class then averaged."""
    if channels == 1:
        probs = torch.sigmoid(logits).double().numpy()
        classes = [(0, 1)]
    else:
        probs = torch.softmax(logits.double(), 1).numpy()
        classes = [(c, c) for c in range(0 if include_background else 1, channels)]
    hard = probs.argmax(1) if channels > 1 else None
    values = []
    for b in range(label.shape[0]):
        per_class = []
        for ch, cls in classes:
            lab = label[b, 0].numpy()
            mask = lab > 0 if channels == 1 else lab == cls
            pred = probs[b, 0] > 0.5 if channels == 1 else hard[b] == cls
            p = probs[b, ch]
            per_class.append(
                cbdice_reference(
                    p, mask, _morphological_skeleton(mask, iterations), pred, _morphological_skeleton(pred, iterations),
                    smooth, smooth,
                )
            )
        values.append(np.mean(per_class))
    return float(np.mean(values))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
def test_matches_numpy_reference(channels, dims):
    shape = (14, 16) if dims == 2 else (14, 12, 6)
    label_np, g = _vessels(shape, seed=dims + channels)
    label = torch.from_numpy(label_np)[None, None]
    if channels == 1:
        label = (label > 0).long()
        logits = torch.from_numpy(g.normal(0, 1, (1, 1, *shape)) + 4.0 * (label_np > 0) - 2.0).float()
    else:
        logits = torch.from_numpy(g.normal(0, 1, (1, 3, *shape))).float()
        for c in range(3):
            logits[:, c] += 4.0 * torch.from_numpy(label_np == c).float()
    value = CenterlineBoundaryDiceLoss()(logits, label)
    assert float(value) == pytest.approx(_reference_loss(logits, label, channels), rel=1e-4, abs=1e-5)
    assert float(value) < 1.0  # Tprec and Tsens may exceed 1 (see the docstring), so no lower bound of 0


def test_include_background_scores_channel_zero():
    label_np, g = _vessels((14, 16))
    label = torch.from_numpy(label_np)[None, None]
    logits = torch.from_numpy(g.normal(0, 1, (1, 3, 14, 16))).float()
    for c in range(3):
        logits[:, c] += 3.0 * torch.from_numpy(label_np == c).float()
    with_bg = CenterlineBoundaryDiceLoss(include_background=True)(logits, label)
    expected = _reference_loss(logits, label, 3, include_background=True)
    assert float(with_bg) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert not math.isclose(float(with_bg), float(CenterlineBoundaryDiceLoss()(logits, label)), rel_tol=1e-3)


def test_sigmoid_head_equals_two_class_softmax():
    label_np, g = _vessels((14, 16))
    label = torch.from_numpy(label_np > 0).long()[None, None]
    x = torch.from_numpy(g.normal(0, 2, (2, 1, 14, 16))).float()
    label = label.expand(2, -1, -1, -1)
    binary = CenterlineBoundaryDiceLoss()(x, label)
    two_class = CenterlineBoundaryDiceLoss()(torch.cat([torch.zeros_like(x), x], 1), label)
    assert float(binary) == pytest.approx(float(two_class), rel=1e-5)


# ----------------------------------------------------------------- gradient


def test_gradient_only_on_the_predicted_foreground():
    label = torch.zeros(1, 1, 9, 12, dtype=torch.long)
    label[..., 3:6, 1:11] = 1
    logits = torch.full((1, 1, 9, 12), -3.0)
    logits[..., 2:5, 1:11] = 2.0  # shifted up by one row
    logits.requires_grad_(True)
    CenterlineBoundaryDiceLoss()(logits, label).backward()
    grad = logits.grad[0, 0]
    assert torch.isfinite(grad).all()
    assert grad[2:5, 1:11].abs().sum() > 0
    # the binarised prediction, its skeleton and distances carry no gradient: voxels
    # predicted as background get none (hence: combine with a volumetric loss)
    assert grad[5].abs().max() == 0 and grad[0].abs().max() == 0


def test_gradient_3d_multiclass():
    label_np, g = _vessels((14, 12, 6))
    label = torch.from_numpy(label_np)[None, None]
    logits = torch.from_numpy(g.normal(0, 1, (1, 3, 14, 12, 6))).float().requires_grad_(True)
    CenterlineBoundaryDiceLoss()(logits, label).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------- batch key and registry


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
def test_batch_key_equals_on_the_fly(channels, dims):
    shape = (14, 16) if dims == 2 else (14, 12, 6)
    label_np, g = _vessels(shape)
    labels = torch.from_numpy(np.stack([label_np, np.flip(label_np, 0).copy()]))[:, None]
    if channels == 1:
        labels = (labels > 0).long()
    logits = torch.from_numpy(g.normal(0, 2, (2, channels, *shape))).float()
    transform = SkeletonDistanced(num_classes=channels)
    batch = torch.stack([torch.as_tensor(transform({"label": labels[b]})["skeleton_distance"]) for b in range(2)])
    assert batch.shape == (2, 2, *shape) and batch.dtype == torch.float32
    loss = CenterlineBoundaryDiceLoss()
    assert torch.allclose(loss(logits, labels, skeleton_distance=batch), loss(logits, labels))
    # the batch value is used: no label skeleton gives Tsens = 1 (nothing to miss)
    assert not torch.allclose(loss(logits, labels, skeleton_distance=torch.zeros_like(batch)), loss(logits, labels))


def test_registry_builds_it_with_its_target_transform():
    terms = [LossTerm(name="dice_ce"), LossTerm(name="cbdice", weight=0.5, iterations=5)]
    comp = build_loss(terms, 3)
    term = comp.terms[1]
    assert isinstance(term, CenterlineBoundaryDiceLoss) and term.iterations == 5
    assert term.softmax is True and term.to_onehot_y is True
    assert comp.derived_target_keys == {"skeleton_distance"}
    (transform,) = required_target_transforms(comp)
    assert isinstance(transform, SkeletonDistanced) and transform.transform.num_classes == 3
    assert transform.transform.include_background is False
    # cbDice reads the distances alone; the thinning only when clCE reads the skeleton too
    assert transform.transform.skeleton is False
    (both,) = required_target_transforms(build_loss(terms + [LossTerm(name="clce")], 3))
    assert both.transform.skeleton is True

    label_np, g = _vessels((14, 16))
    labels = torch.from_numpy(np.stack([label_np, label_np]))[:, None]
    logits = torch.from_numpy(g.normal(0, 1, (2, 3, 14, 16))).float()
    maps = [torch.as_tensor(transform({"label": lab})["skeleton_distance"]) for lab in labels]
    batch = {"skeleton_distance": torch.stack(maps)}
    fast_total, fast = comp(logits, labels, batch)
    slow_total, slow = comp(logits, labels)
    assert torch.allclose(fast["cbdice"], slow["cbdice"]) and torch.allclose(fast_total, slow_total)
    assert torch.allclose(slow_total, slow["dice_ce"] + 0.5 * slow["cbdice"])
    binary = build_loss([LossTerm(name="cbdice")], 1).terms[0]
    assert binary.sigmoid is True


def test_background_scoring_term_gets_a_background_target():
    comp = build_loss([LossTerm(name="cbdice", include_background=True), LossTerm(name="clce")], 2)
    (transform,) = comp.target_transforms()
    assert transform.transform.include_background is True and transform.transform.num_classes == 2


# ----------------------------------------------------------------- arguments and hard cases


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        CenterlineBoundaryDiceLoss(iterations=-1)
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        CenterlineBoundaryDiceLoss(iterations=2.5)
    with pytest.raises(ValueError, match="smooth_dr must be >= 0"):
        CenterlineBoundaryDiceLoss(smooth_dr=-1.0)
    with pytest.raises(ValueError, match="incompatible"):
        CenterlineBoundaryDiceLoss(sigmoid=True, softmax=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        CenterlineBoundaryDiceLoss(reduction="max")
    label = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"skeleton_distance \(2, 1, 6, 6\) must be \(B, 2, \*spatial\)"):
        CenterlineBoundaryDiceLoss()(torch.zeros(2, 1, 6, 6), label, skeleton_distance=torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="same number of dimensions"):
        CenterlineBoundaryDiceLoss()(torch.zeros(2, 1, 6, 6), torch.zeros(2, 6, 6))
    with pytest.raises(ConfigError, match=r"losses\[0\] \(cbdice\): iterations must be"):
        build_loss([LossTerm(name="cbdice", iterations=-2)], 1)
    with pytest.raises(ConfigError, match="unknown parameter 'iteration'"):
        get_loss("cbdice", iteration=3)


def test_reduction():
    label_np, g = _vessels((14, 16))
    labels = torch.from_numpy(np.stack([label_np, np.zeros_like(label_np)]) > 0).long()[:, None]
    logits = torch.from_numpy(g.normal(0, 2, (2, 1, 14, 16))).float()
    per_sample = CenterlineBoundaryDiceLoss(reduction="none")(logits, labels)
    assert per_sample.shape == (2,)
    assert torch.allclose(CenterlineBoundaryDiceLoss(reduction="sum")(logits, labels), per_sample.sum())
    assert torch.allclose(CenterlineBoundaryDiceLoss()(logits, labels), per_sample.mean())


def _hard_case(scenario, channels, dims):
    spatial = (10, 10) if dims == 2 else (6, 7, 8)
    target = torch.zeros(2, 1, *spatial, dtype=torch.long)
    logits = torch.randn(2, channels, *spatial, generator=torch.Generator().manual_seed(0))
    if scenario == "all_foreground":
        target[:] = 1
    elif scenario == "constant_confident":
        logits = torch.full((2, channels, *spatial), -100.0)
        if channels > 1:
            logits[:, 0] = 100.0
    elif scenario == "constant_zero":
        logits = torch.zeros(2, channels, *spatial)
        target[:, :, 2:4] = 1
    elif scenario == "all_foreground_confident":
        target[:] = 1
        logits = torch.full((2, channels, *spatial), -100.0)
        logits[:, 1 if channels > 1 else 0] = 100.0
    return logits.requires_grad_(True), target


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "scenario", ["empty", "all_foreground", "constant_confident", "constant_zero", "all_foreground_confident"]
)
@pytest.mark.parametrize("smooth", [1e-3, 0.0])
def test_finite_value_and_gradient(channels, dims, scenario, smooth):
    logits, target = _hard_case(scenario, channels, dims)
    loss = CenterlineBoundaryDiceLoss(smooth_nr=smooth, smooth_dr=smooth, include_background=scenario == "empty")
    value = loss(logits, target)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_empty_and_full_agreement_scores_zero():
    logits, target = _hard_case("constant_confident", 1, 2)  # empty label, empty prediction
    assert CenterlineBoundaryDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    logits, target = _hard_case("all_foreground_confident", 3, 3)
    assert CenterlineBoundaryDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_perfect_prediction_scores_better_than_inverted():
    target = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    target[:, :, 3:9, 5:7] = 1
    good = (target.float() * 2 - 1) * 8
    loss = get_loss("cbdice")
    assert loss(good, target) < loss(-good, target)


# ----------------------------------------------------------------- the target transform


def test_skeleton_distance_of_touching_classes():
    label = np.zeros((7, 9), np.int64)
    label[1:4, 1:8] = 1
    label[4, 1:8] = 2  # a one-pixel line: its own skeleton
    maps = skeleton_distance(label, num_classes=3)
    assert maps.shape == (2, 7, 9) and maps.dtype == np.float32
    # each class measured on its own: class 1's middle row is 2 deep although class 2 touches it
    assert np.array_equal(maps[1, 2, 2:7], np.full(5, 2.0))
    assert np.array_equal(maps[1, 4, 1:8], np.ones(7))
    assert np.array_equal(maps[0, 4, 1:8], np.ones(7))
    assert np.array_equal(maps[0] > 0, skeletonize(label == 1) | skeletonize(label == 2))
    assert maps[:, label == 0].max() == 0
    # one binary class for a 1-channel head: the union is skeletonised and measured
    merged = skeleton_distance(label, num_classes=1)
    assert maps[1, 3, 4] == 1.0 and merged[1, 3, 4] == 2.0 and np.array_equal(merged[0] > 0, skeletonize(label > 0))
    with_bg = skeleton_distance(label, num_classes=3, include_background=True)
    assert with_bg[1, 0, 4] == 1.0 and with_bg[0, label == 0].any()


def test_skeleton_distance_transforms_and_edge_cases():
    assert np.array_equal(inner_distance(np.ones((3, 4))), np.ones((3, 4)))
    assert not skeleton_distance(np.zeros((4, 5), int)).any()
    label = torch.zeros(1, 5, 6, 4, dtype=torch.long)
    label[0, 1:4, 1:5, 1:3] = 1
    out = SkeletonDistance(num_classes=2)(label)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 6, 4) and out.dtype == torch.float32
    assert out[1].max() == 1.0 and out[0].sum() > 0
    arr = SkeletonDistance()(label.numpy())
    assert isinstance(arr, np.ndarray) and np.array_equal(arr, out.numpy())
    with pytest.raises(ValueError, match=r"expected a channel-first label"):
        SkeletonDistance()(np.zeros((5, 6)))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SkeletonDistance(num_classes=0)
    with pytest.raises(ValueError, match="need one output key per key"):
        SkeletonDistanced(keys=["a", "b"], output_keys="c")


def test_inner_distances_over_threads_equal_one_at_a_time():
    """The batch's distance transforms run on a thread pool: the same maps as one by one,
    empty channels 0, and a forked child (which has none of the pool's threads) still
    computes them."""
    import os

    from medseg.data.topology_targets import inner_distance
    from medseg.losses.cbdice import inner_distances

    g = torch.Generator().manual_seed(2)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(5, 2, 40, 36, generator=g), 5, 1, 2)
    masks = (smooth > 0.5).float()
    masks[3, 1] = 0  # an empty channel
    got = inner_distances(masks)
    for b in range(5):
        for c in range(2):
            m = masks[b, c].numpy() > 0.5
            expected = inner_distance(m) if m.any() else np.zeros(m.shape, np.float32)
            np.testing.assert_array_equal(got[b, c].numpy(), expected)
    assert got[0, 0].max() == pytest.approx(ndimage.distance_transform_edt(masks[0, 0].numpy()).max())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        ok = np.array_equal(inner_distances(masks).numpy(), got.numpy())  # numpy: no OpenMP team in the child
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_correct_mask_scores_zero_and_gets_no_gradient_whatever_its_confidence():
    """Both skeletons come from one algorithm, as in the official code. With the label's
    from thinning, two 3D bars at p = 0.8 scored -0.09 and the gradient lowered p on a
    third of the label."""
    label = torch.zeros(1, 1, 24, 24, 24, dtype=torch.long)
    label[0, 0, 4:20, 3:7, 3:7] = 1
    label[0, 0, 4:20, 13:18, 12:16] = 1
    loss = CenterlineBoundaryDiceLoss(sigmoid=False)
    for confidence in (1.0, 0.88, 0.8, 0.6):
        probs = (label.float() * confidence).requires_grad_(True)
        value = loss(probs, label)
        value.backward()
        assert float(value.detach()) == pytest.approx(0.0, abs=1e-6), confidence
        assert float(probs.grad.abs().max()) < 1e-6, confidence

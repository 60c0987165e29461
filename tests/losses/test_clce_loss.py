import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.config import LossTerm
from medseg.data.topology_targets import SkeletonDistanced
from medseg.errors import ConfigError
from medseg.losses import build_loss, get_loss, required_target_transforms
from medseg.losses.clce import CenterlineCrossEntropyLoss
from medseg.topology import skeletonize

# ----------------------------------------------------------------- independent reference


def _soft_skeleton(img: np.ndarray, iterations: int) -> np.ndarray:
    """clDice's soft skeleton from its definition: min over the cross, max over the 3^n box.

    ``mode='nearest'`` repeats border values, which lie in the window already, so voxels
    outside the image are in effect ignored, as by max-pooling.
    """
    cross = ndimage.generate_binary_structure(img.ndim, 1)

    def erode(x):
        return ndimage.minimum_filter(x, footprint=cross, mode="nearest")

    def opening(x):
        return ndimage.maximum_filter(erode(x), size=3, mode="nearest")

    skel = np.maximum(img - opening(img), 0)
    for _ in range(iterations):
        img = erode(img)
        delta = np.maximum(img - opening(img), 0)
        skel = skel + np.maximum(delta - skel * delta, 0)
    return skel


def clce_reference(logits: np.ndarray, label: np.ndarray, iterations: int = 3) -> float:
    """clCE of one sample (C, *spatial) logits and a label map, from the formula (float64)."""
    logits = logits.astype(np.float64)
    c = logits.shape[0]
    if c == 1:
        p = 1 / (1 + np.exp(-logits[0]))
        y = label > 0
        ce = -np.where(y, np.log(p), np.log1p(-p))
        weight = skeletonize(y) + _soft_skeleton(p, iterations)
        return float(np.mean(ce * weight))
    shifted = logits - logits.max(axis=0)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=0))
    ce = -np.take_along_axis(log_p, label[None], axis=0)[0]
    weight = sum(skeletonize(label == k) + _soft_skeleton(np.exp(log_p[k]), iterations) for k in range(1, c))
    return float(np.mean(ce * weight))


def _vessels(shape, classes=2, seed=0):
    g = np.random.default_rng(seed)
    label = np.zeros(shape, np.int64)
    label[2:7, 1:-1] = 1
    label[9:11, 2:-2] = classes - 1
    return label, g


def _line(shape=(1, 1, 5, 7)):
    target = torch.zeros(shape, dtype=torch.long)
    target[..., 2, 1:6] = 1  # a 5-pixel line: its own skeleton
    return target


# ----------------------------------------------------------------- hand-computed


def test_hand_computed_constant_prediction():
    # a constant map has no soft skeleton: only the label's 5 skeleton voxels count
    target = _line()
    probs = torch.full((1, 1, 5, 7), 0.7)
    loss = CenterlineCrossEntropyLoss(sigmoid=False)
    assert float(loss(probs, target)) == pytest.approx(5 * -math.log(0.7) / 35, rel=1e-5)


def test_hand_computed_prediction_on_the_line():
    # p = q on the line, 0 elsewhere: its soft skeleton is q on the line (one opening
    # removes a one-pixel line), so L = (1/N) Σ_line -log q · (1 + q)
    q = 0.6
    target = _line()
    probs = target.float() * q
    loss = CenterlineCrossEntropyLoss(sigmoid=False)
    expected = 5 * -math.log(q) * (1 + q) / 35
    assert float(loss(probs, target)) == pytest.approx(expected, rel=1e-5)
    logits = torch.logit(probs.double().clamp(1e-12, 1 - 1e-12))
    assert clce_reference(logits[0].numpy(), target[0, 0].numpy()) == pytest.approx(expected, rel=1e-6)


def test_hand_computed_multiclass():
    # uniform softmax: CE = log 3 everywhere, no soft skeleton; skeletons: the 5-pixel
    # line of class 1 and the single pixel of class 2
    target = _line()
    target[..., 4, 6] = 2
    value = CenterlineCrossEntropyLoss()(torch.zeros(1, 3, 5, 7), target)
    assert float(value) == pytest.approx(6 * math.log(3) / 35, rel=1e-5)


def test_break_on_the_centreline_costs_more_than_a_border_error():
    # same number of wrong voxels, same plain cross-entropy: a break across the vessel
    # (through its centreline) against a dent in its border
    target = torch.zeros(1, 1, 7, 12, dtype=torch.long)
    target[..., 1:6, :] = 1
    skeleton = torch.zeros(1, 2, 7, 12)
    skeleton[0, 0, 3, 1:11] = 1
    good = target.float() * 8 - 4
    broken, dented = good.clone(), good.clone()
    broken[..., 1:6, 6] = -4.0
    dented[..., 1, 4:9] = -4.0
    ce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(ce(broken, target.float()), ce(dented, target.float()))
    loss = CenterlineCrossEntropyLoss()
    assert float(loss(broken, target, skeleton_distance=skeleton)) > 2 * float(loss(dented, target, skeleton_distance=skeleton))


def test_spurious_branch_is_penalised_through_the_predicted_skeleton():
    target = torch.zeros(1, 1, 9, 9, dtype=torch.long)
    logits = torch.full((1, 1, 9, 9), -4.0)
    logits[..., 4, 1:8] = 4.0  # a branch the label does not have
    logits.requires_grad_(True)
    value = CenterlineCrossEntropyLoss()(logits, target)
    # ≈ 7 voxels · CE 4 · S_P 0.98 / 81
    assert value.item() == pytest.approx(clce_reference(logits[0].detach().numpy(), target[0, 0].numpy()), rel=1e-4)
    assert value.item() > 0.3
    value.backward()
    assert logits.grad[0, 0, 4, 1:8].min() > 0  # pushed down
    assert logits.grad[0, 0, 0].abs().max() == 0  # far from every skeleton: untouched


# ----------------------------------------------------------------- against the reference


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
def test_matches_numpy_reference(channels, dims):
    shape = (14, 16) if dims == 2 else (14, 12, 6)
    label_np, g = _vessels(shape, classes=max(channels, 2), seed=dims)
    labels = np.stack([label_np, np.flip(label_np, 1).copy()])
    logits = torch.from_numpy(g.normal(0, 2, (2, channels, *shape))).float()
    value = CenterlineCrossEntropyLoss()(logits, torch.from_numpy(labels)[:, None])
    expected = np.mean([clce_reference(logits[b].numpy(), labels[b]) for b in range(2)])
    assert float(value) == pytest.approx(expected, rel=1e-4)


def test_include_background_adds_the_background_skeletons():
    label_np, g = _vessels((14, 16), classes=3)
    label = torch.from_numpy(label_np)[None, None]
    logits = torch.from_numpy(g.normal(0, 2, (1, 3, 14, 16))).float()
    fg = CenterlineCrossEntropyLoss()(logits, label)
    with_bg = CenterlineCrossEntropyLoss(include_background=True)(logits, label)
    log_p = torch.log_softmax(logits, 1)[0]
    ce = -log_p.gather(0, label[0]).numpy()[0]
    background = skeletonize(label_np == 0) + _soft_skeleton(log_p[0].exp().numpy(), 3)
    assert float(with_bg) == pytest.approx(float(fg) + np.mean(ce * background), rel=1e-4)


def test_sigmoid_head_equals_two_class_softmax():
    label_np, g = _vessels((14, 16))
    labels = torch.from_numpy(label_np)[None, None].expand(2, -1, -1, -1)
    x = torch.from_numpy(g.normal(0, 2, (2, 1, 14, 16))).float()
    binary = CenterlineCrossEntropyLoss()(x, labels)
    two_class = CenterlineCrossEntropyLoss()(torch.cat([torch.zeros_like(x), x], 1), labels)
    assert float(binary) == pytest.approx(float(two_class), rel=1e-5)


# ----------------------------------------------------------------- gradient


def test_gradient_flows_through_the_predicted_soft_skeleton():
    # the authors' code does not detach the prediction's skeleton; the gradient must equal
    # that of the formula written out with MONAI's soft skeleton
    from monai.losses.cldice import soft_skel

    label_np, g = _vessels((14, 16))
    target = torch.from_numpy(label_np)[None, None]
    x = torch.from_numpy(g.normal(0, 2, (1, 1, 14, 16))).float().requires_grad_(True)
    CenterlineCrossEntropyLoss()(x, target).backward()
    x2 = x.detach().clone().requires_grad_(True)
    y = target.float()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x2, y, reduction="none")
    skel_y = torch.from_numpy(skeletonize(label_np)).float()
    (ce * (skel_y + soft_skel(torch.sigmoid(x2), 3))).mean().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-7)
    x3 = x.detach().clone().requires_grad_(True)
    ce3 = torch.nn.functional.binary_cross_entropy_with_logits(x3, y, reduction="none")
    (ce3 * (skel_y + soft_skel(torch.sigmoid(x3), 3).detach())).mean().backward()
    assert not torch.allclose(x.grad, x3.grad, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_pulls_the_missed_centreline_up(dims):
    spatial = (7, 7) if dims == 2 else (7, 7, 5)
    target = torch.zeros(1, 1, *spatial, dtype=torch.long)
    target[:, :, 2:5, 2:5] = 1
    skeleton = torch.zeros(1, 2, *spatial)
    skeleton[:, 0, 3, 3] = 1
    logits = torch.full((1, 2, *spatial), 0.0)
    logits[:, 0] = 2.0  # background everywhere: the vessel is missed
    logits.requires_grad_(True)
    CenterlineCrossEntropyLoss()(logits, target, skeleton_distance=skeleton).backward()
    grad = logits.grad[0]
    assert torch.isfinite(grad).all()
    assert grad[1][(3, 3) + (slice(None),) * (dims - 2)].max() < 0  # the foreground logit goes up there
    assert grad[0][(3, 3) + (slice(None),) * (dims - 2)].min() > 0


# ----------------------------------------------------------------- batch key and registry


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
def test_batch_key_equals_on_the_fly(channels, dims):
    shape = (14, 16) if dims == 2 else (14, 12, 6)
    label_np, g = _vessels(shape, classes=max(channels, 2))
    labels = torch.from_numpy(np.stack([label_np, np.flip(label_np, 0).copy()]))[:, None]
    logits = torch.from_numpy(g.normal(0, 2, (2, channels, *shape))).float()
    transform = SkeletonDistanced(num_classes=channels)
    batch = torch.stack([torch.as_tensor(transform({"label": labels[b]})["skeleton_distance"]) for b in range(2)])
    loss = CenterlineCrossEntropyLoss()
    assert torch.allclose(loss(logits, labels, skeleton_distance=batch), loss(logits, labels))
    assert not torch.allclose(loss(logits, labels, skeleton_distance=torch.zeros_like(batch)), loss(logits, labels))


def test_registry_builds_it_with_its_target_transform():
    comp = build_loss([LossTerm(name="dice_ce"), LossTerm(name="clce", weight=2.0, iterations=4)], 1)
    term = comp.terms[1]
    assert isinstance(term, CenterlineCrossEntropyLoss) and term.iterations == 4 and term.sigmoid is True
    assert comp.derived_target_keys == {"skeleton_distance"}
    (transform,) = required_target_transforms([LossTerm(name="clce"), LossTerm(name="cbdice")], 3)
    assert isinstance(transform, SkeletonDistanced) and transform.transform.num_classes == 3
    assert build_loss([LossTerm(name="clce")], 3).terms[0].softmax is True

    label_np, g = _vessels((14, 16))
    labels = torch.from_numpy(np.stack([label_np, label_np]))[:, None]
    logits = torch.from_numpy(g.normal(0, 1, (2, 1, 14, 16))).float().requires_grad_(True)
    (one_class,) = comp.target_transforms()
    batch = {"skeleton_distance": torch.stack([one_class({"label": lab})["skeleton_distance"] for lab in labels])}
    fast_total, fast = comp(logits, labels, batch)
    slow_total, slow = comp(logits, labels)
    assert torch.allclose(fast["clce"], slow["clce"])
    assert torch.allclose(fast_total, slow["dice_ce"] + 2.0 * slow["clce"])
    fast_total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------- arguments and hard cases


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        CenterlineCrossEntropyLoss(iterations=-1)
    with pytest.raises(ValueError, match="iterations must be a non-negative integer"):
        CenterlineCrossEntropyLoss(iterations=True)
    with pytest.raises(ValueError, match="incompatible"):
        CenterlineCrossEntropyLoss(sigmoid=True, softmax=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        CenterlineCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="softmax=True needs more than one output channel"):
        CenterlineCrossEntropyLoss(softmax=True)(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"skeleton_distance \(1, 2, 4, 4\) must be \(B, 2, \*spatial\)"):
        CenterlineCrossEntropyLoss()(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ConfigError, match=r"losses\[0\] \(clce\): unknown parameter 'smooth'"):
        build_loss([LossTerm(name="clce", smooth=1.0)], 1)


def test_reduction():
    label_np, g = _vessels((14, 16))
    labels = torch.from_numpy(np.stack([label_np, np.zeros_like(label_np)]))[:, None]
    logits = torch.from_numpy(g.normal(0, 2, (2, 1, 14, 16))).float()
    per_sample = CenterlineCrossEntropyLoss(reduction="none")(logits, labels)
    assert per_sample.shape == (2,) and (per_sample > 0).all()
    assert torch.allclose(CenterlineCrossEntropyLoss(reduction="sum")(logits, labels), per_sample.sum())
    assert torch.allclose(CenterlineCrossEntropyLoss()(logits, labels), per_sample.mean())


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
    elif scenario == "confidently_wrong":
        target[:, :, 2:4] = 1
        logits = torch.full((2, channels, *spatial), -100.0)
        if channels > 1:
            logits[:, 0] = 100.0
    return logits.requires_grad_(True), target


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scenario", ["empty", "all_foreground", "constant_confident", "constant_zero", "confidently_wrong"])
def test_finite_value_and_gradient(channels, dims, scenario):
    logits, target = _hard_case(scenario, channels, dims)
    value = CenterlineCrossEntropyLoss(include_background=scenario == "empty")(logits, target)
    assert value.dim() == 0 and torch.isfinite(value) and value >= 0
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_confident_agreement_scores_zero():
    logits, target = _hard_case("constant_confident", 3, 3)
    assert CenterlineCrossEntropyLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_perfect_prediction_scores_better_than_inverted():
    target = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    target[:, :, 3:9, 5:7] = 1
    good = (target.float() * 2 - 1) * 8
    loss = get_loss("clce")
    assert loss(good, target) < loss(-good, target)

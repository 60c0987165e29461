import math

import pytest
import torch

from skimage.morphology import skeletonize

from medseg.data.topology_targets import skeleton_tube
from medseg.losses.skeleton_recall import SkeletonRecallLoss


def _line(shape=(1, 1, 5, 7)):
    target = torch.zeros(shape, dtype=torch.long)
    target[..., 2, 1:6] = 1  # a 5-pixel line: its own skeleton
    return target


def test_hand_computed_binary():
    target = _line()
    probs = 0.5 * target.float()
    # -(Σ P·S + 1) / (Σ S + 1) = -(2.5 + 1) / (5 + 1)
    loss = SkeletonRecallLoss(tube_radius=0, sigmoid=False)
    assert math.isclose(float(loss(probs, target)), -3.5 / 6, rel_tol=1e-6)
    exact = SkeletonRecallLoss(tube_radius=0, sigmoid=False, smooth_nr=0, smooth_dr=0)
    assert math.isclose(float(exact(probs, target)), -0.5, rel_tol=1e-6)


def test_hand_computed_multiclass_with_absent_class():
    target = _line()
    logits = torch.zeros(1, 3, 5, 7)  # softmax 1/3 for every class
    # class 1: (5/3 + 1) / (5 + 1) = 4/9; class 2 absent: (0 + 1) / (0 + 1) = 1
    value = SkeletonRecallLoss(tube_radius=0)(logits, target)
    assert math.isclose(float(value), -(4 / 9 + 1) / 2, rel_tol=1e-6)


def test_precomputed_skeleton_is_used():
    target = _line()
    probs = torch.zeros(1, 1, 5, 7)
    probs[..., 2, 1:3] = 1.0
    skeleton = torch.zeros_like(target)
    skeleton[..., 2, 1:3] = 1  # a skeleton fully covered by the prediction
    loss = SkeletonRecallLoss(tube_radius=0, sigmoid=False, smooth_nr=0, smooth_dr=0)
    assert math.isclose(float(loss(probs, target, skeleton=skeleton)), -1.0, rel_tol=1e-6)
    assert math.isclose(float(loss(probs, target)), -2 / 5, rel_tol=1e-6)


def test_per_class_skeleton_where_classes_touch():
    target = torch.zeros(1, 1, 9, 14, dtype=torch.long)
    target[..., 1:4, 1:13] = 1
    target[..., 4:7, 1:13] = 2
    own = torch.from_numpy(skeleton_tube(target[0, 0].numpy(), tube_radius=0)).long()
    union = torch.from_numpy(skeletonize(target[0, 0].numpy() > 0)).long() * target[0, 0]
    # a prediction that covers each class's own centreline and nothing else
    logits = torch.full((1, 3, 9, 14), -20.0)
    logits[0, 0] = 0.0
    for c in (1, 2):
        logits[0, c][own == c] = 20.0
    loss = SkeletonRecallLoss(tube_radius=0, smooth_nr=0, smooth_dr=0)
    assert float(loss(logits, target)) == pytest.approx(-1.0, abs=1e-6)
    # the reference's target (skeleton of the union times the labels) sits on the border
    # between the classes, away from either centreline: that prediction would score badly
    assert float(loss(logits, target, skeleton=union[None, None])) > -0.5


def test_3d_gradient_only_on_the_skeleton():
    target = torch.zeros(1, 1, 7, 7, 7, dtype=torch.long)
    target[..., 2:5, 2:5, :] = 1  # a square rod along z
    logits = torch.zeros(1, 1, 7, 7, 7, requires_grad=True)
    SkeletonRecallLoss(tube_radius=0)(logits, target).backward()
    grad = logits.grad[0, 0]
    assert grad[3, 3, 1:6].abs().min() > 0  # centreline is pulled up
    assert grad[0].abs().max() == 0  # background untouched


def test_batch_mode_and_validation():
    target = torch.cat([_line(), torch.zeros_like(_line())])
    probs = 0.5 * target.float()
    batch = SkeletonRecallLoss(tube_radius=0, sigmoid=False, batch=True, smooth_nr=0, smooth_dr=0)(probs, target)
    assert math.isclose(float(batch), -0.5, rel_tol=1e-6)
    with pytest.raises(ValueError):
        SkeletonRecallLoss(tube_radius=-1)
    with pytest.raises(ValueError):
        SkeletonRecallLoss(footprint="cube")
    with pytest.raises(ValueError, match="must match target"):
        SkeletonRecallLoss()(probs, target, skeleton=torch.zeros(2, 1, 3, 3))


def test_even_width_bar_has_a_target_that_tells_right_from_wrong():
    """A 4-voxel-thick 3D bar: scikit-image's skeleton was empty, so the loss was -1 for
    every prediction; medseg's skeleton keeps the centreline."""
    target = torch.zeros(1, 1, 24, 24, 24, dtype=torch.long)
    target[..., 8:12, 8:12, 2:20] = 1
    tube = skeleton_tube(target[0, 0].numpy(), tube_radius=1)
    assert tube.any() and not (tube & (target[0, 0].numpy() == 0)).any()
    loss = SkeletonRecallLoss(tube_radius=1, sigmoid=False)
    right = float(loss(target.float(), target))
    wrong = float(loss(torch.zeros_like(target, dtype=torch.float32), target))
    assert right < -0.95 and wrong > -0.1

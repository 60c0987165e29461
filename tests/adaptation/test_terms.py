"""The loss terms and bookkeeping of each method on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.adaptation.mean_teacher import ema_decay, ema_update, sigmoid_rampup
from medseg.adaptation.pseudo_label import (class_share_weights, confidence_mask, masked_cross_entropy,
                                            prior_matched_labels, round_of, round_start)
from medseg.adaptation.sfda import class_ratio_kl, ratio_kl, sfda_loss, weighted_entropy
from medseg.adaptation.source import class_prior
from medseg.errors import ConfigError


def _probs(fg):
    """(1, 2, n) softmax with foreground probabilities ``fg``."""
    fg = torch.tensor(fg, dtype=torch.float64)
    return torch.stack([1 - fg, fg])[None]


def test_weighted_entropy_by_hand():
    p = _probs([0.5, 0.9])
    h = lambda q: -q * math.log(q)  # noqa: E731
    bg = (h(0.5) + h(0.1)) / 2
    fg = (h(0.5) + h(0.9)) / 2
    assert float(weighted_entropy(p)) == pytest.approx(bg + fg)
    assert float(weighted_entropy(p, [0.1, 0.9])) == pytest.approx(0.1 * bg + 0.9 * fg)


def test_class_ratio_kl_by_hand():
    p = _probs([0.5, 0.9])  # tau_hat = (0.3, 0.7)
    prior = [0.8, 0.2]
    expected = 0.3 * math.log(0.3 / 0.8) + 0.7 * math.log(0.7 / 0.2)
    assert float(class_ratio_kl(p, prior)) == pytest.approx(expected)
    loss, terms = sfda_loss(p, prior, [0.1, 0.9], kl_weight=2.0, absent_threshold=0.0, scope="sample")
    assert float(loss) == pytest.approx(terms["entropy"] + 2.0 * expected)
    assert terms["kl_prior"] == pytest.approx(expected)


def test_class_ratio_kl_structure_absent_and_scopes():
    # sample 0 shows the structure (tau_hat fg 0.3), sample 1 does not (fg 1e-6 < threshold)
    p = torch.cat([_probs([0.3, 0.3]), _probs([1e-6, 1e-6])])
    prior = [0.9, 0.1]
    kl0 = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    kl1 = (1 - 1e-6) * math.log((1 - 1e-6) / 1.0)  # prior mass moved to background, fg term left out
    got = float(class_ratio_kl(p, prior, absent_threshold=1e-3, scope="sample"))
    assert got == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    # without the rule the absent sample is pushed hard towards the prior
    assert float(class_ratio_kl(p, prior, absent_threshold=0.0)) == pytest.approx((kl0 + math.log(1 / 0.9)) / 2, rel=1e-4)
    # batch scope pools the voxels: tau_hat = (0.85, 0.15)
    bg, fg = 0.85 - 5e-7, 0.15 + 5e-7
    pooled = bg * math.log(bg / 0.9) + fg * math.log(fg / 0.1)
    assert float(class_ratio_kl(p, prior, absent_threshold=1e-3, scope="batch")) == pytest.approx(pooled, rel=1e-5)


def test_kl_prior_of_wrong_length_is_a_config_error():
    with pytest.raises(ConfigError, match="3 ratios given, the model has 2 classes"):
        class_ratio_kl(_probs([0.5]), [0.5, 0.25, 0.25])


def test_class_prior_from_label_stats():
    stats = {"classes": {"background": {"value": 0, "ratio_mean": 0.9}, "vessel": {"value": 1, "ratio_mean": 0.1}}}
    assert class_prior(stats, {"background": 0, "vessel": 1}, 2, "x") == pytest.approx([0.9, 0.1])
    with pytest.raises(ConfigError, match="no ratio_mean for class 'vessel'"):
        class_prior({"classes": {"background": {"ratio_mean": 1.0}}}, {"background": 0, "vessel": 1}, 2, "x")


def test_pseudo_label_threshold_mask_by_hand():
    fg = torch.tensor([0.95, 0.6, 0.2, 0.02])
    probs = [torch.stack([1 - fg, fg])]
    labels, masks = confidence_mask(probs, threshold=0.9)
    assert labels[0].tolist() == [1, 1, 0, 0]
    assert masks[0].tolist() == [True, False, False, True]  # confidences 0.95, 0.6, 0.8, 0.98


def test_pseudo_label_percentile_curriculum_is_per_class_by_hand():
    # class 1 confidences: 0.95, 0.9, 0.7, 0.6 ; class 0 confidences: 0.99, 0.8, 0.55, 0.51
    fg_a = torch.tensor([0.95, 0.9, 0.01, 0.2])
    fg_b = torch.tensor([0.7, 0.6, 0.45, 0.49])
    probs = [torch.stack([1 - f, f]) for f in (fg_a, fg_b)]
    labels, masks = confidence_mask(probs, threshold=None, fraction=0.5)
    assert [l.tolist() for l in labels] == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # top half of each class over both scans: class 1 keeps 0.95, 0.9; class 0 keeps 0.99, 0.8
    assert [m.tolist() for m in masks] == [[True, True, True, True], [False, False, False, False]]
    _, masks = confidence_mask(probs, threshold=0.85, fraction=0.75)
    # fraction 0.75 keeps class 1 >= 0.7 and class 0 >= 0.55; the threshold then removes < 0.85
    assert [m.tolist() for m in masks] == [[True, True, True, False], [False, False, False, False]]
    _, full = confidence_mask(probs, threshold=None, fraction=1.0)
    assert all(m.all() for m in full)


def test_masked_cross_entropy_ignores_masked_voxels():
    logits = torch.tensor([[[2.0, 0.0], [-1.0, 3.0]]])  # (1, C=2, 2 voxels): voxel 0 has logits (2, -1)
    labels = torch.tensor([[0, 0]])
    mask = torch.tensor([[True, False]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(-1)))
    assert float(masked_cross_entropy(logits, labels, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(masked_cross_entropy(logits, labels, torch.zeros_like(mask))) == 0.0


def test_rounds_split_the_steps():
    assert [round_of(i, 10, 3) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [round_start(r, 10, 3) for r in range(3)] == [0, 4, 7]


def test_ema_update_arithmetic_and_buffers():
    teacher = torch.nn.BatchNorm1d(2)
    student = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        teacher.running_mean.fill_(0.0)
        student.running_mean.fill_(10.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, decay=0.75)
    assert teacher.weight.tolist() == pytest.approx([1.5, 1.5])  # 0.75 * 1 + 0.25 * 3
    assert teacher.running_mean.tolist() == pytest.approx([2.5, 2.5])
    assert int(teacher.num_batches_tracked) == 7


def test_ema_decay_and_sigmoid_rampup_schedules():
    assert ema_decay(1, 0.99) == 0.5  # after the first step: half source, half student
    assert ema_decay(10_000, 0.99) == 0.99
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(99, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_curriculum_on_foreground_only_keeps_background_on_the_threshold():
    fg_a = torch.tensor([0.95, 0.9, 0.01, 0.2])
    fg_b = torch.tensor([0.7, 0.6, 0.45, 0.49])
    probs = [torch.stack([1 - f, f]) for f in (fg_a, fg_b)]
    _, masks = confidence_mask(probs, threshold=None, fraction=0.5, classes=[1])
    # class 1 keeps its top half (0.95, 0.9); every background voxel stays
    assert [m.tolist() for m in masks] == [[True, True, True, True], [False, False, True, True]]


def test_prior_matched_labels_by_hand():
    # 8 voxels over two scans, prior 25% foreground: the 2 highest p_fg become foreground, whatever the argmax
    fg_a = torch.tensor([0.30, 0.20, 0.01, 0.05])
    fg_b = torch.tensor([0.10, 0.02, 0.12, 0.03])
    probs = [torch.stack([1 - f, f]) for f in (fg_a, fg_b)]
    labels, masks = prior_matched_labels(probs, [0.75, 0.25], threshold=0.9)
    assert [l.tolist() for l in labels] == [[1, 1, 0, 0], [0, 0, 0, 0]]
    # background needs p_bg >= 0.9: 0.99, 0.95 | 0.9, 0.98, 0.97 (0.88 of the 0.12 voxel is ignored)
    assert [m.tolist() for m in masks] == [[True, True, True, True], [True, True, False, True]]
    # the curriculum on foreground keeps the top half of the prior-matched foreground
    _, masks = prior_matched_labels(probs, [0.75, 0.25], threshold=None, fraction=0.5, classes=[1])
    assert [m.tolist() for m in masks] == [[True, False, True, True], [True, True, True, True]]
    # on every class (curriculum_classes: all): the top half of the background too, by p_bg
    # (0.99 0.95 | 0.90 0.98 0.88 0.97: 0.97 and above); it was the foreground-only result
    _, masks = prior_matched_labels(probs, [0.75, 0.25], threshold=None, fraction=0.5)
    assert [m.tolist() for m in masks] == [[True, False, True, False], [False, True, False, True]]
    # an over-confident argmax does not leak its size into the labels
    over = [torch.stack([1 - f, f]) for f in (torch.tensor([0.99, 0.98, 0.97, 0.6]),)]
    labels, _ = prior_matched_labels(over, [0.5, 0.5])
    assert labels[0].tolist() == [1, 1, 0, 0]


def test_class_share_weights_restore_the_reference_proportions():
    labels = [torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])]
    reference = [torch.ones(8, dtype=torch.bool)]  # 25% foreground
    admitted = [torch.tensor([True, False, True, True, True, True, True, True])]  # 1 of 7 admitted is foreground
    w = class_share_weights(labels, admitted, reference, 2)
    share = w[1] * 1 / (w[1] * 1 + w[0] * 6)
    assert share == pytest.approx(0.25)
    logits = torch.zeros(1, 2, 8)
    ce = masked_cross_entropy(logits, labels[0][None], admitted[0][None], w)
    assert float(ce) == pytest.approx(math.log(2))


def test_ratio_kl_on_given_ratios():
    tau_hat = torch.tensor([[0.9, 0.99995], [0.1, 0.00005]], dtype=torch.float64)  # two scans, the second without vessel
    prior = [0.8, 0.2]
    kl0 = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    kl1 = 0.99995 * math.log(0.99995 / 1.0)  # absent: the prior's foreground mass moved to background
    assert float(ratio_kl(tau_hat, prior, absent_threshold=1e-4)) == pytest.approx((kl0 + kl1) / 2, rel=1e-6)

import math
import warnings

import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCE

from medseg.losses.dice import DiceCELoss, DiceLoss


def _four_pixels():
    logits = torch.zeros(1, 1, 2, 2)  # sigmoid -> 0.5 everywhere
    target = torch.tensor([[[[1, 1], [0, 0]]]])
    return logits, target


def test_dice_hand_computed_binary():
    logits, target = _four_pixels()
    # 1 - 2·Σpg / (Σp + Σg) = 1 - 2·1 / (2 + 2)
    value = DiceLoss(smooth_nr=0, smooth_dr=0)(logits, target)
    assert math.isclose(float(value), 0.5, rel_tol=1e-6)


def test_dice_ce_binary_uses_bce_on_logits():
    logits, target = _four_pixels()
    value = DiceCELoss(smooth_nr=0, smooth_dr=0)(logits, target)
    # Dice 0.5 + BCE of logit 0 = ln 2
    assert math.isclose(float(value), 0.5 + math.log(2.0), rel_tol=1e-6)


def test_dice_ce_multiclass_matches_monai():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 6), generator=g)
    ours = DiceCELoss(include_background=False)(logits, target)
    ref = MonaiDiceCE(include_background=False, softmax=True, to_onehot_y=True)(logits, target)
    assert torch.allclose(ours, ref)


def test_dice_multiclass_hand_computed():
    logits = torch.zeros(1, 2, 1, 2)  # softmax -> 0.5 for both classes
    target = torch.tensor([[[[0, 1]]]])
    # per class: 1 - 2·0.5 / (1 + 1) = 0.5
    assert math.isclose(float(DiceLoss(smooth_nr=0, smooth_dr=0)(logits, target)), 0.5, rel_tol=1e-6)


def test_one_channel_ignores_include_background_silently():
    logits, target = _four_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = DiceLoss(include_background=False, smooth_nr=0, smooth_dr=0)(logits, target)
    assert math.isclose(float(a), 0.5, rel_tol=1e-6)


def test_class_weights_reach_monai():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 5, 5, generator=g)
    target = torch.randint(0, 2, (1, 1, 5, 5), generator=g)
    plain = DiceCELoss()(logits, target)
    weighted = DiceCELoss(class_weights=[0.1, 5.0])(logits, target)
    ref = MonaiDiceCE(softmax=True, to_onehot_y=True, weight=torch.tensor([0.1, 5.0]))(logits, target)
    assert torch.allclose(weighted, ref) and not torch.allclose(weighted, plain)


@pytest.mark.parametrize(
    "options, monai_options, channels, one_hot",
    [
        ({}, {"sigmoid": True}, 1, False),
        ({}, {"softmax": True, "to_onehot_y": True}, 3, False),
        ({"include_background": False}, {"softmax": True, "to_onehot_y": True, "include_background": False}, 3, False),
        ({}, {"softmax": True}, 3, True),
        ({"label_smoothing": 0.1, "lambda_dice": 0.3, "lambda_ce": 2.0},
         {"softmax": True, "to_onehot_y": True, "label_smoothing": 0.1, "lambda_dice": 0.3, "lambda_ce": 2.0}, 2, False),
        ({"squared_pred": True, "batch": True}, {"softmax": True, "to_onehot_y": True, "squared_pred": True,
                                                 "batch": True}, 2, False),
    ],
)
def test_dice_ce_equals_monai_bit_for_bit(options, monai_options, channels, one_hot):
    """medseg applies the activation itself (shared with the other terms of a composite);
    the value is MONAI's DiceCELoss's exactly, and so is the gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, channels, 7, 6, generator=g)
    labels = torch.randint(0, max(channels, 2), (2, 1, 7, 6), generator=g)
    target = torch.nn.functional.one_hot(labels[:, 0], channels).movedim(-1, 1).float() if one_hot else labels
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = DiceCELoss(**options)(ours_in, target)
    ref = MonaiDiceCE(**monai_options)(ref_in, target.float() if channels == 1 else target)
    assert torch.equal(ours, ref)
    ours.backward()
    ref.backward()
    assert torch.equal(ours_in.grad, ref_in.grad)


def test_dice_ce_rejects_a_target_with_the_wrong_channel_count():
    with pytest.raises(ValueError, match="1 channel"):
        DiceCELoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))

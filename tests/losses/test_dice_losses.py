import math
import warnings

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

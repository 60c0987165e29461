import math
import warnings

import pytest
import torch
from monai.losses import SoftclDiceLoss as MonaiSoftclDice
from monai.losses.cldice import soft_skel

from medseg.losses import get_loss
from medseg.losses.cldice import SoftclDiceLoss, soft_skeleton


def _line_and_prediction():
    target = torch.zeros(1, 1, 5, 5)
    target[0, 0, 2, :] = 1  # a one-pixel line: its own soft skeleton
    probs = 0.5 * target.clone()
    probs[0, 0, 0, 0] = 1.0  # an isolated false positive, also its own skeleton
    return probs, target


def test_hand_computed_cldice():
    probs, target = _line_and_prediction()
    # S_P = 0.5·line + corner, S_G = line.
    # Tprec = Σ S_P·G / Σ S_P = 2.5 / 3.5 = 5/7;  Tsens = Σ S_G·P / Σ S_G = 2.5 / 5 = 1/2
    # clDice loss = 1 - 2·(5/7)(1/2) / (5/7 + 1/2) = 7/17
    loss = SoftclDiceLoss(iterations=2, alpha=1.0, smooth=0, smooth_nr=0, smooth_dr=0, sigmoid=False)
    assert math.isclose(float(loss(probs, target)), 7 / 17, rel_tol=1e-6)
    # soft Dice: 1 - 2·2.5 / (3.5 + 5) = 7/17 as well; the mix of equal parts is unchanged
    mixed = SoftclDiceLoss(iterations=2, alpha=0.3, smooth=0, smooth_nr=0, smooth_dr=0, sigmoid=False)
    assert math.isclose(float(mixed(probs, target)), 7 / 17, rel_tol=1e-6)


def test_one_channel_sigmoid_is_a_real_loss_monai_issue_8239():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 16, 16, generator=g)
    target = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    ours = SoftclDiceLoss(iterations=3, alpha=1.0, sigmoid=True)(logits, target)
    assert float(ours) > 0.05  # a random prediction is far from perfect
    # with include_background=False the single channel still counts (it is the foreground)
    no_bg = SoftclDiceLoss(iterations=3, alpha=1.0, sigmoid=True, include_background=False)(logits, target)
    assert torch.allclose(ours, no_bg)
    monai = MonaiSoftclDice(iter_=3, sigmoid=True)(logits, target)
    if float(monai) == 0.0:  # MONAI's original code (PR 6763): channel 0 dropped, loss identically 0
        assert float(ours) > 0.05
    else:  # MONAI >= 1.6 scores the channel: there we must agree
        assert torch.allclose(ours, monai, atol=1e-6)


def test_multiclass_scores_classes_separately_like_monai_per_channel():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 12, 12, generator=g)
    labels = torch.randint(0, 3, (1, 1, 12, 12), generator=g)
    ours = SoftclDiceLoss(alpha=1.0, include_background=True)(logits, labels)
    probs = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float()
    per_channel = [MonaiSoftclDice(iter_=3)(probs[:, c : c + 1], onehot[:, c : c + 1]) for c in range(3)]
    assert torch.allclose(ours, torch.stack(per_channel).mean(), atol=1e-6)
    fg_only = SoftclDiceLoss(alpha=1.0)(logits, labels)
    assert torch.allclose(fg_only, torch.stack(per_channel[1:]).mean(), atol=1e-6)


def test_zero_smoothing_on_empty_target_is_finite_where_monai_is_nan():
    logits = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    empty = torch.zeros(1, 1, 10, 10)
    ours = SoftclDiceLoss(alpha=1.0, smooth=0.0, smooth_nr=0.0, smooth_dr=0.0)(logits, empty)
    assert torch.isfinite(ours)
    ours.backward()
    assert torch.isfinite(logits.grad).all()
    monai = MonaiSoftclDice(sigmoid=True, smooth_nr=0.0, smooth_dr=0.0)(logits.detach(), empty)
    if not torch.isnan(monai):
        pytest.skip("MONAI no longer returns NaN here")
    assert torch.isnan(monai)


def test_smooth_zero_is_accepted():
    with pytest.raises(ValueError):
        MonaiSoftclDice(smooth=0.0)
    probs, target = _line_and_prediction()
    assert torch.isfinite(SoftclDiceLoss(smooth=0.0, sigmoid=False)(probs, target))


def test_iteration_count_is_honoured():
    target = torch.zeros(1, 1, 15, 15)
    target[0, 0, 3:12, 3:12] = 1  # thick: its skeleton needs several erosions
    for k in (0, 1, 4):
        assert torch.equal(soft_skeleton(target, k), soft_skel(target, k))
    assert not torch.allclose(soft_skeleton(target, 1), soft_skeleton(target, 4))
    logits = torch.randn(1, 1, 15, 15, generator=torch.Generator().manual_seed(4))
    values = {k: float(get_loss("cldice", iterations=k, alpha=1.0)(logits, target)) for k in (1, 4)}
    assert values[1] != pytest.approx(values[4], abs=1e-4)


def test_3d_and_reduction_none():
    target = torch.zeros(2, 1, 6, 6, 6)
    target[:, :, 3, 3, :] = 1
    logits = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(5))
    per_sample = SoftclDiceLoss(reduction="none")(logits, target)
    assert per_sample.shape == (2,)
    assert torch.allclose(per_sample.mean(), SoftclDiceLoss()(logits, target))


def test_bad_arguments():
    for kwargs in ({"iterations": -1}, {"iterations": 1.5}, {"alpha": -0.1}, {"smooth": -1}, {"sigmoid": True, "softmax": True}):
        with pytest.raises(ValueError):
            SoftclDiceLoss(**kwargs)


def _topolosses_cldice(monkeypatch):
    """topolosses' CLDiceLoss, if installed (test-only reference).

    Its ``topolosses.losses`` package imports every loss, some needing OpenCV; a stub
    package lets the clDice module load on its own.
    """
    import importlib
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.find_spec("topolosses")
    if spec is None or spec.origin is None:
        pytest.skip("topolosses is not installed")
    stub = types.ModuleType("topolosses.losses")
    stub.__path__ = [str(Path(spec.origin).parent / "losses")]
    monkeypatch.setitem(sys.modules, "topolosses.losses", stub)
    for name in [m for m in sys.modules if m.startswith("topolosses.losses.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("topolosses.losses.cldice.src.cldice_loss").CLDiceLoss


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_topolosses_cldice(monkeypatch, channels):
    reference_cls = _topolosses_cldice(monkeypatch)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, channels, 14, 14, generator=g)
    labels = torch.randint(0, max(channels, 2), (2, 1, 14, 14), generator=g)
    ours = SoftclDiceLoss(iterations=4, alpha=1.0, smooth=0.0, smooth_nr=1e-5, smooth_dr=1e-5)(logits, labels)
    if channels == 1:
        probs, onehot = torch.sigmoid(logits), labels.float()
    else:
        probs = torch.softmax(logits, 1)
        onehot = torch.nn.functional.one_hot(labels[:, 0], channels).permute(0, 3, 1, 2).float()
    reference = reference_cls(iter_=4, smooth=1e-5, use_base_loss=False, alpha=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that include_background is moot for one channel
        expected = reference(probs, onehot)
    assert torch.allclose(ours, expected, atol=1e-6)

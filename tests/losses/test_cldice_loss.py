import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.losses import SoftclDiceLoss as MonaiSoftclDice
from monai.losses.cldice import soft_skel

from medseg.losses import cldice, get_loss
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


def _topolosses_cldice(monkeypatch, spec):
    """topolosses' CLDiceLoss (test-only reference; ``spec``: the ``topolosses_spec`` fixture).

    Its ``topolosses.losses`` package imports every loss, some needing OpenCV; a stub
    package lets the clDice module load on its own.
    """
    import importlib
    import sys
    import types
    from pathlib import Path

    stub = types.ModuleType("topolosses.losses")
    stub.__path__ = [str(Path(spec.origin).parent / "losses")]
    monkeypatch.setitem(sys.modules, "topolosses.losses", stub)
    for name in [m for m in sys.modules if m.startswith("topolosses.losses.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("topolosses.losses.cldice.src.cldice_loss").CLDiceLoss


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_topolosses_cldice(monkeypatch, topolosses_spec, channels):
    reference_cls = _topolosses_cldice(monkeypatch, topolosses_spec)
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


# --------------------------------------------------- soft skeleton against MONAI's soft_skel
#
# medseg computes the soft skeleton its own way (shifted minima/maxima, one erosion per
# iteration, a hand-written backward); MONAI's soft_skel is the reference for the values
# (bit for bit) and the gradients (the same voxels get the same shares, ties included; only
# the order of float additions differs).


def _image(shape, kind: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "ties":  # few distinct values: ties in every pooling window
        x = torch.round(x * 4) / 4
    elif kind == "binary":
        x = (x > 0.6).double()
    elif kind == "saturated":  # probabilities exactly 0 or 1 where a network is sure
        x = torch.where(x > 0.8, 1.0, torch.where(x < 0.2, 0.0, x))
    return x.to(dtype)


def _values_and_grads(skeleton_fn, image: torch.Tensor, iterations: int, weight: torch.Tensor):
    x = image.clone().requires_grad_(True)
    skel = skeleton_fn(x, iterations)
    (skel * weight).sum().backward()
    return skel.detach(), x.grad


def _assert_same_as_monai(image: torch.Tensor, iterations: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(image.shape, generator=g, dtype=torch.float64).to(image.dtype)
    ours, ours_grad = _values_and_grads(soft_skeleton, image, iterations, weight)
    theirs, theirs_grad = _values_and_grads(soft_skel, image, iterations, weight)
    assert torch.equal(ours, theirs)
    tol = 1e-12 if image.dtype == torch.float64 else 1e-6
    scale = max(1.0, float(theirs_grad.abs().max()))
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=tol, atol=tol * scale)
    with torch.no_grad():
        assert torch.equal(soft_skeleton(image, iterations), theirs)


@pytest.mark.parametrize("kind", ["uniform", "ties", "binary", "saturated"])
@pytest.mark.parametrize("iterations", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 11, 9), (2, 2, 9, 7, 8)], ids=["2d", "3d"])
def test_soft_skeleton_values_and_gradients_are_monais(shape, iterations, kind):
    for dtype in (torch.float64, torch.float32):
        _assert_same_as_monai(_image(shape, kind, seed=iterations, dtype=dtype), iterations)


@pytest.mark.parametrize("shape", [(1, 1, 1, 6), (1, 1, 2, 2, 2), (1, 1, 5, 1, 4), (1, 1, 1, 1, 1), (1, 2, 6, 1)])
def test_soft_skeleton_thin_and_degenerate_shapes(shape):
    for iterations in (0, 2):
        _assert_same_as_monai(_image(shape, "ties", seed=1, dtype=torch.float64), iterations)


@settings(max_examples=60, deadline=None)
@given(
    spatial=st.lists(st.integers(1, 7), min_size=2, max_size=3),
    batch=st.integers(1, 2),
    iterations=st.integers(0, 4),
    levels=st.sampled_from([2, 3, 5, 0]),  # 0: continuous values, else this many distinct values
    seed=st.integers(0, 2**31 - 1),
)
def test_soft_skeleton_is_monais_property(spatial, batch, iterations, levels, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((batch, 1, *spatial), generator=g, dtype=torch.float64)
    if levels:
        image = torch.floor(image * levels) / (levels - 1)
    _assert_same_as_monai(image, iterations, seed)


def test_soft_skeleton_of_a_strided_view_and_repeated_backward():
    base = _image((2, 3, 8, 9, 7), "ties", seed=3)
    weight = torch.randn(2, 2, 8, 9, 7, generator=torch.Generator().manual_seed(4))
    x = base.clone().requires_grad_(True)
    skel = soft_skeleton(x[:, 1:], 3)  # not contiguous: the loss drops the background like this
    (skel * weight).sum().backward(retain_graph=True)
    first = x.grad.clone()
    (skel * weight).sum().backward()  # the saved tensors are left intact for a second pass
    torch.testing.assert_close(x.grad, 2 * first)
    _, expected = _values_and_grads(soft_skel, base[:, 1:].contiguous(), 3, weight)
    torch.testing.assert_close(first[:, 1:], expected, rtol=1e-6, atol=1e-6)
    assert not first[:, :1].any()


def test_soft_skeleton_binary_shortcut_matches_the_soft_path():
    target = _image((2, 1, 10, 11, 9), "binary", seed=5)
    for iterations in (0, 1, 3):
        assert torch.equal(soft_skeleton(target, iterations), cldice._skeleton(target, iterations, keep=False))
    almost = target.clone()
    almost[0, 0, 0, 0, 0] = 0.5  # not binary: the soft path
    assert torch.equal(soft_skeleton(almost, 3), soft_skel(almost, 3))


def test_soft_skeleton_rejects_other_ranks():
    with pytest.raises(ValueError, match="4D or 5D"):
        soft_skeleton(torch.rand(4, 4, 4), 2)


@pytest.mark.parametrize("channels, include_background", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_loss_values_and_gradients_are_those_of_the_monai_skeleton(monkeypatch, channels, include_background, alpha):
    """The loss with the fast skeleton equals the loss with MONAI's soft_skel (its previous
    implementation): value and gradient w.r.t. the logits, 2D and 3D."""
    for spatial in ((12, 10), (10, 9, 8)):
        g = torch.Generator().manual_seed(channels + len(spatial))
        logits = 3 * torch.randn(2, channels, *spatial, generator=g)
        labels = torch.randint(0, max(channels, 2), (2, 1, *spatial), generator=g)
        loss = SoftclDiceLoss(iterations=3, alpha=alpha, include_background=include_background)

        def value_and_grad():
            x = logits.clone().requires_grad_(True)
            value = loss(x, labels)
            value.backward()
            return value.detach(), x.grad

        ours, ours_grad = value_and_grad()
        with monkeypatch.context() as m:
            m.setattr(cldice, "soft_skeleton", lambda image, iterations: soft_skel(image, iterations))
            reference, reference_grad = value_and_grad()
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_soft_skeleton_on_cuda_is_monais():
    image = _image((2, 2, 12, 10, 9), "ties", seed=6).cuda()
    _assert_same_as_monai(image, 3)

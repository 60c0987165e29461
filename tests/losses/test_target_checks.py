"""Every loss checks its target's values the same way (check_input): a 0/255 mask, labels
outside the classes, non-integer label maps, NaN and empty batches are errors that name
the loss, instead of negative, exploding or silently truncated values."""

import pytest
import torch

from medseg.losses import CompositeLoss, build_loss, get_loss
from medseg.losses import _prepare

NAMES = ["dice", "dice_ce", "cldice", "skeleton_recall", "mip", "sauna", "cbdice", "clce", "betti_matching"]


def _logits(channels: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 12, 12, generator=torch.Generator().manual_seed(0))


def _mask() -> torch.Tensor:
    t = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    t[..., 3:9, 5:8] = 1
    return t


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "target, message",
    [
        (lambda: _mask() * 255, r"values 0 to 255, but a 1-channel \(sigmoid\) target must lie in \[0, 1\] \(a 0/255 mask"),
        (lambda: _mask() * 2, r"values 0 to 2, but a 1-channel"),
        (lambda: -_mask(), r"values -1 to 0"),
        (lambda: torch.where(_mask() > 0, float("nan"), 0.0), "NaN"),
    ],
)
def test_one_channel_target_outside_0_1(name, target, message):
    with pytest.raises(ValueError, match=message) as err:
        get_loss(name)(_logits(1), target())
    assert str(err.value).split(":")[0] in {
        "DiceLoss", "DiceCELoss", "SoftclDiceLoss", "SkeletonRecallLoss", "MIPLoss", "SaunaLoss",
        "CenterlineBoundaryDiceLoss", "CenterlineCrossEntropyLoss", "BettiMatchingLoss",
    }


@pytest.mark.parametrize("name", NAMES)
def test_label_map_outside_the_classes_or_not_whole(name):
    loss = get_loss(name)
    with pytest.raises(ValueError, match=r"labels 0 to 5, outside the 3 classes 0 to 2"):
        loss(_logits(3), _mask() * 5)
    with pytest.raises(ValueError, match="not whole numbers"):
        loss(_logits(3), _mask().float() * 1.9999)
    with pytest.raises(ValueError, match=r"must have 1 channel \(a label map\) or as many as input"):
        loss(_logits(3), torch.zeros(1, 2, 12, 12))
    with pytest.raises(ValueError, match="empty input"):
        loss(_logits(3, batch=0), torch.zeros(0, 1, 12, 12, dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
def test_valid_targets_pass(name):
    """Float label maps of whole numbers, bool masks and soft one-hot targets are fine."""
    loss = get_loss(name)
    assert torch.isfinite(loss(_logits(3), _mask().float() * 2))
    assert torch.isfinite(loss(_logits(1), _mask().bool()))
    if name not in ("skeleton_recall", "sauna"):  # these two take label maps only
        soft = torch.full((1, 3, 12, 12), 1 / 3)
        assert torch.isfinite(loss(_logits(3), soft))


@pytest.mark.parametrize("name", ["skeleton_recall", "cbdice", "clce", "sauna"])
def test_near_one_float_target_is_rounded_not_truncated(name):
    """0.9999 is foreground: the skeleton and distance targets round a float label map
    (they truncated it to 0 before: an empty skeleton, a 'perfect' recall of -1)."""
    loss = get_loss(name)
    exact = float(loss(_logits(1), _mask().float()))
    near = float(loss(_logits(1), _mask().float() * 0.9999))
    assert near == pytest.approx(exact, rel=1e-3, abs=1e-3)


def test_composite_checks_each_target_once(monkeypatch):
    calls = []
    original = _prepare._check_target_values

    def counted(target, n, name):
        calls.append(name)
        return original(target, n, name)

    monkeypatch.setattr(_prepare, "_check_target_values", counted)
    composite = build_loss([{"name": "dice_ce"}, {"name": "cldice"}, {"name": "skeleton_recall"}], 2)
    assert isinstance(composite, CompositeLoss)
    composite(_logits(2), _mask())
    assert len(calls) == 1
    get_loss("dice_ce")(_logits(2), _mask())  # outside a composite: checked on every call
    assert len(calls) == 2


def test_bfloat16_logits_on_the_cpu():
    x = _logits(2).to(torch.bfloat16)
    for name in ("cbdice", "clce", "betti_matching"):
        assert torch.isfinite(get_loss(name)(x, _mask()).float())


@pytest.mark.parametrize("make_bad", [
    lambda x, y: (x.numpy(), y), lambda x, y: (x, None), lambda x, y: (x, y.tolist()),
    lambda x, y: (x.to_sparse(), y), lambda x, y: (x.to("meta"), y), lambda x, y: (x, y.to(torch.complex64)),
])
def test_what_is_not_a_dense_real_tensor_is_one_line_naming_the_argument(make_bad):
    """A numpy array or None reached `.dim()` (AttributeError), a sparse or meta input torch's
    many-line errors, a complex target aminmax's NotImplementedError."""
    from medseg.losses import build_loss

    x, y = torch.randn(1, 2, 6, 6), torch.randint(0, 2, (1, 1, 6, 6)).float()
    bad_x, bad_y = make_bad(x, y)
    for name in ("dice_ce", "cldice", "skeleton_recall", "betti_matching"):
        loss = build_loss([{"name": name, "weight": 1.0}], out_channels=2)
        with pytest.raises((TypeError, ValueError)) as err:
            loss(bad_x, bad_y)
        message = str(err.value)
        assert "\n" not in message and ("input" in message or "target" in message), (name, message)

"""Every loss: 2D and 3D, binary and multi-class, finite values and gradients on hard cases."""

import pytest
import torch

from medseg.losses import get_loss

NAMES = ["dice", "dice_ce", "cldice", "skeleton_recall", "mip", "sauna", "cbdice", "clce"]
SHAPES = {2: (12, 12), 3: (6, 7, 8)}


def _case(scenario: str, channels: int, dims: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    spatial = SHAPES[dims]
    if scenario == "random":
        logits = torch.randn(2, channels, *spatial, generator=g)
        target = torch.randint(0, max(channels, 2), (2, 1, *spatial), generator=g)
    elif scenario == "all_background":
        logits = torch.randn(2, channels, *spatial, generator=g)
        target = torch.zeros(2, 1, *spatial, dtype=torch.long)
    elif scenario == "constant_confident":
        # saturated constant prediction of background on an empty patch: 0^gamma, 0/0 risks
        logits = torch.full((2, channels, *spatial), -100.0)
        if channels > 1:
            logits[:, 0] = 100.0
        target = torch.zeros(2, 1, *spatial, dtype=torch.long)
    elif scenario == "constant_zero":
        logits = torch.zeros(2, channels, *spatial)
        target = torch.zeros(2, 1, *spatial, dtype=torch.long)
        target[:, :, 2:4] = 1
    else:  # pragma: no cover
        raise ValueError(scenario)
    return logits.requires_grad_(True), target


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scenario", ["random", "all_background", "constant_confident", "constant_zero"])
def test_finite_value_and_gradient(name, channels, dims, scenario):
    logits, target = _case(scenario, channels, dims)
    loss = get_loss(name)(logits, target)
    assert loss.dim() == 0
    assert torch.isfinite(loss), f"{name}: loss is {loss}"
    loss.backward()
    assert logits.grad is not None
    assert not torch.isnan(logits.grad).any(), f"{name}: NaN gradient"
    assert torch.isfinite(logits.grad).all(), f"{name}: infinite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_random_prediction_has_a_gradient(name):
    logits, target = _case("random", 3, 2, seed=1)
    get_loss(name)(logits, target).backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_perfect_prediction_scores_better_than_inverted(name):
    target = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    target[:, :, 3:9, 5:7] = 1
    good = (target.float() * 2 - 1) * 8  # confident and right
    loss = get_loss(name)
    assert loss(good, target) < loss(-good, target)

"""The terms of a composite loss share one activation of the logits and one encoding of the target."""

import pytest
import torch

import medseg.losses._prepare as prepare
from medseg.config import LossTerm
from medseg.losses import build_loss
from medseg.losses._prepare import activate, shared_preparation, target_as_channels

TERMS = ["dice_ce", "cldice", "skeleton_recall", "cbdice", "betti_matching"]


def _batch(channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, channels, 24, 24, generator=g)
    target = torch.zeros(2, 1, 24, 24, dtype=torch.long)
    target[:, :, 10:13, 2:22] = 1
    target[:, :, 2:22, 6:8] = channels - 1 if channels > 2 else 1
    return logits, target


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_composite_equals_its_terms_called_one_by_one(channels):
    logits, target = _batch(channels)
    loss = build_loss([LossTerm(name=n) for n in TERMS], channels)
    shared = logits.clone().requires_grad_()
    total, parts = loss(shared, target)
    total.backward()
    alone = logits.clone().requires_grad_()
    separate = sum(w * term(alone, target) for w, term in zip(loss.weights, loss.terms))
    separate.backward()
    assert float(total.detach()) == float(separate.detach())  # the same activation: the same values, bit for bit
    for name, term in zip(loss.names, loss.terms):
        assert float(parts[name]) == float(term(logits, target))
    # one backward of the activation on the summed gradient instead of one per term
    assert torch.allclose(shared.grad, alone.grad, rtol=1e-5, atol=1e-9)
    assert shared.grad.abs().sum() > 0


def test_softmax_and_target_encoding_run_once_per_composite_call(monkeypatch):
    logits, target = _batch(2)
    loss = build_loss([LossTerm(name=n) for n in TERMS], 2)
    softmaxes = _counting(monkeypatch, torch, "softmax")
    encodings = _counting(monkeypatch, prepare, "_target_as_channels")
    loss(logits.clone().requires_grad_(), target)[0].backward()
    in_composite = (len(softmaxes), len(encodings))
    softmaxes.clear()
    encodings.clear()
    for term in loss.terms:
        term(logits.clone().requires_grad_(), target).backward()
    assert in_composite[0] == 1 and len(softmaxes) == len(TERMS)  # MONAI's Dice included
    assert 1 <= in_composite[1] < len(encodings)  # one per channel range asked for (with or without background)


def test_deep_supervision_heads_share_within_each_head(monkeypatch):
    logits, target = _batch(2)
    heads = torch.stack([logits, logits.flip(-1), logits * 0.5], 1)  # (B, 1 + H, C, H, W)
    loss = build_loss([LossTerm(name="dice_ce"), LossTerm(name="cldice")], 2)
    softmaxes = _counting(monkeypatch, torch, "softmax")
    loss.forward_heads(heads.clone().requires_grad_(), target)[0].backward()
    assert len(softmaxes) == 3  # one per head, for both terms


def test_nothing_is_shared_outside_a_composite_call():
    logits, target = _batch(2)
    assert activate(logits, "softmax") is not activate(logits, "softmax")
    with shared_preparation():
        first = activate(logits, "softmax")
        assert activate(logits, "softmax") is first
        assert activate(logits.clone(), "softmax") is not first  # another tensor, even with equal values
        assert target_as_channels(target, 2, None, 1) is target_as_channels(target, 2, None, 1)
        assert target_as_channels(target, 2, None, 0).shape[1] == 2  # the channel range is part of the key
    with shared_preparation():
        assert activate(logits, "softmax") is not first  # a new call starts afresh


def test_grad_mode_and_in_place_changes_are_part_of_the_key():
    logits = torch.randn(1, 2, 4, 4)
    x = logits.clone().requires_grad_()
    with shared_preparation():
        with torch.no_grad():
            without = activate(x, "softmax")
        with_graph = activate(x, "softmax")
        assert without.grad_fn is None and with_graph.grad_fn is not None
        y = logits.clone()
        before = activate(y, "sigmoid")
        y.add_(1.0)
        after = activate(y, "sigmoid")
        assert after is not before and torch.equal(after, torch.sigmoid(logits + 1.0))


def test_nested_blocks_join_the_outer_one():
    logits = torch.randn(1, 2, 4, 4)
    with shared_preparation():
        outer = activate(logits, "softmax")
        with shared_preparation():
            assert activate(logits, "softmax") is outer
        assert activate(logits, "softmax") is outer  # the inner block's end keeps the outer memo


def test_a_composite_under_inference_mode_and_no_grad():
    """Inference tensors keep no version counter; the memo does without it."""
    logits, target = _batch(2)
    loss = build_loss([LossTerm(name="dice_ce"), LossTerm(name="cldice")], 2)
    expected = float(loss(logits, target)[0])
    with torch.inference_mode():
        assert float(loss(logits.clone(), target.clone())[0]) == expected
    with torch.no_grad():
        assert float(loss(logits, target)[0]) == expected

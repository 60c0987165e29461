"""Deep supervision: nnU-Net's weights over MONAI DynUNet's stacked training output."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.losses import build_loss, deep_supervision_loss
from medseg.losses.betti_matching import BettiMatchingLoss
from medseg.losses.deep_supervision import deep_supervision_weights, is_deep_supervision_output
from medseg.models import build_model


def test_weights_halve_per_head_and_sum_to_one():
    w = deep_supervision_weights(3)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_loss_is_the_weighted_sum_over_dynunet_heads():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="dynunet", params={"filters": [4, 8, 16, 32], "deep_supervision": True, "deep_supr_num": 2}),
        3, 1, 2, [32, 32, 32],
    )
    image = torch.randn(2, 1, 32, 32, 32)
    target = (torch.rand(2, 1, 32, 32, 32) > 0.7).long()
    outputs = model.train()(image)
    assert outputs.shape == (2, 3, 2, 32, 32, 32) and is_deep_supervision_output(outputs, image)
    loss_fn = build_loss([{"name": "dice_ce", "weight": 1.0}, {"name": "cldice", "weight": 0.5, "iterations": 3}], 2)
    total, terms = deep_supervision_loss(loss_fn, outputs, target)
    per_head = [loss_fn(outputs[:, i], target) for i in range(3)]
    w = deep_supervision_weights(3)
    assert torch.allclose(total, sum(wi * l for wi, (l, _) in zip(w, per_head)))
    for name in ("dice_ce", "cldice"):
        assert torch.allclose(terms[name], sum(wi * t[name] for wi, (_, t) in zip(w, per_head)))
    # the heads differ, so the weighting matters
    assert not torch.allclose(per_head[0][0], per_head[2][0])
    total.backward()
    head_grads = [p.grad for n, p in model.named_parameters() if "deep_supervision_heads" in n]
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)
    # evaluation mode: the final output only
    with torch.no_grad():
        assert not is_deep_supervision_output(model.eval()(image), image)


def test_a_final_only_term_is_computed_on_the_final_head_alone():
    """heads: final drops the coarse heads' contributions of that term and keeps the final one's."""
    torch.manual_seed(1)
    outputs = torch.randn(2, 3, 2, 16, 16, requires_grad=True)  # (B, 1 + H, C, H, W)
    target = (torch.rand(2, 1, 16, 16) > 0.6).long()
    both = build_loss([{"name": "dice_ce"}, {"name": "cldice", "weight": 0.5, "iterations": 3}], 2)
    final = build_loss([{"name": "dice_ce"}, {"name": "cldice", "weight": 0.5, "iterations": 3, "heads": "final"}], 2)
    calls = []
    final.terms[1].register_forward_hook(lambda module, args, out: calls.append(out.detach()))
    total, terms = deep_supervision_loss(final, outputs, target)
    assert len(calls) == 1  # the clDice term ran once, on head 0
    w = deep_supervision_weights(3)
    dice_ce = sum(wi * both(outputs[:, i], target)[1]["dice_ce"] for i, wi in enumerate(w))
    cldice_final = both(outputs[:, 0], target)[1]["cldice"]
    # the logged part is the term's value on the head it ran on (w[0] times it before:
    # 4/7 of the value a run with heads 'all' logs for a term as good)
    assert torch.allclose(terms["dice_ce"], dice_ce) and torch.allclose(terms["cldice"], cldice_final)
    assert torch.allclose(total, dice_ce + 0.5 * w[0] * cldice_final)
    total.backward()
    assert outputs.grad[:, 1:].abs().sum() > 0  # dice_ce still trains the coarse heads
    with pytest.raises(Exception, match="heads"):
        build_loss([{"name": "cldice", "heads": "coarse"}], 2)


class _OneCallPerHead(torch.nn.Module):
    """The composite without ``forward_heads``: deep_supervision_loss calls it head by head."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, input, target, batch=None, head=0):
        return self.loss_fn(input, target, batch=batch, head=head)


@pytest.mark.parametrize("betti_heads", ["all", "final"])
def test_forward_heads_gives_the_per_head_loop_exactly(betti_heads):
    """One Betti matching call for all heads, clDice head by head, a term scheduled off,
    Skeleton Recall with its precomputed target: the same total, parts and gradient as
    calling the composite once per head."""
    from medseg.data.topology_targets import SkeletonTubed

    g = torch.Generator().manual_seed(4)
    outputs = torch.randn(2, 3, 2, 24, 20, generator=g)
    target = (torch.rand(2, 1, 24, 20, generator=g) > 0.6).long()
    batch = {"skeleton": torch.stack([SkeletonTubed("label", "skeleton", 1)({"label": t})["skeleton"] for t in target])}
    loss_fn = build_loss(
        [
            {"name": "dice_ce"},
            {"name": "betti_matching", "weight": 0.1, "heads": betti_heads},
            {"name": "cldice", "weight": 0.5, "iterations": 3},
            {"name": "skeleton_recall", "weight": 0.3},
            {"name": "clce", "weight": 0.2, "start": 5},
        ],
        2,
    )
    loss_fn.set_iteration(0, 10)  # clce scheduled off
    results = []
    for way in (loss_fn, _OneCallPerHead(loss_fn)):
        x = outputs.clone().requires_grad_(True)
        total, parts = deep_supervision_loss(way, x, target, batch=batch)
        total.backward()
        results.append((total.detach(), parts, x.grad))
    (total, parts, grad), (total_loop, parts_loop, grad_loop) = results
    assert torch.equal(total, total_loop)
    assert parts.keys() == parts_loop.keys() == {"dice_ce", "betti_matching", "cldice", "skeleton_recall"}
    for name in parts:
        assert torch.equal(parts[name], parts_loop[name]), name
    torch.testing.assert_close(grad, grad_loop, rtol=1e-6, atol=1e-8)
    assert grad[:, 1:].abs().sum() > 0


def test_betti_matching_prepares_each_target_once_for_all_heads(monkeypatch):
    """forward_heads: K x B matchings in one engine call, each target's barcode prepared
    once (with the cache off, as on random crops), and the values of K separate calls."""
    import medseg.losses.betti_matching as bm

    prepared = []
    original = bm._prepare_targets
    monkeypatch.setattr(bm, "_prepare_targets", lambda t, *a: prepared.append(len(t)) or original(t, *a))
    g = torch.Generator().manual_seed(7)
    outputs = torch.randn(3, 4, 3, 16, 18, generator=g)  # 3 samples, 4 heads, 3 classes
    target = torch.randint(0, 3, (3, 1, 16, 18), generator=g)
    for reduction in ("mean", "sum"):
        loss = BettiMatchingLoss(reduction=reduction, target_cache_bytes=0)
        heads = loss.forward_heads(outputs, target)
        assert prepared == [3 * 2]  # 3 samples x 2 foreground classes, not x 4 heads
        prepared.clear()
        separate = torch.stack([loss(outputs[:, k], target) for k in range(4)])
        assert prepared == []  # separate calls prepare nothing: the engine does the target's passes
        assert torch.equal(heads, separate)
    with pytest.raises(ValueError, match="reduction"):
        BettiMatchingLoss(reduction="none").forward_heads(outputs, target)


@pytest.mark.parametrize(
    "options",
    [{"relative": True}, {"filtration": "both"}, {"target_cache_bytes": 64 << 20}, {"construction": "T"},
     {"normalize": "pairs", "include_background": True}],
)
def test_betti_matching_forward_heads_equals_one_call_per_head(options):
    g = torch.Generator().manual_seed(11)
    outputs = torch.randn(2, 3, 2, 9, 8, 7, generator=g)  # 3D, 3 heads
    target = (torch.rand(2, 1, 9, 8, 7, generator=g) > 0.5).long()
    loss = BettiMatchingLoss(**options)
    x = outputs.clone().requires_grad_(True)
    heads = loss.forward_heads(x, target)
    heads.sum().backward()
    y = outputs.clone().requires_grad_(True)
    separate = torch.stack([loss(y[:, k], target) for k in range(3)])
    separate.sum().backward()
    assert torch.equal(heads.detach(), separate.detach())
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)
    assert x.grad.abs().sum() > 0

"""Deep supervision: nnU-Net's weights over MONAI DynUNet's stacked training output."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.losses import build_loss, deep_supervision_loss
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
    assert torch.allclose(terms["dice_ce"], dice_ce) and torch.allclose(terms["cldice"], w[0] * cldice_final)
    assert torch.allclose(total, dice_ce + 0.5 * w[0] * cldice_final)
    total.backward()
    assert outputs.grad[:, 1:].abs().sum() > 0  # dice_ce still trains the coarse heads
    with pytest.raises(Exception, match="heads"):
        build_loss([{"name": "cldice", "heads": "coarse"}], 2)

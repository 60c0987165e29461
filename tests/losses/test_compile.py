"""The losses inside ``torch.compile``: the same values as eager, and no recompilation per
batch (the composite's shared preparation keyed a memo on tensor ids, which Dynamo
guarded on; SAUNA's target computation from labels was traced with its data-dependent
window sizes): both recompiled every step until Dynamo's limit of 8, with warnings."""

from __future__ import annotations

import pytest
import torch

from medseg.config import LossTerm
from medseg.losses import build_loss, get_loss

torch_dynamo = pytest.importorskip("torch._dynamo")


def _graphs_per_step(step_fn, batches) -> list[int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seen = []
    for x, y in batches:
        step_fn(x, y).backward()
        seen.append(counters["stats"]["unique_graphs"])
    return seen


def _batches(steps: int, widths=True):
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        y = torch.zeros(2, 1, 32, 32, dtype=torch.long)
        w = 2 + step % 5 if widths else 3
        y[:, 0, 10:10 + w, 2:30] = 1
        y[:, 0, 2:30, 20:20 + w // 2 + 1] = 1
        yield torch.randn(2, 1, 32, 32, generator=g), y


@pytest.mark.parametrize("name", ["composite", "sauna"])
def test_compiled_losses_do_not_recompile_per_batch(name):
    torch.manual_seed(0)
    loss = (build_loss([LossTerm(name="dice_ce", weight=1.0), LossTerm(name="cldice", weight=0.5)], out_channels=2)
            if name == "composite" else get_loss("sauna"))
    model = torch.nn.Conv2d(1, 2, 3, padding=1)

    def step(x, y):
        value = loss(model(x), y)
        return value[0] if isinstance(value, tuple) else value

    compiled = torch.compile(step, backend="aot_eager")
    graphs = _graphs_per_step(compiled, _batches(5))
    assert graphs[1:] == [graphs[1]] * (len(graphs) - 1), graphs  # nothing new after the first steps
    x, y = next(_batches(1))
    assert float(compiled(x, y)) == pytest.approx(float(step(x, y)), rel=1e-5)

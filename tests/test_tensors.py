"""medseg.tensors.channel_argmax: exactly torch's argmax (first maximum, NaN largest), any dimension."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.tensors import channel_argmax


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    data=st.data(),
    ties=st.booleans(),
    nans=st.booleans(),
    keepdim=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
)
def test_equals_torch_argmax(shape, data, ties, nans, keepdim, dtype):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = rng.integers(0, 3, shape) if ties or dtype == torch.int64 else rng.standard_normal(shape)
    x = torch.as_tensor(values).to(dtype)
    if nans and dtype.is_floating_point:
        x[torch.as_tensor(rng.random(shape) < 0.2)] = float("nan")
    expected = x.argmax(dim=dim, keepdim=keepdim)
    got = channel_argmax(x, dim=dim, keepdim=keepdim)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_logits_of_a_batch():
    logits = torch.randn(3, 4, 9, 10, 11)
    assert torch.equal(channel_argmax(logits), logits.argmax(dim=1))
    assert torch.equal(channel_argmax(logits, dim=1, keepdim=True), logits.argmax(dim=1, keepdim=True))

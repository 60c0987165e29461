"""The Betti matching loss's native pair terms (loss_terms.hpp) against its torch form.

CPU tensors take ``_FusedPairTerms`` (one native pass, a stored derivative per index);
device tensors take the torch graph. Both must give the same loss and gradient for
every option, and the native functions must refuse inconsistent arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.losses.betti_matching import BettiMatchingLoss
from medseg.topology import _inputs

OPTIONS = [
    {},
    {"filtration": "sublevel"},
    {"filtration": "both", "dimension_weights": "per-dim"},
    {"push_unmatched_to_1_0": True},
    {"barcode_length_threshold": 0.05, "normalize": "pairs"},
    {"normalize": "voxels", "matched_weight": 0.7, "unmatched_weight": 1.3},
    {"construction": "T", "comparison": "intersection"},
    {"relative": True, "reduction": "sum"},
    {"include_background": True},
    {"sigmoid": True},  # a multi-label head: each channel's sigmoid
    {"sigmoid": False, "softmax": False},  # the input already holds the values
]


def _loss_and_grad(loss: BettiMatchingLoss, x: torch.Tensor, y: torch.Tensor, fused: bool):
    loss.fused_terms = fused
    x = x.clone().requires_grad_(True)
    value = loss(x, y)
    value.sum().backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", [(3, 2, 20, 17), (2, 3, 15, 13), (2, 2, 7, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_terms_equal_the_torch_form(options, shape, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    options = dict(options)
    if options.get("dimension_weights") == "per-dim":
        options["dimension_weights"] = [0.5, 2.0, 3.0][: len(shape) - 2]
    loss = BettiMatchingLoss(reduction=options.pop("reduction", "none"), target_cache_bytes=0, **options)
    value, grad = _loss_and_grad(loss, x, y, fused=True)
    value_torch, grad_torch = _loss_and_grad(loss, x, y, fused=False)
    assert value.dtype == value_torch.dtype == dtype
    # the same float32/float64 roundings per term and the same order of summation
    assert torch.equal(value, value_torch)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, grad_torch, rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-12)


def test_soft_target_and_target_with_gradient():
    """A soft target is read at its pairs' voxels natively; a target that requires
    gradient takes the torch form, which also gives it its gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    t = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    loss = BettiMatchingLoss(reduction="none", push_unmatched_to_1_0=True)
    value, grad = _loss_and_grad(loss, x, t, fused=True)
    value_torch, grad_torch = _loss_and_grad(loss, x, t, fused=False)
    assert torch.equal(value, value_torch)
    torch.testing.assert_close(grad, grad_torch, rtol=1e-9, atol=1e-12)
    loss.fused_terms = True
    t = t.clone().requires_grad_(True)
    loss(x, t).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def _batch(instances: int = 2, shape: tuple = (12, 12), seed: int = 0):
    rng = np.random.default_rng(seed)
    preds = [rng.random(shape, dtype=np.float32) for _ in range(instances)]
    targets = [(rng.random(shape) > 0.5).astype(np.float32) for _ in range(instances)]
    engine = _inputs.engine()
    index_p, sizes_p, index_t, sizes_t = engine.matching_batch_indices(preds, targets, True, "V", 1, None, False, False)
    return engine, preds, index_p, sizes_p, sizes_t


def test_native_terms_refuse_inconsistent_arrays():
    engine, preds, index_p, sizes_p, sizes_t = _batch()
    per_instance, counted = np.zeros(2), np.zeros(2, dtype=np.int64)
    coef = np.empty(index_p.shape[0], dtype=np.float32)
    args = (True, 1.0, 1.0, False, 0.0, None)
    engine.betti_loss_terms(preds, [], index_p, sizes_p, None, sizes_t, *args, per_instance, counted, coef)
    assert per_instance.min() > 0 and counted.sum() == index_p.shape[0] // 2 + sizes_t[2].sum()
    with pytest.raises(ValueError, match="index_p does not match sizes_p"):
        engine.betti_loss_terms(preds, [], index_p[:-1], sizes_p, None, sizes_t, *args, per_instance, counted, coef)
    with pytest.raises(ValueError, match="coef needs one entry"):
        engine.betti_loss_terms(preds, [], index_p, sizes_p, None, sizes_t, *args, per_instance, counted, coef[:-1])
    with pytest.raises(ValueError, match="shape \\(4, instances, ndim\\)"):
        engine.betti_loss_terms(preds[:1], [], index_p, sizes_p, None, sizes_t, *args, per_instance, counted, coef)
    with pytest.raises(TypeError, match="dtype"):
        engine.betti_loss_terms([preds[0], preds[1].astype(np.float64)], [], index_p, sizes_p, None, sizes_t, *args,
                                per_instance, counted, coef)
    wrong = index_p.copy()
    wrong[0] = 144 * 2 - 1  # instance 0's first entry pointing into instance 1
    with pytest.raises(IndexError, match="outside its instance"):
        engine.betti_loss_terms(preds, [], wrong, sizes_p, None, sizes_t, *args, per_instance, counted, coef)
    grad = [np.zeros((12, 12), dtype=np.float32) for _ in range(2)]
    with pytest.raises(IndexError, match="outside its instance"):
        engine.betti_loss_grad(coef, wrong, sizes_p, np.ones(2), grad)
    with pytest.raises(TypeError, match="dtype"):
        engine.betti_loss_grad(coef, index_p, sizes_p, np.ones(2), [g.astype(np.float64) for g in grad])
    with pytest.raises(ValueError, match="one grad array per instance"):
        engine.betti_loss_grad(coef, index_p, sizes_p, np.ones(2), grad[:1])


def test_native_gradient_is_the_stored_derivative_scattered():
    """grad[index] accumulates coef * the instance's upstream gradient (repeated voxels add)."""
    engine, preds, index_p, sizes_p, sizes_t = _batch()
    coef = np.empty(index_p.shape[0], dtype=np.float32)
    engine.betti_loss_terms(preds, [], index_p, sizes_p, None, sizes_t, True, 1.0, 1.0, False, 0.0, None,
                            np.zeros(2), np.zeros(2, dtype=np.int64), coef)
    upstream = np.array([0.5, -2.0])
    grad = np.zeros((2, 144), dtype=np.float32)
    engine.betti_loss_grad(coef, index_p, sizes_p, upstream, [grad[0], grad[1]])
    owner = np.concatenate([np.repeat(np.arange(2), sizes_p[q].sum(1)) for q in range(4)])
    expected = np.zeros(2 * 144)
    np.add.at(expected, index_p, coef.astype(np.float64) * upstream[owner])
    np.testing.assert_allclose(grad.ravel(), expected, rtol=1e-6, atol=1e-7)


def test_native_terms_are_the_same_on_any_number_of_threads():
    engine, preds, index_p, sizes_p, sizes_t = _batch(instances=5, shape=(20, 16), seed=3)
    results = []
    for threads in (1, 2, 3, 8):
        per_instance, counted = np.zeros(5), np.zeros(5, dtype=np.int64)
        coef = np.empty(index_p.shape[0], dtype=np.float32)
        engine.betti_loss_terms(preds, [], index_p, sizes_p, None, sizes_t, True, 1.0, 1.0, False, 0.01,
                                np.array([1.0, 0.5]), per_instance, counted, coef, threads)
        grad = np.zeros((5, 320), dtype=np.float32)
        engine.betti_loss_grad(coef, index_p, sizes_p, np.arange(1.0, 6.0), list(grad), threads)
        results.append((per_instance, counted, coef, grad))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_array_equal(a, b)
    assert results[0][1].min() > 0 and np.abs(results[0][3]).sum() > 0

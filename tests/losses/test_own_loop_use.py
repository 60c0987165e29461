"""The losses as a researcher's own training loop uses them (an eighth probing round):
threads sharing one loss, second derivatives, half precision, one-hot targets, float64,
and the deep-supervision helper with heads as a list or a loss of one term."""

import threading

import numpy as np
import pytest
import torch

from medseg.losses import build_loss, deep_supervision_loss, get_loss
from medseg.losses.betti_matching import BettiMatchingLoss


def _blobs(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(batch, 1, size, size, generator=g) > 0.55).long()
    logits = (target.float() * 2 - 1) * 2 + torch.randn(batch, 1, size, size, generator=g)
    return logits, target


def test_one_betti_matching_loss_shared_by_threads_gives_the_values_of_one_thread():
    """Its target cache was bookkept without a lock: while one thread prepared a target
    outside the GIL another evicted an entry the first had counted on (KeyError in 3 of
    4 threads)."""
    images, targets = zip(*(_blobs(1, 40, seed) for seed in range(5)))
    plain = BettiMatchingLoss(target_cache_bytes=0)
    expected = {(i, j): plain(torch.cat([images[i], images[j]]), torch.cat([targets[i], targets[j]])).item()
                for i in range(5) for j in range(5) if i != j}
    one = BettiMatchingLoss()
    one(images[0], targets[0])
    per_target = next(iter(one._cache.values()))[0].nbytes
    shared = BettiMatchingLoss(target_cache_bytes=4 * per_target)  # room for 4 of the 5: evictions
    for _ in range(40):  # hits well above misses: the cache stays on
        shared(torch.cat(images[:2]), torch.cat(targets[:2]))
    errors, wrong = [], []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                i, j = (int(v) for v in rng.choice(5, 2, replace=False))
                value = shared(torch.cat([images[i], images[j]]), torch.cat([targets[i], targets[j]])).item()
                if value != pytest.approx(expected[i, j], rel=1e-6):
                    wrong.append((i, j, value, expected[i, j]))
        except Exception as err:  # noqa: BLE001 - any failure in a thread is the finding
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []
    with shared._cache_lock:
        assert shared._cache_nbytes == sum(entry[0].nbytes for entry in shared._cache.values())
        assert shared.cache_enabled or not shared._cache  # switched off: nothing kept behind


def test_betti_matching_second_derivative_of_the_fused_terms_equals_the_torch_graph():
    """The native pair terms gave the first derivative only, and create_graph=True a wrong
    Hessian-vector product (0.16 against 0.20) without a word."""
    g = torch.Generator().manual_seed(3)
    target = (torch.rand(1, 1, 7, 7, generator=g) > 0.5).long()
    x = torch.randn(1, 1, 7, 7, generator=g, dtype=torch.float64)
    products = []
    for fused in (True, False):
        loss = BettiMatchingLoss()
        loss.fused_terms = fused
        inp = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(inp, target), inp, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * torch.linspace(-1, 1, 49, dtype=torch.float64).view_as(grad)).sum(), inp)
        products.append(hvp)
        assert torch.autograd.gradgradcheck(lambda a: loss(a, target), (x.clone().requires_grad_(True),))
    torch.testing.assert_close(products[0], products[1])
    assert products[0].abs().sum() > 0


def test_half_precision_logits_are_summed_in_float32():
    """A summed Betti matching term overflowed float16 (inf against 1.3e5), and the
    topology losses computed in bfloat16 with gradients 5-20 % off."""
    logits = torch.randn(16, 1, 128, 128, generator=torch.Generator().manual_seed(0))  # an untrained network's
    target = torch.zeros(16, 1, 128, 128, dtype=torch.long)
    target[..., 30:90, 30:90] = 1
    loss = BettiMatchingLoss(reduction="sum", push_unmatched_to_1_0=True)
    full = loss(logits, target)
    half = loss(logits.half(), target)
    assert torch.isfinite(half) and half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2) and full.item() > 65504
    for name in ("cldice", "skeleton_recall", "mip", "cbdice", "clce"):
        term = get_loss(name)
        grads = []
        for dtype in (torch.float32, torch.bfloat16):
            x = logits[:2, :, :32, :32].to(dtype).requires_grad_(True)
            value = term(x, target[:2, :, :32, :32])
            assert value.dtype == torch.float32, name
            value.backward()
            grads.append(x.grad.float())
        # the logits' own rounding to bfloat16 is all that differs (it was 5-20 %)
        assert (grads[1] - grads[0]).norm() <= 0.05 * grads[0].norm(), name
        # and the value is the float32 value of the rounded logits (clCE's cross-entropy was
        # computed in bfloat16: 3e-4 off)
        rounded = logits[:2, :, :32, :32].to(torch.bfloat16)
        assert term(rounded, target[:2, :, :32, :32]).item() == pytest.approx(
            term(rounded.float(), target[:2, :, :32, :32]).item(), rel=1e-6, abs=1e-7), name


def test_mip_target_foreground_is_read_as_the_output_is():
    """A multi-label sigmoid head's perfect prediction scored 0.49 (a voxel of no label was
    foreground: 1 - channel 0), and a smoothed 1-channel target was foreground everywhere
    (> 0), 0.59 against 0.13 for the same target given one-hot."""
    y = torch.zeros(1, 3, 16, 16, dtype=torch.long)
    y[0, 1, 4:8, 4:8] = 1
    y[0, 2, 6:12, 6:12] = 1
    perfect = (y.float() * 2 - 1) * 20
    mip = get_loss("mip", sigmoid=True, segmentation_weight=0.0, mip_weight=1.0)
    assert mip(perfect, y).item() < 1e-3
    square = torch.zeros(1, 1, 16, 16)
    square[..., 4:12, 4:12] = 1
    smoothed = square * 0.9 + 0.05
    logits = (square * 2 - 1) * 6
    one_channel = get_loss("mip", segmentation_weight=0.0)(logits, smoothed)
    two_channels = get_loss("mip", segmentation_weight=0.0)(torch.cat([-logits / 2, logits / 2], 1),
                                                            torch.cat([1 - smoothed, smoothed], 1))
    assert one_channel.item() == pytest.approx(two_channels.item(), rel=1e-5)
    assert one_channel.item() < 0.2


@pytest.mark.parametrize("name", ["skeleton_recall", "sauna"])
def test_label_map_losses_take_one_hot_targets(name):
    """Skeleton Recall and SAUNA refused one-hot targets ("must be a label map"), and with
    them every composite holding them."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 1, 20, 20), generator=g)
    one_hot = torch.cat([(labels == c) for c in range(3)], 1)
    logits = torch.randn(2, 3, 20, 20, generator=g)
    loss = get_loss(name)
    by_labels = loss(logits, labels)
    for target in (one_hot, one_hot.float(), one_hot.to(torch.uint8)):
        assert torch.equal(loss(logits, target), by_labels)
    overlapping = one_hot.clone()
    overlapping[:, 2] = True
    with pytest.raises(ValueError, match="channels overlap"):
        loss(logits, overlapping)


def test_composite_keeps_float64_and_checks_its_input():
    """build_loss's composite turned float64 into float32 (gradcheck failed for every term),
    trained a 3-channel output with a loss built for 1 channel, and met a numpy array
    with AttributeError."""
    composite = build_loss([{"name": "dice_ce"}, {"name": "cldice", "weight": 0.5}], 2)
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 2, (1, 1, 6, 6), generator=g)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    total, _ = composite(x, target)
    assert total.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a: composite(a, target)[0], (x,))
    with pytest.raises(ValueError, match=r"has 3 channels \(axis 1\), but the loss was built for out_channels=2"):
        composite(torch.randn(1, 3, 6, 6), target)
    with pytest.raises(ValueError, match=r"has 1 channels \(axis 2\)"):
        composite.forward_heads(torch.randn(1, 2, 1, 6, 6), target)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        composite(np.zeros((1, 2, 6, 6), np.float32), target)


def test_deep_supervision_takes_a_list_of_heads_and_a_loss_of_one_term():
    """A list of heads failed with AttributeError, a plain loss with an unexpected keyword
    'batch', and outputs without a heads axis with a shape message of the loss inside."""
    g = torch.Generator().manual_seed(5)
    outputs = torch.randn(2, 3, 2, 12, 12, generator=g)
    target = torch.randint(0, 2, (2, 1, 12, 12), generator=g)
    composite = build_loss([{"name": "dice_ce"}], 2)
    stacked = deep_supervision_loss(composite, outputs, target)
    listed = deep_supervision_loss(composite, list(outputs.unbind(1)), target)
    assert torch.equal(stacked[0], listed[0])
    plain = get_loss("dice_ce")
    total, parts = deep_supervision_loss(plain, outputs, target)
    weights = [4 / 7, 2 / 7, 1 / 7]
    assert total.item() == pytest.approx(sum(w * plain(outputs[:, i], target).item() for i, w in enumerate(weights)))
    assert parts.keys() == {"loss"}
    with pytest.raises(ValueError, match=r"outputs must be \(B, 1 \+ H, C, \*spatial\)"):
        deep_supervision_loss(composite, outputs[:, 0], target)
    with pytest.raises(ValueError, match="must share the final output's size"):
        deep_supervision_loss(composite, [outputs[:, 0], outputs[:, 1, :, :6, :6]], target)

"""Shared input handling of medseg's losses: activation, one-hot targets, channel selection.

Every medseg loss receives the network's raw output (B, C, *spatial) and an integer label
map (B, 1, *spatial) (or an already one-hot target (B, C, *spatial)). The MONAI arguments
``sigmoid``, ``softmax`` and ``to_onehot_y`` keep their meaning, but their default is
``None`` = *inferred from the number of channels*:

- C == 1: a binary head. ``sigmoid`` is applied, the target is used as it is (values 0/1),
  and the single channel is the foreground, so ``include_background`` has no effect. This
  is the case MONAI's clDice got wrong (MONAI issue 8239: the only channel was dropped as
  "background" and the loss became a constant).
- C > 1: ``softmax`` over the channels and a one-hot target with C classes.

Pass ``True``/``False`` explicitly to override (e.g. ``sigmoid=True`` with C > 1 for
multi-label heads, or ``sigmoid=False`` when the input already holds probabilities).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

#: Floor of every denominator in medseg's losses, so that smoothing terms of 0 never give 0/0.
EPS = 1e-6

_REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    return reduction


MAX_SKELETON_ITERATIONS = 1000
"""More erosion steps than any patch has voxels to erode: a typo (each step is a pass over the batch)."""


def check_iterations(iterations: int) -> int:
    """The erosion steps of a soft skeleton: a non-negative integer up to :data:`MAX_SKELETON_ITERATIONS` (not a bool)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 0 <= iterations <= MAX_SKELETON_ITERATIONS:
        raise ValueError(f"iterations must be a non-negative integer (at most {MAX_SKELETON_ITERATIONS}), got {iterations!r}")
    return iterations


def check_flag(name: str, value: object, optional: bool = False) -> None:
    """Refuse a flag that is not true or false (or None, when ``optional``): ``"no"`` or
    ``"false"`` from a config of the user's own turned the option on."""
    if not (isinstance(value, (bool, np.bool_)) or (optional and value is None)):
        raise ValueError(f"{name} must be true or false{' (or None)' if optional else ''}, got {value!r}")


def check_activation_flags(sigmoid: bool | None, softmax: bool | None) -> None:
    check_flag("sigmoid", sigmoid, optional=True)
    check_flag("softmax", softmax, optional=True)
    if sigmoid and softmax:
        raise ValueError("sigmoid=True and softmax=True are incompatible; set at most one")


def resolve_activation(n_channels: int, sigmoid: bool | None, softmax: bool | None) -> str:
    """'sigmoid', 'softmax' or 'none' for an input with ``n_channels`` channels."""
    if sigmoid:
        return "sigmoid"
    if softmax:
        if n_channels == 1:
            raise ValueError("softmax=True needs more than one output channel (got 1); use sigmoid")
        return "softmax"
    if sigmoid is None and softmax is None:
        return "sigmoid" if n_channels == 1 else "softmax"
    # One flag explicitly False and the other unset: only the explicit choice is honoured.
    if sigmoid is None and n_channels == 1:
        return "sigmoid"
    if softmax is None and n_channels > 1:
        return "softmax"
    return "none"


class _Shared(threading.local):
    memo: dict | None = None


_shared = _Shared()


@contextlib.contextmanager
def shared_preparation() -> Iterator[None]:
    """Within the block, losses share their preparation of the same tensors.

    :class:`~medseg.losses.CompositeLoss` evaluates its terms inside it: every term of
    ``dice_ce + cldice`` (or + Betti matching, ...) activates the same logits and encodes
    the same label map, so :func:`activate` and :func:`target_as_channels` compute each
    once per call and hand the same tensor to every term. The activation's backward then
    runs once on the summed gradient instead of once per term (a softmax forward and
    backward of 8 x 2 x 256² costs about 2 ms on two cores, per term). Values are
    unchanged; gradients differ only by the order of a floating-point sum. Terms must not
    modify what these functions return in place (none does). Per thread; a nested block
    joins the outer one.
    """
    if _shared.memo is not None:
        yield
        return
    _shared.memo = {}
    try:
        yield
    finally:
        _shared.memo = None


def _compiling() -> bool:
    """Whether torch.compile is tracing this call (torch >= 2.3 says so; older: never)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _memoised(key: tuple, source: torch.Tensor, compute) -> torch.Tensor:
    """``compute()``, or its earlier result for the same ``source`` tensor (object, not
    values, unmodified since) inside :func:`shared_preparation`. ``key`` tells what was
    computed from ``source``; the autograd mode is part of it, so a result made without a
    graph never stands in for one that needs it."""
    memo = _shared.memo
    if memo is None or _compiling():
        # compiled (torch.compile): the memo's key holds the tensor's id, which Dynamo
        # guarded on, so every batch recompiled until its limit; the compiler merges the
        # terms' common work by itself
        return compute()
    version = None if source.is_inference() else source._version  # inference tensors keep no version counter
    full = (id(source), version, torch.is_grad_enabled(), *key)
    hit = memo.get(full)
    if hit is not None and hit[0] is source:
        return hit[1]
    value = compute()
    memo[full] = (source, value)  # keeps source alive, so its id is not reused meanwhile
    return value


def activate(input: torch.Tensor, activation: str) -> torch.Tensor:
    """``input`` after the activation ('sigmoid', 'softmax' over dim 1, or 'none'), in
    float32 when ``input`` is float16 or bfloat16 (:func:`summable`: the standalone
    topology losses computed in half precision, 5-20 % off in their gradients, and a
    summed Betti matching term overflowed float16); shared between the terms of a
    composite loss (:func:`shared_preparation`)."""
    if activation == "sigmoid":
        return _memoised(("sigmoid",), input, lambda: torch.sigmoid(summable(input)))
    if activation == "softmax":
        return _memoised(("softmax",), input, lambda: torch.softmax(summable(input), dim=1))
    return summable(input)


def label_map(target: torch.Tensor, name: str) -> torch.Tensor:
    """``target`` as a label map (B, 1, *spatial), for the losses whose targets are built
    from labels (skeletons, SAUNA's maps): a label map as it is, a one-hot (or soft
    one-hot) target of one channel per class (check_input has matched them to the
    output's) by its argmax. Overlapping channels (a
    multi-label target) have no label map and are refused, naming the loss."""
    if target.shape[1] == 1:
        return target
    target = target.detach().float()
    if bool((target > 0.5).sum(dim=1).gt(1).any()):
        raise ValueError(
            f"{name}: the target's channels overlap (a multi-label target); give a label map (B, 1, ...) "
            "or a one-hot target"
        )
    return target.argmax(dim=1, keepdim=True)


def encodes_labels(target: torch.Tensor, n_channels: int, to_onehot_y: bool | None) -> bool:
    """Whether :func:`target_as_channels` one-hot encodes ``target`` (a label map, C > 1):
    its channels then hold 0 and 1 only. A target that already has C channels is taken as
    it is, ``to_onehot_y`` or not (as MONAI's and medseg's Dice losses take it: a
    composite of ``build_loss``, whose terms all get ``to_onehot_y=True``, refused the
    one-hot targets MONAI's ``AsDiscreted(to_onehot=C)`` gives)."""
    if to_onehot_y is None:
        to_onehot_y = target.shape[1] == 1
    return bool(to_onehot_y) and n_channels > 1 and target.shape[1] == 1


def target_as_channels(
    target: torch.Tensor, n_channels: int, to_onehot_y: bool | None, first: int = 0
) -> torch.Tensor:
    """The target with ``n_channels`` channels, as a float tensor (float64 stays float64,
    anything else is float32); channels ``first`` on.

    A label map is one-hot encoded by comparison, channel by channel, so that only the
    channels asked for are built (``first=1``: no background); its labels must lie in
    ``0 .. n_channels - 1`` (a ValueError on the CPU, a device-side assert on CUDA, as a
    one-hot scatter gives there; :func:`check_input` checks them).
    """
    if target.dim() < 3:
        raise ValueError(f"target must be (B, 1 or C, *spatial), got shape {tuple(target.shape)}")
    encode = encodes_labels(target, n_channels, to_onehot_y)
    return _memoised(
        ("channels", n_channels, encode, first), target, lambda: _target_as_channels(target, n_channels, encode, first)
    )


def _target_as_channels(target: torch.Tensor, n_channels: int, encode: bool, first: int) -> torch.Tensor:
    """:func:`target_as_channels`, computed; ``encode``: one-hot encode the label map."""
    if encode:
        if target.shape[1] != 1:
            raise ValueError(f"to_onehot_y needs a (B, 1, ...) label map, got shape {tuple(target.shape)}")
        labels = target.long()  # whole numbers in 0 .. n_channels - 1: check_input has checked them
        classes = torch.arange(first, n_channels, device=labels.device).view(1, -1, *([1] * (labels.dim() - 2)))
        return (labels == classes).float()
    target = target if target.dtype == torch.float64 else target.float()  # float64 keeps its precision
    if target.shape[1] != n_channels:
        raise ValueError(
            f"target has {target.shape[1]} channels but input has {n_channels}; "
            "pass an integer label map (B, 1, ...) or a one-hot target (B, C, ...)"
        )
    return target[:, first:]


def summable(input: torch.Tensor) -> torch.Tensor:
    """``input`` in float32 when it is float16 or bfloat16: a loss sums over a whole patch,
    which overflows float16 (65504: Dice NaN, SAUNA's Jaccard union inf) and rounds in
    bfloat16. :class:`~medseg.losses.registry.CompositeLoss` does the same for its terms;
    the standalone modules gave NaN on half-precision inputs."""
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


def check_input(input: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Shapes and target values every loss needs, checked the same way for all of them.

    ``target`` is a label map (B, 1, ...) or has one channel per output channel. Its
    values: for C > 1 outputs, a label map holds whole numbers 0 .. C - 1 (float label
    maps included: 1.9999 is not truncated to class 1); every other target (one channel
    for a sigmoid head, or C channels, one-hot or soft) lies in [0, 1]: a 0/255 mask or
    labels {0, 2} for a 1-channel head are errors instead of negative or exploding
    losses. Checked once per target inside :func:`shared_preparation`; on CUDA without a
    sync (a device-side assert).
    """
    for what, value in (("input", input), ("target", target)):  # a numpy array or None: 'no attribute dim'
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided or value.is_meta:  # torch's errors were many lines, naming no argument
            kind = "a meta tensor (no data)" if value.is_meta else f"a {value.layout} tensor"
            raise ValueError(f"{name}: {what} must be a dense tensor with data, got {kind}")
        if value.is_complex():
            raise ValueError(f"{name}: {what} must be real, got dtype {value.dtype}")
    if input.dim() not in (4, 5):
        raise ValueError(f"{name}: input must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(input.shape)}")
    if not input.is_floating_point():  # torch said only that its softmax is not implemented for Long
        raise ValueError(f"{name}: input must be floating-point logits or probabilities, got dtype {input.dtype}")
    if target.dim() != input.dim():
        raise ValueError(
            f"{name}: input {tuple(input.shape)} and target {tuple(target.shape)} must have the same number of "
            "dimensions; give the target a channel axis (B, 1, ...)"
        )
    if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        raise ValueError(f"{name}: input {tuple(input.shape)} and target {tuple(target.shape)} differ in batch or spatial size")
    if input.numel() == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(input.shape)}")
    if target.shape[1] not in (1, input.shape[1]):
        raise ValueError(
            f"{name}: target {tuple(target.shape)} must have 1 channel (a label map) or as many as input "
            f"{tuple(input.shape)}"
        )
    n = input.shape[1]
    _memoised(("values checked", n), target, lambda: _check_target_values(target, n, name))


def _check_target_values(target: torch.Tensor, n_channels: int, name: str) -> bool:
    """:func:`check_input`'s check of the target's values (see there); True when they pass."""
    if target.dtype == torch.bool:
        return True
    target = target.detach()  # a soft target may carry a gradient; only its values are checked
    label_map = target.shape[1] == 1 and n_channels > 1
    floating = target.is_floating_point()
    if target.is_cuda:  # reading the range back would stall every step on a sync
        if label_map:
            ok = (target >= 0) & (target < n_channels)
            if floating:
                ok &= target == torch.round(target)
        else:
            ok = (target >= 0) & (target <= 1)
        torch._assert_async(ok.all())
        return True
    low, high = (float(v) for v in torch.aminmax(target))
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name}: the target holds NaN values")
    if label_map:
        if low < 0 or high >= n_channels:
            raise ValueError(
                f"{name}: the label map holds labels {low:g} to {high:g}, outside the {n_channels} classes "
                f"0 to {n_channels - 1}"
            )
        if floating and not bool((target == torch.round(target)).all()):
            raise ValueError(f"{name}: the label map holds values that are not whole numbers (class labels 0 to {n_channels - 1})")
    elif low < 0 or high > 1:
        kind = "a 1-channel (sigmoid) target" if n_channels == 1 else "a target with one channel per class"
        raise ValueError(
            f"{name}: the target holds values {low:g} to {high:g}, but {kind} must lie in [0, 1]"
            + (" (a 0/255 mask? divide it by 255)" if high == 255 else "")
        )
    return True


def probabilities_and_target(input: torch.Tensor, target: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Activated input and channel-matched target, with channel 0 dropped where asked.

    With a single channel nothing is dropped: that channel is the foreground. ``options``:
    the keyword arguments of :func:`activation_and_target` (all required).
    """
    activated, first, target = activation_and_target(input, target, **options)
    return activated[:, first:], target


def activation_and_target(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    sigmoid: bool | None,
    softmax: bool | None,
    to_onehot_y: bool | None,
    include_background: bool,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The activated input with all its channels, the first channel kept (0 or 1: channel
    0 dropped where asked) and the target of the kept channels, as a float tensor."""
    n = input.shape[1]
    activated = activate(input, resolve_activation(n, sigmoid, softmax))
    first = 0 if include_background or n == 1 else 1
    return activated, first, target_as_channels(target, n, to_onehot_y, first)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values

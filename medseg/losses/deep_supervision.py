"""Deep supervision: the loss on every output head of a network, weighted by resolution.

MONAI's DynUNet with ``deep_supervision: true`` returns, in training mode, a tensor of
shape (B, 1 + H, C, *spatial): the final output first, then the H deep-supervision heads
(from ever coarser decoder levels) interpolated to the final size. The loss is

    L = sum_i w_i * loss(out[:, i], y),   w_i = 2^-i / sum_j 2^-j,

as in nnU-Net (Isensee et al., Nature Methods 2021), here with full-resolution targets
(MONAI upsamples the heads rather than downsampling the targets), so that every loss
term, topology losses and their per-sample targets included, applies unchanged. In
evaluation mode the network returns only the final output.

A term configured with ``heads: final`` is left out on the heads i > 0 and keeps its
``w_0`` share on the final output, so that switching it from ``all`` to ``final`` drops
the coarse heads' contributions and leaves the final one as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """``w_i = 2^-i`` normalised to sum 1, for ``i = 0 .. num_outputs - 1``."""
    raw = [0.5**i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def is_deep_supervision_output(output: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether ``output`` is DynUNet's stacked (B, 1 + H, C, *spatial) training output for ``image``."""
    return output.dim() == image.dim() + 1


def deep_supervision_loss(
    loss_fn: torch.nn.Module,
    outputs: torch.Tensor,
    target: torch.Tensor,
    batch: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of ``loss_fn`` over the heads.

    ``outputs`` (B, 1 + H, C, *spatial), or a list of the 1 + H heads of one size;
    returns the total and each term's weighted mean over the heads it ran on (what the
    run logs as that term). A :class:`~medseg.losses.CompositeLoss` computes the same
    sums itself (:meth:`~medseg.losses.CompositeLoss.forward_heads`), so that a term can
    take all heads in one call; any other loss (``loss_fn(input, target)`` -> a scalar)
    is called head by head, its part named ``loss``.
    """
    if isinstance(outputs, (list, tuple)):  # heads as a list (networks other than DynUNet)
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise ValueError(
                f"deep_supervision_loss: the heads must share the final output's size (MONAI's DynUNet upsamples "
                f"them), got shapes {[tuple(o.shape) for o in outputs]}"
            )
        outputs = torch.stack(list(outputs), dim=1)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != target.dim() + 1:
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(
            f"deep_supervision_loss: outputs must be (B, 1 + H, C, *spatial), the heads stacked on axis 1, for a "
            f"target of shape {tuple(target.shape)}; got {got}"
        )
    forward_heads = getattr(loss_fn, "forward_heads", None)
    if forward_heads is not None and _takes(forward_heads, "batch"):
        return forward_heads(outputs, target, batch=batch)
    count = outputs.shape[1]
    if _takes(loss_fn.forward if isinstance(loss_fn, torch.nn.Module) else loss_fn, "head"):  # a composite's form
        heads = (loss_fn(outputs[:, i], target, batch=batch, head=i) for i in range(count))
    else:  # a loss of one term (get_loss, a MONAI loss): its value on each head, logged as "loss"
        heads = ((value, {"loss": value}) for value in (loss_fn(outputs[:, i], target) for i in range(count)))
    return combine_heads(heads, count, outputs.device)


def _takes(function: Any, name: str) -> bool:
    """Whether ``function`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False


def combine_heads(
    heads: Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]], count: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total ``sum_i w_i * loss_i`` over ``count`` heads' ``(loss, parts)``
    (:func:`deep_supervision_weights`), and each part's weighted mean over the heads it
    was computed on: the head weights normalised to those heads, so that a term of
    ``heads: final`` logs its value on the final output (4/7 of it before, for 3 heads)
    and the logged terms of 'all' and 'final' runs compare."""
    total = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    shares: dict[str, float] = {}
    for weight, (loss, parts) in zip(deep_supervision_weights(count), heads):
        total = total + weight * loss
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + weight * value
            shares[name] = shares.get(name, 0.0) + weight
    return total, {name: value / shares[name] for name, value in sums.items()}

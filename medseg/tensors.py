"""Tensor operations where PyTorch's own is slow on the CPU for medseg's shapes."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["channel_argmax", "label_array"]


def label_array(labels: torch.Tensor) -> np.ndarray:
    """A label tensor as an int64 numpy array on the CPU; float labels are rounded to the
    nearest whole number (a cast would truncate a soft or resampled 0.9999 to class 0)."""
    x = labels.detach()
    if x.is_floating_point():
        x = torch.round(x)
    return x.to("cpu", torch.int64).numpy()


def channel_argmax(x: torch.Tensor, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """``x.argmax(dim, keepdim)``, the same indices (the first maximum; NaN counts as the
    largest), fast on the CPU.

    PyTorch's CPU argmax over a dimension that is not the innermost one (the class
    dimension of ``(B, C, *spatial)`` logits) runs a strided loop: 95 ms for a (8, 2, 256,
    256) batch and 725 ms for (2, 160, 160, 160), against 5 and 33 ms with the classes
    moved innermost first (torch 2.13, 2 cores); the copy that takes costs less than the
    difference. On other devices, and for the innermost dimension, it is ``x.argmax``.
    """
    dim = dim % x.dim()
    if x.dtype == torch.bool:  # torch's argmax takes no bool (a bool one-hot target)
        x = x.to(torch.uint8)
    if x.device.type != "cpu" or dim == x.dim() - 1:
        return x.argmax(dim=dim, keepdim=keepdim)
    out = x.movedim(dim, -1).contiguous().argmax(dim=-1)
    return out.unsqueeze(dim) if keepdim else out

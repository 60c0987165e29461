"""Kernels, strides and patch divisibility of a U-Net from the patch size and the spacing.

The rules of nnU-Net v2 (``get_pool_and_conv_props``, Isensee et al. 2021), written for
medseg's DynUNet and UNet:

- Level 0 has stride 1. Each further level halves every axis that (a) is still at least
  ``2 * min_edge`` voxels long, so the bottleneck keeps at least ``min_edge`` (4) voxels,
  and (b) has a spacing within a factor 2 of the finest spacing among those axes: a
  coarse axis (thick slices) is not pooled until the others have caught up, which makes
  the feature maps more isotropic in mm level by level.
- When only one axis may still be pooled, it is pooled only while it is at least
  ``3 * min_edge`` long (a lone axis is not squeezed to the limit).
- Kernels are 3 along an axis once its spacing at that level is within a factor 2 of the
  finest one, 1 before (a 3-voxel kernel across 5 mm slices mixes unrelated anatomy);
  the bottleneck always gets 3.
- The patch is then rounded *up* to a multiple of ``2 ** pools`` per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["UNetTopology", "unet_topology", "round_up"]

MIN_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


@dataclass(frozen=True)
class UNetTopology:
    """Per level (level 0 first): ``kernel_sizes`` and ``strides`` (DynUNet's arguments);
    ``patch_size`` rounded up to ``divisor`` (the product of the strides per axis)."""

    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    patch_size: list[int]
    divisor: list[int]

    @property
    def levels(self) -> int:
        return len(self.strides)


def round_up(size: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Each size rounded up to a multiple of its divisor."""
    return [int(math.ceil(s / d) * d) for s, d in zip(size, divisor)]


def unet_topology(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = MIN_EDGE) -> UNetTopology:
    """Plan the levels of a U-Net for ``patch_size`` voxels of ``spacing`` mm (see the module docstring).

    Examples
    --------
    >>> t = unet_topology([0.8, 0.8, 5.0], [160, 160, 24])
    >>> t.strides[:3], t.kernel_sizes[:3]
    ([[1, 1, 1], [2, 2, 1], [2, 2, 1]], [[3, 3, 1], [3, 3, 1], [3, 3, 3]])
    >>> t.divisor
    [32, 32, 4]
    """
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    kernel = [1] * dims
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * dims]
    pools = [0] * dims

    def update_kernel() -> None:
        finest = min(current_spacing)
        for d in range(dims):
            if current_spacing[d] / finest < 2:
                kernel[d] = 3

    while True:
        candidates = [d for d in range(dims) if current_size[d] >= 2 * min_edge]
        if not candidates:
            break
        finest = min(current_spacing[d] for d in candidates)
        candidates = [d for d in candidates if current_spacing[d] / finest < 2]
        if len(candidates) == 1 and current_size[candidates[0]] < 3 * min_edge:
            break
        update_kernel()
        kernels.append(list(kernel))
        stride = [1] * dims
        for d in candidates:
            stride[d] = 2
            pools[d] += 1
            current_spacing[d] *= 2
            current_size[d] = math.ceil(current_size[d] / 2)
        strides.append(stride)
    kernels.append([3] * dims)  # the bottleneck
    divisor = [2**p for p in pools]
    return UNetTopology(kernels, strides, round_up(patch_size, divisor), divisor)

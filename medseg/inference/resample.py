"""Resampling between a scan's grid and the network's grid, one slab at a time.

MONAI's ``Spacing`` (and the ``Invertd`` of it) resamples a whole volume in one call:
``affine_grid`` + ``grid_sample`` in float64 (``Spacingd``'s default ``dtype``), i.e. a
float64 copy of the source, a float64 grid of 3 coordinates per output voxel and a float64
output, about 60 bytes per output voxel (5 GB to bring a 512x512x400 CT from 0.7 to
0.8 mm). Here the same interpolation runs over slabs of the output grid:

* :func:`index_map` is the matrix MONAI resamples with, ``solve(src_affine, dst_affine)``:
  an output voxel index to a source voxel index (``Orientation`` and ``Spacing`` fused:
  a permutation or flip of the axes commutes with linear interpolation and with the
  clamping of ``padding_mode="border"``, so one resample gives what the two give);
* :func:`resample_slabs` yields the output a slab at a time (about ``max_voxels`` voxels):
  the slab's corners are mapped into the source, the source is cropped to their bounding
  box (plus the interpolation neighbours) and converted to float64, and ``grid_sample``
  samples it at the slab's coordinates (``align_corners=False`` in index space, as
  MONAI's ``AffineTransform(normalized=False)``). The crop reaches the source's border
  on every side a coordinate leaves it, so border and zero padding are the full volume's.
  Values agree with MONAI's whole-volume resample to float64 rounding (~1e-12).
* :func:`run_transforms` runs medseg's ``infer`` preprocessing with its spatial transforms
  *lazy* (MONAI computes the target grid, shape and affine, without touching the voxels)
  and does the one pending resample with :func:`resample_slabs`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["index_map", "resample_slabs", "run_transforms", "MAX_SLAB_VOXELS"]

# ~1M output voxels per slab: a float64 grid of 24 MB, a few slabs per second
MAX_SLAB_VOXELS = 1 << 20


def index_map(dst_affine: Any, src_affine: Any, spatial_dims: int) -> np.ndarray:
    """The ``(r+1, r+1)`` float64 matrix taking a voxel index of the ``dst`` grid to one of ``src``.

    Both affines map voxel indices to world millimetres (4x4). For 2D both are first put in
    their slice's plane (:func:`medseg.data.io.planar_affine`, as the 2D transforms see
    them), then cut to 3x3 as MONAI's ``to_affine_nd`` does.
    """
    from monai.data.utils import to_affine_nd

    from medseg.data.io import planar_affine

    src, dst = (np.asarray(a, dtype=np.float64) for a in (src_affine, dst_affine))
    if spatial_dims == 2:
        src, dst = planar_affine(src), planar_affine(dst)
    src = to_affine_nd(spatial_dims, src)
    dst = to_affine_nd(spatial_dims, dst)
    return np.linalg.solve(src, dst)


def resample_slabs(
    src: torch.Tensor,
    matrix: np.ndarray,
    out_shape: tuple[int, ...],
    axis: int = 0,
    mode: str = "bilinear",
    padding_mode: str = "border",
    max_voxels: int = MAX_SLAB_VOXELS,
) -> Iterator[tuple[tuple[slice, ...], torch.Tensor]]:
    """Resample ``src`` onto an ``out_shape`` grid, one slab along ``axis`` at a time.

    Parameters
    ----------
    src : torch.Tensor
        ``(C, *in_shape)``, any float dtype, any device (the slabs are computed there).
    matrix : np.ndarray
        :func:`index_map` from the output grid to ``src``'s grid.
    out_shape : tuple of int
        The output's spatial shape.
    axis : int
        Spatial axis the slabs are cut along (slabs are consecutive and ascending).
    mode, padding_mode : str
        ``grid_sample``'s: ``bilinear`` (linear in each axis) or ``nearest``; ``border`` or
        ``zeros``.
    max_voxels : int
        Output voxels per slab (at most a 16th of the output, at least one plane).

    Yields
    ------
    index, values
        ``index`` the spatial slices of the slab in the output grid; ``values``
        ``(C, *slab_shape)`` float64 on ``src``'s device.
    """
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"padding_mode {padding_mode!r}: only 'border' and 'zeros' can be resampled by slabs")
    dims = len(out_shape)
    axis %= dims
    in_shape = tuple(src.shape[1:])
    plane = max(1, math.prod(out_shape) // max(1, out_shape[axis]))
    # at most 1/16 of the output per slab: the slab's temporaries stay small next to it
    rows = max(1, min(max_voxels, math.prod(out_shape) // 16) // plane)
    for start in range(0, out_shape[axis], rows):
        stop = min(start + rows, out_shape[axis])
        index = tuple(slice(start, stop) if d == axis else slice(0, n) for d, n in enumerate(out_shape))
        # an affine map takes the slab's box to a parallelepiped: its extremes are at the corners
        corners = np.array(list(itertools.product(*[(s.start, s.stop - 1) for s in index])), dtype=np.float64)
        mapped = corners @ matrix[:dims, :dims].T + matrix[:dims, dims]
        low = [int(np.clip(math.floor(v), 0, n - 1)) for v, n in zip(mapped.min(0), in_shape)]
        high = [int(np.clip(math.floor(v) + 1, 0, n - 1)) for v, n in zip(mapped.max(0), in_shape)]
        crop = src[(slice(None), *(slice(lo, hi + 1) for lo, hi in zip(low, high)))].to(torch.float64)
        values = _grid_sample(crop, matrix, index, low, mode, padding_mode)
        del crop
        yield index, values


def _grid_sample(crop, matrix, index, low, mode, padding_mode) -> torch.Tensor:
    """Any affine map: ``grid_sample`` at the slab's source coordinates (relative to the crop)."""
    dims = len(index)
    device = crop.device
    # coordinate d = sum_k m[d, k] * index_k + m[d, -1], normalised as
    # grid_sample(align_corners=False) reads it (index i of n -> (2i + 1) / n - 1)
    shape = [s.stop - s.start for s in index]
    grid = torch.empty((*shape, dims), dtype=torch.float64, device=device)
    for d in range(dims):
        n = crop.shape[1 + d]
        target = grid[..., dims - 1 - d]  # grid_sample lists (x, y, z): the axes reversed
        terms = [k for k in range(dims) if matrix[d, k] != 0.0] or [d]
        for j, k in enumerate(terms):
            term = torch.arange(index[k].start, index[k].stop, dtype=torch.float64, device=device)
            term = term * (2.0 * float(matrix[d, k]) / n)
            if j == 0:
                term += (2.0 * (float(matrix[d, dims]) - low[d]) + 1.0) / n - 1.0
            view = [1] * dims
            view[k] = shape[k]
            if j == 0:
                target.copy_(term.view(view).expand(shape))
            else:
                target.add_(term.view(view))
    return torch.nn.functional.grid_sample(
        crop[None], grid[None], mode=mode, padding_mode=padding_mode, align_corners=False
    )[0]


def _pending_modes(image) -> tuple[str, str]:
    """Interpolation and padding of the pending spatial transforms (bilinear/border if unset).

    ``Spacingd(mode=...)`` records its mode in the operation's ``extra_info``, not in the
    lazy keyword arguments (which stay None unless the Compose overrides them): reading
    only the latter resampled a label map bilinearly, and the cast to integers then
    shrank every object by up to a voxel on each side (44,363 voxels of one CT's label).
    """
    from monai.transforms.lazy.utils import kwargs_from_pending
    from monai.utils import LazyAttr, TraceKeys

    mode, padding = "bilinear", "border"
    for op in image.pending_operations:
        kwargs = kwargs_from_pending(op)
        recorded = op.get(TraceKeys.EXTRA_INFO) or {}
        mode = kwargs.get(LazyAttr.INTERP_MODE) or recorded.get("mode") or mode
        padding = kwargs.get(LazyAttr.PADDING_MODE) or recorded.get("padding_mode") or padding
    return str(mode), str(padding)


def _apply_pending(data: dict[str, Any], max_voxels: int) -> None:
    """Resample (in place) every MetaTensor of ``data`` that has pending spatial transforms."""
    from monai.data import MetaTensor

    for key in list(data):
        image = data[key]
        if not isinstance(image, MetaTensor) or not image.has_pending_operations:
            continue
        dims = image.ndim - 1
        dst_affine = image.peek_pending_affine()
        dst_shape = tuple(int(s) for s in image.peek_pending_shape())
        matrix = index_map(dst_affine, image.affine, dims)
        plain = image.as_tensor()
        if dst_shape == tuple(plain.shape[1:]) and np.allclose(matrix, np.eye(dims + 1), atol=1e-6):
            values = plain.float()  # nothing to resample, as Spacing would find
        else:
            _check_grid_fits(dst_shape, plain.shape[0], plain.shape[1:])
            mode, padding = _pending_modes(image)
            values = torch.empty((plain.shape[0], *dst_shape), dtype=torch.float32, device=plain.device)
            for index, slab in resample_slabs(plain, matrix, dst_shape, 0, mode, padding, max_voxels):
                values[(slice(None), *index)] = slab
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        del plain, image
        data[key] = MetaTensor(values, affine=torch.as_tensor(dst_affine, dtype=torch.float64), meta=meta)


def _check_grid_fits(shape: tuple[int, ...], channels: int, source_shape: tuple[int, ...]) -> None:
    """Refuse a resampled grid whose float32 array alone needs more than the memory this
    process may use: a tiny ``data.target_spacing`` (0.01 mm for a 1 mm scan) failed
    with an allocator's traceback, or overflowed the storage size."""
    from medseg.errors import DataError
    from medseg.memory import memory_limit_bytes

    needed = 4 * channels * math.prod(shape)
    limit = memory_limit_bytes()
    if limit is not None and needed > limit:
        raise DataError(
            f"resampling a {'x'.join(map(str, source_shape))} scan gives a {'x'.join(map(str, shape))} grid, "
            f"{needed / 2**30:.3g} GB as float32, more than the {limit / 2**30:.3g} GB of memory here: check the "
            "target spacing (data.target_spacing)"
        )


def run_transforms(compose, data: dict[str, Any], max_voxels: int = MAX_SLAB_VOXELS) -> dict[str, Any]:
    """Apply a MONAI ``Compose`` to ``data`` with its spatial transforms resampled by slabs.

    Lazy-capable transforms (``Orientationd``, ``Spacingd``) only record the target grid;
    before the next other transform (and at the end) the recorded operations are applied
    with :func:`resample_slabs`. The result's ``image`` is a MetaTensor whose ``affine`` is
    the target grid's; it carries no ``applied_operations`` (the inverse is
    :func:`index_map` between that affine and the scan's).

    ``data`` is updated in place and returned: it only ever holds the latest values, so
    when it held the only reference to the scan's array, that array is freed as soon as it
    has been resampled, before the normalisation makes its copies.
    """
    from monai.transforms.traits import LazyTrait

    for transform in compose.transforms:
        if isinstance(transform, LazyTrait) and not transform.requires_current_data:
            result = transform(data, lazy=True)
        else:
            _apply_pending(data, max_voxels)
            result = transform(data)
        data.clear()
        data.update(result)
        del result
    _apply_pending(data, max_voxels)
    return data

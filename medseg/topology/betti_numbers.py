"""Betti numbers of binary masks by connected-component labelling and the Euler characteristic.

For a 2D mask the Betti numbers are β0 (connected components) and β1 (holes); for a 3D
mask β0, β1 (tunnels, handles, loops) and β2 (cavities). They depend on the
connectivity chosen for the foreground, and the background must take the
complementary one (8/4 in 2D, 26/6 in 3D) so that Alexander duality holds: a 2D
ring of pixels touching at corners is one loop when the foreground is 8-connected
(and the inside, 4-connected, is a separate background component), but not a loop
when the foreground is 4-connected.

Geometrically the two conventions are the two standard cubical complexes built
from a voxel grid (the ones gudhi builds):

* full connectivity (8 in 2D, 26 in 3D): every foreground voxel is a closed unit
  square/cube; voxels sharing only a corner touch. ``gudhi.CubicalComplex(
  top_dimensional_cells=...)`` builds this complex.
* face connectivity (4 in 2D, 6 in 3D): every foreground voxel is a vertex, and
  edges/squares/cubes are added between face-adjacent foreground voxels.
  ``gudhi.CubicalComplex(vertices=...)`` builds this complex.

Algorithm (linear time, a few passes over the array):

* β0 = number of foreground components (``scipy.ndimage.label`` with the
  connectivity's structuring element);
* β_{d-1} = number of background components with the complementary connectivity,
  after padding with one layer of background so that everything outside the mask
  is a single component, minus that outside component;
* in 3D, β1 from the Euler characteristic χ = β0 − β1 + β2, where χ is counted
  directly on the cubical complex (vertices − edges + squares − cubes), which
  takes one vectorised pass per cell type.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from medseg.topology._inputs import TopologyInputError, refuse_non_finite, to_numpy

__all__ = ["betti_numbers", "euler_characteristic", "default_connectivity", "complementary_connectivity"]

_FULL = {2: 8, 3: 26}
_FACE = {2: 4, 3: 6}


def default_connectivity(ndim: int) -> int:
    """Full connectivity for ``ndim`` (8 in 2D, 26 in 3D): medseg's documented default."""
    _check_ndim(ndim)
    return _FULL[ndim]


def complementary_connectivity(connectivity: int, ndim: int) -> int:
    """The background connectivity that goes with a foreground connectivity (8↔4, 26↔6)."""
    connectivity = _check_connectivity(connectivity, ndim)
    return _FACE[ndim] if connectivity == _FULL[ndim] else _FULL[ndim]


def _check_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise TopologyInputError(f"mask must be 2D or 3D, got {ndim} dimensions")


def _check_connectivity(connectivity: int | None, ndim: int) -> int:
    _check_ndim(ndim)
    if connectivity is None:
        return _FULL[ndim]
    whole = isinstance(connectivity, (int, np.integer)) and not isinstance(connectivity, (bool, np.bool_))
    if not whole or connectivity not in (_FULL[ndim], _FACE[ndim]):  # 8.0 and True were taken
        raise TopologyInputError(
            f"connectivity {connectivity!r} is not valid for a {ndim}D mask "
            f"(use {_FULL[ndim]} or {_FACE[ndim]})"
        )
    return int(connectivity)


def _structure(connectivity: int, ndim: int) -> np.ndarray:
    rank = ndim if connectivity == _FULL[ndim] else 1
    return ndimage.generate_binary_structure(ndim, rank)


def _as_mask(mask) -> np.ndarray:
    """The foreground (values > 0, as :func:`medseg.topology.betti_matching_error` reads
    a mask) of a numpy array or torch tensor of real numbers; NaN and infinite values are
    refused rather than guessed, as betti_matching_error refuses them (complex, text and
    object arrays compared with 0 or failed in numpy's own words)."""
    mask = to_numpy(mask, "mask")
    _check_ndim(mask.ndim)
    if mask.dtype == np.bool_:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise TopologyInputError(f"mask: expected a real-valued array (bool, integer or float), got dtype {mask.dtype}")
    if np.issubdtype(mask.dtype, np.floating):
        refuse_non_finite(mask, "mask")
    return mask > 0


def _crop_to_foreground(mask: np.ndarray) -> np.ndarray:
    """The bounding box of the foreground: Betti numbers do not change, labelling gets cheaper.

    Everything outside the box is background connected to the outside, which the
    background padding in :func:`betti_numbers` stands for.
    """
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return mask[tuple(slice(0, 0) for _ in range(mask.ndim))]
        box.append(slice(hit[0], hit[-1] + 1))
    return mask[tuple(box)]


def _count_components(mask: np.ndarray, connectivity: int) -> int:
    _, n = ndimage.label(mask, structure=_structure(connectivity, mask.ndim))
    return int(n)


def euler_characteristic(mask, connectivity: int | None = None) -> int:
    """Euler characteristic χ of the cubical complex of a 2D/3D binary mask.

    Parameters
    ----------
    mask : array_like
        2D or 3D; nonzero is foreground.
    connectivity : int, optional
        Foreground connectivity, 8 or 4 (2D), 26 or 6 (3D). Default: full (8/26).

    Returns
    -------
    int
        χ = Σ_k (−1)^k (number of k-cells); equals Σ_k (−1)^k β_k.

    Notes
    -----
    A k-cell is identified by the set S of k axes it extends along. With full
    connectivity the complex is the union of closed voxel cubes: a cell belongs to
    it if any voxel it bounds is foreground, i.e. the OR of the two voxels on
    either side along every axis outside S (after padding with background). With
    face connectivity voxels are vertices and a cell belongs to it if all of its
    vertices are foreground: the AND of the two neighbours along every axis in S.
    """
    mask = _as_mask(mask)
    connectivity = _check_connectivity(connectivity, mask.ndim)
    ndim = mask.ndim
    full = connectivity == _FULL[ndim]
    if full:
        mask = np.pad(mask, 1)
    chi = 0
    for k in range(ndim + 1):
        for axes in itertools.combinations(range(ndim), k):
            cells = mask
            for axis in range(ndim):
                lo = [slice(None)] * ndim
                hi = [slice(None)] * ndim
                lo[axis], hi[axis] = slice(None, -1), slice(1, None)
                if full and axis not in axes:
                    cells = cells[tuple(lo)] | cells[tuple(hi)]
                elif not full and axis in axes:
                    cells = cells[tuple(lo)] & cells[tuple(hi)]
            chi += (-1) ** k * int(np.count_nonzero(cells))
    return chi


def betti_numbers(mask, connectivity: int | None = None) -> np.ndarray:
    """Betti numbers of a 2D or 3D binary mask.

    Parameters
    ----------
    mask : array_like
        2D or 3D array (numpy or torch); voxels > 0 are foreground.
    connectivity : int, optional
        Connectivity of the foreground: 8 or 4 for 2D masks, 26 or 6 for 3D masks.
        The background takes the complementary connectivity (4/8, 6/26).
        Default ``None`` means full connectivity (8 in 2D, 26 in 3D), the convention
        of ``gudhi.CubicalComplex(top_dimensional_cells=...)`` and of
        ``medseg evaluate``.

    Returns
    -------
    numpy.ndarray
        int64 array ``[β0, β1]`` for a 2D mask, ``[β0, β1, β2]`` for a 3D mask.

    Raises
    ------
    ValueError
        If the mask is not 2D or 3D, or the connectivity does not fit its dimension.

    Notes
    -----
    β0 counts foreground components, β_{d-1} counts background components that do
    not touch the outside (holes in 2D, cavities in 3D), and in 3D β1 follows from
    the Euler characteristic, χ = β0 − β1 + β2. All steps are linear in the number
    of voxels of the foreground's bounding box: a 256³ mask takes about 0.3 s (dense
    random noise, the worst case, about 1 s) on one core.

    References
    ----------
    T. Y. Kong and A. Rosenfeld, "Digital topology: introduction and survey",
    Computer Vision, Graphics, and Image Processing 48(3), 1989.

    Examples
    --------
    >>> import numpy as np
    >>> ring = np.zeros((5, 5), bool); ring[1:4, 1:4] = True; ring[2, 2] = False
    >>> betti_numbers(ring).tolist()
    [1, 1]
    >>> diagonal = np.eye(3, dtype=bool)
    >>> betti_numbers(diagonal).tolist(), betti_numbers(diagonal, connectivity=4).tolist()
    ([1, 0], [3, 0])
    """
    mask = _as_mask(mask)
    ndim = mask.ndim
    connectivity = _check_connectivity(connectivity, ndim)
    background_connectivity = complementary_connectivity(connectivity, ndim)

    mask = _crop_to_foreground(mask)
    b0 = _count_components(mask, connectivity)
    background = np.pad(~mask, 1, constant_values=True)
    b_top = _count_components(background, background_connectivity) - 1
    if ndim == 2:
        return np.array([b0, b_top], dtype=np.int64)
    chi = euler_characteristic(mask, connectivity)
    b1 = b0 + b_top - chi
    return np.array([b0, b1, b_top], dtype=np.int64)

"""Skeletons of 2D and 3D binary masks that keep every component, loop and cavity.

medseg takes every hard skeleton (the clDice metric, the Skeleton Recall target, the
cbDice and clCE targets) from :func:`skeletonize`, a topology-preserving thinning in the
C++ engine (``csrc/skeleton.hpp``). scikit-image's ``skeletonize`` is not used: in 3D it
deletes whole objects (scikit-image issue 3757: a straight bar 2, 4 or 6 voxels thick has
an empty skeleton), which makes the clDice of a near-perfect segmentation 0.
"""

from __future__ import annotations

import numpy as np

from medseg.topology import _inputs
from medseg.topology._inputs import TopologyInputError
from medseg.topology.betti_numbers import _check_connectivity, default_connectivity

__all__ = ["skeletonize", "skeletonize_labels"]


def _mask_array(mask, name: str = "mask") -> np.ndarray:
    arr = _inputs.to_numpy(mask, name)
    if arr.ndim not in (2, 3):
        raise TopologyInputError(f"{name}: expected a 2D or 3D mask, got {arr.ndim}D with shape {arr.shape}")
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr).view(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TopologyInputError(f"{name}: expected a binary mask (bool or 0/1), got dtype {arr.dtype}")
    if arr.size and ((arr != 0) & (arr != 1)).any():
        bad = arr[(arr != 0) & (arr != 1)].flat[0].item()
        raise TopologyInputError(
            f"{name}: expected a binary mask (bool or 0/1), found the value {bad!r}; "
            "use skeletonize_labels for a label map"
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)


def skeletonize(mask, connectivity: int | None = None, threads: int | None = None) -> np.ndarray:
    """Topology-preserving skeleton of a 2D or 3D binary mask.

    Parameters
    ----------
    mask : array_like, 2D or 3D
        Binary mask: bool, or integers/floats that are all 0 or 1 (numpy or torch).
    connectivity : int, optional
        Foreground connectivity, 8 or 4 in 2D, 26 or 6 in 3D; the background takes the
        complementary one (4/8, 6/26), as in :func:`medseg.topology.betti_numbers`.
        Default: full (8 in 2D, 26 in 3D).
    threads : int, optional
        CPU threads (default: all cores). The result does not depend on it.

    Returns
    -------
    ndarray of bool, same shape
        The skeleton: a subset of the mask, one voxel thick where the shape allows.

    Raises
    ------
    TopologyInputError (a ValueError)
        A mask that is not 2D or 3D, or not binary (use :func:`skeletonize_labels` for a
        label map); a connectivity that does not fit the dimension.

    Notes
    -----
    Directional thinning by deletion of simple points (Palágyi & Kuba 1998; simple
    points by the topological numbers of Bertrand & Malandain 1994): each sub-iteration
    peels the border on one side (6 directions in 3D, 4 in 2D), deleting a voxel only if
    that changes no component, loop or cavity of the object or of the background, and if
    it is not an end point (one object neighbour), so branches keep their length up to
    about their radius. Guarantees, each checked by property tests:

    - the skeleton is a subset of the mask and has the same Betti numbers (same
      connectivity); every component keeps at least one voxel;
    - it is thin: a 2×2 (2×2×2) block of skeleton voxels remains only where every voxel
      of it is needed, i.e. none of them is simple or each is an end point (for example
      where four diagonal branches meet in 2D, or where a cavity's wall is two voxels
      thick in 3D);
    - thinning a skeleton changes nothing; the result is deterministic, does not depend
      on ``threads``, and moves with the mask (padding or cropping the array around it
      changes nothing).

    With face connectivity (6 in 3D, 4 in 2D) the skeleton is not a clean centre line:
    peeling one side leaves surface voxels with a single face neighbour, which the end
    point rule then keeps, so one-voxel spurs stand on every other slice (a tube 5
    voxels wide: 146 skeleton voxels against 48 at 26-connectivity). The topology is
    right; the shape is not a medial line. ``medseg evaluate`` therefore takes clDice's
    skeleton at full connectivity whatever its evaluation connectivity.

    How it differs from ``skimage.morphology.skeletonize``, besides never deleting an
    object: in 3D scikit-image uses Lee et al.'s 8-subiteration thinning, which has no
    6-connected option and removes the last voxels of bars of even width (2, 4, 6, ...);
    in 2D it uses Zhang & Suen's parallel thinning, which keeps the topology too. Where
    both keep the object, the skeletons are close but not voxel-identical: where a
    structure is an even number of voxels wide there are two middle lines, and each
    method takes its own (one voxel apart), and end points are kept at slightly
    different depths, so short end branches differ by a voxel or two. Hollow shapes (a
    sphere's shell) stay surfaces: a cavity cannot be thinned to a curve without
    changing the topology, and this function never changes it.

    References
    ----------
    K. Palágyi and A. Kuba, "A 3D 6-subiteration thinning algorithm for extracting
    medial lines", Pattern Recognition Letters 19(7), 1998.
    G. Bertrand and G. Malandain, "A new characterization of three-dimensional simple
    points", Pattern Recognition Letters 15(2), 1994.
    T.-C. Lee, R. L. Kashyap and C.-N. Chu, "Building skeleton models via 3-D medial
    surface/axis thinning algorithms", CVGIP: Graphical Models and Image Processing
    56(6), 1994 (the sequential re-check of candidates).

    Examples
    --------
    A bar 4 voxels thick, whose scikit-image 3D skeleton is empty, keeps its centreline:

    >>> bar = np.zeros((24, 24, 24), bool); bar[8:12, 8:12, 2:20] = True
    >>> skel = skeletonize(bar)
    >>> bool(skel.any()), bool((skel <= bar).all())
    (True, True)
    """
    arr = _mask_array(mask)
    connectivity = _check_connectivity(connectivity, arr.ndim)
    threads = _inputs.default_threads(threads)
    out = np.zeros(arr.shape, dtype=bool)
    box = _bounding_box(arr)
    if box is None:
        return out
    # Thinning the mask's own bounding box makes the skeleton move with the mask: the
    # engine orders deletions by the parity of plane indices, which cropping or padding
    # the array would otherwise shift (and the metrics crop).
    full = connectivity == default_connectivity(arr.ndim)
    out[box] = _inputs.engine().skeletonize(np.ascontiguousarray(arr[box]), full, threads).view(bool)
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def skeletonize_labels(label, connectivity: int | None = None, threads: int | None = None) -> np.ndarray:
    """The :func:`skeletonize` skeleton of every class of a label map, as a label map.

    Parameters
    ----------
    label : array_like of int, 2D or 3D
        0 is background; every other value is a class, skeletonised on its own mask.
    connectivity, threads
        As in :func:`skeletonize`.

    Returns
    -------
    ndarray, the input's dtype, same shape
        Class ``c`` on the skeleton of ``label == c``, 0 elsewhere. Skeletons of
        different classes are disjoint because each lies inside its own class.

    Examples
    --------
    >>> lab = np.zeros((9, 12), np.int16); lab[1:4, 1:11] = 1; lab[4:7, 1:11] = 2
    >>> skeletonize_labels(lab)[:, 5].tolist()
    [0, 0, 1, 0, 0, 2, 0, 0, 0]
    """
    lab = _inputs.to_numpy(label, "label")
    if lab.ndim not in (2, 3):
        raise TopologyInputError(f"label: expected a 2D or 3D label map, got {lab.ndim}D with shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        if not np.issubdtype(lab.dtype, np.floating):
            raise TopologyInputError(f"label: expected integer class values, got dtype {lab.dtype}")
        bad = ~np.isfinite(lab) | (lab != np.round(lab))
        if bad.any():
            raise TopologyInputError(f"label: expected integer class values, found the value {lab[bad].flat[0].item()!r}")
    out = np.zeros(lab.shape, dtype=lab.dtype)
    for value in np.unique(lab):
        if value == 0:
            continue
        out[skeletonize(lab == value, connectivity, threads)] = value
    return out

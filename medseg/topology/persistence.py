"""Cubical persistence barcodes of 2D and 3D images.

Conventions (they change the numbers, so they are explicit arguments):

``filtration``
    ``"superlevel"`` (default): cells enter from high to low values, the natural
    question for probabilities and masks (foreground = high). ``"sublevel"``: from low
    to high, the convention of Betti-Matching-3D, CubicalRipser and gudhi.
``construction``
    ``"V"`` (default): values on voxels (vertices of the complex), a cell enters with
    the last of its voxels; for a superlevel question on a mask the foreground is
    4-connected (2D) / 6-connected (3D). ``"T"``: values on top cells (the voxels are
    squares/cubes), a cell enters with the first voxel that contains it; the
    foreground is 8/26-connected. gudhi calls them ``vertices=`` and
    ``top_dimensional_cells=``.

Tie-break. Cells of one dimension are ordered by (value, packed index), the packed
index being lexicographic in (x, y, z, type) (see ``csrc/cells.hpp``); this is the
order of Betti-Matching-3D, so the pairs and their coordinates are the same as the
reference's, ties included. Superlevel filtrations use the same index order with the
values reversed.

Coordinates. Each pair's birth and death are reported as the voxel whose value is the
cell's value: for V the corner of the cell that has the value (the reference's choice
where several do), for T the first voxel containing the cell with that value. The
values are read back from the image at these coordinates, so they are exact and
gradients can be gathered there.

Size limit: at most 1,431,655,765 lattice points per image (about 1100^3), because
a cell's packed index is stored in 32 bits next to its 32-bit value rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medseg.topology import _backends, _inputs
from medseg.topology._backends import Backend

__all__ = ["Barcode", "barcode", "barcode_batch"]


@dataclass(frozen=True)
class Barcode:
    """Persistence pairs of one image, one entry per homology dimension.

    Attributes
    ----------
    births, deaths : tuple of (N_d,) float64 arrays
        Values of the image at the birth and death voxels of the finite pairs.
    birth_coordinates, death_coordinates : tuple of (N_d, ndim) int64 arrays
        The voxels the values are read from.
    essential_births : tuple of (E_d,) float64 arrays
        Births of the classes that never die (their death is +inf for sublevel,
        -inf for superlevel). A box is contractible, so only dimension 0 has one.
    essential_birth_coordinates : tuple of (E_d, ndim) int64 arrays
    filtration, construction : str
        The conventions the barcode was computed with.
    """

    births: tuple[np.ndarray, ...]
    deaths: tuple[np.ndarray, ...]
    birth_coordinates: tuple[np.ndarray, ...]
    death_coordinates: tuple[np.ndarray, ...]
    essential_births: tuple[np.ndarray, ...]
    essential_birth_coordinates: tuple[np.ndarray, ...]
    filtration: str
    construction: str

    @property
    def ndim(self) -> int:
        return len(self.births)

    @property
    def num_pairs(self) -> np.ndarray:
        """Number of finite pairs per dimension."""
        return np.array([len(b) for b in self.births], dtype=np.int64)

    def _dimension(self, dim: int) -> int:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 <= dim < len(self.births):
            raise ValueError(f"dim must be a homology dimension from 0 to {len(self.births) - 1}, got {dim!r}")
        return int(dim)

    def diagram(self, dim: int) -> np.ndarray:
        """(N, 2) array of (birth, death) of the finite pairs of dimension ``dim``."""
        dim = self._dimension(dim)
        return np.stack([self.births[dim], self.deaths[dim]], axis=1)

    def persistence(self, dim: int) -> np.ndarray:
        """|death - birth| of the finite pairs of dimension ``dim``."""
        dim = self._dimension(dim)
        return np.abs(self.deaths[dim] - self.births[dim])


def _values(image: Any, coords: np.ndarray) -> np.ndarray:
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float64)
    if isinstance(image, np.ndarray):
        return image[tuple(coords.T)].astype(np.float64)
    import torch  # a CUDA tensor: gather on its device, bring back the values only

    index = torch.from_numpy(np.ascontiguousarray(coords.T)).to(image.device)
    return image[tuple(index)].to(torch.float64).cpu().numpy()


def _validated(image: Any, name: str, backend: Backend):
    """``image`` checked: a tensor on its device where ``backend`` keeps it there, else a numpy array."""
    return _inputs.as_device_image(image, name) if backend.on_device(image) else _inputs.as_image(image, name)


def _to_barcode(image: np.ndarray, raw: dict, filtration: str, construction: str) -> Barcode:
    ess = raw["essential_birth"]
    ndim = image.ndim
    empty = np.zeros((0, ndim), dtype=np.int64)
    return Barcode(
        births=tuple(_values(image, c) for c in raw["birth"]),
        deaths=tuple(_values(image, c) for c in raw["death"]),
        birth_coordinates=tuple(raw["birth"]),
        death_coordinates=tuple(raw["death"]),
        essential_births=(_values(image, ess),) + tuple(np.zeros(0) for _ in range(ndim - 1)),
        essential_birth_coordinates=(ess,) + tuple(empty for _ in range(ndim - 1)),
        filtration=filtration,
        construction=construction,
    )


def barcode(
    image: Any, filtration: str = "superlevel", construction: str = "V", backend: str | Backend = "auto"
) -> Barcode:
    """Cubical persistence barcode of a 2D or 3D image.

    Parameters
    ----------
    image : array_like, 2D or 3D
        Finite real values (bool/int arrays are accepted; float32 is used as is).
    filtration : {"superlevel", "sublevel"}, default "superlevel"
        Direction in which cells enter (see the module docstring).
    construction : {"V", "T"}, default "V"
        Values on voxels (V) or on top cells (T).
    backend : {"auto", "cpu", "cuda", "cpu-parallel"}, default "auto"
        Engine backend: "auto" is "cpu" (``MEDSEG_TOPOLOGY_BACKEND`` overrides it),
        and "cuda" for a CUDA tensor once ``_backends.CUDA_FOR_AUTO`` is on (off until
        the device code has run on a GPU). On "cuda" a CUDA tensor stays on its device;
        only the pairs' coordinates (and the values there) come back. "cpu-parallel"
        runs the CUDA algorithm on CPU threads (testing). Every backend gives the same
        pairs (``csrc/CUDA.md``).
        A backend already resolved (``_backends.resolve_backend``) is used as is.

    Returns
    -------
    Barcode
        Finite pairs per dimension (values and voxel coordinates) and the essential class.

    Raises
    ------
    ValueError
        (:class:`~medseg.topology._inputs.TopologyInputError`) for NaN/Inf values, an
        empty array, a dimension other than 2 or 3, or an unknown option.
    RuntimeError
        (:class:`~medseg.topology._inputs.TopologyBackendError`) for
        ``backend="cuda"`` where the CUDA backend is not built or has no device.

    Notes
    -----
    Dimension 0 and d-1 are computed by union-find (d-1 on the dual graph), dimension
    1 of 3D images by a reduction of the boundary matrix with clearing and apparent
    pairs. Pairs of zero persistence are not reported.

    Examples
    --------
    >>> import numpy as np
    >>> ring = np.zeros((5, 5)); ring[1:4, 1:4] = 1; ring[2, 2] = 0
    >>> bc = barcode(ring)
    >>> bc.num_pairs.tolist()
    [0, 1]
    >>> bc.diagram(1).tolist()
    [[1.0, 0.0]]
    """
    superlevel = _inputs.check_filtration(filtration)
    _inputs.check_construction(construction)
    backend = _backends.resolve_backend(backend, image)
    img = _validated(image, "image", backend)
    return _to_barcode(img, backend.barcode(img, superlevel, construction, 1), filtration, construction)


def barcode_batch(
    images: Sequence[Any] | np.ndarray,
    filtration: str = "superlevel",
    construction: str = "V",
    threads: int | None = None,
    backend: str | Backend = "auto",
) -> list:
    """Barcodes of a list of images or of a (B, C, ...) array, computed in parallel.

    A list gives a list of :class:`Barcode`; a (B, C, *spatial) array gives a list of B
    lists of C barcodes. ``threads`` defaults to the number of available cores.
    ``backend`` as in :func:`barcode` (the CUDA backend takes the images one by one).
    """
    superlevel = _inputs.check_filtration(filtration)
    _inputs.check_construction(construction)
    first = images[0] if isinstance(images, (list, tuple)) and len(images) else images
    backend = _backends.resolve_backend(backend, first)
    nested, flat = _flatten_on(backend, images)
    imgs = [_validated(x, f"images[{i}]", backend) for i, x in enumerate(flat)]
    raws = backend.barcode_batch(imgs, superlevel, construction, threads)
    return _unflatten([_to_barcode(im, r, filtration, construction) for im, r in zip(imgs, raws)], nested)


def _flatten(batch: Any) -> tuple[tuple[int, int] | None, list]:
    if isinstance(batch, (list, tuple)):
        return None, list(batch)
    arr = _inputs.to_numpy(batch, "images")
    if arr.dtype == object:  # an iterator or generator, a set: not an array of numbers
        raise _inputs.TopologyInputError(
            f"a batch must be a list of images or a (B, C, *spatial) array, got {type(batch).__name__}"
        )
    if arr.ndim not in (4, 5):
        raise _inputs.TopologyInputError(
            f"a batch must be a list of images or a (B, C, *spatial) array, got shape {arr.shape}"
        )
    b, c = arr.shape[:2]
    return (b, c), [arr[i, j] for i in range(b) for j in range(c)]


def _flatten_on(backend: Backend, batch: Any) -> tuple[tuple[int, int] | None, list]:
    """Like _flatten, but a (B, C, ...) CUDA tensor stays on its device where ``backend`` keeps it there."""
    if isinstance(batch, (list, tuple)) or not backend.on_device(batch):
        return _flatten(batch)
    if batch.dim() not in (4, 5):
        raise _inputs.TopologyInputError(
            f"a batch must be a list of images or a (B, C, *spatial) array, got shape {tuple(batch.shape)}"
        )
    b, c = batch.shape[:2]
    return (b, c), [batch[i, j] for i in range(b) for j in range(c)]


def _unflatten(items: list, nested: tuple[int, int] | None) -> list:
    if nested is None:
        return items
    b, c = nested
    return [items[i * c : (i + 1) * c] for i in range(b)]

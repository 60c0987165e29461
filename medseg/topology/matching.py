"""Betti matching between a prediction and a target, and the Betti matching error.

Betti matching (Stucki et al., "Topologically faithful image segmentation via induced
matching of persistence barcodes", ICML 2023; in 3D: Stucki et al., "Efficient Betti
Matching Enables Topology-Aware 3D Segmentation via Persistent Homology", 2024) pairs
the features of a prediction P with the features of a target G that sit at the same
place: both are included in a comparison image C (``comparison="union"``: the
elementwise min of P and G for a sublevel filtration, the max for a superlevel one),
the inclusions induce matchings of the barcodes of P and G with the barcode of C
(through image persistence), and a feature of P is matched with a feature of G when
both are matched with the same feature of C. ``comparison="intersection"`` uses the
elementwise max (sublevel) / min (superlevel) instead, which is included in both.

The loss of a matching is::

    sum over matched (p, g):      2 * ((b_p - b_g)^2 + (d_p - d_g)^2)
  + sum over unmatched p and g:   (b - d)^2

with births b and deaths d read from P and G at the voxels the engine returns. With
``filtration="sublevel", construction="V"`` the results are those of Betti-Matching-3D
(the reference implementation), ties included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.topology import _backends, _inputs
from medseg.topology._backends import Backend
from medseg.topology.persistence import _flatten_on, _unflatten
from medseg.topology.persistence import _values as _values_any

__all__ = [
    "BettiMatching",
    "betti_matching",
    "betti_matching_batch",
    "betti_matching_error",
    "betti_matching_error_batch",
]


@dataclass(frozen=True)
class BettiMatching:
    """A Betti matching between a prediction and a target, per homology dimension.

    Every ``*_coordinates`` attribute is a tuple with one (N_d, ndim) int64 array per
    dimension; the matching attributes are aligned (row i of the prediction's matched
    arrays is matched with row i of the target's). The ``*_births``/``*_deaths``
    attributes hold the values at those coordinates (float64).

    Attributes
    ----------
    num_matched, num_unmatched_prediction, num_unmatched_target : (ndim,) int64 arrays
        Counts per dimension (the unmatched counts are given even when the
        corresponding coordinates were not requested).
    """

    num_matched: np.ndarray
    num_unmatched_prediction: np.ndarray
    num_unmatched_target: np.ndarray
    matched_prediction_birth_coordinates: tuple[np.ndarray, ...]
    matched_prediction_death_coordinates: tuple[np.ndarray, ...]
    matched_target_birth_coordinates: tuple[np.ndarray, ...]
    matched_target_death_coordinates: tuple[np.ndarray, ...]
    unmatched_prediction_birth_coordinates: tuple[np.ndarray, ...]
    unmatched_prediction_death_coordinates: tuple[np.ndarray, ...]
    unmatched_target_birth_coordinates: tuple[np.ndarray, ...]
    unmatched_target_death_coordinates: tuple[np.ndarray, ...]
    matched_prediction_births: tuple[np.ndarray, ...]
    matched_prediction_deaths: tuple[np.ndarray, ...]
    matched_target_births: tuple[np.ndarray, ...]
    matched_target_deaths: tuple[np.ndarray, ...]
    unmatched_prediction_births: tuple[np.ndarray, ...]
    unmatched_prediction_deaths: tuple[np.ndarray, ...]
    unmatched_target_births: tuple[np.ndarray, ...]
    unmatched_target_deaths: tuple[np.ndarray, ...]
    filtration: str
    construction: str

    @property
    def ndim(self) -> int:
        return len(self.num_matched)

    def loss_per_dim(self) -> np.ndarray:
        """The Betti matching loss of each dimension (float64 array of length ndim).

        Unmatched pairs that were not requested (``include_unmatched_*=False``) do not
        contribute.
        """
        out = np.zeros(self.ndim, dtype=np.float64)
        for d in range(self.ndim):
            matched = ((self.matched_prediction_births[d] - self.matched_target_births[d]) ** 2).sum() + (
                (self.matched_prediction_deaths[d] - self.matched_target_deaths[d]) ** 2
            ).sum()
            unmatched = ((self.unmatched_prediction_births[d] - self.unmatched_prediction_deaths[d]) ** 2).sum()
            unmatched += ((self.unmatched_target_births[d] - self.unmatched_target_deaths[d]) ** 2).sum()
            out[d] = 2.0 * matched + unmatched
        return out

    def loss(self, dims: int | Iterable[int] | None = None) -> float:
        """Sum of :meth:`loss_per_dim` over ``dims`` (default: all dimensions)."""
        per_dim = self.loss_per_dim()
        if dims is None:
            return float(per_dim.sum())
        if isinstance(dims, (int, np.integer)) and not isinstance(dims, (bool, np.bool_)):
            dims = [int(dims)]
        elif isinstance(dims, (bool, np.bool_, str, bytes)) or not isinstance(dims, Iterable):
            dims = [dims]  # refused below, naming it (True was dimension 1, 0.0 a TypeError)
        dims = list(dims)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < self.ndim for d in dims) \
                or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct dimensions from 0 to {self.ndim - 1}, got {dims}")
        return float(sum(per_dim[d] for d in dims))

    @property
    def error(self) -> np.ndarray:
        """Betti matching error per dimension: unmatched features of both sides."""
        return self.num_unmatched_prediction + self.num_unmatched_target


def _to_matching(
    pred: np.ndarray, target: np.ndarray, raw: dict, filtration: str, construction: str, shape: tuple | None
) -> BettiMatching:
    """The result of one pair; ``pred``/``target``: the images the engine saw (padded
    when relative, ``shape`` then the unpadded shape). Values are read there, so a cell
    on the padding has the padding's value; its coordinates are clipped to the image."""

    def coords(key: str) -> tuple[np.ndarray, ...]:
        arrays = raw[key]
        if shape is not None:  # relative: back from the padded frame
            arrays = [_inputs.unpad(a, shape) for a in arrays]
        return tuple(arrays)

    c = {k: coords(k) for k in raw if k.startswith(("matched", "unmatched"))}
    engine_frame = {k: tuple(raw[k]) for k in c}
    names = {
        "matched_a": ("matched_prediction", pred),
        "matched_b": ("matched_target", target),
        "unmatched_a": ("unmatched_prediction", pred),
        "unmatched_b": ("unmatched_target", target),
    }
    kwargs: dict[str, Any] = {}
    for short, (long, image) in names.items():
        births, deaths = c[short + "_birth"], c[short + "_death"]
        kwargs[long + "_birth_coordinates"] = births
        kwargs[long + "_death_coordinates"] = deaths
        kwargs[long + "_births"] = tuple(_values_any(image, x) for x in engine_frame[short + "_birth"])
        kwargs[long + "_deaths"] = tuple(_values_any(image, x) for x in engine_frame[short + "_death"])
    return BettiMatching(
        num_matched=np.array([len(x) for x in c["matched_a_birth"]], dtype=np.int64),
        num_unmatched_prediction=np.asarray(raw["num_unmatched_a"], dtype=np.int64).copy(),
        num_unmatched_target=np.asarray(raw["num_unmatched_b"], dtype=np.int64).copy(),
        filtration=filtration,
        construction=construction,
        **kwargs,
    )


def _prepare(prediction, target, filtration, construction, comparison, relative, backend: Backend):
    """(superlevel, p, t, shape): numpy arrays, or tensors on their device when
    ``backend`` keeps a CUDA input there."""
    superlevel = _inputs.check_filtration(filtration)
    _inputs.check_construction(construction)
    _inputs.check_comparison(comparison)
    _inputs.check_flag("relative", relative)
    on_device = backend.on_device(prediction, target)
    if on_device:
        p, t = _inputs.as_device_pair(prediction, target)
    else:
        p, t = _inputs.as_pair(prediction, target)
    shape = None
    if relative:
        shape = tuple(p.shape)
        p, t = (_inputs.pad_relative_device if on_device else _inputs.pad_relative)([p, t], superlevel)
    return superlevel, p, t, shape


def _resolve_batch(backend: str | Backend, predictions, targets):
    """(backend, (layout, items) of predictions, same of targets) of a batch: the backend
    resolved from its first pair; CUDA tensors are kept as tensors where it keeps them."""

    def first(x):
        return x[0] if isinstance(x, (list, tuple)) and len(x) else x

    backend = _backends.resolve_backend(backend, first(predictions), first(targets))
    return backend, _flatten_on(backend, predictions), _flatten_on(backend, targets)


def _intersection(comparison: str) -> bool:
    return _inputs.check_comparison(comparison)


def betti_matching(
    prediction: Any,
    target: Any,
    filtration: str = "superlevel",
    construction: str = "V",
    comparison: str = "union",
    relative: bool = False,
    include_unmatched_prediction: bool = True,
    include_unmatched_target: bool = True,
    threads: int | None = 1,
    backend: str | Backend = "auto",
) -> BettiMatching:
    """Betti matching between a prediction and a target image.

    Parameters
    ----------
    prediction, target : array_like, 2D or 3D, same shape
        Likelihoods / intensities (any finite real values).
    filtration : {"superlevel", "sublevel"}, default "superlevel"
        Direction of the filtration; ``"sublevel"`` is the reference's convention
        (whose superlevel results are obtained by passing ``1 - x``).
    construction : {"V", "T"}, default "V"
        Values on voxels or on top cells (see :mod:`medseg.topology.persistence`).
    comparison : {"union", "intersection"}, default "union"
        Comparison image C: the union of the two filtrations (elementwise min for
        sublevel, max for superlevel; both images are included in C, as in the paper
        and the reference) or their intersection (max for sublevel, min for
        superlevel; C is included in both). With the intersection the inclusions
        point the other way: a pair of an image is matched with a pair of C through
        the image of C in it (same birth in C, same death in the image), and two pairs
        are matched when they are matched with the same pair of C.
    relative : bool, default False
        Compute persistence relative to the image border: both images are padded by
        one voxel that enters the filtration first, so structures are closed off by
        the border (a vessel crossing the image forms a loop with it) and components
        touching the border merge with it. Coordinates refer to the unpadded images: a
        pair born or dying on the padding is reported at the nearest voxel of the
        image, with the padding's value (the largest value of the two images for
        superlevel, the smallest for sublevel), as the loss reads it.
    include_unmatched_prediction, include_unmatched_target : bool, default True
        Whether to return (and count in :meth:`BettiMatching.loss`) the unmatched
        pairs of each side; the counts are always returned.
    threads : int or None, default 1
        Threads used inside this one computation (None: all available cores).
    backend : {"auto", "cpu", "cuda", "cpu-parallel"}, default "auto"
        As in :func:`medseg.topology.barcode`: ``"cpu"`` is the sequential engine,
        ``"cuda"`` the data-parallel matching on the device (spanning forests and
        apparent pairs on the GPU, the remaining elder-rule passes and column
        reductions on the host; a CUDA tensor stays on its device and only
        coordinates and values come back), ``"cpu-parallel"`` the same algorithm on
        CPU threads. Every backend gives the same result, bit for bit (order
        included), for both comparisons (see ``csrc/CUDA.md``). A backend already
        resolved (``_backends.resolve_backend``) is used as is.

    Returns
    -------
    BettiMatching

    Raises
    ------
    ValueError
        For NaN/Inf values, empty arrays, shapes that differ or are not 2D/3D, and
        unknown options.

    Examples
    --------
    >>> import numpy as np
    >>> target = np.zeros((8, 8)); target[2:6, 2:6] = 1
    >>> pred = np.zeros((8, 8)); pred[2:6, 2:6] = 0.8; pred[3:5, 3:5] = 0.3
    >>> m = betti_matching(pred, target)
    >>> m.num_matched.tolist(), m.num_unmatched_prediction.tolist()
    ([0, 0], [0, 1])
    >>> round(m.loss(), 6)
    0.25
    """
    backend = _backends.resolve_backend(backend, prediction, target)
    superlevel, p, t, shape = _prepare(prediction, target, filtration, construction, comparison, relative, backend)
    args = (
        superlevel,
        construction,
        _inputs.check_flag("include_unmatched_prediction", include_unmatched_prediction),
        _inputs.check_flag("include_unmatched_target", include_unmatched_target),
        _inputs.default_threads(threads),
        _intersection(comparison),
    )
    raw = backend.matching(p, t, *args)
    return _to_matching(p, t, raw, filtration, construction, shape)


def _check_layouts(nested_p, flat_p: list, nested_t, flat_t: list) -> None:
    """Refuse predictions and targets batched differently ((B, C) against (C, B), or other counts)."""
    if nested_p != nested_t or len(flat_p) != len(flat_t):
        raise _inputs.TopologyInputError(
            f"predictions and targets differ in batch layout: {nested_p or len(flat_p)} vs "
            f"{nested_t or len(flat_t)}"
        )


def betti_matching_batch(
    predictions: Sequence[Any] | np.ndarray,
    targets: Sequence[Any] | np.ndarray,
    filtration: str = "superlevel",
    construction: str = "V",
    comparison: str = "union",
    relative: bool = False,
    include_unmatched_prediction: bool = True,
    include_unmatched_target: bool = True,
    threads: int | None = None,
    backend: str | Backend = "auto",
) -> list:
    """:func:`betti_matching` of many pairs, in parallel threads (the GIL is released).

    ``predictions`` and ``targets`` are lists of images (giving a list of results) or
    (B, C, *spatial) arrays (giving B lists of C results). ``threads`` defaults to the
    number of available cores; pairs are spread over them. ``backend`` as in
    :func:`betti_matching`; on ``"cuda"`` the pairs run on several CUDA streams (and a
    (B, C, ...) CUDA tensor stays on its device).
    """
    backend, (nested_p, flat_p), (nested_t, flat_t) = _resolve_batch(backend, predictions, targets)
    _check_layouts(nested_p, flat_p, nested_t, flat_t)
    if not flat_p:  # a (B, 0, ...) batch is B empty lists, as barcode_batch gives
        return _unflatten([], nested_p)
    prepared = [
        _prepare(p, t, filtration, construction, comparison, relative, backend) for p, t in zip(flat_p, flat_t)
    ]
    superlevel = prepared[0][0]
    raws = backend.matching_batch(
        [x[1] for x in prepared],
        [x[2] for x in prepared],
        superlevel,
        construction,
        _inputs.check_flag("include_unmatched_prediction", include_unmatched_prediction),
        _inputs.check_flag("include_unmatched_target", include_unmatched_target),
        _inputs.default_threads(threads),
        _intersection(comparison),
    )
    out = []
    for (_, p, t, shape), raw in zip(prepared, raws):
        out.append(_to_matching(p, t, raw, filtration, construction, shape))
    return _unflatten(out, nested_p)


def _binary(mask: Any, name: str, backend: Backend):
    if backend.on_device(mask):  # stays on its device
        import torch

        return (_inputs.as_device_image(mask, name) > 0).to(torch.float32)
    arr = _inputs.as_image(mask, name)
    return (arr > 0).astype(np.float32)


def betti_matching_error(
    pred_mask: Any,
    target_mask: Any,
    filtration: str = "superlevel",
    construction: str = "V",
    comparison: str = "union",
    relative: bool = False,
    backend: str | Backend = "auto",
    threads: int | None = None,
) -> np.ndarray:
    """Betti matching error of two binary masks: unmatched features per dimension.

    The masks are binarised (> 0 is foreground); with the default superlevel
    filtration the features are those of the foreground (4/6-connected for the V
    construction, 8/26-connected for T). Returns an int64 array with, per dimension,
    the number of unmatched features of the prediction plus those of the target.
    ``backend`` as in :func:`betti_matching`; ``threads`` inside this one computation
    (default None: all available cores).

    Only finite features count: the one component of each mask's filtration that never
    dies (the essential class of dimension 0, which every image has, empty or not) is
    not matched and not counted, as in the reference implementation (Betti-Matching-3D)
    and the papers that report this error. So a single blob against an empty target, or
    two single blobs that do not overlap, have error 0 in dimension 0; the Betti number
    error (:func:`medseg.topology.betti_numbers`) counts the first, Dice the second.
    ``relative=True`` turns the border into part of every component's history, so a
    blob that does not touch it becomes a finite feature.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((9, 9)); a[1:4, 1:4] = 1; a[6:8, 6:8] = 1
    >>> betti_matching_error(a, a).tolist()
    [0, 0]
    """
    backend = _backends.resolve_backend(backend, pred_mask, target_mask)
    m = betti_matching(
        _binary(pred_mask, "pred_mask", backend),
        _binary(target_mask, "target_mask", backend),
        filtration=filtration,
        construction=construction,
        comparison=comparison,
        relative=relative,
        include_unmatched_prediction=False,
        include_unmatched_target=False,
        threads=threads,
        backend=backend,
    )
    return m.error


def betti_matching_error_batch(
    pred_masks: Sequence[Any] | np.ndarray,
    target_masks: Sequence[Any] | np.ndarray,
    filtration: str = "superlevel",
    construction: str = "V",
    comparison: str = "union",
    relative: bool = False,
    threads: int | None = None,
    backend: str | Backend = "auto",
) -> np.ndarray:
    """:func:`betti_matching_error` of many pairs: an (N, ndim) or (B, C, ndim) array.
    ``backend`` as in :func:`betti_matching_batch`."""
    backend, (nested, flat_p), (nested_t, flat_t) = _resolve_batch(backend, pred_masks, target_masks)
    # checked here: the flat lists handed on below would pair a (2, 3) batch with a (3, 2) one
    _check_layouts(nested, flat_p, nested_t, flat_t)
    preds = [_binary(x, f"pred_masks[{i}]", backend) for i, x in enumerate(flat_p)]
    if not preds:  # an empty batch: no row, each of the inputs' spatial dimensions wide
        total = getattr(pred_masks, "ndim", None)  # an array's or tensor's; a list says nothing
        spatial = max(total - (len(nested) if nested is not None else 1), 0) if isinstance(total, int) else 0
        return np.zeros((*(nested if nested is not None else (0,)), spatial), dtype=np.int64)
    dims = sorted({p.ndim for p in preds})
    if len(dims) > 1:  # the result has one row of ndim errors per pair
        first = [next(i for i, p in enumerate(preds) if p.ndim == d) for d in dims]
        raise _inputs.TopologyInputError(
            f"pred_masks: pairs of {' and '.join(f'{d}D' for d in dims)} images in one batch (pairs "
            f"{', '.join(map(str, first))}); the errors are one array row per pair, so call "
            "betti_matching_error_batch once per dimension (betti_matching_batch takes mixed batches)"
        )
    results = betti_matching_batch(
        preds,
        [_binary(x, f"target_masks[{i}]", backend) for i, x in enumerate(flat_t)],
        filtration=filtration,
        construction=construction,
        comparison=comparison,
        relative=relative,
        include_unmatched_prediction=False,
        include_unmatched_target=False,
        threads=threads,
        backend=backend,
    )
    errors = np.array([r.error for r in results], dtype=np.int64)
    if nested is not None:
        errors = errors.reshape(nested + (-1,))
    return errors


# ------------------------------------------------------------------ for the loss


def _prepare_targets(targets: list[np.ndarray], superlevel: bool, construction: str, threads: int | None) -> list:
    """Engine handles of the targets' own barcodes, reusable by :func:`_raw_matchings`
    and :func:`_matching_indices` (the CPU backend's)."""
    imgs = [_inputs.as_image(t, "target") for t in targets]
    return _inputs.engine().prepare_batch(imgs, superlevel, construction, _inputs.default_threads(threads))


def _validated_pairs(backend: Backend, predictions: list, targets: list) -> list[tuple]:
    """The (prediction, target) pairs checked and converted for ``backend`` (CUDA inputs
    stay on their device where it keeps them there)."""
    pair = _inputs.as_device_pair if backend.on_device(*predictions[:1]) else _inputs.as_pair
    return [pair(p, t) for p, t in zip(predictions, targets)]


def _raw_matchings(
    predictions: list[np.ndarray],
    targets: list[np.ndarray],
    superlevel: bool,
    construction: str,
    relative: bool,
    include_unmatched_target: bool = True,
    threads: int | None = None,
    prepared: list | None = None,
    comparison: str = "union",
    backend: str | Backend = "auto",
    unpad: bool = True,
) -> list[dict]:
    """Coordinates only (no values), straight from the engine, one dict per pair.

    On ``backend="cuda"`` CUDA tensors stay on their device; ``prepared`` targets (the
    CPU engine's cache) are used where ``backend.takes_prepared_targets``. ``relative``
    with ``unpad=False``: coordinates in the padded frame (one more voxel on each side)."""
    backend = _backends.resolve_backend(backend, *predictions[:1])
    pairs = _validated_pairs(backend, predictions, targets)
    shape = None
    if relative:
        shape = tuple(pairs[0][0].shape)
        pad = _inputs.pad_relative_device if backend.on_device(*predictions[:1]) else _inputs.pad_relative
        pairs = [tuple(pad(list(pt), superlevel)) for pt in pairs]
        prepared = None
    raws = backend.matching_batch(
        [p for p, _ in pairs],
        [t for _, t in pairs],
        superlevel,
        construction,
        True,
        bool(include_unmatched_target),
        _inputs.default_threads(threads),
        _intersection(comparison),
        prepared,
    )
    if shape is not None and unpad:
        for raw in raws:
            for k in raw:
                if k.startswith(("matched", "unmatched")):
                    raw[k] = [_inputs.unpad(a, shape) for a in raw[k]]
    return raws


def _matching_indices(
    predictions: list,
    targets: list,
    superlevel: bool,
    construction: str,
    relative: bool,
    threads: int | None = None,
    prepared: list | None = None,
    comparison: str = "union",
    backend: str | Backend = "auto",
    report_target: bool = True,
) -> tuple:
    """The loss's fast path: :meth:`Backend.matching_batch_indices` of validated pairs
    of one shape (every unmatched pair included). ``relative``: the images are padded
    here and the indices refer to the padded images (shape + 2 on every axis), where
    the cells on the padding have the padding's value
    (:func:`medseg.topology._inputs.relative_padding_value`)."""
    backend = _backends.resolve_backend(backend, *predictions[:1])
    if relative:
        raws = _raw_matchings(predictions, targets, superlevel, construction, True, True, threads,
                              comparison=comparison, backend=backend, unpad=False)
        padded = tuple(int(n) + 2 for n in predictions[0].shape)
        index_a, sizes_a, index_b, sizes_b = _backends.flat_batch_indices(raws, padded)
        return index_a, sizes_a, index_b if report_target else None, sizes_b
    pairs = _validated_pairs(backend, predictions, targets)
    return backend.matching_batch_indices(
        [p for p, _ in pairs],
        [t for _, t in pairs],
        superlevel,
        construction,
        _inputs.default_threads(threads),
        _intersection(comparison),
        prepared,
        report_target,
    )

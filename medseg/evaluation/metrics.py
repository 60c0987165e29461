"""Per-label metrics of a predicted mask against a reference mask: a registry.

Every metric is a function ``fn(pred, ref, context) -> {name: value}`` over two
boolean arrays of the same spatial shape (one label, one case). ``medseg evaluate``
calls every function in :data:`LABEL_METRICS`; adding a metric is one entry::

    @register_metric("my_metric")
    def my_metric(pred, ref, context):
        return {"my_metric": ...}

Conventions for empty masks follow nnU-Net where it has one and are recorded in
``summary.json`` under ``conventions`` (see :data:`CONVENTIONS`):

* Dice (and IoU) are NaN when reference and prediction are both empty; nnU-Net
  does the same, and the summary's means skip NaN (``np.nanmean``).
* HD95 is NaN when both are empty, and the largest possible distance (the
  diagonal of the image in mm) when exactly one is empty, so a missed or
  hallucinated structure is penalised instead of silently skipped.
* Normalised surface Dice (NSD) is NaN when both are empty and 0 when exactly one is.
* Betti number errors are always defined (an empty mask has all Betti numbers 0).
* The relative volume difference is NaN when the reference is empty.

``--metrics`` chooses entries of the registry by name (:func:`resolve_metrics`); the
confusion counts (TP, FP, FN, TN, ``n_pred``, ``n_ref``) are always computed, since the
summary's empty-case lists need them. A metric may need something that is not always
there (clDice and the Betti matching error need medseg's C++ topology engine):
:func:`unavailable_metrics` says which cannot be computed here and why; one named in
``--metrics`` is then an error, one of the defaults is skipped and reported.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage

from medseg.errors import ArgumentError, DataError, MedsegError
from medseg.evaluation.summary import DEFAULT_TOLERANCE_MM  # defined with the other defaults of the commands
from medseg.memory import memory_limit_bytes, resident_bytes
from medseg.topology.betti_numbers import betti_numbers, default_connectivity

__all__ = [
    "MetricContext",
    "LABEL_METRICS",
    "METRIC_ALIASES",
    "CONVENTIONS",
    "DEFAULT_TOLERANCE_MM",
    "register_metric",
    "resolve_metrics",
    "unavailable_metrics",
    "compute_label_metrics",
    "matching_construction",
]



@dataclass(frozen=True)
class MetricContext:
    """What a metric may need besides the two masks.

    spacing: voxel spacing in mm per array axis (from the reference geometry).
    connectivity: foreground connectivity for topology metrics (8/4 in 2D, 26/6 in
        3D); ``None`` is full connectivity.
    shape: the image's full shape. Metrics receive the masks cropped to the bounding
        box of both foregrounds plus one background voxel (which changes no overlap,
        distance or topology value and keeps large scans cheap); counts of the whole
        image (TN, the image diagonal) use this.
    tolerance_mm: tolerance of the normalised surface Dice: a boundary voxel of one
        mask agrees when it lies within this distance of the other's boundary.
    ignored: voxels under the ignore label, which count in no class (TN leaves them
        out, as nnU-Net's ``compute_tp_fp_fn_tn`` does).
    voxel_size: volume (area in 2D) of one voxel, mm³ (ImageGeometry.voxel_size); None:
        the product of ``spacing``. They differ for sheared axes (gantry tilt), where the
        distances (HD95, NSD) still treat the axes as orthogonal, as MONAI's do.
    """

    spacing: tuple[float, ...]
    connectivity: int | None = None
    shape: tuple[int, ...] | None = None
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    ignored: int = 0
    voxel_size: float | None = None


MetricFn = Callable[[np.ndarray, np.ndarray, MetricContext], dict[str, float]]

LABEL_METRICS: dict[str, MetricFn] = {}

_REQUIREMENTS: dict[str, Callable[[], str | None]] = {}
"""Per registry entry, a check that returns why the metric cannot be computed here (None: it can)."""

METRIC_ALIASES = {"overlap": ("dice", "iou"), "nsd": ("surface_dice",), "bme": ("betti_matching",)}
"""Other names ``--metrics`` accepts, and the registry entries they stand for."""

CONVENTIONS = {
    "dice_both_empty": "NaN (as nnU-Net); means skip NaN; the same for IoU, NSD and clDice",
    "foreground_mean": "the mean over labels of each label's mean, skipping NaN: a label absent from every "
    "reference and prediction has NaN overlap means (left out of foreground_mean, where nnU-Net's np.mean "
    "would give NaN) and topology errors of 0 (counted in it)",
    "hd95_both_empty": "NaN",
    "hd95_one_empty": "image diagonal in mm (largest possible distance)",
    "nsd": "normalised surface Dice (MONAI compute_surface_dice, boundary voxels, spacing-aware) at "
    "nsd_tolerance_mm; 0 when exactly one mask is empty",
    "betti_error": "|beta_k(pred) - beta_k(ref)| per dimension k; betti_error is their sum",
    "betti_matching_error": "unmatched features per dimension k (superlevel filtration of the binary masks: "
    "foreground enters first; comparison image the union; construction T for 8/26-, V for 4/6-connectivity); "
    "finite features only: the component of each mask that never dies is not counted (as in Betti-Matching-3D), "
    "so one blob against an empty reference has error 0 while its betti_0_error is 1; "
    "on binary masks every voxel of a mask ties with the others, and ties are broken by voxel index, so a "
    "flipped or transposed pair of masks can have another matching and error (as in Betti-Matching-3D, which "
    "gives the same numbers): compare errors of images stored in one orientation; "
    "left out, and listed under metrics_skipped, when the topology engine is not built",
    "components": "connected components of the foreground at the evaluation connectivity",
    "cldice_skeleton": "medseg.topology.skeletonize at full connectivity (26 in 3D, 8 in 2D) whatever the "
    "evaluation connectivity (at 6/4 its thinning keeps one-voxel spurs that would lower clDice): "
    "topology-preserving directional thinning (Palagyi & Kuba 1998; simple points by Bertrand & Malandain 1994) "
    "that keeps end points and never loses a component, loop or cavity (scikit-image's 3D skeletonize deletes "
    "even-width bars)",
    "volume_difference": "volume_pred - volume_ref in mm^3 (2D images: areas in mm^2, in the same *_mm3 "
    "columns); relative: divided by volume_ref (NaN if empty)",
}


def register_metric(name: str, requires: Callable[[], str | None] | None = None) -> Callable[[MetricFn], MetricFn]:
    """Add ``fn`` to :data:`LABEL_METRICS` under ``name`` (decorator).

    ``requires``: a check returning why the metric cannot be computed here (a missing
    extension, say), or None when it can; see :func:`unavailable_metrics`.
    """

    def add(fn: MetricFn) -> MetricFn:
        LABEL_METRICS[name] = fn
        if requires is not None:
            _REQUIREMENTS[name] = requires
        else:
            _REQUIREMENTS.pop(name, None)
        return fn

    return add


def _topology_engine_missing() -> str | None:
    """Why medseg's C++ topology engine cannot be imported, or None when it can."""
    from medseg.topology import _inputs

    try:
        _inputs.engine()
    except ImportError as err:
        return str(err)
    return None


def unavailable_metrics(names: Iterable[str]) -> dict[str, str]:
    """The registry entries among ``names`` that cannot be computed here, with the reason.

    Examples
    --------
    >>> unavailable_metrics(["dice", "iou"])
    {}
    """
    out = {}
    for name in names:
        check = _REQUIREMENTS.get(name)
        reason = check() if check is not None else None
        if reason:
            out[name] = reason
    return out


def _as_batch(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def matching_construction(connectivity: int | None) -> str:
    """The cubical construction whose superlevel features are those of ``connectivity``.

    T (voxels as closed cubes) for full connectivity (8/26, also ``None``), V (voxels
    as vertices) for face connectivity (4/6): the Betti matching then counts the same
    components, loops and cavities as :func:`medseg.topology.betti_numbers`.
    """
    return "T" if connectivity in (None, 8, 26) else "V"


def confusion_counts(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, int]:
    """TP, FP, FN, TN and the two foreground sizes, as nnU-Net reports them (always computed)."""
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    size = int(np.prod(context.shape)) if context.shape is not None else pred.size
    tn = int(size - context.ignored - tp - fp - fn)
    return {"TP": tp, "FP": fp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn}


@register_metric("dice")
def dice(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Dice coefficient (MONAI ``compute_dice``); NaN when both masks are empty."""
    from monai.metrics import compute_dice

    if not pred.any() and not ref.any():
        return {"Dice": math.nan}
    return {"Dice": float(compute_dice(_as_batch(pred), _as_batch(ref), include_background=True, ignore_empty=False)[0, 0])}


@register_metric("iou")
def iou(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Intersection over union (Jaccard index) ``|P & R| / |P | R|``; NaN when both are empty."""
    union = int(np.count_nonzero(pred | ref))
    return {"IoU": int(np.count_nonzero(pred & ref)) / union if union else math.nan}


@register_metric("hd95")
def hd95(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI, spacing-aware)."""
    from monai.metrics import compute_hausdorff_distance

    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"HD95": math.nan}
    if has_pred != has_ref:
        shape = context.shape if context.shape is not None else pred.shape
        extent = np.asarray(shape, dtype=float) * np.asarray(context.spacing, dtype=float)
        return {"HD95": float(np.linalg.norm(extent))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(
            _as_batch(pred),
            _as_batch(ref),
            include_background=True,
            percentile=95,
            spacing=list(context.spacing),
        )
    return {"HD95": float(value[0, 0])}


@register_metric("surface_dice")
def surface_dice(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Normalised surface Dice at ``context.tolerance_mm`` (MONAI ``compute_surface_dice``).

    The share of boundary voxels of both masks that lie within the tolerance of the
    other mask's boundary (Nikolov et al. 2021), distances in mm. NaN when both masks
    are empty, 0 when exactly one is.
    """
    from monai.metrics import compute_surface_dice

    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"NSD": math.nan}
    if has_pred != has_ref:
        return {"NSD": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            _as_batch(pred),
            _as_batch(ref),
            class_thresholds=[float(context.tolerance_mm)],
            include_background=True,
            spacing=list(context.spacing),
        )
    return {"NSD": float(value[0, 0])}


@register_metric("betti")
def betti_errors(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Betti numbers of both masks and their absolute differences per dimension."""
    b_pred = betti_numbers(pred, connectivity=context.connectivity)
    b_ref = betti_numbers(ref, connectivity=context.connectivity)
    out: dict[str, float] = {}
    for k, (p, r) in enumerate(zip(b_pred.tolist(), b_ref.tolist())):
        out[f"betti_{k}_pred"] = p
        out[f"betti_{k}_ref"] = r
        out[f"betti_{k}_error"] = abs(p - r)
    out["betti_error"] = int(np.abs(b_pred - b_ref).sum())
    return out


@register_metric("cldice", requires=_topology_engine_missing)
def cldice(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Centreline Dice (:func:`medseg.evaluation.cldice_metric.cldice_metric`); NaN when both are empty, as Dice."""
    try:
        from medseg.evaluation.cldice_metric import cldice_metric
    except ImportError:
        return {}
    if not pred.any() and not ref.any():
        return {"clDice": math.nan}
    # the full-connectivity skeleton whatever the evaluation connectivity: thinning with
    # 6-/4-connected foreground keeps one-voxel spurs on flat surfaces, which fall outside
    # the other mask (a tube against itself shifted by one voxel: 0.615 instead of 1.0);
    # clDice measures how much of a centre line lies in the other mask, not its topology
    return {"clDice": float(cldice_metric(pred, ref, connectivity=None))}


#: Peak memory of the Betti matching error per voxel of the masks' bounding box, by the
#: number of dimensions (the engine's three complexes: cell ranks, sorted cells,
#: union-find forests and, in 3D, the dimension-1 reductions' row orders). Measured on
#: vessel-like masks: 3D at 128^3 and 192^3, 453 bytes (V construction) and 470-474 (T);
#: 2D at 2048^2, 209 (V) and 256 (T).
BETTI_MATCHING_BYTES_PER_VOXEL = {2: 260, 3: 480}


def matching_bytes(shape: tuple[int, ...]) -> float:
    """The Betti matching's peak memory for masks whose box has ``shape``
    (:data:`BETTI_MATCHING_BYTES_PER_VOXEL`)."""
    return BETTI_MATCHING_BYTES_PER_VOXEL[len(shape)] * float(np.prod(shape))


def matching_fits(shape: tuple[int, ...]) -> bool:
    """Whether the Betti matching of masks whose box has ``shape`` fits in 90 % of this
    machine's memory (:func:`memory_limit_bytes`) beside what this process holds."""
    limit = memory_limit_bytes()
    return limit is None or matching_bytes(shape) + resident_bytes() <= 0.9 * limit


def check_matching_memory(shape: tuple[int, ...]) -> None:
    """Refuse, in one line, a box whose Betti matching cannot fit in this machine's memory
    beside what this process already holds (the kernel would kill the worker after
    minutes of work).

    Raises
    ------
    DataError
        Naming the box, the memory it needs and the memory there is.
    """
    if matching_fits(shape):
        return
    limit, need, held = memory_limit_bytes() or 0, matching_bytes(shape), resident_bytes()
    raise DataError(
        f"betti_matching: the masks' bounding box of {'x'.join(map(str, shape))} voxels needs about "
        f"{need / 2**30:.1f} GB besides the {held / 2**30:.1f} GB this process holds, more than 90 % of the "
        f"{limit / 2**30:.1f} GB of memory here; leave it out with --metrics (e.g. --metrics "
        "dice,hd95,betti,cldice) or evaluate on a machine with more memory"
    )


@register_metric("betti_matching", requires=_topology_engine_missing)
def betti_matching(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Betti matching error (Stucki et al. 2023): unmatched features per dimension.

    The cubical construction follows the connectivity: T (closed voxel cubes) for 8/26,
    V (voxels as vertices) for 4/6, so it counts the same features as the Betti errors.
    Left out (no keys) when medseg's C++ topology engine is not built.
    """
    try:
        from medseg.topology import _engine  # noqa: F401  (ImportError when the engine is not built)
        from medseg.topology import betti_matching_error

        if np.array_equal(pred, ref):  # every feature is matched with itself: skip the costly part
            unmatched = np.zeros(pred.ndim, dtype=np.int64)
        else:  # compute_label_metrics checked the memory it needs, before the other metrics
            unmatched = betti_matching_error(pred, ref, construction=matching_construction(context.connectivity))
    except ImportError:
        return {}
    unmatched = np.asarray(unmatched, dtype=float).ravel()
    out = {f"betti_matching_{k}_error": float(v) for k, v in enumerate(unmatched)}
    out["betti_matching_error"] = float(unmatched.sum())
    return out


@register_metric("components")
def components(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Number of connected foreground components of prediction and reference."""
    ndim = pred.ndim
    connectivity = context.connectivity if context.connectivity is not None else default_connectivity(ndim)
    structure = ndimage.generate_binary_structure(ndim, ndim if connectivity in (8, 26) else 1)
    return {
        "components_pred": int(ndimage.label(pred, structure=structure)[1]),
        "components_ref": int(ndimage.label(ref, structure=structure)[1]),
    }


@register_metric("volume")
def volume(pred: np.ndarray, ref: np.ndarray, context: MetricContext) -> dict[str, float]:
    """Volumes in mm^3 and their difference, absolute (pred - ref) and relative to the reference."""
    voxel = context.voxel_size if context.voxel_size is not None else float(np.prod(np.asarray(context.spacing,
                                                                                                 dtype=float)))
    v_pred = int(np.count_nonzero(pred)) * voxel
    v_ref = int(np.count_nonzero(ref)) * voxel
    return {
        "volume_pred_mm3": v_pred,
        "volume_ref_mm3": v_ref,
        "volume_difference_mm3": v_pred - v_ref,
        "volume_difference_relative": (v_pred - v_ref) / v_ref if v_ref > 0 else math.nan,
    }


def resolve_metrics(names: str | Iterable[str] | None, what: str = "metrics", argument: bool = False) -> list[str]:
    """Registry entries named by ``names`` (comma-separated or a list); None or "all": every one.

    Every entry is returned for None or "all", also those that cannot be computed here
    (:func:`unavailable_metrics`; the caller skips them); a metric named explicitly must
    be computable. ``what`` is the config key the names came from (``evaluate.metrics``),
    named in the messages; with ``argument``, the function argument (an
    :class:`~medseg.errors.ArgumentError`, which the CLI shows under its flag).

    Raises
    ------
    MedsegError
        For a name that is neither a registry entry nor an alias (the message lists
        them), or one that cannot be computed here (the message says why).
    """
    if names is None:
        return list(LABEL_METRICS)
    def bad(problem: str) -> MedsegError:
        return ArgumentError(what, problem) if argument else MedsegError(f"{what}: {problem}")

    if isinstance(names, str):
        names = names.split(",")
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            return list(LABEL_METRICS)
        entries = METRIC_ALIASES.get(name, (name,))
        for entry in entries:
            if entry not in LABEL_METRICS:
                known = ", ".join([*LABEL_METRICS, *METRIC_ALIASES, "all"])
                raise bad(f"unknown metric '{raw.strip()}' (choose from {known})")
            reason = unavailable_metrics([entry]).get(entry)
            if reason:
                shown = entry if entry == name else f"{raw.strip()} ({entry})"
                raise bad(f"{shown} cannot be computed: {reason}")
            if entry not in chosen:
                chosen.append(entry)
    if not chosen:
        raise bad("no metric named (e.g. dice,hd95,betti)")
    return chosen


def _union_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``pred | ref`` grown by one voxel (clipped to the image); empty: one voxel."""
    either = pred | ref
    box = []
    for axis in range(either.ndim):
        hit = np.flatnonzero(either.any(axis=tuple(a for a in range(either.ndim) if a != axis)))
        if hit.size == 0:
            return tuple(slice(0, 1) for _ in range(either.ndim))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, either.shape[axis])))
    return tuple(box)


def compute_label_metrics(
    pred: np.ndarray, ref: np.ndarray, context: MetricContext, metrics: Iterable[str] | None = None
) -> dict[str, float]:
    """Run the registered metrics on one label of one case; returns the merged dict.

    ``metrics`` names registry entries (default: all that can be computed here, see
    :func:`resolve_metrics` and :func:`unavailable_metrics`); the confusion counts are
    always included.
    """
    chosen = resolve_metrics(metrics)
    skipped = unavailable_metrics(chosen)  # only defaults: a named metric that cannot be computed raised
    chosen = [name for name in chosen if name not in skipped]
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    context = dataclasses.replace(
        context,
        connectivity=context.connectivity if context.connectivity is not None else default_connectivity(ref.ndim),
        shape=tuple(ref.shape) if context.shape is None else context.shape,
    )
    box = _union_box(pred, ref)
    pred, ref = pred[box], ref[box]
    if "betti_matching" in chosen and not np.array_equal(pred, ref):
        check_matching_memory(pred.shape)  # first: not after minutes of the other metrics, then thrown away
    out: dict[str, float] = {}
    for name in chosen:
        out.update(LABEL_METRICS[name](pred, ref, context))
    out.update(confusion_counts(pred, ref, context))
    return out

"""From a fingerprint to a plan: spacing, patch, batch, network, sampling and loss.

The rules are nnU-Net v2's ``ExperimentPlanner`` (Isensee et al., Nature Methods 2021),
applied to medseg's networks and its memory estimate (:mod:`medseg.planning.memory`):

- **Orientation**: ``RAS`` (medseg's training pipeline reorients to it) for files that
  carry geometry, none for PNG/TIFF. Spacings and shapes are taken in that axis order.
- **Target spacing**: the median spacing per axis. When the coarsest axis is more than
  :data:`ANISOTROPY_THRESHOLD` (3) times coarser than the finest other axis *and* has
  fewer than a third of the voxels of the smallest other axis (median shape), that
  axis takes the 10th percentile of its spacings instead (never finer than the other
  axes), so that the thin-slice cases are not interpolated between slices.
- **Patch**: start from a patch with the aspect ratio of the target spacing (equal mm
  per axis) and the volume of 256^3 voxels (2048^2 in 2D), clip it to the median shape
  at the target spacing, round it up to what the network's strides divide; while the
  memory estimate at batch 2 exceeds the budget, shrink the axis that is largest
  relative to the median shape (among equals the finest, as nnU-Net's axis order makes
  it) by one stride multiple and re-plan the network.
- **Batch**: as many patches as the memory budget holds, but no more than 5 % of the
  dataset's voxels per step, and at least 2.
- **DynUNet / UNet levels**: :func:`medseg.planning.network_topology.unet_topology`
  (kernel 1 along a much coarser axis, stride 1 there until the others caught up).
- **Foreground oversampling**: nnU-Net's 0.33, raised by :data:`THIN_BONUS` when a
  label is thin (median skeleton radius under :data:`THIN_RADIUS_VOXELS` voxels at the
  target spacing) and by :data:`RARE_BONUS` when it is rare (under
  :data:`RARE_RATIO` of the voxels, or absent from more than half of the cases).
- **Loss**: ``dice_ce`` with its Dice over the foreground classes (nnU-Net's
  ``do_bg=False``) plus the requested topology loss with the weight of
  :data:`TOPOLOGY_LOSSES`.

Cases with an extreme geometry are named in warnings (:class:`PlanWarning`) and kept.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from medseg.data.dataset import DatasetWarning
from medseg.data.io import NATURAL_IMAGE_ENDINGS
from medseg.data.transforms import scheme_of_channel
from medseg.errors import ArgumentError, ConfigError
from medseg.planning.memory import MAX_GPU_MEMORY_GB, MIN_GPU_MEMORY_GB, estimate_training_memory, usable_bytes
from medseg.planning.network_topology import MIN_EDGE, round_up, unet_topology

__all__ = [
    "PlanWarning",
    "PLANS_VERSION",
    "MODELS",
    "TOPOLOGY_LOSSES",
    "plan_experiment",
    "target_spacing",
    "axis_permutation",
    "plan_losses",
]

PLANS_VERSION = 1
MODELS = ("dynunet", "unet", "unetr", "swinunetr")
ANISOTROPY_THRESHOLD = 3.0
MAX_DATASET_COVERED = 0.05
MIN_BATCH = 2
#: MONAI's DynUNet takes at least 3 entries of kernel_size/strides (two downsamplings)
DYNUNET_MIN_LEVELS = 3
#: a case whose spacing or shape (at the target spacing) differs from the median by more
#: than this factor along an axis is named in a warning
EXTREME_FACTOR = 4.0
BASE_OVERSAMPLE = 0.33
THIN_RADIUS_VOXELS = 3.0
RARE_RATIO = 0.01
THIN_BONUS = 0.17
RARE_BONUS = 0.17
MAX_CLDICE_ITERATIONS = 10

#: Topology loss -> (weight next to dice_ce 1.0, extra parameters, why).
TOPOLOGY_LOSSES: dict[str, tuple[float, dict[str, Any], str]] = {
    "cldice": (0.5, {}, "clDice (with its own soft Dice, alpha 0.5) at half the weight of dice_ce: the paper "
               "always pairs clDice with a volumetric loss (Shit et al. 2021); iterations reach the "
               "90th-percentile skeleton radius in voxels at the target spacing (at most 10)"),
    "skeleton_recall": (1.0, {}, "Dice+CE + 1.0 x Skeleton Recall, the paper's setting (Kirchhoff et al. 2024)"),
    "betti_matching": (1000.0, {"normalize": "voxels", "start": 0.25, "ramp": 0.1},
                       "Dice+CE + 1000 x Betti matching per voxel, switched on at 25 % of training and ramped "
                       "over 10 %: chosen on TopoMortar's validation images (benchmarks/topomortar_cpu.yaml), "
                       "where the papers' unnormalised 0.5 swamps Dice+CE on 256^2 patches; costly per step, "
                       "so deep supervision is off"),
    "mip": (0.43, {"segmentation_weight": 0.0, "mip_weight": 1.0},
            "the paper's 0.7 segmentation + 0.3 MIP, i.e. 0.43 x MIP next to dice_ce 1.0 (Radhakrishna et al. 2024)"),
    "sauna": (1.0, {}, "SAUNA alone, as the paper trains it (Dang et al. 2025): a regression of soft targets with its "
              "own tanh output (focal-L1 + Jaccard at the paper's weights); Dice+CE next to it would pull the "
              "logits apart where SAUNA regresses them into (-1, 1)"),
    "cbdice": (1.0, {}, "Dice+CE + 1.0 x cbDice, as medseg.losses.cbdice recommends (the authors: CE 3, Dice 1, cbDice 2)"),
    "clce": (1.0, {}, "Dice+CE + 1.0 x clCE, as medseg.losses.clce recommends (the authors: CE + clCE)"),
}
_BASE_LOSSES = ("dice", "dice_ce")
#: Losses planned alone, without dice_ce (their papers train them so).
STANDALONE_LOSSES = ("sauna",)


class PlanWarning(DatasetWarning):
    """A case with an extreme shape or spacing, or something else the plan could not fit."""


# --------------------------------------------------------------------------- geometry

_WORLD_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def axis_permutation(axcodes: str, orientation: str | None) -> list[int]:
    """Voxel axes of an image in the order ``Orientationd(orientation)`` puts them.

    ``perm[j]`` is the native voxel axis that becomes axis ``j``; the identity when
    ``orientation`` is None or the codes cannot be matched (e.g. a coronal 2D slice).
    """
    dims = len(axcodes)
    if not orientation:
        return list(range(dims))
    target = orientation[:dims]
    native = [_WORLD_AXIS.get(c) for c in axcodes]
    perm = []
    for code in target:
        world = _WORLD_AXIS.get(code)
        if world is None or world not in native:
            return list(range(dims))
        perm.append(native.index(world))
    return perm if sorted(perm) == list(range(dims)) else list(range(dims))


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """nnU-Net's target spacing of cases ``(n, dims)`` spacings and shapes; and the rule used."""
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [d for d in range(len(target)) if d != worst]
    if not others:
        return [float(v) for v in target], "median spacing per axis"
    other_spacing = max(target[d] for d in others)
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * other_spacing
    aniso_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[d] for d in others)
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], 10))
        if low < other_spacing:
            low = max(other_spacing, low) + 1e-5
        target[worst] = low
        return [float(v) for v in target], (
            f"median spacing per axis, except axis {worst}: it is over {ANISOTROPY_THRESHOLD:g}x coarser than the "
            f"others with under 1/{ANISOTROPY_THRESHOLD:g} of their voxels, so it takes the 10th percentile of its "
            f"spacings (nnU-Net's rule for anisotropic data)"
        )
    return [float(v) for v in target], "median spacing per axis"


def _oriented(records: list[dict[str, Any]], orientation: str | None) -> tuple[np.ndarray, np.ndarray]:
    spacings, shapes = [], []
    for r in records:
        perm = axis_permutation(r["axcodes"], orientation)
        spacings.append([r["spacing"][p] for p in perm])
        shapes.append([r["shape"][p] for p in perm])
    return np.asarray(spacings, dtype=np.float64), np.asarray(shapes, dtype=np.float64)


def _extreme_cases(
    names: list[str], spacings: np.ndarray, shapes_at_target: np.ndarray, warn: list[str]
) -> None:
    median_spacing = np.median(spacings, axis=0)
    median_shape = np.median(shapes_at_target, axis=0)
    for name, spacing, shape in zip(names, spacings, shapes_at_target):
        problems = []
        for d, (s, m) in enumerate(zip(spacing, median_spacing)):
            if s > EXTREME_FACTOR * m or s * EXTREME_FACTOR < m:
                problems.append(f"spacing {s:.3g} mm along axis {d} is {s / m:.2g}x the median {m:.3g} mm")
        for d, (n, m) in enumerate(zip(shape, median_shape)):
            if n > EXTREME_FACTOR * m or n * EXTREME_FACTOR < m:
                problems.append(f"{n:.0f} voxels along axis {d} at the target spacing, median {m:.0f}")
        if problems:
            warn.append(f"case '{name}' has an extreme geometry: {'; '.join(problems)} (kept in the plan)")


# --------------------------------------------------------------------------- network

def _features(levels: int, dims: int) -> list[int]:
    """nnU-Net's feature counts per level: 32 doubling, capped at 320 (3D) or 512 (2D)."""
    cap = 320 if dims == 3 else 512
    return [min(32 * 2**i, cap) for i in range(levels)]


def _network(model: str, spacing: Sequence[float], patch: Sequence[int], deep_supervision: bool):
    """(params, patch rounded to the network, divisor per axis) for ``patch``."""
    dims = len(spacing)
    if model in ("dynunet", "unet"):
        topo = unet_topology(spacing, patch)
        if model == "dynunet" and 2 <= topo.levels < DYNUNET_MIN_LEVELS:
            # MONAI's DynUNet needs three stages: a patch larger than small images (padded)
            topo = unet_topology(spacing, [max(p, 2 ** (DYNUNET_MIN_LEVELS - 1) * MIN_EDGE) for p in patch])
        if topo.levels < 2:
            return None, topo.patch_size, topo.divisor
        if model == "dynunet":
            params: dict[str, Any] = {
                "kernel_size": topo.kernel_sizes,
                "strides": topo.strides,
                "upsample_kernel_size": topo.strides[1:],
                "filters": _features(topo.levels, dims),
                "norm_name": "instance",
                "res_block": False,
                "deep_supervision": bool(deep_supervision and topo.levels >= 3),
            }
            if params["deep_supervision"]:
                params["deep_supr_num"] = min(2, topo.levels - 2)
        else:
            params = {
                "channels": _features(topo.levels, dims),
                "strides": topo.strides[1:],
                "num_res_units": 2,
                "norm": "INSTANCE",
            }
        return params, topo.patch_size, topo.divisor
    if model == "unetr":
        divisor = [16] * dims
        return {"feature_size": 16}, round_up([max(p, MIN_TRANSFORMER_PATCH[model]) for p in patch], divisor), divisor
    if model == "swinunetr":
        divisor = [32] * dims
        return {"feature_size": 24}, round_up([max(p, MIN_TRANSFORMER_PATCH[model]) for p in patch], divisor), divisor
    raise ArgumentError("model", f"{model!r} is not one of {', '.join(MODELS)}")


#: the smallest patch axis planned for a transformer (SwinUNETR: 64, so that its deepest
#: stage, at 1/32, keeps 2 voxels per axis; UNETR: one 16-voxel token)
MIN_TRANSFORMER_PATCH = {"swinunetr": 64, "unetr": 16}


def _min_patch(model: str) -> int:
    return MIN_TRANSFORMER_PATCH.get(model, 8)


def _initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    volume = 256.0**3 if len(spacing) == 3 else 2048.0**2
    patch = inverse * (volume / np.prod(inverse)) ** (1.0 / len(spacing))
    return [int(min(round(p), m)) for p, m in zip(patch, median_shape)]


def _plan_patch(
    model: str,
    spacing: list[float],
    median_shape: list[float],
    in_channels: int,
    out_channels: int,
    budget: float,
    amp: bool,
    optimizer: str,
    deep_supervision: bool,
    warn: list[str],
):
    """nnU-Net's shrinking loop over patch sizes with medseg's memory estimate."""
    dims = len(spacing)
    cache: dict[tuple, Any] = {}

    def estimate(params: dict[str, Any], patch: list[int]):
        key = (tuple(patch), repr(params))
        if key not in cache:
            cache[key] = estimate_training_memory(model, params, dims, in_channels, out_channels, patch, MIN_BATCH, amp, optimizer)
        return cache[key]

    patch = [max(int(p), 1) for p in _initial_patch(spacing, median_shape)]
    params, patch, divisor = _network(model, spacing, patch, deep_supervision)
    if params is None:
        raise ConfigError(f"median image {median_shape} is too small for a U-Net (fewer than 8 voxels per axis)")
    est = estimate(params, patch)
    while est.total_bytes > budget:
        # the axis largest relative to the median image; among equals the finest one, then the
        # first (nnU-Net's order: its arrays are reversed and transposed coarsest-first)
        order = sorted(range(dims), key=lambda a: (-round(patch[a] / median_shape[a], 9), spacing[a], a))
        reducible = [int(a) for a in order if patch[a] - divisor[a] >= _min_patch(model) and patch[a] > divisor[a]]
        if not reducible:
            warn.append(
                f"even the smallest patch {patch} needs about {est.total_gib:.1f} GiB at batch {MIN_BATCH}, more than "
                f"the {budget / (1 << 30):.3g} GiB of --gpu-memory-gb; raise it or pick a smaller network"
            )
            break
        axis = reducible[0]
        trial = list(patch)
        trial[axis] -= divisor[axis]
        # the divisor of the smaller patch may be smaller: step by it (nnU-Net does the same)
        _, _, trial_divisor = _network(model, spacing, trial, deep_supervision)
        candidate = list(patch)
        candidate[axis] -= trial_divisor[axis]
        new_params, new_patch, new_divisor = _network(model, spacing, candidate, deep_supervision)
        if new_params is None or new_patch == patch:
            warn.append(f"could not shrink the patch {patch} further")
            break
        params, patch, divisor = new_params, new_patch, new_divisor
        est = estimate(params, patch)
    return params, patch, divisor, est


def _plan_batch(memory_batch: int, dataset_voxels: float, patch: Sequence[int]) -> tuple[int, str]:
    """nnU-Net's batch: what memory holds, at most 5% of the dataset per step, at least 2."""
    coverage_batch = int(round(dataset_voxels * MAX_DATASET_COVERED / float(np.prod(patch))))
    batch = max(min(memory_batch, coverage_batch), MIN_BATCH)
    if min(memory_batch, coverage_batch) < MIN_BATCH:
        rule = f"the minimum of {MIN_BATCH}"
        if coverage_batch < memory_batch:
            rule += f" (one step sees more than {MAX_DATASET_COVERED:.0%} of this small dataset)"
    elif coverage_batch < memory_batch:
        rule = f"capped so one step sees at most {MAX_DATASET_COVERED:.0%} of the dataset (memory holds {memory_batch})"
    else:
        rule = "as many patches as the memory budget holds"
    return batch, rule


# --------------------------------------------------------------------------- the plan

def _planned_cases(records: list[dict[str, Any]], warn: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """The dataset's dimensionality (that of most cases) and the cases that have it."""
    dims_per_case = [len(r["shape"]) for r in records]
    dims = max(set(dims_per_case), key=dims_per_case.count)
    for r in records:
        if len(r["shape"]) != dims:
            warn.append(
                f"case '{r['name']}' is {len(r['shape'])}D (shape {tuple(r['shape'])}: a single slice?) in a "
                f"{dims}D dataset; it is left out of the spacing and shape statistics, and medseg train will "
                f"refuse it until it is removed"
            )
    return dims, [r for r in records if len(r["shape"]) == dims]


def _normalization(fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for entry in fingerprint["intensity"]:
        scheme = scheme_of_channel(entry["name"])
        item: dict[str, Any] = {"name": entry["name"], "scheme": scheme}
        if scheme == "ct" and entry.get("n"):
            item.update(
                clip=[entry["percentile_00_5"], entry["percentile_99_5"]], mean=entry["mean"], std=entry["std"]
            )
        out.append(item)
    return out


def _thickness(fingerprint: dict[str, Any], spacing: list[float]) -> dict[str, Any]:
    out = {}
    finest = min(spacing)
    for name, entry in fingerprint["labels"].items():
        if "radius_mm" not in entry:
            continue
        radius = entry["radius_mm"]
        out[name] = {
            "value": entry["value"],
            "radius_mm": radius,
            "radius_voxels": {q: v / finest for q, v in radius.items()},
            "radius_voxels_per_axis": [radius["p50"] / s for s in spacing],
        }
    return out


def _oversample(fingerprint: dict[str, Any], thickness: dict[str, Any], foreground: dict[str, int]) -> tuple[float, str]:
    thin = [n for n, t in thickness.items() if t["radius_voxels"]["p50"] < THIN_RADIUS_VOXELS]
    rare = [  # a label in no case cannot be sampled: no bonus for it (plan_experiment warns)
        n for n, e in fingerprint["labels"].items()
        if n in foreground and e["presence"] > 0 and (e["ratio_mean"] < RARE_RATIO or e["presence"] < 0.5)
    ]
    value = BASE_OVERSAMPLE + (THIN_BONUS if thin else 0.0) + (RARE_BONUS if rare else 0.0)
    reasons = [f"nnU-Net's {BASE_OVERSAMPLE}"]
    if thin:
        reasons.append(f"+{THIN_BONUS} for thin label(s) {', '.join(thin)} (median radius < {THIN_RADIUS_VOXELS:g} voxels)")
    if rare:
        reasons.append(
            f"+{RARE_BONUS} for rare label(s) {', '.join(rare)} (< {RARE_RATIO:.0%} of the voxels or in < half the cases)"
        )
    return round(value, 2), "; ".join(reasons)


def plan_losses(topology_loss: str | None, thickness: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from medseg.losses import LOSS_NAMES

    # nnU-Net's DC_and_CE_loss takes its Dice over the foreground classes (do_bg=False);
    # with the background in (MONAI's default) every class's Dice gradient is (C-1)/C of it
    losses: list[dict[str, Any]] = [{"name": "dice_ce", "weight": 1.0, "include_background": False}]
    reasons = ["Dice over the foreground classes + cross-entropy, nnU-Net's loss"]
    if topology_loss is None or topology_loss == "none":
        return losses, reasons
    if topology_loss not in LOSS_NAMES:
        import difflib

        valid = [n for n in LOSS_NAMES if n not in _BASE_LOSSES]
        close = difflib.get_close_matches(topology_loss, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ArgumentError("topology_loss", f"unknown loss '{topology_loss}'{hint}; valid: none, {', '.join(valid)}")
    if topology_loss in _BASE_LOSSES:
        raise ArgumentError("topology_loss", f"'{topology_loss}' is not a topology loss (dice_ce is always planned)")
    weight, params, why = TOPOLOGY_LOSSES.get(
        topology_loss, (1.0, {}, "no recommended weight is recorded for this loss; 1.0")
    )
    term = {"name": topology_loss, "weight": weight, **params}
    if topology_loss == "cldice":
        p90 = max((t["radius_voxels"]["p90"] for t in thickness.values()), default=3.0)
        term["iterations"] = int(min(max(math.ceil(p90), 1), MAX_CLDICE_ITERATIONS))
    if topology_loss in STANDALONE_LOSSES:
        return [term], [why]
    losses.append(term)
    reasons.append(why)
    return losses, reasons


def plan_experiment(
    fingerprint: dict[str, Any],
    model: str = "dynunet",
    gpu_memory_gb: float = 8.0,
    topology_loss: str | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Plan a training run from a fingerprint (see the module docstring for the rules).

    Parameters
    ----------
    fingerprint : dict
        :func:`medseg.planning.fingerprint.compute_fingerprint`'s result.
    model : str
        ``dynunet`` (default), ``unet``, ``unetr`` or ``swinunetr``.
    gpu_memory_gb : float
        Memory of the training GPU in GiB, the budget of
        :func:`medseg.planning.memory.estimate_training_memory`.
    topology_loss : str, optional
        A loss of :data:`medseg.losses.LOSS_NAMES` to add to ``dice_ce``.
    output_dir : str, optional
        The run folder written into the config (default ``runs/<dataset>_<model>``).

    Returns
    -------
    dict
        JSON-ready ``plans.json`` content; ``warnings`` lists what the caller should
        show (they are also issued as :class:`PlanWarning`).

    Raises
    ------
    ConfigError
        Unknown model or loss, a non-positive memory budget, images too small to plan.
    """
    if model not in MODELS:
        raise ArgumentError("model", f"{model!r} is not one of {', '.join(MODELS)}")
    if not MIN_GPU_MEMORY_GB <= gpu_memory_gb <= MAX_GPU_MEMORY_GB:
        raise ArgumentError(
            "gpu_memory_gb", f"must be {MIN_GPU_MEMORY_GB:g} to {MAX_GPU_MEMORY_GB:g} GiB, got {gpu_memory_gb}"
        )
    warn: list[str] = []
    dataset = fingerprint["dataset"]
    records = fingerprint["cases"]
    dims, planned = _planned_cases(records, warn)
    natural = str(dataset["file_ending"]).lower() in NATURAL_IMAGE_ENDINGS
    orientation = None if natural else "RAS"
    spacings, shapes = _oriented(planned, orientation)
    spacing, spacing_rule = target_spacing(spacings, shapes)
    spacing = [float(f"{s:.6g}") for s in spacing]  # NIfTI stores float32: 0.800000011920929 -> 0.8
    shapes_at_target = np.round(shapes * spacings / np.asarray(spacing))
    median_shape = [float(v) for v in np.median(shapes_at_target, axis=0)]
    _extreme_cases([r["name"] for r in planned], spacings, shapes_at_target, warn)
    for r in records:
        if not r["has_foreground"]:
            warn.append(f"case '{r['name']}' has no foreground label (kept in the plan)")

    in_channels = len(dataset["channel_names"])
    labels = {k: int(v) for k, v in dataset["labels"].items()}
    out_channels = max(v for k, v in labels.items() if k != "ignore") + 1
    foreground = {k: v for k, v in labels.items() if v != 0 and k != "ignore"}
    absent = [f"{k} ({v})" for k, v in foreground.items() if (fingerprint["labels"].get(k) or {}).get("presence", 1) == 0]
    if absent:
        warn.append(f"label(s) {', '.join(absent)} declared in dataset.json appear in no training case: the network "
                    "cannot learn them (medseg train says so too)")
    optimizer = "sgd" if model in ("dynunet", "unet") else "adamw"
    budget = usable_bytes(gpu_memory_gb)
    deep_supervision = topology_loss != "betti_matching"
    params, patch, divisor, est = _plan_patch(
        model, spacing, median_shape, in_channels, out_channels, budget, True, optimizer, deep_supervision, warn
    )

    batch, batch_rule = _plan_batch(est.max_batch(budget), float(np.prod(median_shape)) * len(planned), patch)
    final = estimate_training_memory(model, params, dims, in_channels, out_channels, patch, batch, True, optimizer)

    thickness = _thickness(fingerprint, spacing)
    oversample, oversample_rule = _oversample(fingerprint, thickness, foreground)
    losses, loss_reasons = plan_losses(topology_loss, thickness)

    preprocessed_bytes = float(np.sum(np.prod(shapes_at_target, axis=1))) * (4 * in_channels + 1)

    for message in warn:
        warnings.warn(message, PlanWarning, stacklevel=2)
    return {
        "version": PLANS_VERSION,
        "dataset": {k: dataset[k] for k in ("root", "name", "file_ending", "channel_names", "labels", "num_cases")},
        "model": model,
        "gpu_memory_gb": float(gpu_memory_gb),
        "spatial_dims": dims,
        "orientation": orientation,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "target_spacing": spacing,
        "target_spacing_rule": spacing_rule,
        "median_shape_at_target": median_shape,
        "patch_size": [int(p) for p in patch],
        "divisible_by": [int(d) for d in divisor],
        "batch_size": int(batch),
        "batch_size_rule": batch_rule,
        "network": {"name": model, "params": params},
        "memory": {
            "estimate_gib": round(final.total_gib, 3),
            "parameters": final.parameters,
            "activation_elements_per_sample": final.activation_elements_per_sample,
            "amp": True,
            "optimizer": optimizer,
        },
        "normalization": _normalization(fingerprint),
        "thickness": thickness,
        "foreground_oversample": oversample,
        "foreground_oversample_rule": oversample_rule,
        "losses": losses,
        "loss_reasons": loss_reasons,
        "preprocessed_gib": preprocessed_bytes / (1 << 30),
        "output_dir": output_dir or f"runs/{dataset['name']}_{model}",
        "warnings": warn,
    }

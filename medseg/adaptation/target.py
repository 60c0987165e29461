"""The target domain: unlabelled scans preprocessed as the source model expects, patches, evaluation.

Patches are a pure function of ``(seed, sample number)``, as in training
(:mod:`medseg.training.sampling`): sample ``k`` comes from case
``case_for_sample(seed, k, n)``, and its crop offset, flips and intensity change are
drawn from ``numpy.random.default_rng([seed, stream, k])``. A resumed adaptation
therefore sees the patches an uninterrupted one would have seen.

Augmentations act on the preprocessed (normalised) patch in torch: flips per axis and
an intensity change ``a * x + b`` (``a`` in [0.8, 1.2], ``b`` in [-0.2, 0.2]) plus
Gaussian noise (std 0.05). Intensity changes keep voxel correspondence, so two views of
one patch can be compared voxel by voxel; flips are undone on the network output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medseg.data.dataset import Case, DatasetInfo, cases_from_paths, load_case, read_dataset_json
from medseg.errors import DataError
from medseg.training.sampling import case_for_sample

log = logging.getLogger("medseg.adaptation")

_CROP_STREAM = 11
_VIEW_STREAM = 12


@dataclass
class View:
    """One augmented view: flipped tensor axes (of ``(C, *spatial)``) and intensity ``a * x + b``, noise seed."""

    flips: tuple[int, ...] = ()
    scale: float = 1.0
    shift: float = 0.0
    noise_seed: int | None = None

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        out = image * self.scale + self.shift
        if self.noise_seed is not None:
            g = torch.Generator().manual_seed(self.noise_seed)
            out = out + 0.05 * torch.randn(out.shape, generator=g).to(out)
        return torch.flip(out, [d for d in self.flips]) if self.flips else out

    def undo(self, output: torch.Tensor) -> torch.Tensor:
        """Un-flip a network output ``(C, *spatial)`` of this view."""
        return torch.flip(output, [d for d in self.flips]) if self.flips else output


def draw_view(rng: np.random.Generator, dims: int, flip_prob: float, intensity_prob: float, flips: bool = True) -> View:
    axes = tuple(1 + a for a in range(dims) if flips and rng.random() < flip_prob)
    if rng.random() < intensity_prob:
        return View(axes, float(rng.uniform(0.8, 1.2)), float(rng.uniform(-0.2, 0.2)), int(rng.integers(2**31)))
    return View(axes)


def crop_start(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, patch))


def pad_to(array: torch.Tensor, patch: Sequence[int], value: float = 0.0, replicate: bool = False) -> torch.Tensor:
    """Pad the spatial axes of ``(C, *spatial)`` at the end up to ``patch``: with ``value``,
    or (``replicate``, float images) by repeating the border voxels, as training pads a case
    smaller than the patch."""
    spatial = array.shape[1:]
    pads: list[int] = []
    for s, p in reversed(list(zip(spatial, patch))):
        pads += [0, max(p - s, 0)]
    if not any(pads):
        return array
    if replicate:
        return torch.nn.functional.pad(array[None], pads, mode="replicate")[0]
    return torch.nn.functional.pad(array, pads, value=value)


def crop(array: torch.Tensor, start: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    index = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch))
    return array[index]


@dataclass
class TargetScan:
    name: str
    case: Case
    loaded: dict[str, Any]  # load_case's dict (original grid)
    preprocessed: dict[str, Any]  # Predictor.preprocess's dict (network grid)
    image: torch.Tensor  # (C, *spatial) float32, network grid, padded to >= patch

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def own_shape(self) -> tuple[int, ...]:
        """The network grid's spatial shape before the padding up to the patch size."""
        return tuple(self.preprocessed["image"].shape[1:])


def list_target_cases(root: Path, subset: str, num_channels: int) -> tuple[DatasetInfo, list[Case]]:
    """Cases of ``root/images<subset>`` (labels not needed); the channel count must be the source's."""
    info = read_dataset_json(root)
    if info.num_channels != num_channels:
        raise DataError(
            f"{info.dataset_json}: the target has {info.num_channels} channel(s), the source model takes "
            f"{num_channels} (target.dataset)"
        )
    folder = Path(root) / f"images{subset}"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (target.subset: {subset})")
    cases = cases_from_paths([folder], file_ending=info.file_ending, num_channels=num_channels)
    return info, cases


def load_target(root: Path, subset: str, predictor, patch: Sequence[int]) -> list[TargetScan]:
    """Read and preprocess every target scan (kept in memory); errors name the file."""
    info, cases = list_target_cases(root, subset, predictor.info.num_channels)
    scans = []
    for case in cases:
        loaded = load_case(case, info, check_labels=False)
        ndim = loaded["image"].ndim - 1
        if ndim != predictor.spatial_dims:
            raise DataError(
                f"{case.image_files[0]}: {ndim}D image, but the source model was trained on {predictor.spatial_dims}D "
                "patches (target.dataset)"
            )
        pre = predictor.preprocess(loaded)
        image = pre["image"]
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        scans.append(TargetScan(case.name, case, loaded, pre, pad_to(plain.float().contiguous(), patch, replicate=True)))
    log.info("target %s: %d scan(s) from images%s/", info.name, len(scans), subset)
    return scans


@dataclass
class PatchSpec:
    case: int
    start: tuple[int, ...]
    views: tuple[View, ...]


def patch_spec(seed: int, sample: int, scans: Sequence[TargetScan], patch: Sequence[int],
               flip_prob: float, intensity_prob: float, num_views: int = 1) -> PatchSpec:
    """Where sample ``sample`` is cut and how each of its views is augmented (pure function)."""
    index = case_for_sample(seed, sample, len(scans))
    rng = np.random.default_rng([seed, _CROP_STREAM, sample])
    start = crop_start(rng, scans[index].shape, patch)
    vrng = np.random.default_rng([seed, _VIEW_STREAM, sample])
    dims = len(patch)
    # the first view of a pair (the teacher's) is not flipped: its output is the reference grid
    views = tuple(
        draw_view(vrng, dims, flip_prob, intensity_prob, flips=(num_views == 1 or v > 0)) for v in range(num_views)
    )
    return PatchSpec(index, start, views)


def target_batch(
    seed: int, iteration: int, batch_size: int, scans: Sequence[TargetScan], patch: Sequence[int],
    flip_prob: float, intensity_prob: float, num_views: int = 1,
) -> list[PatchSpec]:
    return [
        patch_spec(seed, iteration * batch_size + b, scans, patch, flip_prob, intensity_prob, num_views)
        for b in range(batch_size)
    ]


def stack_views(specs: Sequence[PatchSpec], scans: Sequence[TargetScan], patch: Sequence[int], view: int,
                device: torch.device) -> torch.Tensor:
    return torch.stack([
        s.views[view].apply(crop(scans[s.case].image, s.start, patch)) for s in specs
    ]).to(device)


def own_voxel_masks(specs: Sequence[PatchSpec], scans: Sequence[TargetScan], patch: Sequence[int],
                    view: int | None, device: torch.device) -> torch.Tensor | None:
    """``(B, 1, *patch)`` bool, true on a scan's own voxels and false on the padding that
    brought a scan smaller than the patch up to it; flipped as view ``view`` of each
    sample is (``None``: not flipped, the frame of an un-flipped output). ``None`` when no
    sample of the batch reaches into padding, so that the terms then stay plain means.

    The padding repeats the scan's border voxels (it was 0 after normalisation, which a
    CT model reads as vessel); either way it is no part of the target domain, so the
    patch-level terms (Tent's entropy, the mean teacher's consistency, SFDA's entropy and
    ratios) average over the scan's own voxels only.
    """
    masks, padded = [], False
    for s in specs:
        own = scans[s.case].own_shape
        inside = [torch.arange(st, st + p) < n for st, p, n in zip(s.start, patch, own)]
        padded = padded or not all(bool(a.all()) for a in inside)
        mask = inside[0]
        for axis in inside[1:]:
            mask = mask[..., None] & axis
        mask = mask[None]  # (1, *patch): the view's tensor axes count the channel
        if view is not None and s.views[view].flips:
            mask = torch.flip(mask, list(s.views[view].flips))
        masks.append(mask)
    return torch.stack(masks).to(device) if padded else None


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mean of ``values`` over ``dims``, counting only where the broadcast ``mask`` is true."""
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum(dim=tuple(dims)) / weight.sum(dim=tuple(dims)).clamp_min(1.0)


# --------------------------------------------------------------------------- evaluation

def read_eval_labels(folder: Path, scans: Sequence[TargetScan], ending: str,
                     declared: set[int] | None = None) -> dict[str, np.ndarray]:
    """Reference label maps by case name from ``folder/CASE<ending>``, checked as ``medseg
    evaluate`` checks a reference: integer values among ``declared`` (the source model's
    labels), the scan's shape and affine (a mirrored label scored as another anatomy)."""
    from medseg.evaluation.pair import geometry_mismatch, read_label_map, undeclared_values

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: target.eval_labels folder not found")
    labels = {}
    for scan in scans:
        path = folder / f"{scan.name}{ending}"
        if not path.is_file():
            raise DataError(f"{path}: no reference label for target case '{scan.name}' (target.eval_labels)")
        seg, geom = read_label_map(path)
        mismatch = geometry_mismatch(geom, scan.loaded["geometry"], "the scan's")
        if mismatch is not None:
            raise DataError(f"{path}: {mismatch} (target.eval_labels)")
        seg = np.asarray(seg).astype(np.int64)
        if declared is not None:
            extra = undeclared_values(seg, set(declared))
            if extra:
                raise DataError(f"{path}: label values {extra[:5]} are not among the source model's labels "
                                f"{sorted(declared)} (target.eval_labels)")
        labels[scan.name] = seg
    return labels


def evaluate(predictor, model: torch.nn.Module, scans: Sequence[TargetScan], references: dict[str, np.ndarray],
             class_values: dict[str, int]) -> dict[str, Any]:
    """Dice and Betti error (sum over dimensions of |beta_pred - beta_ref|) per class, on the original grid."""
    from medseg.topology import betti_numbers

    per_case: dict[str, dict[str, dict[str, float]]] = {}
    for scan in scans:
        label, _ = predict_with(predictor, model, scan)
        ref = references[scan.name]
        scores = {}
        for name, value in class_values.items():
            p, r = label == value, ref == value
            denom = int(p.sum()) + int(r.sum())
            dice = 2.0 * int((p & r).sum()) / denom if denom else math.nan
            betti = int(np.abs(betti_numbers(p) - betti_numbers(r)).sum())
            scores[name] = {"dice": dice, "betti_error": betti}
        per_case[scan.name] = scores
    mean = {}
    for name in class_values:
        dices = [c[name]["dice"] for c in per_case.values() if not math.isnan(c[name]["dice"])]
        mean[name] = {
            "dice": float(np.mean(dices)) if dices else math.nan,
            "betti_error": float(np.mean([c[name]["betti_error"] for c in per_case.values()])),
        }
    return {"mean": mean, "per_case": per_case}


def predict_with(predictor, model: torch.nn.Module, scan: TargetScan) -> tuple[np.ndarray, np.ndarray]:
    """The Predictor's full path (sliding window, inverse transforms) with ``model`` in eval mode."""
    kept, was_training = predictor.model, model.training
    predictor.model = model.eval()
    try:
        return predictor.predict_case(scan.loaded, preprocessed=scan.preprocessed)
    finally:
        predictor.model = kept
        model.train(was_training)


@torch.no_grad()
def probabilities_with(predictor, model: torch.nn.Module, scan: TargetScan) -> torch.Tensor:
    """Softmax ``(classes, *spatial)`` on the (padded) network grid of ``scan``, sliding window."""
    kept, was_training = predictor.model, model.training
    predictor.model = model.eval()
    try:
        return predictor.probabilities(scan.image, tta=False)
    finally:
        predictor.model = kept
        model.train(was_training)

"""One case through the deterministic pipeline, cropped to its non-zero region.

:func:`preprocess_case` is exactly what the ``val`` pipeline of
:func:`medseg.data.transforms.build_transforms` computes (the same
:func:`~medseg.data.transforms.preprocessing_transforms`: orientation, spacing,
normalisation), followed by a crop to the bounding box of the non-zero region, as
nnU-Net crops: the voxels where any channel of the *resampled, not yet normalised*
image is non-zero, or the label is foreground. The reorientation and resampling run as
one resample, slab by slab, as ``medseg predict`` runs them
(:func:`medseg.inference.resample.run_transforms`: about 10 bytes per output voxel at
the peak, where MONAI's whole-volume ``Spacingd`` takes 64, 4.7 GB for a 512x512x200 CT
brought to 0.8x0.8x1.5 mm). So ``cached == val_output[bbox]``: labels voxel for voxel
(but where an output voxel's centre lies exactly halfway between two source voxels, as
in 2x upsampling: nearest-neighbour then takes either side, each resampler by its own
float rounding), intensities to float rounding (float64 sums in another order: at most
one float32 ulp, in a few voxels per million); the normalisation statistics (per-image
z-score) are still taken over the whole image, before the crop. A CT (air is -1000 HU,
not 0) keeps its whole grid; an MR or a padded scan loses its empty border, which
training and validation never needed: the crop is recorded (``bbox`` on the
preprocessed grid), and prediction does not use the cache.

Besides the arrays, a case carries what the patch sampler and the run need without
reading the label again: up to :data:`MAX_CLASS_LOCATIONS` voxel coordinates per
foreground class (a seeded, sorted subsample, as nnU-Net's ``class_locations``), the
foreground's maximum projection along each axis (for the MIP loss's whole-volume
target) and the histogram of the *raw* label (the class-ratio statistics of
``label_stats.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import Compose

from medseg.data.dataset import Case, DatasetInfo, label_dtype, load_case
from medseg.data.transforms import preprocessing_transforms
from medseg.inference.resample import run_transforms
from medseg.errors import ConfigError, DataError, MedsegError

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig

__all__ = [
    "MAX_CLASS_LOCATIONS",
    "PreprocessedCase",
    "preprocess_case",
    "preprocess_loaded",
    "nonzero_bbox",
    "unwrap_medseg_error",
]

# Patch centres of a class are drawn from at most this many of its voxels per case
# (nnU-Net's number); a patch covers thousands of voxels, so more would not add variety.
MAX_CLASS_LOCATIONS = 10_000


@dataclass
class PreprocessedCase:
    """A case as the cache stores it.

    Attributes
    ----------
    name : str
    image : np.ndarray
        float32 ``(C, *shape)``, normalised, cropped.
    label : np.ndarray
        ``(1, *shape)`` of :func:`~medseg.data.dataset.label_dtype`.
    bbox : list of (int, int)
        The crop ``[start, stop)`` per axis on the preprocessed grid.
    grid_shape : tuple of int
        The preprocessed grid before the crop.
    affine : np.ndarray
        4x4 RAS+ affine of the preprocessed grid before the crop.
    class_locations : dict of int to np.ndarray
        Foreground label value -> ``(n, dims)`` int32 voxel coordinates in the crop.
    projections : list of np.ndarray
        ``projections[a]``: bool, the foreground's maximum along axis ``a`` (that axis
        removed), over the cropped volume (which holds all the foreground).
    raw_histogram : dict of int to int
        Label value -> voxel count of the label file as read, before any transform.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    bbox: list[tuple[int, int]]
    grid_shape: tuple[int, ...]
    affine: np.ndarray
    class_locations: dict[int, np.ndarray] = field(default_factory=dict)
    projections: list[np.ndarray] = field(default_factory=list)
    raw_histogram: dict[int, int] = field(default_factory=dict)


def unwrap_medseg_error(err: BaseException) -> BaseException:
    """MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; find ours."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, MedsegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def nonzero_bbox(image: np.ndarray, label: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` per spatial axis of the voxels where any channel is non-zero or
    the label is foreground; the whole grid when there are none.

    >>> image = np.zeros((1, 5, 6)); image[0, 1:3, 2] = 7
    >>> nonzero_bbox(image)
    [(1, 3), (2, 3)]
    """
    mask = np.any(np.asarray(image) != 0, axis=0)
    if label is not None:
        mask |= np.asarray(label)[0] > 0
    bbox = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        bbox.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return bbox


def _class_locations(label: np.ndarray, values: list[int]) -> dict[int, np.ndarray]:
    locations = {}
    flat = label.ravel()
    for value in values:
        idx = np.flatnonzero(flat == value)
        if idx.size > MAX_CLASS_LOCATIONS:
            rng = np.random.default_rng([0, value])  # fixed: the cache must be reproducible
            idx = np.sort(rng.choice(idx, MAX_CLASS_LOCATIONS, replace=False))
        locations[value] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)
    return locations


def _plain(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.detach().cpu().numpy()
    return np.asarray(x)


def preprocess_case(case: Case, info: DatasetInfo, config: "RunConfig", preprocessing: dict[str, Any]) -> PreprocessedCase:
    """Load ``case`` (:func:`~medseg.data.dataset.load_case`) and :func:`preprocess_loaded` it.

    Raises
    ------
    DataError
        The case's files (named) are unreadable or inconsistent, or it has no label.
    ConfigError
        As :func:`preprocess_loaded`.
    """
    loaded = load_case(case, info)
    if loaded["label"] is None:
        raise DataError(f"case '{case.name}': no label file (labelsTr/{case.name}{info.file_ending})")
    return preprocess_loaded(loaded, info, config, preprocessing)


def preprocess_loaded(
    loaded: dict[str, Any], info: DatasetInfo, config: "RunConfig", preprocessing: dict[str, Any]
) -> PreprocessedCase:
    """Run the deterministic pipeline on a loaded case and crop it (see the module docstring).

    ``loaded`` is :func:`~medseg.data.dataset.load_case`'s dict (``name``, ``image``,
    ``label``, ``geometry``). Torch runs on one thread here, so the result does not
    depend on the machine's core count (reductions such as the z-score mean are summed
    in another order on more threads) and a rerun writes the same bytes.

    Raises
    ------
    ConfigError
        ``data.patch_size`` has another dimensionality than the case, or the spacing /
        orientation settings do not fit it.
    """
    name = str(loaded["name"])
    dims = config.spatial_dims
    ndim = np.asarray(loaded["image"]).ndim - 1
    if ndim != dims:
        raise ConfigError(
            f"data.patch_size: {list(config.data.patch_size)} has {dims} values but case '{name}' is {ndim}D "
            f"(shape {tuple(np.asarray(loaded['image']).shape[1:])})"
        )
    raw = np.asarray(loaded["label"])
    values, counts = np.unique(raw, return_counts=True)
    histogram = {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}

    *spatial, normalise = preprocessing_transforms(config, info, preprocessing, ["image", "label"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the spatial transforms as one resample done slab by slab, as medseg predict
        # does (medseg.inference.resample): MONAI's whole-volume Spacing takes ~60 bytes
        # per output voxel (4.7 GB for a 512x512x200 CT brought to 0.8x0.8x1.5 mm)
        data = run_transforms(Compose(spatial), dict(loaded))
        affine = _plain(data["image"].affine).astype(np.float64) if hasattr(data["image"], "affine") else np.eye(4)
        bbox = nonzero_bbox(_plain(data["image"]), _plain(data["label"]))
        data = normalise(data)
    except Exception as err:
        raise unwrap_medseg_error(err) from None
    finally:
        torch.set_num_threads(threads)
    crop = (slice(None), *(slice(a, b) for a, b in bbox))
    image = np.ascontiguousarray(_plain(data["image"])[crop], dtype=np.float32)
    label = np.ascontiguousarray(_plain(data["label"])[crop].astype(label_dtype(info)))
    grid_shape = tuple(int(s) for s in _plain(data["image"]).shape[1:])

    foreground = [v for v in sorted(info.labels.values()) if v != 0 and v != info.ignore_label]
    fg = label[0] > 0
    return PreprocessedCase(
        name=name,
        image=image,
        label=label,
        bbox=bbox,
        grid_shape=grid_shape,
        affine=affine,
        class_locations=_class_locations(label[0], foreground),
        projections=[fg.any(axis=a) for a in range(fg.ndim)],
        raw_histogram=histogram,
    )

"""Preprocessing and augmentation: from a loaded case to a network-ready patch.

The deterministic part is a MONAI :class:`~monai.transforms.Compose` over the dicts
that :func:`medseg.data.dataset.load_case` returns (``image`` ``(C, *spatial)``
float32, ``label`` ``(1, *spatial)`` int or absent, ``geometry``), defined once in
:func:`preprocessing_transforms` and used by both the preprocessing cache
(:mod:`medseg.preprocessing`) and the whole-case pipelines of :func:`build_transforms`:

1. :class:`ToMetaTensord` wraps ``image``/``label`` as :class:`~monai.data.MetaTensor`
   carrying the case's affine (RAS+), so every spatial transform after it is recorded
   and can be inverted.
2. ``Orientationd(data.orientation)`` then ``Spacingd(data.target_spacing)`` (image
   bilinear, label nearest).
3. :class:`NormalizeChannelsd`: per-channel intensity normalisation with the statistics
   that :func:`fit_preprocessing` fitted on the training set (nnU-Net's scheme by channel
   name: ``CT`` -> clip to the foreground [0.5, 99.5] percentiles, then z-score with the
   foreground mean/std; any other channel -> per-image z-score).

``val`` is steps 1-3 with the label; ``infer`` has no label and is invertible:
``Compose.inverse`` or ``monai.transforms.Invertd(keys="pred", transform=...,
orig_keys="image")`` maps a prediction made on the resampled grid back to the input's
exact shape and affine.

The random part acts on a crop of a preprocessed case, and
:mod:`medseg.training.sampling` chooses the crop: :func:`affine_augmentation` (rotation
and scaling, which needs :func:`affine_box_margin` voxels of context around the patch
for the angles drawn), then :func:`patch_augmentations` (flips, 90-degree rotations, intensity changes, the
label cast to int64, and the label-derived targets the losses need,
``CompositeLoss.target_transforms``: skeletons, SAUNA maps). Whole-volume targets
(``CompositeLoss.pre_crop_transforms``: the MIP loss's label projection) come from the
per-axis projections the cache stores with each case.
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import (
    CastToTyped,
    Compose,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffine,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
)
from monai.transforms.utils import create_rotate
from monai.utils import convert_to_tensor

from medseg.data.io import planar_affine
from medseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig
    from medseg.data.dataset import Case, DatasetInfo

__all__ = [
    "PREPROCESSING_VERSION",
    "channel_schemes",
    "scheme_of_channel",
    "fit_preprocessing",
    "normalization_from_samples",
    "ToMetaTensord",
    "NormalizeChannelsd",
    "preprocessing_transforms",
    "build_transforms",
    "affine_augmentation",
    "affine_box_margin",
    "affine_matrix",
    "affine_margin",
    "rotation_axes",
    "patch_augmentations",
    "whole_volume_targets",
]

PREPROCESSING_VERSION = 3  # 2: NIfTI files in metres or microns read in mm; 3: nnU-Net's noNorm, rescale_to_0_1, rgb_to_0_1
# nnU-Net samples this many foreground voxels per case and channel for the CT statistics.
_FG_SAMPLES_PER_CASE = 10_000
# load_case bookkeeping that DataLoader collation cannot batch (paths, geometry objects)
_UNCOLLATABLE = ("image_files", "label_file")


# --------------------------------------------------------------------------- fitting

#: nnU-Net v2's channel names that choose a normalisation (case-insensitive), and medseg's
#: scheme for each; any other name is z-scored per image. ``noNorm`` channels were z-scored
#: and ``rescale_to_0_1`` / ``rgb_to_0_1`` ones too, against what the dataset asked for.
NNUNET_CHANNEL_SCHEMES = {"ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale_to_0_1",
                          "rgb_to_0_1": "rgb_to_0_1"}


def scheme_of_channel(name: Any) -> str:
    """The normalisation nnU-Net v2 gives a channel of this name (:data:`NNUNET_CHANNEL_SCHEMES`)."""
    return NNUNET_CHANNEL_SCHEMES.get(str(name).strip().lower(), "zscore")


def channel_schemes(info: "DatasetInfo", config: "RunConfig") -> list[str]:
    """The normalisation scheme of each channel: ``ct``, ``zscore``, ``rescale_to_0_1``,
    ``rgb_to_0_1`` or ``none``.

    ``data.normalization.scheme: auto`` chooses by channel name as nnU-Net v2 does
    (:func:`scheme_of_channel`: ``CT`` clips and z-scores with dataset statistics,
    ``noNorm`` leaves the values, ``rescale_to_0_1`` and ``rgb_to_0_1`` map to [0, 1],
    any other name is z-scored per image); any other value applies to every channel.
    """
    scheme = config.data.normalization.scheme
    names = [info.channel_names[k] for k in sorted(info.channel_names)]
    if scheme == "auto":
        return [scheme_of_channel(n) for n in names]
    return [scheme] * len(names)


def fit_preprocessing(
    train_cases: Iterable["Case | Mapping[str, Any]"],
    info: "DatasetInfo",
    config: "RunConfig",
) -> dict[str, Any]:
    """Fit the per-channel normalisation statistics on the training cases.

    Parameters
    ----------
    train_cases : iterable of Case or loaded case dicts
        The training cases; a :class:`~medseg.data.dataset.Case` is read with
        ``load_case`` (so a broken file raises :class:`~medseg.errors.DataError` naming
        it), an already loaded dict (``load_case``'s result) is used as is.
    info : DatasetInfo
        The dataset description (channel names decide the scheme).
    config : RunConfig
        ``data.normalization`` and ``seed`` (the foreground voxel sampling).

    Returns
    -------
    dict
        JSON- and ``torch.load(weights_only=True)``-safe::

            {"version": 1, "channels": [
                {"name": "CT", "scheme": "ct", "clip": [lo, hi], "mean": m, "std": s},
                {"name": "T2", "scheme": "zscore"}, ...]}

        ``ct`` statistics follow nnU-Net: up to 10,000 foreground voxels (label > 0)
        sampled per case, their [0.5, 99.5] percentiles (or ``normalization.ct_clip``)
        and their mean and standard deviation. A training set without any foreground
        falls back to all voxels.
    """
    schemes = channel_schemes(info, config)
    ct_channels = [c for c, s in enumerate(schemes) if s == "ct"]
    if config.data.normalization.ct_clip is not None and not ct_channels:
        from medseg.data.dataset import DatasetWarning

        warnings.warn(f"data.normalization.ct_clip is set, but no channel uses the ct scheme (channels "
                      f"{', '.join(map(str, (info.channel_names[k] for k in sorted(info.channel_names))))}): "
                      "it has no effect", DatasetWarning, stacklevel=2)
    rng = np.random.default_rng(config.seed)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in ct_channels}
    fallback: dict[int, list[np.ndarray]] = {c: [] for c in ct_channels}
    for case in train_cases:
        if isinstance(case, Mapping):
            loaded = case
        else:
            from medseg.data.dataset import load_case

            loaded = load_case(case, info)
        if not ct_channels:
            continue
        image = np.asarray(loaded["image"])
        label = loaded.get("label")
        mask = None if label is None else np.asarray(label)[0] > 0
        for c in ct_channels:
            values = image[c][mask] if mask is not None and mask.any() else None
            if values is not None:
                samples[c].append(_subsample(values, rng))
            else:
                fallback[c].append(_subsample(image[c].ravel(), rng))

    return normalization_from_samples(info, config, lambda c: samples[c] or fallback[c])


def normalization_from_samples(
    info: "DatasetInfo", config: "RunConfig", pool: Callable[[int], list[np.ndarray]]
) -> dict[str, Any]:
    """The preprocessing dict (:func:`fit_preprocessing`'s result) from pooled intensity samples.

    ``pool(c)`` gives the sample arrays of ``ct`` channel ``c`` (foreground voxels, or all
    voxels when no case has foreground); the clip is their [0.5, 99.5] percentiles (or
    ``normalization.ct_clip``), mean and std are over all of them. Shared by the fit over
    the training cases and by :func:`medseg.planning.fingerprint.preprocessing_from_fingerprint`.
    """
    schemes = channel_schemes(info, config)
    names = [info.channel_names[k] for k in sorted(info.channel_names)]
    fixed_clip = config.data.normalization.ct_clip
    channels: list[dict[str, Any]] = []
    for c, (name, scheme) in enumerate(zip(names, schemes)):
        entry: dict[str, Any] = {"name": str(name), "scheme": scheme}
        if scheme == "ct":
            arrays = pool(c)
            values = np.concatenate(arrays).astype(np.float64) if arrays else np.zeros(1)
            if fixed_clip is not None:
                low, high = float(fixed_clip[0]), float(fixed_clip[1])
            else:
                low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
            entry.update(clip=[low, high], mean=float(values.mean()), std=float(values.std()))
        channels.append(entry)
    return {"version": PREPROCESSING_VERSION, "channels": channels}


def _subsample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if values.size <= _FG_SAMPLES_PER_CASE:
        return np.array(values, dtype=np.float32)
    return values[rng.choice(values.size, _FG_SAMPLES_PER_CASE, replace=False)].astype(np.float32)


# --------------------------------------------------------------------------- custom transforms

class ToMetaTensord(MapTransform):
    """Wrap ``image``/``label`` arrays as MetaTensors carrying the case's affine.

    The affine comes from ``data["geometry"]`` (an ``ImageGeometry``) when present, else
    from an input that is already a MetaTensor. ``geometry`` and ``load_case``'s
    ``image_files`` / ``label_file`` are removed afterwards so the dict collates; the original geometry stays recoverable through the inverse of the
    spatial transforms (and ``image.meta["original_affine"]``).
    """

    def __init__(self, keys: Sequence[str], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        geometry = d.pop("geometry", None)
        for extra in _UNCOLLATABLE:
            d.pop(extra, None)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor) and geometry is None:
                continue
            affine = None
            if geometry is not None:  # a 2D image in its slice's plane (coronal, sagittal, tilted slices)
                matrix = planar_affine(geometry.affine) if geometry.ndim == 2 else np.array(geometry.affine)
                affine = torch.tensor(matrix, dtype=torch.float64)
            array = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(np.asarray(value))
            meta = {"original_affine": affine.clone() if affine is not None else None}
            if "name" in d:
                meta["filename_or_obj"] = str(d["name"])
            d[key] = MetaTensor(array, affine=affine, meta={k: v for k, v in meta.items() if v is not None})
        return d


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation with statistics from :func:`fit_preprocessing`.

    ``ct``: ``(clip(x, lo, hi) - mean) / max(std, 1e-8)`` with the training-set foreground
    statistics; ``zscore``: ``(x - mean(x)) / max(std(x), 1e-8)`` per image and channel;
    ``rescale_to_0_1``: ``(x - min(x)) / max(max(x) - min(x), 1e-8)`` per image and
    channel; ``rgb_to_0_1``: ``x / 255``; ``none``: unchanged (nnU-Net v2's
    normalisations of those names). Not spatial, so it has no inverse.
    """

    def __init__(self, keys: Sequence[str], preprocessing: Mapping[str, Any]) -> None:
        super().__init__(keys)
        self.channels = [dict(c) for c in preprocessing["channels"]]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.channels):
                raise ConfigError(
                    f"preprocessing: fitted for {len(self.channels)} channels, image has {image.shape[0]}"
                )
            out = image.clone().float() if isinstance(image, torch.Tensor) else torch.as_tensor(image).float()
            # in place on the one copy: a whole resampled CT is the peak of predict's memory
            for c, stats in enumerate(self.channels):
                x = out[c].as_tensor() if isinstance(out, MetaTensor) else out[c]
                if stats["scheme"] == "ct":
                    low, high = stats["clip"]
                    x.clamp_(low, high).sub_(stats["mean"]).div_(max(stats["std"], 1e-8))
                elif stats["scheme"] == "zscore":
                    mean, std = x.double().mean(), x.double().std(unbiased=False)
                    x.sub_(mean.float()).div_(max(float(std), 1e-8))
                elif stats["scheme"] == "rescale_to_0_1":
                    low = float(x.min())
                    x.sub_(low).div_(max(float(x.max()), 1e-8))
                elif stats["scheme"] == "rgb_to_0_1":
                    x.div_(255.0)
            d[key] = out
        return d


# --------------------------------------------------------------------------- pipelines

def _spatial_transforms(config: "RunConfig", keys: list[str], dims: int) -> list:
    transforms: list = []
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    if config.data.orientation:
        axcodes = config.data.orientation
        if len(axcodes) < dims:
            raise ConfigError(f"data.orientation: {axcodes!r} needs at least {dims} axis codes")
        # medseg affines are RAS+ (see medseg.data.io); say so rather than rely on MONAI's default
        labels = (("L", "R"), ("P", "A"), ("I", "S"))
        with warnings.catch_warnings():
            # MONAI 1.5+ warns about the old default of `labels` even when it is passed explicitly
            warnings.filterwarnings("ignore", message=".*Orientationd.__init__:labels.*", category=FutureWarning)
            transforms.append(Orientationd(keys=keys, axcodes=axcodes[:dims] if dims == 2 else axcodes, labels=labels))
    spacing = config.data.target_spacing
    if spacing is not None:
        if len(spacing) != dims:
            raise ConfigError(f"data.target_spacing: {list(spacing)} does not have {dims} values (data.patch_size has {dims})")
        transforms.append(Spacingd(keys=keys, pixdim=list(spacing), mode=modes, padding_mode="border"))
    return transforms


# nnU-Net's ANISO_THRESHOLD: a 3D patch whose longest side is more than this many times
# its shortest is rotated in-plane only (its "dummy 2D" augmentation).
ANISOTROPY_THRESHOLD = 3.0


def rotation_axes(patch: Sequence[int], projection_axes: Iterable[int] = ()) -> tuple[int, ...]:
    """The axes the affine augmentation may rotate about.

    3D: any of (0, 1, 2) (MONAI's ``rotate_range`` order: the entry of axis ``a`` turns the
    plane of the other two); 2D: (0,) for the one plane, () for none. Rotations happen on
    the voxel grid, so two rules take axes away:

    - a 3D patch whose longest side is more than :data:`ANISOTROPY_THRESHOLD` times its
      shortest (planned on thick slices, e.g. 64x64x14 at 0.8x0.8x3.5 mm) turns about the
      shortest side's axis only, as nnU-Net does: a turn that tilts the slices is a shear
      in millimetres (15 degrees made a 10 mm sphere 6-19 mm across);
    - whole-volume projection targets (the MIP loss's ``target_projection: volume``) are
      constant along their axis, and only a turn about that axis keeps them so: another
      turn moves the axis and smears the target (2D: no turn keeps it).
    """
    dims = len(patch)
    axes = set(range(3)) if dims == 3 else {0}
    if dims == 3:
        shortest = min(patch)
        if max(patch) > ANISOTROPY_THRESHOLD * shortest and list(patch).count(shortest) == 1:
            axes &= {list(patch).index(shortest)}
    for axis in set(projection_axes):
        axes &= {axis} if dims == 3 else set()
    return tuple(sorted(axes))


def _rotate_range(angle: float, dims: int, axes: Sequence[int]) -> list[float]:
    return [angle if a in axes else 0.0 for a in range(3 if dims == 3 else 1)]


def affine_augmentation(config: "RunConfig", projection_axes: Iterable[int] = ()) -> RandAffine | None:
    """The random rotation and scaling of ``data.augmentation`` (array transform), or None.

    Rotations only about :func:`rotation_axes` (``projection_axes``: the axes of the
    whole-volume targets, :func:`whole_volume_targets`).

    It always fires (``prob=1``): :mod:`medseg.training.sampling` draws whether a patch
    gets it (with ``affine_prob``), then draws its angles and scales
    (``randomize()``), reads the box those need around the patch
    (:func:`affine_box_margin`) and resamples image (bilinear) and label (nearest)
    with the same parameters (``randomize=False``). Input: the patch plus a margin on
    every side; output: the patch (``spatial_size``), centred on the input's centre.
    """
    aug = config.data.augmentation
    if aug.affine_prob <= 0:
        return None
    dims = config.spatial_dims
    angle = float(np.deg2rad(aug.rotate_range_deg))
    transform = RandAffine(
        prob=1.0,
        rotate_range=_rotate_range(angle, dims, rotation_axes(config.data.patch_size, projection_axes)),
        scale_range=[aug.scale_range] * dims,
        padding_mode="border",
        spatial_size=list(config.data.patch_size),
        cache_grid=True,
    )
    # MONAI resamples in float64 by default: a copy of the box at twice the size of the
    # float32 image, for no visible difference in a float32 patch
    transform.resampler.dtype = np.float32
    return transform


def affine_box_margin(matrix: np.ndarray, patch: Sequence[int]) -> tuple[int, ...]:
    """Voxels of context each side of ``patch`` that the linear map ``matrix`` samples.

    The affine maps an output voxel at offset ``x`` from the patch centre to
    ``matrix @ x`` in the input; along axis ``i`` the input reaches
    ``sum_j |matrix_ij| (p_j - 1) / 2`` over the patch corners, plus one voxel for the
    bilinear neighbour.
    """
    half = (np.asarray(patch, dtype=np.float64) - 1) / 2
    reach = np.abs(np.asarray(matrix, dtype=np.float64)) @ half
    return tuple(int(v) for v in np.maximum(np.ceil(reach - half + 1 - 1e-9), 0))


def affine_matrix(transform: RandAffine) -> np.ndarray:
    """The ``(dims, dims)`` map of ``transform``'s current parameters (after ``randomize()``):
    MONAI's ``rotate @ scale`` (no shear or translation here)."""
    grid = transform.rand_affine_grid
    scales = np.asarray(grid.scale_params, dtype=np.float64)
    dims = len(scales)
    rotation = np.asarray(create_rotate(dims, list(grid.rotate_params)), dtype=np.float64)[:dims, :dims]
    return rotation @ np.diag(scales)


def affine_margin(config: "RunConfig", projection_axes: Iterable[int] = ()) -> tuple[int, ...]:
    """The largest :func:`affine_box_margin` any draw of :func:`affine_augmentation` needs.

    Rotation angles up to ``rotate_range_deg`` about each of :func:`rotation_axes` and scale factors up to
    ``1 + scale_range``; the maximum over rotations is taken on a grid of 9 angles per
    axis (MONAI's own rotation matrices). A 96^3 patch at 15 degrees and 10 % scaling
    needs 29-31 voxels each side (a 154x158x154 read, 4.4 times the patch). nnU-Net
    reads such an enlarged box for every patch; medseg reads, for the ``affine_prob``
    share of patches that are rotated, the box of the angles drawn (on average a good
    deal smaller). Zeros when the affine is disabled.
    """
    aug = config.data.augmentation
    patch = list(config.data.patch_size)
    dims = len(patch)
    if aug.affine_prob <= 0:
        return (0,) * dims
    allowed = rotation_axes(patch, projection_axes)
    theta = float(np.deg2rad(aug.rotate_range_deg))
    angles = np.linspace(-theta, theta, 9)
    turns = [angles if a in allowed else [0.0] for a in range(3 if dims == 3 else 1)]
    grids = [(a,) for a in turns[0]] if dims == 2 else [(a, b, c) for a in turns[0] for b in turns[1] for c in turns[2]]
    scale = np.diag([1.0 + aug.scale_range] * dims)
    margin = np.zeros(dims, dtype=np.int64)
    for radians in grids:
        rotation = np.asarray(create_rotate(dims, list(radians)), dtype=np.float64)[:dims, :dims]
        margin = np.maximum(margin, affine_box_margin(rotation @ scale, patch))
    return tuple(int(v) for v in margin)


class ChannelwiseAdjustContrastd(RandAdjustContrastd):
    """MONAI's random gamma, ``x = ((x - min) / range) ** gamma * range + min``, with each
    channel's own min, range and gamma, as nnU-Net's ``GammaTransform(per_channel=True)``.

    MONAI's takes one min and range over all channels: a channel of another scale (a
    0-1000 ``noNorm`` channel beside a z-scored one) set the range the first channel was
    bent in (its std went from 1.4 to 3.4 in one patch). One channel draws as MONAI's
    does, so single-channel patches are unchanged.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=get_track_meta())
            if self._do_transform:
                channels = []
                for c in range(image.shape[0]):
                    self.adjuster.randomize(None)
                    channels.append(self.adjuster(image[c:c + 1], randomize=False))
                image = channels[0] if len(channels) == 1 else torch.cat(channels)
            d[key] = image
        return d


def patch_augmentations(config: "RunConfig", info: "DatasetInfo", label_keys: Sequence[str]) -> Compose:
    """The random transforms after the crop (and after :func:`affine_augmentation`).

    Flips per axis, 90-degree rotations in the first two axes, intensity scaling and
    shifting, Gaussian noise and smoothing, gamma (per channel), each with its probability from
    ``data.augmentation``; then ``label_keys`` cast to int64 (one label dtype for the
    whole batch: interpolation makes it float) and the label-derived targets the losses
    need (``CompositeLoss.target_transforms``), computed on the augmented patch.

    Raises
    ------
    ConfigError
        90-degree rotations on a patch whose first two axes differ.
    """
    aug = config.data.augmentation
    dims = config.spatial_dims
    both = ["image", *label_keys]
    patch = list(config.data.patch_size)
    transforms: list = []
    if aug.flip_prob > 0:
        transforms.extend(RandFlipd(keys=both, prob=aug.flip_prob, spatial_axis=axis) for axis in range(dims))
    if aug.rotate90_prob > 0:
        if patch[0] != patch[1]:
            raise ConfigError(
                f"data.augmentation.rotate90_prob: needs equal patch sizes in the first two axes, got {patch}"
            )
        moved = sorted({a for _, axes in whole_volume_targets(config, info) for a in axes} & {0, 1})
        if moved:
            raise ConfigError(
                f"data.augmentation.rotate90_prob: 90-degree rotations in axes 0 and 1 move the axis {moved[0]} of the "
                "MIP loss's whole-volume projection (target_projection: volume), which no longer matches the patch; "
                "set rotate90_prob to 0, project along another axis, or use target_projection: patch"
            )
        transforms.append(RandRotate90d(keys=both, prob=aug.rotate90_prob, max_k=3, spatial_axes=(0, 1)))
    if aug.intensity_scale_prob > 0:
        transforms.append(RandScaleIntensityd(keys="image", factors=0.25, prob=aug.intensity_scale_prob))
    if aug.intensity_shift_prob > 0:
        transforms.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=aug.intensity_shift_prob))
    if aug.gaussian_noise_prob > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=aug.gaussian_noise_prob, mean=0.0, std=0.1))
    if aug.gaussian_smooth_prob > 0:
        sigma = (0.5, 1.0)
        transforms.append(
            RandGaussianSmoothd(
                keys="image", prob=aug.gaussian_smooth_prob, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma
            )
        )
    if aug.gamma_prob > 0:
        transforms.append(ChannelwiseAdjustContrastd(keys="image", prob=aug.gamma_prob, gamma=(0.7, 1.5)))
    transforms.append(CastToTyped(keys=list(label_keys), dtype=torch.int64))
    loss = _loss_composite(config, info)
    if loss is not None:
        transforms += list(loss.target_transforms())
    return Compose(transforms)


def whole_volume_targets(config: "RunConfig", info: "DatasetInfo") -> list[tuple[str, tuple[int, ...]]]:
    """The label projections the losses want cropped with the label: ``(key, axes)`` pairs.

    These are the ``LabelProjectiond`` transforms of ``CompositeLoss.pre_crop_transforms``
    (the MIP loss's ``target_projection='volume'``): channel ``k`` of ``key`` is the
    foreground's maximum along ``axes[k]`` over the *whole* volume, broadcast back along
    that axis, so a patch cannot compute it from its own crop.

    Raises
    ------
    ConfigError
        A loss asks for a whole-volume target of another kind.
    """
    from medseg.data.topology_targets import LabelProjectiond

    loss = _loss_composite(config, info)
    targets: list[tuple[str, tuple[int, ...]]] = []
    for t in (loss.pre_crop_transforms() if loss is not None else []):
        if not isinstance(t, LabelProjectiond):
            raise ConfigError(f"losses: whole-volume target {type(t).__name__} is not supported by the patch sampler")
        dims = config.spatial_dims
        axes = tuple(int(a) % dims for a in t.transform.axes)
        targets.extend((str(key), axes) for key in t.output_keys)
    return targets


def _loss_composite(config: "RunConfig", info: "DatasetInfo"):
    """The configured loss (for the targets it wants precomputed), or None without medseg.losses."""
    try:
        from medseg.losses import build_loss
    except ImportError:  # pragma: no cover - the losses package is part of medseg
        return None
    return build_loss(config.losses, info.num_classes)


def preprocessing_transforms(
    config: "RunConfig", info: "DatasetInfo", preprocessing: Mapping[str, Any], keys: Sequence[str]
) -> list:
    """The deterministic part of every pipeline, in order; the normalisation comes last.

    ``[ToMetaTensord, Orientationd?, Spacingd?, NormalizeChannelsd]`` over ``keys``
    (``image``, and ``label`` when there is one). The preprocessing cache runs the list
    up to the normalisation, finds the non-zero bounding box on the resampled
    intensities, then normalises and crops (:mod:`medseg.preprocessing.case`).

    Raises
    ------
    ConfigError
        Spacing or orientation of the wrong length, preprocessing fitted for another
        channel count.
    """
    dims = config.spatial_dims
    if len(preprocessing["channels"]) != info.num_channels:
        raise ConfigError(
            f"preprocessing: fitted for {len(preprocessing['channels'])} channels, dataset has {info.num_channels}"
        )
    keys = list(keys)
    return [
        ToMetaTensord(keys=keys),
        *_spatial_transforms(config, keys, dims),
        NormalizeChannelsd(keys=["image"], preprocessing=preprocessing),
    ]


def build_transforms(
    config: "RunConfig",
    info: "DatasetInfo",
    preprocessing: Mapping[str, Any],
    mode: Literal["val", "infer"],
) -> Compose:
    """The whole-case MONAI pipeline for ``mode``: :func:`preprocessing_transforms`.

    Parameters
    ----------
    config : RunConfig
        ``data.*`` (orientation, target spacing, normalisation).
    info : DatasetInfo
        The dataset (channel count, checked against ``preprocessing``).
    preprocessing : dict
        :func:`fit_preprocessing`'s result (stored in checkpoints as ``preprocessing``).
    mode : {"val", "infer"}
        ``val``: whole preprocessed case with label; ``infer``: whole preprocessed
        image, invertible. Training patches are made from the preprocessing cache by
        :mod:`medseg.training.sampling`.

    Raises
    ------
    ConfigError
        Settings that cannot work together (spacing or orientation of the wrong length,
        preprocessing for another channel count).
    """
    if mode not in ("val", "infer"):
        raise ValueError(f"mode must be 'val' or 'infer', got {mode!r} (training patches: medseg.training.sampling)")
    keys = ["image"] if mode == "infer" else ["image", "label"]
    return Compose(preprocessing_transforms(config, info, preprocessing, keys))

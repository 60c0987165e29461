"""Preprocessing and augmentation: from a loaded case to a network-ready patch.

The pipeline is a MONAI :class:`~monai.transforms.Compose` over the dicts that
:func:`medseg.data.dataset.load_case` returns (``image`` ``(C, *spatial)`` float32,
``label`` ``(1, *spatial)`` int or absent, ``geometry``):

1. :class:`ToMetaTensord` wraps ``image``/``label`` as :class:`~monai.data.MetaTensor`
   carrying the case's affine (RAS+), so every spatial transform after it is recorded
   and can be inverted.
2. ``Orientationd(data.orientation)`` then ``Spacingd(data.target_spacing)`` (image
   bilinear, label nearest).
3. :class:`NormalizeChannelsd`: per-channel intensity normalisation with the statistics
   that :func:`fit_preprocessing` fitted on the training set (nnU-Net's scheme by channel
   name: ``CT`` -> clip to the foreground [0.5, 99.5] percentiles, then z-score with the
   foreground mean/std; any other channel -> per-image z-score).
4. ``train`` only: ``SpatialPadd`` to the patch size, ``RandCropByPosNegLabeld``
   (``data.foreground_oversample`` of the patches centred on foreground), the MONAI random
   augmentations enabled in ``data.augmentation``, and then the label-derived targets the
   losses need (``CompositeLoss.target_transforms``: skeletons, SAUNA maps), computed on
   the augmented patch. Whole-volume targets (``CompositeLoss.pre_crop_transforms``: the
   MIP loss's label projection) are made before the crop and cropped and augmented with
   the label. The label leaves as int64 ``(1, *patch)``.

``val`` stops after step 3 and keeps the label; ``infer`` has no label. Steps 1-3 are
deterministic, so :class:`monai.data.CacheDataset` caches their result and only step 4
runs per patch. The ``infer`` pipeline is invertible: ``Compose.inverse`` or
``monai.transforms.Invertd(keys="pred", transform=..., orig_keys="image")`` maps a
prediction made on the resampled grid back to the input's exact shape and affine.
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING, Any, Hashable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    DeleteItemsd,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from medseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig
    from medseg.data.dataset import Case, DatasetInfo

__all__ = [
    "PREPROCESSING_VERSION",
    "channel_schemes",
    "fit_preprocessing",
    "ToMetaTensord",
    "NormalizeChannelsd",
    "CropIndicesd",
    "build_transforms",
]

PREPROCESSING_VERSION = 1
# nnU-Net samples this many foreground voxels per case and channel for the CT statistics.
_FG_SAMPLES_PER_CASE = 10_000
# Patch centres are drawn from at most this many stored voxel indices per class (pos/neg)
# per case; all indices of a 512x512x300 CT would cost hundreds of MB per case.
_MAX_CROP_INDICES = 200_000
_INDEX_KEYS = ("label_fg_indices", "label_bg_indices")
# load_case bookkeeping that DataLoader collation cannot batch (paths, geometry objects)
_UNCOLLATABLE = ("image_files", "label_file")


# --------------------------------------------------------------------------- fitting

def channel_schemes(info: "DatasetInfo", config: "RunConfig") -> list[str]:
    """The normalisation scheme of each channel: ``ct``, ``zscore`` or ``none``.

    ``data.normalization.scheme: auto`` picks ``ct`` for channels named ``CT``
    (case-insensitive, as nnU-Net does) and ``zscore`` for all others; any other value
    applies to every channel.
    """
    scheme = config.data.normalization.scheme
    names = [info.channel_names[k] for k in sorted(info.channel_names)]
    if scheme == "auto":
        return ["ct" if str(n).strip().lower() == "ct" else "zscore" for n in names]
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

    channels: list[dict[str, Any]] = []
    names = [info.channel_names[k] for k in sorted(info.channel_names)]
    fixed_clip = config.data.normalization.ct_clip
    for c, (name, scheme) in enumerate(zip(names, schemes)):
        entry: dict[str, Any] = {"name": str(name), "scheme": scheme}
        if scheme == "ct":
            pool = samples[c] or fallback[c]
            values = np.concatenate(pool).astype(np.float64) if pool else np.zeros(1)
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
            affine = torch.tensor(np.array(geometry.affine), dtype=torch.float64) if geometry is not None else None
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
    ``none``: unchanged. Not spatial, so it has no inverse.
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
            for c, stats in enumerate(self.channels):
                x = out[c]
                if stats["scheme"] == "ct":
                    low, high = stats["clip"]
                    x = (x.clamp(low, high) - stats["mean"]) / max(stats["std"], 1e-8)
                elif stats["scheme"] == "zscore":
                    plain = x.as_tensor() if isinstance(x, MetaTensor) else x
                    mean, std = plain.double().mean(), plain.double().std(unbiased=False)
                    x = (x - mean.float()) / max(float(std), 1e-8)
                out[c] = x
            d[key] = out
        return d


class CropIndicesd(MapTransform):
    """Store foreground / background voxel indices of ``label`` for patch sampling.

    Deterministic (cached by CacheDataset) so ``RandCropByPosNegLabeld`` does not scan
    the label for every patch; each list is subsampled to at most ``max_indices``
    entries with a fixed seed, which keeps large CT volumes cheap while patch centres stay
    uniform over the class.
    """

    def __init__(self, label_key: str = "label", max_indices: int = _MAX_CROP_INDICES) -> None:
        super().__init__([label_key])
        self.label_key = label_key
        self.max_indices = max_indices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        flat = (np.asarray(label.detach().cpu()) if isinstance(label, torch.Tensor) else np.asarray(label))[0].ravel()
        rng = np.random.default_rng(0)
        for key, mask in zip(_INDEX_KEYS, (flat > 0, flat <= 0)):
            idx = np.flatnonzero(mask)
            if idx.size > self.max_indices:
                idx = np.sort(rng.choice(idx, self.max_indices, replace=False))
            d[key] = idx
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


def _augmentations(config: "RunConfig", dims: int, label_keys: list[str]) -> list:
    aug = config.data.augmentation
    both = ["image", *label_keys]
    patch = list(config.data.patch_size)
    transforms: list = []
    if aug.affine_prob > 0:
        angle = float(np.deg2rad(aug.rotate_range_deg))
        transforms.append(
            RandAffined(
                keys=both,
                prob=aug.affine_prob,
                rotate_range=[angle] * (3 if dims == 3 else 1),
                scale_range=[aug.scale_range] * dims,
                mode=["bilinear"] + ["nearest"] * len(label_keys),
                padding_mode="border",
                spatial_size=patch,
                cache_grid=True,
            )
        )
    if aug.flip_prob > 0:
        transforms.extend(RandFlipd(keys=both, prob=aug.flip_prob, spatial_axis=axis) for axis in range(dims))
    if aug.rotate90_prob > 0:
        if patch[0] != patch[1]:
            raise ConfigError(
                f"data.augmentation.rotate90_prob: needs equal patch sizes in the first two axes, got {patch}"
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
        transforms.append(RandAdjustContrastd(keys="image", prob=aug.gamma_prob, gamma=(0.7, 1.5)))
    return transforms


def _loss_composite(config: "RunConfig", info: "DatasetInfo"):
    """The configured loss (for the targets it wants precomputed), or None without medseg.losses."""
    try:
        from medseg.losses import build_loss
    except ImportError:  # pragma: no cover - the losses package is part of medseg
        return None
    return build_loss(config.losses, info.num_classes)


def _output_keys(transforms: list) -> list[str]:
    keys: list[str] = []
    for t in transforms:
        keys.extend(str(k) for k in getattr(t, "output_keys", ()) or ())
    return keys


def build_transforms(
    config: "RunConfig",
    info: "DatasetInfo",
    preprocessing: Mapping[str, Any],
    mode: Literal["train", "val", "infer"],
) -> Compose:
    """The MONAI pipeline for ``mode`` (see the module docstring for the steps).

    Parameters
    ----------
    config : RunConfig
        ``data.*`` (orientation, target spacing, patch size, foreground oversampling,
        augmentation) and ``losses`` (extra label-derived targets).
    info : DatasetInfo
        The dataset (channel count, checked against ``preprocessing``).
    preprocessing : dict
        :func:`fit_preprocessing`'s result (stored in checkpoints as ``preprocessing``).
    mode : {"train", "val", "infer"}
        ``train``: random patches of ``data.patch_size`` with augmentation, one dict per
        call (``RandCropByPosNegLabeld`` returns a list of one); ``val``: whole
        preprocessed case with label; ``infer``: whole preprocessed image, invertible.

    Raises
    ------
    ConfigError
        Settings that cannot work together (spacing or orientation of the wrong length,
        90-degree rotations on a non-square patch, preprocessing for another channel count).
    """
    if mode not in ("train", "val", "infer"):
        raise ValueError(f"mode must be 'train', 'val' or 'infer', got {mode!r}")
    dims = config.spatial_dims
    if len(preprocessing["channels"]) != info.num_channels:
        raise ConfigError(
            f"preprocessing: fitted for {len(preprocessing['channels'])} channels, dataset has {info.num_channels}"
        )
    keys = ["image"] if mode == "infer" else ["image", "label"]
    transforms: list = [ToMetaTensord(keys=keys)]
    transforms += _spatial_transforms(config, keys, dims)
    transforms.append(NormalizeChannelsd(keys=["image"], preprocessing=preprocessing))
    if mode == "train":
        patch = list(config.data.patch_size)
        pos = config.data.foreground_oversample
        loss = _loss_composite(config, info)
        # whole-volume targets (e.g. the MIP loss's label projection) are made before the
        # crop and then cropped and augmented like the label
        pre_crop = list(loss.pre_crop_transforms()) if loss is not None else []
        label_keys = ["label", *_output_keys(pre_crop)]
        keys = ["image", *label_keys]
        transforms += pre_crop
        transforms += [
            SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),
            CropIndicesd("label"),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=patch,
                pos=pos,
                neg=1.0 - pos,
                num_samples=1,
                fg_indices_key=_INDEX_KEYS[0],
                bg_indices_key=_INDEX_KEYS[1],
                allow_smaller=False,
            ),
            DeleteItemsd(keys=list(_INDEX_KEYS)),
        ]
        transforms += _augmentations(config, dims, label_keys)
        # one label dtype for the whole batch (interpolating augmentations make it float)
        transforms.append(CastToTyped(keys=label_keys, dtype=torch.int64))
        if loss is not None:
            transforms += list(loss.target_transforms())
    return Compose(transforms)

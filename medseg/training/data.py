"""The training run's data: validated cases, fitted preprocessing, cached pipelines."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

from monai.data import CacheDataset
from monai.transforms import Compose, Transform

from medseg.config import RunConfig
from medseg.data.dataset import Case, DatasetInfo, check_dataset, load_case, split_cases
from medseg.data.transforms import build_transforms, fit_preprocessing
from medseg.errors import ConfigError, DataError, MedsegError

log = logging.getLogger("medseg.training")


class LoadCase(Transform):
    """``Case`` -> :func:`load_case` dict; the first (cached) step of the training pipeline."""

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info

    def __call__(self, case: Case) -> dict[str, Any]:
        return load_case(case, self.info)


@dataclass
class TrainingData:
    """Everything the trainer needs from the dataset, prepared before any output is written."""

    info: DatasetInfo
    train_cases: list[Case]
    val_cases: list[Case]
    preprocessing: dict[str, Any]
    train_set: CacheDataset  # yields augmented patches (see medseg.training.sampling)
    val_items: list[dict[str, Any]]  # preprocessed whole validation cases, kept in memory


def unwrap_medseg_error(err: BaseException) -> BaseException:
    """MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; find ours."""
    seen = err
    while seen is not None:
        if isinstance(seen, MedsegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _checked(cases: list[Case], info: DatasetInfo, cfg: RunConfig) -> Iterator[dict[str, Any]]:
    """Load each case (raising DataError naming the file) and check its dimensionality."""
    dims = cfg.spatial_dims
    for case in cases:
        loaded = load_case(case, info)
        if loaded["label"] is None:
            raise DataError(f"case '{case.name}': no label file (labelsTr/{case.name}{info.file_ending})")
        ndim = loaded["image"].ndim - 1
        if ndim != dims:
            raise ConfigError(
                f"data.patch_size: {list(cfg.data.patch_size)} has {dims} values but case '{case.name}' is {ndim}D "
                f"(shape {tuple(loaded['image'].shape[1:])})"
            )
        yield loaded


def prepare_data(cfg: RunConfig, preprocessing: dict[str, Any] | None = None) -> TrainingData:
    """Validate the dataset, split it, fit (or reuse) preprocessing, build the cached datasets.

    Every training and validation case is read once up front, so a bad file stops the run
    with a :class:`DataError` naming it before anything is written. ``preprocessing``
    given (a resumed run) is reused instead of refitted.
    """
    root = cfg.data.dataset
    info, cases = check_dataset(root, "Tr")
    if not cases:
        raise DataError(f"{root}: no training cases in imagesTr/")
    if info.ignore_label is not None:
        raise DataError(f"{info.dataset_json}: the 'ignore' label is not supported by the medseg trainer yet")
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.seed, cfg.data.split_file, root=root)
    if not train_cases:
        raise DataError(f"{root}: the split leaves no training cases")

    checked = _checked(train_cases, info, cfg)
    if preprocessing is None:
        preprocessing = fit_preprocessing(checked, info, cfg)
    else:
        for _ in checked:
            pass

    val_tf = build_transforms(cfg, info, preprocessing, "val")
    val_items = [_apply(val_tf, item) for item in _checked(val_cases, info, cfg)]

    train_tf = build_transforms(cfg, info, preprocessing, "train")
    train_pipeline = Compose([LoadCase(info), *train_tf.transforms])
    try:
        train_set = CacheDataset(
            train_cases, transform=train_pipeline, cache_rate=cfg.data.cache_rate, num_workers=1, progress=False
        )
    except Exception as err:
        raise unwrap_medseg_error(err) from None
    log.info(
        "dataset %s: %d training / %d validation cases, %d channel(s), classes %s",
        info.name,
        len(train_cases),
        len(val_cases),
        info.num_channels,
        ", ".join(f"{v}={k}" for k, v in sorted(info.labels.items(), key=lambda kv: kv[1])),
    )
    return TrainingData(info, train_cases, val_cases, preprocessing, train_set, val_items)


def _apply(transform: Compose, item: dict[str, Any]) -> dict[str, Any]:
    try:
        return transform(item)
    except Exception as err:
        raise unwrap_medseg_error(err) from None

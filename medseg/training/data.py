"""The training run's data: the split, the preprocessing cache, patches and validation cases.

:func:`prepare_data` preprocesses whatever the cache lacks (:mod:`medseg.preprocessing`:
every case once, in worker processes, before anything of the run is written, so a bad
file stops the run with a :class:`~medseg.errors.DataError` naming it), then gives the
trainer a :class:`~medseg.training.sampling.PatchSource` over the training cases and
:class:`ValidationCases`, which reads one whole validation case at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from medseg import distributed
from medseg.config import RunConfig
from medseg.data.dataset import Case, DatasetInfo
from medseg.preprocessing import CachedCase, PreprocessedDataset, preprocess_dataset, select_cases
from medseg.preprocessing.case import unwrap_medseg_error
from medseg.training.sampling import PatchSource

__all__ = ["TrainingData", "ValidationCases", "prepare_data", "unwrap_medseg_error"]

log = logging.getLogger("medseg.training")


class ValidationCases(Sequence):
    """Whole preprocessed cases read from the cache on access, one at a time:
    ``{"name", "image": (C, *shape) float32, "label": (1, *shape)}`` tensors."""

    def __init__(self, cases: Sequence[CachedCase]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        case = self.cases[index]
        image, label = case.whole()
        return {"name": case.name, "image": torch.from_numpy(image), "label": torch.from_numpy(label)}


@dataclass
class TrainingData:
    """Everything the trainer needs from the dataset, prepared before any output is written."""

    info: DatasetInfo
    train_cases: list[Case]
    val_cases: list[Case]
    preprocessing: dict[str, Any]
    cache: PreprocessedDataset
    train_set: PatchSource  # augmented patches (see medseg.training.sampling)
    val_items: ValidationCases  # whole validation cases, read one at a time


def prepare_data(cfg: RunConfig, preprocessing: dict[str, Any] | None = None,
                 split: dict[str, list[str]] | None = None) -> TrainingData:
    """Split the dataset, fill the preprocessing cache where needed, build the patch source.

    ``preprocessing`` given (a resumed run's statistics) is used instead of the fitted
    (or cached) ones; ``split`` (a resumed run's) keeps its cases where they were
    (:func:`~medseg.preprocessing.run.select_cases`).
    """
    info, train_cases, val_cases = select_cases(cfg, split)
    cache = preprocess_dataset(cfg, info, train_cases, val_cases, preprocessing=preprocessing)
    try:
        train_set = PatchSource([cache.cases[c.name] for c in train_cases], cfg, info)
    except Exception as err:
        raise unwrap_medseg_error(err) from None
    log.info(
        "dataset %s: %d training / %d validation cases, %d channel(s), classes %s; cache %s",
        info.name,
        len(train_cases),
        len(val_cases),
        info.num_channels,
        ", ".join(f"{v}={k}" for k, v in sorted(info.labels.items(), key=lambda kv: kv[1])),
        cache.folder,
    )
    present = {v for c in train_cases for v, n in cache.cases[c.name].class_counts.items() if n > 0}
    missing = [(name, v) for name, v in info.foreground_labels.items() if v not in present]
    if missing and distributed.is_main():  # trained on in silence, with "val Dice 0.0000 *best*"
        log.warning("no training case contains class(es) %s: the network cannot learn them; check the labels "
                    "(and dataset.json's label values)", ", ".join(f"{v} ({name})" for name, v in missing))
    val_items = ValidationCases([cache.cases[c.name] for c in val_cases])
    return TrainingData(info, train_cases, val_cases, cache.preprocessing, cache, train_set, val_items)

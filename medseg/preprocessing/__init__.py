"""Preprocessing: every case once through the deterministic pipeline, into an on-disk cache.

``medseg preprocess CONFIG.yaml`` (and ``medseg train``, when the cache is missing or
incomplete) reorients, resamples, normalises and crops each training and validation
case once and stores it where training reads patches from it without loading whole
cases:

- :mod:`medseg.preprocessing.case`: one case through
  :func:`medseg.data.transforms.preprocessing_transforms`, cropped to its non-zero
  region, with its class locations and projections;
- :mod:`medseg.preprocessing.storage`: the Blosc2 files of a case (why Blosc2: the
  measurement is in its docstring), atomic writes, region reads;
- :mod:`medseg.preprocessing.cache`: where the cache lives and the key that keeps a
  stale cache from being reused;
- :mod:`medseg.preprocessing.run`: the parallel, resumable, torchrun-sharded run.
"""

from medseg.preprocessing.cache import default_cache_dir
from medseg.preprocessing.case import PreprocessedCase, preprocess_case
from medseg.preprocessing.run import (
    PreprocessedDataset,
    available_cpus,
    preprocess_dataset,
    run_preprocessing,
    select_cases,
)
from medseg.preprocessing.storage import CachedCase

__all__ = [
    "CachedCase",
    "PreprocessedCase",
    "PreprocessedDataset",
    "available_cpus",
    "default_cache_dir",
    "preprocess_case",
    "preprocess_dataset",
    "run_preprocessing",
    "select_cases",
]

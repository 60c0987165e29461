"""Reading datasets: images with their geometry (:mod:`medseg.data.io`), nnU-Net / MSD
dataset folders (:mod:`medseg.data.dataset`) and synthetic vessel datasets
(:mod:`medseg.data.synthetic`). Transforms live in :mod:`medseg.data.transforms`.
"""

from medseg.data.dataset import (
    Case,
    DatasetInfo,
    DatasetWarning,
    cases_from_paths,
    check_dataset,
    label_dtype,
    label_statistics,
    list_cases,
    load_case,
    read_dataset_json,
    safe_join,
    split_cases,
    write_dataset_json,
)
from medseg.data.io import (
    SUPPORTED_ENDINGS,
    ImageGeometry,
    ending_of,
    read_image,
    read_image_channels,
    strip_ending,
    write_image,
)

__all__ = [
    "SUPPORTED_ENDINGS",
    "ImageGeometry",
    "ending_of",
    "strip_ending",
    "read_image",
    "read_image_channels",
    "write_image",
    "Case",
    "DatasetInfo",
    "DatasetWarning",
    "read_dataset_json",
    "write_dataset_json",
    "list_cases",
    "cases_from_paths",
    "split_cases",
    "load_case",
    "label_dtype",
    "check_dataset",
    "safe_join",
    "label_statistics",
]

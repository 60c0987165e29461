"""Preparing public datasets: download, verify, unpack, convert to the nnU-Net v2 layout.

One module per step, used by the thin scripts in ``data_scripts/``:

- :mod:`~medseg.data.prepare.registry`: which datasets can be fetched, from where, with
  which published checksum;
- :mod:`~medseg.data.prepare.download`: resumable HTTP download with checksum
  verification and an atomic final rename;
- :mod:`~medseg.data.prepare.archive`: safe unpacking of ``.tar``/``.tar.gz``/``.zip``;
- :mod:`~medseg.data.prepare.msd`: Medical Segmentation Decathlon task folder -> nnU-Net
  v2 dataset (4D images split into ``_0000``, ``_0001`` channel files);
- :mod:`~medseg.data.prepare.natural2d`: folders of PNG/TIFF images and masks -> nnU-Net
  v2 dataset of 2D images.

The output of every converter is a folder that :func:`medseg.data.dataset.check_dataset`
reads. Nothing here imports torch.
"""

from medseg.data.prepare.archive import extract_archive
from medseg.data.prepare.download import DownloadError, download_file, file_digest, verify_file
from medseg.data.prepare.msd import convert_msd_task
from medseg.data.prepare.natural2d import convert_2d_folders
from medseg.data.prepare.registry import REGISTRY, DatasetSource, get_source

__all__ = [
    "REGISTRY",
    "DatasetSource",
    "DownloadError",
    "convert_2d_folders",
    "convert_msd_task",
    "download_file",
    "extract_archive",
    "file_digest",
    "get_source",
    "verify_file",
]

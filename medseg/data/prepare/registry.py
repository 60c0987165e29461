"""Public datasets that ``data_scripts/download.py`` can fetch, with their published checksums.

Medical Segmentation Decathlon (MSD, http://medicaldecathlon.com/, CC BY-SA 4.0): the
ten task archives as hosted on the public ``msd-for-monai`` AWS bucket, with the MD5
digests MONAI publishes for exactly these files (``monai.apps.DecathlonDataset.resource``
and ``.md5``; copied from MONAI 1.6.1). The archives are plain ``.tar`` files holding one
``TaskNN_Name/`` folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``).

A checksum we could not check against a published value is ``None``; the downloader then
says the download is unverified instead of pretending. Sizes are not published next to
the checksums, so ``size`` is ``None`` too and the byte count is taken from the server
(``Content-Length``) and checked against what arrived.

Datasets behind a registration form (DRIVE, CHASE_DB1 mirrors, TopoMortar releases)
are not listed: download them by hand and convert them with ``data_scripts/convert_2d.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from medseg.errors import DataError

__all__ = ["DatasetSource", "REGISTRY", "MSD_BASE_URL", "get_source"]

MSD_BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
MSD_CHECKSUM_SOURCE = "MONAI monai.apps.DecathlonDataset.md5"


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset archive lives and how to recognise the right bytes.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"Task08_HepaticVessel"``.
    filename : str
        Archive file name, appended to the base URL.
    base_url : str
        Default base URL (``--url`` or ``$MEDSEG_DATA_BASE_URL`` replace it).
    md5, sha256 : str or None
        Published digest (lower-case hex); ``None`` when none is published.
    size : int or None
        Expected size in bytes when published.
    kind : str
        Converter to run after unpacking: ``"msd"``.
    dataset_id : int
        Number used in the converted folder name ``DatasetNNN_Name`` (nnU-Net style).
    description, license, checksum_source : str
        Shown by ``download.py --list``; ``checksum_source`` says where the digest is published.
    """

    name: str
    filename: str
    base_url: str
    md5: str | None
    sha256: str | None = None
    size: int | None = None
    kind: str = "msd"
    dataset_id: int = 0
    description: str = ""
    license: str = ""
    checksum_source: str = ""

    def url(self, base_url: str | None = None) -> str:
        """Archive URL under ``base_url`` (default: :attr:`base_url`)."""
        base = (base_url or self.base_url).rstrip("/")
        return f"{base}/{self.filename}"

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hexdigest)``, SHA-256 preferred, or ``None`` (unverified)."""
        if self.sha256:
            return ("sha256", self.sha256)
        if self.md5:
            return ("md5", self.md5)
        return None

    @property
    def converted_name(self) -> str:
        """Folder name of the converted dataset: ``Task08_HepaticVessel`` -> ``Dataset008_HepaticVessel``."""
        short = self.name.split("_", 1)[1] if "_" in self.name else self.name
        return f"Dataset{self.dataset_id:03d}_{short}"


def _msd(number: int, short: str, md5: str, description: str) -> DatasetSource:
    name = f"Task{number:02d}_{short}"
    return DatasetSource(
        name=name,
        filename=f"{name}.tar",
        base_url=MSD_BASE_URL,
        md5=md5,
        kind="msd",
        dataset_id=number,
        description=f"MSD {description}",
        license="CC BY-SA 4.0",
        checksum_source=MSD_CHECKSUM_SOURCE,
    )


REGISTRY: dict[str, DatasetSource] = {
    s.name: s
    for s in (
        _msd(1, "BrainTumour", "240a19d752f0d9e9101544901065d872", "brain tumour, 4-channel MRI (FLAIR, T1w, T1gd, T2w)"),
        _msd(2, "Heart", "06ee59366e1e5124267b774dbd654057", "left atrium, MRI"),
        _msd(3, "Liver", "a90ec6c4aa7f6a3d087205e23d4e6397", "liver and liver tumour, CT"),
        _msd(4, "Hippocampus", "9d24dba78a72977dbd1d2e110310f31b", "hippocampus head and body, MRI"),
        _msd(5, "Prostate", "35138f08b1efaef89d7424d2bcc928db", "prostate zones, 2-channel MRI (T2, ADC)"),
        _msd(6, "Lung", "8afd997733c7fc0432f71255ba4e52dc", "lung tumour, CT"),
        _msd(7, "Pancreas", "4f7080cfca169fa8066d17ce6eb061e4", "pancreas and tumour, CT"),
        _msd(8, "HepaticVessel", "641d79e80ec66453921d997fbf12a29c", "hepatic vessels and tumour, CT"),
        _msd(9, "Spleen", "410d4a301da4e5b2f6f86ec3ddba524e", "spleen, CT"),
        _msd(10, "Colon", "bad7a188931dc2f6acf72b08eb6202d0", "colon cancer, CT"),
    )
}


def get_source(name: str) -> DatasetSource:
    """Look a dataset up by its registry name (case-insensitive; ``Task08`` also works).

    Raises
    ------
    DataError
        Unknown name; the message lists the known ones.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    lowered = name.lower()
    matches = [s for key, s in REGISTRY.items() if key.lower() == lowered or key.lower().split("_")[0] == lowered]
    if len(matches) == 1:
        return matches[0]
    raise DataError(f"unknown dataset '{name}' (known: {', '.join(REGISTRY)})")

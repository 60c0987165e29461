"""Where the preprocessed cases live, and when a cache may be reused.

Layout (``data.cache_dir``; default ``$MEDSEG_CACHE``, else ``$XDG_CACHE_HOME/medseg``,
else ``~/.cache/medseg``; outside the dataset, which stays read-only)::

    CACHE_DIR/
        DATASETNAME-KEY16/          one folder per dataset and plan
            manifest.json           what the key was computed from, the statistics
            CASE.b2nd  CASE_seg.b2nd  CASE.json    (medseg.preprocessing.storage)
        statistics/DATASETNAME-FITKEY16.json       fitted normalisation statistics

``KEY16`` is the first 16 hex digits of the SHA-256 of :func:`cache_inputs`: the
dataset (its absolute path, ``dataset.json``'s bytes, and every case file's name, size
and modification time), the settings that change a preprocessed voxel
(``data.orientation``, ``data.target_spacing``, ``data.normalization``, the
dimensionality), the normalisation statistics themselves, the medseg version, the
preprocessing version and the cache format. Anything else (patch size, augmentation,
losses, model) may change without touching the cache. A changed plan, a changed file or
another medseg version gives another folder: a stale cache is never reused, it is
rebuilt beside the old one (which can be deleted). Rebuilt case by case: a case whose
own inputs (its files, and :func:`shared_inputs`: the settings, the statistics,
dataset.json's channels and labels) are those of a case in an earlier folder of the
dataset is linked from there (:func:`unchanged_elsewhere`,
:func:`medseg.preprocessing.storage.link_case`), so adding a case or touching one file
preprocesses that case alone, unless the normalisation statistics changed with it.

Sizes, times and inode numbers (:func:`medseg.atomic.file_stamp`), not content hashes,
identify the files: hashing a 40-case CT dataset reads gigabytes at every start. A file
rewritten in place gets new times; one replaced by another of the same size that kept
its modification time (``mv``, ``cp -p``, ``rsync -a``, a tar archive's whole-second
times) has another inode and status-change time, which no user program can set. A
``touch`` or ``chmod`` only costs a rebuild.

The statistics (``fit_preprocessing``) are part of the key, and fitting them reads
every training case; ``statistics/`` keeps each fit under a key of what it depends on
(the training cases' files, the split, the seed, ``data.normalization``), so a rerun
or a second run on the same split finds them without reading the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import medseg
from medseg.data.dataset import Case, DatasetInfo, label_dtype
from medseg.data.transforms import PREPROCESSING_VERSION, channel_schemes
from medseg.errors import MedsegError
from medseg.preprocessing.case import MAX_CLASS_LOCATIONS
from medseg.atomic import write_atomic
from medseg.preprocessing.storage import CASE_FORMAT, remove_stale_temporaries_of

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig

__all__ = [
    "default_cache_dir",
    "cache_root",
    "dataset_fingerprint",
    "cache_inputs",
    "shared_inputs",
    "statistics_inputs",
    "digest",
    "cache_folder",
    "read_statistics",
    "write_statistics",
    "write_manifest",
    "unchanged_elsewhere",
]


def default_cache_dir() -> Path:
    """``$MEDSEG_CACHE``, else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``
    (``%LOCALAPPDATA%/medseg/cache`` on Windows)."""
    if os.environ.get("MEDSEG_CACHE"):
        return Path(os.environ["MEDSEG_CACHE"]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "medseg" / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "medseg"


def cache_root(config: "RunConfig") -> Path:
    """``data.cache_dir`` (relative to the working directory), else :func:`default_cache_dir`."""
    return Path(config.data.cache_dir) if config.data.cache_dir is not None else default_cache_dir()


def _file_entry(root: Path, path: Path) -> list[Any]:
    """``[name, size, mtime_ns, ctime_ns, inode]`` (:func:`medseg.atomic.file_stamp`)."""
    from medseg.atomic import file_stamp

    try:
        stamp = file_stamp(path)
    except OSError as err:
        from medseg.errors import DataError

        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return [name, *stamp]


def dataset_fingerprint(info: DatasetInfo, cases: Iterable[Case]) -> dict[str, Any]:
    """What identifies the dataset's content: path, ``dataset.json``, each file's size,
    times and inode (:func:`_file_entry`)."""
    root = Path(os.path.abspath(info.root))
    files = {}
    for case in sorted(cases, key=lambda c: c.name):
        paths = list(case.image_files) + ([case.label_file] if case.label_file is not None else [])
        files[case.name] = [_file_entry(root, Path(p)) for p in paths]
    return {
        "root": str(root),
        "dataset_json": hashlib.sha256(info.dataset_json.read_bytes()).hexdigest(),
        # what of dataset.json a preprocessed voxel depends on (its numTraining,
        # name or description do not): a case's identity (shared_inputs)
        "channel_names": {str(k): v for k, v in sorted(info.channel_names.items())},
        "labels": dict(sorted(info.labels.items())),
        "file_ending": info.file_ending,
        "cases": files,
    }


def _versions() -> dict[str, Any]:
    return {"cache_format": CASE_FORMAT, "preprocessing": PREPROCESSING_VERSION, "medseg": medseg.__version__}


def statistics_inputs(
    config: "RunConfig", info: DatasetInfo, fingerprint: dict[str, Any], train_cases: Iterable[Case]
) -> dict[str, Any]:
    """What :func:`~medseg.data.transforms.fit_preprocessing` depends on."""
    names = sorted(c.name for c in train_cases)
    return {
        **_versions(),
        "dataset_json": fingerprint["dataset_json"],
        "train": {n: fingerprint["cases"][n] for n in names},
        "seed": config.seed,
        "normalization": config.data.normalization.model_dump(mode="json"),
        "schemes": channel_schemes(info, config),
    }


def cache_inputs(
    config: "RunConfig", info: DatasetInfo, fingerprint: dict[str, Any], preprocessing: dict[str, Any]
) -> dict[str, Any]:
    """Everything that affects a preprocessed voxel (see the module docstring)."""
    data = config.data
    return {
        **_versions(),
        "dataset": fingerprint,
        "spatial_dims": config.spatial_dims,
        "orientation": data.orientation,
        "target_spacing": list(data.target_spacing) if data.target_spacing is not None else None,
        "normalization": data.normalization.model_dump(mode="json"),
        "statistics": preprocessing,
        "label_dtype": label_dtype(info).str,
        "crop": "nonzero",
        "max_class_locations": MAX_CLASS_LOCATIONS,
    }


def shared_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """What every case of a cache folder depends on besides its own files: :func:`cache_inputs`
    without the dataset's cases (another case's files do not change this one's voxels;
    the statistics, which may depend on them, are in) and with dataset.json's channels,
    labels and file ending instead of its bytes (adding a case changes its
    ``numTraining``). A case is unchanged from another folder's when these are equal and
    so are its own files' entries. A cache of an earlier medseg (another version in its
    inputs, none of these keys) matches no case."""
    dataset = {k: v for k, v in (inputs.get("dataset") or {}).items() if k not in ("dataset_json", "cases")}
    return {**inputs, "dataset": dataset}


def unchanged_elsewhere(root: Path, info: DatasetInfo, folder: Path, inputs: dict[str, Any],
                        names: Iterable[str]) -> dict[str, tuple[Path, str]]:
    """For each case of ``names`` that another cache folder of this dataset made from the
    same inputs (:func:`shared_inputs` equal, and the case's files): that folder and its
    key. The newest folder first."""
    names = list(names)
    found: dict[str, tuple[Path, str]] = {}
    try:
        others = [p for p in root.glob(f"{_safe_name(info.name)}-*") if p != folder and p.is_dir()]
    except OSError:
        return found
    shared, files = shared_inputs(inputs), inputs["dataset"]["cases"]
    for other in sorted(others, key=_modified, reverse=True):
        try:
            manifest = json.loads((other / "manifest.json").read_text())
            theirs, key = manifest["inputs"], manifest["key"]
            cases = theirs["dataset"]["cases"]
            if shared_inputs(theirs) != shared:
                continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for name in names:
            if name not in found and name in cases and cases[name] == files.get(name):
                found[name] = (other, str(key))
    return found


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def digest(inputs: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``inputs``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "dataset"


def cache_folder(root: Path, info: DatasetInfo, key: str) -> Path:
    return root / f"{_safe_name(info.name)}-{key[:16]}"


def _statistics_path(root: Path, info: DatasetInfo, fit_key: str) -> Path:
    return root / "statistics" / f"{_safe_name(info.name)}-{fit_key[:16]}.json"


def read_statistics(root: Path, info: DatasetInfo, fit_key: str) -> dict[str, Any] | None:
    """Statistics fitted earlier under ``fit_key``, or None."""
    try:
        stored = json.loads(_statistics_path(root, info, fit_key).read_text())
    except (OSError, ValueError):
        return None
    return stored.get("preprocessing") if stored.get("key") == fit_key else None


def _writing(folder: Path, action) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        action()
    except OSError as err:
        raise MedsegError(f"{folder}: cannot write the preprocessing cache ({err.strerror or err})") from None


def _remove_dead_temporaries_of(path: Path) -> None:
    """What a writer of ``path`` killed midway left beside it (see remove_stale_temporaries);
    best effort: a cache on a read-only mount is only read."""
    if path.parent.is_dir():
        try:
            remove_stale_temporaries_of(path.parent, [path.name])
        except OSError:
            pass


def write_statistics(root: Path, info: DatasetInfo, fit_key: str, preprocessing: dict[str, Any]) -> None:
    path = _statistics_path(root, info, fit_key)
    _remove_dead_temporaries_of(path)
    text = json.dumps({"key": fit_key, "preprocessing": preprocessing}, indent=1, sort_keys=True) + "\n"
    _writing(path.parent, lambda: write_atomic(path, text.encode()))


def write_manifest(folder: Path, key: str, inputs: dict[str, Any], cases: list[str]) -> None:
    """``manifest.json`` of a cache folder (written once; an existing one of the same key is kept).

    Raises
    ------
    MedsegError
        The folder cannot be created or written (named), or it holds a manifest of
        another key.
    """
    path = folder / "manifest.json"
    _remove_dead_temporaries_of(path)
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("key") == key:
            return
        if existing:
            raise MedsegError(f"{folder}: holds a cache of another key ({existing.get('key')}); delete the folder")
    manifest = {
        "key": key,
        "dataset": Path(inputs["dataset"]["root"]).name,
        "medseg_version": medseg.__version__,
        "cache_format": CASE_FORMAT,
        "preprocessing": inputs["statistics"],
        "cases": cases,
        "inputs": inputs,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _writing(folder, lambda: write_atomic(path, text.encode()))

"""Datasets in the nnU-Net v2 / Medical Segmentation Decathlon layout, read unchanged.

A dataset is a folder::

    Dataset001_Vessels/
        dataset.json        # channel_names, labels, numTraining, file_ending
        imagesTr/CASE_0000.nii.gz   # one file per channel, 4-digit channel suffix
        labelsTr/CASE.nii.gz
        imagesTs/CASE_0000.nii.gz   # optional
        labelsTs/CASE.nii.gz        # optional

nnU-Net v2 ``dataset.json``::

    {"channel_names": {"0": "CT"}, "labels": {"background": 0, "vessel": 1},
     "numTraining": 20, "file_ending": ".nii.gz"}

Also read: the MSD / nnU-Net v1 form (``"modality": {"0": "CT"}``, ``"labels": {"0":
"background", "1": "vessel"}``, ``"training": [{"image": "./imagesTr/x.nii.gz",
"label": "./labelsTr/x.nii.gz"}]``), where an image may be one 4D file holding all
channels, and nnU-Net v2's optional ``"dataset"`` key listing files per case. Paths in
``dataset.json`` and split files are confined to the dataset folder (:func:`safe_join`).

Every problem is a :class:`~medseg.errors.DataError` whose one-line message names the
file (or the ``dataset.json`` key) and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from medseg.data.io import (
    NATURAL_IMAGE_ENDINGS,
    SUPPORTED_ENDINGS,
    ImageGeometry,
    ending_of,
    read_image,
    read_image_channels,
    strip_ending,
)
from medseg.errors import DataError

__all__ = [
    "Case",
    "DatasetInfo",
    "DatasetWarning",
    "read_dataset_json",
    "write_dataset_json",
    "list_cases",
    "cases_from_paths",
    "split_cases",
    "load_case",
    "check_dataset",
    "safe_join",
    "label_statistics",
]

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
MAX_LABEL = 2**16 - 1
"""Highest label value (the largest a 16-bit label file holds)."""
IGNORE_LABEL_NAME = "ignore"


class DatasetWarning(UserWarning):
    """Something in a dataset looks off but is usable (e.g. ``numTraining`` disagrees)."""


# --------------------------------------------------------------------------- records

@dataclass
class Case:
    """One case: its channel files (ordered by channel) and its label file, if any.

    ``name`` names every file medseg writes for the case (cache, prediction, report), so
    it must be a plain file name: :func:`case_name_problem`.
    """

    name: str
    image_files: list[Path]
    label_file: Path | None = None

    def __post_init__(self) -> None:
        problem = case_name_problem(self.name)
        if problem is not None:
            source = str(self.image_files[0] if self.image_files else self.label_file)
            source = _CONTROL.sub(lambda found: repr(found.group())[1:-1], source)  # "\n" as two characters
            raise DataError(f"{source}: case name {self.name!r} {problem}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def case_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a case's files, or None.

    A case name becomes ``CACHE/NAME.b2nd``, ``OUTPUT/NAME.nii.gz`` and the like: one of
    dataset.json's ``"dataset"`` mapping such as ``../../x`` or ``/home/u/x`` wrote (and
    overwrote) files outside the cache, and ``a`` and ``./a`` were one case's files.
    Control characters (a newline, a terminal's escape sequences) broke the channel
    suffix's parsing and reached the terminal as they are."""
    if not name or name in (".", ".."):
        return "is empty or a folder's name"
    if "/" in name or "\\" in name:
        return "holds a path separator: a case name is a file name, not a path"
    if _CONTROL.search(name):
        return "holds a control character"
    return None


@dataclass
class DatasetInfo:
    """What ``dataset.json`` says, normalised to the nnU-Net v2 form.

    ``labels`` maps names to integer values and always contains ``background: 0``.
    nnU-Net v2's ``ignore`` label (if declared, it must be the highest value) marks
    unannotated voxels: it is not a class of the network output, so it is excluded from
    :attr:`num_classes` and :attr:`foreground_labels`.
    """

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    num_training: int
    # MSD / v1 "training" list or v2 "dataset" mapping: explicit files per case
    explicit_cases: dict[str, list[Case]] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        return self.labels.get(IGNORE_LABEL_NAME)

    @property
    def num_classes(self) -> int:
        """Output channels of a network: highest label value (other than ignore) + 1."""
        return max(v for k, v in self.labels.items() if k != IGNORE_LABEL_NAME) + 1

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Labels other than background (and ignore), name -> value, by value."""
        items = [(k, v) for k, v in self.labels.items() if v != 0 and k != IGNORE_LABEL_NAME]
        return dict(sorted(items, key=lambda kv: kv[1]))

    @property
    def label_names(self) -> dict[int, str]:
        """value -> name."""
        return {v: k for k, v in self.labels.items()}

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    def check_trainable(self) -> None:
        """Raise DataError when medseg cannot train on this dataset's labels (an ``ignore``
        label: ``plan``, ``preprocess`` and ``train`` refuse it; ``evaluate`` takes it)."""
        if self.ignore_label is not None:
            raise DataError(f"{self.dataset_json}: the 'ignore' label is not supported by the medseg trainer yet; "
                            "evaluate and report do support it")

    def to_json(self) -> dict[str, Any]:
        """The nnU-Net v2 form (what a checkpoint stores about its dataset)."""
        return {
            "name": self.name,
            "channel_names": {str(k): v for k, v in self.channel_names.items()},
            "labels": dict(self.labels),
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
        }


# --------------------------------------------------------------------------- paths

def safe_join(root: str | Path, relative: str | Path) -> Path:
    """``root / relative``, refusing results outside ``root``.

    The check is lexical (``..`` is resolved, symlinks are not followed), so a dataset
    whose ``imagesTr`` is a symlink to another disk still works while a path such as
    ``../../etc/passwd`` or an absolute path elsewhere is refused.

    Raises
    ------
    DataError
        The path escapes ``root``.
    """
    root_abs = os.path.abspath(os.fspath(root))
    text = os.fspath(relative)
    if text.startswith("./"):
        text = text[2:]
    joined = os.path.abspath(os.path.join(root_abs, text))
    if os.path.commonpath([root_abs, joined]) != root_abs:
        raise DataError(f"{relative}: path escapes the dataset folder {root_abs}")
    return Path(joined)


# --------------------------------------------------------------------------- dataset.json

def _key_error(path: Path, key: str, problem: str) -> DataError:
    return DataError(f"{path}: key '{key}': {problem}")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def dataset_data_folder(path: str | Path, dataset: str | Path) -> str | None:
    """The dataset's ``images*``/``labels*`` folder that ``path`` lies in (or is), else
    None. Nothing medseg writes belongs there: a file among the cases is read as one,
    and a dataset is only ever read."""
    place, root = Path(path).resolve(), Path(dataset).resolve()
    if place == root or not place.is_relative_to(root):
        return None
    inner = place.relative_to(root).parts[0]
    return inner if inner.startswith(("images", "labels")) else None


def dataset_place(path: str | Path, dataset: str | Path, name: str = "dataset") -> str | None:
    """Why ``path`` cannot hold a folder medseg writes (a run, a study): it is the
    dataset's own folder (its files would lie among the dataset's), or lies in one of its
    ``images*``/``labels*`` folders (:func:`dataset_data_folder`); None where it can.
    ``name``: what the message calls the dataset (a config key, where there are two)."""
    if Path(path).resolve() == Path(dataset).resolve():
        return f"is the {name}'s own folder"
    inner = dataset_data_folder(path, dataset)
    return None if inner is None else f"lies in the {name}'s {inner}/ folder"


def read_dataset_json(root: str | Path) -> DatasetInfo:
    """Read and validate ``root/dataset.json`` (nnU-Net v2, or MSD / nnU-Net v1 form).

    Raises
    ------
    DataError
        Missing or malformed file; a required key missing or of the wrong kind
        (naming the key, and the index inside a list, e.g. ``training[3].image``);
        a negative label value; region-based labels (nnU-Net v2 lists), not supported yet.
    """
    root = Path(root)
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError(f"{root}: " + ("is a file, not a dataset folder" if root.is_file() else "dataset folder not found"))
    if not path.is_file():
        raise DataError(f"{path}: not found (a dataset folder needs dataset.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: top level must be an object")

    # channels: v2 "channel_names", MSD/v1 "modality"
    channel_key = "channel_names" if "channel_names" in raw else "modality" if "modality" in raw else None
    if channel_key is None:
        raise _key_error(path, "channel_names", "missing (e.g. {\"0\": \"CT\"})")
    channels_raw = raw[channel_key]
    if not isinstance(channels_raw, dict) or not channels_raw:
        raise _key_error(path, channel_key, "must be a non-empty object such as {\"0\": \"CT\"}")
    channel_names: dict[int, str] = {}
    for k, v in channels_raw.items():
        idx = _as_int(k)
        if idx is None or not isinstance(v, str):
            raise _key_error(path, channel_key, f"entry {k!r}: {v!r} must map a channel number to a name")
        channel_names[idx] = v
    if sorted(channel_names) != list(range(len(channel_names))):
        raise _key_error(path, channel_key, f"channels must be numbered 0..{len(channel_names) - 1}, got {sorted(channel_names)}")
    channel_names = dict(sorted(channel_names.items()))

    labels = _parse_labels(path, raw.get("labels"))

    is_msd = "training" in raw and "file_ending" not in raw
    file_ending = raw.get("file_ending", ".nii.gz" if is_msd or "modality" in raw else None)
    if file_ending is None:
        raise _key_error(path, "file_ending", "missing (e.g. \".nii.gz\")")
    if not isinstance(file_ending, str) or file_ending.lower() not in SUPPORTED_ENDINGS:
        raise _key_error(path, "file_ending", f"{file_ending!r} is not one of {', '.join(SUPPORTED_ENDINGS)}")
    file_ending = file_ending.lower()

    explicit: dict[str, list[Case]] = {}
    if "dataset" in raw:
        explicit["Tr"] = _parse_v2_dataset_key(path, root, raw["dataset"])
    if "training" in raw:
        explicit.setdefault("Tr", _parse_msd_list(path, root, raw["training"], "training", file_ending, len(channel_names)))
    if raw.get("test") not in (None, []):  # MSD lists its test images; empty or absent: none
        explicit["Ts"] = _parse_msd_list(path, root, raw["test"], "test", file_ending, len(channel_names))

    num_training = raw.get("numTraining")
    if num_training is None:
        if "Tr" in explicit:
            num_training = len(explicit["Tr"])
        else:
            raise _key_error(path, "numTraining", "missing (number of training cases)")
    if _as_int(num_training) is None or int(num_training) < 0:
        raise _key_error(path, "numTraining", f"{num_training!r} is not a non-negative integer")

    name = raw.get("name") or root.name
    return DatasetInfo(
        root=root,
        name=str(name),
        channel_names=channel_names,
        labels=labels,
        file_ending=file_ending,
        num_training=int(num_training),
        explicit_cases=explicit,
        raw=raw,
    )


def _parse_labels(path: Path, labels_raw: Any) -> dict[str, int]:
    if labels_raw is None:
        raise _key_error(path, "labels", "missing (e.g. {\"background\": 0, \"vessel\": 1})")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise _key_error(path, "labels", "must be a non-empty object")
    values = list(labels_raw.values())
    if any(isinstance(v, (list, tuple)) for v in values):
        raise _key_error(path, "labels", "region-based labels (lists of values) are not supported")
    msd_style = all(isinstance(v, str) for v in values) and all(_as_int(k) is not None for k in labels_raw)
    labels: dict[str, int] = {}
    if msd_style:  # value -> name
        for k, v in labels_raw.items():
            if int(k) > MAX_LABEL:
                raise _key_error(path, "labels", f"{k!r}: not an integer label value from 0 to {MAX_LABEL}")
            labels[v] = int(k)
    else:  # name -> value
        for k, v in labels_raw.items():
            value = _as_int(v)
            # a network has an output per value up to the highest: 10**30 cannot be one
            if value is None or not 0 <= value <= MAX_LABEL:
                raise _key_error(path, "labels", f"'{k}': {v!r} is not an integer label value from 0 to {MAX_LABEL}")
            labels[str(k)] = value
    by_value: dict[int, list[str]] = {}
    for k, v in labels.items():
        by_value.setdefault(v, []).append(k)
    dupes = {v: ks for v, ks in by_value.items() if len(ks) > 1}
    if dupes:
        raise _key_error(path, "labels", f"value used by several names: {dupes}")
    if 0 not in by_value:
        raise _key_error(path, "labels", "needs a background label with value 0")
    ignore = labels.get(IGNORE_LABEL_NAME)
    if ignore is not None and ignore != max(labels.values()):
        raise _key_error(path, "labels", "'ignore' must have the highest label value")
    if len(labels) - (ignore is not None) < 2:
        raise _key_error(path, "labels", "needs at least one foreground label")
    classes = sorted(v for k, v in labels.items() if k != IGNORE_LABEL_NAME)
    if classes != list(range(len(classes))):
        # the network has one output per value up to the highest: a gap would be a class
        # that no voxel has, scored and predicted all the same (nnU-Net refuses it too)
        hint = (" (0/255 masks? declare the foreground as 1 and store them as 0/1: data_scripts/convert_2d.py "
                "does it for PNG/TIFF folders; a NIfTI mask with nibabel, e.g. (mask > 0).astype('uint8'))"
                if 255 in classes else "")
        raise _key_error(
            path, "labels",
            f"values must be consecutive, 0, 1, 2, ... ('ignore' may be higher); got {classes}{hint}",
        )
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def _path_entry(path: Path, root: Path, key: str, value: Any) -> Path:
    """A file named in ``dataset.json`` at ``key`` (e.g. ``training[3].image``), inside ``root``."""
    if not isinstance(value, str) or not value.strip():
        raise _key_error(path, key, f"{json.dumps(value)} is not a path (expected a string such as \"./imagesTr/case.nii.gz\")")
    return safe_join(root, value)


def _parse_msd_list(
    path: Path, root: Path, entries: Any, key: str, file_ending: str, num_channels: int
) -> list[Case]:
    """MSD ``training``/``test`` lists. An entry's image is either the file itself
    (MSD: possibly 4D, all channels) or, as in nnU-Net v1, the name that the
    per-channel files ``NAME_XXXX`` extend."""
    if not isinstance(entries, list):
        raise _key_error(path, key, "must be a list")
    cases = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):  # MSD "test": ["./imagesTs/x.nii.gz", ...]
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise _key_error(path, f"{key}[{i}]", f"{json.dumps(entry)} must be an object with an 'image' path")
        image = _path_entry(path, root, f"{key}[{i}].image", entry["image"])
        name = strip_ending(image, ending_of(image))
        if image.is_file():
            images = [image]
        else:
            images = [image.with_name(f"{name}_{c:04d}{file_ending}") for c in range(num_channels)]
        label = _path_entry(path, root, f"{key}[{i}].label", entry["label"]) if entry.get("label") not in (None, "") else None
        cases.append(Case(name=name, image_files=images, label_file=label))
    return cases


def _parse_v2_dataset_key(path: Path, root: Path, mapping: Any) -> list[Case]:
    """nnU-Net v2 ``"dataset": {CASE: {"images": [...], "label": "..."}}``."""
    if not isinstance(mapping, dict):
        raise _key_error(path, "dataset", "must map case names to {'images': [...], 'label': ...}")
    cases = []
    for name, entry in mapping.items():
        problem = case_name_problem(str(name))
        if problem is not None:
            raise _key_error(path, "dataset", f"case name {str(name)!r} {problem}")
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
            raise _key_error(path, "dataset", f"case '{name}' needs an 'images' list")
        images = [_path_entry(path, root, f"dataset.{name}.images[{j}]", p) for j, p in enumerate(entry["images"])]
        label = _path_entry(path, root, f"dataset.{name}.label", entry["label"]) if entry.get("label") not in (None, "") else None
        cases.append(Case(name=str(name), image_files=images, label_file=label))
    return sorted(cases, key=lambda c: c.name)


def write_dataset_json(
    root: str | Path,
    channel_names: dict[int, str],
    labels: dict[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    name: str | None = None,
    **extra: Any,
) -> Path:
    """Write an nnU-Net v2 ``dataset.json`` atomically; ``extra`` keys are added as given."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if name is not None:
        data["name"] = name
    data.update(
        {
            "channel_names": {str(k): v for k, v in channel_names.items()},
            "labels": {k: int(v) for k, v in labels.items()},
            "numTraining": int(num_training),
            "file_ending": file_ending,
        }
    )
    data.update(extra)
    path = root / "dataset.json"
    tmp = root / f".dataset.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- listing cases

def _group_by_channel(files: Iterable[Path], ending: str, problems: list[str] | None = None
                      ) -> tuple[dict[str, dict[int, Path]], list[Path]]:
    """Files named ``CASE_XXXX<ending>`` grouped by case; the rest returned separately.

    Raises DataError for two files of the same case and channel (``x_0000.nii`` and
    ``x_0000.nii.gz``, or the same name in two input folders), which would otherwise
    leave one of them out without a word; with a ``problems`` list, appends the problem
    to it instead and leaves that case out.
    """
    grouped: dict[str, dict[int, Path]] = {}
    plain: list[Path] = []
    conflicting: set[str] = set()
    for f in files:
        m = _CHANNEL_SUFFIX.match(strip_ending(f, ending_of(f)))
        if m is None:
            plain.append(f)
            continue
        channels = grouped.setdefault(m["case"], {})
        channel = int(m["channel"])
        if channel in channels:
            problem = f"{f}: channel {channel} of case '{m['case']}' is also given by {channels[channel]}"
            if problems is None:
                raise DataError(problem)
            if m["case"] not in conflicting:  # one line a case
                problems.append(problem)
                conflicting.add(m["case"])
        channels[channel] = f
    return {name: channels for name, channels in grouped.items() if name not in conflicting}, plain


#: Image files a folder of scans may hold that medseg does not read (said, not skipped silently).
UNREAD_IMAGE_ENDINGS = (".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".dcm")
_UNREAD_HINT = ("medseg reads .nii.gz, .nii, .nrrd, .mha, .png and .tif; data_scripts/convert_2d.py converts "
                "photographs, a DICOM series needs converting to NIfTI first")


def _scan(folder: Path, endings: tuple[str, ...]) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and ending_of(p) in endings
    )


def _ordered_channels(case: str, channels: dict[int, Path], num_channels: int, folder: Path, ending: str) -> list[Path]:
    """Channel files 0..num_channels-1, or one natural image holding all colour channels."""
    if set(channels) == {0} and num_channels > 1 and ending in NATURAL_IMAGE_ENDINGS:
        return [channels[0]]  # an RGB PNG/TIF, as nnU-Net's NaturalImage2DIO reads it
    extra = sorted(c for c in channels if c >= num_channels)
    if extra:
        path = channels[extra[0]]
        labels = folder.parent / ("labels" + folder.name[len("images"):]) if folder.name.startswith("images") else None
        if labels is not None and (labels / path.name).is_file():
            # AMOS-style names (amos_0001.nii.gz): a label of that name says it is a case
            raise DataError(
                f"{path}: image name lacks the 4-digit channel suffix: {labels.name}/{path.name} names case "
                f"'{strip_ending(path, ending)}', whose image should be {strip_ending(path, ending)}_0000{ending}"
            )
        raise DataError(
            f"{path}: channel {extra[0]} of case '{case}', but dataset.json declares {num_channels} channel(s)"
        )
    for c in range(num_channels):
        if c not in channels:
            raise DataError(f"{folder / f'{case}_{c:04d}{ending}'}: missing channel file of case '{case}'")
    return [channels[c] for c in range(num_channels)]


def list_cases(root: str | Path, info: DatasetInfo, subset: str = "Tr") -> list[Case]:
    """Cases of ``imagesTr``/``labelsTr`` (``subset="Tr"``) or ``imagesTs`` (``"Ts"``).

    Labels are required for ``Tr``; for ``Ts`` they are taken from ``labelsTs`` where
    present. Cases come sorted by name.

    Raises
    ------
    DataError
        Missing folder, no images (empty dataset), a missing channel file (naming case
        and file), a channel beyond ``channel_names``, or a missing training label.
    """
    root = Path(root)
    if subset not in ("Tr", "Ts"):
        raise ValueError(f"subset must be 'Tr' or 'Ts', got {subset!r}")
    if subset in info.explicit_cases:
        cases = _explicit_cases(info.explicit_cases[subset], subset)
        if not cases:
            raise DataError(f"{info.dataset_json}: no {subset} cases listed (empty dataset)")
        return cases
    ending = info.file_ending
    images_dir = root / f"images{subset}"
    labels_dir = root / f"labels{subset}"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found")
    files = _scan(images_dir, (ending,))
    if not files:
        others = _scan(images_dir, SUPPORTED_ENDINGS)
        hint = f" (found {ending_of(others[0])} files; check file_ending in dataset.json)" if others else ""
        raise DataError(f"{images_dir}: no images ending in {ending} (empty dataset){hint}")
    grouped, plain = _group_by_channel(files, ending)
    if plain:
        raise DataError(
            f"{plain[0]}: image name lacks the 4-digit channel suffix (expected e.g. "
            f"{strip_ending(plain[0], ending)}_0000{ending})"
        )
    cases = []
    for name in sorted(grouped):
        images = _ordered_channels(name, grouped[name], info.num_channels, images_dir, ending)
        label = labels_dir / f"{name}{ending}"
        if not label.is_file():
            if subset == "Tr":
                raise DataError(f"{label}: missing label file of case '{name}'")
            label = None
        cases.append(Case(name=name, image_files=images, label_file=label))
    if labels_dir.is_dir():
        names = set(grouped)
        orphans = [p.name for p in _scan(labels_dir, (ending,)) if strip_ending(p, ending) not in names]
        if orphans:
            # an image of another ending (case_0000.nii in a .nii.gz dataset) is skipped
            # by the scan: say so, or "without an image" reads as a missing file
            first = strip_ending(orphans[0], ending)
            other = sorted(p.name for p in images_dir.glob(f"{first}_*") if p.is_file() and ending_of(p) != ending)
            why = f" ({other[0]} has another ending than dataset.json's file_ending {ending})" if other else ""
            warnings.warn(
                f"{labels_dir}: {len(orphans)} label file(s) without an image, e.g. {orphans[0]}{why}",
                DatasetWarning,
                stacklevel=2,
            )
    return cases


def _explicit_cases(cases: list[Case], subset: str) -> list[Case]:
    for case in cases:
        for f in case.image_files:
            if not f.is_file():
                raise DataError(f"{f}: missing channel file of case '{case.name}'")
        if case.label_file is not None and not case.label_file.is_file():
            if subset == "Tr":
                raise DataError(f"{case.label_file}: missing label file of case '{case.name}'")
            case.label_file = None
        if subset == "Tr" and case.label_file is None:
            raise DataError(f"case '{case.name}': no label file listed")
    return sorted(cases, key=lambda c: c.name)


def cases_from_paths(
    paths: list[Path],
    file_ending: str | None = None,
    num_channels: int | None = None,
    problems: list[str] | None = None,
) -> list[Case]:
    """Group input scans (folders and/or files, as ``medseg predict --input`` takes) into cases.

    Files named ``CASE_XXXX<ending>`` form multi-channel cases; a file without the
    suffix is a single-channel case named after the file. A folder contributes its
    files ending in ``file_ending`` (any supported ending when ``None``), hidden files
    excepted. With ``num_channels == 1`` (or ``None``), files whose suffixes do not form
    channels ``0..k-1`` (``scan_0001``, ``scan_0002``) are single-channel cases named by
    their full stem; suffixes that do form them (``x_0000``, ``x_0001``) are one case of
    k channels, an error for a 1-channel model.

    Raises
    ------
    DataError
        A path that does not exist or has an unsupported ending, nothing to read, a
        case missing a channel, channels beyond a 1-channel model's, or two inputs that
        map to the same case name (or case and channel). With a ``problems`` list, a
        problem of one case (the last four) is appended to it instead, and the case
        (both cases of a shared name) left out: ``predict`` goes on with the others, as
        with a case that fails to read (one case without its ``_0001`` stopped a whole
        folder). The other problems raise.
    """
    endings = (file_ending.lower(),) if file_ending else SUPPORTED_ENDINGS
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = _scan(p, endings)
            unread = _scan(p, UNREAD_IMAGE_ENDINGS)
            if not found:
                hint = f" ({len(unread)} file(s) such as {unread[0].name}: {_UNREAD_HINT})" if unread else ""
                raise DataError(f"{p}: no images ending in {' / '.join(endings)}{hint}")
            if unread:  # a .jpg among .png scans was skipped without a word
                shown = ", ".join(f.name for f in unread[:3]) + (", ..." if len(unread) > 3 else "")
                warnings.warn(f"{p}: {len(unread)} image file(s) skipped: {shown}; {_UNREAD_HINT}", DatasetWarning,
                              stacklevel=2)
            files.extend(found)
        elif p.is_file():
            if ending_of(p) not in SUPPORTED_ENDINGS:
                raise DataError(f"{p}: unsupported file ending (supported: {', '.join(SUPPORTED_ENDINGS)})")
            files.append(p)
        else:
            raise DataError(f"{p}: input not found")
    if not files:
        raise DataError("no input images given")
    seen: dict[Path, None] = {}
    for f in files:
        seen.setdefault(Path(os.path.abspath(f)), None)
    files = list(seen)

    grouped, plain = _group_by_channel(files, "", problems)
    cases: dict[str, Case] = {}
    shared: set[str] = set()  # names two inputs map to (left out with a problems list)

    def add(make: Callable[[], Case]) -> None:
        try:
            case = make()
            if case.name in cases:
                shared.add(case.name)
                raise DataError(
                    f"{case.image_files[0]}: case name '{case.name}' also used by {cases[case.name].image_files[0]}"
                )
        except DataError as err:
            if problems is None:
                raise
            problems.append(str(err))
            return
        cases[case.name] = case

    def one_channel_model_refuses(name: str, channels: dict[int, Path]) -> Case:
        raise DataError(f"{channels[1]}: channel 1 of case '{name}', but the model takes 1 channel "
                        "(rename the files if they are separate scans)")

    for f in plain:
        add(lambda f=f: Case(name=strip_ending(f), image_files=[f]))
    for name, channels in grouped.items():
        contiguous = sorted(channels) == list(range(len(channels)))
        first = channels[min(channels)]
        if num_channels == 1 and contiguous and len(channels) > 1:  # nnU-Net's layout of a multi-channel case
            add(lambda name=name, channels=channels: one_channel_model_refuses(name, channels))
        elif num_channels is not None and num_channels > 1:
            add(lambda name=name, channels=channels, first=first: Case(
                name=name, image_files=_ordered_channels(name, channels, num_channels, first.parent, ending_of(first))))
        elif contiguous and (num_channels is None or len(channels) == 1):
            add(lambda name=name, channels=channels: Case(name=name, image_files=[channels[c] for c in sorted(channels)]))
        else:  # suffixes are part of the name, not channels
            for c in sorted(channels):
                add(lambda c=c, channels=channels: Case(name=strip_ending(channels[c]), image_files=[channels[c]]))
    return [cases[k] for k in sorted(cases) if k not in shared]


# --------------------------------------------------------------------------- splits

def _load_split_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable split file ({err.strerror or err})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def _entry_to_name(path: Path, entry: Any, root: Path | None, names: set[str]) -> str:
    """A split entry is a case name, or a path to one of its files inside the dataset."""
    if not isinstance(entry, str):
        raise DataError(f"{path}: split entry {entry!r} is not a case name")
    if entry in names:
        return entry
    if "/" in entry or "\\" in entry or entry.startswith("..") or os.path.isabs(entry):
        target = safe_join(root if root is not None else path.parent, entry)
        stem = strip_ending(target)
        m = _CHANNEL_SUFFIX.match(stem)
        if stem in names:
            return stem
        if m and m["case"] in names:
            return m["case"]
    return entry  # reported as unknown by the caller


def split_cases(
    cases: list[Case],
    val_fraction: float,
    seed: int,
    split_file: str | Path | None = None,
    root: str | Path | None = None,
    fold: int = 0,
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases.

    With ``split_file`` (JSON or YAML ``{"train": [...], "val": [...]}``, or nnU-Net's
    ``splits_final.json``, a list of such folds, of which ``fold`` is taken): the cases
    it names, in the dataset's order; cases it does not name are left out. A relative
    ``split_file`` is looked up as given, then inside ``root``. Entries may be paths
    (``imagesTr/x_0000.nii.gz``) but must stay inside the dataset folder.

    Otherwise a seeded shuffle: ``round(val_fraction * n)`` validation cases, at least
    one when there are two or more cases and ``val_fraction > 0``, and at least one
    training case. The same ``cases``, ``val_fraction`` and ``seed`` give the same split.

    Raises
    ------
    DataError
        Unreadable or malformed split file, unknown case names, a name in both lists,
        an entry escaping the dataset folder.
    """
    by_name = {c.name: c for c in cases}
    if split_file is not None:
        path = Path(split_file)
        if not path.is_absolute() and not path.is_file() and root is not None:
            path = safe_join(root, split_file)
        if not path.is_file():
            raise DataError(f"{split_file}: split file not found")
        data = _load_split_file(path)
        if isinstance(data, list):  # nnU-Net splits_final.json
            if not data:
                raise DataError(f"{path}: empty list of folds")
            if not 0 <= fold < len(data):
                raise DataError(f"{path}: fold {fold} requested but the file has {len(data)} fold(s)")
            if len(data) > 1:  # said: a 5-fold file was used as its fold 0 without a word
                warnings.warn(f"{path}: fold {fold} of the file's {len(data)} is used (medseg trains one fold per run)",
                              DatasetWarning, stacklevel=2)
            data = data[fold]
        if not isinstance(data, dict) or not isinstance(data.get("train"), list) or not isinstance(data.get("val"), list):
            raise DataError(f"{path}: expected 'train' and 'val' lists of case names")
        root_path = Path(root) if root is not None else None
        train = [_entry_to_name(path, e, root_path, set(by_name)) for e in data["train"]]
        val = [_entry_to_name(path, e, root_path, set(by_name)) for e in data["val"]]
        unknown = sorted({n for n in train + val if n not in by_name})
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise DataError(f"{path}: unknown case name(s) {shown}")
        both = sorted(set(train) & set(val))
        if both:
            raise DataError(f"{path}: case(s) in both train and val: {', '.join(both[:5])}")
        train_set, val_set = set(train), set(val)
        left_out = [c.name for c in cases if c.name not in train_set and c.name not in val_set]
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" (+{len(left_out) - 5} more)" if len(left_out) > 5 else "")
            warnings.warn(f"{path}: {len(left_out)} case(s) in neither 'train' nor 'val' are left out: {shown}",
                          DatasetWarning, stacklevel=2)
        return [c for c in cases if c.name in train_set], [c for c in cases if c.name in val_set]

    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(by_name)
    n = len(names)
    n_val = int(math.floor(val_fraction * n + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0 if n < 2 else n_val
    order = np.random.default_rng(seed).permutation(n)
    val_set = {names[i] for i in order[:n_val]}
    return [c for c in cases if c.name not in val_set], [c for c in cases if c.name in val_set]


# --------------------------------------------------------------------------- loading

def label_dtype(info: DatasetInfo) -> np.dtype:
    """The dtype :func:`load_case` gives labels: uint8 when all values fit, else int32."""
    return np.dtype(np.uint8) if max(info.labels.values()) <= 255 else np.dtype(np.int32)


def load_case(case: Case, info: DatasetInfo, check_labels: bool = True, atol: float = 1e-3) -> dict[str, Any]:
    """Read a case and check it is consistent.

    Returns
    -------
    dict
        ``name``; ``image``: float32 ``(C, *spatial)``; ``label``: ``(1, *spatial)``
        integer array (dtype :func:`label_dtype`) or ``None``; ``geometry``: the
        :class:`ImageGeometry` of channel 0 (shared by all channels and the label);
        ``image_files``, ``label_file``: the paths read.

    Raises
    ------
    DataError
        One line naming the file: unreadable/truncated; wrong number of channels;
        channel shape or affine different from channel 0; NaN/Inf in the image, or values
        beyond float32's range (float64 scans); label
        shape or affine (beyond ``atol`` mm per affine entry) different from the image;
        non-integer label values; label values not declared in ``dataset.json`` (case
        and values named; skipped with ``check_labels=False``).
    """
    channels: list[np.ndarray] = []
    geometry: ImageGeometry | None = None
    first = case.image_files[0] if case.image_files else None
    if first is None:
        raise DataError(f"case '{case.name}': no image files")
    for f in case.image_files:
        array, geom = read_image_channels(f)
        if geometry is None:
            geometry = geom
        elif geom.shape != geometry.shape:
            raise DataError(f"{f}: channel shape {geom.shape} differs from {first.name} {geometry.shape}")
        elif not geom.allclose(geometry, atol=atol):
            raise DataError(
                f"{f}: channel affine differs from {first.name} by up to "
                f"{geom.max_affine_difference(geometry):.3g} mm"
            )
        bad = ~np.isfinite(array) if array.dtype.kind == "f" else None
        if bad is not None and bad.any():
            n_nan = int(np.isnan(array).sum())
            raise DataError(f"{f}: image contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxel value(s)")
        if array.dtype.kind == "f" and array.dtype.itemsize > 4 and array.size:
            largest = float(np.finfo(np.float32).max)  # medseg computes in float32: beyond, a value becomes inf
            low, high = float(array.min()), float(array.max())
            if low < -largest or high > largest:
                raise DataError(f"{f}: image holds the value {high if high > largest else low:.4g}, beyond float32's "
                                f"range (±{largest:.4g}); rescale the scan")
        channels.extend(a.astype(np.float32, copy=False) for a in array)
    assert geometry is not None
    if len(channels) != info.num_channels:
        hint = ""
        if (len(case.image_files) == 1 and ending_of(first) in NATURAL_IMAGE_ENDINGS
                and len(channels) == info.num_channels + 1 and info.num_channels in (1, 3)):
            # an RGBA (or grey + alpha) image: convert_2d.py drops an opaque alpha, predict did not say so
            hint = ("; its last channel is an alpha channel (RGBA / grey + alpha): save the image without it "
                    "(data_scripts/convert_2d.py drops an opaque alpha)")
        elif len(case.image_files) > 1:
            names = ", ".join(f.name for f in case.image_files[:3]) + (", ..." if len(case.image_files) > 3 else "")
            hint = f" (read as the channel files of one case: {names}; rename them if they are separate scans)"
        raise DataError(
            f"{first}: case '{case.name}' has {len(channels)} channel(s) but dataset.json declares "
            f"{info.num_channels}{hint}"
        )
    image = np.stack(channels) if len(channels) > 1 else channels[0][None]

    label = None
    if case.label_file is not None:
        label = _read_label(case, info, geometry, atol, check_labels)
    return {
        "name": case.name,
        "image": np.ascontiguousarray(image, dtype=np.float32),
        "label": label,
        "geometry": geometry,
        "image_files": list(case.image_files),
        "label_file": case.label_file,
    }


def _read_label(case: Case, info: DatasetInfo, geometry: ImageGeometry, atol: float, check_labels: bool) -> np.ndarray:
    f = case.label_file
    assert f is not None
    seg, geom = read_image(f)
    if geom.shape != geometry.shape:
        raise DataError(f"{f}: label shape {geom.shape} does not match image shape {geometry.shape} of {case.image_files[0].name}")
    if not geom.allclose(geometry, atol=atol):
        raise DataError(
            f"{f}: label affine differs from image {case.image_files[0].name} by up to "
            f"{geom.max_affine_difference(geometry):.3g} mm (tolerance {atol:g})"
        )
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)) or not np.all(seg == np.round(seg)):
            raise DataError(f"{f}: label of case '{case.name}' has non-integer values")
    values = np.unique(seg)
    if check_labels:
        declared = set(info.labels.values())
        undeclared = [v for v in values.tolist() if int(v) not in declared]
        if undeclared:
            shown = ", ".join(str(int(v)) for v in undeclared[:10])
            raise DataError(
                f"{f}: label values [{shown}] of case '{case.name}' are not declared in dataset.json "
                f"(declared: {', '.join(str(v) for v in sorted(declared))})"
            )
    dtype = label_dtype(info)
    if values.size and (values.min() < np.iinfo(dtype).min or values.max() > np.iinfo(dtype).max):
        dtype = np.dtype(np.int64)
    return np.ascontiguousarray(seg.astype(dtype)[None])


def _warn_of_unlisted_files(root: str | Path, info: DatasetInfo, subset: str, cases: list[Case]) -> None:
    """A dataset.json that lists its cases (an MSD/v1 ``"training"`` list, a v2
    ``"dataset"`` mapping) is read as listed; images in ``images<subset>/`` it does not
    name are left out. A stale list left 2 of 4 cases to train on, said only as "numTraining
    is 4 but 2 training case(s) were found" (or not at all), while nnU-Net v2 reads the
    folder."""
    if subset not in info.explicit_cases:
        return
    folder = Path(root) / f"images{subset}"
    if not folder.is_dir():
        return
    listed = {Path(f).resolve() for case in cases for f in case.image_files}
    unlisted = [p.name for p in _scan(folder, (info.file_ending,)) if p.resolve() not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        warnings.warn(
            f"{info.dataset_json}: lists {len(cases)} {subset} case(s), and images{subset}/ holds {len(unlisted)} "
            f"file(s) it does not list ({shown}), which are left out: add them to the list, or remove the list "
            "(with channel_names and file_ending in dataset.json the folder is read, as nnU-Net v2 reads it)",
            DatasetWarning,
            stacklevel=3,
        )


def check_dataset(root: str | Path, subset: str = "Tr", verify: bool = False) -> tuple[DatasetInfo, list[Case]]:
    """Read ``dataset.json`` and list the cases of ``subset``.

    Warns (:class:`DatasetWarning`) when ``numTraining`` disagrees with the training
    cases found. With ``verify=True`` every case is loaded with :func:`load_case`, so
    any bad file is reported before a long run starts.
    """
    info = read_dataset_json(root)
    cases = list_cases(root, info, subset)
    _warn_of_unlisted_files(root, info, subset, cases)
    if subset == "Tr" and len(cases) != info.num_training:
        warnings.warn(
            f"{info.dataset_json}: numTraining is {info.num_training} but {len(cases)} training case(s) were found",
            DatasetWarning,
            stacklevel=2,
        )
    if verify:
        for case in cases:
            load_case(case, info)
    return info, cases


def label_statistics(cases: list[Case], info: DatasetInfo) -> dict[str, Any]:
    """Per-class voxel fraction (mean/std over cases) and presence frequency.

    This is the class-ratio prior that source-free domain adaptation regularises
    towards. Only label files are read. Returns, JSON-serialisable::

        {"num_cases": n,
         "classes": {"vessel": {"value": 1, "ratio_mean": ..., "ratio_std": ...,
                                "presence": fraction of cases containing it}, ...}}

    Raises
    ------
    DataError
        No case has a label, or a label file is unreadable.
    """
    labelled = [c for c in cases if c.label_file is not None]
    if not labelled:
        raise DataError("label_statistics: no case has a label file")
    names = {v: k for k, v in info.labels.items()}
    ratios: dict[int, list[float]] = {v: [] for v in names}
    for case in labelled:
        assert case.label_file is not None
        seg, _ = read_image(case.label_file)
        values, counts = np.unique(seg, return_counts=True)
        total = float(seg.size)
        hist = {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}
        for v in names:
            ratios[v].append(hist.get(v, 0) / total)
    classes = {}
    for v, name in sorted(names.items()):
        r = np.asarray(ratios[v], dtype=np.float64)
        classes[name] = {
            "value": int(v),
            "ratio_mean": float(r.mean()),
            "ratio_std": float(r.std()),
            "presence": float(np.mean(r > 0)),
        }
    return {"num_cases": len(labelled), "classes": classes}

"""Medical Segmentation Decathlon task folder -> nnU-Net v2 dataset folder.

An MSD task (``Task08_HepaticVessel/``) has a ``dataset.json`` in the MSD form::

    {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "Vessel", "2": "Tumour"},
     "numTraining": 303, "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
     "test": ["./imagesTs/y.nii.gz"]}

and multi-modal tasks (BrainTumour, Prostate) store all channels of a case in one 4D
NIfTI ``(x, y, z, c)``. The converted folder follows nnU-Net v2, as
``nnUNetv2_convert_MSD_dataset`` does: ``imagesTr/CASE_0000.nii.gz`` ... one 3D file per
channel, ``labelsTr/CASE.nii.gz`` copied byte for byte, and a v2 ``dataset.json``
(``channel_names`` from ``modality``, ``labels`` inverted to name -> value,
``numTraining``, ``file_ending: ".nii.gz"``).

Geometry is kept exactly: a 3D ``.nii.gz`` image is copied byte for byte; a channel of a
4D image is written with the source's affine and a copy of its header (sform/qform codes
and matrices, pixdim, units), its data type unchanged. The output is assembled in a
hidden sibling folder and renamed into place at the end, so an interrupted conversion
never leaves a half-converted dataset under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.data.dataset import safe_join, write_dataset_json
from medseg.data.io import ending_of, strip_ending
from medseg.data.prepare.output import check_dataset_output
from medseg.data.prepare.verify import publish_dataset, temporary_dataset
from medseg.errors import DataError

__all__ = ["find_msd_task", "read_msd_json", "convert_msd_task"]

FILE_ENDING = ".nii.gz"
# Kept from the MSD dataset.json in the converted one (nnU-Net v2 ignores them).
_INFO_KEYS = ("description", "reference", "licence", "release")


def find_msd_task(folder: str | Path) -> Path:
    """The MSD task folder at or directly under ``folder`` (the one holding ``dataset.json``).

    Raises
    ------
    DataError
        No ``dataset.json`` there or in exactly one sub-folder.
    """
    folder = Path(folder)
    if (folder / "dataset.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("*/dataset.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{folder}: no dataset.json here or in a sub-folder (not an MSD task)")
    raise DataError(f"{folder}: several task folders ({', '.join(p.name for p in found)}); pass one")


def read_msd_json(task_dir: Path) -> dict[str, Any]:
    """Read and check the MSD ``dataset.json`` of ``task_dir``; return it normalised.

    Returns a dict with ``channel_names`` (int -> name), ``labels`` (name -> int),
    ``training`` (list of ``(image, label)`` paths), ``test`` (list of image paths) and
    ``info`` (the descriptive keys).

    Raises
    ------
    DataError
        Malformed JSON or a missing/ill-formed key (named).
    """
    path = task_dir / "dataset.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not an MSD task folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: top level must be an object")

    modality = raw.get("modality", raw.get("channel_names"))
    if not isinstance(modality, dict) or not modality:
        raise DataError(f"{path}: key 'modality': missing or not an object such as {{\"0\": \"CT\"}}")
    try:
        channel_names = {int(k): str(v) for k, v in modality.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: key 'modality': keys must be channel numbers, got {list(modality)}") from None
    if sorted(channel_names) != list(range(len(channel_names))):
        raise DataError(f"{path}: key 'modality': channels must be numbered 0..{len(channel_names) - 1}")

    labels_raw = raw.get("labels")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise DataError(f"{path}: key 'labels': missing or not an object such as {{\"0\": \"background\"}}")
    labels: dict[str, int] = {}
    for k, v in labels_raw.items():
        if isinstance(v, str) and str(k).strip().isdigit():  # MSD: value -> name
            labels[v] = int(k)
        elif isinstance(v, int) and not isinstance(v, bool):  # already name -> value
            labels[str(k)] = v
        else:
            raise DataError(f"{path}: key 'labels': entry {k!r}: {v!r} is neither value -> name nor name -> value")
    if 0 not in labels.values():
        raise DataError(f"{path}: key 'labels': no background label with value 0")
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))

    training = raw.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(f"{path}: key 'training': missing or empty list of {{'image': ..., 'label': ...}}")
    pairs = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            raise DataError(f"{path}: key 'training': entry {i} needs 'image' and 'label' paths")
        pairs.append((safe_join(task_dir, entry["image"]), safe_join(task_dir, entry["label"])))
    test = []
    for i, entry in enumerate(raw.get("test") or []):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise DataError(f"{path}: key 'test': entry {i} is not an image path")
        test.append(safe_join(task_dir, image))
    info = {k: raw[k] for k in _INFO_KEYS if k in raw}
    return {
        "name": raw.get("name") or task_dir.name,
        "channel_names": dict(sorted(channel_names.items())),
        "labels": labels,
        "training": pairs,
        "test": test,
        "info": info,
    }


def convert_msd_task(
    task_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    include_test: bool = True,
    move: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Convert an extracted MSD task folder into an nnU-Net v2 dataset at ``out_dir``.

    Parameters
    ----------
    task_dir : path
        The MSD task folder (with ``dataset.json``) or a folder holding exactly one.
    out_dir : path
        Dataset folder to create, e.g. ``.../Dataset008_HepaticVessel``.
    overwrite : bool
        Replace an existing ``out_dir`` (otherwise it is an error).
    include_test : bool
        Also convert the unlabelled ``imagesTs`` listed under ``test``.
    move : bool
        Move files that need no change (3D ``.nii.gz`` images, labels) instead of
        copying them: for a throw-away extracted copy, it halves the disk space needed.
    progress : bool
        tqdm progress bar over cases (stderr).
    verify : bool
        Also read every converted case once before publishing it (slow for large sets).

    Returns
    -------
    dict
        ``root``, ``training`` and ``test`` case names, ``num_channels``, and the
        published dataset's ``info`` (:class:`~medseg.data.dataset.DatasetInfo`).

    Raises
    ------
    DataError
        Bad ``dataset.json``; a listed file missing or unreadable; an image whose
        number of channels differs from ``modality``; ``out_dir`` exists.
    """
    from tqdm import tqdm

    say = log or (lambda msg: print(msg, file=sys.stderr))
    task_dir = find_msd_task(task_dir)
    out_dir = Path(out_dir)
    meta = read_msd_json(task_dir)
    check_dataset_output(out_dir, overwrite, {"the task folder": task_dir})
    num_channels = len(meta["channel_names"])

    tmp = temporary_dataset(out_dir)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    training: list[str] = []
    test: list[str] = []
    try:
        for image, label in tqdm(meta["training"], desc="imagesTr", disable=not progress or not sys.stderr.isatty(), file=sys.stderr, leave=False):
            case = strip_ending(image, ending_of(image))
            _write_channels(image, tmp / "imagesTr", case, num_channels, move)
            _copy_nifti(label, tmp / "labelsTr" / f"{case}{FILE_ENDING}", "label", move)
            training.append(case)
        if include_test and meta["test"]:
            (tmp / "imagesTs").mkdir()
            for image in tqdm(meta["test"], desc="imagesTs", disable=not progress or not sys.stderr.isatty(), file=sys.stderr, leave=False):
                case = strip_ending(image, ending_of(image))
                _write_channels(image, tmp / "imagesTs", case, num_channels, move)
                test.append(case)
        duplicates = sorted({c for c in training if training.count(c) > 1})
        if duplicates:
            raise DataError(f"{task_dir / 'dataset.json'}: case(s) listed twice under 'training': {', '.join(duplicates[:5])}")
        write_dataset_json(
            tmp,
            channel_names=meta["channel_names"],
            labels=meta["labels"],
            num_training=len(training),
            file_ending=FILE_ENDING,
            name=str(meta["name"]),
            **meta["info"],
            converted_from=f"MSD {task_dir.name} (medseg data_scripts)",
        )
        info, _ = publish_dataset(tmp, out_dir, say, verify=verify)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"{out_dir}: {len(training)} training case(s), {len(test)} test case(s), {num_channels} channel(s)")
    return {"root": out_dir, "training": training, "test": test, "num_channels": num_channels, "info": info}


def _load(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: {what} file listed in dataset.json not found")
    if ending_of(path) not in (".nii.gz", ".nii"):
        raise DataError(f"{path}: expected a NIfTI {what} (.nii.gz or .nii)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for bad headers
        raise DataError(f"{path}: unreadable NIfTI {what} ({type(err).__name__}: {err})") from None
    return img


def _copy_nifti(src: Path, dst: Path, what: str, move: bool) -> None:
    """Copy (or move) byte for byte when already ``.nii.gz``; re-save (same header) from ``.nii``."""
    import nibabel as nib

    img = _load(src, what)
    if ending_of(src) == FILE_ENDING:
        if move:
            os.replace(src, dst)
        else:
            shutil.copyfile(src, dst)
    else:
        nib.save(img, str(dst))


def _write_channels(src: Path, folder: Path, case: str, num_channels: int, move: bool) -> None:
    import nibabel as nib

    img = _load(src, "image")
    shape = tuple(img.shape)
    if len(shape) == 5 and shape[3] == 1:  # NIfTI vector intent: (x, y, z, 1, c)
        shape = shape[:3] + shape[4:]
    channels = shape[3] if len(shape) == 4 else 1
    if len(shape) not in (3, 4):
        raise DataError(f"{src}: expected a 3D or 4D (x, y, z, channel) image, got shape {tuple(img.shape)}")
    if channels != num_channels:
        raise DataError(f"{src}: {channels} channel(s) but dataset.json 'modality' declares {num_channels}")
    if len(shape) == 3:
        _copy_nifti(src, folder / f"{case}_0000{FILE_ENDING}", "image", move)
        return
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip, short file
        raise DataError(f"{src}: unreadable or truncated image data ({type(err).__name__}: {err})") from None
    data = data.reshape(shape)
    for c in range(channels):
        header = img.header.copy()
        channel = np.ascontiguousarray(data[..., c])
        header.set_data_shape(channel.shape)
        header.set_data_dtype(channel.dtype)
        header.set_intent("none")
        out = nib.Nifti1Image(channel, img.affine, header=header)
        out.header.set_slope_inter(None, None)  # data are already scaled
        nib.save(out, str(folder / f"{case}_{c:04d}{FILE_ENDING}"))

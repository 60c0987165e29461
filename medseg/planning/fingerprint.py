"""The dataset fingerprint: what the planner and the trainer need to know about the data.

One pass over the training cases (``imagesTr``/``labelsTr``), one case per worker
process, read with :func:`medseg.data.dataset.load_case` so the geometry conventions
(RAS+ affines, voxel order) are the trainer's. Per case:

- ``files``: path (relative to the dataset), size and modification time of each file read;
- ``shape``, ``spacing`` (mm, in voxel order) and ``axcodes`` (orientation);
- ``label_voxels``: voxels of every label value present, and ``num_voxels``;
- ``intensity``: per channel, statistics over the case's foreground voxels (label > 0):
  mean, std, min, max and the 0.5 / 99.5 percentiles (what nnU-Net's CT normalisation
  clips to);
- ``thickness``: per foreground label, the Euclidean distance transform of the label
  (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``, so in mm) read on
  the label's skeleton (:func:`medseg.topology.skeletonize`): its 10th, 50th and 90th
  percentiles. The distance from a skeleton voxel to the nearest background voxel is
  the local radius of the structure, measured to the first voxel outside it (a
  one-voxel-wide line has 1 voxel, a rod of the voxels within 6 of its axis has
  sqrt(37)), so a thin vessel is known as such.

and for the whole dataset the same aggregated: per label the voxel ratio (mean, std
over cases) and presence, as :func:`medseg.data.dataset.label_statistics` computes
them, and its thickness (median over the cases that contain it); per channel the
foreground intensity statistics over the pooled foreground samples, as nnU-Net's
``foreground_intensity_properties_per_channel``.

The samples behind the intensity statistics (at most :data:`FG_SAMPLES_PER_CASE`
foreground voxels per case, as :func:`medseg.data.transforms.fit_preprocessing` draws
them; all voxels of a case without foreground) are kept next to ``fingerprint.json`` in
``fingerprint_samples.npz``, one ``(C, n)`` float32 array per case, so that
:func:`preprocessing_from_fingerprint` and :func:`label_statistics_from_fingerprint`
give what ``fit_preprocessing`` and ``label_statistics`` give, for any subset of the
cases (a training split), without a second pass over the images.

Large labels: the skeleton is computed on the label's bounding box; when that box holds
more than ``skeleton_budget`` voxels, only tiles of it (the ones with the most
foreground, up to the budget) are skeletonised, and the case's ``thickness`` entry says
``"sampled": true``. The distance transform is always exact (it is computed on the whole
bounding box).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.data.dataset import Case, DatasetInfo, check_dataset, load_case
from medseg.errors import DataError

__all__ = [
    "FINGERPRINT_VERSION",
    "FG_SAMPLES_PER_CASE",
    "compute_fingerprint",
    "case_fingerprint",
    "label_thickness",
    "label_statistics_from_fingerprint",
    "preprocessing_from_fingerprint",
    "load_samples",
]

FINGERPRINT_VERSION = 1
#: Foreground voxels sampled per case and channel for the dataset intensity statistics
#: (the number :func:`medseg.data.transforms.fit_preprocessing` uses).
FG_SAMPLES_PER_CASE = 10_000
#: Voxels of a label's bounding box skeletonised per case before tiles are sampled.
SKELETON_BUDGET = 1 << 22  # ~161^3
_TILE = 64  # edge of the tiles a large bounding box is cut into
SAMPLES_FILE = "fingerprint_samples.npz"


# --------------------------------------------------------------------------- per case

def label_thickness(
    mask: np.ndarray, spacing: Sequence[float], budget: int = SKELETON_BUDGET
) -> dict[str, Any] | None:
    """Distance-transform values (mm) on the skeleton of a binary mask.

    Parameters
    ----------
    mask : np.ndarray of bool
        2D or 3D mask of one label.
    spacing : sequence of float
        Voxel size in mm per axis (the distance transform's ``sampling``).
    budget : int
        Most voxels skeletonised; a larger bounding box is tiled and the tiles with
        the most foreground are skeletonised until the budget is spent.

    Returns
    -------
    dict or None
        ``{"skeleton_voxels": n, "radius_mm": {"p10", "p50", "p90"}, "sampled": bool}``;
        None for an empty mask.
    """
    from medseg.topology import skeletonize

    if not mask.any():
        return None
    coords = np.nonzero(mask)
    box = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, mask.shape))
    sub = np.ascontiguousarray(mask[box])
    distance_at = _distance_to_background(sub, spacing)
    sampled = sub.size > budget
    if not sampled:
        skeleton = np.asarray(skeletonize(sub), dtype=bool)
    else:
        skeleton = np.zeros(sub.shape, dtype=bool)
        tiles = []
        for corner in np.ndindex(*[math.ceil(n / _TILE) for n in sub.shape]):
            window = tuple(slice(c * _TILE, (c + 1) * _TILE) for c in corner)
            count = int(np.count_nonzero(sub[window]))
            if count:
                tiles.append((-count, corner, window))
        spent = 0
        for _, _, window in sorted(tiles):  # most foreground first; corner breaks ties
            if spent >= budget:
                break
            skeleton[window] = np.asarray(skeletonize(sub[window]), dtype=bool)
            spent += sub[window].size
    values = distance_at(np.nonzero(skeleton & sub))
    if values.size == 0:  # a skeleton can vanish on tiny blobs: fall back to the deepest voxel
        values = np.array([float(distance_at(np.nonzero(sub)).max())])
    p10, p50, p90 = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return {"skeleton_voxels": int(values.size), "radius_mm": {"p10": p10, "p50": p50, "p90": p90}, "sampled": sampled}


def _distance_to_background(mask: np.ndarray, spacing: Sequence[float]):
    """A function giving, at voxel coordinates of ``mask``, the Euclidean distance in mm to
    the nearest background voxel of the array: ``scipy.ndimage.distance_transform_edt``'s
    value there, for the few voxels of a skeleton only.

    The nearest background voxel of a foreground voxel always touches the foreground (one
    step from it towards the voxel would be closer), so a k-d tree over the background
    voxels with a foreground neighbour answers exactly. On a 512x512x100 vessel tree this
    takes a fraction of a second where the whole distance transform takes 3 s, most of a
    case's fingerprint. A mask without background falls back to the transform.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    scale = np.asarray([float(s) for s in spacing])
    near = ndimage.maximum_filter(mask.view(np.uint8), size=3, mode="constant", cval=0).view(bool)
    border = np.argwhere(near & ~mask)
    if border.size == 0:
        distance = ndimage.distance_transform_edt(mask, sampling=scale)
        return lambda where: distance[where]
    tree = cKDTree(border * scale)

    def at(where: tuple[np.ndarray, ...]) -> np.ndarray:
        if len(where[0]) == 0:
            return np.empty(0)
        return tree.query(np.stack(where, axis=1) * scale, k=1)[0]

    return at


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    v = values.astype(np.float64, copy=False)
    low, high = np.percentile(v, [0.5, 99.5])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(low),
        "percentile_99_5": float(high),
    }


def case_fingerprint(
    case: Case, info: DatasetInfo, index: int, seed: int = 0, skeleton_budget: int = SKELETON_BUDGET
) -> tuple[dict[str, Any], np.ndarray]:
    """The fingerprint record of one case and its intensity samples ``(C, n)`` float32.

    ``index`` (the case's position in the dataset) and ``seed`` seed the foreground
    sampling, so the result does not depend on which worker ran the case.

    Raises
    ------
    DataError
        The case cannot be read or is inconsistent (:func:`load_case`'s checks).
    """
    loaded = load_case(case, info)
    image = loaded["image"]
    geometry = loaded["geometry"]
    label = loaded["label"][0] if loaded["label"] is not None else None
    values, counts = (np.unique(label, return_counts=True) if label is not None else (np.array([]), np.array([])))

    foreground = label > 0 if label is not None else None
    has_foreground = foreground is not None and bool(foreground.any())
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if has_foreground:
        index_pool = np.flatnonzero(foreground)
    else:  # as fit_preprocessing: a case without foreground contributes all its voxels
        index_pool = np.arange(image[0].size)
    if index_pool.size > FG_SAMPLES_PER_CASE:
        index_pool = np.sort(rng.choice(index_pool, FG_SAMPLES_PER_CASE, replace=False))
    flat = image.reshape(image.shape[0], -1)
    samples = np.ascontiguousarray(flat[:, index_pool], dtype=np.float32)

    intensity = [
        _intensity_stats(channel[foreground] if has_foreground else np.empty(0)) for channel in image
    ]
    thickness: dict[str, Any] = {}
    if label is not None:
        for name, value in info.foreground_labels.items():
            entry = label_thickness(label == value, geometry.spacing, skeleton_budget)
            if entry is not None:
                thickness[str(value)] = entry

    record = {
        "name": case.name,
        "files": [_file_stamp(f, info.root) for f in [*case.image_files, case.label_file] if f is not None],
        "shape": [int(s) for s in geometry.shape],
        "spacing": [float(s) for s in geometry.spacing],
        "axcodes": "".join(geometry.axcodes),
        "num_voxels": int(np.prod(geometry.shape)),
        "label_voxels": {str(int(v)): int(n) for v, n in zip(values.tolist(), counts.tolist())},
        "has_foreground": has_foreground,
        "intensity": intensity,
        "thickness": thickness,
    }
    return record, samples


def stale_cases(fingerprint: Mapping[str, Any], info: DatasetInfo, cases: Iterable[Case]) -> list[str]:
    """Names of ``cases`` missing from the fingerprint or whose files changed since (size,
    times, inode: :func:`_file_stamp`)."""
    records = fingerprint.get("cases", {})
    if isinstance(records, list):
        records = {r["name"]: r for r in records}
    stale = []
    for case in cases:
        record = records.get(case.name)
        files = [f for f in [*case.image_files, case.label_file] if f is not None]
        if record is None or not _same_stamps(record.get("files"), [_file_stamp(f, info.root) for f in files]):
            stale.append(case.name)
    return stale


def _same_stamps(recorded: Any, now: list[dict[str, Any]]) -> bool:
    """The recorded stamps are the files' now, compared on the keys a record has (a plan
    of an earlier medseg has no ``ctime_ns``/``inode``)."""
    if not isinstance(recorded, list) or len(recorded) != len(now):
        return False
    return all(isinstance(r, dict) and all(r.get(k) == v for k, v in n.items() if k in r or k in ("path", "bytes"))
               for r, n in zip(recorded, now))


def _file_stamp(path: Path, root: Path) -> dict[str, Any]:
    """Where a case's file is and what it was when fingerprinted (to tell a stale
    fingerprint; :func:`medseg.atomic.file_stamp`)."""
    from medseg.atomic import file_stamp

    size, mtime_ns, ctime_ns, inode = file_stamp(path)
    try:
        shown = str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        shown = str(path)
    return {"path": shown, "bytes": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns, "inode": inode}


def _case_job(case: Case, info: DatasetInfo, index: int, seed: int, budget: int):
    return index, *case_fingerprint(case, info, index, seed, budget)


# --------------------------------------------------------------------------- dataset

def _worker_context():
    """Workers fork from a clean server process (:func:`medseg.process_pool.forkserver_context`)."""
    from medseg.process_pool import forkserver_context

    return forkserver_context(["medseg.planning.fingerprint", "scipy.ndimage"])


def _map_cases(jobs: list[tuple], workers: int, progress: bool) -> Iterable[tuple]:
    from medseg.process_pool import WorkerDied, map_in_processes
    from medseg.progress import case_progress

    bar = case_progress(len(jobs), "fingerprint", show=progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield _case_job(*job)
                bar.update()
            return
        for index, value, error in map_in_processes(_case_job, jobs, workers, _worker_context(), what="cases"):
            if isinstance(error, WorkerDied):  # found by running it alone: this case, not another
                raise DataError(f"case '{jobs[index][0].name}': fingerprint worker died (out of memory?)")
            if error is not None:
                raise error
            yield value
            bar.update()
    finally:
        bar.close()


def compute_fingerprint(
    dataset_root: str | Path,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    skeleton_budget: int = SKELETON_BUDGET,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fingerprint every training case of a dataset, in parallel processes.

    Parameters
    ----------
    dataset_root : path
        Dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
    workers : int
        Worker processes (1: in this process).
    seed : int
        Seeds the foreground sampling of each case.
    progress : bool
        Show progress on stderr (a bar on a terminal, else a line a minute: medseg.progress).
    skeleton_budget : int
        See :func:`label_thickness`.

    Returns
    -------
    fingerprint : dict
        JSON-ready; see the module docstring. Cases in dataset order.
    samples : dict of str to np.ndarray
        Case name -> ``(C, n)`` float32 intensity samples (written to
        ``fingerprint_samples.npz`` by :func:`medseg.planning.writer.write_fingerprint`).

    Raises
    ------
    DataError
        Not a dataset, no training case, or a case that cannot be read (naming its file).
    """
    root = Path(dataset_root)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # numTraining mismatch etc.: let the caller see them
        info, cases = check_dataset(root, "Tr")
    if not cases:
        raise DataError(f"{root}: no training cases in imagesTr/")
    from medseg.preprocessing.storage import check_case_names

    check_case_names(root, [case.name for case in cases])  # before the fingerprint: train would refuse the plan
    jobs = [(case, info, i, seed, skeleton_budget) for i, case in enumerate(cases)]
    records: list[dict[str, Any] | None] = [None] * len(cases)
    samples: dict[str, np.ndarray] = {}
    for index, record, case_samples in _map_cases(jobs, workers, progress):
        records[index] = record
        samples[record["name"]] = case_samples
    case_records = [r for r in records if r is not None]
    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "dataset": {
            "root": str(root.resolve()),
            "name": info.name,
            "file_ending": info.file_ending,
            "channel_names": {str(k): v for k, v in info.channel_names.items()},
            "labels": dict(info.labels),
            "num_cases": len(case_records),
        },
        "seed": seed,
        "samples_file": SAMPLES_FILE,
        "cases": case_records,
        "labels": _label_summary(case_records, info),
        "intensity": _intensity_summary(case_records, samples, info),
    }
    return fingerprint, samples


def _label_summary(records: list[dict[str, Any]], info: DatasetInfo) -> dict[str, Any]:
    """Per label: label_statistics' ratios and presence, voxel total, thickness."""
    stats = label_statistics_from_fingerprint({"cases": records}, info)["classes"]
    out: dict[str, Any] = {}
    for name, entry in stats.items():
        value = entry["value"]
        radii = [r["thickness"][str(value)]["radius_mm"] for r in records if str(value) in r["thickness"]]
        summary = dict(entry)
        summary["voxels"] = int(sum(r["label_voxels"].get(str(value), 0) for r in records))
        if radii:
            summary["radius_mm"] = {q: float(np.median([r[q] for r in radii])) for q in ("p10", "p50", "p90")}
        out[name] = summary
    return out


def _intensity_summary(
    records: list[dict[str, Any]], samples: Mapping[str, np.ndarray], info: DatasetInfo
) -> list[dict[str, Any]]:
    """nnU-Net's foreground intensity properties per channel, over the pooled samples."""
    pool = [samples[r["name"]] for r in records if r["has_foreground"]]
    out = []
    for c in range(info.num_channels):
        values = np.concatenate([p[c] for p in pool]).astype(np.float64) if pool else np.empty(0)
        entry: dict[str, Any] = {"name": info.channel_names[c]}
        if values.size:
            entry.update(_intensity_stats(values))
            entry["median"] = float(np.median(values))
        else:
            entry["n"] = 0
        out.append(entry)
    return out


# --------------------------------------------------------------------------- replacing a second pass

def _select(records: list[dict[str, Any]], cases: Iterable[Case | str] | None) -> list[dict[str, Any]]:
    if cases is None:
        return list(records)
    by_name = {r["name"]: r for r in records}
    names = [c if isinstance(c, str) else c.name for c in cases]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"fingerprint: case(s) {', '.join(missing[:5])} are not in the fingerprint; rerun medseg plan")
    return [by_name[n] for n in names]


def label_statistics_from_fingerprint(
    fingerprint: Mapping[str, Any], info: DatasetInfo, cases: Iterable[Case | str] | None = None
) -> dict[str, Any]:
    """What :func:`medseg.data.dataset.label_statistics` returns, from the fingerprint.

    ``cases`` (Case objects or names) selects a subset, e.g. the training split;
    default all fingerprinted cases.

    Raises
    ------
    DataError
        No case selected, or a selected case missing from the fingerprint.
    """
    records = _select(fingerprint["cases"], cases)
    if not records:
        raise DataError("label_statistics: no case has a label file")
    classes = {}
    for name, value in sorted(info.labels.items(), key=lambda kv: kv[1]):
        ratios = np.asarray(
            [r["label_voxels"].get(str(value), 0) / float(r["num_voxels"]) for r in records], dtype=np.float64
        )
        classes[name] = {
            "value": int(value),
            "ratio_mean": float(ratios.mean()),
            "ratio_std": float(ratios.std()),
            "presence": float(np.mean(ratios > 0)),
        }
    return {"num_cases": len(records), "classes": classes}


def load_samples(fingerprint_path: str | Path) -> dict[str, np.ndarray]:
    """The intensity samples written next to ``fingerprint.json`` (case name -> ``(C, n)``)."""
    path = Path(fingerprint_path)
    npz = path.parent / SAMPLES_FILE if path.suffix == ".json" else path
    if not npz.is_file():
        raise DataError(f"{npz}: intensity samples of the fingerprint not found; rerun medseg plan")
    with np.load(npz) as data:
        return {k: data[k] for k in data.files}


def preprocessing_from_fingerprint(
    fingerprint: Mapping[str, Any],
    samples: Mapping[str, np.ndarray],
    info: DatasetInfo,
    config: Any,
    cases: Iterable[Case | str] | None = None,
) -> dict[str, Any]:
    """What :func:`medseg.data.transforms.fit_preprocessing` returns, from the fingerprint.

    Same schemes (``data.normalization``), same statistics (``ct`` channels: the
    [0.5, 99.5] percentiles of the pooled foreground samples, or
    ``normalization.ct_clip``, and their mean and std; all voxels' samples when no
    selected case has foreground). The samples are the fingerprint's (at most
    :data:`FG_SAMPLES_PER_CASE` per case, drawn with the fingerprint's seed), so the
    numbers equal ``fit_preprocessing``'s exactly for cases with fewer foreground
    voxels than that, and agree to sampling error otherwise.

    Parameters
    ----------
    fingerprint, samples
        :func:`compute_fingerprint`'s results (or read back from disk,
        :func:`load_samples`).
    info : DatasetInfo
    config : RunConfig
        ``data.normalization``.
    cases : iterable of Case or str, optional
        The cases to fit on (the training split); default all.
    """
    from medseg.data.transforms import normalization_from_samples

    records = _select(fingerprint["cases"], cases)
    with_fg = [samples[r["name"]] for r in records if r["has_foreground"]]
    pool = with_fg or [samples[r["name"]] for r in records]
    return normalization_from_samples(info, config, lambda c: [p[c] for p in pool])

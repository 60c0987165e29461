"""``medseg preprocess``: fill the cache, in parallel, resumably, on one or many processes.

:func:`preprocess_dataset` is what ``medseg preprocess`` and ``medseg train`` both call:

1. the split (the normalisation statistics are fitted on the training cases) and the
   statistics: given (a resumed run's), found in the cache's ``statistics/``, or fitted
   once and stored there;
2. the cache folder of this dataset and plan (:mod:`medseg.preprocessing.cache`) and
   its ``manifest.json``;
3. every case whose files are not complete and valid
   (:func:`~medseg.preprocessing.storage.valid_case_meta`) is preprocessed
   (:func:`~medseg.preprocessing.case.preprocess_case`) and written, in ``workers``
   processes with a progress bar. A
   rerun after a kill or a failure skips the complete cases and redoes the rest; the
   output does not depend on the order, the worker count or the interruption, so the
   cache ends byte for byte the same.

Under ``torchrun`` the cases left to do are sharded over the processes (case ``i`` to
rank ``i % N``, as prediction shards); each rank runs its own pool of
``workers`` processes (default: this node's cores divided among its ranks). On a shared
file system the ranks of every node fill one cache; with a node-local ``cache_dir``,
each node then fills in the cases its node did not do, sharded over its local ranks.
An error on any rank stops every rank.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from medseg import distributed
from medseg.atomic import blocking_file, make_writable_folder
from medseg.data.dataset import Case, DatasetInfo, check_dataset, dataset_data_folder, load_case, split_cases
from medseg.data.transforms import fit_preprocessing
from medseg.errors import ConfigError, DataError, MedsegError
from medseg.preprocessing.cache import (
    cache_folder,
    cache_inputs,
    cache_root,
    dataset_fingerprint,
    digest,
    read_statistics,
    statistics_inputs,
    unchanged_elsewhere,
    write_manifest,
    write_statistics,
)
from medseg.preprocessing.case import preprocess_case
from medseg.preprocessing.storage import CachedCase, check_case_names, link_case, valid_case_meta, write_case
from medseg.process_pool import WorkerDied, map_in_processes
from medseg.progress import case_progress

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig

__all__ = [
    "PreprocessedDataset",
    "available_cpus",
    "select_cases",
    "preprocess_dataset",
    "run_preprocessing",
]

log = logging.getLogger("medseg.preprocessing")


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(os.cpu_count() or 1, 1)


def cpus_per_process() -> int:
    """This node's cores divided among the torchrun processes on it (all of them alone)."""
    local = distributed._env_int("LOCAL_WORLD_SIZE", 1)
    return max(available_cpus() // max(local, 1), 1)


def select_cases(cfg: "RunConfig", kept_split: dict[str, list[str]] | None = None
                 ) -> tuple[DatasetInfo, list[Case], list[Case]]:
    """The dataset and its training / validation cases, as ``medseg train`` splits them.

    ``kept_split`` (a resumed run's checkpoint ``split``: ``{"train": [...], "val":
    [...]}``) keeps every case that is still there in its role and order; only cases it
    does not name are placed by the split drawn now. Drawn afresh, a seeded split of
    another number of cases moves cases between the two: a resume after a case was added
    validated on a case it had trained on, and chose ``best.pt`` across two validation
    sets.

    Raises
    ------
    DataError
        No training cases, an ``ignore`` label, a split leaving no training case, or
        what :func:`~medseg.data.dataset.check_dataset` and
        :func:`~medseg.data.dataset.split_cases` report.
    """
    root = cfg.data.dataset
    info, cases = check_dataset(root, "Tr")
    if not cases:
        raise DataError(f"{root}: no training cases in imagesTr/")
    info.check_trainable()
    train_cases, val_cases = split_cases(cases, cfg.data.val_fraction, cfg.seed, cfg.data.split_file, root=root)
    if kept_split is not None:
        train_cases, val_cases = _keep_split(kept_split, train_cases, val_cases)
    if not train_cases:
        raise DataError(f"{root}: the split leaves no training cases")
    _check_dimensionality(cfg, cases)
    check_case_names(root, [case.name for case in cases])
    return info, train_cases, val_cases


def _check_dimensionality(cfg: "RunConfig", cases: list[Case]) -> None:
    """The dataset's dimension is the patch's, read from the first readable case's header:
    a 2D patch on a 3D dataset was refused by the first case preprocessed, after the
    normalisation statistics had read every training case. (A case of another dimension
    than the others is refused when it is preprocessed.)"""
    from medseg.data.io import read_geometry

    for case in cases:
        try:
            geometry = read_geometry(case.image_files[0])[1]
        except DataError:
            continue  # named when the case is read
        if geometry.ndim != cfg.spatial_dims:
            raise ConfigError(
                f"data.patch_size: {list(cfg.data.patch_size)} has {cfg.spatial_dims} values but case '{case.name}' "
                f"is {geometry.ndim}D (shape {geometry.shape})"
            )
        return


def _keep_split(kept: dict[str, list[str]], train: list[Case], val: list[Case]) -> tuple[list[Case], list[Case]]:
    """``kept``'s cases that still exist, in its roles and order; the others as drawn now."""
    by_name = {case.name: case for case in train + val}
    named = set(kept["train"]) | set(kept["val"])
    drawn_val = {case.name for case in val}
    new_train = [case for case in train if case.name not in named]
    new_val = [case for case in val if case.name not in named]
    kept_train = [by_name[name] for name in kept["train"] if name in by_name]
    kept_val = [by_name[name] for name in kept["val"] if name in by_name]
    moved = sorted(name for name in kept["train"] if name in drawn_val) + sorted(
        name for name in kept["val"] if name in by_name and name not in drawn_val)
    if moved:
        shown = ", ".join(moved[:3]) + (", ..." if len(moved) > 3 else "")
        log.warning("keeping the checkpoint's split (%d validation cases): drawn afresh for the cases there are now, "
                    "it would move %d case(s) between training and validation (%s)", len(kept_val + new_val),
                    len(moved), shown)
    return kept_train + new_train, kept_val + new_val


@dataclass
class PreprocessedDataset:
    """A complete cache folder: its statistics and its cases."""

    folder: Path
    key: str
    preprocessing: dict[str, Any]
    cases: dict[str, CachedCase]
    done: int = 0  # cases that were missing and were preprocessed by this call (all ranks)
    linked: int = 0  # cases taken from an earlier cache folder by this call (this rank)
    # the dataset's files as the cache key saw them (cache.dataset_fingerprint)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def label_statistics(self, names: Sequence[str], info: DatasetInfo) -> dict[str, Any]:
        """:func:`medseg.data.dataset.label_statistics` of the cases ``names``, from the raw
        label histograms in the cache instead of reading the label files again."""
        label_names = {v: k for k, v in info.labels.items()}
        ratios: dict[int, list[float]] = {v: [] for v in label_names}
        for name in names:
            hist = self.cases[name].raw_histogram
            total = float(sum(hist.values())) or 1.0
            for v in label_names:
                ratios[v].append(hist.get(v, 0) / total)
        classes = {}
        for v, label in sorted(label_names.items()):
            r = np.asarray(ratios[v], dtype=np.float64)
            classes[label] = {
                "value": int(v),
                "ratio_mean": float(r.mean()),
                "ratio_std": float(r.std()),
                "presence": float(np.mean(r > 0)),
            }
        return {"num_cases": len(names), "classes": classes}


# --------------------------------------------------------------------------- workers

# What each pool process needs, set once by the pool's initializer (fork) or arguments.
_JOB: dict[str, Any] = {}


def _init_worker(job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _JOB.clear()
    _JOB.update(job)


def _preprocess_one(case: Case) -> str:
    job = _JOB
    written = preprocess_case(case, job["info"], job["config"], job["preprocessing"])
    write_case(job["folder"], written, job["key"])
    return case.name


def _run_cases(cases: list[Case], job: dict[str, Any], workers: int, show: bool) -> None:
    """Preprocess ``cases`` in ``workers`` processes (in this one for one worker or case)."""
    if not cases:
        return
    bar = case_progress(len(cases), "preprocess", show=show, dynamic_ncols=True)
    try:
        if workers <= 1 or len(cases) == 1:
            previous = dict(_JOB)
            _JOB.clear()
            _JOB.update(job)
            try:
                for case in cases:
                    _preprocess_one(case)
                    bar.update(1)
            finally:
                _JOB.clear()
                _JOB.update(previous)
            return
        # fork: the workers start at once with this process's imports (spawn would
        # import torch and MONAI again in each); they run torch on one thread
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        died = []
        for index, _, error in map_in_processes(_preprocess_one, [(c,) for c in cases], workers, context,
                                                initializer=_init_worker, initargs=(job,), what="cases"):
            if isinstance(error, WorkerDied):  # the others go on: each written case is kept
                died.append(cases[index].name)
            elif error is not None:
                raise error  # the first error stops the run (the cases not started are cancelled)
            bar.update(1)
        if died:  # each died alone (medseg.process_pool): fewer workers would not help
            raise MedsegError(
                f"preprocessing case '{died[0]}': a worker process died running it alone (out of memory, or "
                "killed)" + (f", and {len(died) - 1} more case(s)" if len(died) > 1 else "")
                + "; the other cases are written and kept: rerun once more memory is free (a coarser "
                "data.target_spacing makes smaller cases)"
            )
    finally:
        bar.close()


# --------------------------------------------------------------------------- the cache

def _check_writable(root: Path) -> None:
    in_the_way = blocking_file(root)
    if in_the_way is not None:
        raise MedsegError(
            f"{root}: the preprocessing cache folder cannot be made, {in_the_way} exists and is not a folder; "
            "set data.cache_dir or $MEDSEG_CACHE to a folder"
        )
    try:
        make_writable_folder(root)
    except OSError as err:
        raise MedsegError(
            f"{root}: the preprocessing cache folder is not writable ({err.strerror or err}); "
            "set data.cache_dir or $MEDSEG_CACHE to a writable folder"
        ) from None


def _loaded(cases: list[Case], info: DatasetInfo) -> Iterator[dict[str, Any]]:
    for case in cases:
        yield load_case(case, info)


def _statistics_from_plan(cfg: "RunConfig", info: DatasetInfo, train_cases: list[Case]) -> dict[str, Any]:
    """The normalisation statistics from ``data.fingerprint`` (``medseg plan``): no pass over the data."""
    from medseg.planning.fingerprint import load_samples, preprocessing_from_fingerprint, stale_cases
    from medseg.planning.writer import read_fingerprint

    path = Path(cfg.data.fingerprint)
    planned = read_fingerprint(path)
    stale = stale_cases(planned, info, train_cases)
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise DataError(
            f"{path}: data.fingerprint does not describe the dataset's current files ({shown} missing or "
            "changed since); rerun medseg plan, or unset data.fingerprint"
        )
    return preprocessing_from_fingerprint(planned, load_samples(path), info, cfg, train_cases)


def _statistics(cfg: "RunConfig", info: DatasetInfo, root: Path, fingerprint: dict[str, Any],
                train_cases: list[Case]) -> dict[str, Any]:
    """The normalisation statistics: from ``data.fingerprint`` when the config names one; else
    from ``statistics/``, else fitted now (on rank 0 under torchrun) and stored."""
    if cfg.data.fingerprint is not None:
        return _statistics_from_plan(cfg, info, train_cases)
    fit_key = digest(statistics_inputs(cfg, info, fingerprint, train_cases))
    with distributed.main_process("fitting the normalisation statistics") as main:
        if main and read_statistics(root, info, fit_key) is None:
            log.info("fitting the normalisation statistics on %d training cases", len(train_cases))
            write_statistics(root, info, fit_key, fit_preprocessing(_loaded(train_cases, info), info, cfg))
    found = read_statistics(root, info, fit_key)
    if found is None:  # a node-local cache_dir on another node: the fit is deterministic
        found = fit_preprocessing(_loaded(train_cases, info), info, cfg)
        write_statistics(root, info, fit_key, found)
    return found


def _scan(folder: Path, cases: list[Case], key: str, verify: bool = False) -> tuple[dict[str, dict[str, Any]], list[Case]]:
    """The complete cases' JSON, and the cases still to do (``verify``: their files' SHA-256 checked)."""
    metas = {c.name: valid_case_meta(folder, c.name, key, verify) for c in cases}
    return {n: m for n, m in metas.items() if m is not None}, [c for c in cases if metas[c.name] is None]


def _take_unchanged(root: Path, info: DatasetInfo, folder: Path, key: str, inputs: dict[str, Any], todo: list[Case]
                    ) -> tuple[dict[str, dict[str, Any]], list[Case]]:
    """Link into ``folder`` the cases of ``todo`` that an earlier cache folder of this
    dataset holds from the same inputs, their files checked against their recorded
    SHA-256 (:func:`medseg.preprocessing.storage.link_case`); returns their JSON and the
    cases left to preprocess."""
    sources = unchanged_elsewhere(root, info, folder, inputs, [c.name for c in todo])
    linked: dict[str, dict[str, Any]] = {}
    left = []
    for case in todo:
        source = sources.get(case.name)
        meta = link_case(source[0], source[1], folder, case.name, key) if source is not None else None
        if meta is None:
            left.append(case)
        else:
            linked[case.name] = meta
    if linked:
        origins = sorted({sources[n][0].name for n in linked})
        log.info("%d case%s unchanged since the cache%s %s: linked, not preprocessed again", len(linked),
                 "" if len(linked) == 1 else "s", "" if len(origins) == 1 else "s", ", ".join(origins))
    return linked, left


def preprocess_dataset(
    cfg: "RunConfig",
    info: DatasetInfo,
    train_cases: list[Case],
    val_cases: list[Case],
    preprocessing: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
    verify: bool = False,
) -> PreprocessedDataset:
    """Make sure the cache holds every training and validation case; return it.

    Parameters
    ----------
    cfg : RunConfig
        ``data.*`` (dataset, cache_dir, orientation, spacing, normalisation) and ``seed``.
    info, train_cases, val_cases
        :func:`select_cases`'s result.
    preprocessing : dict, optional
        Normalisation statistics to use (a resumed run's); fitted (or found) otherwise.
    workers : int, optional
        Processes per rank (default :func:`cpus_per_process`).
    progress : bool
        Show a progress bar (rank 0) while cases are written.
    verify : bool
        Check the SHA-256 of every cached file against the one recorded when it was
        written, and preprocess a case again whose file changed (``medseg preprocess``;
        training checks sizes only, to start without reading the whole cache).

    Raises
    ------
    MedsegError
        The cache folder is not writable or the disk is full (one line naming it).
    DataError, ConfigError
        A case cannot be read or does not fit the config (named); the cases done so
        far stay in the cache.
    """
    root = cache_root(cfg)
    inner = dataset_data_folder(root, cfg.data.dataset)
    if inner is not None:
        raise ConfigError(f"data.cache_dir {root}: lies in the dataset's {inner}/ folder; put the cache elsewhere")
    try:
        _check_writable(root)
        unwritable = None
    except MedsegError as err:
        if not root.is_dir():
            raise
        unwritable = err  # a complete cache on a read-only mount (a shared one) is only read
    cases = sorted(list(train_cases) + list(val_cases), key=lambda c: c.name)
    fingerprint = dataset_fingerprint(info, cases)
    if preprocessing is None:
        preprocessing = _statistics(cfg, info, root, fingerprint, list(train_cases))
    inputs = cache_inputs(cfg, info, fingerprint, preprocessing)
    key = digest(inputs)
    folder = cache_folder(root, info, key)
    # every rank (idempotent: the same bytes, renamed into place), so that a node-local
    # cache_dir gets one on every node
    write_manifest(folder, key, inputs, [c.name for c in cases])

    job = {"info": info, "config": cfg, "preprocessing": preprocessing, "folder": folder, "key": key}
    workers = cpus_per_process() if workers is None else max(int(workers), 1)
    show = progress and distributed.is_main()
    metas, todo = _scan(folder, cases, key, verify)
    if todo and unwritable is not None:
        raise unwritable
    linked: dict[str, dict[str, Any]] = {}
    if todo:  # a case added, a file touched: the others come from the earlier cache as they are
        linked, todo = _take_unchanged(root, info, folder, key, inputs, todo)
        metas.update(linked)
    # a collective: every rank has listed its cases before any rank writes one
    if distributed.any_rank(bool(todo)):
        log.info("preprocessing %d of %d cases into %s (%d worker process%s per rank)", len(todo), len(cases),
                 folder, workers, "" if workers == 1 else "es")
        with distributed.synchronized("preprocessing"):
            mine = todo[distributed.rank() :: distributed.world_size()]
            _run_cases(mine, job, workers, show)
        # a node-local cache_dir lacks the other nodes' cases: this node's ranks add them
        _, left = _scan(folder, cases, key)
        if distributed.any_rank(bool(left)):
            local_rank, local_world = distributed.local_rank(), distributed._env_int("LOCAL_WORLD_SIZE", 1)
            with distributed.synchronized("preprocessing"):
                _run_cases(left[local_rank::local_world], job, workers, show)
        metas, missing = _scan(folder, cases, key)
        if missing:
            raise MedsegError(f"{folder}: cases {', '.join(c.name for c in missing[:5])} are missing after preprocessing")
    else:
        log.info("using the preprocessed cache %s (%d cases)", folder, len(cases))
    return PreprocessedDataset(folder, key, preprocessing, {n: CachedCase(folder, m) for n, m in metas.items()}, len(todo),
                               len(linked), fingerprint)


def run_preprocessing(cfg: "RunConfig", workers: int | None = None) -> PreprocessedDataset:
    """``medseg preprocess``: :func:`preprocess_dataset` of the config's split, under
    torchrun with the cases sharded over the processes (gloo, CPU)."""
    import torch

    with distributed.process_group(torch.device("cpu")):
        info, train_cases, val_cases = select_cases(cfg)
        return preprocess_dataset(cfg, info, train_cases, val_cases, workers=workers, verify=True)

"""Training patches as a pure function of (seed, sample number), read from the cache.

Sample ``k`` (the ``k % batch_size``-th patch of iteration ``k // batch_size``) is drawn
from case ``perm_e[k % n]`` where ``perm_e`` is a seeded permutation of the ``n``
training cases for "epoch" ``e = k // n`` (every case once per ``n`` samples, like
nnU-Net's random case order), and everything random about it is drawn from
``transform_seed(seed, k)``. Nothing depends on which worker process makes a sample
or on what was sampled before, so a run resumed at iteration ``i`` sees exactly the
patches the uninterrupted run saw, with any number of workers.

Under torchrun ``batch_size`` is the *global* batch: of the ``batch_size`` samples of an
iteration, rank ``r`` of ``N`` makes samples ``r, r + N, r + 2N, ...``, so the ``N``
ranks together see exactly the patches one process sees at the same ``batch_size``,
and the shards are a pure function of ``(seed, sample, rank, N)`` as well.

How :class:`PatchSource` makes a patch from a case of the preprocessing cache
(:mod:`medseg.preprocessing`), reading only the voxels it needs:

1. its place: with probability ``data.foreground_oversample`` centred on a stored
   voxel of a foreground class drawn uniformly among the case's classes (nnU-Net's
   oversampling), else uniformly at random; moved inside the case where the case is
   larger than the patch, centred where it is smaller (its border voxels repeated
   around it);
2. whether it is rotated and scaled (``data.augmentation.affine_prob``); if so its
   angles and scales are drawn first and the read box grows by what they need on every
   side (:func:`~medseg.data.transforms.affine_box_margin`), so the rotated patch sees
   real context instead of repeated border voxels, and an unrotated patch reads no more
   than itself;
3. the box is read from the cache (image, label, and the label projections a loss may
   want), then :func:`~medseg.data.transforms.affine_augmentation` resamples it to the
   patch and :func:`~medseg.data.transforms.patch_augmentations` does the rest.

``data.cache_rate`` of the cases (the first ones) are held decompressed in memory; the
others are read box by box, so memory does not grow with the number of cases.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from monai.data import list_data_collate
from monai.data.meta_obj import get_track_meta, set_track_meta
from torch.utils.data import DataLoader, Dataset

from medseg.data.transforms import (
    affine_augmentation,
    affine_box_margin,
    affine_matrix,
    patch_augmentations,
    whole_volume_targets,
)

if TYPE_CHECKING:  # pragma: no cover
    from medseg.config import RunConfig
    from medseg.data.dataset import DatasetInfo
    from medseg.preprocessing import CachedCase

_PERM_STREAM = 1
_TRANSFORM_STREAM = 2
log = logging.getLogger("medseg")
# MONAI's list_data_collate dumps its "dev_collate" walk of a batch (">> collate/stack a
# list of tensors", ...) at the critical level whenever collating fails, e.g. when the
# workers run out of shared memory: lines that trailed medseg's one-line error and say
# nothing to a user (the batches are medseg's own patches)
logging.getLogger("dev_collate").addHandler(logging.NullHandler())
logging.getLogger("dev_collate").propagate = False
# `data.num_workers: auto` never starts more workers than this per process
_MAX_AUTO_WORKERS = 8


def case_for_sample(seed: int, sample: int, num_cases: int) -> int:
    epoch, position = divmod(sample, num_cases)
    perm = np.random.default_rng([seed, _PERM_STREAM, epoch]).permutation(num_cases)
    return int(perm[position])


def transform_seed(seed: int, sample: int) -> int:
    return int(np.random.default_rng([seed, _TRANSFORM_STREAM, sample]).integers(0, 2**32 - 1))


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Samples per rank of a global batch; the batch must split evenly over the ranks.

    Raises
    ------
    ValueError
        ``batch_size`` is not a multiple of ``world_size``.
    """
    if world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
    return batch_size // world_size


def sample_number(iteration: int, slot: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """Global sample number of the ``slot``-th patch rank ``rank`` makes for ``iteration``."""
    return iteration * batch_size + slot * world_size + rank


def resolve_num_workers(num_workers: int | str) -> int:
    """``data.num_workers``: an integer as given (at most twice the cores, with a warning);
    ``auto`` -> ``min(cores - 1, 8)``.

    ``cores`` are those of this process's affinity mask divided among the torchrun
    processes of the node; one is left to the training process itself, so a machine
    with one core (per process) loads in the main process (0 workers).
    """
    from medseg.preprocessing.run import cpus_per_process

    cores = cpus_per_process()
    if num_workers != "auto":
        requested = int(num_workers)
        if requested > 2 * cores:  # patches are CPU-bound: more processes only cost memory
            log.warning("data.num_workers %d: this process has %d core(s); starting %d workers", requested, cores,
                        2 * cores)
            return 2 * cores
        return requested
    return max(min(cores - 1, _MAX_AUTO_WORKERS), 0)


class PatchSource:
    """The training cases of the cache and how a patch is made from one of them.

    Parameters
    ----------
    cases : sequence of CachedCase
        The training cases, in the split's order (sample ``k`` uses index
        :func:`case_for_sample`).
    config : RunConfig
        ``data.patch_size``, ``data.foreground_oversample``, ``data.augmentation``,
        ``data.cache_rate`` and ``losses`` (label-derived targets).
    info : DatasetInfo
        Classes (for the loss targets).
    """

    def __init__(self, cases: Sequence["CachedCase"], config: "RunConfig", info: "DatasetInfo") -> None:
        self.cases = list(cases)
        in_memory = int(round(config.data.cache_rate * len(self.cases)))
        for case in self.cases[:in_memory]:
            case.load()
        self.patch = np.asarray(config.data.patch_size, dtype=np.int64)
        self.foreground = float(config.data.foreground_oversample)
        self.affine_prob = float(config.data.augmentation.affine_prob)
        self.targets = whole_volume_targets(config, info)
        self.label_keys = ["label", *(key for key, _ in self.targets)]
        self.affine = affine_augmentation(config, [a for _, axes in self.targets for a in axes])
        self.augment = patch_augmentations(config, info, self.label_keys)

    def __len__(self) -> int:
        return len(self.cases)

    def _lower_corner(self, case: "CachedCase", rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(case.shape, dtype=np.int64)
        classes = [v for v, n in sorted(case.class_counts.items()) if n > 0]
        if rng.random() < self.foreground and classes:
            value = classes[int(rng.integers(len(classes)))]
            locations = case.class_locations(value)
            lower = locations[int(rng.integers(len(locations)))].astype(np.int64) - self.patch // 2
        else:
            lower = np.array([int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, self.patch)])
        inside = np.clip(lower, 0, np.maximum(shape - self.patch, 0))
        centred = -((self.patch - shape) // 2)  # smaller than the patch: padded on both sides
        return np.where(shape >= self.patch, inside, centred)

    def make(self, index: int, seed: int) -> dict[str, Any]:
        """Patch of case ``index`` for the sample whose :func:`transform_seed` is ``seed``:
        ``image`` float32 ``(C, *patch)``, ``label`` int64 ``(1, *patch)``, and the loss targets."""
        rng = np.random.default_rng(seed)
        case = self.cases[index]
        lower = self._lower_corner(case, rng)
        margin = np.zeros_like(self.patch)
        affine = self.affine is not None and rng.random() < self.affine_prob
        if affine:
            self.affine.set_random_state(seed=int(rng.integers(2**31)))
            self.affine.randomize()  # the angles and scales first: they decide the box
            margin = np.asarray(affine_box_margin(affine_matrix(self.affine), self.patch))
        start, size = lower - margin, self.patch + 2 * margin
        image, label = case.read(start, size)
        data: dict[str, Any] = {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
        for key, axes in self.targets:
            data[key] = torch.from_numpy(case.projection_region(axes, start, size))
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: no MetaTensor bookkeeping per patch
        try:
            if affine:
                for key in data:
                    mode = "bilinear" if key == "image" else "nearest"
                    data[key] = self.affine(data[key], mode=mode, randomize=False)
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            data = self.augment(data)
        finally:
            set_track_meta(tracking)
        return {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in data.items()}


class PatchStream(Dataset):
    """Patches for iterations ``start .. stop - 1`` of a run, ``batch_size`` per iteration.

    ``batch_size`` is the global batch; with ``world_size`` > 1 the stream holds only
    rank ``rank``'s ``batch_size // world_size`` patches of each iteration (see the
    module docstring).
    """

    def __init__(
        self, cases: PatchSource, seed: int, batch_size: int, start: int, stop: int,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.cases = cases
        self.seed = seed
        self.batch_size = batch_size
        self.start = start
        self.stop = stop
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = local_batch_size(batch_size, world_size)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.local_batch_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, slot = divmod(index, self.local_batch_size)
        sample = sample_number(self.start + step, slot, self.batch_size, self.rank, self.world_size)
        case = case_for_sample(self.seed, sample, len(self.cases))
        return self.cases.make(case, transform_seed(self.seed, sample))


def _worker_init(worker_id: int) -> None:
    import signal

    # a worker inherits the command's SIGTERM handler (medseg.cli: stop as Ctrl-C, saying
    # so); a SIGTERM to the process group then printed the worker's tracebacks beside the
    # command's one line: the command says it, the worker just ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Patches are reseeded per sample; this only keeps stray global RNG use in
    # workers (e.g. third-party transforms) from being identical across workers.
    info = torch.utils.data.get_worker_info()
    np.random.seed((info.seed if info is not None else worker_id) % 2**32)


def loader_failure(err: BaseException) -> str | None:
    """What a PyTorch DataLoader error says in one line, when a worker process died or ran
    out of shared memory (torch raises a RuntimeError with a traceback of the worker);
    None for any other error."""
    import re

    text = str(err)
    if "shared memory" in text or ("/torch_" in text and "No space left" in text) or "Bus error" in text:
        try:
            stats = os.statvfs("/dev/shm")
            free = f"{stats.f_bavail * stats.f_frsize / 2**20:.3g} MB free of {stats.f_blocks * stats.f_frsize / 2**20:.3g}"
        except OSError:
            free = "its size unknown"
        return (f"the data-loading workers ran out of shared memory (/dev/shm: {free}), where they pass batches to "
                "the trainer: start the container with more (docker run --shm-size=4g) or set data.num_workers=0")
    found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([^)]*)\) (?:is killed by signal: ([^.]*)|exited unexpectedly)",
                      text)
    return _worker_died(found.group(1), found.group(2)) if found else None


def _worker_died(pid: str, signal_name: str | None) -> str:
    """The line for a data-loading worker that died, killed by ``signal_name`` ("Killed")
    or (None) exited unexpectedly."""
    how = f"killed by signal: {signal_name}" if signal_name else "it exited unexpectedly"
    # SIGKILL is the out-of-memory killer's; torch reports it either way, by timing
    hint = ": out of memory? fewer data.num_workers, a lower data.cache_rate or a smaller patch need less" \
        if not signal_name or "Killed" in signal_name else ""
    return f"a data-loading worker process (pid {pid}) died ({how}{hint})"


def loader_batches(loader: DataLoader):
    """The batches of ``loader``; a worker's death or a full /dev/shm is a
    :class:`~medseg.errors.RunStopped` in one line (:func:`loader_failure`), not a
    PyTorch traceback through the training loop."""
    from medseg.errors import RunStopped

    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:
            reason = loader_failure(err)
            if reason is None:
                raise
            raise RunStopped(reason) from None
        except (OSError, EOFError):  # a dead worker's half-passed batch ("Connection reset by peer")
            reason = _dead_worker(batches)
            if reason is None:
                raise
            raise RunStopped(reason) from None
        yield batch


def _dead_worker(batches, wait: float = 5.0) -> str | None:
    """The line for the first dead worker of a DataLoader iterator (:func:`_worker_died`), or
    None when none has died within ``wait`` seconds: a connection the worker reset is
    noticed before the kernel has made the killed worker a process that can be reaped
    (under load its exit code was still unknown, and the traceback went out)."""
    import signal
    import time

    workers = list(getattr(batches, "_workers", []))
    deadline = time.monotonic() + wait
    while workers:
        for worker in workers:
            code = worker.exitcode
            if code is not None:
                return _worker_died(str(worker.pid), signal.strsignal(-code) if code < 0 else None)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return None


def patch_loader(
    cases: PatchSource, seed: int, batch_size: int, start: int, stop: int, num_workers: int | str,
    pin_memory: bool, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """Batches for iterations ``start .. stop - 1`` in order (one batch per iteration).

    ``batch_size`` is the global batch; each of ``world_size`` ranks gets its
    ``batch_size // world_size`` share of every iteration. ``num_workers`` may be
    ``"auto"`` (:func:`resolve_num_workers`); workers stay up for the whole run.
    """
    stream = PatchStream(cases, seed, batch_size, start, stop, rank=rank, world_size=world_size)
    workers = resolve_num_workers(num_workers)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        stream,
        batch_size=stream.local_batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=list_data_collate,
        worker_init_fn=_worker_init,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # two batches ahead per worker: enough to hide a slow patch, few patches held
        prefetch_factor=2 if workers > 0 else None,
    )

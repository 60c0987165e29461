"""Training patches as a pure function of (seed, sample number).

Sample ``k`` (the ``k % batch_size``-th patch of iteration ``k // batch_size``) is drawn
from case ``perm_e[k % n]`` where ``perm_e`` is a seeded permutation of the ``n``
training cases for "epoch" ``e = k // n`` (every case once per ``n`` samples, like
nnU-Net's random case order), and the random transforms are reseeded from
``(seed, k)`` before it is made. Nothing depends on which worker process makes a sample
or on what was sampled before, so a run resumed at iteration ``i`` sees exactly the
patches the uninterrupted run saw, with any number of workers.

Under torchrun ``batch_size`` is the *global* batch: of the ``batch_size`` samples of an
iteration, rank ``r`` of ``N`` makes samples ``r, r + N, r + 2N, ...``, so the ``N``
ranks together see exactly the patches one process sees at the same ``batch_size``,
and the shards are a pure function of ``(seed, sample, rank, N)`` as well.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, list_data_collate
from torch.utils.data import DataLoader, Dataset

_PERM_STREAM = 1
_TRANSFORM_STREAM = 2


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


class PatchStream(Dataset):
    """Patches for iterations ``start .. stop - 1`` of a run, ``batch_size`` per iteration.

    Wraps a :class:`~monai.data.CacheDataset` whose transform is the ``train`` pipeline:
    the cached (deterministic) part is reused, the random part is reseeded per sample.
    ``batch_size`` is the global batch; with ``world_size`` > 1 the stream holds only
    rank ``rank``'s ``batch_size // world_size`` patches of each iteration (see the
    module docstring).
    """

    def __init__(
        self, cases: CacheDataset, seed: int, batch_size: int, start: int, stop: int,
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
        self.cases.transform.set_random_state(seed=transform_seed(self.seed, sample))
        item = self.cases[case]
        return item[0] if isinstance(item, list) else item


def _worker_init(worker_id: int) -> None:
    # Transforms are reseeded per sample; this only keeps stray global RNG use in
    # workers (e.g. third-party transforms) from being identical across workers.
    info = torch.utils.data.get_worker_info()
    np.random.seed((info.seed if info is not None else worker_id) % 2**32)


def patch_loader(
    cases: CacheDataset, seed: int, batch_size: int, start: int, stop: int, num_workers: int, pin_memory: bool,
    rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """Batches for iterations ``start .. stop - 1`` in order (one batch per iteration).

    ``batch_size`` is the global batch; each of ``world_size`` ranks gets its
    ``batch_size // world_size`` share of every iteration.
    """
    stream = PatchStream(cases, seed, batch_size, start, stop, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        stream,
        batch_size=stream.local_batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list_data_collate,
        worker_init_fn=_worker_init,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )

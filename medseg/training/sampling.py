"""Training patches as a pure function of (seed, sample number).

Sample ``k`` (the ``k % batch_size``-th patch of iteration ``k // batch_size``) is drawn
from case ``perm_e[k % n]`` where ``perm_e`` is a seeded permutation of the ``n``
training cases for "epoch" ``e = k // n`` (every case once per ``n`` samples, like
nnU-Net's random case order), and the random transforms are reseeded from
``(seed, k)`` before it is made. Nothing depends on which worker process makes a sample
or on what was sampled before, so a run resumed at iteration ``i`` sees exactly the
patches the uninterrupted run saw, with any number of workers.
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


class PatchStream(Dataset):
    """Patches for iterations ``start .. stop - 1`` of a run, ``batch_size`` per iteration.

    Wraps a :class:`~monai.data.CacheDataset` whose transform is the ``train`` pipeline:
    the cached (deterministic) part is reused, the random part is reseeded per sample.
    """

    def __init__(self, cases: CacheDataset, seed: int, batch_size: int, start: int, stop: int) -> None:
        self.cases = cases
        self.seed = seed
        self.batch_size = batch_size
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.batch_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.start * self.batch_size + index
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
    cases: CacheDataset, seed: int, batch_size: int, start: int, stop: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """Batches for iterations ``start .. stop - 1`` in order (one batch per iteration)."""
    stream = PatchStream(cases, seed, batch_size, start, stop)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        stream,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list_data_collate,
        worker_init_fn=_worker_init,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )

"""Running one medseg command on several processes launched by ``torchrun``.

medseg has no launcher of its own: ``torchrun`` starts one process per device (on one
node or many) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` /
``MASTER_PORT`` in each. :func:`process_group` reads them and joins the group: gloo when
the run is on the CPU, NCCL on CUDA, where each process takes GPU ``LOCAL_RANK`` of
its node. Without those variables (or with ``WORLD_SIZE=1``) every helper here is a
no-op: rank 0 of 1, collectives that return their input, so single-process code paths
need no ``if``.

The rest are the few collectives medseg needs: sums and means of small tensors,
:func:`any_rank` for a failure flag, and :func:`synchronized`, which makes all ranks
leave a section together and turns an exception on one rank into an error on every
rank (so rank 0 writing a checkpoint while the others wait cannot leave them waiting
for ever when the write fails).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from medseg.errors import MedsegError

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "backend_name",
    "process_group",
    "device_for_rank",
    "all_reduce_sum",
    "all_reduce_mean",
    "any_rank",
    "gather_lists",
    "barrier",
    "synchronized",
    "main_process",
]

# The device collectives run on: CPU for gloo, the process's GPU for NCCL.
_COMM_DEVICE: torch.device | None = None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MedsegError(f"environment variable {name}={os.environ[name]!r}: expected an integer") from None


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 outside a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank within this node, ``LOCAL_RANK`` as torchrun sets it (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0: the process that logs, draws the progress bar and writes run files."""
    return rank() == 0


def backend_name() -> str:
    """``gloo``, ``nccl``, or ``none`` outside a process group."""
    return str(torch.distributed.get_backend()) if is_distributed() else "none"


def launched_world_size() -> int:
    """The processes torchrun started (``WORLD_SIZE``; 1 when unset), before any group exists."""
    return _env_int("WORLD_SIZE", 1)


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` (and make it the current device) under torchrun.

    A single process keeps the device it was given; the CPU is the CPU everywhere.
    """
    if device.type != "cuda" or launched_world_size() <= 1:
        return device
    index = local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise MedsegError(
            f"LOCAL_RANK {index} but this node has {count} CUDA device(s); "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join torchrun's process group for the body, if launched by torchrun with > 1 process.

    Yields whether the run is distributed. gloo serves CPU runs, NCCL CUDA runs; the
    group is destroyed on exit if this call created it (an enclosing caller's group is
    reused and left alone). ``device`` should already be :func:`device_for_rank`'s.

    Raises
    ------
    MedsegError
        ``WORLD_SIZE`` > 1 but torch was built without ``torch.distributed``, or without
        the other variables torchrun sets (``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
    """
    global _COMM_DEVICE
    if launched_world_size() <= 1:
        yield False
        return
    if not torch.distributed.is_available():
        raise MedsegError("WORLD_SIZE > 1 (torchrun) but this torch has no torch.distributed support")
    if torch.distributed.is_initialized():  # the caller's group: use it, leave it to the caller
        if _COMM_DEVICE is None:
            nccl = str(torch.distributed.get_backend()) == "nccl"
            _COMM_DEVICE = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        yield is_distributed()
        return
    # torchrun sets all of these; a WORLD_SIZE left over in a shell would otherwise fail
    # deep inside torch's rendezvous with a traceback
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise MedsegError(
            f"WORLD_SIZE={launched_world_size()} but {', '.join(missing)} not set: start multi-process runs with "
            "torchrun, or unset WORLD_SIZE for a single process"
        )
    _env_int("RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend=backend, init_method="env://", device_id=device if device.type == "cuda" else None
    )
    _COMM_DEVICE = device if backend == "nccl" else torch.device("cpu")
    try:
        yield True
    finally:
        _COMM_DEVICE = None
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- collectives

def _comm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(_COMM_DEVICE or torch.device("cpu"))


def all_reduce_sum(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Elementwise sum over ranks, returned on the CPU (the input itself when not distributed)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    if not is_distributed():
        return tensor
    out = _comm(tensor).clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.cpu()


def all_reduce_mean(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Elementwise mean over ranks, returned on the CPU."""
    if not is_distributed():
        return values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    return all_reduce_sum(values) / world_size()


def _failed_ranks(failed: bool) -> list[int]:
    flags = torch.zeros(world_size(), dtype=torch.int32)
    flags[rank()] = int(failed)
    return [r for r, f in enumerate(all_reduce_sum(flags).tolist()) if f]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one (a failure flag)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([int(bool(flag))], dtype=torch.int32)).item())


def gather_lists(items: Sequence[str]) -> list[str]:
    """Concatenation of every rank's ``items`` in rank order (the list itself when not distributed)."""
    if not is_distributed():
        return list(items)
    gathered: list[list[str] | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in (part or [])]


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        all_reduce_sum(torch.zeros(1, dtype=torch.int32))


@contextmanager
def main_process(what: str) -> Iterator[bool]:
    """A rank-0-only section: yields :func:`is_main`; the other ranks wait at its end.

    ``with main_process("saving latest.pt") as main: if main: save(...)`` is
    :func:`synchronized` around an ``if is_main()``: a failure on rank 0 fails every rank.
    """
    with synchronized(what):
        yield is_main()


@contextmanager
def synchronized(what: str) -> Iterator[None]:
    """Ranks leave the body together; an exception on any rank fails the section on all.

    The rank that raised re-raises its own exception; the others raise
    :class:`MedsegError` naming the section and the failed ranks. The typical use is a
    rank-0-only write that the others wait for::

        with synchronized("saving checkpoint latest.pt"):
            if is_main():
                save_checkpoint(path, payload)

    Only ``Exception`` is caught: an interrupt or a kill ends the process, and torchrun
    ends the others.
    """
    if not is_distributed():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # re-raised below, after the others learned of it
        error = err
    failed = _failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise MedsegError(f"{what} failed on rank {', '.join(map(str, failed))} (see its error above)")

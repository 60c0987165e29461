"""Jobs in worker processes that survive a worker's death.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one worker dies (the
kernel's out-of-memory killer, a signal): every job not yet finished then fails with
``BrokenProcessPool``, those that had nothing to do with it included, and nothing says
which job killed the worker. One 3D case too large for the Betti matching error failed
every later case of an evaluation with "worker process died".

:func:`map_in_processes` keeps at most ``workers`` jobs in flight, so that when the pool
breaks the jobs it was running are known. Those are run again one at a time, each in a
fresh process of its own: a job that dies again alone is the one that killed the worker
and is reported as :class:`WorkerDied`; the others (they died with it, or it ran out of
memory only beside them) give their results. Then a new pool takes the remaining jobs.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medseg.errors import MedsegError

__all__ = ["WorkerDied", "forkserver_context", "map_in_processes"]


class WorkerDied(MedsegError):
    """The worker process died while running this job alone (out of memory, or killed)."""


def forkserver_context(preload: Sequence[str]):
    """A multiprocessing context whose workers fork from a clean server process that has
    imported ``preload``: forking the command itself could copy a process that already
    runs torch/OpenMP threads (evaluate after predict), which may deadlock, and spawning
    each worker would import torch and MONAI again per worker. The server imports
    :mod:`medseg._forkserver_preload` first, so that a Ctrl-C during its imports prints
    no traceback."""
    import multiprocessing

    _own_temp_dir()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["medseg._forkserver_preload", *preload])
    return context


_TEMP_PREFIX = "mmp-"
#: Longest path of an AF_UNIX socket (Linux: 108 bytes with its NUL); the forkserver's is
#: ``TEMP/listener-XXXXXXXX`` (18 more bytes).
_MAX_SOCKET_PATH = 107


def _own_temp_dir() -> None:
    """Give multiprocessing a temporary folder of medseg's (``mmp-HOST-PID-*``, HOST a
    short hash of this host's name, where the forkserver keeps its socket), and remove
    those of this host's dead commands.

    multiprocessing's own (``pymp-*``) is removed at a normal exit only: every SIGKILL of
    ``evaluate`` or ``plan --workers 2`` left one in the temporary folder for good, and
    nothing tells whose it was. The name is kept short, and a ``TMPDIR`` too long for the
    socket (at most 107 bytes) is passed over for ``/tmp``. Uses multiprocessing's private
    ``_config``; where that is missing, or no folder fits, multiprocessing keeps its own.
    """
    import hashlib
    import re
    import shutil
    import tempfile
    from multiprocessing import process, util

    from medseg.atomic import host_tag, process_alive

    config = getattr(process.current_process(), "_config", None)
    if not isinstance(config, dict) or config.get("tempdir") is not None:
        return
    me = hashlib.sha256(host_tag().encode()).hexdigest()[:6]
    pattern = re.compile(rf"^{re.escape(_TEMP_PREFIX)}(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-")
    # TMPDIR, else /tmp when TMPDIR is too long for the socket (a Slurm job's
    # /scratch/.../job_123/...: the forkserver failed with "AF_UNIX path too long")
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        try:
            for entry in Path(base).iterdir():
                found = pattern.match(entry.name)
                if found and found["host"] == me and not process_alive(int(found["pid"])) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
            folder = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{me}-{os.getpid()}-", dir=base)
        except OSError:
            continue
        if len(os.fsencode(folder)) + len("/listener-XXXXXXXX") > _MAX_SOCKET_PATH:
            os.rmdir(folder)
            continue
        util.Finalize(None, shutil.rmtree, args=(folder, True), exitpriority=-100)
        config["tempdir"] = folder
        return


def _pool(workers: int, context, initializer, initargs) -> ProcessPoolExecutor:
    import signal

    interruptible = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(), interruptible, initializer, initargs))


def _start_worker(command: int, interruptible: bool, initializer: Callable | None, initargs: tuple) -> None:
    import signal

    # a forked worker inherits the command's handler (medseg.cli: SIGTERM stops it as
    # Ctrl-C, saying so): here SIGTERM is the pool's way to end a worker, quietly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if interruptible:  # a forkserver's worker inherits the server's ignored SIGINT (_forkserver_preload)
        signal.signal(signal.SIGINT, _interrupt_the_job)
    _die_with(command)
    if initializer is not None:
        initializer(*initargs)


_running_a_job = False


def _interrupt_the_job(signum, frame) -> None:
    """A worker's SIGINT (a terminal's Ctrl-C reaches the whole process group): stops the
    job the worker runs, which the pool hands back to the command as the job's
    KeyboardInterrupt. An idle worker, waiting on the pool's queue for its next job,
    ignores it: raised there, outside any job, it printed multiprocessing's "Process
    ForkServerProcess-2:" traceback beside the command's "interrupted" (every Ctrl-C of an
    evaluation whose workers wait on the command between cases); the command's shutdown
    of the pool ends such a worker."""
    if _running_a_job:
        raise KeyboardInterrupt


def _run_job(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a worker, marked as running for :func:`_interrupt_the_job`."""
    global _running_a_job
    _running_a_job = True
    try:
        return fn(*args)
    finally:
        _running_a_job = False


def _die_with(command: int) -> None:
    """Linux: this worker exits when the process that runs the pool (``command``) dies. A
    command killed by SIGKILL, SIGTERM or the out-of-memory killer left its workers
    blocked on the pool's queue for good (each worker holds the queue's other end), each
    with its case's memory (3.9 GB for one of evaluate's). Elsewhere nothing changes.

    A forked worker asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG). A
    forkserver's worker is the server's child, and the server outlives the command while
    any of its children holds its "alive" pipe, which they all do: such a worker watches
    the command's process (a pidfd, readable once it has exited) from a thread."""
    import ctypes
    import signal

    if os.getppid() == command:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux
            return
        if os.getppid() != command:  # it died before the call
            os._exit(1)
        return
    try:
        watched = os.pidfd_open(command)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (OSError, AttributeError):  # not Linux, or a kernel before 5.3
        return

    def exit_when_it_has():
        select.select([watched], [], [])
        os._exit(1)

    threading.Thread(target=exit_when_it_has, name="medseg-watch-command", daemon=True).start()


def _alone(fn: Callable, job: tuple, context, initializer, initargs) -> tuple[Any, BaseException | None]:
    """``fn(*job)`` in a fresh process of its own: (value, None), or (None, the error it raised / WorkerDied)."""
    with _pool(1, context, initializer, initargs) as pool:
        future = pool.submit(_run_job, fn, *job)
        try:
            return future.result(), None
        except BrokenProcessPool:
            return None, WorkerDied(_DIED_ALONE)
        except Exception as err:  # the job's own error, for the caller to judge
            return None, err


_DIED_ALONE = "the worker process died running it alone (out of memory, or killed)"


def map_in_processes(
    fn: Callable,
    jobs: Sequence[tuple],
    workers: int,
    context,
    initializer: Callable | None = None,
    initargs: tuple = (),
    what: str = "jobs",
) -> Iterator[tuple[int, Any, BaseException | None]]:
    """Yield ``(index, fn(*jobs[index]), None)`` or ``(index, None, error)`` for every job, as they finish.

    ``error`` is what the job raised (an ``Exception``), or :class:`WorkerDied` when its
    worker died while it ran alone. Runs ``min(workers, len(jobs))`` processes of
    ``context`` (a multiprocessing context), each started with ``initializer(*initargs)``;
    ``what`` names the jobs in the line printed when a worker dies ("cases").
    Stopping the iteration early (or an interrupt) cancels the jobs not started.
    """
    pending = list(range(len(jobs)))[::-1]  # popped from the end: first job first
    retry: list[int] = []
    pool = None
    running: dict[Future, int] = {}
    try:
        while pending or running or retry:
            if retry:  # the jobs a dead worker's pool was running, one at a time, alone
                index = retry.pop(0)
                value, error = _alone(fn, jobs[index], context, initializer, initargs)
                yield index, value, error
                continue
            if pool is None:
                pool = _pool(max(1, min(workers, len(pending))), context, initializer, initargs)
            while pending and len(running) < workers:
                index = pending.pop()
                running[pool.submit(_run_job, fn, *jobs[index])] = index
            in_flight = len(running)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            died: list[int] = []
            for future in done:
                index = running.pop(future)
                try:
                    value = future.result()
                except BrokenProcessPool:
                    died.append(index)
                    continue
                except Exception as err:
                    yield index, None, err
                    continue
                yield index, value, None
            if not died:
                continue
            # every job still in flight went down with the pool
            died.extend(running.values())
            running.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
            if in_flight == 1:  # it ran alone: it is the one
                yield died[0], None, WorkerDied(_DIED_ALONE)
                continue
            retry = sorted(died)
            print(f"medseg: a worker process died (out of memory, or killed) with {len(retry)} {what} in flight; "
                  "running them again one at a time to find which", file=sys.stderr)
    finally:  # as leaving a ``with`` block: the jobs not started are cancelled, the running ones finish
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

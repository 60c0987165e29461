"""``medseg study STUDY.yaml``: every variant x seed trained, tested and evaluated, then compared.

:func:`run_study` checks the whole study first (:func:`medseg.study.config.load_study`),
then starts one process per run that is not finished (:mod:`medseg.study.worker`;
finished runs are skipped, interrupted ones resume), and writes ``study.json``,
``study.csv`` and ``study.html`` (:mod:`medseg.study.summary`, :mod:`medseg.study.report`).
A failed run is reported (its error line and log) and the others go on; the summary
covers the runs that finished.

Spreading the runs:

* ``parallel=N``: N runs at a time on this machine. With GPUs, run slot k gets GPU
  k mod (number of visible GPUs) through ``CUDA_VISIBLE_DEVICES``; on the CPU each run
  gets ``cpu_count // N`` threads unless ``OMP_NUM_THREADS`` is set.
* under torchrun (``WORLD_SIZE`` > 1): rank r of W takes runs r, r + W, ... (on GPU
  ``LOCAL_RANK``). No process group is joined: when a rank is done it leaves a marker in
  ``OUTPUT_DIR/.ranks/`` (tagged with torchrun's run id), and the rank that finds every
  rank's marker, the last one to finish, writes the summary. So ranks never wait for
  each other, however unequal their runs.

Each run's process writes its output to ``OUTPUT_DIR/logs/VARIANT_seed_N.log``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from medseg.atomic import no_follow
from medseg.errors import ArgumentError, MedsegError
from medseg.study.config import Study, StudyRun, load_study
from medseg.study.state import is_finished, read_state, training_summary, write_state

__all__ = ["run_study", "runs_of_rank"]

_LOGS = "logs"
_RANKS = ".ranks"
# torchrun's variables: a run's process must not see them, or its trainer would join the study's group.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


_SAY_LOCK = threading.Lock()


def _say(message: str) -> None:
    # one write per line, under a lock: the threads that wait for the runs' processes
    # report at the same moment, and print's separate newline interleaved their lines
    with _SAY_LOCK:
        sys.stderr.write(f"medseg study: {message}\n")
        sys.stderr.flush()


def _launch() -> tuple[int, int]:
    """(rank, world size) as torchrun set them; (0, 1) otherwise."""
    from medseg.distributed import _env_int

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise MedsegError(f"RANK={rank}, WORLD_SIZE={world}: not a valid rank of the launch")
    return rank, world


def runs_of_rank(runs: list[StudyRun], rank: int, world: int) -> list[StudyRun]:
    """The runs rank ``rank`` of ``world`` takes: ``rank, rank + world, ...``."""
    return runs[rank::world]


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _child_env(gpu: str | None, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _error_line(log: Path, start: int) -> str:
    """The run's error: its last ``medseg: error:`` line, else the last line it wrote."""
    with open(log, "rb") as handle:
        handle.seek(start)
        lines = [ln.strip() for ln in handle.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("medseg: error:"):
            return line.removeprefix("medseg: error:").strip()
    return lines[-1] if lines else ""


class _Workers:
    """The worker processes of a study, so that an interrupted study stops them all:
    Ctrl-C reaches the terminal's whole process group, but a SIGINT sent to the study
    alone (or an interrupt while the pool waits) left the queued runs to run to the end
    with no progress shown."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def run(self, args: list[str], job: str, handle, env: dict[str, str]) -> int | None:
        """The worker's exit code; None when the study was interrupted before it started."""
        with self._lock:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                    env=env)
            self._running.add(proc)
        try:
            proc.communicate(job)
        finally:
            with self._lock:
                self._running.discard(proc)
        return proc.returncode

    def stop(self) -> None:
        """No new worker starts; the running ones get SIGTERM, which a worker takes as
        Ctrl-C (it stops after its current write; ``worker._stop_with_the_study``)."""
        with self._lock:
            self.stopping.set()
            for proc in self._running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def _run_one(run: StudyRun, study: Study, gpu: str | None, threads: int | None, workers: _Workers) -> str | None:
    """Run ``run``'s process; None on success, else the error (also recorded in its study_run.json)."""
    log = study.output_dir / _LOGS / f"{run.variant}_seed_{run.seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job = {
        "study": study.config.model_dump(mode="json", by_alias=True),
        "variant": run.variant,
        "seed": run.seed,
        "config": run.config.model_dump(mode="json"),
    }
    with open(log, "a", opener=no_follow) as handle:
        handle.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.name}\n")
        handle.flush()
        start = handle.tell()
        returncode = workers.run([sys.executable, "-m", "medseg.study.worker"], json.dumps(job), handle,
                                 _child_env(gpu, threads))
    if returncode is None:
        return "not started: the study was interrupted"
    if returncode == 0:
        return None
    if returncode < 0:
        name = signal.Signals(-returncode).name
        error = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        error = _error_line(log, start) or f"exited with code {returncode}"
    status = "interrupted" if returncode in (130, -signal.SIGINT, -signal.SIGTERM) else "failed"
    try:  # recorded for the summary; a folder that cannot take it must not stop the other runs
        state = read_state(run.run_dir)
        state.update(variant=run.variant, seed=run.seed, status=status, error=error, log=str(log))
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_state(run.run_dir, state)
    except (OSError, MedsegError) as err:
        error += f"; its state could not be recorded ({type(err).__name__}: {err})"
    return f"{error} (log: {log})"


def _execute(runs: list[StudyRun], study: Study, parallel: int, local_rank: int | None) -> dict[str, str]:
    """Run ``runs``, ``parallel`` at a time; returns the failed ones' errors by run name."""
    gpus = _visible_gpus() if (parallel > 1 or local_rank is not None) else []
    threads = None
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        from medseg.preprocessing.run import available_cpus  # the affinity mask (taskset, Slurm), not the machine

        threads = max(1, available_cpus() // parallel)
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(parallel):
        slots.put(slot)

    failed: dict[str, str] = {}
    left = {run.name: run for run in runs}
    rates: list[float] = []  # seconds per training step of the runs finished so far
    others: list[float] = []  # their seconds besides training (start-up, prediction, evaluation)
    reporting = threading.Lock()

    def report(run: StudyRun, error: str | None, seconds: float) -> None:
        """Says how ``run`` ended, before its slot goes to the next run (the next run's
        "started" line came before this one's "finished", as if the two ran at once)."""
        with reporting:
            del left[run.name]
            if error is None:
                state = read_state(run.run_dir)
                stats = training_summary(state)
                if math.isfinite(stats["seconds_per_step"]):  # NaN: its training time is not known
                    rates.append(stats["seconds_per_step"])
                trained = sum(s.get("seconds", 0.0) for s in (state.get("training") or {}).get("segments") or [])
                others.append(max(0.0, seconds - trained))  # start-up, prediction and evaluation
                _say(f"{run.name}: finished in {seconds:.0f} s ({_resources(stats)})"
                     f"{_time_left(left, rates, others, parallel)}")
            else:
                failed[run.name] = error
                stopped = error.startswith("not started") or read_state(run.run_dir).get("status") == "interrupted"
                _say(f"{run.name}: {'interrupted' if stopped else 'FAILED'}: {error}")

    def one(run: StudyRun) -> None:
        slot = slots.get()
        try:
            gpu = None
            if gpus:
                gpu = gpus[(local_rank if local_rank is not None else slot) % len(gpus)]
            _say(f"{run.name}: started" + (f" on GPU {gpu}" if gpu is not None else ""))
            began = time.perf_counter()
            error = _run_one(run, study, gpu, threads, workers)
            report(run, error, time.perf_counter() - began)
        finally:
            slots.put(slot)

    workers = _Workers()
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="medseg-study")
    try:
        for future in as_completed([pool.submit(one, run) for run in runs]):
            future.result()
    except BaseException:  # Ctrl-C (or an error here): stop the workers, start no other run
        workers.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failed


def _warn_of_other_training_data(study: Study, runs: list[StudyRun]) -> None:
    """Say which runs were trained on other training data than their dataset holds now (a
    label corrected, a case added since): the study averages them with runs trained on
    the data as it is, without a word. Their results are kept; deleting a run's folder
    trains it again."""
    from medseg.study.state import training_data_digest

    stale, digests = [], {}  # the digest lists the dataset: once per dataset and split file, not per run
    for run in runs:
        recorded = (read_state(run.run_dir).get("training") or {}).get("data")
        if not recorded:  # runs of older medsegs recorded none
            continue
        data = (str(run.config.data.dataset), str(run.config.data.split_file))
        if data not in digests:
            digests[data] = training_data_digest(run)
        if digests[data] not in recorded:
            stale.append(run)
    if stale:
        _say(f"WARNING: {len(stale)} run(s) were trained on training data that has changed since "
             f"(imagesTr, labelsTr, dataset.json or the split file): {', '.join(r.name for r in stale)}; the "
             "study mixes them with runs trained on the data as it is now; delete their run folders "
             f"({stale[0].run_dir}, ...) to train them again")


def _fill_caches(runs: list[StudyRun]) -> None:
    """Fill the preprocessing caches that fresh runs will read, once each, with every core,
    before several runs start at once (``--parallel N``): each run preprocessed the same
    dataset into the same cache beside the others, N times the work at the study's start
    (written atomically, so right, only slow). A run resumed from a checkpoint keeps its
    checkpoint's split and is left to its own start; a cache that cannot be filled is left
    to the runs, which report it."""
    from medseg.preprocessing.run import available_cpus, preprocess_dataset, select_cases

    fresh = [run for run in runs if not (run.run_dir / "checkpoints" / "latest.pt").exists()]
    for run in fresh:  # a second run of a cache finds it complete: a listing of its files
        try:
            info, train_cases, val_cases = select_cases(run.config)
            preprocess_dataset(run.config, info, train_cases, val_cases, workers=available_cpus())
        except MedsegError as err:
            _say(f"{run.name}: its cache could not be filled beforehand ({err}); the run says why")
            return


def _time_left(left: dict[str, StudyRun], rates: list[float], others: list[float], parallel: int) -> str:
    """``; N to go, about T``: the steps of the runs left at the median seconds per step so
    far, plus the median time a run spent besides training (its predictions and
    evaluations: most of a short run), ``parallel`` at a time (an estimate: a resumed run
    has fewer steps to go)."""
    if not left or not rates:
        return ""
    rate = statistics.median(rates)
    besides = statistics.median(others) if others else 0.0
    seconds = (sum(run.config.train.iterations for run in left.values()) * rate + len(left) * besides) / parallel
    hours, minutes = divmod(round(seconds / 60), 60)
    when = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min" if minutes else "under a minute"
    return f"; {len(left)} to go, about {when} at {rate:.3g} s/step"


def _resources(stats: dict) -> str:
    if not math.isfinite(stats["seconds_per_step"]):  # every step trained by a call that was not recorded
        return "training time and memory not recorded"
    parts = [f"{stats['seconds_per_step']:.3g} s/step", f"peak RSS {stats['peak_rss_mib']:.0f} MiB"]
    if stats.get("peak_cuda_mib") is not None:
        parts.append(f"peak CUDA {stats['peak_cuda_mib']:.0f} MiB")
    return ", ".join(parts)


def _rank_marker(study: Study, rank: int) -> Path:
    return study.output_dir / _RANKS / f"rank_{rank}"


def _launch_id() -> str:
    """Tells this torchrun launch from earlier ones: its run id, else its rendezvous address."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _all_ranks_done(study: Study, rank: int, world: int) -> bool:
    """Leave this rank's marker; True when every rank of this launch has left one."""
    from medseg.atomic import write_atomic

    launch = _launch_id()
    write_atomic(_rank_marker(study, rank), launch)
    for r in range(world):
        marker = _rank_marker(study, r)
        try:
            if marker.read_text() != launch:
                return False
        except FileNotFoundError:
            return False
    return True


def run_study(path: str | Path, overrides: list[str] | None = None, parallel: int = 1, summary_only: bool = False) -> bool:
    """``medseg study``: run what is left of the study, then write its summary.

    Parameters
    ----------
    path : path
        ``STUDY.yaml`` (:mod:`medseg.study.config`).
    overrides : list of str
        ``KEY=VALUE`` added to every run's overrides (``--set``).
    parallel : int
        Runs at a time on this machine (each its own process).
    summary_only : bool
        Run nothing: write the summary of the runs finished so far (a long study, looked
        at while it runs; the comparison covers the seeds each variant has finished).

    Returns
    -------
    bool
        True when every run of this process finished (and, for the process that wrote
        the summary, every run of the study).

    Raises
    ------
    ConfigError
        Anything wrong with the study, found before any run starts.
    """
    if parallel < 1:
        raise ArgumentError("parallel", "must be at least 1", parallel)
    study = load_study(path, overrides)
    if summary_only:
        from medseg.study.report import write_outputs

        summary = write_outputs(study)
        done = sum(r["status"] == "finished" for r in summary["runs"])
        _say(f"summary of {done} finished run(s) of {len(study.runs)}; nothing was run")
        return True
    rank, world = _launch()
    if world > 1:  # the ranks of one torchrun job share the folder, each its own runs
        return _run_study(study, parallel, rank, world)
    from medseg.runfolder.lock import RunFolderLock

    # one study process at a time in the folder: a second one on the same study deleted
    # the folder of a run the first was training ("no checkpoint: starting over"), and
    # resumed a run from the checkpoint the first was still writing
    with RunFolderLock(study.output_dir, what="study output_dir") as lock:
        lock.take()
        return _run_study(study, parallel, rank, world)


def _run_study(study: Study, parallel: int, rank: int, world: int) -> bool:
    """:func:`run_study`'s runs and summary, in this process (a torchrun rank's share)."""
    mine = runs_of_rank(study.runs, rank, world)
    if world > 1:
        _rank_marker(study, rank).unlink(missing_ok=True)
    todo = [run for run in mine if not is_finished(run, study.config)]
    variants, seeds = study.config.variants, study.config.seeds
    where = f"rank {rank} of {world}: {len(mine)} of " if world > 1 else ""
    at_once = min(parallel, max(len(todo), 1))  # one run left to do runs alone, whatever --parallel says
    _say(
        f"{where}{len(study.runs)} runs ({len(variants)} variants x {len(seeds)} seeds, baseline {study.baseline}); "
        f"{len(mine) - len(todo)} finished, {len(todo)} to run" + (f", {at_once} at a time" if at_once > 1 else "")
    )
    _warn_of_other_training_data(study, mine)
    if at_once > 1 and world == 1:
        _fill_caches(todo)
    failed = _execute(todo, study, at_once, _local_rank() if world > 1 else None)
    if world > 1 and not _all_ranks_done(study, rank, world):
        _say(f"rank {rank}: done; the last rank to finish writes the summary")
        return not failed

    from medseg.study.report import write_outputs

    summary = write_outputs(study)
    unfinished = [r["run"] for r in summary["runs"] if r["status"] != "finished"]
    if unfinished:
        _say(f"{len(unfinished)} run(s) not finished: {', '.join(unfinished)}; rerun the same command to retry them")
    return not failed and not unfinished


def _local_rank() -> int:
    from medseg.distributed import local_rank

    return local_rank()

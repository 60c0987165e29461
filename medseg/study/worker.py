"""One run of a study, in its own process: train (or resume), predict every test folder, evaluate.

``python -m medseg.study.worker`` reads its job from stdin (JSON: the study config, the
variant, the seed and the resolved run config) and does what :mod:`medseg.study.state`
says is left. :mod:`medseg.study.runner` starts one such process per run, so that a
crash or an out-of-memory kill ends that run only, the peak memory measured is the
run's own, and torchrun's environment of the study's processes never reaches the
trainer. Errors are printed as ``medseg: error: ...`` (one line, as the CLI does) and
give the exit code of :class:`~medseg.errors.MedsegError`.

Measured per training call (recorded in ``study_run.json``): the wall time of
:func:`~medseg.training.trainer.run_training` (data preparation and validation
included, interpreter start-up not), the iterations it trained, the peak resident
memory of this process (DataLoader worker processes not included) and, on CUDA, the
peak memory allocated by torch.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from medseg.config import validate_config
from medseg.errors import MedsegError
from medseg.study.config import StudyConfig, StudyRun
from medseg.study.state import (
    evaluation_dir,
    evaluation_record,
    latest_checkpoint,
    prediction_record,
    predictions_dir,
    read_state,
    test_done,
    training_data_digest,
    training_done,
    write_state,
)

__all__ = ["execute_run", "main"]


def _say(message: str) -> None:
    print(f"[medseg study] {message}", file=sys.stderr, flush=True)


def _train(run: StudyRun) -> dict[str, Any]:
    """Train the run (or resume it); returns its study_run.json with the call's segment."""
    from medseg.runfolder import load_checkpoint
    from medseg.training.trainer import run_training

    run_dir, cfg = run.run_dir, run.config
    latest = latest_checkpoint(run_dir)
    resume = latest.is_file()
    start = int(load_checkpoint(latest)["iteration"]) if resume else 0
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        _say(f"{run_dir}: no checkpoint to resume from; starting the run over")
        shutil.rmtree(run_dir)
    _say(f"training {run.name}: " + (f"resuming at iteration {start} of {cfg.train.iterations}" if resume
                                      else f"{cfg.train.iterations} iterations"))
    data = training_data_digest(run)  # the training data as this call starts training on it
    began, began_wall = time.perf_counter(), time.time()
    try:
        run_training(cfg, resume=resume)
    except BaseException:
        # interrupted (Ctrl-C, the study stopping, an error): what it trained up to its
        # last checkpoint is kept and will not be trained again, so its time is recorded
        # now; else a run stopped after its last checkpoint (in its final validation)
        # resumed with nothing left to train and had no training time at all
        _record_interrupted_training(run, start, began_wall, data)
        raise
    _record_training(run, start, cfg.train.iterations, time.perf_counter() - began, finished=True, data=data)
    return read_state(run_dir)


def _record_training(run: StudyRun, start: int, stop: int, seconds: float, finished: bool, data: str) -> None:
    """Appends a training call's segment (iterations ``start`` to ``stop``, its seconds,
    this process's peak memory) to the run's study_run.json; ``finished``: the training
    is complete (``training.iterations``, which :func:`~medseg.study.state.training_done`
    reads; an interrupted call's segment leaves it as it was); ``data``: the training
    data's :func:`~medseg.study.state.training_data_digest` when the call started."""
    import torch

    from medseg.runfolder import resolve_device

    cfg = run.config
    device = resolve_device(cfg.device)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" and torch.cuda.is_initialized() else None
    state = {**read_state(run.run_dir), "variant": run.variant, "seed": run.seed, "status": "running", "error": None,
             "config": cfg.model_dump(mode="json")}
    training = dict(state.get("training") or {})
    if finished:
        training["iterations"] = cfg.train.iterations
    training["data"] = sorted(set(training.get("data") or []) | {data})  # one digest, unless it changed
    training["segments"] = list(training.get("segments") or []) + [{
        "from_iteration": start,
        "to_iteration": stop,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "peak_cuda_mib": peak_cuda,
        "device": device.type,
    }]
    state["training"] = training
    write_state(run.run_dir, state)


def _record_interrupted_training(run: StudyRun, start: int, began_wall: float, data: str) -> None:
    """The segment of an interrupted training call up to its last checkpoint (timed by the
    checkpoint's modification time), if it wrote one past ``start``; best effort."""
    from medseg.runfolder import load_checkpoint

    try:
        latest = latest_checkpoint(run.run_dir)
        saved = latest.stat().st_mtime
        stop = int(load_checkpoint(latest)["iteration"])
        if stop > start and saved > began_wall:
            _record_training(run, start, stop, saved - began_wall, finished=False, data=data)
    except Exception:  # no checkpoint, or one being replaced: nothing to record
        pass


def _test(run: StudyRun, study: StudyConfig, name: str, state: dict[str, Any]) -> dict[str, Any]:
    from medseg.evaluation.evaluate import run_evaluation
    from medseg.inference.predict import run_prediction

    run_dir, test = run.run_dir, study.test[name]
    tests = state.setdefault("tests", {})
    entry = tests.setdefault(name, {})
    record = prediction_record(run, study, name)  # the scans as they are before they are predicted
    overwrite = entry.get("predicted") != record  # other model, settings or scans: earlier outputs are stale
    predicted = predictions_dir(run_dir, name)
    if overwrite and predicted.exists():
        # every output is recomputed: clear the folder, so that the prediction of a scan
        # since removed from the test folder is not evaluated with the others; before the
        # new record is written, or a kill between the two left old masks under it
        shutil.rmtree(predicted)
    entry["predicted"] = record
    entry.pop("evaluated", None)
    write_state(run_dir, state)  # before predicting: an interrupted prediction resumes with the same model

    model = run_dir if study.predict.checkpoint == "best" else latest_checkpoint(run_dir)
    _say(f"predicting {name} with {run.name}")
    if not run_prediction(model, [test.images], predicted, overwrite=overwrite, tta=study.predict.tta,
                          device=run.config.device):
        raise MedsegError(f"test {name}: prediction failed for some case(s) (see the lines above)")
    settings = study.evaluate
    # taken before evaluating, from the scans predicted: a scan or label replaced meanwhile
    # leaves the run unfinished (recorded afterwards from the folders, the new file's stamp
    # stood for the old file's prediction and evaluation, never redone)
    evaluated = evaluation_record(run, study, name, predicted=record)
    ok = run_evaluation(
        predicted, test.labels, evaluation_dir(run_dir, name),
        dataset_json=Path(run.config.data.dataset) / "dataset.json",
        connectivity=settings.connectivity, workers=settings.workers, metrics=settings.metrics,
        tolerance_mm=settings.tolerance_mm, report=settings.report,
    )
    if not ok:
        summary = evaluation_dir(run_dir, name) / "summary.json"
        try:
            failed = json.loads(summary.read_text()).get("failed_cases") or {}
        except (OSError, ValueError):
            failed = {}
        first = f"; {min(failed)}: {failed[min(failed)]}" if failed else ""
        raise MedsegError(f"test {name}: some case(s) could not be evaluated{first} (see {summary})")
    entry["evaluated"] = evaluated
    write_state(run_dir, state)
    return state


def execute_run(run: StudyRun, study: StudyConfig) -> None:
    """Do what is left of ``run``: training to the final iteration, then every test folder."""
    state = read_state(run.run_dir)
    if state.get("status") == "finished":  # something is left to redo: killed now, it is not finished
        state["status"] = "running"
        write_state(run.run_dir, state)
    if not training_done(run, state):
        state = _train(run)
    for name in study.test:
        if not test_done(run, study, name, state):
            state = _test(run, study, name, state)
    state.update(status="finished", error=None)
    write_state(run.run_dir, state)


def _stop_with_the_study() -> None:
    """The worker stops (as after Ctrl-C; the rerun resumes it) on SIGTERM, which the study
    sends its workers when it stops and the kernel sends when the study is gone (killed,
    even by SIGKILL: PR_SET_PDEATHSIG, Linux), so that a worker never trains on alone
    (before, it went on and a rerun found the run folder locked).

    SIGINT keeps what the worker inherited: a study started with SIGINT ignored (``&`` in
    a script) has workers that ignore it too, where they used to be interrupted while the
    study went on with the next runs. The first of these signals stops the worker and the
    others are ignored from then on: a terminal's Ctrl-C reaches the worker, and the study's
    SIGTERM follows it, which interrupted the first one's clean-up (tracebacks in the log,
    "killed by SIGINT" recorded instead of "interrupted")."""
    import ctypes
    import signal

    from medseg.signals import ignore_from_now_on

    def stop_once(signum, frame):
        ignore_from_now_on(signal.SIGTERM, signal.SIGINT)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_once)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop_once)
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the study died before the call above
        raise KeyboardInterrupt


def main() -> int:
    """Entry point: the job as JSON on stdin; returns the exit code."""
    try:
        _stop_with_the_study()
        job = json.loads(sys.stdin.read())
        study = StudyConfig.model_validate(job["study"])
        run = StudyRun(job["variant"], int(job["seed"]), validate_config(job["config"], source="study run config"))
        execute_run(run, study)
    except MedsegError as err:
        print(f"medseg: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("medseg: error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from medseg.training.sampling import loader_failure

        reason = loader_failure(err)  # a data-loading worker died (out of memory?), raised anywhere
        if reason is None:
            raise
        print(f"medseg: error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

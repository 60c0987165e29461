"""A dead data-loading worker, a full /dev/shm and SIGTERM: one line, and how to resume.

Before, ``medseg train`` printed PyTorch's traceback (157 lines) when the kernel killed a
DataLoader worker or /dev/shm (Docker's 64 MB) was full, and ended without a word on
SIGTERM (Slurm's scancel and time limit, ``docker stop``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fault_helpers import train_config

from medseg.training.sampling import loader_failure


def test_loader_failures_in_one_line():
    killed = RuntimeError("DataLoader worker (pid 27573) is killed by signal: Killed. ")
    assert loader_failure(killed) == (
        "a data-loading worker process (pid 27573) died (killed by signal: Killed: out of memory? fewer "
        "data.num_workers, a lower data.cache_rate or a smaller patch need less)")
    gone = RuntimeError("DataLoader worker (pid(s) 12, 13) exited unexpectedly")
    assert loader_failure(gone) == (
        "a data-loading worker process (pid 12, 13) died (it exited unexpectedly: out of memory? fewer "
        "data.num_workers, a lower data.cache_rate or a smaller patch need less)")
    assert loader_failure(RuntimeError("DataLoader worker (pid 5) is killed by signal: Segmentation fault. ")) == (
        "a data-loading worker process (pid 5) died (killed by signal: Segmentation fault)")
    shm = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\nRuntimeError: "
                       "unable to allocate shared memory(shm) for file </torch_6124_1>: No space left on device (28)")
    bus = RuntimeError("DataLoader worker (pid 9) is killed by signal: Bus error. It is possible that dataloader's "
                       "workers are out of shared memory. Please try to raise your shared memory limit.")
    for err in (shm, bus):
        line = loader_failure(err)
        assert line.startswith("the data-loading workers ran out of shared memory (/dev/shm: ")
        assert "--shm-size" in line and "data.num_workers=0" in line and "\n" not in line
    assert loader_failure(RuntimeError("CUDA error: out of memory")) is None
    assert loader_failure(ValueError("a bug of ours")) is None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stopped(proc: subprocess.Popen, timeout: float = 120) -> str:
    """``proc``'s stderr once it has exited; one that hangs is aborted, its threads' stacks
    (faulthandler) in the failure (a CI run once saw `train` hang after its last line)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        err = proc.communicate(timeout=60)[1]
        pytest.fail(f"the command did not exit within {timeout:.0f} s; its stacks:\n{err[-6000:]}")


def _train(tiny_dataset, tmp_path, workers: int):
    raw = train_config(tiny_dataset, tmp_path / "run", iterations=100000)
    raw["data"]["num_workers"] = workers
    raw["train"]["checkpoint_interval"] = 2
    raw["train"]["val_interval"] = 100000
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(config)], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**__import__("os").environ, "MEDSEG_CACHE": str(tmp_path / "cache"),
                                               "PYTHONFAULTHANDLER": "1"},  # stacks on SIGABRT: see _stopped
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "latest.pt").is_file():  # training, past its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    return proc, config


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the DataLoader worker through /proc (Linux)")
def test_a_killed_data_loading_worker_is_one_line_with_the_resume_command(tiny_dataset, tmp_path):
    proc, config = _train(tiny_dataset, tmp_path, workers=1)
    workers = [c for c in _children(proc.pid) if "python" in Path(f"/proc/{c}/cmdline").read_text()]
    assert workers, "no DataLoader worker found"
    import os

    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer
    err = _stopped(proc)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    # torch says "killed by signal: Killed" or "exited unexpectedly", by timing
    assert last.startswith(f"medseg: error: a data-loading worker process (pid {workers[0]}) died ("), err[-3000:]
    assert ": out of memory? fewer data.num_workers" in last
    assert "--resume` continues from checkpoints/latest.pt" in last
    assert "Traceback" not in err


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_stops_train_as_ctrl_c_does(tiny_dataset, tmp_path, workers):
    """To the whole process group, as Slurm's scancel sends it: the data-loading workers
    die of it too, and torch raised that (a RuntimeError, 73 lines) from its SIGCHLD
    handler while the trainer was stopping."""
    import os

    proc, config = _train(tiny_dataset, tmp_path, workers=workers)
    os.killpg(proc.pid, signal.SIGTERM)
    err = _stopped(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-6000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("medseg: stopped by SIGTERM; `medseg train ") and "--resume` continues from" in last
    assert "Traceback" not in err


def test_the_resume_hint_before_the_run_folder_exists(tmp_path):
    """Stopped while preprocessing, train named a config.yaml it had not written yet."""
    from medseg.cli import _resume_hint

    hint = _resume_hint("train", tmp_path / "run", 50, 400)
    assert hint() == "; nothing was written to the run folder yet: run the same command again"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert hint() == (f"; `medseg train {tmp_path / 'run' / 'config.yaml'} --resume` starts the run again (no "
                      "checkpoint yet: the first is at step 50)")


_TWO_SIGNALS_AT_ONCE = """
import os, signal, sys
from medseg.signals import ignore_from_now_on
ignore = ignore_from_now_on if sys.argv[1] == "medseg" else (lambda s: signal.signal(s, signal.SIG_IGN))
seen = []
def stop_once(signum, frame):
    seen.append(signum)
    ignore(signal.SIGUSR2)
for s in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, stop_once)
both = {signal.SIGUSR1, signal.SIGUSR2}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR2)
signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # both arrive: the first handler ignores the second
total = sum(range(10))
print(seen)
"""


def test_a_signal_that_arrives_with_the_first_is_dropped_without_a_traceback():
    """A terminal's Ctrl-C and the study's SIGTERM reach a study worker together: the first
    one's handler set the other to SIG_IGN, and Python then raised "OSError: Signal 15
    ignored due to race condition" in the clean-up (a traceback in the worker's log)."""
    runs = {how: subprocess.run([sys.executable, "-c", _TWO_SIGNALS_AT_ONCE, how], capture_output=True, text=True,
                                timeout=60) for how in ("medseg", "SIG_IGN")}
    assert "ignored due to race condition" in runs["SIG_IGN"].stderr  # the race, reproduced
    assert runs["medseg"].returncode == 0 and runs["medseg"].stderr == ""
    assert runs["medseg"].stdout.strip() == f"[{int(signal.SIGUSR1)}]"


def test_a_worker_reaped_after_its_reset_connection_is_still_named():
    """The trainer meets the connection a SIGKILLed worker reset before the kernel lets the
    worker be reaped: its exit code was still unknown under load (a CI run), and the
    ConnectionResetError's traceback went out instead of the one line."""
    from medseg.training.sampling import _dead_worker

    class Worker:
        def __init__(self, pid, dies_after, code):
            self.pid, self.code, self.polls, self.dies_after = pid, code, 0, dies_after

        @property
        def exitcode(self):
            self.polls += 1
            return self.code if self.polls > self.dies_after else None

    class Batches:
        _workers = [Worker(11, 10**9, None), Worker(12, 5, -signal.SIGKILL)]

    line = _dead_worker(Batches())
    assert line.startswith("a data-loading worker process (pid 12) died (killed by signal: Killed")
    assert Batches._workers[1].polls == 6  # found at the sixth look, about 0.25 s on
    Batches._workers = [Worker(13, 10**9, None)]
    assert _dead_worker(Batches(), wait=0.2) is None  # none died: the error is not a worker's


def test_a_stop_that_code_turned_into_its_own_error_is_said_as_a_stop(monkeypatch, tmp_path, capsys):
    """A SIGTERM's KeyboardInterrupt that reached pydantic's serializer came out as a
    PydanticSerializationError (a ValueError) and a 60-line traceback (a CI run)."""
    import medseg.training.trainer as trainer
    from medseg.cli import main

    def interrupted_inside(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ValueError("Error calling function `ser_path`: KeyboardInterrupt: ") from stop

    monkeypatch.setattr(trainer, "run_training", interrupted_inside)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": str(tmp_path), "patch_size": [8, 8, 8]},
                                      "train": {"iterations": 2}, "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("medseg: interrupted") and "Traceback" not in err
    # the same error without a stop behind it is no stop
    monkeypatch.setattr(trainer, "run_training", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["train", str(config)])

"""The console as a Slurm job's output file shows it (a probe of the commands' output):
lines arrive as they are logged, warnings say so, preprocess logs its progress, and a
data-loading worker's error is one readable line."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import REPO, write_config  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)  # as a batch job runs: stdout to a file is block-buffered
    return env


def test_training_lines_reach_a_file_as_they_are_logged(synthetic_dataset_3d, tmp_path):
    """Block-buffered, a train's progress arrived only at exit, and a SIGKILL lost it."""
    config = write_config(tmp_path, synthetic_dataset_3d,
                          train={"iterations": 2000, "batch_size": 1, "val_interval": 5, "checkpoint_interval": 1000})
    out = tmp_path / "job.out"
    with out.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(config)], stdout=handle,
                                stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "iteration 5/2000" not in out.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            seen = out.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "iteration 5/2000" in seen, seen


def test_preprocess_logs_its_progress(synthetic_dataset_3d, tmp_path):
    config = write_config(tmp_path, synthetic_dataset_3d)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "medseg", "preprocess", str(config)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"preprocessing \d+ of \d+ cases into", proc.stdout), proc.stdout + proc.stderr


def test_console_warnings_say_so(capsys, monkeypatch):
    from medseg.runfolder import attach_console_handler, detach

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own: the console handler steps back
    handlers = attach_console_handler()
    try:
        logging.getLogger("medseg.test").warning("its ramp ends after the run")
        logging.getLogger("medseg.test").info("iteration 5/10")
    finally:
        detach(handlers)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" ", 2)[1:] == ["WARNING", "its ramp ends after the run"]
    assert lines[1].split(" ", 1)[1] == "iteration 5/10"


def test_a_data_loading_workers_error_is_its_own_line():
    from medseg.cli import _without_worker_traceback

    wrapped = ("Caught MedsegError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "worker.py", line 374, in _worker_loop\n'
               "medseg.errors.MedsegError: /c/vessel_001.b2nd: corrupt cache file; delete it and rerun medseg preprocess\n")
    assert _without_worker_traceback(wrapped) == "/c/vessel_001.b2nd: corrupt cache file; delete it and rerun medseg preprocess"
    assert _without_worker_traceback("plain: message") == "plain: message"

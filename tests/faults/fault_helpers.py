"""Helpers of the fault-injection tests: the kill server, kill points, tiny configs, comparisons.

How kill points are chosen (:func:`kill_points`): an uninterrupted run of the command
is traced by ``killer.py``, which numbers every file-system write of the process
(opens for writing, renames, unlinks, mkdirs; see its docstring). Every write that
changed something (a ``mkdir`` of an existing folder does not) is a kill point: the
run is killed with SIGKILL just before it, so the points together give every state the
folders can be left in, write by write. By default a seeded sample of them is run (CI
time); ``MEDSEG_FAULTS=all`` runs every one. Besides, a few runs are killed at seeded
random times, from outside, possibly in the middle of a file's bytes.

After each kill the command is run again as a user would (``--resume`` for train and
adapt) and its outputs are compared with the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ALL = os.environ.get("MEDSEG_FAULTS", "") == "all"

TINY_UNET = {"name": "unet", "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0}}


# --------------------------------------------------------------------------- the server

class KillServer:
    """``killer.py`` in a subprocess: medseg imported once, a fork per run."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "killer.py")], cwd=REPO, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"killer.py did not start (exit code {self.proc.wait()})")

    def run(self, runs: list[dict]) -> list[dict]:
        self.proc.stdin.write(json.dumps(runs) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"killer.py died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One medseg command to run in the kill server, with its logs in ``logs``."""

    argv: list[str]
    logs: Path
    kill: dict | None = None
    trace: bool = False

    def spec(self, tag: str) -> dict:
        self.logs.mkdir(parents=True, exist_ok=True)
        spec = {"argv": [str(a) for a in self.argv], "stdout": str(self.logs / f"{tag}.out"),
                "stderr": str(self.logs / f"{tag}.err")}
        if self.kill:
            spec["kill"] = self.kill
        if self.trace:
            spec["trace"] = str(self.logs / f"{tag}.trace")
        return spec


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def changing_writes(trace: list[dict]) -> list[int]:
    """Numbers of the main thread's writes that changed the file system (kill points)."""
    return [e["n"] for e in trace if e["n"] is not None and e.get("ok", True)]


def kill_points(writes: list[int], sample: int, seed: int) -> list[int]:
    """Every write (``MEDSEG_FAULTS=all``), else a seeded sample of ``sample`` of them
    that always holds the first and the last."""
    if ALL or len(writes) <= sample:
        return list(writes)
    inner = random.Random(seed).sample(writes[1:-1], sample - 2)
    return sorted({writes[0], writes[-1], *inner})


def random_times(duration: float, count: int, seed: int) -> list[float]:
    """``count`` seeded kill times spread over the first 80 % of a run of ``duration``
    seconds (a run that finishes before its time is not counted as a kill point)."""
    rng = random.Random(seed)
    return sorted(round(rng.uniform(0.02, max(0.8 * duration, 0.05)), 3) for _ in range(count))


@dataclass
class Sweep:
    """Kill a command at every chosen point, rerun it, compare with the uninterrupted run."""

    name: str
    survived: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    writes: int = 0

    def record(self, point: str, problems: list[str]) -> None:
        (self.failed if problems else self.survived).append(point if not problems else f"{point}: {problems[0]}")

    def judge(self, point: str, kill: dict, killed: dict, final: dict, step: str, err: str, check) -> None:
        """Record one kill point: the killed run (``killed``), then the one that finished the
        work (``final``, its ``step`` "rerun" or "resume", its stderr ``err``), whose outputs
        ``check()`` compares with the uninterrupted run's. A run that finished before its
        kill time was no kill point and is not recorded."""
        if not killed["killed"]:
            if "at_s" in kill and killed["code"] == 0:
                return
            problems = [f"not killed (exit code {killed['code']})"]
        elif final["code"] != 0 or "Traceback" in err:
            problems = [f"{step} exit code {final['code']}: {err.strip().splitlines()[-1] if err.strip() else ''}"]
        else:
            problems = check()
        self.record(point, problems)

    def summary(self) -> str:
        total = len(self.survived) + len(self.failed)
        return (f"{self.name}: {len(self.survived)}/{total} kill points survived "
                f"({self.writes} writes in an uninterrupted run)")


def report(record_property, sweep: Sweep) -> None:
    """Print the sweep's line and hand it to the terminal summary (also under xdist)."""
    print(sweep.summary())
    record_property("reliability", sweep.summary())


# --------------------------------------------------------------------------- comparisons

def tree_bytes(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (hidden ones included)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders a killed writer left (``.NAME.HOST-PID.tmp``, ``.NAME.tmp-XXXX``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def diff_trees(reference: dict[str, str], got: dict[str, str]) -> list[str]:
    problems = [f"missing {k}" for k in sorted(set(reference) - set(got))]
    problems += [f"extra {k}" for k in sorted(set(got) - set(reference))]
    problems += [f"differs {k}" for k in sorted(set(reference) & set(got)) if reference[k] != got[k]]
    return problems


def same_tensors(a: Any, b: Any, where: str) -> list[str]:
    """``torch.equal`` over nested dicts/lists of tensors and plain values."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [f"{where} differs"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ"]
        return [p for k in a for p in same_tensors(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in same_tensors(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} != {b!r}"]


def load_pt(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def train_config(dataset: Path, out: Path, iterations: int = 4) -> dict:
    """A run of a few seconds that writes every kind of run-folder file: rows past the
    last checkpoint, best.pt, progress.png."""
    return {
        "data": {"dataset": str(dataset), "patch_size": [16, 16, 16], "val_fraction": 0.34, "num_workers": 0,
                 "augmentation": {"affine_prob": 0.3, "gaussian_noise_prob": 0.3}},
        "model": TINY_UNET,
        "train": {"iterations": iterations, "batch_size": 2, "val_interval": 3, "checkpoint_interval": 2,
                  "log_interval": 1},
        "inference": {"overlap": 0.25, "sw_batch_size": 4},
        "output_dir": str(out),
        "seed": 1,
        "device": "cpu",
    }


def adapt_config(source: Path, target: Path, out: Path) -> dict:
    """Mean teacher (student, EMA teacher, optimizer: the most state to resume) for 4 steps."""
    return {
        "source_run": str(source),
        "target": {"dataset": str(target), "eval_labels": str(target / "labelsTr")},
        "adapt": {"method": "mean_teacher", "iterations": 4, "batch_size": 2, "log_interval": 1,
                  "checkpoint_interval": 2, "mean_teacher": {"rampup_iterations": 2}},
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
    }


def mounted(kind: str, target: Path, options: str) -> str | None:
    """Mount ``kind`` at ``target``; None when done, else why it cannot be done here."""
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", kind, "-o", options, kind, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount -t {kind} failed: {(done.stderr or done.stdout).strip() or done.returncode}"
    return None


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


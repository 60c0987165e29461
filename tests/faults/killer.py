"""Run ``medseg`` commands and kill them with SIGKILL at chosen points (fault injection).

Started as ``python tests/faults/killer.py``; it reads batches of runs, one JSON list
per line on stdin, and answers each with one JSON list of results per line on stdout
(``killed``, ``code``, ``seconds``, ``timed_out``). It imports medseg, torch and MONAI
once and forks a child per run (a fresh interpreter costs about 3.5 s here, a fork
milliseconds), so a test can afford a kill at every file-system write of a tiny run. The child is a real
process killed by a real SIGKILL: no ``finally`` block, ``atexit`` handler or buffered
write of it runs, exactly as under the OOM killer or a node failure.

A run is ``{"argv": [...], "stdout": FILE, "stderr": FILE}`` plus optionally

``"kill": {"before": K}``
    SIGKILL just before the K-th write of the run (1-based).
``"kill": {"after": K}``
    SIGKILL just after the K-th write returned (the new file, rename or folder exists).
``"kill": {"at_s": T}``
    SIGKILL from the parent T seconds after the fork, whatever the child is doing
    (possibly in the middle of writing a file's bytes).
``"trace": FILE``
    Append one JSON line per write to FILE: its number, kind, path, whether it
    succeeded (``"ok"``; a ``mkdir`` of an existing folder does not) and, for writes
    of other threads, the thread.
``"env": {...}``
    Environment variables of the child.

A run still going after :data:`LIMIT_S` seconds is killed and reported as timed out.

A *write* is every call that changes the file system through Python: ``open`` (and
``io.open``, ``gzip``, ``pathlib``) with a mode that writes, ``os.open`` with write
flags, ``os.replace``, ``os.rename``, ``os.unlink``/``os.remove``, ``os.rmdir`` and
``os.mkdir`` (so ``os.makedirs``, ``Path.mkdir`` and ``shutil.rmtree`` too). Writes of
C++ code (``torch.save`` to a path, Blosc2, SimpleITK) are not seen themselves; medseg
renames their output into place, which is. Writes of threads other than the main one
(TensorBoard's writer) are counted apart (``"thread"`` in the trace) and are never
kill points, so that the K-th write is the same one in every run.

Each child is pinned to one CPU: medseg then preprocesses and evaluates in the process
itself, whose writes are the ones counted (and the training study sharing the machine
keeps its other core).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import signal
import sys
import threading
import time

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# What the commands import, loaded once in the parent (a module missing here, e.g. one
# moved by a refactoring, is simply imported by the child).
_PRELOAD = (
    "torch", "torch._dynamo",  # the optimizers import torch._dynamo lazily: 2.5 s a process
    "torch.utils.tensorboard", "monai.metrics", "monai.networks.nets", "monai.transforms", "matplotlib.pyplot",
    "nibabel", "SimpleITK", "blosc2", "medseg.cli", "medseg.config", "medseg.training.trainer",
    "medseg.adaptation", "medseg.inference.predict", "medseg.inference.predictor", "medseg.evaluation.evaluate",
    "medseg.evaluation.metrics", "medseg.evaluation.report", "medseg.preprocessing", "medseg.planning",
)


def _preload() -> None:
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _install_hooks(kill: dict, trace_path: str | None) -> None:
    """Count the writes of this process and SIGKILL it at the chosen one."""
    before, after = kill.get("before"), kill.get("after")
    trace_fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if trace_path else None
    main = threading.main_thread()
    lock = threading.Lock()
    state = {"n": 0, "other": 0}

    def event(kind: str, target, call, *args, **kwargs):
        on_main = threading.current_thread() is main
        with lock:
            if on_main:
                state["n"] += 1
                n = state["n"]
            else:
                state["other"] += 1
                n = None
        if n is not None and n == before:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            result = call(*args, **kwargs)
        except BaseException as err:
            note(n, kind, target, type(err).__name__)
            raise
        note(n, kind, target, None)
        if n is not None and n == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def note(n, kind, target, error) -> None:
        if trace_fd is None:
            return
        path = os.fsdecode(target) if isinstance(target, (str, bytes, os.PathLike)) else str(target)
        line = {"n": n, "kind": kind, "path": path, "ok": error is None}
        if error is not None:
            line["error"] = error
        if n is None:
            line["thread"] = threading.current_thread().name
        os.write(trace_fd, (json.dumps(line) + "\n").encode())

    real_open, real_os_open = builtins.open, os.open

    def hooked_open(file, mode="r", *args, **kwargs):
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        return event(f"open:{mode}", file, real_open, file, mode, *args, **kwargs)

    def hooked_os_open(path, flags, *args, **kwargs):
        if not flags & _WRITE_FLAGS:
            return real_os_open(path, flags, *args, **kwargs)
        return event("os.open", path, real_os_open, path, flags, *args, **kwargs)

    builtins.open = io.open = hooked_open
    os.open = hooked_os_open
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir"):
        real = getattr(os, name)

        def hooked(src, *args, _real=real, _name=name, **kwargs):
            target = f"{os.fsdecode(src)} -> {os.fsdecode(args[0])}" if _name in ("replace", "rename") else src
            return event(_name, target, _real, src, *args, **kwargs)

        setattr(os, name, hooked)


def _child(run: dict) -> None:
    """Run one medseg command in this (forked) process; never returns."""
    code = 70
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(run[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(run.get("env", {}))
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        if "cwd" in run:
            os.chdir(run["cwd"])
        kill = run.get("kill") or {}
        if run.get("trace") or "before" in kill or "after" in kill:
            _install_hooks(kill, run.get("trace"))
        import torch

        torch.set_num_threads(1)
        from medseg.cli import main

        code = main(list(run["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a traceback is what the test looks for
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


LIMIT_S = 300
"""A run still going after this long is killed and reported as ``"timed_out"`` (a hang)."""


def _run(run: dict) -> dict:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(run)
    at_s = (run.get("kill") or {}).get("at_s")
    kill_at = started + (float(at_s) if at_s is not None else LIMIT_S)
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() >= kill_at:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = at_s is None
            break
        time.sleep(0.005 if at_s is not None else 0.02)
    elapsed = time.perf_counter() - started
    if os.WIFSIGNALED(status):
        return {"killed": os.WTERMSIG(status) == signal.SIGKILL and not timed_out, "signal": os.WTERMSIG(status),
                "code": None, "seconds": elapsed, "timed_out": timed_out}
    return {"killed": False, "signal": None, "code": os.WEXITSTATUS(status), "seconds": elapsed, "timed_out": False}


def main() -> None:
    """Serve batches: one JSON list of runs per stdin line, one JSON list of results per stdout line."""
    _preload()
    # a fork copies only the calling thread: the parent must not run others
    assert threading.active_count() == 1, threading.enumerate()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps([_run(run) for run in json.loads(line)]) + "\n")
            out.flush()


if __name__ == "__main__":
    main()

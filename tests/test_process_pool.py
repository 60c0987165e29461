"""medseg.process_pool: a worker that dies takes only its own job with it.

The jobs below signal what happened through files in a folder, since they run in other
processes. ``os._exit(9)`` stands for the kernel's out-of-memory killer (the pool sees a
process gone without a word, as after SIGKILL).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.process_pool import WorkerDied, map_in_processes

FORK = multiprocessing.get_context("fork")


def _job(folder: str, name: str, dies: bool = False, fails: bool = False, seconds: float = 0.05):
    (Path(folder) / f"{name}.{os.getpid()}.{time.monotonic_ns()}").touch()  # one file per run
    time.sleep(seconds)
    if dies:
        os._exit(9)
    if fails:
        raise ValueError(f"{name}: bad input")
    return name.upper()


def _dies_beside_another(folder: str, name: str):
    """Dies while the job "wide" runs beside it (as a case out of memory only next to
    another), succeeds alone."""
    (Path(folder) / f"{name}.{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if (Path(folder) / "wide.running").exists():
            os._exit(9)
        if (Path(folder) / "wide.done").exists():
            break
        time.sleep(0.01)
    return name.upper()


def _wide(folder: str, name: str):
    running = Path(folder) / "wide.running"
    running.touch()
    time.sleep(0.5)
    running.unlink()
    (Path(folder) / "wide.done").touch()
    return name.upper()


def _runs(folder: Path, name: str) -> int:
    return len(list(folder.glob(f"{name}.*")))


def test_results_errors_and_every_job_once(tmp_path):
    jobs = [(str(tmp_path), n, False, n == "c") for n in "abcde"]
    out = {i: (value, error) for i, value, error in map_in_processes(_job, jobs, 2, FORK)}
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert [out[i][0] for i in (0, 1, 3, 4)] == ["A", "B", "D", "E"]
    assert out[2][0] is None and isinstance(out[2][1], ValueError) and "c: bad input" in str(out[2][1])
    assert all(_runs(tmp_path, n) == 1 for n in "abcde")


def test_the_job_that_kills_its_worker_is_found_and_the_others_finish(tmp_path, capsys):
    """Before: ProcessPoolExecutor broke, and every job not yet finished failed with
    BrokenProcessPool (the one beside the dying job and all later ones)."""
    jobs = [(str(tmp_path), n, n == "c", False, 0.2 if n == "d" else 0.05) for n in "abcdefg"]
    out = {i: (value, error) for i, value, error in map_in_processes(_job, jobs, 2, FORK, what="cases")}
    assert sorted(out) == list(range(7))
    died = [i for i, (_, error) in out.items() if error is not None]
    assert died == [2] and isinstance(out[2][1], WorkerDied)
    assert "died running it alone (out of memory, or killed)" in str(out[2][1])
    assert [out[i][0] for i in (0, 1, 3, 4, 5, 6)] == ["A", "B", "D", "E", "F", "G"]
    assert _runs(tmp_path, "c") == 2  # with the pool, then alone
    assert "a worker process died (out of memory, or killed) with 2 cases in flight" in capsys.readouterr().err


def test_a_job_that_dies_only_beside_another_succeeds_alone(tmp_path):
    jobs = [(str(tmp_path), "wide"), (str(tmp_path), "narrow")]
    functions = {"wide": _wide, "narrow": _dies_beside_another}

    out = dict((i, (v, e)) for i, v, e in map_in_processes(_dispatch, [(functions[n].__name__, *j) for n, j in
                                                                          zip(["wide", "narrow"], jobs)], 2, FORK))
    assert out == {0: ("WIDE", None), 1: ("NARROW", None)}
    assert _runs(tmp_path, "narrow") == 2  # died beside "wide", then ran alone


def _dispatch(function: str, folder: str, name: str):
    return globals()[function](folder, name)


def test_a_job_that_dies_alone_in_the_pool_is_not_run_again(tmp_path):
    jobs = [(str(tmp_path), "a", False, False, 0.01), (str(tmp_path), "b", True, False, 0.3)]
    out = {i: (value, error) for i, value, error in map_in_processes(_job, jobs, 2, FORK)}
    assert out[0] == ("A", None) and isinstance(out[1][1], WorkerDied)
    assert _runs(tmp_path, "b") == 1  # "a" had finished: "b" was alone when its worker died


def test_evaluate_names_the_case_and_its_betti_matching_memory(tmp_path):
    """What ``medseg evaluate`` says for a case whose worker died: the memory the Betti
    matching needs for the masks' box (it named the whole image's: 35 GB for a 512x512x300
    scan whose masks' box needed 3 GB)."""
    import nibabel as nib

    from medseg.evaluation.evaluate import _died_reason
    from medseg.evaluation.metrics import BETTI_MATCHING_BYTES_PER_VOXEL

    ref, pred = np.zeros((64, 64, 32), np.uint8), np.zeros((64, 64, 32), np.uint8)
    ref[10:20, 10:30, 5:9] = 1
    pred[12:25, 15:20, 6:12] = 1
    for name, array in (("ref", ref), ("pred", pred)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    job = ("big", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", [1], None, None, ["dice", "betti_matching"],
           1.0, None)
    reason = _died_reason(job, WorkerDied("the worker process died running it alone (out of memory, or killed)"))
    box = (17, 22, 9)  # 10..24 and 10..29 and 5..11, one voxel more on each side
    need = BETTI_MATCHING_BYTES_PER_VOXEL[3] * np.prod(box) / 2**30
    assert reason.startswith("the worker process died running it alone")
    assert f"needs about {need:.1f} GB (the masks' bounding box of 17x22x9 voxels)" in reason and "--metrics" in reason
    without = (*job[:6], ["dice"], *job[7:])
    assert "Betti" not in _died_reason(without, WorkerDied("died"))


def test_a_box_too_large_for_this_machine_is_refused_before_the_engine(monkeypatch):
    from medseg.errors import DataError
    from medseg.evaluation import metrics

    monkeypatch.setattr(metrics, "memory_limit_bytes", lambda: 2**30)  # 1 GB
    monkeypatch.setattr(metrics, "resident_bytes", lambda: 2**27)  # what the process holds: 0.125 GB
    with pytest.raises(DataError, match=r"^betti_matching: the masks' bounding box of 121x121x121 voxels needs "
                                        r"about 0\.8 GB besides the 0\.1 GB this process holds, more than 90 % "
                                        r"of the 1\.0 GB of memory here; leave it out"):
        metrics.check_matching_memory((121, 121, 121))  # 0.79 GB would fit alone, not beside 0.125 GB
    metrics.check_matching_memory((100, 100, 100))  # 0.45 GB: fits
    metrics.check_matching_memory((1024, 1024))  # 2D: 260 bytes a pixel, 0.25 GB
    with pytest.raises(DataError, match=r"bounding box of 2048x2048 voxels needs about 1\.0 GB"):
        metrics.check_matching_memory((2048, 2048))


def test_the_memory_check_comes_before_the_other_metrics(monkeypatch):
    """The refusal came after minutes of HD95, clDice and the others, whose values were
    then thrown away with the case."""
    from medseg.errors import DataError
    from medseg.evaluation import metrics

    computed = []
    for name in ("dice", "hd95", "cldice"):
        monkeypatch.setitem(metrics.LABEL_METRICS, name, lambda p, r, c, name=name: computed.append(name) or {})
    monkeypatch.setattr(metrics, "memory_limit_bytes", lambda: 2**20)
    pred, ref = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    pred[5:9, 5:9, 5:9], ref[6:12, 6:12, 6:12] = True, True
    context = metrics.MetricContext(spacing=(1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="^betti_matching: the masks' bounding box"):
        metrics.compute_label_metrics(pred, ref, context, ["dice", "hd95", "cldice", "betti_matching"])
    assert computed == []
    metrics.compute_label_metrics(pred, ref, context, ["dice", "hd95"])  # no Betti matching: no check
    assert computed == ["dice", "hd95"]


def test_memory_limit_is_a_positive_number_here():
    from medseg.evaluation.metrics import memory_limit_bytes

    limit = memory_limit_bytes()
    assert limit is not None and 2**28 < limit < 2**50


def _sleeper(folder: str) -> None:
    (Path(folder) / f"worker.{os.getpid()}").touch()
    time.sleep(60)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_the_workers_die_with_the_command(tmp_path, method):
    """A command killed (SIGKILL, SIGTERM, the out-of-memory killer) left evaluate's and
    plan's workers blocked on the pool's queue for good, one holding 3.9 GB."""
    import signal
    import subprocess
    import sys

    script = (
        "import multiprocessing, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from medseg.process_pool import map_in_processes\n"
        "from test_process_pool import _sleeper\n"
        "if __name__ == '__main__':\n"
        f"    context = multiprocessing.get_context({method!r})\n"
        f"    for _ in map_in_processes(_sleeper, [({str(tmp_path)!r},)] * 2, 2, context):\n"
        "        pass\n"
    )
    (tmp_path / "command.py").write_text(script)
    command = subprocess.Popen([sys.executable, str(tmp_path / "command.py")])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name.split(".")[1]) for p in tmp_path.glob("worker.*")]
    assert len(workers) == 2
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 20
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "a worker outlived the killed command"


def _sigint_handler() -> str:
    import signal

    from medseg import process_pool

    handler = signal.getsignal(signal.SIGINT)
    return "the job's" if handler is process_pool._interrupt_the_job else str(handler)


def test_the_forkserver_ignores_ctrl_c_while_it_imports_and_its_workers_do_not():
    """A Ctrl-C in the first seconds of `evaluate --workers 2` reached the forkserver
    server while it imported torch, MONAI and scipy: a KeyboardInterrupt traceback of 60
    lines beside the command's one-line "interrupted". The server now ignores SIGINT from
    its first preloaded module on; its workers handle it as the command does."""
    import subprocess
    import sys

    from medseg.process_pool import forkserver_context

    server_like = ("import sys, signal, multiprocessing.forkserver; import medseg._forkserver_preload; "
                   "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    assert subprocess.run([sys.executable, "-c", server_like], capture_output=True, text=True).stdout.strip() == "True"
    elsewhere = ("import signal, medseg._forkserver_preload; "
                 "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    script = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['x']; {elsewhere}"], capture_output=True,
                            text=True)
    assert script.stdout.strip() == "True"  # only a forkserver server ignores it
    # a worker forked after its command stopped: the pool's semaphores are gone (its
    # FileNotFoundError traceback is dropped); any other error still shows
    for error, shown in (("FileNotFoundError(2, 'No such file or directory')", False), ("ValueError('other')", True)):
        source = f"def __setstate__():\n    raise {error}\n__setstate__()"
        raising = f"exec(compile({source!r}, '/usr/lib/python3/multiprocessing/synchronize.py', 'exec'))"
        worker_like = server_like.split("; print")[0] + "; " + raising
        err = subprocess.run([sys.executable, "-c", worker_like], capture_output=True, text=True).stderr
        assert ("Traceback" in err) == shown, (error, err)
    context = forkserver_context(["numpy"])
    assert context.get_start_method() == "forkserver"
    results = [value for _, value, error in map_in_processes(_sigint_handler, [(), ()], 2, context)]
    assert results == ["the job's", "the job's"]


def _quick(folder: str) -> int:
    return os.getpid()


def test_ctrl_c_while_the_workers_wait_for_their_next_job_prints_no_traceback(tmp_path):
    """A terminal's Ctrl-C reaches the workers too. A worker waiting on the pool's queue
    (its job done, the command busy with the result: every evaluation between cases)
    raised KeyboardInterrupt outside any job, and multiprocessing printed its "Process
    ForkServerProcess-2:" traceback beside the command's one line. An idle worker now
    ignores it; a running job still stops (the test above)."""
    import signal
    import subprocess
    import sys

    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from medseg.process_pool import forkserver_context, map_in_processes\n"
        "from test_process_pool import _quick\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        f"        for _ in map_in_processes(_quick, [({str(tmp_path)!r},)] * 4, 2, forkserver_context([])):\n"
        f"            open({str(tmp_path / 'idle')!r}, 'w').close()\n"
        "            time.sleep(60)\n"
        "    except KeyboardInterrupt:\n"
        "        print('medseg: interrupted', file=sys.stderr)\n"
        "        sys.exit(130)\n"
    )
    (tmp_path / "command.py").write_text(script)
    command = subprocess.Popen([sys.executable, str(tmp_path / "command.py")], stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "idle").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # both workers done with their first job, waiting for the next
    os.killpg(command.pid, signal.SIGINT)
    _, err = command.communicate(timeout=60)
    assert command.returncode == 130, err
    assert err.strip() == "medseg: interrupted", err


def test_a_killed_commands_forkserver_folder_is_removed_by_the_next(tmp_path_factory):
    """multiprocessing's pymp-* folder (the forkserver's socket) is removed at a normal exit
    only: every SIGKILL of evaluate or plan --workers 2 left one for good. medseg's own,
    named with host and pid, are removed by the next command when their process is gone."""
    import hashlib
    import subprocess
    import sys
    import tempfile

    from medseg.atomic import host_tag

    # a short folder: the forkserver's socket path must stay under 108 bytes
    tmp_path = Path(tempfile.mkdtemp(prefix="mp", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        host = hashlib.sha256(host_tag().encode()).hexdigest()[:6]
        dead = tmp_path / f"mmp-{host}-3999999-abc"
        (dead / "sub").mkdir(parents=True)
        other = tmp_path / "pymp-notours"
        other.mkdir()
        script = ("import os, sys, multiprocessing.util as u\n"
                  "from medseg.process_pool import forkserver_context\n"
                  "ctx = forkserver_context([])\n"
                  "p = ctx.Process(target=print, args=('ran',)); p.start(); p.join()\n"
                  "print(os.path.basename(u.get_temp_dir()), flush=True)\n"
                  "os.kill(os.getpid(), 9)\n")  # no exit handler: the folder stays for the next command
        env = dict(os.environ, TMPDIR=str(tmp_path),
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert first.stdout.split(), (first.returncode, first.stderr)
        ours = first.stdout.split()[-1]
        assert ours.startswith(f"mmp-{host}-") and (tmp_path / ours).is_dir(), first.stderr
        assert not dead.exists() and other.is_dir()  # a dead command's removed, another program's kept
        second = subprocess.run([sys.executable, "-c", script.replace("os.kill(os.getpid(), 9)\n", "")],
                                capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 0, second.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pymp-notours"]  # the killed one's and its own
        # a TMPDIR too long for the socket: the forkserver failed ("AF_UNIX path too long");
        # its folder goes to /tmp instead
        deep = tmp_path / ("d" * 70)
        deep.mkdir()
        third = subprocess.run([sys.executable, "-c", script.replace("os.kill(os.getpid(), 9)\n", "")],
                               capture_output=True, text=True, env=dict(env, TMPDIR=str(deep)), timeout=120)
        assert third.returncode == 0 and third.stdout.split()[-1].startswith(f"mmp-{host}-"), third.stderr
        assert not (Path("/tmp") / third.stdout.split()[-1]).exists() and list(deep.iterdir()) == []
    finally:
        import shutil

        shutil.rmtree(tmp_path, ignore_errors=True)

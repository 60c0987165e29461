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
    """What ``medseg evaluate`` says for a 3D case whose worker died: the case's reason
    names the Betti matching error's memory at its size."""
    import nibabel as nib

    from medseg.evaluation.evaluate import _died_reason
    from medseg.evaluation.metrics import BETTI_MATCHING_BYTES_PER_VOXEL

    ref = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 32), np.uint8), np.eye(4)), ref)
    job = ("big", tmp_path / "pred.nii.gz", ref, [1], None, None, ["dice", "betti_matching"], 1.0, None)
    reason = _died_reason(job, WorkerDied("the worker process died running it alone (out of memory, or killed)"))
    need = BETTI_MATCHING_BYTES_PER_VOXEL[3] * 64 * 64 * 32 / 2**30
    assert reason.startswith("the worker process died running it alone")
    assert f"needs up to {need:.1f} GB at 64x64x32 voxels" in reason and "--metrics" in reason
    without = ("big", tmp_path / "pred.nii.gz", ref, [1], None, None, ["dice"], 1.0, None)
    assert "Betti" not in _died_reason(without, WorkerDied("died"))


def test_a_box_too_large_for_this_machine_is_refused_before_the_engine(monkeypatch):
    from medseg.errors import DataError
    from medseg.evaluation import metrics

    monkeypatch.setattr(metrics, "memory_limit_bytes", lambda: 2**30)  # 1 GB
    with pytest.raises(DataError, match=r"^betti_matching: the masks' bounding box of 128x128x128 voxels needs "
                                        r"about 0\.9 GB, more than 90 % of the 1\.0 GB of memory here; leave it out"):
        metrics._check_matching_memory((128, 128, 128))
    metrics._check_matching_memory((64, 64, 64))  # 0.12 GB: fits
    metrics._check_matching_memory((1024, 1024))  # 2D: 260 bytes a pixel, 0.25 GB
    with pytest.raises(DataError, match=r"bounding box of 2048x2048 voxels needs about 1\.0 GB"):
        metrics._check_matching_memory((2048, 2048))


def test_memory_limit_is_a_positive_number_here():
    from medseg.evaluation.metrics import memory_limit_bytes

    limit = memory_limit_bytes()
    assert limit is not None and 2**28 < limit < 2**50

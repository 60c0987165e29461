"""Every file of a run folder is replaced whole (medseg.atomic): a failure or kill while
writing leaves the old file and no temporary one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from medseg import atomic
from medseg.atomic import atomic_path, write_atomic
from medseg.config import validate_config
from medseg.errors import MedsegError
from medseg.runfolder.checkpoint import load_checkpoint, save_checkpoint
from medseg.training.logs import RunLog, draw_progress
from medseg.training.trainer import run_training

from test_trainer import _raw


class _Killed(BaseException):
    """Stands in for a kill in the middle of a write."""


pytestmark = pytest.mark.usefixtures("one_thread")


def _fail_replace(monkeypatch, name: str) -> None:
    """``os.replace`` onto a file called ``name`` fails; every other rename works."""
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise _Killed(f"killed before renaming onto {dst}")
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_write_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "label_stats.json"
    path.write_text('{"old": true}')
    _fail_replace(monkeypatch, path.name)
    with pytest.raises(_Killed):
        write_atomic(path, '{"new": true}')
    assert path.read_text() == '{"old": true}' and _leftovers(tmp_path) == []


def test_a_write_removes_what_killed_writers_of_that_file_left(tmp_path):
    """plan, report compare and report html never looked for them: their
    .NAME.HOST-PID.tmp of a SIGKILL stayed for good. Another file's, and a live
    writer's, stay."""
    from medseg.atomic import host_tag

    dead = 3999999  # above any pid_max: no process has it
    left = tmp_path / f".compare.json.{host_tag()}-{dead}.tmp"
    other = tmp_path / f".compare.html.{host_tag()}-{dead}.tmp"
    live = tmp_path / f".compare.json.{host_tag()}-{os.getppid()}.tmp"  # a process that runs
    for path in (left, other, live):
        path.write_text("half")
    write_atomic(tmp_path / "compare.json", "{}")
    assert not left.exists() and other.exists() and live.exists()
    assert (tmp_path / "compare.json").read_text() == "{}"


def test_atomic_path_keeps_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "progress.png"
    path.write_bytes(b"old")
    with pytest.raises(_Killed):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the ne")
            raise _Killed()
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_a_checkpoint_save_killed_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest.pt"
    payload = {"model": {"w": torch.zeros(3)}, "config": {}, "iteration": 1}
    save_checkpoint(path, payload)
    before = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 torn")  # save_checkpoint hands torch an open file
        raise _Killed()

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(_Killed):
        save_checkpoint(path, {**payload, "iteration": 2})
    assert path.read_bytes() == before and load_checkpoint(path)["iteration"] == 1
    assert _leftovers(tmp_path) == []


def test_metrics_csv_and_progress_png_are_replaced_whole(tmp_path, monkeypatch):
    runlog = RunLog(tmp_path, ["dice_ce"], ["vessel"])
    for iteration in (2, 4, 6):
        runlog.add_row(iteration, 1e-3, 0.5, {"dice_ce": 0.5}, [0.5] if iteration == 6 else None)
    runlog.draw()
    runlog.close()
    metrics, png = (tmp_path / "metrics.csv").read_bytes(), (tmp_path / "progress.png").read_bytes()

    _fail_replace(monkeypatch, "metrics.csv")
    with pytest.raises(_Killed):
        RunLog(tmp_path, ["dice_ce"], ["vessel"], resume_iteration=4)  # rewrites metrics.csv up to row 4
    assert (tmp_path / "metrics.csv").read_bytes() == metrics

    _fail_replace(monkeypatch, "progress.png")
    with pytest.raises(_Killed):
        draw_progress(runlog.rows, ["dice_ce"], ["vessel"], tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes() == png
    assert _leftovers(tmp_path) == []


def test_a_damaged_metrics_csv_is_started_again_with_a_warning(tmp_path, caplog):
    """Bytes that are not UTF-8 ended the resume with a UnicodeDecodeError traceback."""
    import logging

    for damage in (b"garbage\x00\xff\n1,2\n", b"iteration,lr,loss\n2,0.001,0.5\n\xff\xfe"):
        (tmp_path / "metrics.csv").write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medseg.training"):
            runlog = RunLog(tmp_path, ["dice_ce"], ["vessel"], resume_iteration=4)
        runlog.add_row(6, 1e-3, 0.5, {"dice_ce": 0.5}, [0.5])
        runlog.close()
        assert [r["iteration"] for r in runlog.rows] == ["6"]
        assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("iteration,lr,loss")
        assert any("metrics.csv: unreadable" in r.getMessage() and "starts again at iteration 5" in r.getMessage()
                   for r in caplog.records)
    shutil.rmtree(tmp_path / "tensorboard")
    (tmp_path / "tensorboard").write_text("a file in the way")
    with pytest.raises(MedsegError, match="tensorboard: is a file, where the run keeps its TensorBoard events"):
        RunLog(tmp_path, ["dice_ce"], ["vessel"], resume_iteration=4)


def test_a_run_killed_while_writing_label_stats_leaves_no_torn_file(synthetic_dataset_3d, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fail_replace(monkeypatch, "label_stats.json")
    with pytest.raises(_Killed):
        run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=2)))
    assert not (run / "label_stats.json").exists() and _leftovers(run) == []
    assert (run / "config.yaml").is_file()


def test_a_resume_killed_while_rewriting_config_yaml_keeps_the_old_one(synthetic_dataset_3d, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=2)))
    before = (run / "config.yaml").read_bytes()
    _fail_replace(monkeypatch, "config.yaml")
    with pytest.raises(_Killed):
        run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=4)), resume=True)
    assert (run / "config.yaml").read_bytes() == before and _leftovers(run) == []
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 2


def test_a_folder_or_a_file_in_the_way_is_refused_before_anything_is_written(tmp_path):
    from medseg.errors import DataError

    folder = tmp_path / "report.html"
    folder.mkdir()
    with pytest.raises(DataError, match="report.html: is a folder, where a file is to be written"):
        write_atomic(folder, "x")
    blocker = tmp_path / "plain"
    blocker.write_text("keep")
    with pytest.raises(DataError, match=f"cannot be written, {blocker} exists and is not a folder"):
        write_atomic(blocker / "sub" / "x.html", "x")
    assert blocker.read_text() == "keep" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "report.html"]


def test_a_file_that_is_no_checkpoint_says_why_without_torchs_unsafe_advice(tmp_path):
    from medseg.errors import CheckpointError
    from medseg.runfolder.checkpoint import load_checkpoint as load

    text = tmp_path / "config.yaml"
    text.write_text("model: unet\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file: a checkpoint is a zip archive"):
        load(text)
    pickled = tmp_path / "foreign.pt"
    torch.save({"model": {}, "config": {}, "thing": Path("x")}, pickled)  # a class a weights-only load refuses
    with pytest.raises(CheckpointError) as caught:
        load(pickled)
    assert "weights-only load refuses" in str(caught.value) and "weights_only" not in str(caught.value)
    cut = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:1500])  # a write cut short: torch said "[Errno 22] Invalid argument"
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable medseg checkpoint \(truncated: a zip archive "
                                              r"without its end \(1500 bytes\)"):
        load(cut)


def test_a_checkpoint_changed_on_disk_is_refused_not_loaded_as_other_weights(tmp_path):
    """torch.load ignores the CRCs its zip stores: a flipped bit in a tensor loaded as
    different weights (predict and --resume exit 0 with other results)."""
    from medseg.errors import CheckpointError

    path = tmp_path / "latest.pt"
    weights = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"model": {"w": weights}, "config": {}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    offset = data.find(weights[1000:1004].numpy().tobytes())  # inside the tensor's record
    assert offset > 0
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"latest.pt: damaged checkpoint \(.*data/0 fails its CRC-32 check"):
        load_checkpoint(path)


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    """The temporary name is predictable (.NAME.HOST-PID.tmp): in a shared folder another
    user's link there had write_atomic (and torch.save, savefig through atomic_path)
    replace the file it pointed at."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "report.html"
    for write in (lambda: write_atomic(target, "<html>"), lambda: atomic.write_atomic_group({target: "<html>"})):
        atomic.temporary_name(target).symlink_to(victim)
        write()
        assert victim.read_text() == "precious"
        assert target.read_text() == "<html>" and not target.is_symlink()
        target.unlink()
    atomic.temporary_name(target).symlink_to(victim)
    with atomic_path(target) as tmp:
        torch.save({"a": 1}, tmp)
    assert victim.read_text() == "precious" and not target.is_symlink()


def test_logs_journals_and_locks_are_not_appended_through_a_link(tmp_path):
    """evaluate's journal, train.log of a resume and a run's lock opened a link in their
    folder and appended to (or created) the file it pointed at."""
    import logging

    from medseg.runfolder import log_handlers
    from medseg.runfolder.lock import LOCK_FILE, RunFolderLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(victim)
    with pytest.raises(OSError):
        log_handlers.attach_file_handler(run / "train.log")
    (run / "metrics.csv").symlink_to(victim)
    with pytest.raises(OSError):
        with open(run / "metrics.csv", "a", opener=atomic.no_follow) as handle:
            handle.write("x")
    dangling = tmp_path / "nologin"
    (run / LOCK_FILE).symlink_to(dangling)
    with pytest.raises(OSError):
        RunFolderLock(run).take()
    assert victim.read_text() == "precious\n" and not dangling.exists()
    logging.getLogger("medseg").handlers = [h for h in logging.getLogger("medseg").handlers
                                            if not isinstance(h, logging.FileHandler)]

"""``medseg train --resume`` with a changed config: what is refused (one line, nothing
touched), what may change (config.RESUME_MAY_CHANGE), and label_stats.json repair."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medseg.adaptation.source import load_source
from medseg.cli import main as cli_main
from medseg.config import RESUME_MAY_CHANGE, SchedulerConfig, validate_config
from medseg.errors import CheckpointError, ConfigError
from medseg.runfolder.checkpoint import load_checkpoint
from medseg.training.optim import lr_factor
from medseg.training.trainer import run_training

from test_trainer import _raw


pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and modification time."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            out[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def _train(dataset: Path, run: Path, iterations: int = 4) -> Path:
    """A finished run and its config file (the run's own ``config.yaml``)."""
    run_training(validate_config(_raw(dataset, run, iterations=iterations)))
    return run / "config.yaml"


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset_3d, tmp_path_factory) -> Path:
    """A 4-iteration run (adamw, lr 1e-3, batch 2, affine_prob 0.3); the refusals must leave it as it is."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("resume_policy") / "run"
    _train(synthetic_dataset_3d, run)
    return run


@pytest.mark.parametrize("override,key,old,new", [
    ("train.optimizer.lr=0.01", "train.optimizer.lr", "0.001", "0.01"),
    ("train.optimizer.name=sgd", "train.optimizer.name", "adamw", "sgd"),
    ("train.optimizer.weight_decay=0.1", "train.optimizer.weight_decay", "1e-05", "0.1"),
    ("train.batch_size=4", "train.batch_size", "2", "4"),
    ("data.augmentation.affine_prob=0.5", "data.augmentation.affine_prob", "0.3", "0.5"),
    ("train.scheduler.name=cosine", "train.scheduler.name", "poly", "cosine"),
    ("seed=2", "seed", "1", "2"),
])
def test_a_changed_key_is_refused_in_one_line_and_nothing_is_touched(finished_run, capsys, override, key, old, new):
    before = _digest(finished_run)
    code = cli_main(["train", str(finished_run / "config.yaml"), "--resume", "--set", override])
    captured = capsys.readouterr()
    assert code == ConfigError.exit_code
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(
        f"medseg: error: {key}: the run used {old}, the config says {new}; a resume cannot change it"
    ), captured.err
    assert "new output_dir" in captured.err
    assert _digest(finished_run) == before  # config.yaml, checkpoints, metrics.csv, train.log: not even rewritten


def test_several_changes_name_the_first_and_list_the_others(synthetic_dataset_3d, finished_run):
    raw = _raw(synthetic_dataset_3d, finished_run, iterations=4)
    raw["train"]["batch_size"] = 4
    raw["train"]["optimizer"] = {"lr": 0.01}
    with pytest.raises(ConfigError) as info:
        run_training(validate_config(raw), resume=True)
    assert str(info.value).startswith(
        "train.batch_size: the run used 2, the config says 4; a resume cannot change it (also changed: train.optimizer.lr)"
    ), str(info.value)

    raw = _raw(synthetic_dataset_3d, finished_run, iterations=4)
    raw["losses"] = [{"name": "dice_ce"}, {"name": "cldice", "weight": 0.5}]
    with pytest.raises(ConfigError, match=r"^losses\[1\]\.name: the run used nothing, the config says cldice;"):
        run_training(validate_config(raw), resume=True)


def test_iterations_may_not_end_before_the_checkpoint(finished_run, capsys):
    before = _digest(finished_run)
    assert cli_main(["train", str(finished_run / "config.yaml"), "--resume", "--set", "train.iterations=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.iterations: the config says 2" in err and "iteration 4" in err
    assert _digest(finished_run) == before


def test_policy_keys_exist_in_the_schema(finished_run):
    stored = load_checkpoint(finished_run / "checkpoints" / "latest.pt")["config"]
    for key in RESUME_MAY_CHANGE:
        node = stored
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_an_unchanged_resume_leaves_config_yaml_alone(synthetic_dataset_3d, tmp_path):
    config = _train(synthetic_dataset_3d, tmp_path / "run")
    stamp = config.stat().st_mtime_ns, config.read_bytes()
    assert cli_main(["train", str(config), "--resume"]) == 0  # complete: nothing to do
    assert (config.stat().st_mtime_ns, config.read_bytes()) == stamp


def test_a_larger_iterations_extends_the_run_on_the_new_schedule(synthetic_dataset_3d, tmp_path):
    run = tmp_path / "run"
    config = _train(synthetic_dataset_3d, run, iterations=4)
    started = json.loads((run / "provenance.json").read_text())
    assert started["device"] == "cpu" and started["medseg"] and "cpu" in started["engine"] and started["command"]
    assert "resumes" not in started
    code = cli_main(["train", str(config), "--resume", "--set", "train.iterations=8", "--set", "train.log_interval=1",
                     "--set", "data.num_workers=0", "--set", "inference.overlap=0.5"])
    assert code == 0
    record = json.loads((run / "provenance.json").read_text())  # the start kept, the resume appended
    assert {k: v for k, v in record.items() if k != "resumes"} == started
    assert [(r["from_iteration"], r["device"], r["medseg"]) for r in record["resumes"]] == [(4, "cpu", started["medseg"])]
    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert latest["iteration"] == 8 and latest["config"]["train"]["iterations"] == 8
    stored = validate_config(yaml.safe_load(config.read_text()))
    assert stored.train.iterations == 8 and stored.train.log_interval == 1 and stored.inference.overlap == 0.5
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left over

    with (run / "metrics.csv").open(newline="") as handle:
        rows = {int(r["iteration"]): r for r in csv.DictReader(handle)}
    assert sorted(rows) == [2, 4, 5, 6, 7, 8]
    # The first resumed step (index 4) runs at the 8-iteration schedule's LR, not at the
    # 4-iteration schedule's final value (0 for poly).
    poly = SchedulerConfig()
    for iteration in (5, 6, 7, 8):
        expected = 1e-3 * lr_factor(iteration - 1, 8, poly)
        assert float(rows[iteration]["lr"]) == pytest.approx(expected, rel=1e-6), iteration
    assert float(rows[5]["lr"]) > 0
    # said, in the terminal and train.log: the schedule is not the one the run started with
    line = ("train.iterations changed from 4 to 8 on resume: the learning rate's poly schedule now runs to iteration 8 "
            f"(next step's lr {1e-3 * lr_factor(4, 8, poly):.3g}, was {1e-3 * lr_factor(4, 4, poly):.3g})")
    assert line in (run / "train.log").read_text()


def test_a_broken_label_stats_is_named_and_resume_rewrites_it(synthetic_dataset_3d, tmp_path, capsys):
    run = tmp_path / "run"
    config = _train(synthetic_dataset_3d, run)
    stats = run / "label_stats.json"
    good = stats.read_bytes()
    stats.write_bytes(good[: len(good) // 2])  # what a kill mid-write used to leave

    with pytest.raises(CheckpointError) as info:
        load_source(run).label_stats()
    message = str(info.value)
    assert "\n" not in message and str(stats) in message and f"medseg train {config} --resume" in message

    checkpoints = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert cli_main(["train", str(config), "--resume"]) == 0
    assert stats.read_bytes() == good
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == checkpoints
    assert json.loads(stats.read_text())["classes"]


def test_a_second_process_in_the_same_run_folder_is_refused(synthetic_dataset_3d, tmp_path, capsys):
    """Two runs into one output_dir both passed the empty-folder check and wrote one folder
    together; the second is now refused while the first holds the folder's lock."""
    from medseg.runfolder import LOCK_FILE, RunFolderLock

    run = tmp_path / "run"
    with RunFolderLock(run) as other:  # another process training there (flock: per open file)
        other.take()
        with pytest.raises(ConfigError, match=r"output_dir .*run: in use by another medseg process"):
            run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=2)))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    # released: the same run starts, the lock file does not count as an earlier run
    _train(synthetic_dataset_3d, run, iterations=2)
    assert (run / "checkpoints" / "latest.pt").is_file()
    before = _digest(run)
    with RunFolderLock(run) as other:
        other.take()
        assert cli_main(["train", str(run / "config.yaml"), "--resume"]) != 0
    assert "in use by another medseg process" in capsys.readouterr().err
    assert _digest(run) == before


def test_a_run_that_started_meanwhile_is_not_joined(synthetic_dataset_3d, tmp_path):
    """The folder was empty when this run was checked; another run wrote it before this
    one's first write (between the check and the lock): refused, nothing overwritten."""
    from medseg.runfolder import RunFolderLock

    run = tmp_path / "run"
    run.mkdir()
    lock = RunFolderLock(run)
    (run / "train.log").write_text("another run\n")
    with pytest.raises(ConfigError, match="another run started there meanwhile"):
        with lock:
            lock.take(fresh=True)
    assert (run / "train.log").read_text() == "another run\n"


def test_a_killed_holder_releases_the_lock_even_with_forked_children_alive(tmp_path):
    """flock belongs to the open file, which forked children (DataLoader workers) share:
    they close their copy, so killing the holder frees the folder at once."""
    import signal
    import subprocess
    import sys
    import time

    from medseg.runfolder import RunFolderLock

    run = tmp_path / "run"
    script = (
        "import os, sys, time\n"
        "from medseg.runfolder import RunFolderLock\n"
        f"lock = RunFolderLock({str(run)!r}); lock.take()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="in use by another medseg process"):
            RunFolderLock(run).take()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        time.sleep(0.1)
        with RunFolderLock(run) as lock:
            lock.take()  # the forked child still sleeps, yet the folder is free
    finally:
        try:
            os.killpg(holder.pid, signal.SIGKILL)  # the forked child
        except ProcessLookupError:
            pass


def test_a_resume_on_changed_data_says_what_changed(synthetic_dataset_3d, tmp_path, caplog):
    """Training went on from the checkpoint on other data with no word (only config keys
    were compared); it now warns, naming the cases."""
    import logging
    import shutil as sh

    dataset = tmp_path / "data"
    sh.copytree(synthetic_dataset_3d, dataset)
    run = tmp_path / "run"
    _train(dataset, run, iterations=2)
    label = sorted((dataset / "labelsTr").iterdir())[0]
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # touched: "changed"
    with caplog.at_level(logging.WARNING, logger="medseg.training"):
        run_training(validate_config(_raw(dataset, run, iterations=4)), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "the dataset changed since" in r.getMessage()]
    assert len(warnings) == 1 and "1 case(s) whose files changed" in warnings[0]
    assert label.name.split(".")[0] in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg.training"):  # unchanged since: no warning
        run_training(validate_config(_raw(dataset, run, iterations=6)), resume=True)
    assert not [r for r in caplog.records if "the dataset changed since" in r.getMessage()]


def test_a_resume_keeps_the_checkpoints_split_when_cases_come_and_go(synthetic_dataset_3d, tmp_path, caplog):
    """The seeded split was drawn afresh over the cases there were at the resume: after a
    case was added, a case the run had trained on became its validation case."""
    import logging
    import shutil as sh

    dataset = tmp_path / "data"
    sh.copytree(synthetic_dataset_3d, dataset)
    run = tmp_path / "run"
    _train(dataset, run, iterations=2)
    before = load_checkpoint(run / "checkpoints" / "latest.pt")["split"]
    for image in sorted((dataset / "imagesTs").iterdir()):  # every test case joins the training set
        image.rename(dataset / "imagesTr" / image.name)
    for label in sorted((dataset / "labelsTs").iterdir()):
        label.rename(dataset / "labelsTr" / label.name)
    added = sorted(p.name.split(".")[0] for p in (dataset / "labelsTr").iterdir()
                   if p.name.split(".")[0] not in before["train"] + before["val"])
    assert added
    with caplog.at_level(logging.WARNING):
        run_training(validate_config(_raw(dataset, run, iterations=4)), resume=True)
    after = load_checkpoint(run / "checkpoints" / "latest.pt")["split"]
    assert after["train"][: len(before["train"])] == before["train"]
    assert after["val"][: len(before["val"])] == before["val"]
    assert sorted(after["train"][len(before["train"]):] + after["val"][len(before["val"]):]) == added
    moved = [r.getMessage() for r in caplog.records if "keeping the checkpoint's split" in r.getMessage()]
    fresh = tmp_path / "fresh"
    _train(dataset, fresh, iterations=2)
    drawn = load_checkpoint(fresh / "checkpoints" / "latest.pt")["split"]
    assert set(drawn["val"]) & set(before["train"])  # a split drawn afresh validates on trained cases
    assert len(moved) == 1 and "would move 3 case(s) between training and validation" in moved[0]


def test_a_run_started_with_relative_paths_resumes_from_any_folder(synthetic_dataset_3d, tmp_path, monkeypatch):
    """Paths are stored absolute, so the run's own config.yaml resumes it from anywhere; a
    checkpoint of an earlier medseg holding relative paths compares as before, from the
    folder it is resumed in."""
    start, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(start)
    raw = _raw(Path(os.path.relpath(synthetic_dataset_3d, start)), Path("runs/r"), iterations=4)
    assert cli_main(["train", *_as_config_file(raw, start / "config.yaml")]) == 0
    config = start / "runs" / "r" / "config.yaml"
    stored = yaml.safe_load(config.read_text())
    assert stored["data"]["dataset"] == str(synthetic_dataset_3d) and stored["output_dir"] == str(start / "runs" / "r")

    monkeypatch.chdir(elsewhere)
    assert cli_main(["train", str(config), "--resume", "--set", "train.iterations=6"]) == 0
    assert load_checkpoint(start / "runs" / "r" / "checkpoints" / "latest.pt")["iteration"] == 6
    assert not (elsewhere / "runs").exists()

    # an earlier medseg's checkpoint with the paths as the user wrote them
    latest = start / "runs" / "r" / "checkpoints" / "latest.pt"
    checkpoint = torch.load(latest, weights_only=False)
    checkpoint["config"]["data"]["dataset"] = raw["data"]["dataset"]
    checkpoint["config"]["output_dir"] = "runs/r"
    torch.save(checkpoint, latest)
    monkeypatch.chdir(start)
    assert cli_main(["train", str(start / "config.yaml"), "--resume", "--set", "train.iterations=6"]) == 0  # equal


def _as_config_file(raw: dict, path: Path) -> list[str]:
    path.write_text(yaml.safe_dump(raw))
    return [str(path)]


def test_a_resume_without_latest_but_with_best_is_refused_and_changes_nothing(synthetic_dataset_3d, tmp_path, capsys):
    """latest.pt deleted or lost in a run that trained: the resume used to take it for a run
    killed before its first checkpoint and train it again from step 0, over best.pt and
    metrics.csv."""
    run = tmp_path / "run"
    config = _train(synthetic_dataset_3d, run, iterations=12)  # latest every 4, best at 6 and 12
    (run / "checkpoints" / "latest.pt").unlink()
    before = _digest(run)
    assert cli_main(["train", str(config), "--resume"]) == CheckpointError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latest.pt: missing, but checkpoints/ holds best.pt" in err[0] and "nothing was changed" in err[0]
    assert _digest(run) == before
    (run / "checkpoints" / "latest.pt").mkdir()  # it said "missing, but checkpoints/ holds best.pt, latest.pt"
    assert cli_main(["train", str(config), "--resume"]) == CheckpointError.exit_code
    assert "latest.pt: not a file" in capsys.readouterr().err


def test_a_run_stopped_between_its_latest_and_best_of_a_step_resumes_exactly(synthetic_dataset_3d, tmp_path,
                                                                             monkeypatch, caplog):
    """best.pt was written before latest.pt, and validation may come before the first
    checkpoint: a run stopped after best.pt but before any latest.pt was refused for good
    ("latest.pt missing, but checkpoints/ holds best.pt"). latest.pt now comes first and
    names the step as the best; the resume writes best.pt from it."""
    import logging

    import medseg.training.trainer as trainer

    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=8, val_interval=2, checkpoint_interval=8)
    real_save = trainer._save

    def stop_at_best(path, parts, progress):
        if path.name == "best.pt":
            raise KeyboardInterrupt  # the kill, between the two files
        real_save(path, parts, progress)

    monkeypatch.setattr(trainer, "_save", stop_at_best)
    with pytest.raises(KeyboardInterrupt):
        run_training(validate_config(raw))
    monkeypatch.setattr(trainer, "_save", real_save)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.pt"]  # before the first checkpoint (8)
    stopped = load_checkpoint(checkpoints / "latest.pt")
    assert stopped["iteration"] == stopped["best_iteration"] == 2
    with caplog.at_level(logging.WARNING):
        run_training(validate_config(raw), resume=True)
    assert any("best.pt: written again from" in r.getMessage() for r in caplog.records)
    uninterrupted = tmp_path / "uninterrupted"
    run_training(validate_config({**raw, "output_dir": str(uninterrupted)}))
    assert (tmp_path / "run" / "metrics.csv").read_text() == (uninterrupted / "metrics.csv").read_text()
    for name in ("best.pt", "latest.pt"):
        got, want = (load_checkpoint(folder / "checkpoints" / name) for folder in (tmp_path / "run", uninterrupted))
        assert got["iteration"] == want["iteration"] and got["best_iteration"] == want["best_iteration"]
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def test_a_resume_with_another_number_of_processes_says_it_will_differ(synthetic_dataset_3d, tmp_path, caplog):
    """A run of 2 torchrun processes resumed by 1 went on in silence and ended by float
    rounding away from an uninterrupted run."""
    run = tmp_path / "run"
    config = _train(synthetic_dataset_3d, run, iterations=4)
    latest = run / "checkpoints" / "latest.pt"
    checkpoint = torch.load(latest, weights_only=False)
    assert checkpoint["world_size"] == 1
    checkpoint["world_size"] = 2  # as torchrun --nproc_per_node 2 wrote it
    torch.save(checkpoint, latest)
    with caplog.at_level("WARNING", logger="medseg.training"):
        assert cli_main(["train", str(config), "--resume", "--set", "train.iterations=6"]) == 0
    assert "written by 2 process(es), this resume runs 1" in caplog.text


def test_a_run_config_edited_in_place_is_named_as_edited(finished_run, tmp_path, capsys):
    """The refusal advised resuming with RUN/config.yaml, the very file that was edited."""
    edited = tmp_path / "copy"
    shutil.copytree(finished_run, edited)
    config = edited / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["output_dir"] = str(edited)
    raw["train"]["optimizer"]["lr"] = 0.05
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    checkpoint = torch.load(edited / "checkpoints" / "latest.pt", weights_only=False)
    checkpoint["config"]["output_dir"] = str(edited)
    torch.save(checkpoint, edited / "checkpoints" / "latest.pt")
    assert cli_main(["train", str(config), "--resume"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert f"{config} itself was edited since the run started: set train.optimizer.lr back to 0.001 there" in err

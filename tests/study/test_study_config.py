"""STUDY.yaml: runs resolved from base + set + variant + --set, and bad studies refused before any training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.study.config import load_study
from medseg.study.state import STATE_FILE


def test_runs_resolved_in_order(write_study, tiny_dataset, tmp_path):
    path = write_study(variants={
        "a": {"train.optimizer.lr": 0.01, "train": {"batch_size": 4}},
        "b": {"losses": [{"name": "dice", "weight": 2.0}], "train": {"optimizer": {"name": "sgd"}}},
    })
    study = load_study(path, ["train.iterations=3"])
    assert [(r.variant, r.seed) for r in study.runs] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]  # seed-major
    assert study.baseline == "a"
    a0, b1 = study.runs[0].config, study.runs[3].config
    assert a0.train.iterations == 3  # --set comes last
    assert a0.train.optimizer.lr == 0.01 and a0.train.batch_size == 4  # dotted and nested keys
    assert a0.train.val_interval == 2  # nested sections merge: the base's other keys stay
    assert [t.name for t in a0.losses] == ["dice_ce"]  # the schema's default loss
    assert [(t.name, t.weight) for t in b1.losses] == [("dice", 2.0)]  # lists replace
    assert b1.train.optimizer.name == "sgd" and b1.train.optimizer.lr == 1e-3
    assert b1.seed == 1 and b1.output_dir == tmp_path / "study" / "b" / "seed_1"
    assert study.config.test["synth"].images == tiny_dataset / "imagesTs"  # {dataset} filled in


def _fails(capsys, args) -> str:
    assert main(["study", *map(str, args)]) == ConfigError.exit_code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("medseg: error: ")
    return lines[0]


def test_unknown_study_key(write_study, capsys, tmp_path):
    line = _fails(capsys, [write_study(sedes=[0])])
    assert "study.yaml" in line and "unknown key 'sedes'" in line
    assert not (tmp_path / "study").exists()  # nothing started


def test_missing_base_config(write_study, capsys, tmp_path):
    line = _fails(capsys, [write_study(base=str(tmp_path / "nope.yaml"))])
    assert "base:" in line and "nope.yaml: config file not found" in line


@pytest.mark.parametrize("override, key", [
    ({"train.iteratons": 3}, "train.iteratons"),
    ({"train": {"optimizer": {"lrr": 0.1}}}, "train.optimizer.lrr"),
    ({"augmentation": {"flip_prob": 0.1}}, "augmentation"),
])
def test_variant_override_with_unknown_key(write_study, capsys, tmp_path, override, key):
    line = _fails(capsys, [write_study(variants={"cedice": {}, "broken": override})])
    assert "variants.broken" in line and f"unknown config key '{key}'" in line
    assert not (tmp_path / "study").exists()


def test_bad_value_and_bad_loss_name_the_variant(write_study, capsys):
    line = _fails(capsys, [write_study(variants={"cedice": {}, "neg": {"train.iterations": -1}})])
    assert "variants.neg" in line and "train.iterations" in line
    line = _fails(capsys, [write_study(variants={"cedice": {}, "typo": {"losses": [{"name": "cldice", "iteratons": 3}]}})])
    assert "variants.typo" in line and "unknown parameter 'iteratons'" in line
    # a parameter that only the data's dimensionality makes wrong (the runs are 2D)
    line = _fails(capsys, [write_study(variants={"cedice": {}, "mip": {"losses": [{"name": "mip", "axes": 7}]}})])
    assert "variants.mip" in line and "losses[0] (mip)" in line and "axis 7 does not exist in 2 spatial dimensions" in line


def test_command_line_set_is_checked(write_study, capsys):
    path = write_study()
    assert "--set: unknown config key 'train.iteratons'" in _fails(capsys, [path, "--set", "train.iteratons=3"])
    assert "'seed' is set by the study" in _fails(capsys, [path, "--set", "seed=3"])


def test_mistakes_are_named_where_they_are(write_study, capsys, tmp_path):
    """A bad key of the base config names the base file, a bad --set value its --set, and a
    bool is no seed; each before anything starts."""
    write_study()
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["data"]["bogus"] = 1
    line = _fails(capsys, [write_study(base_config=base)])
    assert f"base: {tmp_path / 'base.yaml'}: unknown config key 'data.bogus'" in line
    line = _fails(capsys, [write_study(), "--set", "train.iterations=abc"])
    assert "--set train.iterations=abc: Input should be a valid integer" in line and "variants." not in line
    line = _fails(capsys, [write_study(seeds=[True])])
    assert "seeds.0" in line and "valid integer" in line
    line = _fails(capsys, [write_study(base=str(tmp_path))])
    assert f"base: {tmp_path}: is not a file" in line
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("summary", [False, True])
def test_a_file_in_the_way_of_the_study_folder_is_refused_before_any_run(write_study, capsys, tmp_path, summary):
    blocker = tmp_path / "study"
    blocker.write_text("keep")
    path = write_study()
    line = _fails(capsys, [path, *(["--summary"] if summary else [])])
    assert f"output_dir {blocker}: {blocker} exists and is not a folder" in line
    blocker.unlink()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "cedice").write_text("keep")  # a variant's folder
    line = _fails(capsys, [path])
    assert f"{tmp_path / 'study' / 'cedice'} exists and is not a folder" in line
    assert (tmp_path / "study" / "cedice").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["cedice"]  # nothing started


def test_test_folder_without_labels(write_study, capsys, tiny_dataset, tmp_path):
    line = _fails(capsys, [write_study(test={"synth": {"images": str(tiny_dataset / "imagesTs"), "labels": str(tmp_path / "none")}})])
    assert "test.synth.labels" in line and "none: folder not found" in line
    partial = tmp_path / "labels"
    shutil.copytree(tiny_dataset / "labelsTs", partial)
    missing = sorted(partial.iterdir())[0]
    missing.unlink()
    line = _fails(capsys, [write_study(test={"synth": {"images": str(tiny_dataset / "imagesTs"), "labels": str(partial)}})])
    assert "test.synth.labels" in line and f"{missing}: no label for scan" in line


def test_test_key_without_labels_key(write_study, capsys, tiny_dataset):
    line = _fails(capsys, [write_study(test={"synth": {"images": str(tiny_dataset / "imagesTs")}})])
    assert "missing required key 'test.synth.labels'" in line


def test_run_trained_with_other_settings_is_refused(write_study, capsys, tmp_path):
    path = write_study()
    run = load_study(path).runs[0]
    run.run_dir.mkdir(parents=True)
    config = run.config.model_dump(mode="json")
    config["train"]["optimizer"]["lr"] = 0.5
    (run.run_dir / STATE_FILE).write_text(json.dumps({"config": config, "training": {"iterations": 2}}))
    line = _fails(capsys, [path])
    assert str(run.run_dir) in line and "train.optimizer.lr changed" in line
    # a run that finished with more iterations is refused (and one with fewer: see below)
    config["train"]["optimizer"]["lr"] = run.config.train.optimizer.lr
    (run.run_dir / STATE_FILE).write_text(json.dumps({"config": config, "training": {"iterations": 5}}))
    assert "trained for 5 iterations but the study asks for 2" in _fails(capsys, [path])


def test_a_model_params_entry_added_or_removed_is_a_change(write_study, capsys):
    """Keys on one side only were not compared: a finished run trained without dropout was
    reused for a variant that now sets model.params.dropout."""
    path = write_study()
    run = load_study(path).runs[0]
    run.run_dir.mkdir(parents=True)
    config = run.config.model_dump(mode="json")
    config["model"]["params"]["dropout"] = 0.5  # trained with it; the study no longer sets it
    (run.run_dir / STATE_FILE).write_text(json.dumps({"config": config, "training": {"iterations": 2}}))
    line = _fails(capsys, [path])
    assert "model.params.dropout" in line and "changed" in line


@pytest.mark.parametrize("name, message", [
    ("study.json", "taken by the study's own files"),
    ("logs", "taken by the study's own files"),
    ("v" * 101, "at most 100"),
])
def test_variant_names_that_collide_or_are_too_long(write_study, capsys, name, message):
    """A variant called study.json failed only when the summary was written, after every
    run; a 250-character name gave a traceback after the first run."""
    path = write_study(variants={"cedice": {}, name: {}})
    assert message in _fails(capsys, [path])


def test_a_variant_without_overrides_and_duplicate_names(write_study, tmp_path, capsys):
    path = write_study(variants={"base": None, "other": {"train.iterations": 2}})
    study = load_study(path)
    assert study.config.variants["base"] == {} and [r.variant for r in study.runs[:2]] == ["base", "other"]
    text = path.read_text().replace("other:", "base:")
    path.write_text(text)
    assert "key 'base' appears twice" in _fails(capsys, [path])


def test_a_scan_added_to_a_test_folder_is_predicted_and_evaluated_again(write_study, tiny_dataset, tmp_path):
    """The records held only the folders' paths: a scan added (or a label corrected) kept
    the old predictions and metrics, and the study reported them for the new folder."""
    from medseg.study.state import evaluation_dir, evaluation_record, test_done

    images, labels = tmp_path / "ts_images", tmp_path / "ts_labels"
    shutil.copytree(tiny_dataset / "imagesTs", images)
    shutil.copytree(tiny_dataset / "labelsTs", labels)
    path = write_study(test={"ext": {"images": str(images), "labels": str(labels)}})
    study = load_study(path)
    run = study.runs[0]
    (evaluation_dir(run.run_dir, "ext")).mkdir(parents=True)
    (evaluation_dir(run.run_dir, "ext") / "summary.json").write_text("{}")
    state = {"tests": {"ext": {"evaluated": evaluation_record(run, study.config, "ext")}}}
    assert test_done(run, study.config, "ext", state)
    first = sorted(labels.iterdir())[0]
    shutil.copy(first, labels / ("extra_" + first.name))
    assert not test_done(run, study.config, "ext", state)


def test_an_interrupted_study_stops_its_workers_and_starts_no_other(tmp_path):
    """Ctrl-C left the queued runs to run to the end (the pool's shutdown waited for them)."""
    import sys
    import threading
    import time

    from medseg.study.runner import _Workers

    workers = _Workers()
    codes = []
    # as medseg.study.worker, the child takes SIGINT as KeyboardInterrupt from its first
    # line on; stop() is sent once it runs (a signal during the interpreter's start-up is
    # another matter, and made this test fail under heavy load)
    child = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "print('ready', flush=True); time.sleep(60)")
    with open(tmp_path / "log", "w") as handle:
        thread = threading.Thread(target=lambda: codes.append(
            workers.run([sys.executable, "-c", child], "", handle, None)))
        thread.start()
        deadline = time.time() + 60
        while "ready" not in (tmp_path / "log").read_text() and time.time() < deadline:
            time.sleep(0.05)
        began = time.time()
        workers.stop()
        thread.join(30)
        assert not thread.is_alive() and time.time() - began < 20
        assert codes and codes[0] is not None and codes[0] != 0  # interrupted by SIGINT
        assert workers.run([sys.executable, "-c", "pass"], "", handle, None) is None  # nothing new starts


def test_a_worker_stops_when_the_study_process_is_killed(tmp_path):
    """A study killed by SIGKILL left its worker training alone (a rerun then found the run
    folder locked): the worker asks Linux for SIGTERM when its parent dies."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    # the "study": starts a worker that sets the death signal, then sleeps as training would
    worker = (
        "import os, time; from medseg.study.worker import _stop_with_the_study; "
        f"_stop_with_the_study(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    study = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"])
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    worker_pid = int(pid_file.read_text())
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        raise AssertionError("the worker outlived the killed study")


def test_a_run_finished_at_another_iteration_count_is_not_trained_on(write_study, capsys, tmp_path):
    """A quick look (--set train.iterations=N) followed by the full study resumed the quick
    runs past their end: their learning-rate schedule was not the other runs', silently."""
    path = write_study()
    run = load_study(path).runs[0]
    run.run_dir.mkdir(parents=True)
    config = run.config.model_dump(mode="json")
    (run.run_dir / STATE_FILE).write_text(json.dumps({"config": config, "training": {"iterations": 1}}))
    line = _fails(capsys, [path])
    assert "trained for 1 iterations but the study asks for 2" in line and "--set output_dir=" in line
    # a --summary without the --set the study ran with lands here too: the hint comes first
    assert "if the study ran with --set train.iterations=1, give that again" in line
    # --set output_dir moves the whole study, so the quick look can live beside it
    quick = load_study(path, ["output_dir=" + str(tmp_path / "quick"), "train.iterations=1"])
    assert quick.output_dir == tmp_path / "quick" and quick.runs[0].run_dir.parent.parent == tmp_path / "quick"
    assert quick.runs[0].config.train.iterations == 1


def test_an_interrupted_run_edited_since_is_refused_before_any_run(write_study, capsys):
    """A run killed in its first training call has no study record yet; its edited
    variant failed in its worker, after the other runs trained."""
    path = write_study()
    run = load_study(path).runs[0]
    run.run_dir.mkdir(parents=True)
    config = run.config.model_dump(mode="json")
    config["losses"][0]["weight"] = 2.0
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    line = _fails(capsys, [path])
    assert str(run.run_dir) in line and "losses" in line and "changed" in line
    config["losses"][0]["weight"] = 1.0
    config["train"]["iterations"] = 7
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert "started for 7 iterations but the study asks for 2" in _fails(capsys, [path])


def test_output_dir_in_a_folder_the_study_reads_is_refused(write_study, capsys, tiny_dataset, tmp_path):
    images, labels = tmp_path / "ts_images", tmp_path / "ts_labels"
    shutil.copytree(tiny_dataset / "imagesTs", images)
    shutil.copytree(tiny_dataset / "labelsTs", labels)
    test = {"ext": {"images": str(images), "labels": str(labels)}}
    line = _fails(capsys, [write_study(test=test, output_dir=str(images))])
    assert "lies in test.ext.images" in line
    line = _fails(capsys, [write_study(test=test, output_dir=str(labels / "out"))])
    assert "lies in test.ext.labels" in line
    line = _fails(capsys, [write_study(test=test, output_dir=str(tiny_dataset / "imagesTr" / "study"))])
    assert "lies in the dataset's imagesTr/ folder" in line
    # the dataset's own folder: the runs' folders, logs and study.* were written beside imagesTr/
    line = _fails(capsys, [write_study(test=test, output_dir=str(tiny_dataset))])
    assert f"output_dir: {tiny_dataset} is the dataset's own folder ({tiny_dataset}); put the study's folder" in line


def test_a_label_without_its_scan_and_a_seed_out_of_range_are_refused(write_study, capsys, tiny_dataset, tmp_path):
    images, labels = tmp_path / "ts_images", tmp_path / "ts_labels"
    shutil.copytree(tiny_dataset / "imagesTs", images)
    shutil.copytree(tiny_dataset / "labelsTs", labels)
    removed = sorted(images.iterdir())[0]
    removed.unlink()
    line = _fails(capsys, [write_study(test={"ext": {"images": str(images), "labels": str(labels)}})])
    assert "test.ext.labels" in line and "a label without its scan" in line
    line = _fails(capsys, [write_study(seeds=[0, 2**32])])
    assert "seeds" in line and "variants" not in line


def test_a_test_label_of_another_shape_or_place_or_a_scan_of_another_dimension_is_refused_up_front(
        write_study, capsys, tiny_dataset, tmp_path):
    """Read from the headers: predict and evaluate refused these after every run trained."""
    from medseg.data.io import read_image, write_image

    images, labels = tmp_path / "ts_images", tmp_path / "ts_labels"
    shutil.copytree(tiny_dataset / "imagesTs", images)
    shutil.copytree(tiny_dataset / "labelsTs", labels)
    test = {"ext": {"images": str(images), "labels": str(labels)}}
    label_file = sorted(labels.iterdir())[0]
    original = label_file.read_bytes()
    array, geometry = read_image(label_file)
    write_image(label_file, array[:-1], type(geometry)(geometry.affine, array[:-1].shape))
    line = _fails(capsys, [write_study(test=test)])
    assert f"test.ext.labels: {label_file}: shape" in line and "differs from its scan's" in line
    shifted = geometry.affine.copy()
    shifted[0, 3] += 0.5
    write_image(label_file, array, type(geometry)(shifted, array.shape))
    line = _fails(capsys, [write_study(test=test)])
    assert f"{label_file}: affine differs from its scan's by up to 0.5 mm" in line
    label_file.write_bytes(original)
    scan_file = sorted(images.iterdir())[0]
    scan, scan_geometry = read_image(scan_file)
    volume = np.stack([scan] * 3, axis=-1)
    write_image(scan_file, volume, type(scan_geometry).identity(volume.shape))
    line = _fails(capsys, [write_study(test=test)])
    assert f"test.ext.images: {scan_file}: a 3D scan for the study's 2D runs" in line


def test_predictions_of_removed_scans_are_not_evaluated(write_study, tiny_dataset, tmp_path, monkeypatch):
    """A scan removed from a test folder kept its old prediction beside the new ones, and
    the study scored it: predictions made afresh now start from an empty folder."""
    import medseg.evaluation.evaluate as evaluate
    import medseg.inference.predict as predict
    from medseg.study import worker
    from medseg.study.state import predictions_dir

    path = write_study()
    study = load_study(path)
    run = study.runs[0]
    folder = predictions_dir(run.run_dir, "synth")
    folder.mkdir(parents=True)
    (folder / "removed_case.nii.gz").write_bytes(b"stale")
    seen = {}
    monkeypatch.setattr(predict, "run_prediction", lambda model, inputs, out, **kw: seen.setdefault("left", sorted(
        p.name for p in out.iterdir()) if out.exists() else []) is not None)
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **kw: True)
    state = {"tests": {"synth": {"predicted": {"model_iteration": -1}}}}  # made by another model: all stale
    worker._test(run, study.config, "synth", state)
    assert seen["left"] == []
    # an interrupted prediction of the same model keeps what it made
    (folder.mkdir(parents=True, exist_ok=True), (folder / "made.nii.gz").write_bytes(b"kept"))
    seen.clear()
    worker._test(run, study.config, "synth", state)
    assert seen["left"] == ["made.nii.gz"]


def test_a_base_that_is_a_study_or_not_text_is_named_as_the_base(write_study, capsys, tmp_path):
    study = write_study()
    line = _fails(capsys, [write_study(base=str(study))])
    assert "base:" in line and "is a STUDY.yaml" in line
    binary = tmp_path / "scan.nii.gz"
    binary.write_bytes(bytes(range(256)) * 4)
    line = _fails(capsys, [write_study(base=str(binary))])
    assert f"study.yaml: base: {binary}" in line


def test_an_output_dir_that_cannot_be_created_is_one_line(write_study, capsys):
    """It was a FileNotFoundError traceback, from --summary and from the first run."""
    for extra in ([], ["--summary"]):
        line = _fails(capsys, [write_study(output_dir="/proc/medseg_study"), *extra])
        assert "output_dir: /proc/medseg_study: cannot be created" in line


def test_the_time_left_counts_what_a_run_does_besides_training(write_study):
    """The estimate counted training steps only: 'about 58 min' for a quick look whose
    runs spent most of their time predicting and evaluating (130 min)."""
    from medseg.study.runner import _time_left

    runs = {run.name: run for run in load_study(write_study()).runs}  # 4 runs of 2 iterations
    assert _time_left(runs, [30.0], [], 2) == "; 4 to go, about 2 min at 30 s/step"  # 4 x 2 x 30 / 2 s
    assert _time_left(runs, [30.0], [600.0], 2) == "; 4 to go, about 22 min at 30 s/step"  # + 4 x 600 / 2 s
    assert _time_left(runs, [0.1], [], 1).startswith("; 4 to go, about under a minute")


_WORKER = (
    "import os, sys, time\n"
    "from medseg.study.worker import _stop_with_the_study\n"
    "_stop_with_the_study()\n"
    "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
    "try:\n"
    "    time.sleep(60)\n"
    "except KeyboardInterrupt:\n"
    "    time.sleep(1.0)  # its clean-up, as a trainer writing its checkpoint\n"
    "    open(sys.argv[1] + '.cleaned', 'w').close()\n"
    "    sys.exit(130)\n"
)


def _start_worker(tmp_path, ignore_sigint: bool):
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(pid_file)], preexec_fn=pre)
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc, pid_file


def test_a_worker_of_a_study_that_ignores_sigint_ignores_it_too(tmp_path):
    """A study started with SIGINT ignored (``&`` in a script) went on with its next runs
    while a Ctrl-C of the process group interrupted its running workers: the workers undid
    the ignore. They keep it now, and stop on the study's SIGTERM."""
    import signal
    import subprocess

    proc, pid_file = _start_worker(tmp_path, ignore_sigint=True)
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130 and (tmp_path / "worker.pid.cleaned").exists()


def test_a_second_signal_does_not_cut_the_first_ones_clean_up_short(tmp_path):
    """Ctrl-C reaches the workers from the terminal, and the study then stops them too: the
    second signal interrupted the first one's clean-up (tracebacks in the run's log,
    "killed by SIGINT" recorded instead of "interrupted")."""
    import signal
    import time

    proc, pid_file = _start_worker(tmp_path, ignore_sigint=False)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130 and (tmp_path / "worker.pid.cleaned").exists()


def test_ctrl_c_of_a_study_says_how_to_go_on(monkeypatch, capsys, tmp_path):
    """train said how to resume after Ctrl-C, study nothing (it resumes when run again)."""
    import medseg.study

    from medseg.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg.study, "run_study", interrupted)
    assert main(["study", str(tmp_path / "study.yaml")]) == 130
    assert capsys.readouterr().err.strip() == "medseg: interrupted; run the same command again to go on"
    assert main(["study", str(tmp_path / "study.yaml"), "--summary"]) == 130  # ran nothing: nothing to go on with
    assert capsys.readouterr().err.strip() == "medseg: interrupted"


def test_a_bad_value_is_named_as_the_part_of_the_study_that_gave_it(write_study, capsys, tiny_dataset, tmp_path):
    """A bad value in the study's set was reported as the first variant's mistake."""
    import copy
    import importlib.util

    # this folder's conftest (under xdist another folder's conftest may be the one imported)
    spec = importlib.util.spec_from_file_location("study_conftest", Path(__file__).with_name("conftest.py"))
    study_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_conftest)
    BASE, VARIANTS = study_conftest.BASE, study_conftest.VARIANTS

    path = write_study(set={"data.dataset": str(tiny_dataset), "train.iterations": 2, "train.batch_size": "two"})
    line = _fails(capsys, [path])
    assert line.startswith(f"medseg: error: {path}: set: key 'train.batch_size': Input should be a valid integer")
    variants = copy.deepcopy(VARIANTS)
    variants["cldice"]["train.log_interval"] = "often"
    line = _fails(capsys, [write_study(variants=variants)])
    assert line.startswith(f"medseg: error: {path}: variants.cldice: key 'train.log_interval'")
    base = copy.deepcopy(BASE)
    base["train"]["val_interval"] = "sometimes"
    line = _fails(capsys, [write_study(base_config=base)])
    assert line.startswith(f"medseg: error: {path}: base: {tmp_path / 'base.yaml'}: key 'train.val_interval'")


def test_one_run_at_a_time_says_it_finished_before_the_next_starts(write_study, monkeypatch, capsys):
    """Without --parallel the next run's "started" came before this one's "finished" (its
    slot was free before the study had said so), as if two ran at once."""
    import time

    from medseg.study import runner

    study = load_study(write_study())
    monkeypatch.setattr(runner, "_run_one", lambda run, *args: time.sleep(0.05) or None)
    capsys.readouterr()
    assert runner._execute(study.runs[:3], study, parallel=1, local_rank=None) == {}
    said = []
    for line in capsys.readouterr().err.splitlines():
        name, what = line.removeprefix("medseg study: ").split(": ", 1)
        said.append((name, what.split()[0]))
    assert said == [(run.name, what) for run in study.runs[:3] for what in ("started", "finished")]

"""``medseg study`` end to end on a tiny 2D dataset: two variants x two seeds, two iterations each.

One test walks a study through its life, since every step needs the runs of the one
before: an interrupted run resumes and a damaged one fails without stopping the
others; a rerun redoes only what is missing (a retrained run, an evaluation) and skips
finished runs; torchrun-style ranks leave the summary to the last one.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from medseg.cli import main
from medseg.config import validate_config
from medseg.study.config import load_study
from medseg.study.runner import runs_of_rank
from medseg.study.state import STATE_FILE, evaluation_dir, latest_checkpoint, predictions_dir
from medseg.training.trainer import run_training

pytestmark = pytest.mark.slow


def _mtimes(paths) -> dict:
    return {p: p.stat().st_mtime_ns for p in paths}


def _state(run) -> dict:
    return json.loads((run.run_dir / STATE_FILE).read_text())


def _csv(study) -> list[dict]:
    with open(study.output_dir / "study.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_study_runs_resumes_and_skips(write_study, capsys, monkeypatch):
    path = write_study()
    study = load_study(path)
    runs = {(r.variant, r.seed): r for r in study.runs}
    interrupted, damaged = runs[("cedice", 0)], runs[("cldice", 1)]

    # an interrupted run (checkpoint at iteration 1 of 2, no study record) and a damaged one
    raw = interrupted.config.model_dump(mode="json")
    raw["train"]["iterations"] = 1
    run_training(validate_config(raw))
    stored = yaml.safe_load((interrupted.run_dir / "config.yaml").read_text())
    stored["train"]["iterations"] = 2  # started for 2, stopped after 1, as a killed run
    (interrupted.run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    latest_checkpoint(damaged.run_dir).parent.mkdir(parents=True)
    latest_checkpoint(damaged.run_dir).write_bytes(b"not a checkpoint")
    capsys.readouterr()

    assert main(["study", str(path), "--parallel", "2"]) == 1
    err = capsys.readouterr().err
    assert "0 finished, 4 to run, 2 at a time" in err
    assert "cldice seed 1: FAILED" in err and "latest.pt" in err
    assert "to go, about" in err and "s/step" in err  # the time left, after the first run finished
    summary = json.loads((study.output_dir / "study.json").read_text())
    assert [(r["run"], r["status"]) for r in summary["runs"]] == [
        ("cedice seed 0", "finished"), ("cldice seed 0", "finished"), ("cedice seed 1", "finished"), ("cldice seed 1", "failed")]
    assert "latest.pt" in summary["runs"][3]["error"]  # seed-major: every variant at seed 0 first
    segments = _state(interrupted)["training"]["segments"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in segments] == [(1, 2)]
    assert segments[0]["seconds"] > 0 and segments[0]["peak_rss_mib"] > 0
    for name in ("study.json", "study.csv", "study.html"):
        assert (study.output_dir / name).is_file()
    assert (study.output_dir / "logs" / "cldice_seed_1.log").is_file()
    table = _csv(study)
    assert [(r["test"], r["label"], r["variant"], r["seeds"]) for r in table] == [
        ("synth", "1", "cedice", "2"), ("synth", "1", "cldice", "1")]
    metrics = summary["metrics"]
    assert {"betti_0_error", "betti_1_error", "betti_matching_error", "Dice", "clDice", "HD95"} <= set(metrics)
    assert list(table[0]) == ["test", "label", "label_name", "variant", "seeds",
                              *[f"{m}{s}" for m in metrics for s in ("", "_std", "_p", "_mark")],
                              "seconds_per_step", "peak_rss_mib", "peak_cuda_mib"]
    html = (study.output_dir / "study.html").read_text()
    assert "data:image/png;base64," in html and "failed" in html

    # rerun: the damaged run trains from scratch, a lost evaluation is recomputed, the rest is skipped
    shutil.rmtree(damaged.run_dir)
    lost = runs[("cedice", 1)]
    (evaluation_dir(lost.run_dir, "synth") / "summary.json").unlink()
    kept = _mtimes([latest_checkpoint(r.run_dir) for r in study.runs if r is not damaged]
                   + sorted(predictions_dir(lost.run_dir, "synth").iterdir()))
    assert main(["study", str(path), "--parallel", "2"]) == 0
    err = capsys.readouterr().err
    assert "2 finished, 2 to run" in err
    assert _mtimes(kept) == kept
    assert (evaluation_dir(lost.run_dir, "synth") / "summary.json").is_file()
    assert [r["seeds"] for r in _csv(study)] == ["2", "2"]
    assert all(r["status"] == "finished" for r in json.loads((study.output_dir / "study.json").read_text())["runs"])

    # torchrun-style ranks, nothing left to run: rank 1 leaves the summary to rank 0, which finishes last
    assert [r.name for r in runs_of_rank(study.runs, 1, 2)] == ["cldice seed 0", "cldice seed 1"]
    (study.output_dir / "study.json").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "e2e")
    monkeypatch.setenv("RANK", "1")
    assert main(["study", str(path)]) == 0
    assert "last rank to finish writes the summary" in capsys.readouterr().err
    assert not (study.output_dir / "study.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(["study", str(path)]) == 0
    assert "rank 0 of 2: 2 of 4 runs" in capsys.readouterr().err
    assert (study.output_dir / "study.json").is_file()
    assert _mtimes(kept) == kept


def test_an_interrupted_training_keeps_the_time_of_what_it_checkpointed(write_study, monkeypatch):
    """A run stopped after its last checkpoint (in its final validation) resumed with
    nothing left to train: its training time was lost (NaN seconds per step, shown as
    "nan s/step"), and a study with runs left crashed estimating their time. The
    interrupted call now records its segment up to the checkpoint, and leaves the training
    unfinished."""
    import math

    from medseg.study import worker
    from medseg.study.state import training_done, training_summary
    from medseg.training import trainer

    run = load_study(write_study()).runs[0]
    raw = run.config.model_dump(mode="json")
    raw["train"]["iterations"] = 1

    def stopped_after_a_checkpoint(cfg, resume=False):
        run_training(validate_config(raw))  # latest.pt at iteration 1
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_training", stopped_after_a_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        worker._train(run)
    state = _state(run)
    segments = state["training"]["segments"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in segments] == [(0, 1)] and segments[0]["seconds"] > 0
    assert "iterations" not in state["training"] and not training_done(run, state)
    stats = training_summary(state)
    assert math.isfinite(stats["seconds_per_step"]) and stats["peak_rss_mib"] > 0


def test_a_call_that_trained_nothing_measures_nothing():
    from medseg.study.runner import _resources
    from medseg.study.state import training_summary

    noop = {"from_iteration": 2, "to_iteration": 2, "seconds": 9.0, "peak_rss_mib": 400.0, "device": "cpu"}
    real = {"from_iteration": 0, "to_iteration": 2, "seconds": 4.0, "peak_rss_mib": 900.0, "device": "cpu"}
    alone = training_summary({"training": {"segments": [noop]}})
    assert alone["seconds_per_step"] != alone["seconds_per_step"]  # NaN: not known
    assert alone["peak_rss_mib"] != alone["peak_rss_mib"]  # not the no-op's 400 MiB
    assert _resources(alone) == "training time and memory not recorded"
    both = training_summary({"training": {"segments": [real, noop]}})
    assert both["seconds_per_step"] == 2.0 and both["peak_rss_mib"] == 900.0


def test_parallel_runs_find_their_cache_filled_once_before_they_start(write_study, tmp_path, capsys):
    """With --parallel 2 both first runs preprocessed the same dataset into the same
    cache at once: twice the work at the study's start. The study now fills it first."""
    path = write_study(seeds=[0])
    cache = tmp_path / "fresh_cache"
    assert main(["study", str(path), "--parallel", "2", "--set", f"data.cache_dir={cache}"]) == 0
    study = load_study(path, [f"data.cache_dir={cache}"])
    logs = {run.name: (run.run_dir / "train.log").read_text() for run in study.runs}
    assert len(logs) == 2
    for name, text in logs.items():
        assert "using the preprocessed cache" in text and "preprocessing " not in text, (name, text)
    assert any(cache.rglob("*.b2nd"))


def test_a_second_study_process_on_the_same_folder_is_refused(write_study, capsys):
    """A second `medseg study` on the same study deleted the folder of a run the first was
    training, and resumed runs from checkpoints the first was still writing."""
    from medseg.runfolder.lock import RunFolderLock

    path = write_study(seeds=[0])
    study = load_study(path)
    with RunFolderLock(study.output_dir, what="study output_dir") as first:  # the first study, running
        first.take()
        assert main(["study", str(path)]) != 0
        assert "in use by another medseg process" in capsys.readouterr().err
        assert not any(run.run_dir.exists() for run in study.runs)
        assert main(["study", str(path), "--summary"]) == 0  # looking at it meanwhile is fine


def test_a_label_replaced_while_a_run_is_evaluated_leaves_the_run_unfinished(write_study, tiny_dataset, tmp_path,
                                                                             monkeypatch):
    """The evaluation's record was taken from the folders after evaluating: a file replaced
    meanwhile stood recorded as evaluated, and the run was never evaluated again."""
    from pathlib import Path

    import medseg.evaluation.evaluate as evaluate_module
    from medseg.study.state import read_state, test_done
    from medseg.study.worker import execute_run

    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "dataset"))
    path = write_study(seeds=[0], set={"data.dataset": str(dataset), "train.iterations": 2})
    study = load_study(path)
    run = study.runs[0]
    label = sorted((dataset / "labelsTs").iterdir())[0]
    real = evaluate_module.run_evaluation

    def replaced_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        data = label.read_bytes()
        label.unlink()
        label.write_bytes(data)  # another file at the path (a new inode)
        return result

    monkeypatch.setattr(evaluate_module, "run_evaluation", replaced_meanwhile)
    execute_run(run, study.config)
    assert not test_done(run, study.config, "synth", read_state(run.run_dir))
    monkeypatch.setattr(evaluate_module, "run_evaluation", real)
    execute_run(run, study.config)  # evaluated again, with the file as it is now
    assert test_done(run, study.config, "synth", read_state(run.run_dir))


def test_runs_trained_on_training_data_that_changed_since_are_named(write_study, tiny_dataset, tmp_path, capsys):
    """A label of the training set replaced after seed 0 finished: seed 0 was reused and
    seed 1 trained on the new data, and the study averaged the two without a word."""
    from pathlib import Path

    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "dataset"))
    path = write_study(seeds=[0], set={"data.dataset": str(dataset), "train.iterations": 2})
    assert main(["study", str(path)]) == 0
    assert "WARNING" not in capsys.readouterr().err
    label = sorted((dataset / "labelsTr").iterdir())[0]
    data = label.read_bytes()
    label.unlink()
    label.write_bytes(data)
    assert main(["study", str(path)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: 2 run(s) were trained on training data that has changed since" in err
    assert "cedice seed 0" in err and "cldice seed 0" in err

"""The study's statistics on known inputs: means over seeds, the paired permutation test against the baseline, the outputs.

Runs are faked (state file, empty checkpoint, an evaluation summary with chosen values),
so nothing is trained here.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shutil

import numpy as np
import pytest

from medseg.study.config import load_study
from medseg.study.report import MARK, render_csv, write_outputs
from medseg.study.state import (
    STATE_FILE,
    evaluation_dir,
    evaluation_record,
    latest_checkpoint,
    prediction_record,
)
from medseg.study.summary import compare_to_baseline, seed_statistics, summarize

CASES = ("c0", "c1", "c2")
BASE_BETTI_1 = {("c0", 0): 3.0, ("c1", 0): 5.0, ("c2", 0): 4.0, ("c0", 1): 6.0, ("c1", 1): 2.0, ("c2", 1): 7.0}


def _exact_p(d) -> float:
    """Two-sided sign-flip p of the mean over all 2^n sign vectors, written out here."""
    d = np.asarray(d, dtype=float)
    observed = abs(d.mean())
    hits = sum(abs(np.mean(np.array(s) * d)) >= observed - 1e-12 for s in itertools.product((-1, 1), repeat=d.size))
    return hits / 2 ** d.size


def test_seed_statistics():
    stats = seed_statistics({("a", 0): 1.0, ("b", 0): 3.0, ("a", 1): 4.0, ("b", 1): math.nan, ("c", 1): 6.0})
    assert stats["seed_means"] == {0: 2.0, 1: 5.0}
    assert stats["mean"] == 3.5
    assert stats["std_seeds"] == pytest.approx(np.std([2.0, 5.0], ddof=1))
    assert stats["std_cases"] == pytest.approx(np.std([1.0, 3.0, 4.0, 6.0], ddof=1))
    assert (stats["n"], stats["n_undefined"], stats["n_seeds"]) == (4, 1, 2)


def test_permutation_test_on_known_inputs():
    better = {k: v - 1 for k, v in BASE_BETTI_1.items()}  # one loop fewer everywhere: 6 pairs
    r = compare_to_baseline(BASE_BETTI_1, better, "betti_1_error", alpha=0.05)
    assert r["n"] == 6 and r["mean_difference"] == -1.0
    assert r["permutation_p"] == pytest.approx(_exact_p([-1] * 6)) == pytest.approx(2 / 64)
    assert r["better"] == "variant" and r["significant"]

    # the same differences on a metric where higher is better: the baseline wins, no mark
    r = compare_to_baseline(BASE_BETTI_1, better, "Dice", alpha=0.05)
    assert r["better"] == "baseline" and not r["significant"]

    # mixed differences (exact p computed independently); undefined and unpaired values dropped
    mixed = {("c0", 0): 2.0, ("c1", 0): 5.0, ("c2", 0): 1.0, ("c0", 1): 4.0, ("c1", 1): math.nan, ("x", 1): 0.0}
    r = compare_to_baseline(BASE_BETTI_1, mixed, "betti_1_error", alpha=0.05)
    d = [2 - 3, 5 - 5, 1 - 4, 4 - 6]
    assert r["n"] == 4
    assert r["mean_difference"] == pytest.approx(np.mean(d))
    assert r["permutation_p"] == pytest.approx(_exact_p(d))
    assert r["better"] == "variant" and not r["significant"]  # p = 0.25: better, not significantly

    # sampled (not exact) when 2^n exceeds the number of permutations
    r = compare_to_baseline(BASE_BETTI_1, better, "betti_1_error", alpha=0.05, permutations=10)
    hits = r["permutation_p"] * 11 - 1  # p = (1 + hits) / (1 + permutations)
    assert hits == pytest.approx(round(hits)) and 0 <= round(hits) <= 10


def _fake_runs(study, values):
    """Finished runs whose evaluation of 'synth' holds ``values[variant][metric][(case, seed)]``."""
    for run in study.runs:
        latest = latest_checkpoint(run.run_dir)
        latest.parent.mkdir(parents=True)
        latest.write_bytes(b"")
        entries = []
        for case in CASES:
            metrics = {m: v[(case, run.seed)] for m, v in values[run.variant].items() if (case, run.seed) in v}
            entries.append({"case": case, "reference_file": f"{case}.nii.gz", "metrics": {"1": metrics}})
        folder = evaluation_dir(run.run_dir, "synth")
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"metric_per_case": entries, "labels": {"1": "vessel"}}))
        state = {
            "variant": run.variant, "seed": run.seed, "status": "finished", "config": run.config.model_dump(mode="json"),
            "training": {"iterations": 2, "segments": [{"from_iteration": 0, "to_iteration": 2, "seconds": 3.0 + run.seed,
                                                        "peak_rss_mib": 100.0 + run.seed, "peak_cuda_mib": None, "device": "cpu"}]},
            "tests": {"synth": {"predicted": prediction_record(run, study.config, "synth"),
                                "evaluated": evaluation_record(run, study.config, "synth")}},
        }
        (run.run_dir / STATE_FILE).write_text(json.dumps(state))


def test_summary_tables_and_marks(write_study, capsys):
    path = write_study()
    study = load_study(path)
    dice = {k: 0.8 for k in BASE_BETTI_1}
    values = {
        "cedice": {"betti_1_error": BASE_BETTI_1, "Dice": dice, "HD95": dict(BASE_BETTI_1), "components_pred": dice},
        "cldice": {"betti_1_error": {k: v - 1 for k, v in BASE_BETTI_1.items()}, "Dice": {k: 0.7 for k in dice},
                   "HD95": dict(BASE_BETTI_1), "components_pred": dice},
    }
    _fake_runs(study, values)
    summary = summarize(load_study(path))
    assert summary["metrics"] == ["betti_1_error", "Dice", "HD95"]  # table metrics only, in table order
    assert [r["status"] for r in summary["runs"]] == ["finished"] * 4
    rows = summary["results"]["synth"]["1"]["variants"]
    assert rows["cedice"]["betti_1_error"]["vs_baseline"] is None
    assert rows["cedice"]["betti_1_error"]["mean"] == pytest.approx(np.mean([4.0, 5.0]))  # seed means 4 and 5
    mark = rows["cldice"]["betti_1_error"]["vs_baseline"]
    assert mark["significant"] and mark["permutation_p"] == pytest.approx(2 / 64)
    assert not rows["cldice"]["Dice"]["vs_baseline"]["significant"]
    assert rows["cldice"]["HD95"]["vs_baseline"]["better"] == "=" and rows["cldice"]["HD95"]["vs_baseline"]["permutation_p"] == 1.0
    resources = summary["resources"]["cldice"]
    assert resources["seconds_per_step"] == pytest.approx(np.mean([1.5, 2.0]))
    assert resources["peak_rss_mib"] == 101.0

    table = list(csv.DictReader(io.StringIO(render_csv(summary))))
    assert [(r["test"], r["variant"]) for r in table] == [("synth", "cedice"), ("synth", "cldice")]
    assert len(table[0]) == 5 + 4 * 3 + 3
    assert table[1]["betti_1_error_mark"] == MARK and table[1]["Dice_mark"] == ""

    write_outputs(load_study(path))
    out = study.output_dir
    def refuse(constant):  # a bare NaN/Infinity: standard JSON parsers (JavaScript's, jq's) refuse it
        raise ValueError(f"study.json holds {constant}")

    assert json.loads((out / "study.json").read_text(), parse_constant=refuse)["baseline"] == "cedice"
    html = (out / "study.html").read_text()
    assert html.count("\u2605") == 2  # the legend and the one significant cell
    assert "data:image/png;base64," in html and "Training resources" in html
    printed = capsys.readouterr().out
    assert f"{MARK}" in printed and "cldice" in printed


def test_summary_of_unfinished_runs(write_study):
    path = write_study()
    study = load_study(path)
    dice = {(c, s): 0.5 for c in CASES for s in (0, 1)}
    _fake_runs(study, {"cedice": {"Dice": dice}, "cldice": {"Dice": dice}})
    failed = study.runs[3]
    (evaluation_dir(failed.run_dir, "synth") / "summary.json").unlink()
    state = json.loads((failed.run_dir / STATE_FILE).read_text())
    state.update(status="failed", error="boom")
    (failed.run_dir / STATE_FILE).write_text(json.dumps(state))
    summary = summarize(load_study(path))
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished", "finished", "failed"]
    assert summary["runs"][3]["error"] == "boom"
    cell = summary["results"]["synth"]["1"]["variants"]["cldice"]["Dice"]
    assert cell["n_seeds"] == 1 and cell["vs_baseline"]["n"] == 3  # only seed 0 pairs


def test_summary_flag_compares_the_finished_runs_and_runs_nothing(write_study, capsys):
    from medseg.cli import main

    path = write_study()
    study = load_study(path)
    dice = {(c, s): 0.5 for c in CASES for s in (0, 1)}
    _fake_runs(study, {"cedice": {"Dice": dice}, "cldice": {"Dice": dice}})
    unstarted = study.runs[3]
    shutil.rmtree(unstarted.run_dir)  # a run the study has not reached yet
    assert main(["study", str(path), "--summary"]) == 0
    assert "summary of 3 finished run(s) of 4; nothing was run" in capsys.readouterr().err
    assert not unstarted.run_dir.exists()  # nothing trained
    summary = json.loads((study.output_dir / "study.json").read_text())
    assert [r["status"] for r in summary["runs"]].count("finished") == 3
    assert summary["results"]["synth"]["1"]["variants"]["cldice"]["Dice"]["n_seeds"] == 1


def test_no_mark_on_a_mean_shown_worse_than_the_baseline(write_study):
    """The test pairs the (case, seed) values defined in both variants; the table shows each
    variant's mean over all of its own. A case the baseline left undefined (both masks
    empty) and the variant scored low gave the variant a mean below the baseline's, with a
    star for being significantly better on the pairs."""
    study = load_study(write_study(alpha=0.25))  # 4 pairs: the exact test's p is 0.125 at best
    base_dice = {k: (math.nan if k[0] == "c2" else 0.8) for k in BASE_BETTI_1}  # c2: undefined in the baseline
    variant_dice = {k: (0.2 if k[0] == "c2" else 0.9) for k in BASE_BETTI_1}  # better on every pair, 0.2 on c2
    values = {"cedice": {"Dice": base_dice, "betti_1_error": BASE_BETTI_1},
              "cldice": {"Dice": variant_dice, "betti_1_error": {k: v - 1 for k, v in BASE_BETTI_1.items()}}}
    _fake_runs(study, values)
    rows = summarize(load_study(study.path))["results"]["synth"]["1"]["variants"]
    base, variant = rows["cedice"]["Dice"], rows["cldice"]["Dice"]
    assert variant["mean"] < base["mean"]  # 0.667 against 0.8, as the table shows them
    test = variant["vs_baseline"]
    assert test["mean_difference"] > 0 and test["permutation_p"] < 0.25  # the pairs alone favour the variant
    assert test["better"] == "baseline" and not test["significant"] and test["paired_only"]
    betti = rows["cldice"]["betti_1_error"]["vs_baseline"]  # means and pairs agree: marked as before
    assert betti["better"] == "variant" and betti["significant"] and "paired_only" not in betti

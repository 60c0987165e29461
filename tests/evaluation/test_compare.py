"""medseg report compare on synthetic evaluations with known paired differences."""

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluation.compare import compare_evaluations, load_evaluation, paired_tests, run_compare


def _summary(path: Path, values: dict[str, dict[str, float]], not_evaluated=(), nnunet=False):
    entries = []
    for case, metrics in values.items():
        entry = {"reference_file": f"/data/labelsTs/{case}.nii.gz", "prediction_file": f"/p/{case}.nii.gz",
                 "metrics": {"1": metrics}}
        if not nnunet:
            entry["case"] = case
        entries.append(entry)
    for case in not_evaluated:
        entries.append({"case": case, "reference_file": f"/data/labelsTs/{case}.nii.gz", "status": "failed"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metric_per_case": entries, "labels": {"1": "vessel"}}))
    return path


CASES = [f"case_{i}" for i in range(8)]
RNG = np.random.default_rng(0)
DICE_A = RNG.uniform(0.6, 0.8, 8)
NOISE = np.array([0.03, -0.02, 0.01, -0.04, 0.02, -0.01, 0.04, -0.03])  # mean 0


@pytest.fixture
def two_runs(tmp_path):
    a = {c: {"Dice": DICE_A[i], "HD95": 5.0, "clDice": 0.7, "betti_matching_error": 4.0} for i, c in enumerate(CASES)}
    b = {c: {"Dice": DICE_A[i] + 0.1, "HD95": 3.0 + i * 0.1, "clDice": 0.7 + NOISE[i], "betti_matching_error": 4.0}
         for i, c in enumerate(CASES)}
    b["case_7"]["HD95"] = float("nan")
    a["only_a"] = dict(a["case_0"])
    b["only_b"] = dict(b["case_0"])
    run_a = tmp_path / "run_a"
    _summary(run_a / "evaluation" / "summary.json", a)
    eval_b = _summary(tmp_path / "eval_b" / "summary.json", b, not_evaluated=["case_broken"], nnunet=True)
    # B: nnU-Net style (case names from reference_file), case_broken only in B and not evaluated
    return run_a, eval_b.parent


def test_paired_tests_known_differences():
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.55, 0.65])
    r = paired_tests(a, a + 0.1)
    assert r["mean_difference"] == pytest.approx(0.1) and r["median_difference"] == pytest.approx(0.1)
    assert r["permutation_p"] == pytest.approx(2 / 64)  # exact: only all-plus and all-minus are as extreme
    assert r["wilcoxon_p"] == pytest.approx(0.03125)  # exact two-sided signed-rank, n=6, all positive
    same = paired_tests(a, a)
    assert same["wilcoxon_p"] == 1.0 and same["permutation_p"] == 1.0
    many = paired_tests(np.zeros(40), np.full(40, 0.01), permutations=500)  # random signs
    assert many["permutation_p"] == pytest.approx(1 / 501)
    assert paired_tests(np.array([]), np.array([]))["n"] == 0


def test_compare_direction_p_values_and_left_out_cases(two_runs):
    run_a, eval_b = two_runs
    result = compare_evaluations(load_evaluation(run_a), load_evaluation(eval_b))
    dice = result["metrics"]["1"]["Dice"]
    assert dice["n"] == 8 and dice["mean_difference"] == pytest.approx(0.1)
    assert dice["permutation_p"] == pytest.approx(2 / 256) and dice["wilcoxon_p"] < 0.01
    assert dice["better"] == "B" and dice["significant"]
    hd = result["metrics"]["1"]["HD95"]
    assert hd["n"] == 7 and hd["undefined"] == 1  # B's NaN leaves the pair out
    assert hd["mean_difference"] == pytest.approx(np.mean([3.0 + i * 0.1 - 5.0 for i in range(7)]))
    assert hd["better"] == "B"  # lower HD95 is better
    cl = result["metrics"]["1"]["clDice"]
    assert cl["mean_difference"] == pytest.approx(0.0, abs=1e-12) and cl["permutation_p"] > 0.5 and cl["wilcoxon_p"] > 0.5
    assert not cl["significant"] and cl["better"] == "="  # equal up to rounding: no better mean
    assert result["metrics"]["1"]["betti_matching_error"]["better"] == "="
    assert result["only_in_a"] == ["only_a"]
    assert result["only_in_b"] == ["case_broken", "only_b"]
    assert result["paired_cases"] == CASES


def test_run_compare_writes_json_html_and_prints_a_table(two_runs, tmp_path, capsys):
    run_a, eval_b = two_runs
    out = tmp_path / "cmp"
    assert main(["report", "compare", str(run_a), str(eval_b / "summary.json"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    dice = next(line for line in printed.splitlines() if line.startswith("Dice "))
    assert header.index("mean B-A") + len("mean B-A") == dice.index("0.1") + len("0.1")  # right-aligned column
    assert "cases only in A (1): only_a" in printed
    assert dice.rstrip().endswith("B *")  # better mean, and significant
    cldice = next(line for line in printed.splitlines() if line.startswith("clDice "))
    assert not cldice.rstrip().endswith("*")
    data = json.loads((out / "compare.json").read_text())
    assert data["metrics"]["1"]["Dice"]["better"] == "B"
    html = (out / "compare.html").read_text()
    assert html.count("<tr><td data-v=\"case_") == 8 and "data:image/png;base64," in html


def test_medseg_own_json_files_are_standard_json():
    """study.json and compare.json held bare NaN (a std over one seed, a metric of empty
    masks), which strict parsers refuse: they are null now; summary.json keeps nnU-Net's NaN."""
    from medseg.evaluation.summary import strict_json

    value = {"a": float("nan"), "b": [1.5, float("inf"), np.float32("nan"), np.int64(3)], "c": (np.float64(-np.inf),),
             "d": np.array([0.5, np.nan]), "e": {"f": None, "g": "NaN"}}
    text = strict_json(value)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "a": None, "b": [1.5, None, None, 3], "c": [None], "d": [0.5, None], "e": {"f": None, "g": "NaN"}}
    assert text.endswith("}\n") and "\n  " in text  # one value per line, as before


def test_compare_the_same_evaluation(two_runs):
    run_a, _ = two_runs
    result = run_compare(run_a, run_a / "evaluation")
    assert all(s["mean_difference"] == 0 and s["permutation_p"] == 1.0 for s in result["metrics"]["1"].values())


@pytest.mark.parametrize("bad", ["missing", "not_json", "no_cases", "empty_dir", "disjoint", "two_evals"])
def test_report_compare_bad_inputs_are_one_line_errors(two_runs, tmp_path, capsys, bad):
    run_a, eval_b = two_runs
    target = tmp_path / bad
    if bad == "not_json":
        target.write_text("case,Dice\n")
    elif bad == "no_cases":
        target.write_text(json.dumps({"mean": {}}))
    elif bad == "empty_dir":
        target.mkdir()
    elif bad == "disjoint":
        _summary(target / "summary.json", {"other": {"Dice": 1.0}})
    elif bad == "two_evals":
        _summary(target / "e1" / "summary.json", {"case_0": {"Dice": 1.0}})
        _summary(target / "e2" / "summary.json", {"case_0": {"Dice": 1.0}})
    code = main(["report", "compare", str(run_a), str(target)])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("medseg: error: ") and str(target) in err
    expected = {"missing": "not found", "not_json": "not a readable summary.json", "no_cases": "metric_per_case",
                "empty_dir": "no summary.json", "disjoint": "no case is evaluated in both", "two_evals": "several evaluations"}
    assert expected[bad] in err


def test_most_different_cases_ranks_by_the_topology_error():
    result = {"per_case": {"1": {
        "c0": {"betti_matching_error": [4.0, 4.0]},   # equal: never pictured
        "c1": {"betti_matching_error": [3.0, 1.0]},
        "c2": {"betti_matching_error": [1.0, 6.0]},
        "c3": {"betti_matching_error": [2.0, float("nan")]},
    }, "2": {"c0": {"betti_error": [1.0, 0.0]}}}}
    from medseg.evaluation.compare import most_different_cases

    assert most_different_cases(result, 5) == [("1", "c2", "betti_matching_error", 1.0, 6.0),
                                               ("1", "c1", "betti_matching_error", 3.0, 1.0),
                                               ("2", "c0", "betti_error", 1.0, 0.0)]
    assert most_different_cases(result, 1)[0][1] == "c2" and most_different_cases(result, 0) == []


def _ring(broken: bool) -> np.ndarray:
    """A 24x24 square ring (1 component, 1 loop); broken: the prediction cut it once and left a speck."""
    mask = np.zeros((24, 24), np.uint8)
    mask[4:20, 4:20] = 1
    mask[7:17, 7:17] = 0
    if broken:
        mask[4:7, 11:13] = 0  # the cut opens the loop
        mask[22, 22] = 1      # and a stray pixel is one extra component
    return mask


def test_compare_html_pictures_the_cases_whose_topology_differs(tmp_path, capsys):
    """Real masks through medseg evaluate: A broke case_b, B did not; compare.html pictures case_b only."""
    from medseg.data.io import ImageGeometry, write_image
    from medseg.evaluation.evaluate import run_evaluation

    folders = {name: tmp_path / name for name in ("labelsTs", "pred_a", "pred_b")}
    for case, a_broken in (("case_a", False), ("case_b", True)):
        for name, mask in (("labelsTs", _ring(False)), ("pred_a", _ring(a_broken)), ("pred_b", _ring(False))):
            write_image(folders[name] / f"{case}.png", mask, ImageGeometry.identity(mask.shape))
    for run in ("a", "b"):
        assert run_evaluation(folders[f"pred_{run}"], folders["labelsTs"], tmp_path / f"eval_{run}", connectivity=8,
                              metrics="dice,betti,betti_matching", report=False)
    out = tmp_path / "cmp"
    assert main(["report", "compare", str(tmp_path / "eval_a"), str(tmp_path / "eval_b"), "--output", str(out)]) == 0
    html = (out / "compare.html").read_text()
    assert "Cases that differ most" in html
    assert html.count('<figure class="worst"') == 1 and 'data-case="case_b"' in html
    assert "A: misses 1 loop of the reference, adds 1 component" in html  # the cut loop, the speck
    assert "B: misses nothing of the reference, adds nothing" in html
    assert "betti_matching_error A 2, B 0" in html
    none = tmp_path / "cmp0"
    assert main(["report", "compare", str(tmp_path / "eval_a"), str(tmp_path / "eval_b"), "--output", str(none),
                 "--pictured-cases", "0"]) == 0
    assert '<figure class="worst"' not in (none / "compare.html").read_text()
    capsys.readouterr()
    assert main(["report", "compare", str(tmp_path / "eval_a"), str(tmp_path / "eval_b"), "--pictured-cases", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pictured-cases -1" in err[0]


def _with(path: Path, conventions: dict | None = None, references: Path | None = None) -> Path:
    """The summary at ``path`` with ``conventions`` set and reference files under ``references``."""
    data = json.loads(path.read_text())
    if conventions is not None:
        data["conventions"] = conventions
    if references is not None:
        for entry in data["metric_per_case"]:
            name = Path(entry["reference_file"]).name
            entry["reference_file"] = str(references / name)
    path.write_text(json.dumps(data))
    return path


def test_evaluations_under_other_settings_or_references_are_not_paired(tmp_path, capsys):
    """compare paired cases by name even when they were scored against other reference files,
    and NSD at 1 mm with NSD at 5 mm, and printed 'better' verdicts (exit 0)."""
    values = {c: {"Dice": 0.8, "nsd": 0.9} for c in CASES}
    a = _summary(tmp_path / "a" / "summary.json", values)
    b = _summary(tmp_path / "b" / "summary.json", values)
    _with(a, {"connectivity": 26, "nsd_tolerance_mm": 1.0})
    _with(b, {"connectivity": 26, "nsd_tolerance_mm": 5.0})
    assert main(["report", "compare", str(a), str(b)]) == 3
    assert "evaluated with different nsd_tolerance_mm (1.0 and 5.0)" in capsys.readouterr().err
    _with(b, {"connectivity": 26, "nsd_tolerance_mm": 1.0})
    refs_a, refs_b, moved = tmp_path / "refs_a", tmp_path / "refs_b", tmp_path / "moved"
    for folder, content in ((refs_a, b"one"), (refs_b, b"two"), (moved, b"one")):
        folder.mkdir()
        for case in CASES:
            (folder / f"{case}.nii.gz").write_bytes(content)
    _with(a, references=refs_a)
    _with(b, references=refs_b)
    assert main(["report", "compare", str(a), str(b)]) == 3
    assert "scored against" in capsys.readouterr().err
    _with(b, references=moved)  # the same labels, moved: compared
    assert main(["report", "compare", str(a), str(b)]) == 0
    _with(b, references=tmp_path / "gone")  # unreadable: compared, with a warning
    assert main(["report", "compare", str(a), str(b)]) == 0
    assert "cannot be read to check" in capsys.readouterr().err


def test_same_evaluation_twice_warns_and_unwritable_output_is_one_line(two_runs, tmp_path, capsys):
    run_a, _ = two_runs
    assert main(["report", "compare", str(run_a), str(run_a)]) == 0
    assert "A and B are the same evaluation" in capsys.readouterr().err
    code = main(["report", "compare", str(run_a), str(run_a), "--output", "/proc/medseg_compare"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "output" in err


def test_no_numeric_metric_in_common(tmp_path, capsys):
    a = _summary(tmp_path / "a" / "summary.json", {c: {"Dice": 0.8} for c in CASES})
    b = _summary(tmp_path / "b" / "summary.json", {c: {"HD95": 2.0} for c in CASES})
    assert main(["report", "compare", str(a), str(b)]) == 3
    assert "no numeric metric in common" in capsys.readouterr().err


def test_evaluations_under_other_ignore_labels_or_label_names_are_not_paired(tmp_path, capsys):
    """The same predictions scored with and without dataset.json's ignore label differ in
    every metric; compare printed those differences as verdicts."""
    values = {c: {"Dice": 0.8} for c in CASES}
    a = _summary(tmp_path / "a" / "summary.json", values)
    b = _summary(tmp_path / "b" / "summary.json", values)
    for path, ignore, name in ((a, 4, "vessel"), (b, None, "vessel")):
        summary = json.loads(path.read_text())
        summary.update(ignore_label=ignore, labels={"1": name})
        path.write_text(json.dumps(summary))
    assert main(["report", "compare", str(a), str(b)]) == 3
    assert "different ignore labels (4 and None)" in capsys.readouterr().err
    summary = json.loads(b.read_text())
    summary.update(ignore_label=4, labels={"1": "artery"})
    b.write_text(json.dumps(summary))
    assert main(["report", "compare", str(a), str(b)]) == 3
    assert "label 1 is 'vessel' in A and 'artery' in B" in capsys.readouterr().err
    summary["labels"] = {"1": "vessel"}
    b.write_text(json.dumps(summary))
    assert main(["report", "compare", str(a), str(b)]) == 0


def test_equal_means_up_to_rounding_are_equal_and_case_names_are_shown_as_named(tmp_path):
    """Means of 0.1/0.7/0.3 and 0.2/0.6/0.3 differ by 9e-18: "better mean B" was shown
    (and "A" for HD95); case '001' was shown as '1' and 'NaN' as 'nan' in the pages."""
    from medseg.evaluation._page import fmt

    names = ["001", "1.50", "NaN"]
    a = {n: {"Dice": d, "HD95": h} for n, d, h in zip(names, [0.1, 0.7, 0.3], [1.0, 2.0, 3.0])}
    b = {n: {"Dice": d, "HD95": h} for n, d, h in zip(names, [0.2, 0.6, 0.3], [2.0, 1.0, 3.0])}
    run_a = _summary(tmp_path / "a" / "summary.json", a).parent
    run_b = _summary(tmp_path / "b" / "summary.json", b).parent
    result = compare_evaluations(load_evaluation(run_a), load_evaluation(run_b))
    rows = result["metrics"]["1"]
    assert abs(rows["Dice"]["mean_difference"]) < 1e-15 and rows["Dice"]["better"] == "="
    assert rows["HD95"]["better"] == "="
    run_compare(run_a, run_b, output=tmp_path / "cmp")
    page = (tmp_path / "cmp" / "compare.html").read_text()
    for name in names:
        assert f">{name}<" in page
    assert fmt("001") == "001" and fmt(0.99996) == "0.99996" and fmt(1.0) == "1" and fmt(0.5) == "0.5"


def test_a_study_run_folder_stands_for_its_evaluation(two_runs, tmp_path, capsys):
    """A study's run keeps its evaluations in evaluation/TEST/: compare said 'no summary.json
    in it' and told the user to evaluate again."""
    run_a, _ = two_runs
    study_run = tmp_path / "cldice" / "seed_0"
    summary = json.loads(next(run_a.rglob("summary.json")).read_text())
    (study_run / "evaluation" / "in_distribution").mkdir(parents=True)
    (study_run / "evaluation" / "in_distribution" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", "compare", str(run_a), str(study_run)]) == 0
    capsys.readouterr()
    (study_run / "evaluation" / "validation").mkdir()
    (study_run / "evaluation" / "validation" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", "compare", str(run_a), str(study_run)]) == 3
    err = capsys.readouterr().err.strip()
    assert err == (f"medseg: error: {study_run}: several evaluations in it (evaluation/in_distribution, "
                   f"evaluation/validation); pass the one to compare, e.g. {study_run / 'evaluation' / 'in_distribution'}")


def test_a_run_with_both_masks_empty_counts_as_agreeing_where_the_other_run_has_a_value(tmp_path):
    """Run B invents a rare label in 3 of 4 cases whose reference has none: A's Dice and HD95
    are undefined there (both masks empty), and the pairs were dropped, so Dice compared as
    '=' on the one remaining case while B's own mean was 0.25."""
    nan = float("nan")
    empty = {"Dice": nan, "HD95": nan, "betti_error": 0.0, "n_ref": 0, "n_pred": 0}
    invented = {"Dice": 0.0, "HD95": 41.6, "betti_error": 1.0, "n_ref": 0, "n_pred": 30}
    present = {"Dice": 1.0, "HD95": 0.0, "betti_error": 0.0, "n_ref": 50, "n_pred": 50}
    a = {"c0": present, "c1": empty, "c2": empty, "c3": empty}
    b = {"c0": present, "c1": invented, "c2": invented, "c3": invented}
    run_a = _summary(tmp_path / "a" / "summary.json", a).parent
    run_b = _summary(tmp_path / "b" / "summary.json", b).parent
    rows = compare_evaluations(load_evaluation(run_a), load_evaluation(run_b))["metrics"]["1"]
    assert rows["Dice"]["n"] == 4 and rows["Dice"]["mean_a"] == 1.0 and rows["Dice"]["mean_b"] == 0.25
    assert rows["Dice"]["better"] == "A" and rows["HD95"]["better"] == "A" and rows["HD95"]["n"] == 4
    # both runs with both masks empty on a case: no information, still left out
    both = compare_evaluations(load_evaluation(run_a), load_evaluation(run_a))["metrics"]["1"]
    assert both["Dice"]["n"] == 1 and both["Dice"]["undefined"] == 3

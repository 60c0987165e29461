"""medseg evaluate on hand-made masks whose Dice, HD95 and Betti errors are known."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.io import ImageGeometry, write_image
from medseg.evaluation.evaluate import run_evaluation

SPACING = (2.0, 1.0, 1.0)
SHAPE = (12, 12, 12)


def _geometry(shape=SHAPE, spacing=SPACING):
    return ImageGeometry.from_spacing(shape, spacing, origin=(-10.0, 5.0, 3.0))


def _write(folder: Path, case: str, array, geometry=None):
    array = np.asarray(array, dtype=np.uint8)
    write_image(folder / f"{case}.nii.gz", array, geometry or _geometry(array.shape))


def _cube(lo, hi, shape=SHAPE, value=1):
    a = np.zeros(shape, np.uint8)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return a


def _hollow_sphere(shape=SHAPE):
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    r2 = (grid**2).sum(0)
    return ((r2 <= 25) & (r2 > 6)).astype(np.uint8)


def _dataset_json(root: Path, labels):
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MR"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"})
    )


@pytest.fixture
def folders(tmp_path):
    ref, pred, out = tmp_path / "labelsTs", tmp_path / "pred", tmp_path / "eval"
    ref.mkdir()
    pred.mkdir()
    _dataset_json(tmp_path, {"background": 0, "vessel": 1, "tumour": 2})
    return ref, pred, out


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _case(summary, name):
    return next(c for c in summary["metric_per_case"] if c["case"] == name)


def test_known_dice_hd95_and_betti(folders):
    ref, pred, out = folders
    # Dice: 4x4x4 cube against the same cube shifted one voxel: overlap 48 of 64+64.
    _write(ref, "shift", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "shift", _cube((3, 2, 2), (7, 6, 6)))
    # HD95: one-voxel slabs 3 voxels apart along axis 0, whose spacing is 2 mm: 6 mm.
    _write(ref, "slabs", _cube((2, 1, 1), (3, 11, 11)))
    _write(pred, "slabs", _cube((5, 1, 1), (6, 11, 11)))
    # Betti: a hollow sphere (1, 0, 1) against two blobs (2, 0, 0).
    _write(ref, "topo", _hollow_sphere())
    _write(pred, "topo", _cube((1, 1, 1), (3, 3, 3)) | _cube((8, 8, 8), (10, 10, 10)))

    assert run_evaluation(pred, ref, out, workers=1) is True
    summary = _summary(out)
    shift = _case(summary, "shift")["metrics"]["1"]
    assert shift["Dice"] == pytest.approx(0.75)
    assert (shift["TP"], shift["FP"], shift["FN"]) == (48, 16, 16)
    assert shift["betti_error"] == 0

    slabs = _case(summary, "slabs")["metrics"]["1"]
    assert slabs["Dice"] == 0.0
    assert slabs["HD95"] == pytest.approx(6.0)

    topo = _case(summary, "topo")["metrics"]["1"]
    assert [topo[f"betti_{k}_ref"] for k in range(3)] == [1, 0, 1]
    assert [topo[f"betti_{k}_pred"] for k in range(3)] == [2, 0, 0]
    assert [topo[f"betti_{k}_error"] for k in range(3)] == [1, 0, 1]
    assert topo["betti_error"] == 2

    # Label 2 is declared but absent everywhere: Dice NaN (nnU-Net), HD95 NaN, counted.
    tumour = shift = _case(summary, "shift")["metrics"]["2"]
    assert math.isnan(tumour["Dice"]) and math.isnan(tumour["HD95"])
    assert tumour["betti_error"] == 0
    assert summary["empty_cases"]["2"]["reference_and_prediction_empty"] == ["shift", "slabs", "topo"]
    assert math.isnan(summary["mean"]["2"]["Dice"])

    mean_dice = np.mean([0.75, 0.0, _case(summary, "topo")["metrics"]["1"]["Dice"]])
    assert summary["mean"]["1"]["Dice"] == pytest.approx(mean_dice)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(mean_dice)  # NaN label skipped
    assert summary["conventions"]["connectivity"] == 26
    assert summary["conventions"]["hd95_units"] == "mm"
    assert summary["conventions"]["volume_units"] == "mm^3"
    assert summary["missing_predictions"] == [] and summary["failed_cases"] == {}
    assert summary["labels"] == {"1": "vessel", "2": "tumour"}
    made = summary["provenance"]  # medseg.provenance: the build and the command that computed it
    assert made["medseg"] and made["engine"]["cpu"] and made["device"] == "cpu" and made["command"] and made["time"]

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 * 2
    assert {r["status"] for r in rows} == {"ok"}
    assert float(next(r for r in rows if r["case"] == "shift" and r["label"] == "1")["Dice"]) == pytest.approx(0.75)


def test_one_sided_empty_hd95_is_image_diagonal(folders):
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (5, 5, 5)))
    _write(pred, "a", np.zeros(SHAPE))
    assert run_evaluation(pred, ref, out, workers=1)
    metrics = _case(_summary(out), "a")["metrics"]["1"]
    assert metrics["Dice"] == 0.0
    assert metrics["HD95"] == pytest.approx(np.linalg.norm(np.array(SHAPE) * np.array(SPACING)))


def test_connectivity_changes_betti_numbers(folders):
    ref, pred, out = folders
    corner = np.zeros(SHAPE, np.uint8)
    corner[3, 3, 3] = corner[4, 4, 4] = 1
    _write(ref, "a", corner)
    _write(pred, "a", _cube((3, 3, 3), (5, 5, 5)))
    assert run_evaluation(pred, ref, out, connectivity=26, workers=1)
    assert _case(_summary(out), "a")["metrics"]["1"]["betti_0_error"] == 0
    assert run_evaluation(pred, ref, out, connectivity=6, workers=1)
    summary = _summary(out)
    assert _case(summary, "a")["metrics"]["1"]["betti_0_error"] == 1
    assert summary["conventions"]["connectivity"] == 6


def test_missing_and_broken_cases_are_reported_and_others_evaluated(folders):
    ref, pred, out = folders
    good = _cube((2, 2, 2), (6, 6, 6))
    for case in ("good", "missing", "shape", "affine", "truncated"):
        _write(ref, case, good)
    _write(pred, "good", good)
    _write(pred, "shape", np.zeros((12, 12, 11)))
    _write(pred, "affine", good, ImageGeometry.from_spacing(SHAPE, (2.0, 1.0, 1.5)))
    _write(pred, "truncated", good)
    data = (pred / "truncated.nii.gz").read_bytes()
    (pred / "truncated.nii.gz").write_bytes(data[: len(data) // 2])

    assert run_evaluation(pred, ref, out, workers=1) is False
    summary = _summary(out)
    assert summary["missing_predictions"] == ["missing"]
    assert set(summary["failed_cases"]) == {"shape", "affine", "truncated"}
    assert "shape" in summary["failed_cases"]["shape"] and "(12, 12, 11)" in summary["failed_cases"]["shape"]
    assert "affine" in summary["failed_cases"]["affine"]
    assert "truncated.nii.gz" in summary["failed_cases"]["truncated"]
    assert _case(summary, "good")["metrics"]["1"]["Dice"] == 1.0
    assert _case(summary, "missing")["status"] == "missing"
    assert summary["num_cases"] == 5 and summary["num_evaluated"] == 1
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["case"]: r["status"] for r in rows} == {
        "good": "ok", "missing": "missing", "shape": "failed", "affine": "failed", "truncated": "failed"
    }


def test_parallel_workers_give_the_same_summary(folders):
    ref, pred, out = folders
    for i in range(3):
        _write(ref, f"c{i}", _cube((1, 1, 1), (4 + i, 5, 5)))
        _write(pred, f"c{i}", _cube((1, 1, 1), (5, 5, 4 + i)))
    assert run_evaluation(pred, ref, out / "serial", workers=1)
    assert run_evaluation(pred, ref, out / "parallel", workers=2)
    serial, parallel = _summary(out / "serial"), _summary(out / "parallel")
    assert json.dumps(serial["mean"]) == json.dumps(parallel["mean"])
    assert [c["case"] for c in serial["metric_per_case"]] == [c["case"] for c in parallel["metric_per_case"]]


def test_labels_from_the_data_without_dataset_json(tmp_path, capsys):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref.mkdir()
    pred.mkdir()
    a = _cube((1, 1, 1), (4, 4, 4)) + _cube((6, 6, 6), (9, 9, 9), value=3)
    _write(ref, "a", a)
    _write(pred, "a", a)
    assert run_evaluation(pred, ref, out, workers=1)
    summary = _summary(out)
    assert sorted(summary["mean"]) == ["1", "3"]
    assert summary["mean"]["3"]["Dice"] == 1.0
    # said: an ignore label (3 here, maybe) would be scored as a class without a word
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "no dataset.json" in ln]
    assert len(warning) == 1 and "every label value found (1, 3) is scored as a class" in warning[0]


def test_explicit_dataset_json_and_ignore_label(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref.mkdir()
    pred.mkdir()
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "vessel": 1, "ignore": 4}}))
    ref_array = _cube((1, 1, 1), (4, 4, 4)) + _cube((6, 6, 6), (9, 9, 9), value=4)
    pred_array = _cube((1, 1, 1), (4, 4, 4)) + _cube((6, 6, 6), (9, 9, 9), value=1)  # inside ignore: not counted
    _write(ref, "a", ref_array)
    _write(pred, "a", pred_array)
    assert run_evaluation(pred, ref, out, dataset_json=labels, workers=1)
    summary = _summary(out)
    assert list(summary["mean"]) == ["1"]
    assert summary["mean"]["1"]["Dice"] == 1.0
    assert summary["ignore_label"] == 4
    # TN leaves the ignored voxels out, as nnU-Net's compute_tp_fp_fn_tn does
    counts = summary["metric_per_case"][0]["metrics"]["1"]
    ignored = int(np.count_nonzero(ref_array == 4))
    assert counts["TN"] == ref_array.size - ignored - counts["TP"] - counts["FP"] - counts["FN"]


def test_2d_png_masks(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 1
    ring[4, 4] = 0
    filled = ring.copy()
    filled[4, 4] = 1
    write_image(ref / "a.png", ring, ImageGeometry.identity(ring.shape))
    write_image(pred / "a.png", filled, ImageGeometry.identity(ring.shape))
    assert run_evaluation(pred, ref, out, workers=1)
    metrics = _case(_summary(out), "a")["metrics"]["1"]
    assert [metrics["betti_0_error"], metrics["betti_1_error"]] == [0, 1]
    assert "betti_2_error" not in metrics
    assert metrics["Dice"] == pytest.approx(2 * 24 / (24 + 25))
    # a 2D image's "volumes" are areas: the summary said mm^3
    assert metrics["volume_ref_mm3"] == 24.0 and metrics["volume_pred_mm3"] == 25.0
    # PNGs store no spacing: the distances and areas are in pixels (the summary said mm)
    conventions = _summary(out)["conventions"]
    assert conventions["volume_units"] == "pixels (areas of 2D images without spacing, in the *_mm3 columns)"
    assert conventions["hd95_units"].startswith("pixels (.png files store no spacing")


def test_cli_exit_codes_and_one_line_errors(folders, capsys):
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(ref, "b", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "a", _cube((2, 2, 2), (6, 6, 6)))
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1"]
    _write(pred, "c_typo", _cube((2, 2, 2), (6, 6, 6)))
    assert main(args) == 1  # b is missing
    err = capsys.readouterr().err
    assert "missing prediction for case b" in err
    assert "1 prediction(s) without a reference, not evaluated: c_typo.nii.gz" in err
    (pred / "c_typo.nii.gz").unlink()
    _write(pred, "b", _cube((2, 2, 2), (6, 6, 6)))
    assert main(args) == 0
    assert main(["evaluate", "--pred", str(pred / "nope"), "--ref", str(ref), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    assert main(args + ["--connectivity", "5"]) != 0
    assert "--connectivity 5" in capsys.readouterr().err
    # a 2D connectivity on 3D images: every case failed, one line each; now one line up front
    assert main(args + ["--connectivity", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medseg: error: --connectivity 8: does not fit the 3D references (first: {ref / 'a.nii.gz'}); "
                   "use 26 or 6"]
    empty = ref.parent / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(pred), "--ref", str(empty), "--output", str(out)]) == 3
    assert "no reference files" in capsys.readouterr().err


def test_bad_counts_and_a_missing_images_folder_are_refused(folders, capsys):
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "a", _cube((2, 2, 2), (6, 6, 6)))
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out)]
    for extra, needle in ((["--workers", "0"], "--workers 0: must be at least 1"),
                          (["--worst-cases", "-1"], "--worst-cases -1: must be a whole number"),
                          (["--images", str(ref.parent / "nope")], "nope: folder not found")):
        assert main(args + extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0]
    assert not out.exists()


def test_label_values_dataset_json_does_not_declare_fail_the_case(folders, capsys):
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(ref, "b", _cube((2, 2, 2), (6, 6, 6)))
    odd = _cube((2, 2, 2), (6, 6, 6))
    odd[0, 0, 0] = 7  # dataset.json declares 0, 1, 2
    _write(pred, "a", odd)
    _write(pred, "b", _cube((2, 2, 2), (6, 6, 6)))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1",
                 "--no-report"]) == 1
    assert "a.nii.gz: label values [7] are not declared in dataset.json" in capsys.readouterr().err
    summary = _summary(out)
    assert list(summary["failed_cases"]) == ["a"] and "label values [7]" in summary["failed_cases"]["a"]


def test_msd_style_labels(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "vessel", "2": "tumour"}}))
    _write(ref, "a", _cube((1, 1, 1), (4, 4, 4)))
    _write(pred, "a", _cube((1, 1, 1), (4, 4, 4)))
    assert run_evaluation(pred, ref, out, workers=1)
    assert _summary(out)["labels"] == {"1": "vessel", "2": "tumour"}


def test_metrics_subset_tolerance_and_statistics(folders, capsys):
    ref, pred, out = folders
    _write(ref, "shift", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "shift", _cube((3, 2, 2), (7, 6, 6)))  # shifted 2 mm along axis 0
    _write(ref, "same", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "same", _cube((2, 2, 2), (6, 6, 6)))
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1"]
    assert main(args + ["--metrics", "dice,nsd", "--tolerance-mm", "2.0", "--no-report"]) == 0
    summary = _summary(out)
    assert summary["metrics_computed"] == ["dice", "surface_dice"]
    assert summary["conventions"]["nsd_tolerance_mm"] == 2.0
    shift = _case(summary, "shift")["metrics"]["1"]
    assert set(shift) == {"Dice", "NSD", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}
    assert shift["NSD"] == 1.0  # every boundary voxel is within 2 mm of the other boundary
    assert not (out / "report.html").exists()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "HD95" not in header and "betti_error" not in header and "NSD" in header
    # statistics per label: label 2 is absent everywhere, so every Dice is undefined
    stats = summary["statistics"]
    assert stats["1"]["Dice"]["n"] == 2 and stats["1"]["Dice"]["median"] == pytest.approx((0.75 + 1.0) / 2)
    assert stats["2"]["Dice"]["n"] == 0 and stats["2"]["Dice"]["n_undefined"] == 2
    capsys.readouterr()

    assert main(args + ["--metrics", "dice,hausdorff"]) == 2  # a bad argument, as argparse's usage errors
    err = capsys.readouterr().err
    assert "unknown metric 'hausdorff'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--tolerance-mm", "-1"]) == 2
    assert "--tolerance-mm" in capsys.readouterr().err


def test_report_is_written_with_the_summary(folders):
    ref, pred, out = folders
    for i in range(3):
        _write(ref, f"c{i}", _cube((1, 1, 1), (4 + i, 5, 5)))
        _write(pred, f"c{i}", _cube((1, 1, 1), (5, 5, 4 + i)))
    assert run_evaluation(pred, ref, out, workers=1, metrics="dice,betti")
    text = (out / "report.html").read_text()
    assert text.count('<tr><td data-v="c') == 3  # one row per case in the per-case table
    assert "Dice [vessel]" in text and "Dice [tumour]" in text  # two labels: one column each


def test_the_summary_does_not_depend_on_the_order_workers_finish_in(tmp_path):
    """Parallel workers hand their cases back in completion order; the statistics must be
    taken in the references' order (a float sum depends on its order)."""
    from medseg.evaluation.evaluate import _summary

    # seven Dice values whose float mean differs in the last digit when summed backwards
    dice = [0.8444218515250481, 0.7579544029403025, 0.420571580830845, 0.25891675029296335, 0.5112747213686085,
            0.4049341374504143, 0.7837985890347726]
    assert np.mean(dice) != np.mean(dice[::-1])
    values = dict(zip("abcdefg", dice))
    references = {c: tmp_path / f"{c}.nii.gz" for c in values}

    def summary(order):
        per_case = {c: {"1": {"dice": values[c], "n_ref": 1, "n_pred": 1}} for c in order}
        return _summary(references, tmp_path, ".nii.gz", per_case, set(), {}, {1: "vessel"}, None, "test", {})

    forward, backward = summary(list(values)), summary(list(values)[::-1])
    assert json.dumps(forward["mean"]) == json.dumps(backward["mean"])
    assert json.dumps(forward["statistics"]) == json.dumps(backward["statistics"])
    assert [c["case"] for c in backward["metric_per_case"]] == list(values)


def test_a_second_evaluation_into_the_same_output_is_refused(folders, capsys):
    """Two evaluations at once into one --output mixed their files (one's summary.json
    beside the other's metrics.csv), both exiting 0."""
    from medseg.cli import main
    from medseg.runfolder.lock import RunFolderLock

    ref, pred, out = folders
    _write(ref, "c0", _cube((1, 1, 1), (4, 5, 5)))
    _write(pred, "c0", _cube((1, 1, 1), (5, 5, 4)))
    with RunFolderLock(out, "--output") as running:
        running.take()
        code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert sorted(p.name for p in out.iterdir()) == [".medseg.lock"]  # nothing written
    assert code != 0 and err[-1].endswith(f"--output {out}: in use by another medseg process; wait for it to finish "
                                          "or choose another --output")
    assert not out.exists()  # its holder made the folder and wrote nothing: it leaves nothing
    assert run_evaluation(pred, ref, out, workers=1)


def test_a_page_that_cannot_be_written_loses_no_results(folders, monkeypatch, capsys):
    """The page used to be drawn first and written with the results, all or none: a full
    disk or an out-of-memory while drawing it lost the whole evaluation. The results are
    written first now; the page's failure is one line saying where they are, and no page
    of an earlier evaluation is left beside them."""
    import errno
    import json

    import medseg.evaluation.report as report

    ref, pred, out = folders
    _write(ref, "c0", _cube((1, 1, 1), (4, 5, 5)))
    _write(pred, "c0", _cube((1, 1, 1), (5, 5, 4)))
    assert run_evaluation(pred, ref, out, workers=1, metrics="dice")
    assert (out / "report.html").is_file()

    class FullDisk(str):
        def encode(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("their Betti matching needs about 35.0 GB")

    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1"]
    for render, reason in ((lambda *a, **k: FullDisk("<html>"), "not written (No space left on device)"),
                           (out_of_memory, "not drawn, out of memory (their Betti matching needs about 35.0 GB)")):
        monkeypatch.setattr(report, "render_report", render)
        assert main([*args, "--metrics", "dice,betti"]) == 1  # another summary than the one in the folder
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in captured.err
        assert err[0].startswith(f"medseg: error: {out / 'report.html'}: {reason}; the results are in "
                                 f"{out / 'summary.json'} and metrics.csv; `medseg report html {out}` draws the page")
        assert "evaluated 1/1 cases" in captured.out and "(summary.json, metrics.csv)" in captured.out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["metrics_computed"] == ["dice", "betti"]  # the new evaluation's
        assert "betti_error" in (out / "metrics.csv").read_text().splitlines()[0]
        assert sorted(p.name for p in out.iterdir()) == [".medseg.lock", "metrics.csv", "summary.json"]  # no old page, no temporary
        (out / "summary.json").unlink()
    monkeypatch.undo()
    assert main(["report", "html", str(out)]) != 0  # the summary was removed above: nothing to draw
    assert main([*args, "--metrics", "dice"]) == 0 and (out / "report.html").is_file()


def test_a_full_disk_while_the_results_are_written_replaces_neither(folders, monkeypatch):
    """summary.json and metrics.csv are one group: a full disk leaves the old pair whole."""
    import errno

    import medseg.evaluation.evaluate as evaluate

    ref, pred, out = folders
    _write(ref, "c0", _cube((1, 1, 1), (4, 5, 5)))
    _write(pred, "c0", _cube((1, 1, 1), (5, 5, 4)))
    assert run_evaluation(pred, ref, out, workers=1, metrics="dice", report=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_csv = evaluate._csv

    class FullDisk(str):
        def encode(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "_csv", lambda *a, **k: FullDisk(real_csv(*a, **k)))
    with pytest.raises(OSError, match="No space left on device"):
        run_evaluation(pred, ref, out, workers=1)  # all metrics: another summary
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.pop(evaluate.CaseJournal.NAME)  # the case evaluated, kept for the rerun
    assert after == before  # no temporary, nothing replaced


def test_an_evaluation_of_no_case_keeps_the_earlier_one(folders, capsys):
    # every case fails (predictions of another shape): the good summary in the folder stays
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "a", _cube((2, 2, 2), (6, 6, 6)))
    assert run_evaluation(pred, ref, out, workers=1, metrics="dice", report=False)
    before = (out / "summary.json").read_bytes()
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1"]
    other = pred.parent / "other"
    _write(other, "a", np.zeros((5, 5, 5)))
    assert main([*args[:2], str(other), *args[3:]]) == 3  # a data error, where 1 says some cases failed
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no case could be evaluated (0 missing, 1 failed" in err
    assert "Traceback" not in err
    assert (out / "summary.json").read_bytes() == before
    # so does a prediction folder without any of the cases
    empty = pred.parent / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--ref", str(ref), "--output", str(out), "--workers", "1"]) == 3
    assert "no case could be evaluated (1 missing, 0 failed; first: missing prediction for case a" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


def test_files_of_background_alone_without_dataset_json_are_refused(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    _write(ref, "a", np.zeros(SHAPE))
    _write(pred, "a", np.zeros(SHAPE))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "no foreground label value" in err and "--dataset-json" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_no_report_removes_an_earlier_evaluations_page(folders):
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "a", _cube((2, 2, 2), (6, 6, 6)))
    run_evaluation(pred, ref, out, workers=1, metrics="dice")
    assert (out / "report.html").is_file()
    run_evaluation(pred, ref, out, workers=1, metrics="dice", report=False)
    assert not (out / "report.html").exists() and (out / "summary.json").is_file()


def test_output_in_the_reference_folder_or_the_dataset_is_refused(folders, capsys):
    """evaluate wrote summary.json, metrics.csv, report.html and its lock into labelsTs."""
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "a", _cube((2, 2, 2), (6, 6, 6)))
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--workers", "1", "--metrics", "dice"]
    dataset = ref.parent
    for where, problem in ((ref, f"lies in the reference folder {ref}"), (ref / "eval", "lies in the reference folder"),
                           (dataset / "imagesTs" / "eval", f"lies in the dataset's imagesTs folder ({dataset / 'imagesTs'})")):
        assert main([*args, "--output", str(where)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--output" in err[0] and problem in err[0]
    assert sorted(p.name for p in ref.iterdir()) == ["a.nii.gz"] and not (dataset / "imagesTs").exists()
    assert main([*args, "--output", str(pred)]) == 0  # beside the predictions, as nnU-Net writes its summary
    assert (pred / "summary.json").is_file()


def test_many_missing_cases_are_listed_up_to_ten_then_counted(folders, capsys):
    """A prediction folder of the wrong test group printed one line per reference (50)."""
    ref, pred, out = folders
    for i in range(13):
        _write(ref, f"c{i:02d}", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred, "c00", _cube((2, 2, 2), (6, 6, 6)))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), "--workers", "1",
                 "--metrics", "dice"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" (")[0] for line in err] == [f"medseg: missing prediction for case c{i:02d}" for i in range(1, 11)] + [
        "medseg: ... and 2 more"]
    assert len(_summary(out)["missing_predictions"]) == 12  # every one in the summary


def test_an_evaluation_that_writes_nothing_leaves_no_folder(folders, capsys):
    """Failed evaluations left their --output holding only .medseg.lock."""
    ref, pred, out = folders
    _write(ref, "a", _cube((2, 2, 2), (6, 6, 6)))
    _write(pred.parent / "other", "a", np.zeros((5, 5, 5)))  # every case fails
    deep = out / "x" / "y"
    assert main(["evaluate", "--pred", str(pred.parent / "other"), "--ref", str(ref), "--output", str(deep),
                 "--workers", "1"]) == 3
    assert "no case could be evaluated" in capsys.readouterr().err
    assert not out.exists()  # the folders it made, none of them left
    out.mkdir()  # a folder of the user's own stays, empty
    assert main(["evaluate", "--pred", str(pred.parent / "other"), "--ref", str(ref), "--output", str(out),
                 "--workers", "1"]) == 3
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_lock_removed_by_its_holder_is_not_taken_by_two(tmp_path):
    """The lock file goes with a folder its holder made and left empty: a process that
    opened the old file meanwhile must not hold a lock nobody else can see."""
    import fcntl
    import os

    from medseg.runfolder.lock import LOCK_FILE, RunFolderLock

    run = tmp_path / "run"
    first = RunFolderLock(run)
    first.take()
    stale = os.open(run / LOCK_FILE, os.O_RDWR)  # what a second taker opened before the first let go
    first.release()
    assert not run.exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it can lock the removed file...
    second = RunFolderLock(run)
    second.take()  # ...but a taker locks the file at the path, made anew
    assert (run / LOCK_FILE).is_file() and os.fstat(stale).st_nlink == 0
    with pytest.raises(Exception, match="in use by another medseg process"):
        RunFolderLock(run).take()
    second.release()
    os.close(stale)


def test_an_interrupted_evaluation_resumes_with_the_cases_left(folders, monkeypatch, capsys):
    """An evaluation killed after two of four cases evaluated all four again on its rerun;
    now it computes the two left, and its files equal an uninterrupted evaluation's."""
    import medseg.evaluation.evaluate as evaluate_module

    ref, pred, out = folders
    for i in range(4):
        _write(ref, f"c{i}", _cube((1, 1, 1), (4 + i, 5, 5)))
        _write(pred, f"c{i}", _cube((1, 1, 1), (5, 5, 4 + i)) | _cube((8, 8, 8), (10, 10, 10), value=i % 3))
    assert run_evaluation(pred, ref, out / "straight", workers=1)

    computed = []
    real = evaluate_module._evaluate_case

    def interrupted_after_two(pred_file, *args):
        if len(computed) == 2:
            raise KeyboardInterrupt
        computed.append(Path(pred_file).name)
        return real(pred_file, *args)

    monkeypatch.setattr(evaluate_module, "_evaluate_case", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(pred, ref, out / "resumed", workers=1)
    journal = out / "resumed" / evaluate_module.CaseJournal.NAME
    assert len(journal.read_text().splitlines()) == 2
    with journal.open("a") as handle:  # a line cut short by a kill is skipped
        handle.write('{"case": "c2", "key": ')

    computed.clear()
    monkeypatch.setattr(evaluate_module, "_evaluate_case", lambda *args: (computed.append(Path(args[0]).name), real(*args))[1])
    _write(pred, "c1", _cube((1, 1, 1), (5, 5, 6)))  # a prediction replaced since: evaluated again
    assert run_evaluation(pred, ref, out / "resumed", workers=1)
    assert computed == ["c1.nii.gz", "c2.nii.gz", "c3.nii.gz"]
    assert "resuming: 1 of 4 case(s) already evaluated" in capsys.readouterr().err
    assert not journal.exists()  # the results hold every case

    # a case added after the cut line is kept (it was appended to that line and lost)
    from medseg.evaluation.evaluate import CaseJournal

    journal.write_text('{"case": "c0", "key": ')
    first = CaseJournal(out / "resumed")
    first.add("c1", "k1", {"metrics": {"1": {"Dice": 0.5}}, "shape": [12, 12, 12], "spacing": [1.0, 1.0, 1.0]})
    assert list(CaseJournal(out / "resumed").finished) == [("c1", "k1")]
    journal.unlink()

    assert run_evaluation(pred, ref, out / "straight", workers=1)  # the same files, uninterrupted
    straight, resumed = _summary(out / "straight"), _summary(out / "resumed")
    for key in ("metric_per_case", "mean", "foreground_mean", "statistics"):
        assert json.dumps(straight[key]) == json.dumps(resumed[key])
    assert (out / "straight" / "metrics.csv").read_text() == (out / "resumed" / "metrics.csv").read_text()

    # an interrupted evaluation's cases are not reused under other options (here the metrics)
    monkeypatch.setattr(evaluate_module, "_evaluate_case", interrupted_after_two)
    computed.clear()
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(pred, ref, out / "other", workers=1)
    monkeypatch.setattr(evaluate_module, "_evaluate_case", lambda *args: (computed.append(Path(args[0]).name), real(*args))[1])
    computed.clear()
    assert run_evaluation(pred, ref, out / "other", workers=1, metrics="dice")
    assert len(computed) == 4


def test_volumes_of_a_sheared_scan_use_the_voxels_true_volume(folders):
    """A CT's gantry tilt kept in the affine: volumes were the voxel count times the
    product of the spacings, 10 % too large at 25° (5120 mm³ for 4640)."""
    ref, pred, out = folders
    tilt = math.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = [[1.0, 0, 0], [0, 1.0, 2.0 * math.sin(tilt)], [0, 0, 2.0 * math.cos(tilt)]]
    sheared = ImageGeometry(affine, SHAPE)
    _write(ref, "tilted", _cube((2, 2, 2), (6, 6, 6)), sheared)
    _write(pred, "tilted", _cube((2, 2, 2), (6, 6, 5)), sheared)
    assert run_evaluation(pred, ref, out, workers=1)
    metrics = _case(_summary(out), "tilted")["metrics"]["1"]
    voxel = 2.0 * math.cos(tilt)
    assert math.isclose(metrics["volume_ref_mm3"], 64 * voxel, rel_tol=1e-5)
    assert math.isclose(metrics["volume_pred_mm3"], 48 * voxel, rel_tol=1e-5)


def test_a_summary_json_of_another_shape_is_one_line_naming_the_key(folders):
    """A summary.json from elsewhere with a label key that is not a label value reached
    int(label) in report html: a ValueError traceback."""
    from medseg.errors import DataError
    from medseg.evaluation.report import rewrite_report

    ref, pred, out = folders
    _write(ref, "c0", _cube((1, 1, 1), (4, 5, 5)))
    _write(pred, "c0", _cube((1, 1, 1), (5, 5, 4)))
    assert run_evaluation(pred, ref, out, workers=1, metrics="dice")
    summary = _summary(out)
    entry = summary["metric_per_case"][0]
    entry["metrics"] = {"<x>": entry["metrics"]["1"]}
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"metric_per_case\[0\]\.metrics: key '<x>' is not a label value"):
        rewrite_report(out)

"""``medseg predict``'s output folder through the command line: never an input, and
never a mix of two models' or two settings' results (``predict_provenance.json``)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from medseg.atomic import host_tag
from medseg.cli import main
from medseg.data.io import read_image, write_image
from medseg.inference.predict import PROVENANCE
from medseg.runfolder.lock import LOCK_FILE

from predict_helpers import blob_image, make_run, oblique_geometry


def predict(model, inputs, output, *options) -> int:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    args = ["predict", "--model", str(model), "--output", str(output), "--device", "cpu", *options]
    for given in inputs:
        args += ["--input", str(given)]
    return main(args)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and link under ``root``: content and modification time."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.name != LOCK_FILE  # the folder's lock, taken by every prediction into it
    }


def one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), err
    assert all(n in lines[0] for n in needles), (needles, err)
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# --------------------------------------------------------------------------- output is an input

def test_an_output_that_is_or_would_overwrite_an_input_is_refused(tiny_run, scans, tmp_path, capsys):
    plain = tmp_path / "plain"  # cases without a channel suffix: CASE.nii.gz in, CASE.nii.gz out
    for name in ("a", "b"):
        write_image(plain / f"{name}.nii.gz", blob_image(), oblique_geometry())
    (tmp_path / "linked").symlink_to(plain, target_is_directory=True)
    links = tmp_path / "links"  # an output folder holding a link to an input under its output name
    links.mkdir()
    (links / "a.nii.gz").symlink_to(plain / "a.nii.gz")
    no_model = tmp_path / "no_model"  # refused before the model is read: it is never looked for
    no_model.mkdir()
    refused = [
        (tiny_run, plain, plain, "is the input folder"),
        (tiny_run, scans, scans, "is the input folder"),  # CASE_0000 in, CASE out: mixed into the scans
        (tiny_run, plain, tmp_path / "linked", "is the input folder"),
        (tiny_run, [plain / "a.nii.gz", plain / "b.nii.gz"], plain, "a.nii.gz would overwrite the input scan"),
        (tiny_run, plain, links, "a.nii.gz would overwrite the input scan"),
        (tiny_run, plain / "b.nii.gz", plain / "b.nii.gz", "is the input scan"),
        (no_model, plain, plain, "is the input folder"),
    ]
    before = snapshot(tmp_path)
    for model, inputs, output, problem in refused:
        for overwrite in ((), ("--overwrite",)):
            assert predict(model, inputs, output, *overwrite) != 0
            one_error_line(capsys.readouterr().err, f"--output {output}: ", problem)
            assert snapshot(tmp_path) == before, (output, problem)  # nothing written, not even a folder
    # the same inputs into a folder of its own are predicted
    assert predict(tiny_run, plain, tmp_path / "pred") == 0
    assert (tmp_path / "pred" / "a.nii.gz").is_file()


def test_output_is_input_through_a_subprocess_is_one_line(tiny_run, scans):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "predict", "--model", str(tiny_run), "--input", str(scans),
         "--output", str(scans), "--overwrite"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    one_error_line(proc.stderr, f"--output {scans}: is the input folder")
    assert sorted(p.name for p in scans.iterdir()) == ["case_a_0000.nii.gz", "case_b_0000.nii.gz", "case_c_0000.nii.gz"]


# --------------------------------------------------------------------------- provenance

def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tiny_run, scans, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict(tiny_run, scans, out) == 0
    record = json.loads((out / PROVENANCE).read_text())
    checkpoint = tiny_run / "checkpoints" / "best.pt"
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["checkpoint"] == str(checkpoint)
    assert {k: record[k] for k in ("tta", "overlap", "mode", "save_probabilities", "stitch_dtype", "amp")} == {
        "tta": False, "overlap": 0.5, "mode": "gaussian", "save_probabilities": False, "stitch_dtype": "float16",
        "amp": False,
    }
    assert record["made_by"]["medseg"] and record["made_by"]["device"] == "cpu" and record["made_by"]["engine"]["cpu"]
    # made_by is recorded, not compared: another process (host, command, time) may continue the folder
    record["made_by"] = dict(record["made_by"], host="elsewhere", command="medseg predict ...")
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    done = snapshot(out)
    capsys.readouterr()

    # the same model and options: finished cases are skipped, the record is left as it is
    assert predict(tiny_run, scans, out, "--sw-batch-size", "1") == 0
    assert "3 case(s) already predicted" in capsys.readouterr().err
    assert snapshot(out) == done

    # another model or other options: refused, one line naming what differs, nothing touched
    other = make_run(tmp_path / "other", seed=1)
    for options, needles in [
        (("--tta",), ("tta false -> true",)),
        (("--overlap", "0.25", "--save-probabilities"), ("overlap 0.5 -> 0.25", "save_probabilities false -> true")),
        ((), ("checkpoint_sha256", "->")),
    ]:
        model = other if not options else tiny_run
        assert predict(model, scans, out, *options) != 0
        line = one_error_line(capsys.readouterr().err, str(out), *needles, "another --output", "--overwrite")
        assert ("checkpoint_sha256" in line) == (model is other)
        assert snapshot(out) == done

    # --overwrite redoes every case and records the new settings; a rerun with them skips
    assert predict(tiny_run, scans, out, "--tta", "--overwrite") == 0
    assert json.loads((out / PROVENANCE).read_text())["tta"] is True
    redone = snapshot(out)
    assert all(redone[name][1] != done[name][1] for name in done)
    capsys.readouterr()
    assert predict(tiny_run, scans, out, "--tta") == 0
    assert "3 case(s) already predicted" in capsys.readouterr().err
    assert snapshot(out) == redone

    # --overwrite for one case with other settings: the record is the folder's, so the
    # other cases' outputs of the old settings go too (a full rerun then kept them as new)
    assert predict(tiny_run, scans / "case_a_0000.nii.gz", out, "--overwrite") == 0
    assert "removed 3 file(s) of other settings" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["case_a.nii.gz", PROVENANCE]
    assert predict(tiny_run, scans, out) == 0
    assert "1 case(s) already predicted" in capsys.readouterr().err
    images = lambda files: {name: content for name, (content, _) in files.items() if name != PROVENANCE}  # noqa: E731
    assert images(snapshot(out)) == images(done)  # the no-TTA outputs again, every one of them


def test_outputs_without_a_record_are_refused_unless_overwrite(tiny_run, scans, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict(tiny_run, scans, out, "--save-probabilities") == 0
    (out / PROVENANCE).unlink()  # a folder predicted by an older medseg, or by hand
    done = snapshot(out)
    capsys.readouterr()
    assert predict(tiny_run, scans, out) != 0
    one_error_line(capsys.readouterr().err, str(out), "6 file(s) named as this run's outputs", f"no {PROVENANCE}",
                   "--overwrite")
    assert snapshot(out) == done
    # a folder of someone else's files (a dataset's labelsTs) is refused without a lock file put in it
    labels = tmp_path / "labelsTs"
    labels.mkdir()
    for name in ("case_a", "case_b"):
        write_image(labels / f"{name}.nii.gz", blob_image(), oblique_geometry())
    assert predict(tiny_run, scans, labels) != 0
    one_error_line(capsys.readouterr().err, str(labels), "2 file(s) named as this run's outputs")
    assert sorted(p.name for p in labels.iterdir()) == ["case_a.nii.gz", "case_b.nii.gz"]

    (out / PROVENANCE).write_text("{not json")
    assert predict(tiny_run, scans, out) != 0
    one_error_line(capsys.readouterr().err, str(out / PROVENANCE), "unreadable", "--overwrite")

    # --overwrite removes the outputs of unknown origin first: the probabilities are not kept
    assert predict(tiny_run, scans, out, "--overwrite") == 0
    assert "removed 6 file(s) of other settings" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == sorted(
        [PROVENANCE, "case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"])
    assert json.loads((out / PROVENANCE).read_text())["save_probabilities"] is False


def test_dead_writers_temporaries_are_removed_and_never_taken_for_outputs(tiny_run, scans, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    me, dead, live = host_tag(), dead_pid(), os.getppid()
    # what kills leave: a writer's staging folder with a finished-looking case, an atomic write
    staged = out / f".predict.{me}-{dead}.tmp"
    staged.mkdir()
    (staged / "case_a.nii.gz").write_bytes(b"half a case")
    leftovers = [staged, out / f".{PROVENANCE}.{me}-{dead}.tmp"]
    leftovers[1].write_text("{")
    # a running writer's, and another host's (whose process cannot be checked), are kept
    kept = [out / f".predict.{me}-{live}.tmp", out / f".case_b.nii.gz.otherhost-{dead}.tmp"]
    kept[0].mkdir()
    kept[1].write_bytes(b"partial")

    # no outputs and no record: a fresh folder, not one "holding predictions"
    assert predict(tiny_run, scans, out) == 0
    assert "predicted 3 case(s), skipped 0" in capsys.readouterr().out
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
    assert hidden == sorted(p.name for p in kept)  # the run's own staging folder is gone too

    # a case whose output is missing is redone, whatever a dead writer left for it
    (out / "case_a.nii.gz").unlink()
    staged.mkdir()
    (staged / "case_a.nii.gz").write_bytes(b"half a case")
    assert predict(tiny_run, scans, out) == 0
    assert "predicted 1 case(s), skipped 2" in capsys.readouterr().out
    assert (out / "case_a.nii.gz").stat().st_size > len(b"half a case") and not staged.exists()


def test_a_failed_case_leaves_no_staging_folder(tiny_run, scans, tmp_path):
    broken = scans / "case_b_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "pred"
    assert predict(tiny_run, scans, out, "--save-probabilities") == 1
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == sorted(
        [PROVENANCE, "case_a.nii.gz", "case_a_prob.nii.gz", "case_c.nii.gz", "case_c_prob.nii.gz"])


def test_the_checkpoint_is_recorded_by_its_absolute_path(tiny_run, scans, tmp_path, monkeypatch):
    """--model given relative to the current folder was recorded as given: read from
    elsewhere, the record named another file."""
    monkeypatch.chdir(tiny_run.parent)
    assert predict(tiny_run.name, scans, tmp_path / "pred") == 0
    record = json.loads((tmp_path / "pred" / PROVENANCE).read_text())
    assert record["checkpoint"] == str(tiny_run / "checkpoints" / "best.pt")


def test_files_after_one_input_flag_are_predicted_as_with_the_flag_repeated(tiny_run, tmp_path):
    """``--input scans/*.nii.gz``: the shell gives the files after one flag (typer took the
    first and refused the rest as "unexpected extra arguments")."""
    plain = tmp_path / "plain"
    for name in ("a", "b", "c"):
        write_image(plain / f"{name}.nii.gz", blob_image(), oblique_geometry())
    files = [str(plain / f"{name}.nii.gz") for name in ("a", "b")]
    common = ["predict", "--model", str(tiny_run), "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "globbed"), "--input", *files]) == 0
    assert predict(tiny_run, [Path(f) for f in files], tmp_path / "repeated") == 0
    for out in ("globbed", "repeated"):
        assert sorted(p.name for p in (tmp_path / out).glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    for name in ("a.nii.gz", "b.nii.gz"):
        globbed, repeated = (read_image(tmp_path / out / name)[0] for out in ("globbed", "repeated"))
        assert np.array_equal(globbed, repeated) and globbed.any()


def test_the_recorded_checkpoint_is_the_one_the_weights_came_from(tiny_run, scans, tmp_path, monkeypatch):
    """A train renaming a new best.pt over the old one between predict's load and its
    hash made the record name the new model beside the old model's masks; a later
    predict with the new model then skipped them as its own."""
    import medseg.data.dataset as dataset_module

    run = tmp_path / "live"
    (run / "checkpoints").mkdir(parents=True)
    old_bytes = (tiny_run / "checkpoints" / "best.pt").read_bytes()
    (run / "checkpoints" / "best.pt").write_bytes(old_bytes)
    new_model = make_run(tmp_path / "new", seed=1) / "checkpoints" / "best.pt"
    real = dataset_module.cases_from_paths

    def swap_then_list(*args, **kwargs):  # after the weights are loaded, before any case
        os.replace(new_model, run / "checkpoints" / "best.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "cases_from_paths", swap_then_list)
    assert predict(run, scans, tmp_path / "pred") == 0
    record = json.loads((tmp_path / "pred" / PROVENANCE).read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(old_bytes).hexdigest()

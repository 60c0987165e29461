"""Bad input through the real command line: one line naming the file or key, a non-zero
exit, no traceback, and nothing already written is damaged.

Every check runs ``python -m medseg ...`` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.data.io import ImageGeometry, read_image, write_image

sys.path.insert(0, str(Path(__file__).parent / "inference"))
from predict_helpers import blob_image, make_run, oblique_geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def medseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "medseg", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, alone: bool = False) -> str:
    """Exit code != 0, no traceback, and exactly one error line that contains every needle.

    ``alone``: that line is all of stderr (a fatal input error, not one case of a batch).
    """
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if alone:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("medseg: error: "), proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg:")]
    matching = [ln for ln in errors if all(n in ln for n in needles)]
    assert len(matching) == 1, f"expected one line with {needles}, got:\n{proc.stderr}"
    return matching[0]


# --------------------------------------------------------------------------- train

@pytest.fixture
def dataset(synthetic_dataset_3d, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may break."""
    return Path(shutil.copytree(synthetic_dataset_3d, tmp_path / "Dataset001"))


def write_config(tmp_path: Path, dataset: Path, **top) -> Path:
    config = {
        "data": {"dataset": str(dataset), "patch_size": [16, 16, 16], "cache_rate": 1.0},
        "model": {"name": "unet", "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "train": {"iterations": 2, "batch_size": 1, "val_interval": 2, "checkpoint_interval": 2},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[1]  # the second case: not the first one read by luck


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _rewrite_label(path: Path, change) -> None:
    label, geometry = read_image(path)
    label, geometry = change(label, geometry)
    write_image(path, label, geometry)


def _break_truncated(ds: Path) -> str:
    image = _first(ds / "imagesTr")
    _truncate(image)
    return image.name


def _break_shape(ds: Path) -> str:
    label = _first(ds / "labelsTr")
    _rewrite_label(label, lambda a, g: (a[:-2], ImageGeometry(g.affine, a[:-2].shape)))
    return label.name


def _break_affine(ds: Path) -> str:
    label = _first(ds / "labelsTr")

    def shift(a, g):
        affine = np.array(g.affine)
        affine[:3, 3] += 5.0
        return a, ImageGeometry(affine, g.shape)

    _rewrite_label(label, shift)
    return label.name


def _break_labels(ds: Path) -> str:
    label = _first(ds / "labelsTr")

    def add_values(a, g):
        a = a.copy()
        a[0, 0, 0], a[0, 0, 1] = 3, 7
        return a, g

    _rewrite_label(label, add_values)
    return f"{label.name}: label values [3, 7]"


def _break_nan(ds: Path) -> str:
    path = _first(ds / "imagesTr")
    image, geometry = read_image(path)
    image = image.astype(np.float32)
    image[1, 2, 3] = np.nan
    write_image(path, image, geometry)
    return path.name


def _break_channel(ds: Path) -> str:
    info = json.loads((ds / "dataset.json").read_text())
    info["channel_names"] = {"0": "CT", "1": "T2"}
    (ds / "dataset.json").write_text(json.dumps(info))
    images = sorted((ds / "imagesTr").iterdir())
    for image in images[:-1]:
        shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
    return images[-1].name.replace("_0000", "_0001")


def _break_empty(ds: Path) -> str:
    for image in (ds / "imagesTr").iterdir():
        image.unlink()
    return "imagesTr"


BROKEN_DATASETS = {
    "truncated_image": _break_truncated,
    "shape_mismatch": _break_shape,
    "affine_mismatch": _break_affine,
    "undeclared_labels": _break_labels,
    "nan_image": _break_nan,
    "missing_channel": _break_channel,
    "empty_dataset": _break_empty,
}


@pytest.mark.parametrize("problem", sorted(BROKEN_DATASETS))
def test_train_bad_dataset(problem, dataset, tmp_path):
    needle = BROKEN_DATASETS[problem](dataset)
    config = write_config(tmp_path, dataset)
    proc = medseg("train", config)
    assert_one_line_error(proc, needle, alone=True)
    assert not (tmp_path / "run").exists()  # nothing written before the data was checked


def test_train_unknown_config_key(dataset, tmp_path):
    config = write_config(tmp_path, dataset)
    assert_one_line_error(medseg("train", config, "--set", "train.iteratons=5"), "train.iteratons", alone=True)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["patch_sise"] = [8, 8, 8]
    config.write_text(yaml.safe_dump(raw))
    assert_one_line_error(medseg("train", config), "data.patch_sise", alone=True)
    assert not (tmp_path / "run").exists()


def test_train_keeps_an_existing_run(dataset, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"precious")
    config = write_config(tmp_path, dataset)
    assert_one_line_error(medseg("train", config), str(run), alone=True)
    assert (run / "checkpoints" / "best.pt").read_bytes() == b"precious"


# --------------------------------------------------------------------------- predict

@pytest.fixture
def run_and_scans(tmp_path):
    run = make_run(tmp_path / "model")
    scans = tmp_path / "scans"
    for name in ("a", "b", "c"):
        write_image(scans / f"{name}_0000.nii.gz", blob_image(), oblique_geometry())
    return run, scans


def test_predict_model_folder_without_checkpoint(run_and_scans, tmp_path):
    _, scans = run_and_scans
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert_one_line_error(medseg("predict", "--model", empty, "--input", scans, "--output", tmp_path / "o"), str(empty), "checkpoint", alone=True)
    broken = tmp_path / "broken_run" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(medseg("predict", "--model", broken.parent, "--input", scans, "--output", tmp_path / "o"), "best.pt", alone=True)


def test_predict_bad_cases_keep_earlier_outputs(run_and_scans, tmp_path):
    run, scans = run_and_scans
    out = tmp_path / "pred"
    first = medseg("predict", "--model", run, "--input", scans, "--output", out)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _truncate(scans / "b_0000.nii.gz")
    nan = blob_image()
    nan[0, 0, 0] = np.nan
    write_image(scans / "c_0000.nii.gz", nan, oblique_geometry())
    proc = medseg("predict", "--model", run, "--input", scans, "--output", out, "--overwrite")
    assert proc.returncode == 1
    assert_one_line_error(proc, "case b", "b_0000.nii.gz", "truncated")
    assert_one_line_error(proc, "case c", "c_0000.nii.gz", "NaN")
    assert (out / "b.nii.gz").read_bytes() == before["b.nii.gz"]
    assert (out / "c.nii.gz").read_bytes() == before["c.nii.gz"]
    assert read_image(out / "a.nii.gz")[0].shape == blob_image().shape


def test_predict_missing_channel_and_missing_input(tmp_path):
    run = make_run(tmp_path / "model", channels=("T1", "T2"))
    scans = tmp_path / "scans"
    for c in range(2):
        write_image(scans / f"a_{c:04d}.nii.gz", blob_image(), oblique_geometry())
    write_image(scans / "b_0000.nii.gz", blob_image(), oblique_geometry())
    out = tmp_path / "pred"
    proc = medseg("predict", "--model", run, "--input", scans, "--output", out)  # b reported, a predicted
    assert proc.returncode == 1
    assert_one_line_error(proc, "b_0001.nii.gz", "missing channel")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz"]
    assert_one_line_error(medseg("predict", "--model", run, "--input", scans / "b_0000.nii.gz", "--output", out),
                          "b_0001.nii.gz", "missing channel", "no case left", alone=True)
    assert_one_line_error(medseg("predict", "--model", run, "--input", tmp_path / "nowhere", "--output", out), "nowhere", alone=True)


# --------------------------------------------------------------------------- evaluate

def test_evaluate_bad_inputs(tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "eval"
    geometry = ImageGeometry.from_spacing((10, 10, 10), (1.0, 1.0, 2.0))
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    for case in ("good", "shape", "affine", "truncated", "missing"):
        write_image(ref / f"{case}.nii.gz", mask, geometry)
    write_image(pred / "good.nii.gz", mask, geometry)
    write_image(pred / "shape.nii.gz", mask[:-1], ImageGeometry(geometry.affine, (9, 10, 10)))
    write_image(pred / "affine.nii.gz", mask, ImageGeometry.from_spacing((10, 10, 10), (1.0, 1.0, 2.5)))
    write_image(pred / "truncated.nii.gz", mask, geometry)
    _truncate(pred / "truncated.nii.gz")

    proc = medseg("evaluate", "--pred", pred, "--ref", ref, "--output", out, "--workers", "2")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert_one_line_error(proc, "case shape", "shape.nii.gz", "shape")
    assert_one_line_error(proc, "case affine", "affine.nii.gz", "affine")
    assert_one_line_error(proc, "case truncated", "truncated.nii.gz")
    assert_one_line_error(proc, "missing prediction", "missing")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_predictions"] == ["missing"]
    assert set(summary["failed_cases"]) == {"shape", "affine", "truncated"}
    good = next(c for c in summary["metric_per_case"] if c["case"] == "good")
    assert good["metrics"]["1"]["Dice"] == 1.0

    # A fatal input error leaves the previous results alone.
    before = (out / "summary.json").read_bytes()
    empty = tmp_path / "empty_ref"
    empty.mkdir()
    assert_one_line_error(medseg("evaluate", "--pred", pred, "--ref", empty, "--output", out), str(empty), alone=True)
    assert_one_line_error(medseg("evaluate", "--pred", tmp_path / "nope", "--ref", ref, "--output", out), "nope", alone=True)
    assert (out / "summary.json").read_bytes() == before


def test_usage_errors_are_short(tmp_path):
    proc = medseg("predict", "--input", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--model" in proc.stderr


def test_ctrl_c_says_interrupted_and_exits_130(monkeypatch, capsys):
    """typer turned KeyboardInterrupt into exit code 130 with an empty line only."""
    import medseg.evaluation.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from medseg.cli import main

    monkeypatch.setattr(report, "rewrite_report", interrupted)
    assert main(["report", "html", "anything"]) == 130
    assert "medseg: interrupted" in capsys.readouterr().err
    # under torchrun every rank is stopped and rank 0 says so (not one line per rank)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["report", "html", "anything"]) == 130
        assert ("medseg: interrupted" in capsys.readouterr().err) == said


def test_a_full_disk_in_a_writer_thread_is_one_line(capsys, monkeypatch):
    """TensorBoard's writer thread hitting a full disk printed a 40-line traceback beside
    the command's own one-line error; then, as the threads' timing went, a second line
    beside it. The thread's line is said only when the command ends without an error."""
    import errno
    import threading

    import medseg.cli as cli
    from medseg.errors import MedsegError

    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "/run/tensorboard/events.out")

    def command(fails):
        def run(argv):
            thread = threading.Thread(target=write, name="EventFileWriter")
            thread.start()
            thread.join()
            if fails:  # the command's own next write hits the same disk
                sys.stderr.write("medseg: error: /run/metrics.csv: No space left on device\n")
                return MedsegError.exit_code
            return 0
        return run

    monkeypatch.setattr(cli, "_main", command(fails=True))
    assert cli.main([]) == MedsegError.exit_code
    assert capsys.readouterr().err == "medseg: error: /run/metrics.csv: No space left on device\n"
    monkeypatch.setattr(cli, "_main", command(fails=False))
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err == "medseg: error: EventFileWriter: [Errno 28] No space left on device: '/run/tensorboard/events.out'\n"


def test_commands_without_a_torchrun_mode_refuse_to_run_under_it(monkeypatch, capsys, tmp_path):
    """Under torchrun every rank ran the whole evaluation (or adaptation) into one folder; the
    second was refused by the first's lock as if by another process, then torchrun killed
    the first mid-write."""
    from medseg.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path), "--output", str(tmp_path / "eval")],
                    ["adapt", str(tmp_path / "adapt.yaml")]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"medseg: error: medseg {command[0]} runs as one process (WORLD_SIZE=2); start it without "
                       "torchrun (train, preprocess, predict and study use torchrun's processes)"]
    assert not (tmp_path / "eval").exists()


def test_a_collective_broken_by_another_rank_is_one_line(monkeypatch, capsys):
    """When one rank failed (and said why in one line), the others printed gloo's 50-line
    traceback from the collective they were waiting in."""
    import medseg.evaluation.report as report
    from medseg.cli import _peer_failed, main

    def broken(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1234")

    monkeypatch.setattr(report, "rewrite_report", broken)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["report", "html", "anything"]) == 1
    assert capsys.readouterr().err == ("medseg: error: rank 0 stopped: another process of this torchrun job failed "
                                       "(its error is above)\n")
    import torch.distributed as dist

    assert _peer_failed(dist.DistError("store timeout")) and not _peer_failed(RuntimeError("CUDA out of memory"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not _peer_failed(RuntimeError("Connection closed by peer"))  # one process: not a peer's failure


def test_ctrl_c_in_train_says_how_to_go_on(monkeypatch, capsys, tmp_path):
    import yaml

    import medseg.cli as cli
    import medseg.training.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_training", interrupted)
    monkeypatch.setattr(cli, "_INTERRUPT_HINT", lambda: "")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": str(tmp_path)}, "train": {"iterations": 10, "checkpoint_interval": 5},
                                      "output_dir": str(tmp_path / "run")}))
    # before the run folder was written it named a config.yaml that was not there
    assert cli.main(["train", str(config)]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "medseg: interrupted; nothing was written to the run folder yet: run the same command again"
    # before the first checkpoint it said "continues from checkpoints/latest.pt", which was not there
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert cli.main(["train", str(config)]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"medseg: interrupted; `medseg train {tmp_path / 'run' / 'config.yaml'} --resume` starts the run "
                    "again (no checkpoint yet: the first is at step 5)")
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest.pt").write_bytes(b"")
    assert cli.main(["train", str(config)]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"medseg: interrupted; `medseg train {tmp_path / 'run' / 'config.yaml'} --resume` continues from "
                    "checkpoints/latest.pt (written every 5 steps)")

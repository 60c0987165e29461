"""run_training end to end on the synthetic fixtures: artefacts, exact resume, refusals."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main as cli_main
from medseg.config import validate_config
from medseg.errors import CheckpointError, ConfigError, DataError
from medseg.runfolder.checkpoint import load_checkpoint
from medseg.training.logs import RunLog
from medseg.training.trainer import run_training

REPO = Path(__file__).resolve().parents[2]
TINY_UNET = {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(dataset: Path, out: Path, iterations: int = 12, patch=(16, 16, 16), **train) -> dict:
    return {
        "data": {
            "dataset": str(dataset),
            "patch_size": list(patch),
            "val_fraction": 0.34,
            "augmentation": {"affine_prob": 0.3, "gaussian_noise_prob": 0.3},
        },
        "model": TINY_UNET,
        "train": {
            "iterations": iterations,
            "batch_size": 2,
            "val_interval": 6,
            "checkpoint_interval": 4,
            "log_interval": 2,
            **train,
        },
        "inference": {"overlap": 0.25, "sw_batch_size": 8},
        "output_dir": str(out),
        "seed": 1,
        "device": "cpu",
    }


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_short_training_writes_every_artefact(synthetic_dataset_3d, tmp_path):
    cfg = validate_config(_raw(synthetic_dataset_3d, tmp_path / "run", iterations=12))
    run = run_training(cfg)
    assert run == tmp_path / "run"
    for name in ("config.yaml", "label_stats.json", "metrics.csv", "progress.png", "train.log"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert validate_config(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    stats = json.loads((run / "label_stats.json").read_text())
    assert "vessel" in stats["classes"]

    rows = _rows(run)
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert set(rows[0]) == {"iteration", "lr", "loss", "loss/dice_ce", "val_dice/vessel", "val_dice_mean"}
    assert rows[2]["val_dice_mean"] and not rows[0]["val_dice_mean"]
    assert 0.0 <= float(rows[-1]["val_dice/vessel"]) <= 1.0

    latest = load_checkpoint(run / "checkpoints" / "latest.pt")  # weights_only=True inside
    assert latest["iteration"] == 12
    assert latest["network"] == {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "patch_size": [16, 16, 16]}
    assert latest["preprocessing"]["channels"][0]["scheme"] == "ct"
    assert latest["dataset"]["labels"] == {"background": 0, "vessel": 1}
    assert set(latest["split"]) == {"train", "val"} and latest["split"]["val"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_metric"] == pytest.approx(max(float(r["val_dice_mean"]) for r in rows if r["val_dice_mean"]), rel=1e-6)
    log = (run / "train.log").read_text()
    assert "val Dice" in log
    # and the lines from before the run folder existed, first: the data's preparation and split
    assert log.index("training / ") < log.index("val Dice") and "validation cases" in log


def test_training_2d(synthetic_dataset_2d, tmp_path):
    raw = _raw(synthetic_dataset_2d, tmp_path / "run2d", iterations=4, patch=(32, 32), val_interval=4)
    raw["data"]["augmentation"]["rotate90_prob"] = 0.5
    raw["data"]["cache_rate"] = 0.5  # the uncached cases are read per patch
    run = run_training(validate_config(raw))
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["network"]["spatial_dims"] == 2


def _final_state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert _rows(a) == _rows(b)
    ca, cb = load_checkpoint(a / "checkpoints" / "latest.pt"), load_checkpoint(b / "checkpoints" / "latest.pt")
    assert ca["best_metric"] == cb["best_metric"]
    for key in ("state", "param_groups"):
        assert repr(ca["optimizer"][key]) == repr(cb["optimizer"][key])


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the trainer swallows it."""


def test_resume_after_interruption_equals_uninterrupted_run(synthetic_dataset_3d, tmp_path, monkeypatch):
    import random

    # numpy's and Python's generators as two processes find them (seeded by the OS)
    np.random.seed(1), random.seed(1)
    reference = run_training(validate_config(_raw(synthetic_dataset_3d, tmp_path / "full", iterations=14)))
    np.random.seed(2), random.seed(2)

    # "kill" at iteration 10: two iterations after checkpoint 8, after the metrics row of 10
    cfg = validate_config(_raw(synthetic_dataset_3d, tmp_path / "killed", iterations=14))
    original = RunLog.add_row

    def add_row_then_die(self, iteration, *args, **kwargs):
        original(self, iteration, *args, **kwargs)
        if iteration == 10:
            raise _Killed()

    monkeypatch.setattr(RunLog, "add_row", add_row_then_die)
    with pytest.raises(_Killed):
        run_training(cfg)
    monkeypatch.setattr(RunLog, "add_row", original)
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")["iteration"] == 8
    assert int(_rows(tmp_path / "killed")[-1]["iteration"]) == 10  # a row past the checkpoint

    run_training(cfg, resume=True)
    _assert_same_run(reference, tmp_path / "killed")
    # the stored generator states too: numpy's and Python's were seeded by the OS, so two
    # runs of one config wrote checkpoints of different bytes
    for name in ("latest.pt", "best.pt"):
        ra, rb = (load_checkpoint(run / "checkpoints" / name)["rng"] for run in (reference, tmp_path / "killed"))
        assert torch.equal(ra["torch"], rb["torch"])
        assert torch.equal(ra["numpy"][1], rb["numpy"][1]) and ra["numpy"][2:] == rb["numpy"][2:]
        assert ra["python"] == rb["python"]

    # resuming a finished run changes nothing, and adds no empty TensorBoard file
    events = sorted((tmp_path / "killed" / "tensorboard").iterdir())
    run_training(cfg, resume=True)
    _assert_same_run(reference, tmp_path / "killed")
    assert sorted((tmp_path / "killed" / "tensorboard").iterdir()) == events


@pytest.mark.slow
def test_resume_after_sigkill_of_the_cli(synthetic_dataset_3d, tmp_path):
    iterations = 40
    reference = run_training(validate_config(_raw(synthetic_dataset_3d, tmp_path / "full", iterations=iterations)))
    run = tmp_path / "killed"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_raw(synthetic_dataset_3d, run, iterations=iterations)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import torch, sys; torch.set_num_threads(1); from medseg.cli import main; sys.exit(main())",
         "train", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    latest = run / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stderr.read().decode()[-2000:]
    killed_at = load_checkpoint(latest)["iteration"]
    assert killed_at < iterations, "the run finished before it could be killed"
    assert cli_main(["train", str(config), "--resume"]) == 0
    _assert_same_run(reference, run)


def test_existing_run_folder_is_not_clobbered(synthetic_dataset_3d, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("precious\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_raw(synthetic_dataset_3d, run, iterations=2)))
    assert cli_main(["train", str(config)]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "Traceback" not in err
    assert (run / "metrics.csv").read_text() == "precious\n"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


def test_resume_without_checkpoint_is_a_checkpoint_error(synthetic_dataset_3d, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_raw(synthetic_dataset_3d, tmp_path / "never", iterations=2)))
    assert cli_main(["train", str(config), "--resume"]) == CheckpointError.exit_code
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_resume_with_a_changed_model_is_refused(synthetic_dataset_3d, tmp_path):
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=4)
    run_training(validate_config(raw))
    raw["model"] = {"name": "unet", "params": {"channels": [4, 8], "strides": [2]}}
    with pytest.raises(ConfigError, match="model"):
        run_training(validate_config(raw), resume=True)


def test_bad_data_fails_before_any_output(synthetic_dataset_3d, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset_3d, broken)
    victim = sorted((broken / "imagesTr").iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=victim.name):
        run_training(validate_config(_raw(broken, tmp_path / "run", iterations=2, )))
    assert not (tmp_path / "run").exists()


def test_a_loss_backend_that_cannot_run_here_fails_before_any_output(synthetic_dataset_3d, tmp_path, monkeypatch):
    """backend: cuda without a CUDA device failed at the first step, after the run folder
    was written; the folder then refused the corrected run and its --resume."""
    from medseg.topology import _inputs

    monkeypatch.setattr(_inputs, "cuda_available", lambda: False)
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=2)
    raw["losses"] = [{"name": "dice_ce"}, {"name": "betti_matching", "weight": 0.1, "backend": "cuda"}]
    with pytest.raises(ConfigError, match=r"losses\[1\] \(betti_matching\)\.backend: backend='cuda' requested"):
        run_training(validate_config(raw))
    assert not (tmp_path / "run").exists()


def test_one_patch_a_step_through_a_batchnorm_bottleneck_fails_before_any_output(synthetic_dataset_3d, tmp_path):
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=2, patch=(4, 4, 4), batch_size=1)
    raw["model"] = {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
                                               "norm": "BATCH"}}
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 1 patch a step is too few"):
        run_training(validate_config(raw))
    assert not (tmp_path / "run").exists()


def test_bad_model_params_fail_before_any_output(synthetic_dataset_3d, tmp_path):
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=2)
    raw["model"] = {"name": "unet", "params": {"chanels": [4, 8]}}
    with pytest.raises(ConfigError, match=r"model\.params\.chanels"):
        run_training(validate_config(raw))
    raw["model"] = TINY_UNET
    raw["data"]["patch_size"] = [18, 16, 16]
    with pytest.raises(ConfigError, match=r"data\.patch_size"):
        run_training(validate_config(raw))
    raw["data"]["patch_size"] = [16, 16]
    with pytest.raises(ConfigError, match=r"data\.patch_size.*3D"):
        run_training(validate_config(raw))
    assert not (tmp_path / "run").exists()


def test_any_channel_count_and_label_count(synthetic_dataset_3d, tmp_path):
    """Two channels (CT + an MR-like one) and three labels: out_channels follows dataset.json."""
    import numpy as np

    from medseg.data.io import read_image, write_image

    root = tmp_path / "multi"
    shutil.copytree(synthetic_dataset_3d, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "T2"}
    meta["labels"] = {"background": 0, "vessel": 1, "vessel_right": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    for image in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        array, geometry = read_image(image)
        write_image(image.with_name(image.name.replace("_0000", "_0001")), -array + 5.0, geometry)
        label_path = root / "labelsTr" / image.name.replace("_0000", "")
        label, lgeom = read_image(label_path)
        label = label.astype(np.uint8)
        label[label.shape[0] // 2 :][label[label.shape[0] // 2 :] == 1] = 2
        write_image(label_path, label, lgeom)
    for folder in ("imagesTs", "labelsTs"):
        shutil.rmtree(root / folder, ignore_errors=True)

    run = run_training(validate_config(_raw(root, tmp_path / "run", iterations=4, val_interval=4)))
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["network"]["in_channels"] == 2 and ckpt["network"]["out_channels"] == 3
    assert [c["scheme"] for c in ckpt["preprocessing"]["channels"]] == ["ct", "zscore"]
    assert {"val_dice/vessel", "val_dice/vessel_right", "val_dice_mean"} <= set(_rows(run)[0])


def test_topology_losses_train_from_the_config(synthetic_dataset_3d, tmp_path):
    """Every term of a composite is logged; betti_matching runs on the real engine, from
    its scheduled start (iteration index 2: not computed in the first row's iterations)."""
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=4, val_interval=4, log_interval=2)
    raw["losses"] = [
        {"name": "dice_ce", "weight": 1.0},
        {"name": "cldice", "weight": 0.5, "iterations": 3},
        {"name": "betti_matching", "weight": 0.1, "start": 2},
    ]
    run_training(validate_config(raw))
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["iteration"] for row in rows] == ["2", "4"]
    assert rows[0]["loss/betti_matching"] == "" and rows[0]["loss/cldice"] != ""
    logged = [row for row in rows if row.get("loss/betti_matching") not in (None, "")]
    assert logged, f"no betti_matching column in {list(rows[0])}"
    values = [float(row["loss/betti_matching"]) for row in logged]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert any(v > 0 for v in values)  # an untrained net's topology differs from the label's
    assert all(float(row["loss/cldice"]) > 0 for row in logged)


def test_dynunet_with_deep_supervision_trains_validates_and_predicts(synthetic_dataset_3d, tmp_path):
    raw = _raw(synthetic_dataset_3d, tmp_path / "run", iterations=4, patch=(32, 32, 32), val_interval=4)
    raw["model"] = {"name": "dynunet", "params": {"filters": [4, 8, 16, 32], "deep_supervision": True}}
    run = run_training(validate_config(raw))
    state = load_checkpoint(run / "checkpoints" / "latest.pt")["model"]
    assert any("deep_supervision_heads" in key for key in state)
    rows = _rows(run)
    losses = [float(r["loss"]) for r in rows if r.get("loss") not in (None, "")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(r.get("val_dice_mean") not in (None, "") for r in rows)  # validation ran on the final output
    out = tmp_path / "pred"
    images = synthetic_dataset_3d / "imagesTs"
    if not images.is_dir():
        images = synthetic_dataset_3d / "imagesTr"
    code = cli_main(["predict", "--model", str(run), "--input", str(images), "--output", str(out), "--device", "cpu"])
    assert code == 0
    assert sorted(out.glob("*.nii.gz"))


def test_train_log_says_how_a_run_ended(synthetic_dataset_3d, tmp_path, monkeypatch):
    """After a Ctrl-C, a SIGTERM or an error, train.log stopped at its last progress line:
    the stop and the resume command went to the console alone."""
    cfg = validate_config(_raw(synthetic_dataset_3d, tmp_path / "stopped", iterations=14))
    original = RunLog.add_row

    def add_row_then_stop(self, iteration, *args, **kwargs):
        original(self, iteration, *args, **kwargs)
        if iteration == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLog, "add_row", add_row_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    last = (tmp_path / "stopped" / "train.log").read_text().splitlines()[-1]
    assert "WARNING stopped (Ctrl-C or SIGTERM); `medseg train" in last and "config.yaml --resume`" in last

    def add_row_then_fail(self, iteration, *args, **kwargs):
        raise ConfigError("a test's failure\nsecond line")

    monkeypatch.setattr(RunLog, "add_row", add_row_then_fail)
    with pytest.raises(ConfigError):
        run_training(cfg, resume=True)
    assert (tmp_path / "stopped" / "train.log").read_text().splitlines()[-1].endswith("ERROR failed: a test's failure")


def test_a_checkpoint_replaced_while_a_resume_starts_is_refused(synthetic_dataset_3d, tmp_path, monkeypatch):
    """A resume read latest.pt while another process still trained the run; that one
    finished and let go, and the resume took the folder and trained the last steps again
    from the old checkpoint, over the finished run's checkpoints."""
    import medseg.training.trainer as trainer
    from medseg.errors import ConfigError

    run = tmp_path / "run"
    run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=4)))
    latest = run / "checkpoints" / "latest.pt"
    real = trainer.resume_point

    def finished_meanwhile(*args, **kwargs):
        found = real(*args, **kwargs)
        data = latest.read_bytes()
        latest.unlink()
        latest.write_bytes(data)  # the other process's rename: another file at the path
        return found

    monkeypatch.setattr(trainer, "resume_point", finished_meanwhile)
    before = latest.read_bytes()
    with pytest.raises(ConfigError, match="changed while this resume started"):
        run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=6)), resume=True)
    assert latest.read_bytes() == before
    monkeypatch.setattr(trainer, "resume_point", real)
    run_training(validate_config(_raw(synthetic_dataset_3d, run, iterations=6)), resume=True)  # again: resumes
    assert torch.load(latest, weights_only=True)["iteration"] == 6

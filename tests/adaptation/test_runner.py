"""medseg adapt end to end: a new run folder, provenance, untouched source, resume, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medseg.adaptation import load_adapt_config, run_adaptation, validate_adapt_config
from medseg.atomic import file_sha256
from medseg.cli import main as cli_main
from medseg.errors import CheckpointError, ConfigError, DataError
from medseg.inference.predictor import Predictor
from medseg.runfolder.checkpoint import load_checkpoint

from adapt_helpers import adapt_raw, folder_digest, make_target_dataset

REPO = Path(__file__).resolve().parents[2]


def _run(raw, resume=False):
    return run_adaptation(validate_adapt_config(raw), resume=resume)


@pytest.mark.parametrize("method", ["pseudo_label", "mean_teacher", "sfda", "tent"])
def test_adapted_run_is_a_normal_run_and_the_source_is_untouched(method, source_run, target_dataset, tmp_path):
    before = folder_digest(source_run)
    extra = {"pseudo_label": {"rounds": 2, "curriculum": [0.5, 1.0]}} if method == "pseudo_label" else {}
    run = _run(adapt_raw(source_run, target_dataset, tmp_path / "adapted", method, iterations=4, **extra))
    assert folder_digest(source_run) == before  # byte-identical, no file added or removed

    for name in ("config.yaml", "source_config.yaml", "provenance.json", "label_stats.json", "metrics.csv",
                 "target_eval.json", "adapt.log", "progress.png", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["method"] == method
    assert provenance["source_checkpoint_sha256"] == file_sha256(source_run / "checkpoints" / "latest.pt")
    assert provenance["config"]["adapt"]["method"] == method
    assert provenance["target_cases"] == [f"vessel_{i:03d}" for i in range(6)]
    # merged with the build record (medseg.runfolder.provenance)
    assert provenance["device"] == "cpu" and provenance["medseg"] and provenance["engine"]["cpu"] and provenance["command"]
    assert load_adapt_config(run / "config.yaml").adapt.method == method

    checkpoint = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert checkpoint["iteration"] == 4
    assert checkpoint["adaptation"]["provenance"]["source_checkpoint_sha256"] == provenance["source_checkpoint_sha256"]
    source_ckpt = load_checkpoint(source_run / "checkpoints" / "latest.pt")
    assert checkpoint["preprocessing"] == source_ckpt["preprocessing"]  # documented: the source's statistics
    predictor = Predictor.from_path(run, "cpu")  # what medseg predict loads
    assert predictor.num_classes == 2
    evaluation = json.loads((run / "target_eval.json").read_text())
    assert set(evaluation) == {"before", "after"}
    assert 0 <= evaluation["after"]["mean"]["vessel"]["dice"] <= 1


def test_predict_and_evaluate_accept_the_adapted_run(source_run, target_dataset, tmp_path):
    run = _run(adapt_raw(source_run, target_dataset, tmp_path / "adapted", "sfda", iterations=2))
    pred = tmp_path / "pred"
    code = cli_main(["predict", "--model", str(run), "--input", str(target_dataset / "imagesTr"), "--output", str(pred),
                     "--device", "cpu"])
    assert code == 0
    assert len(list(pred.glob("*.nii.gz"))) == 6
    code = cli_main(["evaluate", "--pred", str(pred), "--ref", str(target_dataset / "labelsTr"),
                     "--output", str(tmp_path / "eval"), "--metrics", "dice", "--workers", "1", "--no-report"])
    assert code == 0
    assert (tmp_path / "eval" / "summary.json").is_file()


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model"]


@pytest.mark.parametrize("method,extra", [
    ("sfda", {}),
    ("mean_teacher", {}),
    ("pseudo_label", {"pseudo_label": {"rounds": 2, "threshold": 0.8}}),
])
def test_resume_ends_where_an_uninterrupted_run_ends(method, extra, source_run, target_dataset, tmp_path, monkeypatch):
    whole = _run(adapt_raw(source_run, target_dataset, tmp_path / "whole", method, iterations=6, **extra))

    raw = adapt_raw(source_run, target_dataset, tmp_path / "parts", method, iterations=6, **extra)
    from medseg.adaptation import runner

    real = runner.save_checkpoint
    saved = []

    def save_then_stop(path, payload):
        real(path, payload)
        saved.append(payload["iteration"])
        if payload["iteration"] == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(runner, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(raw)
    monkeypatch.setattr(runner, "save_checkpoint", real)
    assert saved == [2, 4]
    parts = _run(raw, resume=True)
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (parts / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "2", "4", "6"]
    provenance = json.loads((parts / "provenance.json").read_text())  # the start kept, the resume appended
    assert provenance["method"] == method and [r["from_iteration"] for r in provenance["resumes"]] == [4]


def test_refusals(source_run, target_dataset, tmp_path):
    raw = adapt_raw(source_run, target_dataset, tmp_path / "a", "sfda", iterations=2)
    _run(raw)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        _run(raw)
    with pytest.raises(ConfigError, match="adapt.lr: the run used .*, the config says 0.1; a resume cannot change it"):
        _run({**raw, "adapt": {**raw["adapt"], "lr": 0.1}}, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _run(adapt_raw(source_run, target_dataset, tmp_path / "b", "sfda"), resume=True)
    with pytest.raises(ConfigError, match="inside\\) the source run"):
        _run(adapt_raw(source_run, target_dataset, source_run / "adapted", "sfda"))
    # among the target's scans, as train refuses it (adapt wrote a whole run folder there)
    images = next(p for p in sorted(target_dataset.iterdir()) if p.name.startswith("images"))
    with pytest.raises(ConfigError, match=f"lies in the target.dataset's {images.name}/ folder"):
        _run(adapt_raw(source_run, target_dataset, images / "adapted", "sfda"))
    assert not (images / "adapted").exists()
    with pytest.raises(ConfigError, match="adapt.sfda.prior: 3 ratios given"):
        _run(adapt_raw(source_run, target_dataset, tmp_path / "c", "sfda", sfda={"prior": [0.5, 0.25, 0.25]}))
    assert not (tmp_path / "c").exists()
    # a source_run that does not exist is reported as such, not as an output_dir inside it
    with pytest.raises(CheckpointError, match=f"source_run {Path.cwd() / 'typo_run'}: no such run folder or checkpoint file"):
        _run(adapt_raw(Path("typo_run"), target_dataset, Path("d"), "sfda"))
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(DataError, match=f"output_dir {blocker}: {blocker} exists and is not a folder"):
        _run(adapt_raw(source_run, target_dataset, blocker, "sfda"))
    assert blocker.read_text() == "keep"


@pytest.mark.parametrize("losses, kind", [
    ([{"name": "sauna", "weight": 1.0}], "a regression of signed maps"),
    ([{"name": "dice_ce", "weight": 1.0, "sigmoid": True}], "a multi-label head"),
])
def test_a_source_without_softmax_outputs_is_refused(source_run, target_dataset, tmp_path, losses, kind):
    """The methods read the source's outputs through a softmax: a SAUNA (tanh) or sigmoid
    source adapted on confidences it was never trained to give, without a word."""
    from medseg.runfolder import find_checkpoint

    payload = torch.load(find_checkpoint(source_run, prefer=("latest", "best")), map_location="cpu",
                         weights_only=False)
    payload["config"]["losses"] = losses
    run = tmp_path / "other_source"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(payload, run / "checkpoints" / "latest.pt")
    with pytest.raises(ConfigError, match=f"source_run: .*latest.pt was trained as {kind}"):
        _run(adapt_raw(run, target_dataset, tmp_path / "out", "tent"))
    assert not (tmp_path / "out").exists()


def test_target_with_another_channel_count_is_refused(source_run, tmp_path):
    target = make_target_dataset(tmp_path / "two_channels", cases=1, channels=2)
    with pytest.raises(DataError, match="the target has 2 channel\\(s\\), the source model takes 1 \\(target.dataset\\)"):
        _run(adapt_raw(source_run, target, tmp_path / "out", "sfda"))


def test_target_with_other_spatial_dims_is_refused(source_run, make_synthetic_dataset, tmp_path):
    target = make_synthetic_dataset(cases=1, test_cases=0, size=32, dims=2, seed=0)
    raw = adapt_raw(source_run, target, tmp_path / "out", "sfda")
    raw["target"]["eval_labels"] = None
    with pytest.raises(DataError, match="2D image, but the source model was trained on 3D patches \\(target.dataset\\)"):
        _run(raw)


def test_config_errors_name_the_key(tmp_path):
    base = {"source_run": "r", "target": {"dataset": "t"}, "adapt": {"method": "sfda", "iterations": 5}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="unknown key 'adapt.iteratons'"):
        validate_adapt_config({**base, "adapt": {"method": "sfda", "iteratons": 5, "iterations": 5}})
    with pytest.raises(ConfigError, match="adapt.method"):
        validate_adapt_config({**base, "adapt": {"method": "magic", "iterations": 5}})
    with pytest.raises(ConfigError, match="adapt.sfda.prior.*must sum to 1, got 1.1"):
        validate_adapt_config({**base, "adapt": {"method": "sfda", "iterations": 5, "sfda": {"prior": [0.5, 0.6]}}})
    # pseudo_label's prior was not checked: 60 % foreground pseudo-labels, or an IndexError for a negative ratio
    with pytest.raises(ConfigError, match="adapt.pseudo_label.prior.*must sum to 1, got 1.2"):
        validate_adapt_config({**base, "adapt": {"method": "pseudo_label", "iterations": 5,
                                                 "pseudo_label": {"prior": [0.6, 0.6]}}})
    with pytest.raises(ConfigError, match="adapt.pseudo_label.prior.*must not be negative, got -0.5"):
        validate_adapt_config({**base, "adapt": {"method": "pseudo_label", "iterations": 5,
                                                 "pseudo_label": {"prior": [-0.5, 1.5]}}})
    with pytest.raises(ConfigError, match="tent.max_iterations"):
        validate_adapt_config({**base, "adapt": {"method": "tent", "iterations": 500}})
    with pytest.raises(ConfigError, match="source-free"):
        validate_adapt_config({**base, "source_data": {"dataset": "s"}})
    with pytest.raises(ConfigError, match="must not decrease"):
        validate_adapt_config({**base, "adapt": {"method": "pseudo_label", "iterations": 5,
                                                 "pseudo_label": {"curriculum": [0.5, 0.2, 0.9]}}})


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "medseg", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_cli_one_line_errors(source_run, target_dataset, tmp_path):
    empty_run = tmp_path / "not_a_run"
    empty_run.mkdir()
    raw = adapt_raw(empty_run, target_dataset, tmp_path / "out", "sfda")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    result = _cli(["adapt", str(tmp_path / "a.yaml")], tmp_path)
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("medseg:")]
    assert len(lines) == 1 and "no checkpoint found" in lines[0]

    raw["adapt"]["iteratons"] = 3
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    result = _cli(["adapt", str(tmp_path / "b.yaml")], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown key 'adapt.iteratons'" in result.stderr


def test_cli_adapt_with_set_override(source_run, target_dataset, tmp_path):
    raw = adapt_raw(source_run, target_dataset, tmp_path / "out", "tent", iterations=50)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    assert cli_main(["adapt", str(tmp_path / "a.yaml"), "--set", "adapt.iterations=2"]) == 0
    assert load_checkpoint(tmp_path / "out" / "checkpoints" / "latest.pt")["iteration"] == 2


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "adapt").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_adapt_configs_validate(path):
    cfg = load_adapt_config(path)
    assert cfg.adapt.method == path.stem


@pytest.mark.parametrize("method", ["pseudo_label", "mean_teacher"])
def test_semi_supervised_mixing_with_labelled_source_patches(method, source_run, source_dataset, target_dataset, tmp_path):
    raw = adapt_raw(source_run, target_dataset, tmp_path / "mix", method, iterations=2,
                    **({"pseudo_label": {"rounds": 1}} if method == "pseudo_label" else {}))
    raw["source_data"] = {"dataset": str(source_dataset), "batch_size": 1, "weight": 0.5}
    run = _run(raw)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss/source" in header
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[2:]]
    assert float(rows[0][header.index("loss/source")]) > 0


@pytest.mark.parametrize("method", ["pseudo_label", "sfda"])
def test_source_trained_with_deep_supervision_adapts_on_its_final_output(method, source_dataset, target_dataset, tmp_path):
    from adapt_helpers import train_source

    dynunet = {"name": "dynunet", "params": {"filters": [4, 8, 16], "deep_supervision": True}}
    source = train_source(source_dataset, tmp_path / "ds_source", iterations=4, model=dynunet)
    run = _run(adapt_raw(source, target_dataset, tmp_path / "adapted", method, iterations=3))
    adapted = load_checkpoint(run / "checkpoints" / "latest.pt")["model"]
    # the heads stay in the state dict (predict rebuilds the same network) ...
    assert any("deep_supervision_heads" in key for key in adapted)
    assert adapted.keys() == load_checkpoint(source / "checkpoints" / "latest.pt")["model"].keys()
    assert Predictor.from_path(run, "cpu").num_classes == 2


def test_eval_labels_are_checked_as_evaluate_checks_a_reference(source_run, target_dataset, tmp_path):
    """Labels with a value the model does not have, or mirrored (another affine, the same
    shape), were scored: a wrong 'before' Dice where medseg evaluate refuses the pair."""
    import numpy as np

    from medseg.data.io import ImageGeometry, read_image, write_image

    for name, change in (("extra_value", "value"), ("mirrored", "affine")):
        labels = tmp_path / name
        labels.mkdir()
        for path in sorted((target_dataset / "labelsTr").iterdir()):
            seg, geometry = read_image(path)
            seg = np.asarray(seg).astype(np.uint8)
            if change == "value":
                seg[0, 0, 0] = 2
            else:
                geometry = ImageGeometry(np.eye(4), geometry.shape)
            write_image(labels / path.name, seg, geometry)
        raw = adapt_raw(source_run, target_dataset, tmp_path / f"out_{name}", "sfda", iterations=2)
        raw["target"]["eval_labels"] = str(labels)
        message = "label values \\[2\\] are not among the source model's labels" if change == "value" else "affine differs"
        with pytest.raises(DataError, match=message):
            _run(raw)
        assert not (tmp_path / f"out_{name}").exists()


def test_mistakes_found_at_the_first_step_are_found_before_the_run_folder(source_run, source_dataset, target_dataset,
                                                                        make_synthetic_dataset, tmp_path):
    """A patch the network cannot take and source data of other labels or dimensions
    failed at the first step (tracebacks, or errors not naming source_data), and the
    run folder they left refused the corrected rerun."""
    raw = adapt_raw(source_run, target_dataset, tmp_path / "patch", "sfda", iterations=2, patch_size=[18, 18, 18])
    with pytest.raises(ConfigError, match="adapt.patch_size: \\[18, 18, 18\\]"):
        _run(raw)
    assert not (tmp_path / "patch").exists()
    flat = make_synthetic_dataset(cases=2, test_cases=0, size=32, dims=2, seed=0)
    raw = adapt_raw(source_run, target_dataset, tmp_path / "mix", "pseudo_label", iterations=2,
                    pseudo_label={"rounds": 1})
    raw["source_data"] = {"dataset": str(flat), "batch_size": 1}
    with pytest.raises(ConfigError, match=f"source_data.dataset: {flat}: .*2D"):
        _run(raw)
    assert not (tmp_path / "mix").exists()


def test_a_finished_run_is_not_resumed_to_fewer_steps(source_run, target_dataset, tmp_path):
    raw = adapt_raw(source_run, target_dataset, tmp_path / "a", "sfda", iterations=4)
    _run(raw)
    with pytest.raises(ConfigError, match="adapt.iterations: the config says 2 but the run is at step 4"):
        _run({**raw, "adapt": {**raw["adapt"], "iterations": 2}}, resume=True)


def test_an_output_dir_inside_the_source_run_through_a_link_is_refused(source_run, target_dataset, tmp_path):
    """Compared as typed (abspath), a link either way hid that the output lay inside the
    source run, and the source run was written to."""
    before = folder_digest(source_run)
    (tmp_path / "link").symlink_to(source_run)
    for source, output in ((source_run, tmp_path / "link" / "adapted"), (tmp_path / "link", source_run / "adapted2")):
        with pytest.raises(ConfigError, match="inside\\) the source run"):
            _run(adapt_raw(source, target_dataset, output, "sfda", iterations=2))
    assert folder_digest(source_run) == before


def test_a_loose_checkpoints_prior_is_not_read_from_two_folders_up(source_run, target_dataset, tmp_path):
    """A checkpoint file outside a run's checkpoints/ folder took the label_stats.json two
    folders up, an unrelated file: SFDA trained towards its prior (0.4 for 0.02)."""
    import shutil

    loose = tmp_path / "loose" / "models"
    loose.mkdir(parents=True)
    shutil.copy(source_run / "checkpoints" / "latest.pt", loose / "source.pt")
    (tmp_path / "loose" / "label_stats.json").write_text(json.dumps({"ratio_mean": [0.6, 0.4]}))
    from medseg.adaptation.source import load_source

    source = load_source(loose / "source.pt")
    assert source.folder is None and source.label_stats() is None
    assert load_source(source_run / "checkpoints" / "latest.pt").folder == source_run


def test_negative_entropy_weights_are_refused(source_run, target_dataset, tmp_path):
    with pytest.raises(ConfigError, match="entropy_weights"):
        _run(adapt_raw(source_run, target_dataset, tmp_path / "a", "sfda", sfda={"entropy_weights": [-1.0, 0.9]}))
    assert not (tmp_path / "a").exists()


def test_the_padding_of_scans_smaller_than_the_patch_is_never_a_pseudo_label(source_run, target_dataset, tmp_path,
                                                                            monkeypatch):
    """In the argmax mode the padding (0 after normalisation, which the CT model reads as
    vessel) was labelled and admitted like the scan, took most of the foreground
    quantile, and the admitted share was of the padded grid."""
    from medseg.adaptation import pseudo_label as pseudo_label_module

    seen = {}
    real = pseudo_label_module.PseudoLabel._make_labels

    def keep(self):
        real(self)
        seen["masks"] = [m.clone() for m in self.masks]
        seen["shapes"] = [tuple(scan.preprocessed["image"].shape[1:]) for scan in self.ctx.scans]

    raw = adapt_raw(source_run, target_dataset, tmp_path / "a", "pseudo_label", iterations=2, patch_size=[40, 40, 40],
                    pseudo_label={"prior_matching": False, "threshold": 0.0, "curriculum": None, "rounds": 1})
    monkeypatch.setattr(pseudo_label_module.PseudoLabel, "_make_labels", keep)
    _run(raw)
    for mask, shape in zip(seen["masks"], seen["shapes"]):
        assert tuple(mask.shape) != shape  # the scans were padded up to the patch
        inside = mask[tuple(slice(0, n) for n in shape)]
        assert bool(inside.all()) and int(mask.sum()) == inside.numel()  # threshold 0: every own voxel, no padding
    text = (tmp_path / "a" / "adapt.log").read_text()
    assert "100.0% of target voxels admitted" in text, text


def test_the_mean_teachers_first_update_keeps_half_of_the_source(source_run, target_dataset, tmp_path):
    """Tarvainen & Valpola count the step before the teacher's update: after step 1 the
    teacher is (source + student) / 2. Counting from 0 made it a copy of the student, and
    the source weights were never in the teacher."""
    run = _run(adapt_raw(source_run, target_dataset, tmp_path / "mt", "mean_teacher", iterations=1,
                         checkpoint_interval=1))
    checkpoint = load_checkpoint(run / "checkpoints" / "latest.pt")
    source = load_checkpoint(source_run / "checkpoints" / "latest.pt")["model"]
    teacher, student = checkpoint["model"], checkpoint["adaptation"]["student"]
    moved = [k for k in source if source[k].is_floating_point() and not torch.equal(student[k], source[k])]
    assert moved  # the student took a step
    for key in moved:
        torch.testing.assert_close(teacher[key], (source[key] + student[key]) / 2)


def test_curriculum_classes_all_reaches_the_prior_matched_labels(source_run, target_dataset, tmp_path):
    """Under prior matching (the default) the curriculum took the foreground classes only,
    whatever curriculum_classes said: 'all' gave the same labels and weights as 'foreground'."""
    admitted = {}
    for classes in ("foreground", "all"):
        raw = adapt_raw(source_run, target_dataset, tmp_path / classes, "pseudo_label", iterations=1,
                        pseudo_label={"rounds": 1, "curriculum": [0.5], "curriculum_classes": classes})
        _run(raw)
        line = next(l for l in (tmp_path / classes / "adapt.log").read_text().splitlines() if "admitted" in l)
        admitted[classes] = float(line.split("round 1: ")[1].split("%")[0])
    # background on the threshold alone, or its top half too
    assert admitted["all"] < admitted["foreground"] - 10, admitted


def test_an_overflowing_adapt_weight_decay_is_refused_before_the_run_folder(source_run, target_dataset, tmp_path):
    with pytest.raises(ConfigError, match="adapt.weight_decay"):
        _run(adapt_raw(source_run, target_dataset, tmp_path / "a", "tent", weight_decay=1e300))
    assert not (tmp_path / "a").exists()

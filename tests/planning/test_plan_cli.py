"""``medseg plan`` through the real command line: the files, warnings, and bad input as one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.config import load_config

REPO = Path(__file__).resolve().parents[2]


def medseg(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "medseg", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_plan_writes_a_runnable_config(aniso_dataset, tmp_path):
    proc = medseg("plan", aniso_dataset, "--workers", "1", "--topology-loss", "skeleton_recall", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "plans" / aniso_dataset.name  # the default: plans/DATASET/config.yaml
    assert "wrote plans/" in proc.stdout and "batch 2" in proc.stdout
    cfg = load_config(folder / "config.yaml")
    assert cfg.data.target_spacing == pytest.approx([0.8, 0.8, 5.0])
    assert [t.name for t in cfg.losses] == ["dice_ce", "skeleton_recall"]
    assert (folder / "plans.json").is_file() and (folder / "fingerprint.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_plan_names_extreme_cases(extreme_dataset, tmp_path):
    proc = medseg("plan", extreme_dataset, "-o", tmp_path / "c.yaml", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: warning: ")]
    assert any("'thick_slices'" in w for w in warnings) and any("'one_slice'" in w for w in warnings), proc.stderr
    assert "Traceback" not in proc.stderr
    text = (tmp_path / "c.yaml").read_text()
    assert "# WARNING: case 'thick_slices'" in text  # and in the config, next to the plan it concerns


def test_plan_bad_inputs(iso_dataset, tmp_path):
    work = tmp_path / "work"
    work.mkdir()

    def plan(*args):
        return medseg("plan", *args, cwd=work)

    assert_one_line_error(plan(tmp_path / "nowhere"), "nowhere", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(plan(empty), "dataset.json", "not found")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_one_line_error(plan(iso_dataset, "-o", blocker / "config.yaml"), "--output", "a_file exists and is not a folder")
    assert_one_line_error(plan(iso_dataset, "-o", tmp_path, "--workers", "1"), "--output", "is a folder")
    assert_one_line_error(plan(blocker), "a_file: is a file, not a dataset folder")
    assert_one_line_error(plan(iso_dataset, "--model", "vnet"), "--model", "vnet")
    assert_one_line_error(plan(iso_dataset, "--topology-loss", "cldise"), "cldise", "did you mean 'cldice'")
    assert_one_line_error(plan(iso_dataset, "--gpu-memory-gb", "0"), "--gpu-memory-gb")
    assert_one_line_error(plan(iso_dataset, "--workers", "0"), "--workers")
    # an ignore label: train refuses the dataset, so a planned config could not run
    ignoring = Path(shutil.copytree(iso_dataset, tmp_path / "Dataset898_Ignore"))
    info = json.loads((ignoring / "dataset.json").read_text())
    info["labels"]["ignore"] = max(int(v) for v in info["labels"].values()) + 1
    (ignoring / "dataset.json").write_text(json.dumps(info))
    assert_one_line_error(plan(ignoring), "'ignore' label is not supported by the medseg trainer")
    assert list(work.iterdir()) == []  # a failed plan leaves no folder behind


def test_plan_never_writes_over_the_dataset(iso_dataset, tmp_path):
    """-o must name a .yaml file outside the dataset's images/labels folders: the plan's
    files once replaced dataset.json or a training image, and the run exited 0."""
    before = {p: p.read_bytes() for p in iso_dataset.rglob("*") if p.is_file()}
    image = next((iso_dataset / "imagesTr").iterdir())
    assert_one_line_error(medseg("plan", iso_dataset, "-o", iso_dataset / "dataset.json"), "--output", "must name a .yaml")
    assert_one_line_error(medseg("plan", iso_dataset, "-o", image), "--output", "must name a .yaml")
    assert_one_line_error(medseg("plan", iso_dataset, "-o", iso_dataset / "labelsTr" / "c.yaml"), "labelsTr/ folder")
    # a run folder there: the planned config was written, and train refused it
    config = tmp_path / "c.yaml"
    assert_one_line_error(medseg("plan", iso_dataset, "-o", config, "--output-dir", iso_dataset / "imagesTr"),
                          "--output-dir", "imagesTr/ folder")
    assert not config.exists()
    assert {p: p.read_bytes() for p in iso_dataset.rglob("*") if p.is_file()} == before


def test_plan_broken_case(iso_dataset, tmp_path):
    broken = Path(shutil.copytree(iso_dataset, tmp_path / "Dataset899_Broken"))
    label = next((broken / "labelsTr").iterdir())
    label.write_bytes(label.read_bytes()[:200])  # truncated
    proc = medseg("plan", broken, "-o", tmp_path / "out" / "c.yaml", "--workers", "2")
    assert_one_line_error(proc, label.name)
    assert not (tmp_path / "out").exists()


def test_a_plan_replaces_only_its_own_files(iso_dataset, aniso_dataset, tmp_path):
    """Two -o in one folder: the second plan replaced the first's plans.json and
    fingerprint.json, and the first config was then refused as stale; -o over a file of
    the user's own replaced it."""
    folder = tmp_path / "P"
    assert medseg("plan", iso_dataset, "-o", folder / "a.yaml", "--workers", "1").returncode == 0
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = medseg("plan", aniso_dataset, "-o", folder / "b.yaml", "--workers", "1")
    assert_one_line_error(proc, "--output", "plans.json belongs to the plan", "a.yaml", "another folder")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    again = medseg("plan", iso_dataset, "-o", folder / "a.yaml", "--workers", "1")  # its own plan: replanned
    assert again.returncode == 0, again.stderr
    mine = tmp_path / "mine.yaml"
    mine.write_text("x: 1\n")
    assert_one_line_error(medseg("plan", iso_dataset, "-o", mine, "--workers", "1"), "--output", "not a config medseg plan wrote")
    assert mine.read_text() == "x: 1\n"
    # a plan the user edited is theirs: a replan dropped the edit (seed: 7 back to 0)
    edited = (folder / "a.yaml").read_text().replace("\nseed: 0", "\nseed: 7")
    assert "seed: 7" in edited
    (folder / "a.yaml").write_text(edited)
    proc = medseg("plan", iso_dataset, "-o", folder / "a.yaml", "--workers", "1")
    assert_one_line_error(proc, "--output", "was edited since medseg plan wrote it", "remove it or choose another name")
    assert (folder / "a.yaml").read_text() == edited

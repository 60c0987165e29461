"""data_scripts/convert_msd.py on an MSD task extracted by hand."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from medseg.data.dataset import check_dataset
from medseg.data.io import read_image_channels
from medseg.data.prepare.archive import extract_archive
from medseg.errors import DataError


@pytest.fixture
def task_dir(tmp_path, msd_task):
    archive = tmp_path / "Task05_Prostate.tar"
    archive.write_bytes(msd_task.tar_bytes)
    extract_archive(archive, tmp_path / "raw")
    return tmp_path / "raw" / "Task05_Prostate"


def test_convert_msd_script_splits_channels_and_keeps_input(task_dir, msd_task, load_script, tmp_path, capsys):
    out = tmp_path / "Dataset005_Prostate"
    before = sorted(p.name for p in task_dir.rglob("*"))
    assert load_script("convert_msd").main([str(task_dir.parent), "--out", str(out), "--no-test", "--quiet"]) == 0
    assert sorted(p.name for p in task_dir.rglob("*")) == before
    assert not (out / "imagesTs").exists()
    info, cases = check_dataset(out, verify=True)
    assert info.num_channels == 2 and len(cases) == 2
    stacked, geometry = read_image_channels(cases[0].image_files[1])
    np.testing.assert_array_equal(stacked[0], msd_task.images[cases[0].name][..., 1])
    np.testing.assert_allclose(geometry.affine, msd_task.affine, atol=1e-5)


def test_inconsistent_msd_task_is_one_line_error(task_dir, load_script, tmp_path, capsys):
    meta_path = task_dir / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["modality"]["2"] = "DWI"  # declares 3 channels; the 4D images hold 2
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert load_script("convert_msd").main([str(task_dir), "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == (
        f"convert_msd.py: error: {task_dir / 'imagesTr' / 'prostate_00.nii.gz'}: 2 channel(s) "
        f"but dataset.json 'modality' declares 3"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    meta["modality"].pop("2")
    meta["training"][1]["label"] = "./labelsTr/missing.nii.gz"
    meta_path.write_text(json.dumps(meta))
    assert load_script("convert_msd").main([str(task_dir), "--out", str(out), "--quiet"]) == 3
    assert "labelsTr/missing.nii.gz: label file listed in dataset.json not found" in capsys.readouterr().err


def test_archive_members_escaping_the_folder_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    archive = tmp_path / "evil.tar"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"member '\.\./evil\.txt' points outside"):
        extract_archive(archive, tmp_path / "x")
    assert not (tmp_path / "evil.txt").exists()


def test_out_equal_to_the_task_folder_is_refused_even_with_force(task_dir, load_script, capsys):
    before = sorted(p.name for p in task_dir.rglob("*"))
    assert load_script("convert_msd").main([str(task_dir), "--out", str(task_dir), "--force", "--quiet"]) != 0
    assert "must lie outside the task folder" in capsys.readouterr().err
    assert sorted(p.name for p in task_dir.rglob("*")) == before


def test_a_converted_dataset_medseg_would_refuse_is_not_left_as_the_output(task_dir, load_script, tmp_path, capsys):
    """BraTS-style labels {0, 1, 2, 4} were checked after the rename: the error came, and
    the invalid dataset stayed, so the rerun said it already exists. A dead converter's
    temporary folder (SIGTERM) stayed forever."""
    meta_path = task_dir / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = {"0": "background", "1": "a", "2": "b", "4": "d"}
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "Dataset003_gap"
    dead = tmp_path / f".{out.name}.tmp-{2**22 + 7}"  # above any pid_max: a process long gone
    (dead / "imagesTr").mkdir(parents=True)
    assert load_script("convert_msd").main([str(task_dir), "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "consecutive" in err and str(out) in err and ".tmp-" not in err
    assert not out.exists() and not dead.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))

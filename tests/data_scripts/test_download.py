"""data_scripts/download.py against a local HTTP server (127.0.0.1 only, no internet)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.data.dataset import check_dataset, load_case
from medseg.data.io import read_image
from medseg.data.prepare.download import ChecksumError, DownloadError, download_file
from medseg.data.prepare.registry import REGISTRY

REPO = Path(__file__).resolve().parents[2]
TASK = "Task05_Prostate"
ARCHIVE = f"{TASK}.tar"


@pytest.fixture
def download(load_script):
    return load_script("download").main


def _run_cli(args, base_url):
    """The script as a user runs it: a separate process, output captured."""
    env = dict(os.environ, MEDSEG_DATA_BASE_URL=base_url, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "data_scripts" / "download.py"), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_download_converts_msd_task_to_readable_nnunet_layout(http_server, msd_task, download, tmp_path, capsys, monkeypatch):
    http_server.serve(ARCHIVE, msd_task.tar_bytes)
    monkeypatch.setenv("MEDSEG_DATA_BASE_URL", http_server.base_url)  # the documented mirror override
    rc = download([TASK, "--out", str(tmp_path), "--md5", msd_task.md5])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "MD5 ok" in err

    root = tmp_path / "Dataset005_Prostate"
    info, cases = check_dataset(root)
    assert [c.name for c in cases] == sorted(msd_task.images)
    assert info.channel_names == {0: "T2", 1: "ADC"}
    assert info.labels == {"background": 0, "PZ": 1, "TZ": 2}
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["channel_names"] == {"0": "T2", "1": "ADC"}
    assert "modality" not in meta and "training" not in meta  # v2 form, not MSD

    for case in cases:
        assert [f.name for f in case.image_files] == [f"{case.name}_0000.nii.gz", f"{case.name}_0001.nii.gz"]
        source = msd_task.images[case.name]
        for c, f in enumerate(case.image_files):
            array, geometry = read_image(f)  # single-channel 3D file
            np.testing.assert_array_equal(array, source[..., c])
            np.testing.assert_allclose(geometry.affine, msd_task.affine, atol=1e-5)
        assert case.label_file.read_bytes() == msd_task.label_bytes[case.name]  # copied, not re-encoded
        loaded = load_case(case, info)
        np.testing.assert_array_equal(loaded["label"][0], msd_task.labels[case.name])

    test_files = sorted(p.name for p in (root / "imagesTs").iterdir())
    assert test_files == ["prostate_01_0000.nii.gz", "prostate_01_0001.nii.gz"]
    assert not any(p.name.startswith("._") for p in root.rglob("*")), "macOS junk leaked into the dataset"
    # Archive removed without --keep-archive; no partial or extraction leftovers.
    assert not (tmp_path / ARCHIVE).exists()
    assert list((tmp_path / ".partial").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial", "Dataset005_Prostate"]


def test_single_channel_task_images_are_copied_byte_for_byte(http_server, msd_task_3d, download, tmp_path, capsys):
    http_server.serve("Task09_Spleen.tar", msd_task_3d.tar_bytes)
    args = ["Task09_Spleen", "--out", str(tmp_path), "--md5", msd_task_3d.md5, "--base-url", http_server.base_url]
    assert download(args + ["--quiet", "--verify"]) == 0, capsys.readouterr().err
    info, cases = check_dataset(tmp_path / "Dataset009_Spleen")
    assert info.channel_names == {0: "CT"}
    for case in cases:
        assert [f.name for f in case.image_files] == [f"{case.name}_0000.nii.gz"]
        assert case.image_files[0].read_bytes() == msd_task_3d.image_bytes[case.name]  # header and data untouched


def test_keep_archive_and_no_convert_give_the_task_as_published(http_server, msd_task, download, tmp_path, capsys):
    http_server.serve(ARCHIVE, msd_task.tar_bytes)
    args = [TASK, "--out", str(tmp_path), "--md5", msd_task.md5, "--base-url", http_server.base_url, "--quiet"]
    assert download(args + ["--keep-archive", "--no-convert"]) == 0, capsys.readouterr().err
    assert (tmp_path / ARCHIVE).read_bytes() == msd_task.tar_bytes
    task = tmp_path / TASK
    assert json.loads((task / "dataset.json").read_text())["modality"] == {"0": "T2", "1": "ADC"}
    assert check_dataset(task)[0].num_channels == 2  # medseg reads the MSD form too

    # A second run reuses the verified archive instead of downloading it again.
    requests = len(http_server.log)
    assert download(args + ["--name", "Converted"]) == 0
    assert len(http_server.log) == requests
    assert "already downloaded, MD5 ok" in capsys.readouterr().err
    assert check_dataset(tmp_path / "Converted")[1]
    # Existing output: refused before any download, with one line naming it.
    assert download(args + ["--name", "Converted"]) == 3
    assert capsys.readouterr().err.strip().endswith("Converted: already exists (pass --force to replace it)")


def test_wrong_checksum_is_one_line_error_and_file_moved_aside(http_server, msd_task, tmp_path):
    http_server.serve(ARCHIVE, msd_task.tar_bytes)
    # No --md5: the registry's published MD5 of the real archive cannot match the test bytes.
    result = _run_cli([TASK, "--out", str(tmp_path), "--quiet"], http_server.base_url)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("download.py: error: ") and "MD5 mismatch" in last
    assert REGISTRY[TASK].md5 in last and msd_task.md5 in last
    corrupt = tmp_path / ".partial" / f"{ARCHIVE}.corrupt"
    assert str(corrupt) in last
    assert corrupt.read_bytes() == msd_task.tar_bytes  # kept as evidence, not silently reused
    assert not (tmp_path / ARCHIVE).exists() and not (tmp_path / ".partial" / ARCHIVE).exists()
    assert not (tmp_path / "Dataset005_Prostate").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda tar: b"this is not a tar file at all\n" * 40, "not a tar or zip archive"),
        (lambda tar: tar[: len(tar) // 2], "corrupt or truncated archive"),
    ],
    ids=["garbage", "truncated"],
)
def test_corrupt_archive_is_one_line_error(http_server, msd_task, tmp_path, damage, message):
    body = damage(msd_task.tar_bytes)
    http_server.serve(ARCHIVE, body)
    md5 = hashlib.md5(body).hexdigest()  # the bytes arrive intact; the archive itself is bad
    result = _run_cli([TASK, "--out", str(tmp_path), "--md5", md5, "--quiet"], http_server.base_url)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("download.py: error: ") and message in last and ARCHIVE in last
    assert not (tmp_path / "Dataset005_Prostate").exists()
    assert not list(tmp_path.glob(".Dataset005*")), "half-converted folder left behind"


def test_interrupted_transfer_resumes_with_range_request(http_server, msd_task, tmp_path):
    cut = len(msd_task.tar_bytes) // 3
    url = http_server.serve(ARCHIVE, msd_task.tar_bytes, drop_after=cut)
    messages = []
    dest = download_file(url, tmp_path / ARCHIVE, checksum=("md5", msd_task.md5), retries=2, backoff=0,
                         timeout=5, progress=False, log=messages.append)
    assert dest.read_bytes() == msd_task.tar_bytes
    assert http_server.ranges(ARCHIVE) == [None, f"bytes={cut}-"]
    assert any(f"interrupted at {cut} bytes" in m for m in messages)
    assert any(f"resuming at {cut} bytes" in m for m in messages)


def test_rerun_resumes_a_partial_file_left_by_a_failed_run(http_server, msd_task, tmp_path, download, capsys):
    cut = 1000
    http_server.serve(ARCHIVE, msd_task.tar_bytes, drop_after=cut)
    args = [TASK, "--out", str(tmp_path), "--md5", msd_task.md5, "--base-url", http_server.base_url, "--quiet"]
    assert download(args + ["--retries", "0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "transfer interrupted at 1000 bytes" in err and "run again to resume" in err
    assert (tmp_path / ".partial" / ARCHIVE).stat().st_size == cut
    assert not (tmp_path / ARCHIVE).exists()  # never a partial file under the final name

    assert download(args) == 0, capsys.readouterr().err
    assert http_server.ranges(ARCHIVE) == [None, f"bytes={cut}-"]
    assert check_dataset(tmp_path / "Dataset005_Prostate")[1]


def test_server_ignoring_range_restarts_from_zero(http_server, msd_task, tmp_path):
    url = http_server.serve(ARCHIVE, msd_task.tar_bytes, honour_range=False)
    partial = tmp_path / ".partial" / ARCHIVE
    partial.parent.mkdir()
    partial.write_bytes(b"X" * 500)  # appending a full 200 body to this would corrupt the file
    messages = []
    dest = download_file(url, tmp_path / ARCHIVE, checksum=("md5", msd_task.md5), progress=False, log=messages.append)
    assert dest.read_bytes() == msd_task.tar_bytes
    assert http_server.ranges(ARCHIVE) == ["bytes=500-"]
    assert any("ignored the Range request" in m for m in messages)


def test_http_errors_and_unverified_downloads(http_server, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404"):
        download_file(f"{http_server.base_url}/missing.tar", tmp_path / "missing.tar", progress=False, log=lambda m: None)
    with pytest.raises(DownloadError, match="only http:// and https://"):
        download_file("ftp://127.0.0.1/x.tar", tmp_path / "x.tar", progress=False, log=lambda m: None)

    url = http_server.serve("plain.bin", b"abc" * 100)
    messages = []
    download_file(url, tmp_path / "plain.bin", checksum=None, progress=False, log=messages.append)
    sha = hashlib.sha256(b"abc" * 100).hexdigest()
    assert any("UNVERIFIED" in m and sha in m for m in messages)
    with pytest.raises(ChecksumError, match="SHA256 mismatch"):
        download_file(url, tmp_path / "again.bin", checksum=("sha256", "0" * 64), progress=False, log=lambda m: None)


def test_unknown_dataset_and_bad_msd_json(download, capsys, tmp_path):
    assert download(["Task99_Nothing", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("download.py: error: unknown dataset 'Task99_Nothing'") and "Task08_HepaticVessel" in err
    assert len(err.splitlines()) == 1


def test_registry_has_every_msd_task_with_published_md5():
    msd = [s for s in REGISTRY.values() if s.kind == "msd"]
    assert len(msd) == 10
    for s in msd:
        assert s.url() == f"https://msd-for-monai.s3-us-west-2.amazonaws.com/{s.name}.tar"
        assert s.md5 is not None and len(s.md5) == 32 and int(s.md5, 16) >= 0
    assert REGISTRY["Task08_HepaticVessel"].converted_name == "Dataset008_HepaticVessel"
    assert REGISTRY["Task08_HepaticVessel"].url("http://127.0.0.1:9/") == "http://127.0.0.1:9/Task08_HepaticVessel.tar"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timeout", "-1"], "--timeout: must be a positive number of seconds"),
        (["--timeout", "0"], "--timeout: must be a positive number of seconds"),
        (["--retries", "-1"], "--retries: must be 0 or more"),
        (["--md5", "zzz"], "--md5: expected 32 hexadecimal digits"),
        (["--sha256", "abc"], "--sha256: expected 64 hexadecimal digits"),
    ],
)
def test_bad_options_are_refused_before_downloading(download, capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_:
        download([TASK, "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

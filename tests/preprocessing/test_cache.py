"""The preprocessing cache: equal to the in-memory pipeline, reused only when valid,
resumable to the same bytes, and one-line errors for a folder it cannot write."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cache_helpers import cache_files, make_padded_dataset, raw_config

import medseg
from medseg.cli import main as cli_main
from medseg.config import validate_config
from medseg.data.dataset import load_case
from medseg.data.topology_targets import label_projection
from medseg.data.transforms import build_transforms
from medseg.errors import ConfigError, DataError
from medseg.preprocessing import preprocess_dataset, select_cases
from medseg.preprocessing import run as run_module
from medseg.preprocessing.storage import case_files, valid_case_meta

REPO = Path(__file__).resolve().parents[2]


def _preprocess(raw: dict, **kwargs):
    cfg = validate_config(raw)
    info, train, val = select_cases(cfg)
    return cfg, info, preprocess_dataset(cfg, info, train, val, progress=False, **kwargs)


@pytest.mark.parametrize("normalization", ["ct", "zscore"])
def test_the_cache_is_the_in_memory_pipeline_voxel_for_voxel(padded_dataset, tmp_path, normalization):
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache", normalization={"scheme": normalization})
    cfg, info, cache = _preprocess(raw, workers=2)
    assert cache.done == 5 and len(cache.cases) == 5
    val = build_transforms(cfg, info, cache.preprocessing, "val")
    cropped = 0
    for case in select_cases(cfg)[1] + select_cases(cfg)[2]:
        want = val(load_case(case, info))
        image, label = cache.cases[case.name].whole()
        bbox = cache.cases[case.name].bbox
        window = tuple(slice(a, b) for a, b in bbox)
        want_image = want["image"].as_tensor().numpy()
        want_label = want["label"].as_tensor().numpy()
        np.testing.assert_array_equal(image, want_image[(slice(None), *window)])
        np.testing.assert_array_equal(label, want_label[(slice(None), *window)])
        assert image.dtype == np.float32 and label.dtype == np.uint8
        cropped += image[0].size < want_image[0].size
        assert want_label.sum() == label.astype(np.int64).sum()  # the crop keeps every foreground voxel

        stored = cache.cases[case.name]
        for value in (1, 2):
            locations = stored.class_locations(value)
            assert len(locations) == stored.class_counts[value] == min((label == value).sum(), 10_000) > 0
            assert np.all(label[0][tuple(locations.T)] == value)
        projection = label_projection(label[0], axes=(0, 1, 2))
        region = stored.projection_region((0, 1, 2), [0, 0, 0], label.shape[1:])
        np.testing.assert_array_equal(region, projection)
    assert cropped == 5  # the zero border is cropped away in every case


def test_a_rerun_reuses_the_cache_without_reading_the_dataset(padded_dataset, tmp_path, monkeypatch):
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache")
    first = _preprocess(raw)[2]
    before = cache_files(tmp_path / "cache")

    def no_fit(*args, **kwargs):
        raise AssertionError("the statistics were fitted again")

    monkeypatch.setattr(run_module, "fit_preprocessing", no_fit)
    monkeypatch.setattr(run_module, "preprocess_case", no_fit)
    second = _preprocess(raw)[2]
    assert second.done == 0 and second.folder == first.folder and second.preprocessing == first.preprocessing
    assert cache_files(tmp_path / "cache") == before


def _add_case(dataset: Path, source: str, name: str) -> None:
    """A new case with the files of ``source`` (another case's bytes under a new name)."""
    for folder in ("imagesTr", "labelsTr"):
        for path in sorted((dataset / folder).glob(f"{source}*")):
            shutil.copyfile(path, path.with_name(path.name.replace(source, name)))
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["numTraining"] += 1
    (dataset / "dataset.json").write_text(json.dumps(meta))


def test_a_case_added_preprocesses_that_case_alone_the_others_are_linked(padded_dataset, tmp_path):
    """Adding one case changed the cache's key, and every case was preprocessed again
    (hours for a large dataset); the unchanged ones are now hard links to the earlier
    cache's files, byte for byte what preprocessing them again gives."""
    dataset = tmp_path / "dataset"
    shutil.copytree(padded_dataset, dataset)
    raw = raw_config(dataset, tmp_path / "run", tmp_path / "cache", normalization={"scheme": "zscore"},
                     val_fraction=0.2)
    first = _preprocess(raw)[2]
    _add_case(dataset, "case_004", "case_005")
    second = _preprocess(raw)[2]
    assert second.folder != first.folder and second.done == 1 and second.linked == 5 and len(second.cases) == 6
    fresh = _preprocess({**raw, "data": {**raw["data"], "cache_dir": str(tmp_path / "fresh")}})[2]
    assert fresh.done == 6
    assert cache_files(second.folder) == cache_files(fresh.folder)  # same bytes, the same key in every JSON
    for name in first.cases:
        for file in case_files(name)[:2]:
            assert (second.folder / file).stat().st_ino == (first.folder / file).stat().st_ino
    shutil.rmtree(first.folder)  # the earlier cache can go: the links keep the files
    assert _preprocess(raw)[2].done == 0


def test_no_case_is_linked_when_the_statistics_changed(padded_dataset, tmp_path):
    """The CT scheme's clip and z-score come from the training cases: a case added to them
    changes every case's voxels, and nothing may be taken from the earlier cache."""
    dataset = tmp_path / "dataset"
    shutil.copytree(padded_dataset, dataset)
    raw = raw_config(dataset, tmp_path / "run", tmp_path / "cache", normalization={"scheme": "ct"}, val_fraction=0.2)
    first = _preprocess(raw)[2]
    _add_case(dataset, "case_002", "case_005")
    (dataset / "imagesTr" / "case_005_0000.nii.gz").write_bytes(
        (dataset / "imagesTr" / "case_000_0000.nii.gz").read_bytes())  # another image: other statistics
    second = _preprocess(raw)[2]
    assert second.preprocessing != first.preprocessing
    assert second.done == 6
    assert not any((second.folder / case_files(n)[0]).stat().st_ino == (first.folder / case_files(n)[0]).stat().st_ino
                   for n in first.cases)


def test_a_linked_case_whose_source_changed_is_preprocessed_again(padded_dataset, tmp_path):
    """What would be linked is checked against its recorded SHA-256, also when training
    builds the cache (which checks only the sizes of its own folder's files): a damaged
    file of the old folder was carried into the new one unseen."""
    dataset = tmp_path / "dataset"
    shutil.copytree(padded_dataset, dataset)
    raw = raw_config(dataset, tmp_path / "run", tmp_path / "cache", normalization={"scheme": "zscore"},
                     val_fraction=0.2)
    first = _preprocess(raw)[2]
    damaged = first.folder / case_files("case_001")[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    _add_case(dataset, "case_004", "case_005")
    second = _preprocess(raw)[2]  # as train calls it: verify=False
    assert second.done == 2  # the new case and the damaged one
    assert (second.folder / case_files("case_001")[0]).stat().st_ino != damaged.stat().st_ino
    assert not [p.name for p in second.folder.iterdir() if p.name.startswith(".")]  # no temporaries


def test_placing_a_file_leaves_no_temporary(tmp_path):
    """Linking onto a link of the same file (a second process, a rerun) renamed the
    temporary onto it, which does nothing, and left the temporary; a source deleted
    meanwhile (an old cache folder removed) failed the run instead of being preprocessed."""
    from medseg.preprocessing.storage import _place

    source, target = tmp_path / "old" / "a.b2nd", tmp_path / "new" / "a.b2nd"
    source.parent.mkdir()
    target.parent.mkdir()
    source.write_bytes(b"voxels")
    assert _place(source, target) and target.read_bytes() == b"voxels"
    assert target.stat().st_ino == source.stat().st_ino
    os.unlink(target)
    os.link(source, target)
    assert _place(source, target)  # already the same file
    assert _place(source, target.with_name("b.b2nd"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.b2nd", "b.b2nd"]
    source.unlink()
    assert not _place(source, target.with_name("c.b2nd"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.b2nd", "b.b2nd"]


def test_a_stale_cache_is_rebuilt_never_reused(padded_dataset, tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"
    shutil.copytree(padded_dataset, dataset)
    raw = raw_config(dataset, tmp_path / "run", tmp_path / "cache")
    base = _preprocess(raw)[2]
    folders = {base.folder}

    # another plan: another folder, every case preprocessed again
    other = _preprocess({**raw, "data": {**raw["data"], "target_spacing": [1.2, 1.2, 1.5]}})[2]
    assert other.folder not in folders and other.done == 5
    folders.add(other.folder)
    # another medseg version
    monkeypatch.setattr(medseg, "__version__", "99.0")
    newer = _preprocess(raw)[2]
    assert newer.folder not in folders and newer.done == 5
    folders.add(newer.folder)
    monkeypatch.undo()
    # a changed input file (new content, new time)
    victim = sorted((dataset / "labelsTr").iterdir())[0]
    time.sleep(0.01)
    victim.write_bytes(victim.read_bytes())
    changed = _preprocess(raw)[2]
    # a new folder; the case of the changed file is preprocessed again, the others (same
    # files, same statistics: the rewrite kept the bytes) are linked from the earlier cache
    assert changed.folder not in folders and changed.done == 1
    assert changed.preprocessing == base.preprocessing
    for name, case in changed.cases.items():
        image = case_files(name)[0]
        linked = (changed.folder / image).stat().st_ino == (base.folder / image).stat().st_ino
        assert linked == (name != victim.name.removesuffix(".nii.gz"))

    # two labels of the same size and time swapped by renaming (mv, as after unpacking a
    # tar whose whole-second times are equal): the old key reused the cache, labels swapped
    same = dataset / "labelsTr" / "same_size"
    same.mkdir()
    first, second = sorted((dataset / "labelsTr").glob("case_00[01].nii.gz"))
    for path, other in ((first, second), (second, first)):  # same bytes count: pad the gzip members
        data = path.read_bytes()
        path.write_bytes(data + b"\0" * (max(len(data), len(other.read_bytes())) - len(data)))
    assert first.stat().st_size == second.stat().st_size
    stamp = first.stat().st_mtime_ns
    for path in (first, second):
        os.utime(path, ns=(stamp, stamp))
    before = _preprocess(raw)[2]
    folders.add(before.folder)
    first.rename(same / "x")
    second.rename(first)
    (same / "x").rename(second)
    same.rmdir()
    assert first.stat().st_mtime_ns == second.stat().st_mtime_ns == stamp
    swapped = _preprocess(raw)[2]
    # the two swapped cases again; the others too when the swap changed the statistics
    # (the CT scheme's foreground percentiles are taken over the training labels)
    assert swapped.folder not in folders
    assert swapped.done == (2 if swapped.preprocessing == before.preprocessing else 5)
    assert before.cases["case_000"].raw_histogram != before.cases["case_001"].raw_histogram
    assert swapped.cases["case_000"].raw_histogram == before.cases["case_001"].raw_histogram

    # inside a folder: a case whose JSON is from another key, or whose image is cut short, is redone
    again = _preprocess(raw)[2]
    assert again.done == 0
    folder = again.folder
    reference = cache_files(folder)
    names = sorted(again.cases)
    meta_file = folder / case_files(names[0])[2]
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "key": "0" * 64}))
    image_file = folder / case_files(names[1])[0]
    image_file.write_bytes(image_file.read_bytes()[:-10])
    assert valid_case_meta(folder, names[0], again.key) is None
    assert valid_case_meta(folder, names[1], again.key) is None
    repaired = _preprocess(raw)[2]
    assert repaired.done == 2
    assert cache_files(folder) == reference


def test_a_killed_preprocess_resumes_to_the_same_cache(padded_dataset, tmp_path):
    reference_raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "reference")
    _preprocess(reference_raw)
    reference = cache_files(tmp_path / "reference")

    root = tmp_path / "killed"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(padded_dataset, tmp_path / "run", root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "preprocess", str(config), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(root.glob("*/case_*.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folders = [p for p in root.glob("*-*") if p.is_dir()]
    assert len(folders) == 1, proc.stderr.read().decode()[-2000:]
    folder = folders[0]
    done = sorted(folder.glob("case_*.json"))
    assert 1 <= len(done) < 5, "the run finished before it could be killed"

    # what a kill in the middle of a write leaves: a dead writer's temporary file, and
    # an image renamed into place without its JSON
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from medseg.atomic import host_tag

    (folder / f".case_004.b2nd.{host_tag()}-{dead.stdout.strip()}.tmp").write_bytes(b"partial")
    (folder / "case_004.b2nd").write_bytes(b"an image without its JSON")
    manifest_temporary = folder / f".manifest.json.{host_tag()}-{dead.stdout.strip()}.tmp"  # killed writing it
    manifest_temporary.write_bytes(b"partial")

    assert cli_main(["preprocess", str(config), "--workers", "2"]) == 0
    assert cache_files(root) == reference
    assert not manifest_temporary.exists()  # its rerun found the manifest written and returned early: it stayed


def test_an_unwritable_cache_folder_is_one_line_naming_it(padded_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(padded_dataset, tmp_path / "run", blocker / "cache")))
    for command in (["preprocess", str(config)], ["train", str(config)]):
        assert cli_main(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (f"medseg: error: {blocker / 'cache'}: the preprocessing cache folder cannot be made, {blocker} exists "
                "and is not a folder") in err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_leaves_no_partial_case(padded_dataset, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(padded_dataset, tmp_path / "run", root)))
    real_fsync = os.fsync

    def full_disk(fd):  # the disk fills up while case_002's label is written
        if "case_002_seg" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name the file being written")
    monkeypatch.setattr(os, "fsync", full_disk)
    assert cli_main(["preprocess", str(config), "--workers", "1"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    (folder,) = [p for p in root.glob("*-*") if p.is_dir()]
    assert f"medseg: error: {folder}: cannot write the preprocessing cache (No space left on device)" in err
    assert not list(folder.glob(".*.tmp")) and not (folder / "case_002.json").exists()
    assert not (folder / "case_002_seg.b2nd").exists()

    # after freeing space, the rerun completes the cache as one uninterrupted run writes it
    assert cli_main(["preprocess", str(config), "--workers", "1"]) == 0
    _preprocess(raw_config(padded_dataset, tmp_path / "run", tmp_path / "reference"))
    assert cache_files(root) == cache_files(tmp_path / "reference")


def test_dimensionality_mismatch_is_a_config_error(padded_dataset, tmp_path):
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache", patch_size=[16, 16], target_spacing=None)
    with pytest.raises(ConfigError, match=r"data\.patch_size.*3D"):
        select_cases(validate_config(raw))  # from the headers: before the statistics read every case
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not hasattr(__import__("torch").distributed, "is_gloo_available")
                    or not __import__("torch").distributed.is_gloo_available(), reason="no gloo")
def test_torchrun_shards_the_cases_and_writes_the_same_cache(padded_dataset, tmp_path):
    import socket

    _preprocess(raw_config(padded_dataset, tmp_path / "run", tmp_path / "single"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(padded_dataset, tmp_path / "run", tmp_path / "ddp")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--local_addr", "127.0.0.1",
         "-m", "medseg", "preprocess", str(config), "--workers", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("medseg: 5 cases (5 preprocessed now)") == 1  # rank 0 reports
    assert cache_files(tmp_path / "ddp") == cache_files(tmp_path / "single")


def test_a_second_dataset_layout_works(tmp_path):
    """Two channels (CT + an MR-like one): one normalisation scheme each, in the manifest."""
    root = make_padded_dataset(tmp_path / "two", cases=3, channels=("CT", "T2"))
    cfg, info, cache = _preprocess(raw_config(root, tmp_path / "run", tmp_path / "cache"))
    image, label = next(iter(cache.cases.values())).whole()
    assert image.shape[0] == 2 and label.shape[0] == 1
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    assert manifest["key"] == cache.key and [c["scheme"] for c in manifest["preprocessing"]["channels"]] == ["ct", "zscore"]


@pytest.mark.parametrize("renamed,message", [
    ("case_001_seg", "cases 'case_001' and 'case_001_seg' would share a file in the preprocessing cache"),
    ("manifest", "case 'manifest' and the cache's own manifest.json would share a file"),
])
def test_case_names_whose_cache_files_collide_are_refused_by_name(tmp_path, renamed, message):
    """Case liver_seg's image is case liver's label file: each overwrote the other and
    training failed on every run with "cases ... are missing after preprocessing"."""
    root = make_padded_dataset(tmp_path / "data", cases=3)
    for folder, ending in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (root / folder / f"case_002{ending}").rename(root / folder / f"{renamed}{ending}")
    with pytest.raises(DataError, match=re.escape(message)):
        _preprocess(raw_config(root, tmp_path / "run", tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    from medseg.planning import run_plan  # plan refuses them too: its config could not have run

    with pytest.raises(DataError, match=re.escape(message)):
        run_plan(root, output=tmp_path / "plan" / "config.yaml", workers=1, progress=False)
    assert not (tmp_path / "plan").exists()


def test_label_statistics_from_the_cache_equal_those_from_the_files(padded_dataset, tmp_path):
    from medseg.data.dataset import label_statistics

    cfg, info, cache = _preprocess(raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache"))
    train = select_cases(cfg)[1]
    assert cache.label_statistics([c.name for c in train], info) == label_statistics(train, info)


def test_a_cache_file_damaged_in_place_is_named_when_read(padded_dataset, tmp_path):
    """Same size, other bytes: the cache takes the file (its size matches), and the read
    failed with a bare Blosc2 error naming neither file nor case."""
    from medseg.errors import MedsegError

    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache")
    dataset = _preprocess(raw)[2]
    case = next(iter(dataset.cases.values()))
    image_file = dataset.folder / case_files(case.name)[0]
    data = bytearray(image_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])
    image_file.write_bytes(bytes(data))
    damaged = type(case)(dataset.folder, json.loads((dataset.folder / case_files(case.name)[2]).read_text()))
    with pytest.raises(MedsegError, match=rf"{image_file.name}: corrupt cache file .*rerun medseg preprocess"):
        damaged.whole()


def test_a_worker_that_dies_is_named_in_one_line_and_the_other_cases_are_written(monkeypatch, tmp_path):
    """A worker killed (out of memory, a signal) broke the pool: a BrokenProcessPool
    traceback reached the user, then one line naming whichever case came first, and the
    cases after it were not written. Now the case that dies alone is named, and every
    other case is written (medseg.process_pool)."""
    import os

    from medseg.data.dataset import Case
    from medseg.errors import MedsegError
    from medseg.preprocessing import run

    def die(case, *args):
        if case.name == "b":
            os._exit(9)  # as the kernel's OOM killer would leave it
        return case.name

    monkeypatch.setattr(run, "preprocess_case", die)
    monkeypatch.setattr(run, "write_case", lambda folder, written, key: (tmp_path / written).touch())
    cases = [Case(name, [Path(f"{name}.nii.gz")]) for name in "abcde"]
    job = {"info": None, "config": None, "preprocessing": None, "folder": None, "key": None}
    with pytest.raises(MedsegError, match=r"^preprocessing case 'b': a worker process died running it alone \(out "
                                          r"of memory, or killed\); the other cases are written"):
        run._run_cases(cases, job, 2, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "d", "e"]


def test_preprocess_verifies_the_cached_files_and_rewrites_one_changed_in_place(padded_dataset, tmp_path, caplog):
    """A cache file changed at the same size passed the size check and was trained on as it
    was; ``medseg preprocess`` now checks each file's recorded SHA-256 (training does not:
    it would read the whole cache at every start)."""
    root = tmp_path / "cache"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(padded_dataset, tmp_path / "run", root)))
    assert cli_main(["preprocess", str(config), "--workers", "1"]) == 0
    reference = cache_files(root)
    damaged = next(p for p in sorted(root.rglob("*.b2nd")) if not p.name.endswith("_seg.b2nd"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    cfg = validate_config(yaml.safe_load(config.read_text()))
    info, train, val = select_cases(cfg)
    assert preprocess_dataset(cfg, info, train, val, progress=False).done == 0  # training: sizes only
    assert cache_files(root) != reference
    with caplog.at_level("WARNING", logger="medseg.preprocessing"):
        assert cli_main(["preprocess", str(config), "--workers", "1"]) == 0
    assert f"{damaged}: its SHA-256 is not the one recorded" in caplog.text
    assert cache_files(root) == reference


def test_medsegs_warnings_are_one_line_on_the_command_line(tmp_path, capsys):
    """train and preprocess printed Python's form of a DatasetWarning: medseg's source
    file and line, then the code line; plan printed one line. Now every command does."""
    root = make_padded_dataset(tmp_path / "data", cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 4}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw_config(root, tmp_path / "run", tmp_path / "cache")))
    assert cli_main(["preprocess", str(config), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "numTraining" in ln]
    assert lines == [f"medseg: warning: {root / 'dataset.json'}: numTraining is 4 but 3 training case(s) were found"]
    assert "DatasetWarning" not in err and ".py:" not in err
    assert cli_main(["preprocess", str(config), "--workers", "0"]) == 2  # click printed its usage block
    assert capsys.readouterr().err.strip() == "medseg: error: --workers: must be at least 1, got 0"


def test_the_workers_of_a_killed_preprocessing_exit_with_it(tmp_path):
    """train killed (SIGKILL, SIGTERM) while filling the cache left its fork workers
    blocked on the pool's queue, each holding its memory, until killed by hand."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import sys, time\n"
        "from medseg.preprocessing import run\n"
        "def slow(case):\n"
        "    time.sleep(120)\n"
        "run._preprocess_one = slow\n"
        "print('started', flush=True)\n"
        "run._run_cases(['a', 'b', 'c'], {}, workers=2, show=False)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.time() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.2)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        assert len(workers) == 2
        time.sleep(1.0)  # the workers run their initializer
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        assert alive == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

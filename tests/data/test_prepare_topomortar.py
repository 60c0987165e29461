"""data_scripts/prepare_topomortar.py on the few TopoMortar images in tests/data/topomortar."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.dataset import check_dataset, load_case, split_cases
from medseg.data.io import read_image
from medseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SRC = Path(__file__).with_name("topomortar")
TRAIN, VAL = ["001", "002", "003"], ["051", "052"]
TESTS = {"Ts": ["071", "072"], "Ts_colors": ["171", "172"], "Ts_shadows": ["321", "322"]}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("prepare_topomortar", REPO / "data_scripts" / "prepare_topomortar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(script, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("topomortar") / "Dataset201_TopoMortar"
    assert script.main(["--src", str(SRC), "--out", str(out)]) == 0
    return out


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_layout_and_dataset_json(converted):
    assert sorted(p.name for p in converted.iterdir()) == [
        "LICENSE", "dataset.json", "imagesTr", "imagesTs", "imagesTs_colors", "imagesTs_shadows", "imagesVal",
        "labelsTr", "labelsTs", "labelsTs_colors", "labelsTs_shadows", "labelsVal", "splits_final.json",
        "splits_small.json"]
    assert sorted(p.name for p in (converted / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in TRAIN + VAL]
    for folder, cases in TESTS.items():
        assert sorted(p.name for p in (converted / f"images{folder}").iterdir()) == [f"{c}_0000.png" for c in cases]
        assert sorted(p.name for p in (converted / f"labels{folder}").iterdir()) == [f"{c}.png" for c in cases]
    meta = json.loads((converted / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "mortar": 1}
    assert (meta["numTraining"], meta["file_ending"], meta["training_labels"]) == (5, ".png", "accurate")
    assert meta["test_sets"] == {f"images{f}": f"labels{f}" for f in TESTS}
    assert (converted / "LICENSE").read_text() == (SRC / "LICENSE").read_text()


def test_images_copied_and_masks_binarised(converted):
    parts = [("Tr", "train", TRAIN), ("Tr", "val", VAL), ("Val", "val", VAL)]
    assert sorted(p.name for p in (converted / "imagesVal").iterdir()) == [f"{c}_0000.png" for c in VAL]
    for folder, part, cases in parts + [(f, "test", c) for f, c in TESTS.items()]:
        for case in cases:
            assert (converted / f"images{folder}" / f"{case}_0000.png").read_bytes() == (SRC / part / "images" / f"{case}.png").read_bytes()
            label, _ = read_image(converted / f"labels{folder}" / f"{case}.png")
            assert np.array_equal(label, (_mask(SRC / part / "accurate" / f"{case}.png") >= 128).astype(label.dtype))


def test_medseg_reads_it_with_the_published_split(converted):
    info, cases = check_dataset(converted, verify=True)
    assert info.num_channels == 3 and [c.name for c in cases] == TRAIN + VAL
    loaded = load_case(cases[0], info)
    assert loaded["image"].shape == (3, 160, 160) and loaded["label"].shape == (1, 160, 160)
    train, val = split_cases(cases, 0.2, 0, "splits_final.json", root=converted)
    assert ([c.name for c in train], [c.name for c in val]) == (TRAIN, VAL)
    small = json.loads((converted / "splits_small.json").read_text())
    assert small == [{"train": ["001"], "val": ["051", "052"]}]  # the published small split, restricted to what is held


def test_noisy_labels_and_stray_grey_values(script, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    mask_path = src / "train" / "noisy" / "002.png"
    mask = _mask(mask_path).copy()
    mask[0, :3] = [127, 128, 200]  # stray grey values, as in one published mask
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "out"
    assert script.main(["--src", str(src), "--out", str(out), "--labels", "noisy"]) == 0
    label, _ = read_image(out / "labelsTr" / "002.png")
    assert label[0, :3].tolist() == [0, 1, 1]
    assert np.array_equal(label, (mask >= 128).astype(label.dtype))
    test_label, _ = read_image(out / "labelsTs" / "071.png")  # test sets keep the accurate labels
    assert np.array_equal(test_label, (_mask(SRC / "test" / "accurate" / "071.png") >= 128).astype(test_label.dtype))
    assert json.loads((out / "dataset.json").read_text())["training_labels"] == "noisy"


def _error(capsys, script, args) -> str:
    assert script.main([str(a) for a in args]) == DataError.exit_code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("prepare_topomortar.py: error: ")
    return lines[-1]


def test_clear_errors(script, capsys, tmp_path, converted):
    out = tmp_path / "out"
    assert "--src " in _error(capsys, script, ["--src", tmp_path / "nowhere", "--out", out])
    assert f"{converted}: already exists" in _error(capsys, script, ["--src", SRC, "--out", converted])

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    (src / "train" / "pseudo" / "003.png").unlink()
    line = _error(capsys, script, ["--src", src, "--out", out, "--labels", "pseudo"])
    assert "pseudo/003.png: missing pseudo label of image 003" in line
    types = src / "dataset_types.txt"
    types.write_text("\n".join(l for l in types.read_text().splitlines() if not l.startswith("172,")) + "\n")
    line = _error(capsys, script, ["--src", src, "--out", out])
    assert "172.png: image ID 172 has no group" in line
    shutil.rmtree(src / "val")
    assert "val/images: folder not found" in _error(capsys, script, ["--src", src, "--out", out])
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_force_replaces(script, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert script.main(["--src", str(SRC), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "dataset.json").is_file()


def test_force_never_replaces_the_source_or_a_folder_holding_it(script, capsys, tmp_path):
    """--force replaces --out: an --out that is --src, holds it or lies inside it is refused
    before anything is written, and so is an --out that is a file."""
    parent = tmp_path / "data"
    src = parent / "TopoMortar"
    shutil.copytree(SRC, src)
    (parent / "notes.txt").write_text("keep")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (src, parent, tmp_path, src / "converted"):
        line = _error(capsys, script, ["--src", src, "--out", out, "--force"])
        assert f"--out {out}: must lie outside --src" in line
    file = tmp_path / "out.txt"
    file.write_text("precious")
    assert f"--out {file}: exists and is not a folder" in _error(capsys, script, ["--src", src, "--out", file, "--force"])
    assert f"--src {file}: is not a folder" in _error(capsys, script, ["--src", file, "--out", tmp_path / "o"])
    assert file.read_text() == "precious" and (parent / "notes.txt").read_text() == "keep"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == sorted(before + [Path("out.txt")])

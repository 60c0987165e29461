"""Corrupted, truncated and odd image files (NIfTI .nii/.nii.gz, NRRD, MHA, PNG) through
``medseg evaluate``, ``predict``, ``train`` and ``plan``: a valid file is accepted, a bad
one refused with exit code != 0 and ONE line on stderr naming it, never a traceback, and
no file that existed before is changed.

Each input is either a mutation of a valid file's bytes (truncated, bytes overwritten,
random bytes, empty: validity unknown, either outcome is right if it is clean) or a file
built field by field whose header or voxels say something odd (NaN or zero spacing, a
shape of 0 or 1x1x32000, complex or binary voxels, fractional floats as labels, ...:
:func:`fuzz_helpers.odd_files`, validity known).
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_helpers import (
    TINY_TRAIN,
    check,
    encode,
    flip,
    fuzz_settings,
    odd_files,
    report,
    run_cli,
    snapshot,
    truncate,
)

ENDINGS = (".nii", ".nii.gz", ".nrrd", ".mha", ".png")
SPACING = (0.8, 0.8, 1.2)
_ids = itertools.count()


def _label() -> np.ndarray:
    label = np.zeros((16, 16, 16), np.uint8)
    label[3:13, 8, 8] = 1
    label[8, 3:13, 8] = 1
    label[8, 8, 3:13] = 1
    return label


def _scan() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 100, (16, 16, 16)).astype(np.float32) + 300.0 * _label().astype(np.float32)


def _valid(ending: str, data: np.ndarray) -> bytes:
    if ending == ".png":  # 8-bit, one plane
        return encode(ending, np.clip(data[:, :, 8], 0, 255).astype(np.uint8), SPACING)
    return encode(ending, data, SPACING)


@st.composite
def damaged(draw, role: str):
    """(ending, description, bytes, valid) of a file standing where a valid one was."""
    ending = draw(st.sampled_from(ENDINGS))
    data = _label() if role == "label" else _scan()
    good = _valid(ending, data)
    kind = draw(st.sampled_from(["odd", "truncated", "overwritten", "random", "empty"]))
    if kind == "odd":
        name, blob, valid = draw(st.sampled_from(odd_files(ending, data, SPACING, role)))
        return ending, name, blob, valid
    if kind == "truncated":
        fraction = draw(st.floats(0.0, 0.99))
        return ending, f"truncated to {fraction:.0%}", truncate(good, fraction), None if fraction > 0 else False
    if kind == "overwritten":
        n = draw(st.integers(1, 8))
        positions = draw(st.lists(st.integers(0, len(good) - 1), min_size=n, max_size=n))
        values = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
        return ending, f"bytes {positions} overwritten", flip(good, positions, values), None
    if kind == "random":
        return ending, "random bytes", draw(st.binary(min_size=1, max_size=3000)), None
    return ending, "empty", b"", False


def _fail(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


def _evaluate(root: Path, ending: str, what: str, blob: bytes, valid: bool | None) -> list[str]:
    """``evaluate`` with ``blob`` as the prediction of a valid reference; the problems."""
    pred, ref = root / "pred", root / "ref"
    pred.mkdir(parents=True)
    ref.mkdir()
    (ref / f"c{ending}").write_bytes(_valid(ending, _label()))
    target = pred / f"c{ending}"
    target.write_bytes(blob)
    before = snapshot(pred, ref)
    result = run_cli(["evaluate", "--pred", pred, "--ref", ref, "--output", root / "out", "--workers", "1",
                      "--no-report", "--metrics", "dice,betti"])
    return check(result, [str(target)], valid, before, snapshot(pred, ref), f"evaluate, {ending} prediction: {what}")


def test_every_odd_label_file_through_evaluate(tmp_path, record_property):
    problems, tried = [], 0
    for ending in ENDINGS:
        for i, (what, blob, valid) in enumerate(odd_files(ending, _label(), SPACING, "label")):
            problems += _evaluate(tmp_path / f"{ending[1:]}{i}", ending, what, blob, valid)
            tried += 1
    report(record_property, "evaluate: every odd label file (NaN/zero spacing, 0-sized, complex, fractions, ...)", tried)
    _fail(problems)


def test_damaged_label_files_through_evaluate(tmp_path_factory, record_property):
    tried = []

    @settings(**fuzz_settings(60))
    @given(case=damaged("label"))
    def one(case):
        ending, what, blob, valid = case
        tried.append(what)
        _fail(_evaluate(tmp_path_factory.mktemp("evaluate") / str(next(_ids)), ending, what, blob, valid))

    one()
    report(record_property, "evaluate: damaged label files (truncated, bytes overwritten, random, empty)", len(tried))


def _predict(model: Path, root: Path, ending: str, what: str, blob: bytes, valid: bool | None) -> list[str]:
    """``predict`` on ``blob`` as the only scan; the problems."""
    scans = root / "scans"
    scans.mkdir(parents=True)
    target = scans / f"c_0000{ending}"
    target.write_bytes(blob)
    if ending == ".png":
        valid = False  # the model is 3D
    before = snapshot(scans, model)
    result = run_cli(["predict", "--model", model, "--input", scans, "--output", root / "out", "--device", "cpu"])
    return check(result, [str(target)], valid, before, snapshot(scans, model), f"predict, {ending} scan: {what}")


def test_every_odd_scan_through_predict(tiny_model, tmp_path, record_property):
    problems, tried = [], 0
    for ending in ENDINGS:
        for i, (what, blob, valid) in enumerate(odd_files(ending, _scan(), SPACING, "scan")):
            problems += _predict(tiny_model, tmp_path / f"{ending[1:]}{i}", ending, what, blob, valid)
            tried += 1
    report(record_property, "predict: every odd scan", tried)
    _fail(problems)


def test_damaged_scans_through_predict(tiny_model, tmp_path_factory, record_property):
    tried = []

    @settings(**fuzz_settings(30))
    @given(case=damaged("scan"))
    def one(case):
        ending, what, blob, valid = case
        tried.append(what)
        _fail(_predict(tiny_model, tmp_path_factory.mktemp("predict") / str(next(_ids)), ending, what, blob, valid))

    one()
    report(record_property, "predict: damaged scans", len(tried))


def test_a_damaged_file_in_a_dataset_through_train_and_plan(datasets, tmp_path_factory, record_property):
    import yaml

    tried = []

    @settings(**fuzz_settings(16))
    @given(data=st.data())
    def one(data):
        role = data.draw(st.sampled_from(["label", "scan"]), label="role")
        ending, what, blob, valid = data.draw(damaged(role))
        root = tmp_path_factory.mktemp("dataset") / str(next(_ids))
        dataset = root / "dataset"
        shutil.copytree(datasets[ending], dataset)
        folder = dataset / ("labelsTr" if role == "label" else "imagesTr")
        target = sorted(p for p in folder.iterdir() if p.name.endswith(ending))[0]
        case = target.name[: -len(ending)].removesuffix("_0000")
        partner = (dataset / "imagesTr" / f"{case}_0000{ending}" if role == "label"
                   else dataset / "labelsTr" / f"{case}{ending}")
        target.write_bytes(blob)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(TINY_TRAIN(dataset, root / "run", dims=2 if ending == ".png" else 3)))
        # a file built here has not the dataset's geometry: a "valid" one may still be refused
        valid = None if valid else valid
        names = [str(target), target.name, str(partner)]
        before = snapshot(dataset, config)
        problems = []
        for argv in (["train", config], ["plan", dataset, "-o", root / "plan" / "config.yaml", "--workers", "1"]):
            result = run_cli(argv)
            tried.append(argv[0])
            problems += check(result, names, valid, before, snapshot(dataset, config),
                              f"{argv[0]}, {ending} {role}: {what}")
            if result.code not in (0, None) and argv[0] == "train" and (root / "run").exists():
                problems.append(f"train refused the dataset but created {root / 'run'}")
        _fail(problems)

    one()
    report(record_property, "train and plan: a damaged file in a dataset", len(tried))

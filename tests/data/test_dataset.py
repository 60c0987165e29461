"""medseg.data.dataset: nnU-Net / MSD layouts, case listing, splits and each bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.dataset import (
    Case,
    DatasetInfo,
    DatasetWarning,
    cases_from_paths,
    check_dataset,
    label_statistics,
    list_cases,
    load_case,
    read_dataset_json,
    safe_join,
    split_cases,
    write_dataset_json,
)
from medseg.data.io import ImageGeometry, read_image, write_image
from medseg.errors import DataError

GEOM = ImageGeometry.from_spacing((6, 5, 4), (0.8, 0.8, 1.5), origin=(10.0, -5.0, 2.0), direction=np.diag([-1.0, -1.0, 1.0]))


def make_dataset(root: Path, n_cases=3, channels=("CT",), labels=None, ending=".nii.gz", num_training=None) -> Path:
    """A tiny hand-made nnU-Net v2 dataset (6x5x4 voxels)."""
    labels = labels or {"background": 0, "vessel": 1}
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        for c in range(len(channels)):
            write_image(root / "imagesTr" / f"case_{i:03d}_{c:04d}{ending}", rng.normal(size=GEOM.shape).astype(np.float32), GEOM)
        seg = (rng.random(GEOM.shape) > 0.7).astype(np.uint8)
        write_image(root / "labelsTr" / f"case_{i:03d}{ending}", seg, GEOM)
    write_dataset_json(root, dict(enumerate(channels)), labels, n_cases if num_training is None else num_training, ending)
    return root


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "Dataset009_Tiny")


def edit_json(root: Path, **changes):
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- dataset.json

def test_read_v2_dataset_json(ds):
    info = read_dataset_json(ds)
    assert info.channel_names == {0: "CT"}
    assert info.labels == {"background": 0, "vessel": 1}
    assert (info.num_channels, info.num_classes, info.num_training) == (1, 2, 3)
    assert info.foreground_labels == {"vessel": 1}
    assert info.file_ending == ".nii.gz"
    assert info.name == "Dataset009_Tiny"


def test_ignore_label_is_not_a_class(ds):
    edit_json(ds, labels={"background": 0, "artery": 1, "vein": 2, "ignore": 3})
    info = read_dataset_json(ds)
    assert info.num_classes == 3 and info.ignore_label == 3
    assert info.foreground_labels == {"artery": 1, "vein": 2}


def test_label_values_must_be_consecutive(ds):
    """A gap would be an output channel no voxel has: scored as a class (a validation Dice
    of 0 averaged in) and predictable, so a prediction could hold an undeclared value."""
    edit_json(ds, labels={"background": 0, "vessel": 2})
    with pytest.raises(DataError, match=r"key 'labels': values must be consecutive, 0, 1, 2, \.\.\. .*got \[0, 2\]$"):
        read_dataset_json(ds)
    edit_json(ds, labels={"background": 0, "mortar": 255})
    with pytest.raises(DataError, match=r"got \[0, 255\] \(0/255 masks\? .*convert_2d\.py"):
        read_dataset_json(ds)
    edit_json(ds, labels={"background": 0, "vessel": 1, "ignore": 255})  # ignore may lie above the classes
    assert read_dataset_json(ds).num_classes == 2


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"channel_names": None}, "channel_names"),
        ({"labels": None}, "labels"),
        ({"file_ending": None}, "file_ending"),
        ({"numTraining": None}, "numTraining"),
        ({"numTraining": "many"}, "numTraining"),
        ({"file_ending": ".jpg"}, "file_ending"),
        ({"labels": {"vessel": 1}}, "labels"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "labels"),
        ({"channel_names": {"0": "CT", "2": "MR"}}, "channel_names"),
    ],
)
def test_bad_dataset_json_names_file_and_key(ds, changes, key):
    edit_json(ds, **changes)
    with pytest.raises(DataError, match=rf"dataset\.json: key '{key}'"):
        read_dataset_json(ds)


def test_region_based_labels_not_supported(ds):
    edit_json(ds, labels={"background": 0, "whole": [1, 2], "core": [2]})
    with pytest.raises(DataError, match="labels.*region-based.*not supported"):
        read_dataset_json(ds)


def test_invalid_json_and_missing_file(ds, tmp_path):
    (ds / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON \(line 1"):
        read_dataset_json(ds)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        read_dataset_json(tmp_path / "empty")


def test_msd_style_dataset_json_with_4d_multichannel_images(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    rng = np.random.default_rng(1)
    training = []
    for i in range(2):
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.normal(size=(6, 5, 4, 2)).astype(np.float32), GEOM.affine), str(root / f"imagesTr/BRATS_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8), GEOM.affine), str(root / f"labelsTr/BRATS_{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 2, "training": training, "test": [],
    }))
    info, cases = check_dataset(root)
    assert info.labels == {"background": 0, "edema": 1, "tumour": 2}
    assert info.channel_names == {0: "FLAIR", 1: "T1w"} and info.file_ending == ".nii.gz"
    assert [c.name for c in cases] == ["BRATS_000", "BRATS_001"]
    data = load_case(cases[1], info)
    assert data["image"].shape == (2, 6, 5, 4) and data["label"].shape == (1, 6, 5, 4)


def test_nnunet_v1_training_list_with_channel_files(ds):
    training = [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"} for i in range(3)]
    edit_json(ds, training=training, channel_names=None, modality={"0": "CT"}, labels={"0": "background", "1": "vessel"}, file_ending=None)
    info, cases = check_dataset(ds)
    assert [c.image_files[0].name for c in cases] == [f"case_{i:03d}_0000.nii.gz" for i in range(3)]
    assert load_case(cases[0], info)["image"].shape == (1, 6, 5, 4)


def test_images_a_training_list_leaves_out_are_named(ds):
    """A stale list of 2 of the 3 cases trained on 2, said only as a numTraining mismatch
    (and not at all when numTraining matched the list); nnU-Net v2 reads the folder."""
    training = [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"} for i in range(2)]
    edit_json(ds, training=training, numTraining=2)
    with pytest.warns(DatasetWarning, match=r"lists 2 Tr case\(s\), and imagesTr/ holds 1 file\(s\) it does not list "
                                            r"\(case_002_0000\.nii\.gz\), which are left out"):
        _, cases = check_dataset(ds)
    assert [c.name for c in cases] == ["case_000", "case_001"]


def test_paths_in_dataset_json_cannot_escape(ds, tmp_path):
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    edit_json(ds, dataset={"case_000": {"images": ["../outside.nii.gz"], "label": "labelsTr/case_000.nii.gz"}})
    with pytest.raises(DataError, match=r"\.\./outside\.nii\.gz: path escapes the dataset folder"):
        read_dataset_json(ds)
    edit_json(ds, dataset={"case_000": {"images": [str(tmp_path / "outside.nii.gz")], "label": "labelsTr/case_000.nii.gz"}})
    with pytest.raises(DataError, match="escapes"):
        read_dataset_json(ds)


def test_v2_dataset_key_lists_files(ds):
    edit_json(ds, dataset={"a": {"images": ["imagesTr/case_001_0000.nii.gz"], "label": "labelsTr/case_001.nii.gz"}}, numTraining=1)
    info, cases = check_dataset(ds)
    assert [c.name for c in cases] == ["a"]
    assert cases[0].label_file == ds / "labelsTr" / "case_001.nii.gz"


@pytest.mark.parametrize("name", ["../../../tmp/escaped", "/tmp/victim", "sub/../a", "./a", "a\\b", "..", "", "line\nbreak",
                                  "\x1b]0;title\x07"])
def test_case_names_that_are_not_file_names_are_refused_naming_the_key(ds, name):
    """A case name is the stem of the cache's, prediction's and report's files: '../x' or
    '/tmp/x' in dataset.json's "dataset" mapping wrote, and overwrote, files outside the
    cache, and 'a' / './a' were one case's files."""
    edit_json(ds, dataset={name: {"images": ["imagesTr/case_001_0000.nii.gz"], "label": "labelsTr/case_001.nii.gz"}},
              numTraining=1)
    with pytest.raises(DataError) as err:
        read_dataset_json(ds)
    message = str(err.value)
    assert "key 'dataset'" in message and repr(name) in message and "\n" not in message


def test_a_scan_whose_file_name_holds_a_control_character_is_named_in_one_line(tmp_path):
    from medseg.data.dataset import cases_from_paths

    folder = tmp_path / "scans"
    write_image(folder / "line\nbreak_0000.nii.gz", np.zeros(GEOM.shape, np.float32), GEOM)
    with pytest.raises(DataError, match="holds a control character") as err:
        cases_from_paths([folder], ".nii.gz")
    assert "\n" not in str(err.value).replace("\\n", "")


def test_safe_join():
    root = Path("/data/ds")
    assert safe_join(root, "./imagesTr/a.nii.gz") == Path("/data/ds/imagesTr/a.nii.gz")
    assert safe_join(root, "imagesTr/../labelsTr/a.nii.gz") == Path("/data/ds/labelsTr/a.nii.gz")
    for bad in ("../x", "imagesTr/../../x", "/etc/passwd", "/data/ds2/a.nii.gz"):
        with pytest.raises(DataError, match="escapes"):
            safe_join(root, bad)


# --------------------------------------------------------------------------- listing

def test_list_cases_orders_channels(tmp_path):
    root = make_dataset(tmp_path / "mc", channels=("T1", "T2", "FLAIR"))
    info = read_dataset_json(root)
    cases = list_cases(root, info)
    assert [c.name for c in cases] == ["case_000", "case_001", "case_002"]
    assert [f.name for f in cases[0].image_files] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz", "case_000_0002.nii.gz"]
    assert cases[0].label_file == root / "labelsTr" / "case_000.nii.gz"
    assert load_case(cases[0], info)["image"].shape == (3, 6, 5, 4)


def test_missing_channel_file_names_case_and_file(tmp_path):
    root = make_dataset(tmp_path / "mc", channels=("T1", "T2"))
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_001_0001\.nii\.gz: missing channel file of case 'case_001'"):
        list_cases(root, read_dataset_json(root))


def test_extra_channel_file(ds):
    shutil.copy(ds / "imagesTr/case_000_0000.nii.gz", ds / "imagesTr/case_000_0001.nii.gz")
    with pytest.raises(DataError, match=r"case_000_0001\.nii\.gz: channel 1 of case 'case_000'"):
        list_cases(ds, read_dataset_json(ds))


def test_missing_label_and_empty_dataset(ds):
    info = read_dataset_json(ds)
    (ds / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_002\.nii\.gz: missing label file of case 'case_002'"):
        list_cases(ds, info)
    for f in (ds / "imagesTr").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"imagesTr: no images ending in \.nii\.gz \(empty dataset\)"):
        list_cases(ds, info)


def test_wrong_file_ending_is_hinted(ds):
    edit_json(ds, file_ending=".nrrd")
    with pytest.raises(DataError, match="found .nii.gz files"):
        check_dataset(ds)


def test_image_without_channel_suffix(ds):
    shutil.copy(ds / "imagesTr/case_000_0000.nii.gz", ds / "imagesTr/stray.nii.gz")
    with pytest.raises(DataError, match="stray.nii.gz: image name lacks the 4-digit channel suffix"):
        list_cases(ds, read_dataset_json(ds))


def test_case_numbers_of_four_digits_without_a_channel_suffix_are_named_as_such(ds):
    """AMOS-style amos_0001.nii.gz in imagesTr read as channel 1 of case 'amos'."""
    for path in list((ds / "imagesTr").iterdir()):
        path.unlink()
    for path in list((ds / "labelsTr").iterdir()):
        path.unlink()
    src = make_dataset(ds.parent / "src")
    for i in (1, 2):
        shutil.copy(src / "imagesTr/case_000_0000.nii.gz", ds / f"imagesTr/amos_{i:04d}.nii.gz")
        shutil.copy(src / "labelsTr/case_000.nii.gz", ds / f"labelsTr/amos_{i:04d}.nii.gz")
    with pytest.raises(DataError, match=r"amos_0001.nii.gz: image name lacks the 4-digit channel suffix: "
                                        r"labelsTr/amos_0001.nii.gz names case 'amos_0001', whose image should be "
                                        r"amos_0001_0000.nii.gz"):
        list_cases(ds, read_dataset_json(ds))


def test_test_subset_labels_optional(ds):
    info = read_dataset_json(ds)
    with pytest.raises(DataError, match="imagesTs: folder not found"):
        list_cases(ds, info, "Ts")
    shutil.copytree(ds / "imagesTr", ds / "imagesTs")
    (ds / "labelsTs").mkdir()
    shutil.copy(ds / "labelsTr/case_001.nii.gz", ds / "labelsTs/case_001.nii.gz")
    cases = list_cases(ds, info, "Ts")
    assert [c.label_file is not None for c in cases] == [False, True, False]


def test_num_training_mismatch_warns(tmp_path):
    root = make_dataset(tmp_path / "d", num_training=5)
    with pytest.warns(DatasetWarning, match="numTraining is 5 but 3"):
        check_dataset(root)


def test_check_dataset_verify_loads_every_case(ds):
    info = read_dataset_json(ds)
    seg, geom = read_image(ds / "labelsTr/case_002.nii.gz")
    write_image(ds / "labelsTr/case_002.nii.gz", seg * 4, geom)
    check_dataset(ds)  # listing alone does not read files
    with pytest.raises(DataError, match=r"case_002\.nii\.gz: label values \[4\] of case 'case_002'"):
        check_dataset(ds, verify=True)
    assert info.num_training == 3


# --------------------------------------------------------------------------- cases_from_paths

def test_cases_from_paths_groups_channels(tmp_path):
    folder = tmp_path / "in"
    for name in ("a_0000", "a_0001", "b_0000", "b_0001"):
        write_image(folder / f"{name}.nii.gz", np.zeros(GEOM.shape, np.float32), GEOM)
    (folder / ".a_0000.tmp-1234.nii.gz").write_bytes(b"")  # a writer's temp file is skipped
    cases = cases_from_paths([folder], ".nii.gz", num_channels=2)
    assert [c.name for c in cases] == ["a", "b"]
    assert [f.name for f in cases[1].image_files] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    (folder / "b_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"b_0001\.nii\.gz: missing channel file of case 'b'"):
        cases_from_paths([folder], ".nii.gz", num_channels=2)


def test_cases_from_paths_plain_files_and_suffix_heuristics(tmp_path):
    for name in ("scan.nii.gz", "p_0000.nrrd", "series_0003.mha", "series_0004.mha"):
        write_image(tmp_path / name, np.zeros(GEOM.shape, np.float32), GEOM)
    cases = cases_from_paths([tmp_path / "scan.nii.gz", tmp_path / "p_0000.nrrd", tmp_path / "series_0003.mha", tmp_path / "series_0004.mha"], num_channels=1)
    assert [(c.name, len(c.image_files)) for c in cases] == [("p", 1), ("scan", 1), ("series_0003", 1), ("series_0004", 1)]
    with pytest.raises(DataError, match="nothere.nii.gz: input not found"):
        cases_from_paths([tmp_path / "nothere.nii.gz"])
    write_image(tmp_path / "p.nii.gz", np.zeros(GEOM.shape, np.float32), GEOM)
    with pytest.raises(DataError, match="case name 'p' also used"):
        cases_from_paths([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        cases_from_paths([empty])


# --------------------------------------------------------------------------- splits

def _cases(n):
    return [Case(f"c{i:02d}", [Path(f"imagesTr/c{i:02d}_0000.nii.gz")], None) for i in range(n)]


def test_seeded_split_is_deterministic_and_partitions():
    cases = _cases(10)
    train, val = split_cases(cases, 0.2, seed=3)
    train2, val2 = split_cases(list(reversed(cases)), 0.2, seed=3)
    assert {c.name for c in val} == {c.name for c in val2}
    assert len(val) == 2 and len(train) == 8
    assert {c.name for c in train} | {c.name for c in val} == {c.name for c in cases}
    assert not {c.name for c in train} & {c.name for c in val}
    others = {tuple(sorted(c.name for c in split_cases(cases, 0.2, seed=s)[1])) for s in range(10)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("n,fraction,n_val", [(2, 0.2, 1), (3, 0.01, 1), (1, 0.5, 0), (5, 0.0, 0), (4, 0.9, 3)])
def test_split_sizes(n, fraction, n_val):
    train, val = split_cases(_cases(n), fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


def test_split_file_json_yaml_and_nnunet_folds(tmp_path):
    cases = _cases(4)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c00", "c01"], "val": ["c03"]}))
    with pytest.warns(DatasetWarning, match=r"split\.json: 1 case\(s\) in neither 'train' nor 'val' are left out: c02"):
        train, val = split_cases(cases, 0.2, 0, split_file=tmp_path / "split.json")  # said, not silent
    assert [c.name for c in train] == ["c00", "c01"] and [c.name for c in val] == ["c03"]
    (tmp_path / "split.yaml").write_text("train: [c02, c03]\nval:\n  - c00\n")
    train, val = split_cases(cases, 0.2, 0, split_file=tmp_path / "split.yaml")
    assert [c.name for c in train] == ["c02", "c03"] and [c.name for c in val] == ["c00"]
    folds = [{"train": ["c01", "c02", "c03"], "val": ["c00"]}, {"train": ["c00", "c02", "c03"], "val": ["c01"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    with pytest.warns(DatasetWarning, match="fold 0 of the file's 2 is used"):
        assert [c.name for c in split_cases(cases, 0.2, 0, split_file=tmp_path / "splits_final.json")[1]] == ["c00"]
    assert [c.name for c in split_cases(cases, 0.2, 0, split_file=tmp_path / "splits_final.json", fold=1)[1]] == ["c01"]
    # a relative split file is found inside the dataset folder
    assert split_cases(cases, 0.2, 0, split_file="split.json", root=tmp_path)[1][0].name == "c03"


def test_split_file_unknown_names_and_overlap(tmp_path):
    cases = _cases(3)
    (tmp_path / "s.json").write_text(json.dumps({"train": ["c00", "c09"], "val": ["c01"]}))
    with pytest.raises(DataError, match=r"s\.json: unknown case name\(s\) c09"):
        split_cases(cases, 0.2, 0, split_file=tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"train": ["c00", "c01"], "val": ["c01"]}))
    with pytest.raises(DataError, match="both train and val: c01"):
        split_cases(cases, 0.2, 0, split_file=tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="'train' and 'val'"):
        split_cases(cases, 0.2, 0, split_file=tmp_path / "s.json")
    with pytest.raises(DataError, match="split file not found"):
        split_cases(cases, 0.2, 0, split_file=tmp_path / "nope.json")


def test_split_file_paths_cannot_escape_dataset(tmp_path):
    cases = _cases(3)
    (tmp_path / "s.json").write_text(json.dumps({"train": ["imagesTr/c00_0000.nii.gz", "c01"], "val": ["c02"]}))
    train, _ = split_cases(cases, 0.2, 0, split_file=tmp_path / "s.json", root=tmp_path)
    assert [c.name for c in train] == ["c00", "c01"]
    (tmp_path / "s.json").write_text(json.dumps({"train": ["../../etc/c00_0000.nii.gz"], "val": ["c02"]}))
    with pytest.raises(DataError, match="escapes the dataset folder"):
        split_cases(cases, 0.2, 0, split_file=tmp_path / "s.json", root=tmp_path)
    with pytest.raises(DataError, match="escapes the dataset folder"):
        split_cases(cases, 0.2, 0, split_file="../s.json", root=tmp_path / "sub")


# --------------------------------------------------------------------------- load_case validations

def test_load_case_returns_contract(ds):
    info = read_dataset_json(ds)
    data = load_case(list_cases(ds, info)[0], info)
    assert data["name"] == "case_000"
    assert data["image"].dtype == np.float32 and data["image"].shape == (1, 6, 5, 4)
    assert data["label"].shape == (1, 6, 5, 4) and data["label"].dtype.kind in "iu"
    assert data["geometry"].allclose(GEOM)
    assert set(np.unique(data["label"])) <= {0, 1}


def _case(ds, i=1):
    info = read_dataset_json(ds)
    return list_cases(ds, info)[i], info


def test_image_label_shape_mismatch(ds):
    case, info = _case(ds)
    write_image(case.label_file, np.zeros((6, 5, 3), np.uint8), ImageGeometry(GEOM.affine, (6, 5, 3)))
    with pytest.raises(DataError, match=r"case_001\.nii\.gz: label shape \(6, 5, 3\) does not match image shape \(6, 5, 4\)"):
        load_case(case, info)


def test_image_label_affine_mismatch_beyond_tolerance(ds):
    case, info = _case(ds)
    seg, _ = read_image(case.label_file)
    shifted = np.array(GEOM.affine)
    shifted[0, 3] += 0.5
    write_image(case.label_file, seg, ImageGeometry(shifted, GEOM.shape))
    with pytest.raises(DataError, match=r"case_001\.nii\.gz: label affine differs from image case_001_0000\.nii\.gz by up to 0\.5 mm"):
        load_case(case, info)
    shifted[0, 3] = GEOM.affine[0, 3] + 1e-5  # float32 rounding of another writer is fine
    write_image(case.label_file, seg, ImageGeometry(shifted, GEOM.shape))
    load_case(case, info)


def test_undeclared_label_values_name_case_and_values(ds):
    case, info = _case(ds)
    seg, geom = read_image(case.label_file)
    seg[0, 0, 0], seg[1, 1, 1] = 3, 7
    write_image(case.label_file, seg, geom)
    with pytest.raises(DataError, match=r"label values \[3, 7\] of case 'case_001' are not declared in dataset.json \(declared: 0, 1\)"):
        load_case(case, info)
    assert load_case(case, info, check_labels=False)["label"].max() == 7


def test_nan_and_inf_in_image(ds):
    case, info = _case(ds)
    image, geom = read_image(case.image_files[0])
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = np.inf
    write_image(case.image_files[0], image, geom)
    with pytest.raises(DataError, match=r"case_001_0000\.nii\.gz: image contains 1 NaN and 1 Inf"):
        load_case(case, info)


def test_float64_values_beyond_float32_are_refused(ds):
    """Cast to float32 they became inf, the cache held NaN statistics and training
    stopped with "the loss is nan ...; lower train.optimizer.lr"."""
    case, info = _case(ds)
    image, geom = read_image(case.image_files[0])
    image = image.astype(np.float64)
    image[2, 1, 0] = -1e39
    write_image(case.image_files[0], image, geom)
    with pytest.raises(DataError, match=r"case_001_0000\.nii\.gz: image holds the value -1e\+39, beyond float32's range"):
        load_case(case, info)
    image[2, 1, 0] = 3e38  # within float32's range: read
    write_image(case.image_files[0], image, geom)
    assert np.isfinite(load_case(case, info)["image"]).all()


def test_non_integer_label(ds):
    case, info = _case(ds)
    write_image(case.label_file, np.full(GEOM.shape, 0.5, np.float32), GEOM)
    with pytest.raises(DataError, match="non-integer"):
        load_case(case, info)


def test_truncated_image_in_case(ds):
    case, info = _case(ds)
    data = case.image_files[0].read_bytes()
    case.image_files[0].write_bytes(data[:-40])
    with pytest.raises(DataError, match=r"case_001_0000\.nii\.gz: unreadable or truncated image"):
        load_case(case, info)


def test_channel_geometry_mismatch(tmp_path):
    root = make_dataset(tmp_path / "mc", channels=("T1", "T2"))
    case, info = _case(root)
    other = np.array(GEOM.affine)
    other[2, 2] = 3.0
    write_image(case.image_files[1], np.zeros(GEOM.shape, np.float32), ImageGeometry(other, GEOM.shape))
    with pytest.raises(DataError, match=r"case_001_0001\.nii\.gz: channel affine differs"):
        load_case(case, info)
    write_image(case.image_files[1], np.zeros((6, 5, 5), np.float32), ImageGeometry(GEOM.affine, (6, 5, 5)))
    with pytest.raises(DataError, match=r"case_001_0001\.nii\.gz: channel shape \(6, 5, 5\)"):
        load_case(case, info)


def test_wrong_channel_count(ds):
    case, info = _case(ds)
    nib.save(nib.Nifti1Image(np.zeros((*GEOM.shape, 2), np.float32), GEOM.affine), str(case.image_files[0]))
    with pytest.raises(DataError, match="has 2 channel\\(s\\) but dataset.json declares 1"):
        load_case(case, info)


# --------------------------------------------------------------------------- statistics

def test_label_statistics(tmp_path):
    root = make_dataset(tmp_path / "st", n_cases=2, labels={"background": 0, "a": 1, "b": 2})
    info = read_dataset_json(root)
    cases = list_cases(root, info)
    seg0 = np.zeros(GEOM.shape, np.uint8)
    seg0[:3] = 1  # half the voxels
    seg1 = np.zeros(GEOM.shape, np.uint8)
    seg1[:3] = 2
    seg1[:1] = 1
    write_image(cases[0].label_file, seg0, GEOM)
    write_image(cases[1].label_file, seg1, GEOM)
    stats = label_statistics(cases, info)
    json.dumps(stats)
    assert stats["num_cases"] == 2
    assert stats["classes"]["a"]["ratio_mean"] == pytest.approx((0.5 + 1 / 6) / 2)
    assert stats["classes"]["a"]["ratio_std"] == pytest.approx(abs(0.5 - 1 / 6) / 2)
    assert stats["classes"]["b"]["presence"] == 0.5
    assert stats["classes"]["background"]["value"] == 0


def test_png_dataset_with_rgb_images(tmp_path):
    from PIL import Image

    root = tmp_path / "Dataset120_Roads"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 6, 3)).astype(np.uint8)).save(root / f"imagesTr/r{i}_0000.png")
        Image.fromarray(rng.integers(0, 2, (8, 6)).astype(np.uint8)).save(root / f"labelsTr/r{i}.png")
    write_dataset_json(root, {0: "R", 1: "G", 2: "B"}, {"background": 0, "road": 1}, 2, ".png")
    info, cases = check_dataset(root, verify=True)
    data = load_case(cases[0], info)
    assert data["image"].shape == (3, 8, 6) and data["label"].shape == (1, 8, 6)


def test_warnings_are_dataset_warnings(ds):
    (ds / "labelsTr" / "orphan.nii.gz").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_dataset(ds)
    assert any(issubclass(w.category, DatasetWarning) and "orphan" in str(w.message) for w in caught)


def test_cases_from_paths_refuses_one_case_given_twice_and_channels_a_model_lacks(tmp_path):
    """Two files of one case and channel (two input folders, or .nii beside .nii.gz) and
    the nnU-Net layout of a 2-channel case for a 1-channel model were silently a dropped
    scan and two cases; each is an error naming both files or the extra channel."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "x_0000.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"two/x_0000\.nii\.gz: channel 0 of case 'x' is also given by .*one/x_0000"):
        cases_from_paths([one, two], num_channels=1)
    (one / "x_0000.nii").write_bytes(b"")
    with pytest.raises(DataError, match=r"channel 0 of case 'x' is also given by"):
        cases_from_paths([one], num_channels=1)
    (one / "x_0000.nii").unlink()
    (one / "x_0001.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"x_0001\.nii\.gz: channel 1 of case 'x', but the model takes 1 channel"):
        cases_from_paths([one], num_channels=1)
    assert [c.name for c in cases_from_paths([one], num_channels=2)] == ["x"]


def test_an_image_of_another_ending_is_named_beside_its_orphan_label(ds):
    """'1 label file(s) without an image' read as a missing file when the image was only
    stored with another ending than dataset.json's."""
    image = ds / "imagesTr" / "case_001_0000.nii.gz"
    array, geometry = read_image(image)
    image.unlink()
    write_image(ds / "imagesTr" / "case_001_0000.nii", array, geometry)
    with pytest.warns(DatasetWarning, match=r"1 label file\(s\) without an image, e.g. case_001.nii.gz \(case_001_0000"
                                            r".nii has another ending than dataset.json's file_ending .nii.gz\)"):
        check_dataset(ds)


def test_an_rgba_image_or_channel_files_of_rgb_images_are_named_in_the_channel_count_error(tmp_path):
    """An RGBA photo given to an RGB model said only "has 4 channel(s) but dataset.json
    declares 3" (convert_2d.py drops an opaque alpha); frame_0000..0002.png RGB files
    said "9 channel(s)"."""
    from PIL import Image

    info = DatasetInfo(root=tmp_path, name="rgb", channel_names={0: "R", 1: "G", 2: "B"},
                       labels={"background": 0, "mortar": 1}, num_training=0, file_ending=".png")
    Image.new("RGBA", (8, 6), (10, 20, 30, 255)).save(tmp_path / "photo.png")
    case = Case(name="photo", image_files=[tmp_path / "photo.png"], label_file=None)
    with pytest.raises(DataError, match=r"has 4 channel\(s\) but dataset.json declares 3; its last channel is an alpha"):
        load_case(case, info)
    frames = [tmp_path / f"frame_{i:04d}.png" for i in range(3)]
    for frame in frames:
        Image.new("RGB", (8, 6)).save(frame)
    with pytest.raises(DataError, match=r"9 channel\(s\) but dataset.json declares 3 \(read as the channel files of one case: frame_0000.png"):
        load_case(Case(name="frame", image_files=frames, label_file=None), info)


def test_photographs_among_the_scans_are_named_not_skipped_in_silence(tmp_path):
    """predict skipped a .jpg in a folder of .png scans without a word."""
    import numpy as np
    import pytest

    from medseg.data.dataset import DatasetWarning, cases_from_paths
    from medseg.data.io import ImageGeometry, write_image
    from medseg.errors import DataError

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "wall.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match=r"no images ending in .*\(1 file\(s\) such as wall.jpg: medseg reads "
                                        r"\.nii\.gz, .*convert_2d\.py converts photographs"):
        cases_from_paths([photos])
    write_image(photos / "scan.png", np.zeros((8, 8), np.uint8), ImageGeometry.identity((8, 8)))
    with pytest.warns(DatasetWarning, match=r"photos: 1 image file\(s\) skipped: wall\.jpg; medseg reads"):
        cases = cases_from_paths([photos])
    assert [c.name for c in cases] == ["scan"]

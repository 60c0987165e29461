"""More bad input through the real command line (see ``test_cli.py``): malformed
``dataset.json`` entries, files that are not UTF-8, an output path that is a file, a
metric that cannot be computed, and case names that are HTML.

Each check runs ``python -m medseg ...`` in a subprocess, as a user would: a non-zero exit,
one line naming the file or key and the problem, no traceback, nothing already written changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.data.io import ImageGeometry, write_image

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import REPO, assert_one_line_error, medseg, write_config  # noqa: E402

# A case name that is HTML: legal in a Linux file name (no '/').
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_MISSING = "<b onmouseover=alert(2)>x"

# `python -c` that hides medseg's C++ topology engine, as when it was never built, then runs the CLI.
WITHOUT_ENGINE = (
    "import sys; sys.modules['medseg.topology._engine'] = None; "
    "from medseg.cli import main; sys.exit(main(sys.argv[1:]))"
)


def medseg_without_engine(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_ENGINE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def dataset(synthetic_dataset_3d, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may break."""
    return Path(shutil.copytree(synthetic_dataset_3d, tmp_path / "Dataset001"))


# --------------------------------------------------------------------------- dataset.json, config, split file

def _change_dataset_json(ds: Path, **changes) -> None:
    info = json.loads((ds / "dataset.json").read_text())
    info.update(changes)
    (ds / "dataset.json").write_text(json.dumps(info))


def _first_case(ds: Path) -> str:
    return sorted((ds / "labelsTr").iterdir())[0].name


BROKEN_JSON = {
    # name: (changes to dataset.json given the first label file's name, the key the message names)
    "image_is_a_number": (lambda label: {"training": [{"image": 5, "label": f"./labelsTr/{label}"}]}, "training[0].image"),
    "null_in_images": (lambda label: {"dataset": {"case": {"images": [None], "label": f"labelsTr/{label}"}}}, "dataset.case.images[0]"),
    "null_entry": (lambda label: {"training": [{"image": "./imagesTr/x.nii.gz"}, None]}, "training[1]"),
    "label_is_a_dict": (lambda label: {"training": [{"image": "./imagesTr/x.nii.gz", "label": {"file": label}}]}, "training[0].label"),
    "dict_for_a_list": (lambda label: {"test": {"image": "./imagesTs/x.nii.gz"}}, "'test'"),
}


@pytest.mark.parametrize("problem", sorted(BROKEN_JSON))
def test_train_malformed_dataset_json(problem, dataset, tmp_path):
    change, key = BROKEN_JSON[problem]
    _change_dataset_json(dataset, **change(_first_case(dataset)))
    proc = medseg("train", write_config(tmp_path, dataset))
    assert_one_line_error(proc, "dataset.json", key, alone=True)
    assert not (tmp_path / "run").exists()


def test_negative_label_value_is_named(dataset, tmp_path):
    _change_dataset_json(dataset, labels={"background": 0, "vessel": -1})
    line = assert_one_line_error(medseg("train", write_config(tmp_path, dataset)), "dataset.json", alone=True)
    assert "'vessel': -1 is not an integer label value" in line


def test_config_that_is_not_utf8(dataset, tmp_path):
    config = write_config(tmp_path, dataset)
    config.write_bytes(b"# r\xe9sum\xe9 in Latin-1\n" + config.read_bytes())
    assert_one_line_error(medseg("train", config), str(config), "not UTF-8", alone=True)
    assert not (tmp_path / "run").exists()


def test_split_file_that_is_not_utf8(dataset, tmp_path):
    split = tmp_path / "split.yaml"
    split.write_bytes(b"# fold \xe0 moi\ntrain: [a]\nval: [b]\n")
    config = write_config(tmp_path, dataset)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["split_file"] = str(split)
    config.write_text(yaml.safe_dump(raw))
    assert_one_line_error(medseg("train", config), str(split), "not UTF-8", alone=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- output paths that are files

def test_train_output_dir_is_a_file(dataset, tmp_path):
    shutil.rmtree(dataset / "imagesTr")  # the check comes before the data is read: its error is not this one
    taken = tmp_path / "run"
    taken.write_text("precious")
    proc = medseg("train", write_config(tmp_path, dataset, output_dir=str(taken)))
    assert_one_line_error(proc, "output_dir", str(taken), "not a folder", alone=True)
    below = write_config(tmp_path, dataset, output_dir=str(taken / "sub"))
    assert_one_line_error(medseg("train", below), "output_dir", str(taken), "not a folder", alone=True)
    assert taken.read_text() == "precious"


def _masks():
    """A 3D cube and the same cube cut in two (one component more)."""
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    cut = ref.copy()
    cut[2:8, 4:5, 2:8] = 0
    return ref, cut


@pytest.fixture
def folders(tmp_path):
    """ref/ and pred/ with a perfect case 'good' and a case named ``HOSTILE`` whose prediction is cut in two."""
    geometry = ImageGeometry.from_spacing((10, 10, 10), (1.0, 1.0, 1.0))
    ref, cut = _masks()
    for name, pred in (("good", ref), (HOSTILE, cut)):
        write_image(tmp_path / "ref" / f"{name}.nii.gz", ref, geometry)
        write_image(tmp_path / "pred" / f"{name}.nii.gz", pred, geometry)
    return tmp_path / "ref", tmp_path / "pred"


def test_evaluate_output_is_a_file(folders, tmp_path):
    ref, pred = folders
    taken = tmp_path / "eval"
    taken.write_text("precious")
    for output in (taken, taken / "sub"):
        proc = medseg("evaluate", "--pred", pred, "--ref", ref, "--output", output, "--workers", "1")
        assert_one_line_error(proc, "--output", str(taken), "not a folder", alone=True)
        assert "evaluated" not in proc.stdout  # refused before any case was evaluated
    assert taken.read_text() == "precious"


# --------------------------------------------------------------------------- metrics that cannot be computed

def test_requested_metric_without_engine_is_an_error(folders, tmp_path):
    ref, pred = folders
    out = tmp_path / "eval"
    for asked, needle in (("dice,betti_matching", "betti_matching"), ("bme", "bme (betti_matching)"), ("cldice", "cldice")):
        proc = medseg_without_engine("evaluate", "--pred", pred, "--ref", ref, "--output", out, "--metrics", asked)
        assert_one_line_error(proc, f"--metrics: {needle} cannot be computed", "not built", alone=True)
    assert not out.exists()  # nothing evaluated, nothing written


def test_default_metric_without_engine_is_skipped_and_said(folders, tmp_path):
    ref, pred = folders
    out = tmp_path / "eval"
    proc = medseg_without_engine("evaluate", "--pred", pred, "--ref", ref, "--output", out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("medseg: skipped metric")]
    assert len(skipped) == 1, proc.stdout
    assert "cldice" in skipped[0] and "betti_matching" in skipped[0] and "not built" in skipped[0]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics_skipped"]) == {"cldice", "betti_matching"}
    assert "betti_matching" not in summary["metrics_computed"] and "betti" in summary["metrics_computed"]
    metrics = summary["metric_per_case"][0]["metrics"]["1"]
    assert "betti_error" in metrics and "betti_matching_error" not in metrics and "clDice" not in metrics
    assert "metrics skipped" in (out / "report.html").read_text()


# --------------------------------------------------------------------------- case names that are HTML

class _Page(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def assert_names_are_text(path: Path, *names: str) -> _Page:
    """The page shows ``names`` as text and holds no element that they would have injected."""
    page = _Page(path.read_text())
    handlers = [(tag, attrs) for tag, attrs in page.tags if any(a.startswith("on") for a in attrs)]
    assert not handlers, f"{path.name}: event handler attributes {handlers}"
    assert not [attrs for tag, attrs in page.tags if tag == "img" and attrs.get("src") == "x"]
    text = "".join(page.text)
    for name in names:
        assert name in text, f"{path.name} does not show {name!r} as text"
    return page


def test_case_names_are_escaped_in_every_page(folders, tmp_path):
    ref, pred = folders
    geometry = ImageGeometry.from_spacing((10, 10, 10), (1.0, 1.0, 1.0))
    write_image(ref / f"{HOSTILE_MISSING}.nii.gz", _masks()[0], geometry)  # no prediction: listed as missing
    out_a, out_b = tmp_path / "eval_a", tmp_path / "eval_b"
    for out in (out_a, out_b):
        proc = medseg("evaluate", "--pred", pred, "--ref", ref, "--output", out, "--workers", "1")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # 1: one prediction missing
    report = assert_names_are_text(out_a / "report.html", HOSTILE, HOSTILE_MISSING)
    worst = [attrs for tag, attrs in report.tags if tag == "figure" and attrs.get("class") == "worst"]
    assert [attrs["data-case"] for attrs in worst] == [HOSTILE]  # the worst-case section pictures it

    proc = medseg("report", "html", out_a)
    assert proc.returncode == 0, proc.stderr
    assert_names_are_text(out_a / "report.html", HOSTILE, HOSTILE_MISSING)

    compared = tmp_path / "compare"
    proc = medseg("report", "compare", out_a, out_b, "--output", compared)
    assert proc.returncode == 0, proc.stderr
    assert_names_are_text(compared / "compare.html", HOSTILE, HOSTILE_MISSING)


def test_library_names_the_argument_and_the_cli_its_flag(tmp_path, capsys):
    from medseg.cli import main
    from medseg.errors import ArgumentError
    from medseg.evaluation.evaluate import run_evaluation

    with pytest.raises(ArgumentError, match=r"^connectivity=5: use 8 or 4 for 2D images") as raised:
        run_evaluation(tmp_path, tmp_path, tmp_path / "out", connectivity=5)
    assert raised.value.for_cli().startswith("--connectivity 5: use 8 or 4")
    assert ArgumentError("sw_batch_size", "must be a positive integer", 0).for_cli() == "--sw-batch-size 0: must be a positive integer"
    assert main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--connectivity", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medseg: error: --connectivity 5: use 8 or 4 for 2D images, 26 or 6 for 3D"]


@pytest.mark.parametrize(
    "variable, value, needle",
    [
        ("MEDSEG_TOPOLOGY_BACKEND", "gpu", "MEDSEG_TOPOLOGY_BACKEND must be one of"),
        ("MEDSEG_TOPOLOGY_CACHE_MB", "abc", "MEDSEG_TOPOLOGY_CACHE_MB='abc'"),
        ("WORLD_SIZE", "2", "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"),
    ],
)
def test_bad_environment_is_one_line_before_any_work(dataset, tmp_path, monkeypatch, variable, value, needle):
    """A bad engine setting failed every case of an evaluation (replacing its good summary)
    or a training's first step after the run folder was written; a WORLD_SIZE left in a
    shell failed in torch's rendezvous with a traceback."""
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    config = write_config(tmp_path, dataset)
    assert_one_line_error(medseg("train", config), needle, alone=True)
    assert not (tmp_path / "run").exists()


def test_nothing_is_written_into_the_dataset_s_case_folders(dataset, tmp_path):
    """A run folder or a preprocessing cache inside imagesTr/ or labelsTr/ put medseg's
    files among the cases; both are refused before any work."""
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    config = write_config(tmp_path, dataset, output_dir=str(dataset / "labelsTr" / "run"))
    assert_one_line_error(medseg("train", config), "output_dir", "lies in the dataset's labelsTr/ folder", alone=True)
    config = write_config(tmp_path, dataset, output_dir=str(dataset))  # the run's files beside dataset.json
    assert_one_line_error(medseg("train", config), "output_dir", "is the dataset's own folder", alone=True)
    config = write_config(tmp_path, dataset)
    assert_one_line_error(medseg("preprocess", config, "--set", f"data.cache_dir={dataset / 'imagesTr' / 'cache'}"),
                          "data.cache_dir", "lies in the dataset's imagesTr/ folder", alone=True)
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before

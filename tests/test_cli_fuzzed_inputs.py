"""What a fuzzer of the commands and configs found (a ninth probing round): inputs that
passed validation and ended in a traceback, or a block of lines, or wrote where they
should not. Each is now one line naming the option, key or path, before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.config import ConfigError, load_config
from medseg.data.io import ImageGeometry, write_image


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), (needles, err)
    return lines[0]


@pytest.fixture
def masks(tmp_path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 1
    for folder in (ref, pred):
        write_image(folder / "a.nii.gz", ring, ImageGeometry.identity(ring.shape))
    return ref, pred


@pytest.fixture
def config(synthetic_dataset_3d, tmp_path) -> Path:
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quickstart.yaml").read_text())
    raw["data"]["dataset"] = str(synthetic_dataset_3d)
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_usage_errors_are_one_line(capsys):
    """Click printed usage, "Try ... --help" and the error: four lines."""
    assert main(["predict", "--model", "x"]) == 2
    _one_line(capsys, "Missing option '--input'", "(see medseg predict --help)")
    assert main(["evaluate", "--pred", "a", "--ref", "b", "--output", "c", "--workers", "abc"]) == 2
    _one_line(capsys, "'--workers'", "(see medseg evaluate --help)")
    assert main(["frobnicate"]) == 2
    _one_line(capsys, "No such command 'frobnicate'")
    # the parser's own errors come before any context: they named `medseg --help`
    assert main(["train", "x.yaml", "--resume=yes"]) == 2
    _one_line(capsys, "does not take a value", "(see medseg train --help)")
    assert main(["report", "compare", "a", "b", "--bogus"]) == 2
    _one_line(capsys, "--bogus", "(see medseg report compare --help)")


def test_an_empty_argument_is_refused_before_any_work(masks, tmp_path, monkeypatch, capsys):
    """An empty path is the current folder: evaluate --output '' wrote its results there."""
    ref, pred = masks
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", ""]) == 2
    _one_line(capsys, "--output: is empty")
    assert main(["report", "compare", "a", "b", "--output="]) == 2
    _one_line(capsys, "--output: is empty")
    assert main(["train", ""]) == 2
    _one_line(capsys, "argument 2 is empty")
    assert list(work.iterdir()) == []


def test_paths_the_system_refuses_are_one_line(masks, tmp_path, capsys):
    ref, pred = masks
    long_name = tmp_path / ("a" * 300)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(long_name)]) != 0
    _one_line(capsys, "File name too long")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(dangling)]) != 0
    _one_line(capsys, f"{dangling} is a link to nothing")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(tmp_path / "loop1")]) != 0
    _one_line(capsys, "loop1")
    if Path("/proc/self").is_dir():  # a folder that cannot be made
        assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", "/proc/self/x"]) != 0
        _one_line(capsys, "/proc/self/x")


def test_config_values_that_passed_validation_then_crashed(config, tmp_path, capsys):
    run = tmp_path / "run"
    cases = [
        (["--set", "model.params.strides=2"], "model.params.strides: MONAI UNet takes a list here"),
        (["--set", "model.params.channels=4"], "model.params.channels: MONAI UNet takes a list here"),
        (["--set", "train.optimizer.lr=1e39"], "train.optimizer.lr=1e39"),  # float32 overflowed at the first step
        (["--set", "data.target_spacing=[1e-40,1,1]"], "data.target_spacing"),  # underflowed: every label empty
        (["--set", "seed=" + "9" * 5000], "a value Python cannot read"),
    ]
    for overrides, needle in cases:
        assert main(["train", str(config), *overrides]) != 0, overrides
        _one_line(capsys, needle)
        assert not run.exists(), overrides  # refused before the run folder


def test_yaml_that_parses_yet_could_not_be_built(config, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    # merge keys are YAML: they were reported as "not valid YAML"; an explicit key wins
    merged = tmp_path / "merged.yaml"
    raw = yaml.safe_load(config.read_text())
    raw.pop("inference", None)
    merged.write_text(yaml.safe_dump(raw) + "inference:\n  <<: {overlap: 0.25, sw_batch_size: 4}\n  sw_batch_size: 1\n")
    cfg = load_config(merged)
    assert (cfg.inference.overlap, cfg.inference.sw_batch_size) == (0.25, 1)


def test_a_newline_in_a_value_stays_on_one_line(config, capsys):
    assert main(["train", str(config), "--set", "losses=[{name: \"a\\nb\"}]"]) != 0
    line = _one_line(capsys, "a\\nb")
    assert "\n" not in line


def test_out_of_memory_is_one_line(config, monkeypatch, capsys):
    import medseg.training.trainer as trainer

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 549755813888 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer, "run_training", allocate)
    assert main(["train", str(config)]) == 1
    _one_line(capsys, "out of memory", "549755813888 bytes", "data.patch_size")


def test_a_grid_beyond_memory_is_refused_before_it_is_allocated(monkeypatch):
    import medseg.memory
    from medseg.errors import DataError
    from medseg.inference.resample import _check_grid_fits

    monkeypatch.setattr(medseg.memory, "memory_limit_bytes", lambda: 2**30)
    _check_grid_fits((512, 512, 512), 1, (24, 24, 24))  # 0.5 GB fits
    with pytest.raises(DataError, match=r"24x24x24 scan gives a 2400x2400x2400 grid, 51.5 GB .*data.target_spacing"):
        _check_grid_fits((2400, 2400, 2400), 1, (24, 24, 24))
    assert os.environ.get("MEDSEG_CACHE")  # the suite's cache, never the user's


def test_a_warning_made_an_error_is_one_line(monkeypatch, capsys, tmp_path):
    """Under PYTHONWARNINGS=error (or python -W error) medseg's own warnings (a .jpg skipped
    in a folder of scans) came out as a traceback."""
    import warnings

    import medseg.evaluation.evaluate as evaluate_module
    from medseg.data.dataset import DatasetWarning

    def warns(*args, **kwargs):
        warnings.warn("scans: 1 image file(s) skipped: b.jpg", DatasetWarning, stacklevel=2)

    monkeypatch.setattr(evaluate_module, "run_evaluation", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 1
    _one_line(capsys, "b.jpg", "(DatasetWarning, raised as an error by the warnings filter)")

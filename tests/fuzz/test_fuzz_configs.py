"""``dataset.json``, run configs and adaptation configs with a wrong value at any key,
through ``medseg plan``, ``train`` (one iteration), ``evaluate`` and ``adapt``.

A valid file is taken, one key path is chosen (a mapping's key or a list's index, at
any depth) and its value is replaced by one of another type or out of range: None, a
list, a mapping, a string, a negative number, a huge number, NaN, infinity, a bool
(:data:`fuzz_helpers.WRONG_VALUES`). The command must then either accept it (some
replacements are still valid: a name that is any string, a bool where an integer is
expected, ...) or refuse it with exit code != 0 and ONE line on stderr naming the key
(or the file), never a traceback, and change no file that existed before.

Every key gets the :data:`CORE` values (one per kind of mistake); hypothesis draws
further (key, value) pairs from all of :data:`~fuzz_helpers.WRONG_VALUES`.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_helpers import (
    TINY_TRAIN,
    WRONG_VALUES,
    check,
    dotted,
    fuzz_settings,
    key_paths,
    replaced,
    report,
    run_cli,
    snapshot,
)

_ids = itertools.count()
# what medseg reads of a dataset.json (the synthetic generator's own notes are not)
DATASET_KEYS = ("name", "channel_names", "labels", "numTraining", "file_ending")
CORE = [None, "text", -1, 10**30, math.nan]
"""One value per kind of mistake: missing, wrong type, negative, huge, not a number."""


def _names(path: tuple, file: Path, value=None) -> list[str]:
    """What a refusal may name: the key (dotted, or its last part), the file, or (a path
    given as the value) the file or folder that value names."""
    keys = [dotted(path)] + [str(p) for p in path if not isinstance(p, int)]
    return [*keys, str(file), *([value] if isinstance(value, str) and value else [])]


def _fail(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


def test_the_unmodified_files_are_accepted(datasets, tiny_model, tmp_path):
    """The valid files every mutation starts from (else every mutation would be refused for them)."""
    dataset = datasets[".nii.gz"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**_run_config(dataset), "output_dir": str(tmp_path / "run")}))
    adapt = tmp_path / "adapt.yaml"
    adapt.write_text(yaml.safe_dump({**_adapt_config(tiny_model, dataset), "output_dir": str(tmp_path / "adapted")}))
    for argv in (["train", config], ["adapt", adapt], ["plan", dataset, "-o", tmp_path / "plan" / "c.yaml", "--workers", "1"],
                 ["evaluate", "--pred", dataset / "labelsTs", "--ref", dataset / "labelsTs", "--output", tmp_path / "ev",
                  "--workers", "1", "--no-report", "--metrics", "dice"]):
        result = run_cli(argv)
        assert result.code == 0 and result.escaped is None, (argv[0], result.err[-2000:], result.escaped)


# --------------------------------------------------------------------------- dataset.json

@pytest.fixture(scope="session")
def dataset_json(datasets) -> dict:
    raw = json.loads((datasets[".nii.gz"] / "dataset.json").read_text())
    return {k: raw[k] for k in DATASET_KEYS if k in raw}


def _dataset_json_case(datasets, dataset_json, root: Path, path: tuple, value, command: str) -> list[str]:
    dataset = root / "dataset"
    shutil.copytree(datasets[".nii.gz"], dataset)
    target = dataset / "dataset.json"
    target.write_text(json.dumps(replaced(dataset_json, path, value)))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAIN(dataset, root / "run")))
    argv = {
        "plan": ["plan", dataset, "-o", root / "plan" / "config.yaml", "--workers", "1"],
        "train": ["train", config],
        "evaluate": ["evaluate", "--pred", dataset / "labelsTs", "--ref", dataset / "labelsTs", "--output",
                     root / "evaluation", "--dataset-json", target, "--workers", "1", "--no-report", "--metrics", "dice"],
    }[command]
    before = snapshot(dataset, config)
    result = run_cli(argv)
    return check(result, _names(path, target, value), None, before, snapshot(dataset, config),
                 f"{command}, dataset.json {dotted(path)} = {value!r}")


def test_dataset_json_with_each_kind_of_mistake_at_every_key(datasets, dataset_json, tmp_path, record_property):
    problems, tried = [], 0
    for path in key_paths(dataset_json):
        for value in CORE:
            command = ("plan", "train", "evaluate")[tried % 3]
            problems += _dataset_json_case(datasets, dataset_json, tmp_path / str(tried), path, value, command)
            tried += 1
    report(record_property, "plan, train, evaluate: dataset.json, each kind of mistake at every key", tried)
    _fail(problems)


def test_dataset_json_with_a_wrong_value_at_any_key(datasets, dataset_json, tmp_path_factory, record_property):
    tried = []

    @settings(**fuzz_settings(30))
    @given(data=st.data())
    def one(data):
        path = data.draw(st.sampled_from(key_paths(dataset_json)), label="key")
        value = data.draw(st.sampled_from(WRONG_VALUES), label="value")
        command = data.draw(st.sampled_from(["plan", "train", "evaluate"]), label="command")
        tried.append(command)
        root = tmp_path_factory.mktemp("dataset_json") / str(next(_ids))
        _fail(_dataset_json_case(datasets, dataset_json, root, path, value, command))

    one()
    report(record_property, "plan, train, evaluate: dataset.json with a wrong value at a key", len(tried))


# --------------------------------------------------------------------------- run config

def _run_config(dataset: Path) -> dict:
    """A valid config that sets a value at most keys (so that there is something to replace)."""
    raw = TINY_TRAIN(dataset, Path("unused"))
    raw["data"].update({"target_spacing": [0.8, 0.8, 1.2], "normalization": {"scheme": "auto", "ct_clip": [-100, 300]},
                        "augmentation": {"flip_prob": 0.5, "affine_prob": 0.2, "rotate_range_deg": 15.0},
                        "foreground_oversample": 0.33, "cache_rate": 0.0})
    raw["losses"] = [{"name": "dice_ce", "weight": 1.0},
                     {"name": "cldice", "weight": 0.5, "iterations": 3, "start": 0, "ramp": 0}]
    raw["train"].update({"optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 1e-5},
                         "scheduler": {"name": "poly", "warmup_iterations": 0, "poly_power": 0.9},
                         "amp": True, "grad_clip": 12.0, "deterministic": False})
    raw["inference"].update({"mode": "gaussian", "tta_flips": False})
    return raw


def _run_config_case(datasets, root: Path, path: tuple, value) -> list[str]:
    root.mkdir(parents=True)
    raw = replaced(_run_config(datasets[".nii.gz"]), path, value)
    raw["output_dir"] = str(root / "run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = snapshot(config, datasets[".nii.gz"])
    result = run_cli(["train", config])
    problems = check(result, _names(path, config, value), None, before, snapshot(config, datasets[".nii.gz"]),
                     f"train, {dotted(path)} = {value!r}")
    if result.code not in (0, None) and (root / "run").exists() and "diverged" not in result.err:
        problems.append(f"train, {dotted(path)} = {value!r}: refused the config but created {root / 'run'}")
    return problems


def _config_keys(datasets) -> list[tuple]:
    return [p for p in key_paths(_run_config(datasets[".nii.gz"])) if p != ("output_dir",)]


def test_run_config_with_each_kind_of_mistake_at_every_key(datasets, tmp_path, record_property):
    problems, tried = [], 0
    for path in _config_keys(datasets):
        for value in CORE:
            problems += _run_config_case(datasets, tmp_path / str(tried), path, value)
            tried += 1
    report(record_property, "train: run config, each kind of mistake at every key", tried)
    _fail(problems)


def test_run_config_with_a_wrong_value_at_any_key(datasets, tmp_path_factory, record_property):
    tried = []

    @settings(**fuzz_settings(40))
    @given(data=st.data())
    def one(data):
        path = data.draw(st.sampled_from(_config_keys(datasets)), label="key")
        value = data.draw(st.sampled_from(WRONG_VALUES), label="value")
        tried.append(path)
        _fail(_run_config_case(datasets, tmp_path_factory.mktemp("run_config") / str(next(_ids)), path, value))

    one()
    report(record_property, "train: run config with a wrong value at a key", len(tried))


# --------------------------------------------------------------------------- adaptation config

def _adapt_config(model: Path, target: Path) -> dict:
    return {
        "source_run": str(model),
        "target": {"dataset": str(target), "subset": "Tr", "eval_labels": str(target / "labelsTr")},
        "adapt": {"method": "mean_teacher", "iterations": 1, "batch_size": 2, "lr": 0.001, "log_interval": 1,
                  "checkpoint_interval": 1, "mean_teacher": {"decay": 0.99, "rampup_iterations": 1}},
        "output_dir": "unused",
        "seed": 0,
        "device": "cpu",
    }


def _adapt_case(model: Path, target: Path, root: Path, path: tuple, value) -> list[str]:
    root.mkdir(parents=True)
    raw = replaced(_adapt_config(model, target), path, value)
    raw["output_dir"] = str(root / "adapted")
    config = root / "adapt.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = snapshot(config, target, model)
    result = run_cli(["adapt", config])
    return check(result, _names(path, config, value), None, before, snapshot(config, target, model),
                 f"adapt, {dotted(path)} = {value!r}")


def test_adapt_config_with_each_kind_of_mistake_at_every_key(tiny_model, datasets, tmp_path, record_property):
    target = datasets[".nii.gz"]
    problems, tried = [], 0
    for path in key_paths(_adapt_config(tiny_model, target)):
        if path == ("output_dir",):
            continue
        for value in CORE:
            problems += _adapt_case(tiny_model, target, tmp_path / str(tried), path, value)
            tried += 1
    report(record_property, "adapt: adaptation config, each kind of mistake at every key", tried)
    _fail(problems)


def test_adapt_config_with_a_wrong_value_at_any_key(tiny_model, datasets, tmp_path_factory, record_property):
    target = datasets[".nii.gz"]
    keys = [p for p in key_paths(_adapt_config(tiny_model, target)) if p != ("output_dir",)]
    tried = []

    @settings(**fuzz_settings(16))
    @given(data=st.data())
    def one(data):
        path = data.draw(st.sampled_from(keys), label="key")
        value = data.draw(st.sampled_from(WRONG_VALUES), label="value")
        tried.append(path)
        _fail(_adapt_case(tiny_model, target, tmp_path_factory.mktemp("adapt_config") / str(next(_ids)), path, value))

    one()
    report(record_property, "adapt: adaptation config with a wrong value at a key", len(tried))

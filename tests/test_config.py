"""The typed run config: validation names the key, --set overrides, shipped configs load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medseg.config import RunConfig, apply_overrides, dump_config, load_config, validate_config
from medseg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"data": {"dataset": "ds"}, "train": {"iterations": 10}, "output_dir": "run"}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_minimal_config_gets_documented_defaults():
    cfg = validate_config(MINIMAL)
    assert cfg.model.name == "unet"
    assert cfg.losses[0].name == "dice_ce"
    assert cfg.data.patch_size == [64, 64, 64] and cfg.spatial_dims == 3
    assert cfg.device == "auto" and cfg.train.amp


def test_paths_are_made_absolute_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = validate_config({**MINIMAL, "data": {"dataset": "data/../ds", "cache_dir": "~/cache", "split_file": None}})
    assert cfg.data.dataset == tmp_path / "ds" and cfg.output_dir == tmp_path / "run"
    assert cfg.data.cache_dir == tmp_path / "home" / "cache" and cfg.data.split_file is None
    assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg  # a stored config reads back the same
    # split_file: as given from here, else inside the dataset (nnU-Net's splits_final.json)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "splits_final.json").write_text("[]")
    inside = validate_config({**MINIMAL, "data": {"dataset": "ds", "split_file": "splits_final.json"}})
    assert inside.data.split_file == tmp_path / "ds" / "splits_final.json"
    (tmp_path / "splits_final.json").write_text("[]")
    here = validate_config({**MINIMAL, "data": {"dataset": "ds", "split_file": "splits_final.json"}})
    assert here.data.split_file == tmp_path / "splits_final.json"
    missing = validate_config({**MINIMAL, "data": {"dataset": "ds", "split_file": "none.json"}})
    assert missing.data.split_file == tmp_path / "none.json"


def test_unknown_key_is_named(tmp_path):
    raw = {**MINIMAL, "train": {"iterations": 10, "iteratons": 5}}
    with pytest.raises(ConfigError, match=r"unknown key 'train\.iteratons'"):
        load_config(_write(tmp_path, raw))


def test_wrong_type_is_named(tmp_path):
    raw = {**MINIMAL, "train": {"iterations": "many"}}
    with pytest.raises(ConfigError, match=r"key 'train\.iterations'"):
        load_config(_write(tmp_path, raw))
    with pytest.raises(ConfigError, match=r"key 'data\.patch_size"):
        validate_config({**MINIMAL, "data": {"dataset": "ds", "patch_size": [64, "x", 64]}})


@pytest.mark.parametrize("missing", ["data.dataset", "train.iterations", "output_dir"])
def test_missing_required_key_is_named(missing):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    section, _, key = missing.rpartition(".")
    (raw[section] if section else raw).pop(key)
    with pytest.raises(ConfigError, match=re.escape(f"missing required key '{missing}'")):
        validate_config(raw)


def test_set_overrides_dotted_keys_scalars_and_lists(tmp_path):
    path = _write(tmp_path, MINIMAL)
    cfg = load_config(
        path,
        [
            "train.iterations=7",
            "data.patch_size=[32, 32]",
            "data.target_spacing=[1.0, 1.0]",
            "train.optimizer.lr=3e-4",
            "train.amp=false",
            "model.params.channels=[8,16,32]",
            "output_dir=elsewhere",
            "data.split_file=null",
        ],
    )
    assert cfg.train.iterations == 7
    assert cfg.data.patch_size == [32, 32] and cfg.spatial_dims == 2
    assert cfg.data.target_spacing == [1.0, 1.0]
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.train.amp is False
    assert cfg.model.params["channels"] == [8, 16, 32]
    assert cfg.output_dir == Path("elsewhere").absolute()


def test_set_rejects_malformed_and_unknown_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["train.iterations"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.bogus'"):
        load_config(path, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"iterations": 3}}, ["train.iterations.x=1"])


def test_bad_values_and_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"key 'train\.optimizer\.name'"):
        validate_config({**MINIMAL, "train": {"iterations": 3, "optimizer": {"name": "lion"}}})
    with pytest.raises(ConfigError, match="config file not found$"):
        load_config(tmp_path / "nope.yaml")
    # the README's example configs, asked for outside a checkout: where medseg's copy is
    from medseg.config import example_configs_folder

    with pytest.raises(ConfigError, match=r"^configs/nope\.yaml: config file not found; .*medseg plan DATASET"):
        load_config("configs/nope.yaml")
    monkeypatch.chdir(tmp_path)
    shipped = example_configs_folder() / "adapt" / "sfda.yaml"
    with pytest.raises(ConfigError, match=rf"^configs/adapt/sfda\.yaml: config file not found; medseg's example is "
                                          rf"{re.escape(str(shipped))}: copy it here"):
        load_config("configs/adapt/sfda.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_config_round_trips():
    cfg = validate_config({**MINIMAL, "losses": [{"name": "cldice", "weight": 0.5, "iterations": 3}]})
    again = validate_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert again.losses[0].params() == {"iterations": 3}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_build(path):
    from medseg.models import build_model

    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the network must accept its own patch size (ConfigError otherwise); 1 channel, 2 classes
    build_model(cfg.model, cfg.spatial_dims, 1, 2, list(cfg.data.patch_size))


def test_a_loss_term_that_would_never_start_is_refused(tmp_path):
    from medseg.config import validate_config

    raw = {
        "data": {"dataset": str(tmp_path)},
        "train": {"iterations": 100},
        "losses": [{"name": "dice_ce"}, {"name": "betti_matching", "weight": 0.5, "start": 100}],
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(ConfigError, match=r"losses\[1\] \(betti_matching\): start 100 is iteration 100.*never be used"):
        validate_config(raw)
    raw["losses"][1]["start"] = 0.99
    assert validate_config(raw).losses[1].schedule(100) == (99, 0)


def test_a_config_with_steps_where_no_term_is_on_is_refused(tmp_path):
    """Every term starting late (or weighing 0) made step 1's loss a constant 0: a
    traceback in backward after the run folder was written."""
    from medseg.config import validate_config

    raw = {"data": {"dataset": str(tmp_path)}, "train": {"iterations": 100}, "output_dir": str(tmp_path / "run"),
           "losses": [{"name": "dice_ce", "start": 2}, {"name": "cldice", "start": 0.5, "ramp": 2}]}
    with pytest.raises(ConfigError, match=r"losses: no term is on in iterations 1 to 2 .*start at 0"):
        validate_config(raw)
    raw["losses"] = [{"name": "dice_ce", "weight": 0.0}]
    with pytest.raises(ConfigError, match="losses: every term has weight 0"):
        validate_config(raw)
    raw["losses"] = [{"name": "dice_ce", "weight": 0.0}, {"name": "cldice", "start": 1}]
    with pytest.raises(ConfigError, match="no term is on in iterations 1 to 1"):
        validate_config(raw)
    raw["losses"] = [{"name": "dice_ce"}, {"name": "cldice", "start": 1}]
    assert validate_config(raw).losses[1].schedule(100) == (1, 0)


def test_an_overflowing_weight_decay_is_refused_before_the_run_folder(tmp_path):
    """1e300 passed validation and failed in the optimizer's first step (a traceback), after
    the run folder was written, which then refused the corrected rerun."""
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set train.optimizer.weight_decay=1e300: .*less than or equal to 1"):
        load_config(path, ["train.optimizer.weight_decay=1e300"])


def test_a_bad_set_is_named_as_the_set_not_as_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["train.iterations=abc"])
    assert str(caught.value).startswith("--set train.iterations=abc: Input should be a valid integer")
    with pytest.raises(ConfigError, match=r"^--set train\.bogus=1: unknown key 'train\.bogus'$"):
        load_config(path, ["train.bogus=1"])
    # a misspelt section: it was blamed on the file
    with pytest.raises(ConfigError, match=r"^--set trian\.iterations=5: unknown key 'trian'$"):
        load_config(path, ["trian.iterations=5"])
    # a key inside the value a --set gave (YAML reads {name:cldice} without its space as a key): blamed on the file
    with pytest.raises(ConfigError, match=r"^--set losses=\[\{name:cldice\}\]: missing required key 'losses\.0\.name'$"):
        load_config(path, ["losses=[{name:cldice}]"])


def test_a_bad_key_of_a_loss_term_names_the_term(tmp_path):
    """'losses.1.weight' alone left the user to count the list's entries."""
    raw = {**MINIMAL, "losses": [{"name": "dice_ce"}, {"name": "cldice", "weight": True}]}
    with pytest.raises(ConfigError, match=r"^config: key 'losses\.1\.weight' \(cldice\): must be a number, got true$"):
        validate_config(raw)
    raw["losses"][1] = {"name": "cldice", "heads": "every"}
    with pytest.raises(ConfigError, match=r"key 'losses\.1\.heads' \(cldice\): "):
        validate_config(raw)
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set losses=\[\{name: clce, start: soon\}\]: "
                                          r"key 'losses\.0\.start' \(clce\): must be a number, got 'soon'$"):
        load_config(path, ["losses=[{name: clce, start: soon}]"])


def test_a_ramp_that_ends_after_the_run_is_said_at_the_start_of_training(caplog):
    """start: 0.9, ramp: 0.5 of 10 iterations reached 20 % of its weight, without a word."""
    import logging

    from medseg.training.trainer import _warn_of_unfinished_ramps

    cfg = validate_config({**MINIMAL, "losses": [{"name": "dice_ce"}, {"name": "cldice", "weight": 0.5, "start": 0.9,
                                                                       "ramp": 0.5}]})
    with caplog.at_level(logging.WARNING, logger="medseg.training"):
        _warn_of_unfinished_ramps(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "losses[1] (cldice): its ramp ends at iteration 14, after the run's 10: its weight reaches only 20 % of 0.5"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg.training"):
        _warn_of_unfinished_ramps(validate_config({**MINIMAL, "losses": [{"name": "dice_ce"}, {"name": "cldice", "start": 5, "ramp": 5}]}))
    assert caplog.records == []  # full weight at the last iteration

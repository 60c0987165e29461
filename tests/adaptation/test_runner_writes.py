"""The adapted run's files are written atomically; a broken label_stats.json of the source
run is named (with how to rewrite it), never copied, never a traceback."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from medseg.adaptation import run_adaptation, runner, validate_adapt_config
from medseg.cli import main as cli_main
from medseg.errors import CheckpointError
from medseg.runfolder import provenance as runfolder_provenance

from adapt_helpers import adapt_raw


def test_every_run_file_goes_through_write_atomic(source_run, target_dataset, tmp_path, monkeypatch):
    written: list[str] = []
    original = runner.write_atomic

    def spy(path, data, *args, **kwargs):
        written.append(Path(path).name)
        return original(path, data, *args, **kwargs)

    monkeypatch.setattr(runner, "write_atomic", spy)
    monkeypatch.setattr(runfolder_provenance, "write_atomic", spy)  # provenance.json
    run = run_adaptation(validate_adapt_config(adapt_raw(source_run, target_dataset, tmp_path / "adapted", "sfda",
                                                         iterations=2)))
    assert set(written) == {"config.yaml", "source_config.yaml", "provenance.json", "label_stats.json", "target_eval.json"}
    assert (run / "label_stats.json").read_bytes() == (source_run / "label_stats.json").read_bytes()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_broken_source_label_stats_is_named_not_copied(source_run, target_dataset, tmp_path, capsys, caplog):
    source = tmp_path / "source"
    shutil.copytree(source_run, source)
    stats = source / "label_stats.json"
    stats.write_bytes(stats.read_bytes()[:40])  # torn by a kill mid-write

    # SFDA needs the prior: one line naming the file and how to rewrite it
    config = tmp_path / "sfda.yaml"
    config.write_text(yaml.safe_dump(adapt_raw(source, target_dataset, tmp_path / "sfda", "sfda", iterations=2)))
    assert cli_main(["adapt", str(config)]) == CheckpointError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{stats}: unreadable" in err and f"medseg train {source / 'config.yaml'} --resume" in err
    assert not (tmp_path / "sfda").exists()

    # Tent does not need it: the run goes on, without a copy of the broken file
    with caplog.at_level(logging.WARNING, logger="medseg"):
        run = run_adaptation(validate_adapt_config(adapt_raw(source, target_dataset, tmp_path / "tent", "tent",
                                                             iterations=2)))
    assert not (run / "label_stats.json").exists()
    assert any(str(stats) in r.getMessage() and "not copied" in r.getMessage() for r in caplog.records)

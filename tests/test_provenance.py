"""`medseg --version` and the provenance record every run folder carries."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

import medseg
from medseg.cli import main
from medseg.provenance import build_info, provenance


def test_version_prints_the_build_and_exits_zero(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"medseg {medseg.__version__}"
    assert out[1].startswith("topology engine: CPU")  # the engine is built in every test environment
    assert out[2].startswith("torch ")


def test_version_as_a_console_command():
    done = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"medseg {medseg.__version__}" in done.stdout and "Traceback" not in done.stderr


def test_provenance_names_the_build_the_device_and_the_command():
    record = provenance("cpu", argv=["medseg", "train", "a b.yaml"])
    assert record["medseg"] == medseg.__version__
    assert record["engine"]["cpu"] is True and isinstance(record["engine"]["cuda"], bool)
    assert record["device"] == "cpu"
    assert record["command"] == "medseg train 'a b.yaml'"  # quoted so it can be pasted back
    assert record["torch"] and record["monai"]
    assert set(build_info()) <= set(record)
    assert "worker_command" not in record


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="reads the launcher's command line from Linux's /proc")
def test_under_torchrun_the_command_is_the_launchers():
    # a worker's parent is the torchrun agent; here the parent is this test process
    script = "import json; from medseg.provenance import provenance; print(json.dumps(provenance('cpu')))"
    env = dict(os.environ, TORCHELASTIC_RUN_ID="r1", WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", script, "worker-arg"], env=env, capture_output=True, text=True, check=True)
    record = json.loads(out.stdout)
    with open("/proc/self/cmdline", "rb") as handle:
        ours = [w.decode() for w in handle.read().split(b"\0") if w]
    assert record["command"] == shlex.join(ours)
    assert record["worker_command"].endswith("worker-arg") and record["world_size"] == 2


def test_a_source_folder_without_the_built_engine_is_named_as_such(tmp_path, monkeypatch):
    """After `pip install .`, `python -m medseg` run from the source folder imported that
    folder's medseg/, without the engine: evaluate left out clDice and Betti matching and
    said "reinstall medseg", which did not help."""
    from medseg.topology import _inputs

    package = tmp_path / "checkout" / "medseg" / "topology"
    package.mkdir(parents=True)
    (tmp_path / "checkout" / "pyproject.toml").write_text("[project]\nname = 'medseg'\n")
    monkeypatch.setattr(_inputs, "__file__", str(package / "_inputs.py"))
    assert "is not built; reinstall medseg" in _inputs.engine_missing()  # an editable install: its folder
    monkeypatch.setattr(_inputs, "_installed_elsewhere", lambda: True)  # `pip install .`
    assert _inputs.engine_missing().startswith(
        f"medseg is imported from its source folder {tmp_path / 'checkout'}, which holds no built topology engine")
    (package / "_engine.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # built in place: another cause
    assert "is not built; reinstall medseg" in _inputs.engine_missing()

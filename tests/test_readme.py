"""The README's Python snippets run as written (its import line named a class the package did not export)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readmes_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block: this test reads the wrong file"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - the project's own README


def test_the_config_reference_is_the_schemas():
    """The README's table of config keys is generated from the schema; a key added,
    removed or redescribed in medseg/config.py or medseg/adaptation/config.py without
    `python scripts/config_reference.py --write` fails here (nine keys, grad_clip and
    deterministic among them, were documented nowhere)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", README.parent / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = module.reference()
    assert "`train.grad_clip`" in current and "`adapt.sfda.kl_weight`" in current
    assert module.readme_block(README.read_text()) == current, "run: python scripts/config_reference.py --write"

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

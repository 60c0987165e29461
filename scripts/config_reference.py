"""The config keys of ``medseg train`` and ``medseg adapt`` as Markdown tables, from the schema.

README.md holds the tables between the ``config-reference`` markers; ``--write`` puts the
current ones there, and ``tests/test_readme.py`` fails when they differ from the schema
(a key added, removed or redescribed in ``medseg/config.py`` or
``medseg/adaptation/config.py`` without the README following).

Usage::

    python scripts/config_reference.py           # print the tables
    python scripts/config_reference.py --write   # replace them in README.md
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- config-reference:start (python scripts/config_reference.py --write) -->"
END = "<!-- config-reference:end -->"


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (``X``, ``X | None``, ``list[X]``)."""
    found = []
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            found.append(arg)
        elif typing.get_args(arg):
            found.extend(_models(arg))
    return found


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "see below"
    if value is None:
        return "null"
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value}".replace("'", "")


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, default, description) of every key of ``model``, in the schema's order."""
    for name, field in model.model_fields.items():
        key = prefix + name
        nested = _models(field.annotation)
        if nested:
            if field.description:
                yield key, _default(field), field.description
            for sub in nested:
                yield from rows(sub, key + ("[].", ".")[typing.get_origin(field.annotation) is not list])
        else:
            yield key, _default(field), field.description or ""


def table(model: type[BaseModel]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, description in rows(model):
        cell = description.replace("|", "\\|")
        lines.append(f"| `{key}` | {('`' + default + '`') if default else ''} | {cell} |")
    return "\n".join(lines)


def reference() -> str:
    from medseg.adaptation.config import AdaptConfig
    from medseg.config import RunConfig

    return "\n".join([
        START,
        "`medseg train` / `plan` / `study` run configs (`medseg/config.py`; every loss term's other keys are its loss's "
        "parameters, named in its docstring):",
        "",
        table(RunConfig),
        "",
        "`medseg adapt` configs (`medseg/adaptation/config.py`):",
        "",
        table(AdaptConfig),
        END,
    ])


def readme_block(text: str) -> str | None:
    start, end = text.find(START), text.find(END)
    return None if start < 0 or end < start else text[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the tables in README.md")
    args = ap.parse_args(argv)
    current = reference()
    if not args.write:
        print(current)
        return 0
    text = README.read_text()
    block = readme_block(text)
    if block is None:
        print(f"{README}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    README.write_text(text.replace(block, current))
    return 0


if __name__ == "__main__":
    sys.exit(main())

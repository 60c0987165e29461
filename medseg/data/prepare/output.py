"""The dataset folder a converter creates (``--out``), checked before anything is read or written.

Every converter writes the new dataset into a temporary sibling of ``--out`` and, with
``--force``, replaces ``--out`` by it at the end. That replacement deletes what was
there, so ``--out`` must never be one of the converter's inputs, a folder holding one,
or a folder inside one (the first two deleted the input; the last mixed the dataset
into it), nor the current folder or one holding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medseg.atomic import make_writable_folder
from medseg.errors import DataError


def check_dataset_output(out: Path, overwrite: bool, inputs: Mapping[str, Path] | None = None) -> None:
    """Raise a one-line :class:`DataError` unless ``out`` is a safe folder to create.

    ``inputs``: the converter's input folders by their option name (``{"--src": src}``).
    An existing ``out`` needs ``overwrite`` (``--force``); its parent must be writable
    (checked by writing a probe file there, so an unwritable place fails before the
    work, not after it).
    """
    out = Path(out)
    target = out.resolve()
    for flag, folder in (inputs or {}).items():
        source = Path(folder).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise DataError(f"--out {out}: must lie outside {flag} {folder} and must not contain it")
    cwd = Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        raise DataError(f"--out {out}: is the current folder or holds it; name a new dataset folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (pass --force to replace it)")
    try:
        make_writable_folder(target.parent)
    except OSError as err:
        raise DataError(f"--out {out}: cannot write there ({err.strerror or err})") from None

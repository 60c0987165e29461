"""The last steps of every converter: read the result back as medseg will, then publish it.

A converter writes into :func:`temporary_dataset` (``.NAME.tmp-PID`` beside the output)
and hands it to :func:`publish_dataset`, which checks it and only then renames it to the
output: a dataset medseg would refuse (label values that skip a number) is never left
as the output, where a rerun then found it "already exists".
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from medseg.data.dataset import Case, DatasetInfo, check_dataset
from medseg.errors import DataError


def temporary_dataset(out_dir: Path) -> Path:
    """This process's empty folder to build ``out_dir`` in; folders of dead converters
    (killed by SIGTERM or SIGKILL) are removed first."""
    from medseg.atomic import process_alive

    out_dir = Path(out_dir)
    pattern = re.compile(re.escape(f".{out_dir.name}.tmp-") + r"(\d+)$")
    if out_dir.parent.is_dir():
        for stale in out_dir.parent.iterdir():
            found = pattern.match(stale.name)
            if found and int(found.group(1)) != os.getpid() and not process_alive(int(found.group(1))):
                shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def publish_dataset(tmp: Path, out_dir: Path, log: Callable[[str], None], verify: bool = False
                    ) -> tuple[DatasetInfo, list[Case]]:
    """Check the dataset built in ``tmp`` (:func:`check_converted`), then replace ``out_dir`` with it.

    Raises
    ------
    DataError
        As :func:`check_converted`, naming the files as they would be in ``out_dir``;
        ``out_dir`` is then left as it was.
    """
    try:
        result = check_converted(tmp, log, verify=verify)
    except DataError as err:
        raise DataError(str(err).replace(str(tmp), str(out_dir))) from None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return result


def check_converted(root: str | Path, log: Callable[[str], None], verify: bool = False) -> tuple[DatasetInfo, list[Case]]:
    """:func:`check_dataset` on a converted dataset, its warnings passed to ``log`` as lines.

    Raises the same :class:`medseg.errors.DataError` as ``check_dataset`` when the output
    is not a readable dataset; ``verify`` also loads every case.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = check_dataset(root, verify=verify)
    for w in caught:
        log(f"warning: {w.message}")
    return result

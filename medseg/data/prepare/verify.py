"""The last step of every converter: read the result back as medseg will."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from medseg.data.dataset import Case, DatasetInfo, check_dataset


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

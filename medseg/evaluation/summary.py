"""``summary.json`` and the defaults the evaluation commands share.

``medseg evaluate`` (:mod:`~medseg.evaluation.evaluate`) writes ``summary.json``;
``medseg report html`` (:mod:`~medseg.evaluation.report`), ``medseg report compare``
(:mod:`~medseg.evaluation.compare`) and the study read it. What they share lives here,
below all three (none of them imports another for it): finding and reading a summary,
the order metrics are shown in, the JSON encoding of numpy numbers, and each default
that the command line, the library functions and the study configs all name. The module
imports nothing heavy, so the command line reads its defaults from here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from medseg.errors import DataError

__all__ = [
    "SUMMARY_FILE",
    "DEFAULT_TOLERANCE_MM",
    "DEFAULT_WORST_CASES",
    "DEFAULT_PERMUTATIONS",
    "DEFAULT_PICTURED_CASES",
    "PRIMARY_METRICS",
    "find_summary",
    "read_summary",
    "ordered_metrics",
    "json_default",
]

SUMMARY_FILE = "summary.json"

DEFAULT_TOLERANCE_MM = 1.0
"""Default tolerance of the normalised surface Dice, in mm."""

DEFAULT_WORST_CASES = 5
"""(case, label) pairs with the largest topology error pictured in ``report.html``."""

DEFAULT_PERMUTATIONS = 10000
"""Resamples of the paired permutation test (exact enumeration when 2^n is fewer)."""

DEFAULT_PICTURED_CASES = 3
"""Cases per label pictured in ``compare.html``: those whose topology error differs most between the runs."""

PRIMARY_METRICS = (
    "Dice", "IoU", "NSD", "clDice", "HD95", "betti_matching_error", "betti_error",
    "components_pred", "components_ref", "volume_difference_mm3", "volume_difference_relative",
)
"""Metrics shown first (and plotted), in this order; the per-dimension errors follow their sums."""


def find_summary(path: str | Path) -> Path:
    """The ``summary.json`` that ``path`` stands for: the file, ``path/summary.json`` or ``path/evaluation/summary.json``.

    A folder with a single subfolder holding a ``summary.json``, itself or under its
    ``evaluation`` folder (a study's run: ``evaluation/TEST/summary.json``), is accepted too.

    Raises
    ------
    DataError
        When there is none, or several to choose from.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: not found (give a run folder, an evaluation folder or a summary.json)")
    for candidate in (path / SUMMARY_FILE, path / "evaluation" / SUMMARY_FILE):
        if candidate.is_file():
            return candidate
    found = [p for folder in (path, path / "evaluation") if folder.is_dir() for p in sorted(folder.iterdir())
             if p.is_dir() and (p / SUMMARY_FILE).is_file()]
    if len(found) == 1:
        return found[0] / SUMMARY_FILE
    if found:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise DataError(f"{path}: several evaluations in it ({names}); pass the one to compare, e.g. {found[0]}")
    raise DataError(
        f"{path}: no summary.json in it or in {path / 'evaluation'} "
        f"(write one with: medseg evaluate ... --output {path / 'evaluation'})"
    )


def read_summary(source: str | Path) -> dict[str, Any]:
    """A ``summary.json`` file as a dict, checked to hold a ``metric_per_case`` list.

    Raises
    ------
    DataError
        The file is missing, not JSON, or not a summary.
    """
    source = Path(source)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise DataError(f"{source}: summary.json not found") from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{source}: not a readable summary.json ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metric_per_case"), list):
        raise DataError(f"{source}: not an evaluation summary (no 'metric_per_case' list; write one with medseg evaluate)")
    for i, entry in enumerate(data["metric_per_case"]):  # what the pages read from each case
        where = f"{source}: metric_per_case[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics", {}), dict):
            raise DataError(f"{where}: not a case of medseg evaluate (a mapping with a 'metrics' mapping)")
        for label in entry.get("metrics", {}):  # none for a missing or failed case
            if not (isinstance(label, str) and label.lstrip("-").isdigit()):
                raise DataError(f"{where}.metrics: key {label!r} is not a label value")
        for key in ("prediction_file", "reference_file"):
            if key in entry and not isinstance(entry[key], str):
                raise DataError(f"{where}.{key}: {entry[key]!r} is not a path")
    return data


def ordered_metrics(names: Sequence[str]) -> list[str]:
    """Primary metrics first (each followed by its per-dimension parts), then the rest alphabetically."""
    names = list(dict.fromkeys(names))
    out: list[str] = []
    for name in PRIMARY_METRICS:
        if name in names:
            out.append(name)
        if name.endswith("_error"):
            stem = name[: -len("_error")]
            out.extend(sorted(n for n in names if n.startswith(stem + "_") and n.endswith("_error")
                              and n[len(stem) + 1 : -len("_error")].isdigit()))
    return out + sorted(n for n in names if n not in out)


def strict_json(value: Any) -> str:
    """``value`` as standard JSON (indented): NaN and ±inf, which Python writes as bare
    ``NaN``/``Infinity`` and strict parsers (JavaScript's, jq's) refuse, become ``null``;
    numpy numbers become Python numbers. For medseg's own files; ``summary.json`` keeps
    nnU-Net's NaN."""
    import numpy as np

    def finite(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        if isinstance(v, np.ndarray):
            return finite(v.tolist())
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        return v

    return json.dumps(finite(value), indent=2, default=json_default, allow_nan=False) + "\n"


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy integers and floats as Python numbers."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value

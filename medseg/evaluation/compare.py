"""``medseg report compare A B``: two evaluations of the same cases, paired.

A and B are each a run folder (whose ``evaluation/summary.json`` is used), an
evaluation folder (with ``summary.json``) or a ``summary.json`` itself; nnU-Net's
``summary.json`` works too (case names then come from the reference file names).

For every label and metric present in both, the cases evaluated in both with a defined
value in both are paired (a case where one run has both masks empty, so that its Dice,
IoU, NSD, clDice, HD95 or relative volume difference is undefined, counts as that run's
perfect agreement when the other run's value is defined: :data:`BOTH_EMPTY_AGREEMENT`),
and the differences ``B - A`` are summarised: means of A and
B, mean and median difference, and two two-sided paired tests of "no difference":

* the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped;
  p = 1 when every difference is zero);
* a sign-flip permutation test of the mean difference (TopoMortar's choice): under
  the null hypothesis each difference is as likely to have the other sign, so
  ``p = P(|mean(s * d)| >= |mean(d)|)`` over random signs ``s``; exact (all ``2^n``
  sign vectors) when that is at most ``permutations``, else ``permutations`` random
  ones (seed 0) with ``p = (1 + hits) / (1 + permutations)``.

"better mean" says which run has the better mean for metrics with a direction (Dice
up, HD95 and the topology errors down; :func:`medseg.evaluation.aggregate.better_direction`),
followed by ``*`` where the permutation test's p is below 0.05 (``significant``): a
better mean alone may be one case's difference.
Cases that are not evaluated in both are listed, not compared.

Results go to the terminal (an aligned table) and, with ``output``, to
``compare.json`` and a self-contained ``compare.html``.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ArgumentError, DataError
from medseg.evaluation import _page
from medseg.evaluation.aggregate import better_side, is_number
from medseg.evaluation.summary import (
    DEFAULT_PERMUTATIONS,
    DEFAULT_PICTURED_CASES,
    PRIMARY_METRICS,
    find_summary,
    ordered_metrics,
    read_summary,
    strict_json,
)

__all__ = ["Evaluation", "find_summary", "load_evaluation", "paired_tests", "compare_evaluations", "most_different_cases",
           "format_table", "run_compare"]

SIGNIFICANCE = 0.05  # only for marking rows; the p-values are reported as they are


@dataclass
class Evaluation:
    """One evaluation: per evaluated case ``{label: {metric: value}}``, and the cases that were not evaluated."""

    path: Path
    per_case: dict[str, dict[str, dict[str, float]]]
    not_evaluated: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the file as read: files, conventions


def load_evaluation(path: str | Path) -> Evaluation:
    """Read the evaluation ``path`` stands for (see :func:`find_summary`).

    Raises
    ------
    DataError
        The file is not JSON, or not a summary (no ``metric_per_case`` list).
    """
    from medseg.data.io import strip_ending

    source = find_summary(path)
    data = read_summary(source)
    entries = data["metric_per_case"]
    per_case: dict[str, dict] = {}
    not_evaluated: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{source}: metric_per_case[{i}] is not an object")
        case = entry.get("case")
        if case is None:
            ref = entry.get("reference_file")
            if not isinstance(ref, str):
                raise DataError(f"{source}: metric_per_case[{i}] has neither 'case' nor 'reference_file'")
            case = strip_ending(Path(ref))
        case = str(case)
        metrics = entry.get("metrics")
        if isinstance(metrics, dict) and metrics:
            per_case[case] = {
                str(label): {k: float(v) for k, v in m.items() if is_number(v)}
                for label, m in metrics.items() if isinstance(m, dict)
            }
        else:
            not_evaluated[case] = str(entry.get("status", "not evaluated"))
    labels = data.get("labels") if isinstance(data.get("labels"), dict) else {}
    return Evaluation(path=source, per_case=per_case, not_evaluated=not_evaluated,
                      labels={str(k): str(v) for k, v in labels.items()}, summary=data)


# --------------------------------------------------------------------------- comparable?

#: The conventions of a summary that change what its metrics mean: two evaluations that
#: differ in one of them are not paired (an NSD at 1 mm is not an NSD at 5 mm).
METRIC_SETTINGS = ("connectivity", "filtration", "nsd_tolerance_mm", "hd95_units", "volume_units")


def _reference_files(evaluation: Evaluation) -> dict[str, str]:
    """Case -> the reference file it was scored against, where the summary says."""
    from medseg.data.io import strip_ending

    out = {}
    for entry in evaluation.summary.get("metric_per_case", []):
        if isinstance(entry, dict) and isinstance(entry.get("reference_file"), str):
            ref = entry["reference_file"]
            out[str(entry.get("case", strip_ending(Path(ref))))] = ref
    return out


def _same_file(a: Path, b: Path) -> bool | None:
    """Whether two files hold the same bytes; None when one cannot be read."""
    try:
        if a.resolve() == b.resolve():
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return None


def check_comparable(a: Evaluation, b: Evaluation) -> list[str]:
    """Refuse two evaluations whose paired metrics would not mean the same; returns warnings.

    Raises
    ------
    DataError
        The summaries differ in a :data:`METRIC_SETTINGS` convention, in the ignore label
        or in the name of a label value, or a case was scored
        against reference files of different content in A and B (a case name paired
        across two datasets). Reference files that moved (different paths, the same
        bytes) are fine; ones that can no longer be read give a warning.
    """
    notes = []
    conv_a, conv_b = a.summary.get("conventions"), b.summary.get("conventions")
    if isinstance(conv_a, dict) and isinstance(conv_b, dict):
        for key in METRIC_SETTINGS:
            if key in conv_a and key in conv_b and conv_a[key] != conv_b[key]:
                raise DataError(
                    f"{a.path} and {b.path}: evaluated with different {key} ({conv_a[key]!r} and {conv_b[key]!r}); "
                    "their metrics do not compare: evaluate both the same way"
                )
    # the ignore label masks prediction voxels out of every metric; a label value named
    # differently means another dataset.json: pairing either would compare settings, not predictions
    ignore_a, ignore_b = a.summary.get("ignore_label"), b.summary.get("ignore_label")
    if ignore_a != ignore_b:
        raise DataError(
            f"{a.path} and {b.path}: evaluated with different ignore labels ({ignore_a!r} and {ignore_b!r}); "
            "their metrics do not compare: evaluate both with the same dataset.json"
        )
    labels_a, labels_b = a.summary.get("labels"), b.summary.get("labels")
    if isinstance(labels_a, dict) and isinstance(labels_b, dict):
        for value in sorted(set(labels_a) & set(labels_b)):
            if labels_a[value] != labels_b[value]:
                raise DataError(
                    f"{a.path} and {b.path}: label {value} is {labels_a[value]!r} in A and {labels_b[value]!r} in B; "
                    "evaluate both with the same dataset.json"
                )
    refs_a, refs_b = _reference_files(a), _reference_files(b)
    unreadable = []
    for case in sorted(set(a.per_case) & set(b.per_case) & set(refs_a) & set(refs_b)):
        same = _same_file(Path(refs_a[case]), Path(refs_b[case]))
        if same is False:
            raise DataError(
                f"case {case}: scored against {refs_a[case]} in A and {refs_b[case]} in B, which differ; "
                "compare evaluations against the same reference labels"
            )
        if same is None and Path(refs_a[case]).resolve() != Path(refs_b[case]).resolve():
            unreadable.append(case)
    if unreadable:
        notes.append(
            f"{len(unreadable)} case(s) name different reference files in A and B that cannot be read to check "
            f"they are the same (e.g. {unreadable[0]})"
        )
    if a.path.resolve() == b.path.resolve():
        notes.append(f"A and B are the same evaluation ({a.path}): every difference is 0")
    return notes


# --------------------------------------------------------------------------- statistics

def _permutation_p(d: np.ndarray, permutations: int, seed: int = 0) -> float:
    n = d.size
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if 2**n <= permutations:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
        stats = np.abs((signs * d).mean(axis=1))
        return float(np.mean(stats >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, 2000):  # chunks keep memory small for many cases
        m = min(2000, permutations - start)
        signs = rng.choice((-1.0, 1.0), size=(m, n))
        hits += int(np.count_nonzero(np.abs((signs * d).mean(axis=1)) >= observed - tolerance))
    return (1 + hits) / (1 + permutations)


def _wilcoxon_p(d: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(wilcoxon(d).pvalue)
        except ValueError:
            return math.nan


def paired_tests(a: np.ndarray, b: np.ndarray, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> dict[str, float]:
    """Paired differences ``b - a`` summarised and tested (two-sided; see the module docstring).

    Examples
    --------
    >>> r = paired_tests(np.array([0.5, 0.6, 0.7, 0.8]), np.array([0.6, 0.7, 0.8, 0.9]))
    >>> round(r["mean_difference"], 6), r["permutation_p"]
    (0.1, 0.125)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    n = int(d.size)
    if n == 0:
        return {"n": 0, "mean_a": math.nan, "mean_b": math.nan, "mean_difference": math.nan,
                "median_difference": math.nan, "std_difference": math.nan, "wilcoxon_p": math.nan,
                "permutation_p": math.nan}
    return {
        "n": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_difference": float(d.mean()),
        "median_difference": float(np.median(d)),
        "std_difference": float(d.std(ddof=1)) if n > 1 else math.nan,
        "wilcoxon_p": _wilcoxon_p(d),
        "permutation_p": _permutation_p(d, permutations, seed),
    }


def _shown(names) -> list[str]:
    return [n for n in ordered_metrics(names) if n in PRIMARY_METRICS or n.endswith("_error")]


#: A metric's value for a perfect agreement, given to a case where both masks are empty (the
#: metric is undefined there, NaN) when the other run's value is defined: dropping such a
#: pair hid the other run's false positives (a rare label invented in 3 of 4 cases compared
#: as "=", on the one case where both runs had it).
BOTH_EMPTY_AGREEMENT = {"Dice": 1.0, "IoU": 1.0, "NSD": 1.0, "clDice": 1.0, "HD95": 0.0,
                        "volume_difference_relative": 0.0}


def _both_empty(values: dict[str, Any]) -> bool:
    return values.get("n_ref") == 0 and values.get("n_pred") == 0


def _paired_values(metric: str, va_case: dict[str, Any], vb_case: dict[str, Any]) -> tuple[float, float]:
    """The two runs' values of ``metric`` on one case, with :data:`BOTH_EMPTY_AGREEMENT` for a
    run whose masks are both empty where the other run's value is defined."""
    va, vb = va_case.get(metric, math.nan), vb_case.get(metric, math.nan)
    if metric in BOTH_EMPTY_AGREEMENT:
        if not math.isfinite(va) and math.isfinite(vb) and _both_empty(va_case):
            va = BOTH_EMPTY_AGREEMENT[metric]
        elif not math.isfinite(vb) and math.isfinite(va) and _both_empty(vb_case):
            vb = BOTH_EMPTY_AGREEMENT[metric]
    return va, vb


def compare_evaluations(a: Evaluation, b: Evaluation, permutations: int = DEFAULT_PERMUTATIONS) -> dict[str, Any]:
    """The comparison (what ``compare.json`` holds): per label and metric the paired statistics.

    Raises
    ------
    DataError
        When no case is evaluated in both.
    """
    cases_a = set(a.per_case) | set(a.not_evaluated)
    cases_b = set(b.per_case) | set(b.not_evaluated)
    paired = sorted(set(a.per_case) & set(b.per_case))
    not_evaluated = {
        c: {"A": "ok" if c in a.per_case else a.not_evaluated[c], "B": "ok" if c in b.per_case else b.not_evaluated[c]}
        for c in sorted(cases_a & cases_b) if c not in paired
    }
    if not paired:
        raise DataError(
            f"{a.path} and {b.path}: no case is evaluated in both "
            f"({len(a.per_case)} and {len(b.per_case)} evaluated cases; are they evaluations of the same cases?)"
        )
    labels_a = {l for c in paired for l in a.per_case[c]}
    labels_b = {l for c in paired for l in b.per_case[c]}
    results: dict[str, Any] = {}
    per_case: dict[str, Any] = {}
    for label in sorted(labels_a & labels_b, key=lambda x: (len(x), x)):
        names_a = {k for c in paired for k in a.per_case[c].get(label, {})}
        names_b = {k for c in paired for k in b.per_case[c].get(label, {})}
        rows = {}
        cases_rows: dict[str, dict[str, list]] = {}
        for metric in _shown(names_a & names_b):
            pairs = []
            for c in paired:
                case_a, case_b = a.per_case[c].get(label, {}), b.per_case[c].get(label, {})
                cases_rows.setdefault(c, {})[metric] = [case_a.get(metric, math.nan), case_b.get(metric, math.nan)]
                va, vb = _paired_values(metric, case_a, case_b)
                if math.isfinite(va) and math.isfinite(vb):
                    pairs.append((va, vb))
            arr = np.asarray(pairs, dtype=float).reshape(-1, 2)
            stats = paired_tests(arr[:, 0], arr[:, 1], permutations)
            stats["undefined"] = len(paired) - stats["n"]
            stats["better"] = {2: "", 0: "=", 1: "B", -1: "A"}[better_side(metric, stats)]
            p = stats.get("permutation_p")
            stats["significant"] = bool(stats["better"] in ("A", "B") and p is not None and p < SIGNIFICANCE)
            rows[metric] = stats
        results[label] = rows
        per_case[label] = cases_rows
    return {
        "a": str(a.path),
        "b": str(b.path),
        "difference": "B - A",
        "tests": "two-sided: Wilcoxon signed-rank (scipy.stats.wilcoxon) and sign-flip permutation of the mean "
        f"difference (exact when 2^n <= {permutations}, else {permutations} random sign vectors, seed 0)",
        "labels": {l: a.labels.get(l) or b.labels.get(l) or f"label {l}" for l in results},
        "paired_cases": paired,
        "only_in_a": sorted(cases_a - cases_b),
        "only_in_b": sorted(cases_b - cases_a),
        "not_evaluated_in_both": not_evaluated,
        "labels_only_in_a": sorted(labels_a - labels_b),
        "labels_only_in_b": sorted(labels_b - labels_a),
        "metrics": results,
        "per_case": per_case,
    }


# --------------------------------------------------------------------------- output

_COLUMNS = (
    ("metric", None), ("n", "n"), ("mean A", "mean_a"), ("mean B", "mean_b"), ("mean B-A", "mean_difference"),
    ("median B-A", "median_difference"), ("Wilcoxon p", "wilcoxon_p"), ("perm. p", "permutation_p"),
    ("better mean", "better"),
)


def _better(stats: dict) -> str:
    """The run with the better mean, with ``*`` when the permutation test finds the difference significant."""
    return stats.get("better", "") + (" *" if stats.get("significant") else "")


def _row(metric: str, stats: dict) -> list[str]:
    out = [metric]
    for _, key in _COLUMNS[1:]:
        value = _better(stats) if key == "better" else stats.get(key)
        out.append(value if isinstance(value, str) else _page.fmt(value, 4))
    return out


def format_table(result: dict[str, Any]) -> str:
    """The comparison as aligned text, one table per label, then the cases left out."""
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"paired cases: {len(result['paired_cases'])}; differences are B - A; {result['tests']}; "
             f"better mean: the run with the better mean, * where the permutation p < {SIGNIFICANCE}"]
    for label, rows in result["metrics"].items():
        lines.append("")
        lines.append(f"label {label} ({result['labels'].get(label, '')})")
        table = [[h for h, _ in _COLUMNS]] + [_row(m, s) for m, s in rows.items()]
        widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
        for i, r in enumerate(table):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    for key, text in (("only_in_a", "cases only in A"), ("only_in_b", "cases only in B"),
                      ("labels_only_in_a", "labels only in A"), ("labels_only_in_b", "labels only in B")):
        if result[key]:
            lines.append(f"{text} ({len(result[key])}): {', '.join(result[key])}")
    if result["not_evaluated_in_both"]:
        items = ", ".join(f"{c} (A {s['A']}, B {s['B']})" for c, s in result["not_evaluated_in_both"].items())
        lines.append(f"cases not evaluated in both ({len(result['not_evaluated_in_both'])}): {items}")
    return "\n".join(lines)


def most_different_cases(result: dict[str, Any], count: int) -> list[tuple[str, str, str, float, float]]:
    """Per label, up to ``count`` cases with the largest ``|B - A|`` of the Betti matching error (the Betti
    number error when the matching was not computed), largest first: (label, case, metric, A, B)."""
    chosen = []
    for label, per_case in result["per_case"].items():
        for metric in ("betti_matching_error", "betti_error"):
            pairs = [(c, v[metric][0], v[metric][1]) for c, v in per_case.items()
                     if metric in v and all(math.isfinite(x) for x in v[metric])]
            if pairs:
                break
        else:
            continue
        differing = sorted((t for t in pairs if t[2] != t[1]), key=lambda t: (-abs(t[2] - t[1]), t[0]))
        chosen += [(label, case, metric, va, vb) for case, va, vb in differing[: max(count, 0)]]
    return chosen


def _pictures(a: Evaluation, b: Evaluation, result: dict[str, Any], count: int) -> dict[str, list[str]]:
    """Per label, the HTML figures of :func:`most_different_cases`: reference, A and B, errors marked."""
    from medseg.evaluation.report import (
        _case_name,
        _connectivity_from,
        comparison_picture,
        default_images_dir,
        picture_figure,
    )

    entries = [{_case_name(e): e for e in ev.summary.get("metric_per_case", []) if isinstance(e, dict)} for ev in (a, b)]
    reference_folder = a.summary.get("reference_folder")
    images_dir = default_images_dir(reference_folder) if isinstance(reference_folder, str) else None
    figures: dict[str, list[str]] = {}
    from tqdm import tqdm

    chosen = most_different_cases(result, count)
    # each picture matches both predictions against the reference: seconds per case on large images
    for label, case, metric, va, vb in tqdm(chosen, desc="drawing compare.html", unit="case", file=sys.stderr,
                                            disable=None, leave=False):
        entry_a, entry_b = entries[0].get(case, {}), entries[1].get(case, {})
        if not all(isinstance(e.get(k), str) for e in (entry_a, entry_b) for k in ("prediction_file", "reference_file")):
            png, legend, note = None, [], "picture unavailable: the summaries do not name the case's files"
        else:
            png, legend, note = comparison_picture(entry_a, entry_b, label, result["labels"].get(label, label), a.summary,
                                                   images_dir, _connectivity_from(a.summary))
        head = f"{case} \u00b7 {metric} A {_page.fmt(va)}, B {_page.fmt(vb)} (B - A {_page.fmt(vb - va)})"
        figures.setdefault(label, []).append(
            picture_figure(png, f"{case}: reference, prediction A, prediction B", case, label, head, legend, note))
    return figures


def render_compare_html(result: dict[str, Any], pictures: dict[str, list[str]] | None = None) -> str:
    """``compare.html``: the tables, a plot of the per-case differences, ``pictures`` (per label, HTML figures
    of the cases that differ most) and a per-case table per label."""
    from medseg.evaluation.plots import paired_difference_figure
    from medseg.evaluation.report import MARKERS_EXPLAINED

    body = ["<h1>medseg comparison</h1>",
            f"<p class=\"meta\">A: <code>{_page.esc(result['a'])}</code><br>B: <code>{_page.esc(result['b'])}</code><br>"
            f"{len(result['paired_cases'])} paired cases; differences are B - A; {_page.esc(result['tests'])}</p>",
            "<p class=\"meta\">n, the means and the differences are over the paired cases where the metric is "
            "defined in both (so a mean can differ from the one in either evaluation's report). <i>better mean</i>: "
            "the run whose mean is better (higher Dice, IoU, surface Dice and clDice; lower HD95, Betti and Betti "
            "matching errors; none for volumes and component counts), <span class=\"better\">green</span> when "
            "it is B, <span class=\"worse\">red</span> when it is A, <b>=</b> when the means are equal; <b>*</b>: "
            "the permutation test's "
            f"p &lt; {SIGNIFICANCE}.</p>"]
    for label, rows in result["metrics"].items():
        name = result["labels"].get(label, label)
        body.append(f"<h2>{_page.esc(name)} (label {_page.esc(label)})</h2>")
        table_rows = []
        for metric, stats in rows.items():
            cells = [_page.cell(metric)]
            for _, key in _COLUMNS[1:]:
                value = _better(stats) if key == "better" else stats.get(key)
                klass = ""
                if key == "better" and stats.get("better") in ("A", "B"):
                    klass = "better" if stats["better"] == "B" else "worse"
                cells.append(_page.cell(value, cls=klass))
            table_rows.append(cells)
        body.append(_page.table([h for h, _ in _COLUMNS], table_rows, table_id=f"compare-{label}", sortable=True))
        per_case = result["per_case"].get(label, {})
        plotted = [m for m in rows if not re.search(r"_\d+_error$", m)
                   and m not in ("components_pred", "components_ref", "volume_difference_mm3")]
        differences = {m: [v[m][1] - v[m][0] for v in per_case.values() if m in v] for m in plotted}
        if differences:
            png = paired_difference_figure(differences, title=f"{name}: per-case differences, B against A")
            body.append(f"<figure>{_page.img(png, f'per-case differences of {name}')}</figure>")
        if pictures and pictures.get(label):
            body.append("<h3>Cases that differ most</h3><p class=\"meta\">The reference and both predictions of the "
                        "cases whose topology error differs most. On each prediction, red marks the reference features "
                        "it does not match (missing), blue its own features the reference does not have (extra). "
                        f"{MARKERS_EXPLAINED}</p>" + "".join(pictures[label]))
        metrics = list(rows)
        headers = ["case"] + [f"{m} {x}" for m in metrics for x in ("A", "B", "B-A")]
        keys = ["case"] + [f"{m}.{x}" for m in metrics for x in ("A", "B", "diff")]
        case_rows = []
        for case, values in per_case.items():
            cells = [_page.cell(case)]
            for m in metrics:
                va, vb = values.get(m, [math.nan, math.nan])
                cells += [_page.cell(va), _page.cell(vb), _page.cell(vb - va)]
            case_rows.append(cells)
        body.append("<h3>Cases</h3>" + _page.table(
            headers, case_rows, table_id=f"compare-cases-{label}", sortable=True, keys=keys, scroll=True))
    left_out = []
    for key, text in (("only_in_a", "Cases only in A"), ("only_in_b", "Cases only in B")):
        if result[key]:
            left_out.append(f"<p>{text} ({len(result[key])}): {_page.esc(', '.join(result[key]))}</p>")
    if result["not_evaluated_in_both"]:
        items = ", ".join(f"{c} (A {s['A']}, B {s['B']})" for c, s in result["not_evaluated_in_both"].items())
        left_out.append(f"<p>Cases not evaluated in both: {_page.esc(items)}</p>")
    if left_out:
        body.append("<h2>Not compared</h2>" + "".join(left_out))
    return _page.page("medseg comparison", "\n".join(body))


def run_compare(a: str | Path, b: str | Path, output: str | Path | None = None, permutations: int = DEFAULT_PERMUTATIONS,
                pictured_cases: int = DEFAULT_PICTURED_CASES) -> dict[str, Any]:
    """``medseg report compare``: print the comparison; with ``output`` write compare.json and compare.html.

    compare.html pictures, per label, the ``pictured_cases`` cases whose topology error
    differs most (their prediction and reference files are read again, the scans from
    ``imagesXx`` next to A's reference folder when there is one).

    Raises
    ------
    DataError
        An input is missing or not a summary, no case is evaluated in both, no numeric
        metric is in both, or the two are not comparable (:func:`check_comparable`).
    """
    from medseg.atomic import check_output_folder, make_writable_folder, write_atomic

    if permutations < 1:
        raise ArgumentError("permutations", "must be at least 1", permutations)
    if pictured_cases < 0:
        raise ArgumentError("pictured_cases", "must be 0 or more", pictured_cases)
    if output is not None:
        output = check_output_folder(output, "output", argument=True)  # before the comparison, not after
        try:
            make_writable_folder(output)
        except OSError as err:
            raise ArgumentError("output", f"cannot write there ({err.strerror or err})", output) from None
    evaluation_a, evaluation_b = load_evaluation(a), load_evaluation(b)
    notes = check_comparable(evaluation_a, evaluation_b)
    result = compare_evaluations(evaluation_a, evaluation_b, permutations)
    if not any(result["metrics"].values()):
        raise DataError(f"{evaluation_a.path} and {evaluation_b.path}: no numeric metric in common to compare")
    result["warnings"] = notes
    for note in notes:
        print(f"medseg: warning: {note}", file=sys.stderr)
    print(format_table(result))
    if output is not None:
        write_atomic(output / "compare.json", strict_json(result))
        pictures = _pictures(evaluation_a, evaluation_b, result, pictured_cases)
        write_atomic(output / "compare.html", render_compare_html(result, pictures))
        print(f"medseg: wrote {output / 'compare.json'} and {output / 'compare.html'}", file=sys.stderr)
    return result

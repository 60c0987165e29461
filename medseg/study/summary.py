"""The study's results: each metric per test folder, label and variant over seeds and cases, and tests against the baseline.

Every run that evaluated a test folder with the study's current settings contributes
its per-case values (``evaluation/TEST/summary.json``, read with
:func:`medseg.evaluation.compare.load_evaluation`), indexed by ``(case, seed)``. Per
variant and metric (:data:`TABLE_METRICS` that were computed):

* ``mean``: the mean over seeds of each seed's mean over cases;
* ``std_seeds``: the sample standard deviation of those per-seed means (how much the
  result moves with the seed; NaN for one seed);
* ``std_cases``: the sample standard deviation of all (case, seed) values, the spread
  TopoMortar reports after its means;
* ``vs_baseline`` (every variant but the first): the two-sided paired sign-flip
  permutation test of :func:`medseg.evaluation.compare.paired_tests` (and its Wilcoxon
  test) over the (case, seed) pairs defined in both, ``variant - baseline``. ``better``
  follows :func:`medseg.evaluation.aggregate.better_direction` (lower Betti errors,
  Betti matching error and HD95; higher Dice and clDice); ``significant`` is TopoMortar's
  mark: better and p < ``alpha``. Where the paired values favour the variant but the
  means shown (over all of each variant's own values) do not, ``better`` and
  ``significant`` follow the means and ``paired_only`` is true.

Undefined values (Dice of a case where both masks are empty) are left out, as in
``medseg evaluate``'s means.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from medseg.evaluation.aggregate import better_side
from medseg.evaluation.compare import load_evaluation, paired_tests
from medseg.evaluation.summary import DEFAULT_PERMUTATIONS
from medseg.study.config import Study
from medseg.study.state import evaluation_dir, is_finished, read_state, test_done, training_summary

__all__ = ["TABLE_METRICS", "seed_statistics", "compare_to_baseline", "summarize", "permutation_count"]

TABLE_METRICS = ("betti_0_error", "betti_1_error", "betti_2_error", "betti_matching_error", "Dice", "clDice", "HD95")
"""Metrics of the study's table, in this order (those that were computed)."""

Key = tuple[str, int]  # (case, seed)


def permutation_count(permutations: int | None) -> int:
    """The resamples :func:`paired_tests` draws: ``permutations``, or its own default."""
    return DEFAULT_PERMUTATIONS if permutations is None else permutations


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def seed_statistics(values: dict[Key, float]) -> dict[str, Any]:
    """Mean over seeds of the per-seed means, their spread, and the spread over all values.

    Examples
    --------
    >>> s = seed_statistics({("a", 0): 1.0, ("b", 0): 3.0, ("a", 1): 2.0, ("b", 1): 4.0})
    >>> s["mean"], s["seed_means"], round(s["std_seeds"], 4)
    (2.5, {0: 2.0, 1: 3.0}, 0.7071)
    """
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    by_seed: dict[int, list[float]] = {}
    for (_, seed), value in sorted(finite.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        by_seed.setdefault(seed, []).append(value)
    seed_means = {seed: float(np.mean(v)) for seed, v in by_seed.items()}
    means = list(seed_means.values())
    return {
        "mean": float(np.mean(means)) if means else math.nan,
        "std_seeds": _std(means),
        "std_cases": _std(list(finite.values())),
        "seed_means": seed_means,
        "n_seeds": len(seed_means),
        "n": len(finite),
        "n_undefined": len(values) - len(finite),
    }


def compare_to_baseline(
    baseline: dict[Key, float], variant: dict[Key, float], metric: str, alpha: float, permutations: int | None = None
) -> dict[str, Any]:
    """Paired tests of ``variant - baseline`` over the (case, seed) pairs defined in both.

    Examples
    --------
    >>> base = {("a", 0): 3.0, ("b", 0): 5.0, ("a", 1): 4.0, ("b", 1): 6.0}
    >>> r = compare_to_baseline(base, {k: v - 2 for k, v in base.items()}, "betti_1_error", alpha=0.05)
    >>> r["n"], r["permutation_p"], r["better"], r["significant"]
    (4, 0.125, 'variant', False)
    """
    pairs = [
        (baseline[k], variant[k]) for k in sorted(set(baseline) & set(variant))
        if math.isfinite(baseline[k]) and math.isfinite(variant[k])
    ]
    a = np.asarray([p[0] for p in pairs], dtype=float)
    b = np.asarray([p[1] for p in pairs], dtype=float)
    stats = paired_tests(a, b) if permutations is None else paired_tests(a, b, permutations)
    diff = stats["mean_difference"]
    better = {2: "", 0: "=", 1: "variant", -1: "baseline"}[better_side(metric, stats)]
    p = stats["permutation_p"]
    return {
        "n": stats["n"],
        "mean_difference": diff,
        "permutation_p": p,
        "wilcoxon_p": stats["wilcoxon_p"],
        "better": better,
        "significant": bool(better == "variant" and math.isfinite(p) and p < alpha),
    }


def _mark_only_where_the_means_agree(cell: dict[str, Any], base_cell: dict[str, Any] | None, metric: str) -> None:
    """The test pairs the (case, seed) values defined in both variants; the table shows
    each variant's mean over all of its own. Where the two disagree (a case undefined in
    one variant only, a seed not finished in both), the mark went on a mean worse than the
    baseline's shown beside it: then ``better`` and ``significant`` follow the shown means
    too, and ``paired_only`` says that the paired values alone favour the variant."""
    test = cell.get("vs_baseline")
    if not test or test["better"] != "variant" or base_cell is None:
        return
    shown = {"mean_difference": cell["mean"] - base_cell["mean"], "mean_a": base_cell["mean"], "mean_b": cell["mean"]}
    side = better_side(metric, shown)
    if side != 1:
        test.update(better={0: "=", -1: "baseline", 2: ""}[side], significant=False, paired_only=True)


def _collect(study: Study) -> tuple[dict, dict, list[dict]]:
    """Per test, label, variant and metric the ``{(case, seed): value}``; label names; the runs' status."""
    values: dict[str, dict[str, dict[str, dict[str, dict[Key, float]]]]] = {t: {} for t in study.config.test}
    label_names: dict[str, dict[str, str]] = {t: {} for t in study.config.test}
    runs = []
    for run in study.runs:
        state = read_state(run.run_dir)
        finished = is_finished(run, study.config)
        runs.append({
            "run": run.name, "variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
            "status": "finished" if finished else ("failed" if state.get("status") == "failed" else "not finished"),
            "error": None if finished else state.get("error"),
            **training_summary(state),
        })
        for test in study.config.test:
            if not test_done(run, study.config, test, state):
                continue
            evaluation = load_evaluation(evaluation_dir(run.run_dir, test) / "summary.json")
            label_names[test].update(evaluation.labels)
            for case, labels in evaluation.per_case.items():
                for label, metrics in labels.items():
                    for metric, value in metrics.items():
                        if metric in TABLE_METRICS:
                            slot = values[test].setdefault(label, {}).setdefault(run.variant, {}).setdefault(metric, {})
                            slot[(case, run.seed)] = float(value)
    return values, label_names, runs


def _resources(runs: list[dict], variants: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in variants:
        done = [r for r in runs if r["variant"] == variant and math.isfinite(r["seconds_per_step"])]
        steps = [r["seconds_per_step"] for r in done]
        rss = [r["peak_rss_mib"] for r in done if math.isfinite(r["peak_rss_mib"])]
        cuda = [r["peak_cuda_mib"] for r in done if r["peak_cuda_mib"] is not None]
        out[variant] = {
            "runs": len(done),
            "seconds_per_step": float(np.mean(steps)) if steps else math.nan,
            "seconds_per_step_std": _std(steps),
            "peak_rss_mib": max(rss) if rss else math.nan,
            "peak_cuda_mib": max(cuda) if cuda else None,
        }
    return out


def summarize(study: Study) -> dict[str, Any]:
    """The study's results (what ``study.json`` holds); see the module docstring."""
    cfg = study.config
    variants, baseline = list(cfg.variants), study.baseline
    values, label_names, runs = _collect(study)
    present = {m for t in values.values() for l in t.values() for v in l.values() for m in v}
    metrics = [m for m in TABLE_METRICS if m in present]
    results: dict[str, Any] = {}
    for test, labels in values.items():
        results[test] = {}
        for label in sorted(labels, key=lambda x: (len(x), x)):
            by_variant = labels[label]
            rows = {}
            for variant in variants:
                cells = {}
                for metric in metrics:
                    own = by_variant.get(variant, {}).get(metric, {})
                    cell = seed_statistics(own)
                    base = by_variant.get(baseline, {}).get(metric, {})
                    cell["vs_baseline"] = (
                        compare_to_baseline(base, own, metric, cfg.alpha, cfg.permutations)
                        if variant != baseline and own and base else None
                    )
                    cell["values"] = [[case, seed, v] for (case, seed), v in sorted(own.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
                    _mark_only_where_the_means_agree(cell, rows.get(baseline, {}).get(metric), metric)
                    cells[metric] = cell
                rows[variant] = cells
            results[test][label] = {"name": label_names[test].get(label, f"label {label}"), "variants": rows}
    permutations = permutation_count(cfg.permutations)
    return {
        "study": str(study.path),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": str(cfg.base),
        "set": cfg.overrides,
        "command_line_set": study.overrides,
        "output_dir": str(study.output_dir),
        "baseline": baseline,
        "variants": {name: overrides for name, overrides in cfg.variants.items()},
        "seeds": list(cfg.seeds),
        "tests": {name: {"images": str(t.images), "labels": str(t.labels)} for name, t in cfg.test.items()},
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "metrics": metrics,
        "alpha": cfg.alpha,
        "statistics": (
            "mean: over seeds of each seed's mean over cases; std_seeds: sample std of the per-seed means; "
            "std_cases: sample std of all (case, seed) values; vs_baseline: two-sided paired tests of variant - "
            f"baseline over the (case, seed) pairs defined in both: sign-flip permutation test of the mean "
            f"difference (exact when 2^n <= {permutations}, else {permutations} random sign vectors, seed 0) and "
            f"Wilcoxon signed-rank; significant: better than the baseline and permutation p < {cfg.alpha}"
        ),
        "runs": runs,
        "resources": _resources(runs, variants),
        "results": results,
    }

"""Evaluation: overlap and topology metrics of predictions against references, and reports.

:func:`run_evaluation` is ``medseg evaluate``; :data:`LABEL_METRICS` is the registry of
per-label metrics it computes (add one with :func:`register_metric`, choose with
``metrics=``). :func:`write_report` writes ``report.html`` from a summary and
:func:`run_compare` is ``medseg report compare``.
"""

from importlib import import_module
from typing import Any

# Imported when first used, so that the command line can read the defaults of
# medseg.evaluation.summary without loading SciPy and MONAI.
_WHERE = {
    "describe": "aggregate",
    "compare_evaluations": "compare",
    "load_evaluation": "compare",
    "run_compare": "compare",
    "evaluate_case": "evaluate",
    "run_evaluation": "evaluate",
    "LABEL_METRICS": "metrics",
    "MetricContext": "metrics",
    "compute_label_metrics": "metrics",
    "register_metric": "metrics",
    "resolve_metrics": "metrics",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "run_evaluation",
    "evaluate_case",
    "LABEL_METRICS",
    "MetricContext",
    "compute_label_metrics",
    "register_metric",
    "resolve_metrics",
    "describe",
    "write_report",
    "run_compare",
    "compare_evaluations",
    "load_evaluation",
]

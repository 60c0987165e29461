"""Evaluation: overlap and topology metrics of predictions against references, and reports.

:func:`run_evaluation` is ``medseg evaluate``; :data:`LABEL_METRICS` is the registry of
per-label metrics it computes (add one with :func:`register_metric`, choose with
``metrics=``). :func:`write_report` writes ``report.html`` from a summary and
:func:`run_compare` is ``medseg report compare``.
"""

from medseg.evaluation.aggregate import describe
from medseg.evaluation.compare import compare_evaluations, load_evaluation, run_compare
from medseg.evaluation.evaluate import evaluate_case, run_evaluation
from medseg.evaluation.metrics import (
    LABEL_METRICS,
    MetricContext,
    compute_label_metrics,
    register_metric,
    resolve_metrics,
)
from medseg.evaluation.report import write_report

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

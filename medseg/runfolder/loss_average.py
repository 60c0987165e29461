"""The running loss averages behind each ``metrics.csv`` row, carried by checkpoints.

Training and adaptation add every step's total loss and its terms, write their means
as a row every log interval, and store the partial sums in each checkpoint
(``loss_average``), so that a resumed run writes the rows an uninterrupted one writes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LossAverage"]


class LossAverage:
    """Mean total loss and per-term losses since the last metrics row.

    A term missing at some steps (a loss term scheduled off, ``LossTerm.start``) is
    averaged over the steps that computed it.

    Parameters
    ----------
    state : dict, optional
        What :meth:`state` returned (a checkpoint's ``loss_average``); a state without
        ``term_counts`` (an older checkpoint) counts every term at every step.
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.count = int(state.get("count", 0))
        self.total = float(state.get("total", 0.0))
        self.terms: dict[str, float] = {k: float(v) for k, v in state.get("terms", {}).items()}
        self.term_counts: dict[str, int] = {
            k: int(state.get("term_counts", {}).get(k, self.count)) for k in self.terms
        }

    def add(self, total: float, terms: dict[str, float]) -> None:
        self.count += 1
        self.total += total
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
            self.term_counts[k] = self.term_counts.get(k, 0) + 1

    def means(self) -> tuple[float, dict[str, float]]:
        n = max(self.count, 1)
        return self.total / n, {k: v / max(self.term_counts[k], 1) for k, v in self.terms.items()}

    def reset(self) -> None:
        self.count, self.total, self.terms, self.term_counts = 0, 0.0, {}, {}

    def pop(self) -> tuple[float, dict[str, float]]:
        """:meth:`means`, then :meth:`reset` (one metrics row)."""
        out = self.means()
        self.reset()
        return out

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "terms": dict(self.terms),
                "term_counts": dict(self.term_counts)}

"""What a run writes while it trains: ``metrics.csv``, TensorBoard events, ``progress.png``.

``metrics.csv`` has one row every ``train.log_interval`` iterations and at every
validation: ``iteration``, ``lr``, ``loss`` (mean total loss over the iterations since the
previous row), ``loss/<term>`` for each loss term, and on validation rows
``val_dice/<label>`` per foreground label and ``val_dice_mean`` (empty otherwise).
A resumed run drops the rows past its checkpoint's iteration first, so the file reads as
if the run had never stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from medseg.atomic import atomic_path, no_follow, write_atomic

METRICS_FILE = "metrics.csv"
PROGRESS_FILE = "progress.png"
TENSORBOARD_DIR = "tensorboard"

log = logging.getLogger("medseg.training")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


class RunLog:
    """Appends rows to ``metrics.csv`` and TensorBoard, and redraws ``progress.png``.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    loss_terms : sequence of str
        Names of the loss terms (columns ``loss/<term>``).
    class_names : sequence of str
        Foreground label names from dataset.json (columns ``val_dice/<name>``).
    resume_iteration : int or None
        When resuming: keep only rows up to this iteration and drop later TensorBoard
        events (``purge_step``); None: a start from the beginning, which drops every
        event of an earlier attempt.
    """

    def __init__(
        self,
        run_dir: Path,
        loss_terms: Sequence[str],
        class_names: Sequence[str],
        resume_iteration: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.columns = (
            ["iteration", "lr", "loss"]
            + [f"loss/{t}" for t in loss_terms]
            + [f"val_dice/{c}" for c in class_names]
            + ["val_dice_mean"]
        )
        self.class_names = list(class_names)
        self.loss_terms = list(loss_terms)
        self.path = self.run_dir / METRICS_FILE
        self.rows: list[dict[str, str]] = []
        if resume_iteration is not None and self.path.is_file():
            self.rows = self._read_until(resume_iteration)
        self._rewrite()
        events = self.run_dir / TENSORBOARD_DIR
        if events.exists() and not events.is_dir():  # TensorBoard's makedirs: a FileExistsError traceback
            from medseg.errors import MedsegError

            raise MedsegError(f"{events}: is a file, where the run keeps its TensorBoard events; move it away")
        self._purge_step = (resume_iteration + 1) if resume_iteration is not None else 0
        self._writer = None  # opened at the first row: a resume of a finished run adds no empty events file

    @property
    def writer(self):
        """The run's TensorBoard ``SummaryWriter``, opened on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Every attempt starts with a session START at its first step: TensorBoard drops the
            # events an earlier attempt wrote from that step on. Its web page takes the first
            # START it reads for the run's beginning, not a restart, so a first attempt writes
            # one too (at step 0, nothing to drop); without it the first resume showed the
            # steps between the checkpoint and the kill twice.
            # flush_secs: the writer's thread sleeps at most this long between looks at its
            # queue. A Ctrl-C or SIGTERM that interrupts the main thread inside the queue's
            # code can lose its wake-up call; closing the writer then waited out the default
            # 120 s (a stopped `train` hung after its last line). Rows are flushed as they
            # are written (add_row), so this only bounds that wait.
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step,
                                         flush_secs=2)
        return self._writer

    def _read_until(self, iteration: int) -> list[dict[str, str]]:
        """The rows up to ``iteration``; none, with a warning, from a damaged file (a
        traceback ended the resume before, after it had been recorded)."""
        try:
            with self.path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                rows = [r for r in reader if _complete(r) and int(r["iteration"]) <= iteration]
        except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as err:
            log.warning("%s: unreadable (%s: %s); it starts again at iteration %d, the rows before are lost "
                        "(tensorboard/ still holds them)", self.path, type(err).__name__, err, iteration + 1)
            return []
        return [{c: r.get(c, "") or "" for c in self.columns} for r in rows]

    def _rewrite(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, text.getvalue())

    def add_row(
        self,
        iteration: int,
        lr: float,
        loss: float,
        terms: dict[str, float],
        val_dice: Sequence[float] | None = None,
    ) -> None:
        row = {"iteration": str(iteration), "lr": _fmt(lr), "loss": _fmt(loss)}
        row.update({f"loss/{t}": _fmt(terms.get(t)) for t in self.loss_terms})
        self.writer.add_scalar("train/loss", loss, iteration)
        self.writer.add_scalar("train/lr", lr, iteration)
        for t in self.loss_terms:
            if t in terms:
                self.writer.add_scalar(f"train/loss_{t}", terms[t], iteration)
        if val_dice is not None:
            mean = mean_dice(val_dice)
            for name, value in zip(self.class_names, val_dice):
                row[f"val_dice/{name}"] = _fmt(value)
                self.writer.add_scalar(f"val/dice_{name}", value, iteration)
            row["val_dice_mean"] = _fmt(mean)
            self.writer.add_scalar("val/dice_mean", mean, iteration)
        self.rows.append({c: row.get(c, "") for c in self.columns})
        with open(self.path, "a", newline="", opener=no_follow) as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(self.rows[-1])
        self.writer.flush()

    def draw(self) -> None:
        """Redraw ``progress.png``: loss curves (left) and validation Dice (right)."""
        try:
            draw_progress(self.rows, self.loss_terms, self.class_names, self.run_dir / PROGRESS_FILE)
        except Exception as err:  # a plot must never stop a training run
            log.warning("could not draw %s: %s", PROGRESS_FILE, err)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _complete(row: dict) -> bool:
    """A whole row (a run killed mid-write leaves a short last line)."""
    if None in row or any(v is None for v in row.values()):
        return False
    try:
        int(row["iteration"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def mean_dice(values: Sequence[float]) -> float:
    """Mean over classes, ignoring classes without a score (nan)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def draw_progress(rows: list[dict[str, str]], loss_terms: Sequence[str], class_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    def series(column: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in rows:
            if r.get(column):
                xs.append(int(r["iteration"]))
                ys.append(float(r[column]))
        return xs, ys

    fig = Figure(figsize=(11, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(*series("loss"), label="total", color="black", linewidth=1.5)
    if len(loss_terms) > 1:
        for t in loss_terms:
            ax_loss.plot(*series(f"loss/{t}"), label=t, linewidth=1)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)
    for name in class_names:
        ax_dice.plot(*series(f"val_dice/{name}"), marker="o", markersize=3, label=name, linewidth=1)
    if len(class_names) > 1:
        ax_dice.plot(*series("val_dice_mean"), marker="o", markersize=3, color="black", label="mean", linewidth=1.5)
    ax_dice.set_xlabel("iteration")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(loc="lower right", fontsize=8)
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")

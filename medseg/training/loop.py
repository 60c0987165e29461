"""The one optimisation loop: ``medseg train`` and ``medseg adapt`` both run :func:`run_loop`.

A run hands the loop an :class:`Objective`, what one step optimises: the supervised loss of
a patch batch (:mod:`medseg.training.trainer`) or an adaptation method's loss on target
patches (:mod:`medseg.adaptation.runner`, through the :class:`~medseg.adaptation.base.Method`
seam). The loop owns everything around the loss, once:

* the step: ``zero_grad``, the loss under autocast, its mean over torchrun ranks, the
  divergence check, backward through the AMP scaler, gradient clipping, the optimizer and
  LR-schedule steps;
* the :class:`Progress` a checkpoint carries (iteration, best metric, partial loss sums),
  so that a resumed run starts at ``progress.iteration`` and continues as the
  uninterrupted one would;
* one ``metrics.csv`` row every ``log_interval`` steps and at each evaluation, the
  evaluation every ``eval_interval`` steps and at the end, ``progress.png`` after it;
* ``checkpoints/latest.pt`` every ``checkpoint_interval`` steps and at the end (the
  objective may write it at other steps too: supervised training does before each
  ``best.pt``, and the loop then does not write it twice);
* the progress bar and the start and end log lines.

Per step ``i`` (0-based) the objective sees, in order: ``before_step(i)`` (a loss schedule,
a pseudo-label round), the next item of ``batches(start, total)``, ``loss(batch, i)``
(forward), then, after the optimizer step, ``after_step(i)`` (an EMA teacher).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medseg import distributed
from medseg.errors import MedsegError
from medseg.runfolder import LossAverage
from medseg.training.logs import RunLog

log = logging.getLogger("medseg.training")


@dataclass
class Progress:
    """The counters a checkpoint carries besides the state dicts."""

    iteration: int = 0
    best_metric: float | None = None
    best_iteration: int | None = None
    average: LossAverage = field(default_factory=LossAverage)
    loss_terms: list[str] | None = None  # metrics.csv columns; None until the first step names them


@dataclass
class Schedule:
    """When the loop logs, evaluates and saves (in steps)."""

    total: int
    log_interval: int
    checkpoint_interval: int
    eval_interval: int | None = None  # None or 0: evaluate at the end only
    grad_clip: float | None = None


class Objective:
    """What a step of :func:`run_loop` optimises; subclasses fill in the hooks.

    Attributes read by the loop each step (a subclass may replace ``optimizer`` between
    steps, as a new pseudo-label round does): ``optimizer``, ``scheduler`` (or None),
    ``scaler`` (a disabled ``GradScaler`` without AMP), ``amp``, ``device``.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: torch.amp.GradScaler
    amp: bool = False
    device: torch.device
    bar_label = "train"

    def batches(self, start: int, total: int) -> Iterator[Any]:
        """One input per step ``start .. total - 1`` (default: None, the objective makes its own)."""
        while True:
            yield None

    def before_step(self, iteration: int) -> None:
        pass

    def loss(self, batch: Any, iteration: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's loss (a scalar with grad) and its named terms."""
        raise NotImplementedError

    def after_step(self, iteration: int) -> None:
        pass

    def clip_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters whose gradient norm ``Schedule.grad_clip`` bounds."""
        raise NotImplementedError

    def loss_terms(self) -> list[str]:
        """The metrics.csv loss columns, known after the first step."""
        raise NotImplementedError

    def diverged(self, what: str, step: int) -> str:
        """The error line for a step at 1-based ``step`` that cannot be taken: ``what`` is
        "loss is nan (TERMS)" or "gradient norm is nan (loss ..., TERMS)"."""
        return f"the {what} at step {step} (training diverged); lower the learning rate"

    def evaluate(self, iteration: int) -> list[float] | None:
        """Per-class Dice after ``iteration`` steps, or None when there is nothing to score."""
        return None

    def evaluated(self, iteration: int, loss: float, lr: float, dice: list[float] | None, rate: float) -> None:
        """Called after each evaluation (a log line; ``best.pt``)."""

    def save_latest(self) -> None:
        """Write ``checkpoints/latest.pt``."""
        raise NotImplementedError

    def start_message(self, start: int, total: int) -> str:
        return f"steps {start + 1}-{total}"

    def end_message(self, progress: Progress) -> str:
        return ""


def _terms_text(terms: dict[str, Any]) -> str:
    return ", ".join(f"{name} {float(value):.4g}" for name, value in terms.items())


def optimizer_step(objective: Objective, batch: Any, iteration: int, grad_clip: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step; returns the loss (detached) and its terms.

    Under torchrun ``batch`` is this rank's share of the global batch; the returned loss
    and terms are their means over the ranks, the same on every rank (so all ranks stop
    together on a diverged loss).
    """
    optimizer, scaler = objective.optimizer, objective.scaler
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=objective.device.type, enabled=objective.amp):
        loss, terms = objective.loss(batch, iteration)
    shown = loss
    if distributed.is_distributed():
        values = [loss.detach()] + [torch.as_tensor(v).detach() for v in terms.values()]
        means = distributed.all_reduce_mean(torch.stack([v.to(torch.float64).cpu().reshape(()) for v in values]))
        shown = means[0]
        terms = dict(zip(terms, means[1:].tolist()))
    if not torch.isfinite(shown):
        raise MedsegError(objective.diverged(f"loss is {shown.item()} ({_terms_text(terms)})", iteration + 1))
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(objective.clip_parameters(), grad_clip)
    elif not scaler.is_enabled():
        norm = torch.nn.utils.get_total_norm([p.grad for p in objective.clip_parameters() if p.grad is not None])
    else:
        norm = None
    # A finite loss can still have non-finite gradients (an overflow in backward); the
    # optimizer would write NaN into every weight, which the checkpoints, validation
    # ("Dice 0, best") and predict (empty masks, exit 0) then took as a model. Under AMP
    # the GradScaler skips such a step itself and lowers its scale.
    if norm is not None and not scaler.is_enabled() and not torch.isfinite(norm):
        raise MedsegError(objective.diverged(
            f"gradient norm is {norm.item()} with a finite loss of {shown.item():.4g} ({_terms_text(terms)})",
            iteration + 1))
    scaler.step(optimizer)
    scaler.update()
    if objective.scheduler is not None:
        objective.scheduler.step()
    objective.after_step(iteration)
    return shown.detach(), {k: float(v) for k, v in terms.items()}


def run_loop(
    objective: Objective, progress: Progress, schedule: Schedule, run_dir: Path, class_names: list[str],
    runlog: RunLog | None = None,
) -> None:
    """Run steps ``progress.iteration .. schedule.total - 1`` of ``objective``.

    ``runlog`` is the run's ``metrics.csv`` writer when the caller has already written rows
    (an adaptation's "before" row); else rank 0 opens it once the loss terms are known.
    Rank 0 alone logs, draws the bar and writes; every rank steps.
    """
    total, start = schedule.total, progress.iteration
    main = distributed.is_main()
    if runlog is None and progress.loss_terms is not None and main:
        runlog = RunLog(run_dir, progress.loss_terms, class_names, resume_iteration=start)
    if start >= total:
        log.info("run already complete: %d of %d steps done", start, total)
        if runlog is not None:
            runlog.close()
        return
    batches = objective.batches(start, total)
    log.info(objective.start_message(start, total))
    bar = tqdm(total=total, initial=start, desc=objective.bar_label, unit="it", dynamic_ncols=True,
               disable=None if main else True)
    started = time.perf_counter()
    try:
        for iteration in range(start, total):
            objective.before_step(iteration)
            batch = next(batches)
            lr = objective.optimizer.param_groups[0]["lr"]  # the LR this step uses
            loss, terms = optimizer_step(objective, batch, iteration, schedule.grad_clip)
            progress.iteration = step = iteration + 1
            if progress.loss_terms is None:
                progress.loss_terms = objective.loss_terms()
                if main:
                    runlog = RunLog(run_dir, progress.loss_terms, class_names, resume_iteration=start or None)
            progress.average.add(float(loss), terms)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

            evaluate_now = step == total or bool(schedule.eval_interval) and step % schedule.eval_interval == 0
            if evaluate_now or step % schedule.log_interval == 0:
                dice = objective.evaluate(step) if evaluate_now else None
                mean_loss, mean_terms = progress.average.pop()
                if runlog is not None:
                    runlog.add_row(step, lr, mean_loss, mean_terms, dice)
                if evaluate_now:
                    rate = (step - start) / max(time.perf_counter() - started, 1e-9)
                    objective.evaluated(step, mean_loss, lr, dice, rate)
                    if runlog is not None:
                        runlog.draw()
            if step % schedule.checkpoint_interval == 0 or step == total:
                objective.save_latest()
    finally:
        bar.close()
        if runlog is not None:
            runlog.close()
    elapsed = time.perf_counter() - started
    done = progress.iteration - start
    log.info("finished %d steps in %.0f s (%.2f it/s); %s", done, elapsed, done / max(elapsed, 1e-9),
             objective.end_message(progress))

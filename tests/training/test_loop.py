"""The one optimisation loop (medseg.training.loop): the order of the hooks, when it logs,
evaluates and saves, resuming from a step, and the divergence error. ``medseg train`` and
``medseg adapt`` are tested through it in test_trainer.py and tests/adaptation."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from medseg.errors import MedsegError
from medseg.runfolder import LossAverage
from medseg.training.loop import Objective, Progress, Schedule, run_loop


class _Quadratic(Objective):
    """Minimise ``|w - 3|^2`` with SGD; records every hook call."""

    def __init__(self, diverge_at: int | None = None) -> None:
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.SGD([self.w], lr=0.1)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.device = torch.device("cpu")
        self.calls: list[tuple[str, int]] = []
        self.diverge_at = diverge_at

    def batches(self, start, total):
        for i in range(start, total):
            yield torch.full((2,), 3.0)

    def before_step(self, iteration):
        self.calls.append(("before", iteration))

    def loss(self, batch, iteration):
        self.calls.append(("loss", iteration))
        loss = ((self.w - batch) ** 2).sum()
        if iteration == self.diverge_at:
            loss = loss * math.inf
        return loss, {"squared": loss.detach()}

    def after_step(self, iteration):
        self.calls.append(("after", iteration))

    def clip_parameters(self):
        return [self.w]

    def loss_terms(self):
        return ["squared"]

    def evaluate(self, iteration):
        self.calls.append(("evaluate", iteration))
        return [float(-((self.w.detach() - 3) ** 2).sum())]

    def save_latest(self):
        self.calls.append(("save", int(self.progress.iteration)))


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _run(objective, run_dir, start=0, total=6, **schedule):
    progress = Progress(iteration=start)
    objective.progress = progress
    settings = dict(log_interval=2, checkpoint_interval=3, eval_interval=4) | schedule
    run_loop(objective, progress, Schedule(total=total, **settings), run_dir, ["thing"])
    return progress


def test_hooks_in_order_rows_evaluations_and_checkpoints(tmp_path):
    objective = _Quadratic()
    progress = _run(objective, tmp_path)
    assert progress.iteration == 6 and progress.loss_terms == ["squared"]
    steps = [c for c in objective.calls if c[0] in ("before", "loss", "after")]
    assert steps == [(name, i) for i in range(6) for name in ("before", "loss", "after")]
    assert [i for name, i in objective.calls if name == "evaluate"] == [4, 6]  # the interval and the end
    assert [i for name, i in objective.calls if name == "save"] == [3, 6]
    rows = _rows(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6]  # log interval; the evaluations fall on it
    assert rows[0]["val_dice/thing"] == "" and float(rows[1]["val_dice/thing"]) < 0
    # SGD on |w - 3|^2 with lr 0.1: w_k = 3 (1 - 0.8^k)
    assert torch.allclose(objective.w.detach(), torch.full((2,), 3 * (1 - 0.8**6)))
    assert (tmp_path / "progress.png").is_file()


class _Killed(BaseException):
    """Stands in for SIGKILL (not an Exception: nothing may catch it)."""


def test_a_resumed_loop_continues_where_the_killed_one_stopped(tmp_path):
    whole = _Quadratic()
    _run(whole, tmp_path / "whole")

    killed = _Quadratic()
    save = killed.save_latest

    def save_then_die():
        save()
        raise _Killed  # right after the checkpoint of step 3, with step 3's loss not yet in a row

    killed.save_latest = save_then_die
    with pytest.raises(_Killed):
        _run(killed, tmp_path / "parts")
    resumed = _Quadratic()
    resumed.w.data.copy_(killed.w.detach())  # what the checkpoint holds
    progress = Progress(iteration=3, average=LossAverage(killed.progress.average.state()), loss_terms=["squared"])
    resumed.progress = progress
    run_loop(resumed, progress, Schedule(total=6, log_interval=2, checkpoint_interval=3, eval_interval=4),
             tmp_path / "parts", ["thing"])
    assert [i for name, i in resumed.calls if name == "loss"] == [3, 4, 5]
    assert torch.equal(resumed.w.detach(), whole.w.detach())
    assert _rows(tmp_path / "parts") == _rows(tmp_path / "whole")  # the row of 4 averages steps 3 and 4


def test_a_finished_run_does_no_step(tmp_path):
    objective = _Quadratic()
    _run(objective, tmp_path, start=6)
    assert objective.calls == []


def test_a_non_finite_loss_stops_with_the_step_and_no_update(tmp_path):
    objective = _Quadratic(diverge_at=2)
    with pytest.raises(MedsegError, match=r"^the loss is inf \(squared inf\) at step 3 \(training diverged\)"):
        _run(objective, tmp_path)
    assert ("after", 2) not in objective.calls  # the diverged step was not taken
    assert torch.allclose(objective.w.detach(), torch.full((2,), 3 * (1 - 0.8**2)))


class _NaNGradient(_Quadratic):
    """A finite loss whose gradient is NaN at one step (an overflow in backward)."""

    def loss(self, batch, iteration):
        loss, terms = super().loss(batch, iteration)
        if iteration == 2:
            loss = loss + (self.w * 0).pow(0.5).sum()  # value 0, gradient 0 * inf = nan
        return loss, terms


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_non_finite_gradients_stop_before_the_weights_are_touched(tmp_path, grad_clip):
    """The optimizer wrote NaN into every weight, which latest.pt and best.pt then held
    (validation scored it Dice 0 and "best", predict gave empty masks with exit 0)."""
    objective = _NaNGradient()
    with pytest.raises(MedsegError, match=r"^the gradient norm is nan with a finite loss of .* at step 3 \(training diverged\)"):
        _run(objective, tmp_path, grad_clip=grad_clip)
    assert ("after", 2) not in objective.calls and bool(torch.isfinite(objective.w).all())
    assert ("save", 3) not in objective.calls


def test_gradient_clipping_bounds_the_step(tmp_path):
    objective = _Quadratic()
    _run(objective, tmp_path, total=1, grad_clip=1.0)
    # gradient 2 (w - 3) = (-6, -6), norm 8.49, clipped to 1: w = 0.1 * (6, 6) / |(6, 6)|
    assert torch.allclose(objective.w.detach(), torch.full((2,), 0.1 / math.sqrt(2)), atol=1e-6)


def test_tensorboard_shows_each_step_once_after_resumes(tmp_path):
    """TensorBoard's web page (its plugin accumulator) takes the first session START it
    reads for the run's beginning: the first attempt wrote none, so the first resume's was
    ignored and the steps between the checkpoint and the kill showed twice; a restart from
    the beginning (killed before its first checkpoint) kept the dead attempt's steps."""
    import time

    from tensorboard.backend.event_processing import plugin_event_accumulator

    from medseg.training.logs import RunLog

    def attempt(resume, steps):
        log = RunLog(tmp_path, ["dice_ce"], ["vessel"], resume_iteration=resume)
        for step in steps:
            log.add_row(step, 0.01, float(step), {"dice_ce": float(step)})
        log.close()
        time.sleep(1.1)  # event files are named by the second they start in

    def shown():
        acc = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        return [(e.step, float(e.tensor_proto.float_val[0])) for e in acc.Tensors("train/loss")]

    attempt(None, [1, 2, 3])  # killed before its first checkpoint
    attempt(None, [1, 2, 3, 4, 5, 6])  # started again from the beginning; killed after its checkpoint at 4
    assert shown() == [(s, float(s)) for s in range(1, 7)]
    attempt(4, [5, 6, 7, 8])
    assert shown() == [(s, float(s)) for s in range(1, 9)]
    attempt(6, [7, 8, 9])
    assert shown() == [(s, float(s)) for s in range(1, 10)]


def test_closing_the_tensorboard_writer_after_a_lost_wake_up_takes_seconds(tmp_path):
    """A SIGTERM that interrupted the main thread inside the writer's queue could lose the
    wake-up call of its thread, which then slept out TensorBoard's default 120 s flush
    interval: a stopped `train` hung after its last line (CI, 1 run in 10 under load). The
    writer's thread now looks at its queue every 2 s."""
    import queue
    import time

    from medseg.training.logs import RunLog

    log = RunLog(tmp_path, ["dice_ce"], ["vessel"])
    log.add_row(1, 0.01, 1.0, {"dice_ce": 1.0})
    time.sleep(0.2)  # the thread is back asleep on its queue

    def queues(obj, depth=0, seen=None):
        seen = set() if seen is None else seen
        if id(obj) in seen or depth > 5:
            return []
        seen.add(id(obj))
        if isinstance(obj, queue.Queue):
            return [obj]
        found = []
        for value in getattr(obj, "__dict__", {}).values():
            found += queues(value, depth + 1, seen)
        return found

    from tensorboard.compat.proto.event_pb2 import Event

    [events] = queues(log.writer)
    with events.mutex:  # an event in the queue whose wake-up call was lost, as after the interrupt
        events.queue.append(Event(wall_time=time.time(), step=2).SerializeToString())
        events.unfinished_tasks += 1
    began = time.monotonic()
    log.close()
    assert time.monotonic() - began < 10

"""LR schedules and the seed -> patch mapping that makes resumed runs exact."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import OptimizerConfig, SchedulerConfig
from medseg.training.optim import build_optimizer, build_scheduler, lr_factor
from medseg.training.sampling import case_for_sample, transform_seed


@pytest.mark.parametrize("name", ["poly", "cosine", "constant"])
def test_schedules_start_at_one_and_follow_their_formula(name):
    cfg = SchedulerConfig(name=name)
    total = 100
    assert lr_factor(0, total, cfg) == pytest.approx(1.0)
    t = 0.5
    expected = {"poly": (1 - t) ** 0.9, "cosine": 0.5 * (1 + math.cos(math.pi * t)), "constant": 1.0}[name]
    assert lr_factor(50, total, cfg) == pytest.approx(expected)
    values = [lr_factor(i, total, cfg) for i in range(total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_is_linear_then_the_schedule():
    cfg = SchedulerConfig(name="poly", warmup_iterations=10)
    assert [lr_factor(i, 110, cfg) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5**0.9)


def test_scheduler_steps_per_iteration_and_resumes():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.1))
    assert opt.param_groups[0]["nesterov"]
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), 10)
    for _ in range(4):
        opt.step()
        sched.step()
    lr_after_4 = opt.param_groups[0]["lr"]
    opt2 = build_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.1))
    sched2 = build_scheduler(opt2, SchedulerConfig(name="cosine"), 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_after_4)
    for s, o in ((sched, opt), (sched2, opt2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_sampling_is_a_pure_function_and_visits_every_case_per_epoch():
    n = 7
    first = [case_for_sample(3, k, n) for k in range(3 * n)]
    assert first == [case_for_sample(3, k, n) for k in range(3 * n)]
    for e in range(3):
        assert sorted(first[e * n : (e + 1) * n]) == list(range(n))
    assert first != [case_for_sample(4, k, n) for k in range(3 * n)]
    seeds = [transform_seed(3, k) for k in range(100)]
    assert len(set(seeds)) == 100 and seeds == [transform_seed(3, k) for k in range(100)]


def test_num_workers_is_bounded_in_the_config_and_by_the_cores(monkeypatch, caplog):
    """A typo such as 1000000 workers is refused by the schema; more than twice the cores
    are not started (each worker is a process with its own pipeline)."""
    import medseg.preprocessing.run as prep
    from medseg.config import MAX_DATA_WORKERS, DataConfig
    from medseg.training.sampling import resolve_num_workers

    with pytest.raises(ValueError, match=f"integer from 0 to {MAX_DATA_WORKERS}"):
        DataConfig(dataset=".", num_workers=1_000_000)
    assert DataConfig(dataset=".", num_workers=MAX_DATA_WORKERS).num_workers == MAX_DATA_WORKERS
    monkeypatch.setattr(prep, "cpus_per_process", lambda: 2)
    assert resolve_num_workers(3) == 3 and resolve_num_workers("auto") == 1
    with caplog.at_level("WARNING", logger="medseg"):
        assert resolve_num_workers(64) == 4
    assert "data.num_workers 64" in caplog.text

"""``medseg train`` and ``medseg adapt`` killed with SIGKILL at their file writes and at
random times, then resumed as a user would: the final checkpoint equals the
uninterrupted run's (``torch.equal``), and so do ``metrics.csv`` and the other files.

The user's procedure after a kill: ``medseg train CONFIG --resume``; where that answers
that there is nothing to resume (the run was killed before its run folder existed), the
same command without ``--resume``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fault_helpers import (
    ALL,
    Run,
    Sweep,
    changing_writes,
    kill_points,
    leftovers,
    load_pt,
    random_times,
    read_trace,
    report,
    same_tensors,
    adapt_config,
    train_config,
)

SAMPLE = 10  # kill points per command in CI (MEDSEG_FAULTS=all: every write)
RANDOM = 10 if ALL else 2
UNCOMPARED = {"train.log", "adapt.log"}  # log lines carry times; the TensorBoard events are not compared either


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
            and p.name not in UNCOMPARED and "tensorboard" not in p.parts}


def _without(data: dict, *keys: str) -> dict:
    out = dict(data)
    for key in keys:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = _without(out[head], rest)
        else:
            out.pop(head, None)
    return out


def _sweep(killer, name: str, tmp: Path, argv, check, sample: int = SAMPLE, seed: int = 0) -> Sweep:
    """Kill ``argv(tag)`` at the chosen points, resume, and collect ``check(tag)``'s problems."""
    sweep = Sweep(name)
    logs = tmp / "logs"
    [reference] = killer.run([Run(argv("ref"), logs, trace=True).spec("ref")])
    assert reference["code"] == 0, (logs / "ref.err").read_text()[-3000:]
    writes = changing_writes(read_trace(logs / "ref.trace"))
    sweep.writes = len(writes)
    points = [(f"before write {k}", {"before": k}) for k in kill_points(writes, sample, seed)]
    points += [(f"at {t:.2f} s", {"at_s": t}) for t in random_times(reference["seconds"], RANDOM, seed)]

    tags = [f"k{i}" for i in range(len(points))]
    runs = []
    for tag, (_, kill) in zip(tags, points):
        runs.append(Run(argv(tag), logs, kill=kill).spec(f"{tag}.kill"))
        runs.append(Run([*argv(tag), "--resume"], logs).spec(f"{tag}.resume"))
    results = killer.run(runs)
    fresh = [tag for tag, resumed in zip(tags, results[1::2])
             if resumed["code"] != 0 and "nothing to resume" in (logs / f"{tag}.resume.err").read_text()]
    again = dict(zip(fresh, killer.run([Run(argv(tag), logs).spec(f"{tag}.rerun") for tag in fresh])))

    for tag, (point, kill), killed, resumed in zip(tags, points, results[0::2], results[1::2]):
        final, step = (again[tag], "rerun") if tag in again else (resumed, "resume")
        sweep.judge(point, kill, killed, final, step, (logs / f"{tag}.{step}.err").read_text(),
                    lambda tag=tag: check(tag))
    return sweep


# --------------------------------------------------------------------------- train

def test_train_survives_sigkill_at_every_write(killer, tiny_dataset, tmp_path, record_property):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(tiny_dataset, tmp_path / "unused")))

    def argv(tag: str) -> list:
        # a cache of its own per run: the kills land in the preprocessing too
        return ["train", config, "--set", f"output_dir={tmp_path / tag}", "--set", f"data.cache_dir={tmp_path / tag}_cache"]

    def check(tag: str) -> list[str]:
        ref, got = tmp_path / "ref", tmp_path / tag
        problems = [f"left {name}" for name in leftovers(got)]
        if _files(got) != _files(ref):
            problems.append(f"files {sorted(_files(got) ^ _files(ref))} differ")
            return problems
        for name in ("metrics.csv", "label_stats.json"):
            if (got / name).read_bytes() != (ref / name).read_bytes():
                problems.append(f"{name} differs")
        keys = ("output_dir", "data.cache_dir")
        if _without(yaml.safe_load((got / "config.yaml").read_text()), *keys) != \
                _without(yaml.safe_load((ref / "config.yaml").read_text()), *keys):
            problems.append("config.yaml differs")
        for name in ("latest.pt", "best.pt"):
            a, b = load_pt(ref / "checkpoints" / name), load_pt(got / "checkpoints" / name)
            problems += same_tensors(a["model"], b["model"], f"{name} model")
            problems += same_tensors(a["optimizer"], b["optimizer"], f"{name} optimizer")
            problems += same_tensors([a["iteration"], a["best_metric"], a["loss_average"]],
                                     [b["iteration"], b["best_metric"], b["loss_average"]], f"{name} progress")
        return problems

    sweep = _sweep(killer, "train", tmp_path, argv, check)
    report(record_property, sweep)
    assert not sweep.failed, "\n".join(sweep.failed)


# --------------------------------------------------------------------------- adapt

def test_adapt_survives_sigkill_at_every_write(killer, tiny_run, tiny_target, tmp_path, record_property):
    config = tmp_path / "adapt.yaml"
    config.write_text(yaml.safe_dump(adapt_config(tiny_run, tiny_target, tmp_path / "unused")))
    source_before = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}

    def argv(tag: str) -> list:
        return ["adapt", config, "--set", f"output_dir={tmp_path / tag}"]

    def check(tag: str) -> list[str]:
        ref, got = tmp_path / "ref", tmp_path / tag
        problems = [f"left {name}" for name in leftovers(got)]
        if _files(got) != _files(ref):
            return problems + [f"files {sorted(_files(got) ^ _files(ref))} differ"]
        for name in ("metrics.csv", "target_eval.json", "label_stats.json"):
            if (got / name).read_bytes() != (ref / name).read_bytes():
                problems.append(f"{name} differs")
        a, b = load_pt(ref / "checkpoints" / "latest.pt"), load_pt(got / "checkpoints" / "latest.pt")
        problems += same_tensors(a["model"], b["model"], "model")
        problems += same_tensors(a["optimizer"], b["optimizer"], "optimizer")
        problems += same_tensors(a["adaptation"]["student"], b["adaptation"]["student"], "student")
        problems += same_tensors(a["adaptation"]["method_state"], b["adaptation"]["method_state"], "method state")
        problems += same_tensors(a["iteration"], b["iteration"], "iteration")
        return problems

    sweep = _sweep(killer, "adapt", tmp_path, argv, check)
    report(record_property, sweep)
    assert {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()} == source_before  # never written to
    assert not sweep.failed, "\n".join(sweep.failed)


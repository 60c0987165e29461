"""A run's progress in a study: ``study_run.json`` in its folder, and what is left to do.

The file (written atomically by the run's process, after the trainer created the folder)::

    {"variant": "cldice", "seed": 1, "status": "finished" | "running" | "failed", "error": null,
     "config": {...},                      # the resolved run config it was trained with
     "training": {"iterations": 2000,      # the model in checkpoints/latest.pt is final for these
                  "segments": [{"from_iteration": 0, "to_iteration": 2000, "seconds": 812.4,
                                "peak_rss_mib": 2410.0, "peak_cuda_mib": 5120.3, "device": "cuda"}]},
     "tests": {"in_distribution": {"predicted": {...}, "evaluated": {...}}}}

A run is *finished* when ``checkpoints/latest.pt`` holds the final iteration (recorded
under ``training``) and, for every test folder, ``evaluation/TEST/summary.json`` exists
and was computed with the study's current settings (``evaluated``). ``predicted`` is
written before the predictions are made, so an interrupted prediction resumes (existing
outputs of the same model are kept) while a changed model or inference setting
recomputes them. Each segment is one training call: a resumed run adds one, so the time
per step covers every call that finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.config import RESUME_MAY_CHANGE
from medseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medseg.study.config import StudyConfig, StudyRun

__all__ = [
    "STATE_FILE",
    "read_state",
    "write_state",
    "latest_checkpoint",
    "predictions_dir",
    "evaluation_dir",
    "prediction_record",
    "evaluation_record",
    "training_done",
    "test_done",
    "is_finished",
    "check_reusable",
    "training_summary",
]

STATE_FILE = "study_run.json"
_PREDICTIONS = "predictions"
_EVALUATION = "evaluation"
# Run-config keys that may change between invocations without retraining are those a
# resume may change (medseg.config.RESUME_MAY_CHANGE), except the iteration count of a
# run that finished training (check_reusable); inference.* is part of the prediction
# record instead (a change re-predicts).


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's ``study_run.json``, or ``{}`` when there is none yet.

    Raises
    ------
    ConfigError
        When the file is not readable JSON (it is written atomically, so only a hand edit does that).
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not readable ({type(err).__name__}: {err}); delete it to redo the run's steps") from None
    return state if isinstance(state, dict) else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    from medseg.evaluation.summary import json_default
    from medseg.atomic import write_atomic

    write_atomic(Path(run_dir) / STATE_FILE, json.dumps(state, indent=2, default=json_default) + "\n")


def latest_checkpoint(run_dir: Path) -> Path:
    from medseg.runfolder import CHECKPOINT_DIR, LATEST

    return Path(run_dir) / CHECKPOINT_DIR / LATEST


def predictions_dir(run_dir: Path, test: str) -> Path:
    return Path(run_dir) / _PREDICTIONS / test


def evaluation_dir(run_dir: Path, test: str) -> Path:
    return Path(run_dir) / _EVALUATION / test


def folder_contents(folder: Path) -> list[list[Any]]:
    """``[name, size, mtime_ns, ctime_ns, inode]`` of every file in ``folder`` (sorted;
    :func:`medseg.atomic.file_stamp`): a scan added, removed or replaced in a test folder
    (also by ``mv`` of a file of the same size and time) changes it, so its predictions
    and metrics are recomputed instead of reused. Empty when the folder cannot be listed."""
    from medseg.atomic import file_stamp

    try:
        entries = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
        return [[p.name, *file_stamp(p)] for p in entries]
    except OSError:
        return []


def training_data_digest(run: "StudyRun") -> str:
    """A digest of what the run trains on: the stamps (:func:`folder_contents`) of its
    dataset's ``imagesTr``, ``labelsTr`` and ``dataset.json`` and of its split file. A
    finished run whose digest differs was trained on other data than a run started now
    (``medseg study`` says so: the study would average the two)."""
    import hashlib
    import json

    from medseg.atomic import file_stamp_or_none

    dataset = Path(run.config.data.dataset)
    split = run.config.data.split_file
    if split is not None and not Path(split).is_absolute():
        split = dataset / split
    record = {
        "imagesTr": folder_contents(dataset / "imagesTr"),
        "labelsTr": folder_contents(dataset / "labelsTr"),
        "dataset.json": file_stamp_or_none(dataset / "dataset.json"),
        "split_file": file_stamp_or_none(split),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def prediction_record(run: "StudyRun", study: "StudyConfig", test: str) -> dict[str, Any]:
    """What the predictions of ``test`` depend on; a change recomputes them."""
    return {
        "model_iteration": run.config.train.iterations,
        "checkpoint": study.predict.checkpoint,
        "tta": study.predict.tta,
        "inference": run.config.inference.model_dump(mode="json"),
        "images": str(study.test[test].images),
        "image_files": folder_contents(study.test[test].images),
    }


def evaluation_record(run: "StudyRun", study: "StudyConfig", test: str,
                      predicted: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the evaluation of ``test`` depends on; a change re-evaluates. ``predicted``:
    the :func:`prediction_record` the predictions were made from (default: the test
    folder as it is now)."""
    settings = study.evaluate.model_dump(mode="json", exclude={"workers"})
    return {
        **(predicted if predicted is not None else prediction_record(run, study, test)),
        "labels": str(study.test[test].labels),
        "label_files": folder_contents(study.test[test].labels),
        "evaluate": settings,
    }


def training_done(run: "StudyRun", state: dict[str, Any]) -> bool:
    trained = (state.get("training") or {}).get("iterations")
    return trained == run.config.train.iterations and latest_checkpoint(run.run_dir).is_file()


def test_done(run: "StudyRun", study: "StudyConfig", test: str, state: dict[str, Any]) -> bool:
    entry = (state.get("tests") or {}).get(test) or {}
    return (
        entry.get("evaluated") == evaluation_record(run, study, test)
        and (evaluation_dir(run.run_dir, test) / "summary.json").is_file()
    )


def is_finished(run: "StudyRun", study: "StudyConfig") -> bool:
    """Trained to the final iteration, and every test folder predicted and evaluated with the current settings."""
    state = read_state(run.run_dir)
    return training_done(run, state) and all(test_done(run, study, t, state) for t in study.test)


def check_reusable(run: "StudyRun") -> None:
    """Refuse a run folder trained with other settings than the study now asks for.

    Raises
    ------
    ConfigError
        The stored config (``study_run.json``'s, or the ``config.yaml`` of a run
        interrupted in its first training call) differs in a key that shapes the model
        (anything but the iteration count, the intervals, workers, device and inference
        settings), or the run finished training for another number of iterations than
        asked (a longer run resumed from its end would follow another schedule).
    """
    from medseg.config import validate_config
    from medseg.runfolder.resume import changed_keys

    state = read_state(run.run_dir)
    stored = state.get("config")
    if not isinstance(stored, dict):
        # interrupted before its first training call ended: the config the trainer wrote
        # when it started, so an edited variant is refused now, not in its worker later
        from medseg.errors import CheckpointError
        from medseg.runfolder.resume import unfinished_start

        try:
            stored = unfinished_start(run.run_dir, "train.log")
        except CheckpointError:  # unreadable: the run's own resume says so
            return
        if not stored:
            return
    # through today's schema first, so that keys it added since have their defaults on
    # both sides; then a key on one side only is a change (a model.params entry added or
    # removed reused a finished run trained without it)
    try:
        stored = validate_config(stored, source=f"{run.run_dir} (stored config)").model_dump(mode="json")
    except ConfigError:
        pass
    changed = changed_keys(stored, run.config.model_dump(mode="json"), RESUME_MAY_CHANGE)
    if changed:
        shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
        raise ConfigError(
            f"{run.run_dir}: trained with other settings than the study now gives variant {run.variant} "
            f"({shown} changed); restore them, or delete the folder to train the run again"
        )
    trained = (state.get("training") or {}).get("iterations")
    done = "trained"
    if trained is None:  # interrupted: the iterations it was started for set its schedule
        trained, done = (stored.get("train") or {}).get("iterations"), "started"
    if isinstance(trained, int) and trained != run.config.train.iterations:
        # the learning-rate schedule (warm-up, poly decay) is laid out over the iterations
        # a run starts with: one trained on past them is not trained as the study's fresh runs
        raise ConfigError(
            f"{run.run_dir}: {done} for {trained} iterations but the study asks for {run.config.train.iterations}; "
            f"if the study ran with --set train.iterations={trained}, give that again; else its learning-rate "
            "schedule would not be the other runs': delete the folder to train it again, or give this study "
            "another output_dir (--set output_dir=DIR)"
        )


def training_summary(state: dict[str, Any]) -> dict[str, Any]:
    """Seconds per step over the recorded training calls, and their peak memory (NaN/None
    when unknown). A call that trained no step (a resume of a run whose training had
    finished) measured neither."""
    segments = [s for s in (state.get("training") or {}).get("segments") or []
                if s["to_iteration"] > s["from_iteration"]]
    steps = sum(s["to_iteration"] - s["from_iteration"] for s in segments)
    seconds = sum(s["seconds"] for s in segments)
    rss = [s["peak_rss_mib"] for s in segments if s.get("peak_rss_mib") is not None]
    cuda = [s["peak_cuda_mib"] for s in segments if s.get("peak_cuda_mib") is not None]
    return {
        "seconds_per_step": seconds / steps if steps else math.nan,
        "peak_rss_mib": max(rss) if rss else math.nan,
        "peak_cuda_mib": max(cuda) if cuda else None,
        "devices": sorted({s.get("device", "?") for s in segments}),
    }

"""``medseg plan``: fingerprint a dataset, plan a run, write the config and the plans."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.atomic import blocking_file, make_writable_folder, remove_empty_folders
from medseg.data.dataset import dataset_data_folder, dataset_place, read_dataset_json
from medseg.errors import ArgumentError
from medseg.planning.memory import MAX_GPU_MEMORY_GB, MIN_GPU_MEMORY_GB

__all__ = ["PlanResult", "run_plan", "default_config_path"]


@dataclass
class PlanResult:
    config: Path
    plans: Path
    fingerprint: Path
    plan: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def default_config_path(dataset: Path) -> Path:
    """``plans/<dataset folder name>/config.yaml`` under the current directory."""
    return Path("plans") / Path(os.path.abspath(dataset)).name / "config.yaml"


def _make_writable_folder(folder: Path, argument: str) -> list[Path]:
    """Create ``folder`` and check a file can be written there, before the (long)
    fingerprint; returns the folders created, to remove on failure."""
    existing = blocking_file(folder)
    if existing is not None:
        raise ArgumentError(argument, f"{existing} exists and is not a folder", folder)
    try:
        return make_writable_folder(folder)
    except OSError as err:
        raise ArgumentError(argument, f"cannot write there ({err.strerror or err})", folder) from None


def _check_not_another_plans_place(config_path: Path) -> None:
    """A plan replaces only what a plan wrote for this config: not a file of the user's
    own at ``CONFIG.yaml``, and not the ``plans.json`` / ``fingerprint.json`` of another
    config in the same folder (two ``-o`` in one folder: the first config then pointed at
    the second dataset's fingerprint and was refused as stale).

    Raises
    ------
    ArgumentError
        Naming the file in the way.
    """
    import json

    from medseg.planning.writer import PLANNED_CONFIG_HEADER

    if config_path.is_file():
        try:
            with open(config_path, encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith(PLANNED_CONFIG_HEADER):
            raise ArgumentError("output", "exists and is not a config medseg plan wrote; remove it or choose another "
                                "name", config_path)
    plans = config_path.parent / "plans.json"
    try:
        files = json.loads(plans.read_text(encoding="utf-8"))["files"]
        owner = files["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no plan there (or not one medseg can read: replaced)
    if owner != config_path.name:
        raise ArgumentError(
            "output",
            f"{plans} belongs to the plan {config_path.parent / str(owner)} (a plan keeps plans.json and "
            "fingerprint.json beside its config); write this plan to another folder",
            config_path,
        )
    # a config the user edited since the plan wrote it is theirs now (a plan of an earlier
    # medseg recorded no digest: replaced as before)
    written = files.get("config_sha256") if isinstance(files, dict) else None
    if isinstance(written, str) and config_path.is_file() and _sha256(config_path) != written:
        raise ArgumentError("output", "was edited since medseg plan wrote it (its SHA-256 is not the one in "
                            f"{plans.name}); a new plan would drop the edits: remove it or choose another name",
                            config_path)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_plan(
    dataset: str | Path,
    output: str | Path | None = None,
    gpu_memory_gb: float = 8.0,
    model: str = "dynunet",
    topology_loss: str | None = None,
    workers: int = 2,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> PlanResult:
    """Fingerprint ``dataset``, plan, and write ``CONFIG.yaml``, ``plans.json``,
    ``fingerprint.json`` and ``fingerprint_samples.npz`` (the last three next to the config).

    Warnings (extreme cases, a numTraining mismatch) are collected, written into the
    config and ``plans.json``, and returned.

    Raises
    ------
    DataError
        Not a dataset, or a case that cannot be read.
    ConfigError
        A bad option (model, loss, memory), an output that cannot be written, or a plan
        that does not validate as a run config.
    """
    from medseg.config import validate_config
    from medseg.planning.fingerprint import compute_fingerprint
    from medseg.planning.planner import MODELS, plan_experiment, plan_losses
    from medseg.planning.writer import render_config, write_fingerprint, write_plans, write_text_atomic

    dataset = Path(dataset)
    if model not in MODELS:
        raise ArgumentError("model", f"{model!r} is not one of {', '.join(MODELS)}")
    if not MIN_GPU_MEMORY_GB <= gpu_memory_gb <= MAX_GPU_MEMORY_GB:
        raise ArgumentError(
            "gpu_memory_gb", f"must be {MIN_GPU_MEMORY_GB:g} to {MAX_GPU_MEMORY_GB:g} GiB, got {gpu_memory_gb}"
        )
    if workers < 1:
        raise ArgumentError("workers", f"must be at least 1, got {workers}")
    # no folder, a file, no dataset.json: one line before any work; labels train refuses: a
    # planned config that could not run
    read_dataset_json(dataset).check_trainable()
    if topology_loss not in (None, "none"):  # an unknown loss name should not cost a fingerprint
        plan_losses(topology_loss, {})
    config_path = Path(output) if output is not None else default_config_path(dataset)
    if config_path.is_dir():
        raise ArgumentError("output", f"is a folder; give the config file's name, e.g. {config_path / 'config.yaml'}",
                            config_path)
    # the config, plans.json and fingerprint.json must not replace a dataset's files
    if config_path.suffix.lower() not in (".yaml", ".yml"):
        raise ArgumentError("output", "must name a .yaml file (the run config; plans.json and fingerprint.json go "
                            "next to it)", config_path)
    inner = dataset_data_folder(config_path.parent, dataset)
    if inner is not None:
        raise ArgumentError("output", f"lies in the dataset's {inner}/ folder; write the plan elsewhere", config_path)
    if output_dir is not None:  # train would refuse the planned config's output_dir only after the fingerprint
        place = dataset_place(output_dir, dataset)
        if place is not None:
            raise ArgumentError("output_dir", f"{place}; the run must go elsewhere", output_dir)
    folder = config_path.parent
    _check_not_another_plans_place(config_path)
    created = _make_writable_folder(folder, "output")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fingerprint, samples = compute_fingerprint(dataset, workers=workers, progress=progress)
            plan = plan_experiment(
                fingerprint, model=model, gpu_memory_gb=gpu_memory_gb, topology_loss=topology_loss,
                output_dir=str(output_dir) if output_dir is not None else None,
            )
    except BaseException:
        remove_empty_folders(created)
        raise
    from medseg.data.dataset import DatasetWarning

    extra = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning) and str(w.message) not in plan["warnings"]]
    plan["warnings"] = extra + plan["warnings"]
    plan["files"] = {"config": config_path.name, "fingerprint": "fingerprint.json", "samples": fingerprint["samples_file"]}

    text = render_config(plan, config_path)
    import hashlib

    import yaml

    validate_config(yaml.safe_load(text), source=f"planned config {config_path}")  # a plan must be runnable
    plan["files"]["config_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()  # its edits are then seen
    fingerprint_path = write_fingerprint(folder, fingerprint, samples)
    plans_path = write_plans(folder, plan)
    write_text_atomic(config_path, text)
    return PlanResult(config_path, plans_path, fingerprint_path, plan, list(plan["warnings"]))

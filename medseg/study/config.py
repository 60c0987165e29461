"""``STUDY.yaml``: a comparison of configs (e.g. losses) over seeds, and its runs resolved and checked.

A study names a base run config, overrides for every run, variants (each a set of
overrides), seeds and test folders with labels::

    base: configs/unet2d.yaml
    set: {data.dataset: data/Dataset201_TopoMortar, train.iterations: 2000}
    variants:
      cedice: {losses: [{name: dice_ce, weight: 1.0}]}
      cldice: {losses: [{name: dice_ce, weight: 1.0}, {name: cldice, weight: 0.5}]}
    seeds: [0, 1, 2]
    test:
      in_distribution: {images: data/Dataset201_TopoMortar/imagesTs, labels: data/Dataset201_TopoMortar/labelsTs}
    output_dir: studies/topomortar

The run of variant ``V`` and seed ``S`` is the base config with ``set``, then ``V``'s
overrides, then the command line's ``--set`` applied, ``seed: S`` and ``output_dir:
OUTPUT_DIR/V/seed_S``. Overrides are dotted keys (``train.iterations: 5``) or nested
values (``train: {iterations: 5}``); nested sections are merged key by key, other values
(lists such as ``losses``) replaced. Relative paths are taken from the current
directory, as in run configs; ``{dataset}`` in a test folder stands for the runs'
``data.dataset`` (``images: "{dataset}/imagesTs"``), so ``--set data.dataset=DIR``
moves training and tests together. The first variant is the baseline of the
statistical tests.

:func:`load_study` checks everything a run could trip over before any training starts:
the study keys, the base config, every run config (an unknown key is named with the
override it came from), each variant's device, split, losses and network (built once), the dataset,
the test folders (a label for every scan), the evaluation settings, and that run
folders left by an earlier invocation were trained with the same settings.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from medseg.atomic import check_output_folder
from medseg.config import (
    RunConfig,
    apply_overrides,
    read_yaml_with_overrides,
    section,
    validate_config,
    validate_model,
)
from medseg.errors import ConfigError, MedsegError
from medseg.evaluation.compare import SIGNIFICANCE

__all__ = [
    "StudyConfig",
    "TestSet",
    "StudyEvaluate",
    "StudyPredict",
    "StudyRun",
    "Study",
    "STUDY_METRICS",
    "load_study",
    "run_dir_of",
]

STUDY_METRICS = ("dice", "cldice", "hd95", "betti", "betti_matching")
"""Metrics a study evaluates by default (names of :data:`medseg.evaluation.metrics.LABEL_METRICS`)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # variant and test names become folder names
_MAX_NAME = 100  # a run's log is logs/VARIANT_seed_N.log: file names have at most 255 bytes
_RESERVED = frozenset({"study.json", "study.csv", "study.html", "logs", ".ranks"})  # in output_dir beside the variants
_DATASET = "{dataset}"  # in a test folder path: the runs' data.dataset
# Keys the study sets itself for every run.
_STUDY_KEYS = ("seed", "output_dir")
MAX_SEED = 2**32 - 1  # RunConfig.seed's range


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TestSet(_Strict):
    """A folder of scans to segment and the folder of their reference labels."""

    images: Path = Field(..., description="folder of scans, nnU-Net naming CASE_0000<ending>")
    labels: Path = Field(..., description="folder of reference label maps CASE<ending>, one for every scan")


class StudyEvaluate(_Strict):
    """How every run's predictions are evaluated (``medseg evaluate``'s options)."""

    metrics: list[str] = Field(
        default_factory=lambda: list(STUDY_METRICS),
        description="metrics to compute (medseg evaluate --metrics); the study's table uses Betti errors, "
        "Betti matching error, Dice, clDice and HD95",
    )
    connectivity: int | None = Field(
        None, description="foreground connectivity of the topology metrics: 8/4 (2D), 26/6 (3D); default full (8/26)"
    )
    tolerance_mm: float | None = Field(None, gt=0, description="normalised surface Dice tolerance, mm (if 'surface_dice' is computed)")
    workers: int = Field(1, ge=1, description="evaluation processes per run")
    report: bool = Field(False, description="also write each run's report.html")

    @field_validator("connectivity")
    @classmethod
    def _connectivity(cls, value: int | None) -> int | None:
        if value is not None and value not in (4, 6, 8, 26):
            raise ValueError("must be 8 or 4 (2D), 26 or 6 (3D)")
        return value


class StudyPredict(_Strict):
    """How every run segments the test folders (``medseg predict``'s options)."""

    checkpoint: Literal["best", "latest"] = Field(
        "best", description="'best' (highest validation Dice; 'latest' when there is none) or 'latest' (the final model)"
    )
    tta: bool | None = Field(None, description="flip test-time augmentation (default: the run config's inference.tta_flips)")


class StudyConfig(_Strict):
    """The schema of ``STUDY.yaml``."""

    base: Path = Field(..., description="the run config every run starts from")
    overrides: dict[str, Any] = Field(
        default_factory=dict, alias="set", description="overrides of every run: dotted keys or nested values"
    )
    variants: dict[str, dict[str, Any]] = Field(
        ..., description="name -> overrides; the first variant is the baseline of the tests"
    )
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], description="every variant is trained once per seed")
    test: dict[str, TestSet] = Field(..., description="name -> test folder with labels")
    output_dir: Path = Field(..., description="the study folder: OUTPUT_DIR/VARIANT/seed_N per run, study.json/csv/html")
    evaluate: StudyEvaluate = Field(default_factory=StudyEvaluate)
    predict: StudyPredict = Field(default_factory=StudyPredict)
    alpha: float = Field(SIGNIFICANCE, gt=0, lt=1, description="significance level of the marks (better and p < alpha)")
    permutations: int | None = Field(
        None, ge=1, description="resamples of the paired permutation test (default: medseg report compare's)"
    )

    @field_validator("variants", "test")
    @classmethod
    def _names(cls, value: dict[str, Any], info) -> dict[str, Any]:
        if not value:
            raise ValueError("needs at least one entry")
        for name in value:
            if not _NAME.match(str(name)):
                raise ValueError(f"name '{name}' must be letters, digits, '.', '_', '+' or '-' (it names a folder)")
            if len(str(name)) > _MAX_NAME:
                raise ValueError(f"name '{str(name)[:20]}...' is {len(str(name))} characters; at most {_MAX_NAME}")
            if info.field_name == "variants" and str(name) in _RESERVED:
                raise ValueError(f"name '{name}' is taken by the study's own files ({', '.join(sorted(_RESERVED))})")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _overrides(cls, value: Any) -> Any:
        """A variant without overrides (``name:`` or ``name: null``) is the base config as it is."""
        if isinstance(value, dict):
            return {name: {} if overrides is None else overrides for name, overrides in value.items()}
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one seed")
        if any(not 0 <= s <= MAX_SEED for s in value):
            raise ValueError(f"seeds must be integers from 0 to {MAX_SEED} (a run's seed)")
        if len(set(value)) != len(value):
            raise ValueError("seeds must differ")
        return value


@dataclass(frozen=True)
class StudyRun:
    """One variant trained with one seed: its resolved config (``output_dir`` is its folder)."""

    variant: str
    seed: int
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def name(self) -> str:
        return f"{self.variant} seed {self.seed}"


@dataclass
class Study:
    """A checked study: its config, where it came from, and its runs (seed-major order).

    Seed-major: every variant at the first seed runs before any variant at the next one,
    so a study stopped early already compares every variant (on fewer seeds).
    """

    path: Path
    config: StudyConfig
    runs: list[StudyRun]
    overrides: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return next(iter(self.config.variants))

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def run_dir_of(output_dir: Path, variant: str, seed: int) -> Path:
    """Where the run of ``variant`` and ``seed`` lives."""
    return Path(output_dir) / variant / f"seed_{seed}"


# --------------------------------------------------------------------------- overrides

def _flat_keys(overrides: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path an override sets, dotted keys split, nested mappings followed."""
    paths = []
    for key, value in overrides.items():
        path = prefix + tuple(str(key).split("."))
        if isinstance(value, dict) and value:
            paths.extend(_flat_keys(value, path))
        else:
            paths.append(path)
    return paths


def _unknown_key(path: tuple[str, ...]) -> str | None:
    """The message for a key path that :class:`RunConfig` does not have, or None.

    Sections are followed while they are config models; below a free-form value
    (``model.params``, a loss term) anything goes and the full validation judges it.
    """
    model: type[BaseModel] = RunConfig
    for i, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{'.'.join((*path[:i], close[0]))}'?)" if close else ""
            return f"unknown config key '{'.'.join(path[: i + 1])}'{hint}"
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return None


def _check_keys(overrides: dict[str, Any], where: str) -> None:
    for path in _flat_keys(overrides):
        if not all(path):
            raise ConfigError(f"{where}: empty key segment in '{'.'.join(path)}'")
        if path[0] in _STUDY_KEYS:
            raise ConfigError(f"{where}: '{path[0]}' is set by the study for every run (use 'seeds' / 'output_dir')")
        problem = _unknown_key(path)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def _merge(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Apply overrides to a raw config: dotted keys walk into sections, mappings merge, the rest replaces."""
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = section(raw, parts[:-1], f"{where}: {key}")
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _merge(node[leaf], value, f"{where}: {key}")
        else:
            node[leaf] = copy.deepcopy(value)
    return raw


# --------------------------------------------------------------------------- loading

def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and check ``STUDY.yaml``; ``overrides`` (``KEY=VALUE``) are added to every run.

    Raises
    ------
    ConfigError
        One line naming the study file and the key, variant, override or path that is
        wrong; see the module docstring for what is checked.
    """
    path = Path(path)
    overrides = list(overrides or [])
    # --set output_dir=DIR moves the whole study (a quick look beside the real one); the
    # other --set keys are the runs'
    moved = [o for o in overrides if o.split("=", 1)[0].strip() == "output_dir"]
    overrides = [o for o in overrides if o not in moved]
    study_cfg = validate_model(StudyConfig, read_yaml_with_overrides(path, moved), source=str(path), overrides=moved)
    if not study_cfg.base.is_file():
        problem = "is not a file" if study_cfg.base.exists() else "config file not found"
        raise ConfigError(f"{path}: base: {study_cfg.base}: {problem}")
    try:
        base_raw = read_yaml_with_overrides(study_cfg.base)
    except ConfigError as err:
        raise ConfigError(f"{path}: base: {err}") from None
    if "variants" in base_raw and "base" in base_raw:
        raise ConfigError(f"{path}: base: {study_cfg.base} is a STUDY.yaml; name a training config (e.g. configs/unet2d.yaml)")
    for key_path in _flat_keys(base_raw):  # the base's own mistakes, named as the base's
        problem = _unknown_key(key_path)
        if problem:
            raise ConfigError(f"{path}: base: {study_cfg.base}: {problem}")
    _check_keys(study_cfg.overrides, f"{path}: set")
    cli = apply_overrides({}, overrides)  # parses and checks the --set syntax
    _check_keys(cli, "--set")

    runs: list[StudyRun] = []
    for variant, variant_overrides in study_cfg.variants.items():
        where = f"{path}: variants.{variant}"
        _check_keys(variant_overrides, where)
        raw = _merge(copy.deepcopy(base_raw), study_cfg.overrides, f"{path}: set")
        raw = _merge(raw, variant_overrides, where)
        try:
            raw = apply_overrides(raw, overrides)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for seed in study_cfg.seeds:
            run_raw = {**raw, "seed": seed, "output_dir": str(run_dir_of(study_cfg.output_dir, variant, seed))}
            try:
                config = validate_config(run_raw, source=where, overrides=overrides)
            except ConfigError:  # the same error, named after the part of the study that gave the key
                validate_config(run_raw, source=_blamed_part(path, study_cfg, variant, run_raw), overrides=overrides)
                raise
            runs.append(StudyRun(variant, seed, config))

    runs.sort(key=lambda run: study_cfg.seeds.index(run.seed))  # seed-major (stable: variants keep their order)
    _fill_dataset(path, study_cfg, runs)
    study = Study(path=path, config=study_cfg, runs=runs, overrides=overrides)
    _check_runs(study)
    return study


def _fill_dataset(path: Path, study_cfg: StudyConfig, runs: list[StudyRun]) -> None:
    """Replace ``{dataset}`` in the test folders by the runs' ``data.dataset``."""
    datasets = sorted({str(run.config.data.dataset) for run in runs})
    for name, test in study_cfg.test.items():
        for key in ("images", "labels"):
            value = str(getattr(test, key))
            if _DATASET in value:
                if len(datasets) > 1:
                    raise ConfigError(
                        f"{path}: test.{name}.{key}: {_DATASET} is ambiguous, the variants train on "
                        f"{', '.join(datasets)}"
                    )
                setattr(test, key, Path(value.replace(_DATASET, datasets[0])))


def _check_runs(study: Study) -> None:
    """What would otherwise fail inside a run: dataset, losses, network, tests, earlier run folders."""
    from medseg.data.dataset import read_dataset_json
    from medseg.evaluation.metrics import resolve_metrics
    from medseg.study.state import check_reusable  # state imports this module's types

    path = study.path
    try:
        resolve_metrics(study.config.evaluate.metrics, "evaluate.metrics")
    except MedsegError as err:
        raise ConfigError(f"{path}: {err}") from None
    try:  # the study folder and every run folder can be written (no file in the way)
        for folder in (study.output_dir, *(run.run_dir for run in study.runs)):
            check_output_folder(folder, "output_dir")
    except MedsegError as err:
        raise ConfigError(f"{path}: {err}") from None
    _check_output_place(study)
    infos = {}
    dims: dict[Path, set[int]] = {}  # the runs' spatial dimensions, per dataset
    checked_variants = set()
    for run in study.runs:
        cfg = run.config
        where = f"{path}: variants.{run.variant}"
        dataset = Path(cfg.data.dataset)
        dims.setdefault(dataset, set()).add(cfg.spatial_dims)
        if dataset not in infos:
            try:
                infos[dataset] = read_dataset_json(dataset)
            except MedsegError as err:
                raise ConfigError(f"{where}: data.dataset: {err}") from None
        info = infos[dataset]
        connectivity = study.config.evaluate.connectivity
        if connectivity is not None and connectivity not in {2: (4, 8), 3: (6, 26)}[cfg.spatial_dims]:
            raise ConfigError(
                f"{path}: evaluate.connectivity: {connectivity} does not fit the {cfg.spatial_dims}D runs of "
                f"variant {run.variant} (use {'8 or 4' if cfg.spatial_dims == 2 else '26 or 6'})"
            )
        if run.variant not in checked_variants:
            checked_variants.add(run.variant)
            _check_parts(cfg, info, where)
        check_reusable(run)
    for name, test in study.config.test.items():
        for dataset, info in infos.items():
            _check_test(path, name, test, info, dims[dataset])
    try:  # last: a study refused for another reason leaves no folder behind
        study.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{path}: output_dir: {study.output_dir}: cannot be created ({err.strerror or err})") from None


def _check_output_place(study: Study) -> None:
    """The study's folder must not lie in a folder it reads scans or labels from: its
    files there change the folder's contents, so every run looked stale and was
    predicted and evaluated again on every rerun."""
    from medseg.data.dataset import dataset_place

    out = study.output_dir.resolve()
    for name, test in study.config.test.items():
        for key in ("images", "labels"):
            folder = Path(getattr(test, key)).resolve()
            if out == folder or out.is_relative_to(folder):
                raise ConfigError(f"{study.path}: output_dir: {study.output_dir} lies in test.{name}.{key} "
                                  f"({folder}); put the study's folder elsewhere")
    for dataset in sorted({Path(run.config.data.dataset) for run in study.runs}):
        place = dataset_place(out, dataset)
        if place is not None:
            raise ConfigError(f"{study.path}: output_dir: {study.output_dir} {place} ({dataset}); put the study's "
                              "folder elsewhere")


def _blamed_part(path: Path, study_cfg, name: str, run_raw: dict) -> str:
    """The part of the study a run's config error (``run_raw`` fails to validate) is named
    after: the variant's overrides where they give a failing key, else the study's
    ``set``, else the base config (a bad ``set: {train.batch_size: two}`` was reported as
    every variant's mistake)."""
    variant, variant_overrides = f"{path}: variants.{name}", study_cfg.variants[name]
    try:
        RunConfig.model_validate(run_raw)
        return variant
    except ValidationError as err:
        failing = [tuple(str(p) for p in e["loc"]) for e in err.errors() if e["loc"]]

    def gives(keys: list[tuple[str, ...]]) -> bool:  # a failing key, a section above it, or a key below it
        return any(k[: len(f)] == f or f[: len(k)] == k for k in keys for f in failing)

    if gives(_flat_keys(variant_overrides)):
        return variant
    if gives(_flat_keys(study_cfg.overrides)):
        return f"{path}: set"
    return f"{path}: base: {study_cfg.base}" if failing else variant


def _check_parts(cfg: RunConfig, info, where: str) -> None:
    """What the trainer sets up first, once per variant: device, split, losses, network (all cheap)."""
    from medseg.data.dataset import list_cases, split_cases
    from medseg.losses import build_loss
    from medseg.models import check_forward
    from medseg.runfolder import resolve_device

    try:
        resolve_device(cfg.device)
        root = Path(cfg.data.dataset)
        split_cases(list_cases(root, info), cfg.data.val_fraction, cfg.seed, cfg.data.split_file, root=root)
        build_loss(cfg.losses, info.num_classes, cfg.spatial_dims).check_backends()
        check_forward(cfg.model, cfg.spatial_dims, info.num_channels, info.num_classes, list(cfg.data.patch_size),
                      cfg.train.batch_size)
    except MedsegError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_test(path: Path, name: str, test: TestSet, info, spatial_dims: set[int]) -> None:
    """The scans of a test folder, each with its label file (same name, same ending), of
    the runs' dimension, and each label of its scan's shape and affine (read from the
    headers): what predict and evaluate would otherwise refuse after every run trained."""
    from medseg.data.dataset import cases_from_paths
    from medseg.data.io import ending_of, read_geometry
    from medseg.evaluation.pair import geometry_mismatch

    where = f"{path}: test.{name}"
    if not test.images.is_dir():
        raise ConfigError(f"{where}.images: {test.images}: folder not found")
    if not test.labels.is_dir():
        raise ConfigError(f"{where}.labels: {test.labels}: folder not found")
    try:
        cases = cases_from_paths([test.images], num_channels=info.num_channels)
    except MedsegError as err:
        raise ConfigError(f"{where}.images: {err}") from None
    labels = {case.name: test.labels / f"{case.name}{ending_of(case.image_files[0])}" for case in cases}
    missing = [case for case, label in labels.items() if not label.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{where}.labels: {labels[missing[0]]}: no label for scan '{missing[0]}'{more}")
    # a label without its scan is a case evaluate finds no prediction for: the run failed after training
    endings = {ending_of(case.image_files[0]) for case in cases}
    known = {label.name for label in labels.values()}
    orphans = sorted(f.name for f in test.labels.iterdir()
                     if f.is_file() and not f.name.startswith(".") and ending_of(f) in endings and f.name not in known)
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise ConfigError(f"{where}.labels: {test.labels / orphans[0]}: a label without its scan in {test.images}{more}")
    for case in cases:
        try:
            _, scan = read_geometry(case.image_files[0])
            _, label = read_geometry(labels[case.name])
        except MedsegError as err:
            raise ConfigError(f"{where}: {err}") from None
        if scan.ndim not in spatial_dims:
            runs = " and ".join(f"{d}D" for d in sorted(spatial_dims))
            raise ConfigError(f"{where}.images: {case.image_files[0]}: a {scan.ndim}D scan for the study's {runs} runs")
        mismatch = geometry_mismatch(label, scan, "its scan's", case.image_files[0])
        if mismatch is not None:
            raise ConfigError(f"{where}.labels: {labels[case.name]}: {mismatch}")

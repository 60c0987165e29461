"""``medseg adapt``: adapt a trained run to an unlabelled target domain, into a new run folder.

:func:`run_adaptation` reads the source run (checkpoint, stored config, ``label_stats.json``)
without writing to it, preprocesses the target scans exactly as the source model expects
(the source's transforms and normalisation statistics, see
:mod:`medseg.adaptation.config`), and runs the configured method
(:mod:`~medseg.adaptation.pseudo_label`, :mod:`~medseg.adaptation.mean_teacher`,
:mod:`~medseg.adaptation.sfda`, :mod:`~medseg.adaptation.tent`) for ``adapt.iterations``
optimizer steps on target patches. The steps run in the trainer's own loop
(:func:`medseg.training.loop.run_loop`): the method enters it through the
:class:`~medseg.adaptation.base.Method` seam as an :class:`~medseg.training.loop.Objective`,
and the loop does the step, the loss rows, the evaluations, the checkpoints and the
progress bar exactly as for ``medseg train``; whether a run starts or resumes is decided
by :func:`medseg.runfolder.resume_point`, as for training.

The adapted run folder (``output_dir``)::

    config.yaml            the resolved adaptation config (AdaptConfig)
    source_config.yaml     the run config stored in the adapted checkpoint (the source's,
                           output_dir changed; Tent may add affine: true to the norm)
    provenance.json        source run, checkpoint path and SHA-256, method, target cases,
                           and what ran it (medseg, engine build, torch, device, command;
                           :mod:`medseg.runfolder.provenance`; a resume is appended to ``resumes``)
    label_stats.json       copied from the source run (the prior of a further SFDA)
    metrics.csv            loss rows; target Dice rows (val_dice/*) with target.eval_labels
    target_eval.json       Dice and Betti errors per class before and after (eval_labels only)
    progress.png, tensorboard/, adapt.log
    checkpoints/latest.pt  the adapted model, in the checkpoint format of
                           :mod:`medseg.runfolder.checkpoint`

There is no ``best.pt``: without target labels nothing can choose a best step, and
choosing one with ``eval_labels`` would leak the target labels into the adaptation.
``medseg predict --model RUN`` therefore takes ``latest.pt``. ``--resume`` restores the
student, the optimizer, the method's state (EMA teacher, pseudo-label round and
teacher), the RNG states and the partial loss sums; target patches are a pure function
of ``(seed, sample)``, so the resumed run continues as the uninterrupted one would. A
run killed before its first checkpoint (``adapt.log`` but no ``latest.pt``) is started
again by ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from medseg.adaptation.base import AdaptContext, Method
from medseg.adaptation.config import AdaptConfig, dump_adapt_config, validate_adapt_config
from medseg.adaptation.source import LABEL_STATS, SourceRun, class_prior, ensure_affine_norms, load_source
from medseg.adaptation.target import evaluate, load_target, read_eval_labels
from medseg.atomic import check_output_folder, write_atomic
from medseg.config import ModelConfig, dump_config, validate_config
from medseg.errors import CheckpointError, ConfigError, MedsegError
from medseg.models import build_model
from medseg.runfolder import (
    CHECKPOINT_DIR,
    LATEST,
    LossAverage,
    RunFolderLock,
    attach_console_handler,
    attach_file_handler,
    capture_rng_state,
    check_unchanged,
    detach,
    log_the_end,
    remove_dead_writes,
    resolve_device,
    restore_rng_state,
    resume_point,
    save_checkpoint,
    seed_all,
    write_provenance,
)
from medseg.training.logs import RunLog
from medseg.training.loop import Objective, Progress, Schedule, run_loop

log = logging.getLogger("medseg.adaptation")

TARGET_EVAL = "target_eval.json"
CONFIG_FILE = "config.yaml"
# keys a resumed adaptation may change; everything else must match the checkpoint
_RESUME_FREE = {
    "adapt.checkpoint_interval", "adapt.log_interval", "target.eval_interval", "target.eval_labels", "device",
    "adapt.tent.max_iterations",
}


# --------------------------------------------------------------------------- parts

def _check_resumable(cfg: AdaptConfig, stored: dict[str, Any], done: int, path: Path) -> None:
    """Refuse a resume that changes a key outside ``_RESUME_FREE`` (and ``adapt.iterations``
    for the methods without a curriculum), naming the key and both values."""
    try:  # a key added to the schema since the checkpoint was written gets its default
        stored = validate_adapt_config(stored, source=f"{path} (stored config)").model_dump(mode="json")
    except ConfigError:
        pass
    if cfg.adapt.iterations < done:  # 'resuming at step 6 of 3' went on and said the run was complete
        raise ConfigError(f"adapt.iterations: the config says {cfg.adapt.iterations} but the run is at step {done}; "
                          f"give at least {done}")
    free = set(_RESUME_FREE) | ({"adapt.iterations"} if cfg.adapt.method != "pseudo_label" else set())
    check_unchanged(stored, cfg.model_dump(mode="json"), free, Path(cfg.output_dir) / CONFIG_FILE)


def _adaptation_config(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The adaptation config an adapted run's checkpoint stores."""
    if "adaptation" not in checkpoint:
        raise CheckpointError(f"{path}: not an adapted run (no 'adaptation' entry); resume it with medseg train")
    return checkpoint["adaptation"]["config"]


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, links resolved: through a link either
    way, an output_dir inside the source run was taken and the source run written to."""
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _make_method(ctx: AdaptContext) -> Method:
    method = ctx.cfg.adapt.method
    if method == "pseudo_label":
        from medseg.adaptation.pseudo_label import PseudoLabel

        return PseudoLabel(ctx)
    if method == "mean_teacher":
        from medseg.adaptation.mean_teacher import MeanTeacher

        return MeanTeacher(ctx)
    if method == "sfda":
        from medseg.adaptation.sfda import SFDA

        prior = ctx.cfg.adapt.sfda.prior
        if prior is None:
            stats = ctx.source.label_stats()
            if stats is None:
                raise ConfigError(
                    f"adapt.sfda.prior: not set and the source run has no {LABEL_STATS} (give the class ratios, "
                    "background first, summing to 1)"
                )
            labels = {str(k): int(v) for k, v in ctx.source.payload["dataset"]["labels"].items()}
            prior = class_prior(stats, labels, ctx.num_classes, f"{ctx.source.run_dir or ctx.source.checkpoint_path}/{LABEL_STATS}")
        return SFDA(ctx, prior)
    if method == "tent":
        from medseg.adaptation.tent import Tent

        return Tent(ctx)
    raise AssertionError(method)  # the config's Literal makes this unreachable


def _build_optimizer(params, cfg: AdaptConfig) -> torch.optim.Optimizer:
    a = cfg.adapt
    params = list(params)
    if not params:
        raise ConfigError(f"adapt.method {a.method}: nothing to optimise in this network")
    if a.optimizer == "adam":
        return torch.optim.Adam(params, lr=a.lr, weight_decay=a.weight_decay)
    if a.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    return torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)


def _source_data(cfg: AdaptConfig, source: SourceRun, num_classes: int):
    """The labelled source data through the source run's own training pipeline, checked
    before the run folder is written (another label set, dimension or channel count
    failed at the first step, with messages that did not name ``source_data``)."""
    from medseg.data.dataset import read_dataset_json
    from medseg.training.data import prepare_data

    where = f"source_data.dataset: {cfg.source_data.dataset}"
    try:
        info = read_dataset_json(cfg.source_data.dataset)
        if info.num_classes != num_classes:
            raise ConfigError(f"labels {sorted(info.labels.values())} give {info.num_classes} classes, "
                              f"the source model has {num_classes}")
        raw = source.config.model_dump(mode="json")
        raw["data"]["dataset"] = str(cfg.source_data.dataset)
        raw["data"]["val_fraction"] = 0.0
        raw["data"]["split_file"] = None
        raw["data"]["num_workers"] = 0
        run_cfg = validate_config(raw, source="source_data")
        return prepare_data(run_cfg, preprocessing=source.payload["preprocessing"])
    except MedsegError as err:
        raise ConfigError(f"{where}: {err}") from None


def _source_batches(cfg: AdaptConfig, data, start: int, device: torch.device):
    """Labelled source patches per step (``data``: :func:`_source_data`)."""
    from medseg.training.sampling import loader_batches, patch_loader

    loader = patch_loader(data.train_set, cfg.seed, cfg.source_data.batch_size, start, cfg.adapt.iterations, 0,
                          pin_memory=False)
    for batch in loader_batches(loader):
        yield {k: (v.as_tensor() if hasattr(v, "as_tensor") else v).to(device) if isinstance(v, torch.Tensor) else v
               for k, v in batch.items()}


# --------------------------------------------------------------------------- the run

def run_adaptation(cfg: AdaptConfig, resume: bool = False) -> Path:
    """Adapt as ``cfg`` says; returns the new run folder.

    Raises
    ------
    CheckpointError
        The source run has no (readable) checkpoint; ``resume`` without ``latest.pt`` in a
        folder that holds no started adaptation.
    ConfigError
        ``output_dir`` is the source run (or inside it) or already holds a run without
        ``resume``; a prior of the wrong length; a resumed config that changed.
    DataError
        A target scan with another channel count or dimensionality than the source
        model, an unreadable file, a missing ``eval_labels`` file.
    """
    console = attach_console_handler()
    try:
        run_dir, source_path = _checked_paths(cfg)
        with RunFolderLock(run_dir) as lock:
            return _run(cfg, resume, console, run_dir, source_path, lock)
    except BaseException as err:  # said in adapt.log too (_run adds its file handler to the list)
        log_the_end(console, err, f"medseg adapt {Path(cfg.output_dir) / CONFIG_FILE} --resume")
        raise
    finally:
        detach(console)


def _checked_paths(cfg: AdaptConfig) -> tuple[Path, Path]:
    """(run folder, source run or checkpoint) once both are checked; nothing is written."""
    run_dir = Path(cfg.output_dir)
    source_path = Path(cfg.source_run)
    if not source_path.exists():
        raise CheckpointError(f"source_run {source_path}: no such run folder or checkpoint file")
    # the source run: the folder, or the run of a file in its checkpoints/ folder
    in_checkpoints = source_path.is_file() and source_path.parent.name == CHECKPOINT_DIR
    source_run = source_path.parent.parent if in_checkpoints else source_path
    if _inside(run_dir, source_run):
        raise ConfigError(f"output_dir {run_dir}: is (inside) the source run; the source run is never written to")
    check_output_folder(run_dir, "output_dir")
    from medseg.data.dataset import dataset_place

    # as train refuses it: a run folder among a dataset's scans or labels
    datasets = [("target.dataset", cfg.target.dataset)]
    if cfg.source_data is not None:
        datasets.append(("source_data.dataset", cfg.source_data.dataset))
    for key, dataset in datasets:
        place = dataset_place(run_dir, dataset, key)
        if place is not None:
            raise ConfigError(f"output_dir {run_dir}: {place}; write the run elsewhere")
    return run_dir, source_path


def _run(
    cfg: AdaptConfig, resume: bool, handlers: list[logging.Handler], run_dir: Path, source_path: Path, lock: RunFolderLock
) -> Path:
    latest = run_dir / CHECKPOINT_DIR / LATEST
    checkpoint = resume_point(run_dir, resume, "adapt.log", check=partial(_check_resumable, cfg),
                              config_of=_adaptation_config, config_file=CONFIG_FILE)

    # Everything that can fail on user input happens before the run folder is touched.
    from medseg.inference.predictor import Predictor

    source = load_source(source_path)
    if checkpoint is not None and checkpoint["adaptation"]["provenance"]["source_checkpoint_sha256"] != source.sha256:
        raise CheckpointError(f"{source.checkpoint_path}: changed since this adaptation started (SHA-256 differs)")
    device = resolve_device(cfg.device)
    predictor = Predictor(source.payload, device, source=str(source.checkpoint_path))
    if predictor.output_activation != "softmax":
        # every method reads the outputs as a softmax distribution over the classes
        # (confidences, entropies, class ratios): a regression's tanh maps or a multi-label
        # head's sigmoids through a softmax are numbers the model was not trained to give
        kind = ("a regression of signed maps (SAUNA alone: tanh outputs)" if predictor.output_activation == "tanh"
                else "a multi-label head (loss terms with sigmoid: true)")
        raise ConfigError(f"source_run: {source.checkpoint_path} was trained as {kind}; adapt's methods read the "
                          "outputs as a softmax over the classes, so they take models trained with softmax losses")
    dims = predictor.spatial_dims
    patch = list(cfg.adapt.patch_size or source.config.data.patch_size)
    if len(patch) != dims:
        raise ConfigError(f"adapt.patch_size: {patch} has {len(patch)} values, the source model is {dims}D")
    # a patch size the network cannot take, or one patch a step where it has BatchNorm,
    # failed at the first step, after the run folder was written
    from medseg.models import check_forward

    try:
        check_forward(ModelConfig.model_validate(source.payload["config"]["model"]), dims,
                      predictor.info.num_channels, predictor.num_classes, patch, cfg.adapt.batch_size,
                      "adapt.batch_size")
    except ConfigError as err:
        if str(err).startswith("adapt.batch_size") or cfg.adapt.patch_size is None:
            raise
        raise ConfigError(f"adapt.patch_size: {patch}: {err}") from None
    scans = load_target(Path(cfg.target.dataset), cfg.target.subset, predictor, patch)
    references = None
    if cfg.target.eval_labels is not None:
        references = read_eval_labels(Path(cfg.target.eval_labels), scans, _ending(scans[0]),
                                      declared=set(predictor.info.labels.values()))
    num_classes = predictor.num_classes
    in_channels = predictor.info.num_channels
    source_patch = list(source.config.data.patch_size)

    def build(model_json: dict[str, Any]) -> torch.nn.Module:
        m = build_model(ModelConfig.model_validate(model_json), dims, in_channels, num_classes, source_patch)
        # Adaptation trains on the final output only: a DynUNet trained with deep
        # supervision keeps its heads (same state dict) but returns one output.
        if getattr(m, "deep_supervision", False):
            m.deep_supervision = False
        return m

    model_json = source.payload["config"]["model"]
    seed_all(cfg.seed)  # a resume restores the checkpoint's states instead
    student = build(model_json)
    student.load_state_dict(source.state_dict)
    strict = True
    if cfg.adapt.method == "tent":
        student, model_json = ensure_affine_norms(student, model_json, cfg.adapt.tent.enable_affine, build)
        strict = model_json == source.payload["config"]["model"]
    student.to(device).train()
    run_config = dict(source.payload["config"], output_dir=str(run_dir), model=model_json)
    validate_config(run_config, source="adapted run config")

    def fresh() -> torch.nn.Module:
        m = build(model_json)
        m.load_state_dict(source.state_dict, strict=strict)
        return m.to(device).train()

    ctx = AdaptContext(cfg, source, predictor, scans, patch, num_classes, device, fresh)
    source_data = None
    if cfg.source_data is not None:
        from medseg.losses import build_loss

        source_data = _source_data(cfg, source, num_classes)
        ctx.source_loss = build_loss(source.config.losses, num_classes).to(device)
    method = _make_method(ctx)
    student = method.prepare_model(student)
    objective = _Adapting(cfg, ctx, method, student, run_dir, references, dict(predictor.info.foreground_labels))
    objective.source_data = source_data
    ctx.reset_optimizer = objective.reset_optimizer

    provenance = {
        "method": cfg.adapt.method,
        "source_run": os.path.abspath(source_path),
        "source_checkpoint": os.path.abspath(source.checkpoint_path),
        "source_checkpoint_sha256": source.sha256,
        "source_iteration": int(source.payload.get("iteration", 0)),
        "target_dataset": os.path.abspath(cfg.target.dataset),
        "target_subset": cfg.target.subset,
        "target_cases": [s.name for s in scans],
        "preprocessing": "source (statistics of the source training set, unchanged)",
        "config": cfg.model_dump(mode="json"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    progress = Progress(loss_terms=list(method.loss_terms))
    if checkpoint is not None:
        try:
            student.load_state_dict(checkpoint["adaptation"]["student"])
            objective.optimizer.load_state_dict(checkpoint["optimizer"])
            method.load_state_dict(checkpoint["adaptation"]["method_state"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{latest}: does not match this adaptation ({str(err).splitlines()[0]})") from None
        provenance = checkpoint["adaptation"]["provenance"]
        progress = Progress(iteration=int(checkpoint["iteration"]), average=LossAverage(checkpoint.get("loss_average")),
                            loss_terms=progress.loss_terms)
        objective.before = checkpoint["adaptation"].get("before")

    lock.take(fresh=not resume)  # one process at a time in the folder, from its first write on
    remove_dead_writes(run_dir)
    handlers += attach_file_handler(run_dir / "adapt.log")
    if checkpoint is None:
        write_atomic(run_dir / CONFIG_FILE, dump_adapt_config(cfg))
        write_atomic(run_dir / "source_config.yaml", dump_config(validate_config(run_config)))
        # the adaptation's keys and the build record, also kept in every checkpoint
        provenance = write_provenance(run_dir, device, extra=provenance)
        if source.folder is not None:
            _copy_label_stats(source.folder / LABEL_STATS, run_dir / LABEL_STATS)
    else:
        write_provenance(run_dir, device, extra=provenance, resumed_at=progress.iteration)
        restore_rng_state(checkpoint["rng"])
        log.info("resuming %s at step %d of %d", run_dir, progress.iteration, cfg.adapt.iterations)

    def payload() -> dict[str, Any]:
        return {
            "iteration": progress.iteration,
            "config": run_config,
            "dataset": source.payload["dataset"],
            "preprocessing": source.payload["preprocessing"],
            "network": source.payload.get("network"),
            "split": source.payload.get("split"),
            "model": method.model_for_output(student).state_dict(),
            "optimizer": objective.optimizer.state_dict(),
            "scheduler": None,
            "scaler": None,
            "rng": capture_rng_state(),
            "best_metric": None,
            "best_iteration": None,
            "loss_average": progress.average.state(),
            "loss_terms": progress.loss_terms,
            "adaptation": {
                "provenance": provenance,
                "config": cfg.model_dump(mode="json"),
                "student": student.state_dict(),
                "method_state": method.state_dict(),
                "before": objective.before,
            },
        }

    objective.payload = payload
    class_values = objective.class_values
    runlog = RunLog(run_dir, progress.loss_terms, list(class_values),
                    resume_iteration=progress.iteration if checkpoint is not None else None)
    try:
        if checkpoint is None and references is not None:
            objective.before = evaluate(predictor, predictor.model, scans, references, class_values)
            _log_eval("before adaptation", objective.before)
            runlog.add_row(0, cfg.adapt.lr, math.nan, {}, _dice_list(objective.before, class_values))
        a = cfg.adapt
        schedule = Schedule(total=a.iterations, log_interval=a.log_interval, checkpoint_interval=a.checkpoint_interval,
                            eval_interval=cfg.target.eval_interval if references is not None else None,
                            grad_clip=a.grad_clip)
        run_loop(objective, progress, schedule, run_dir, list(class_values), runlog=runlog)
        if references is not None:
            after = objective.after or evaluate(predictor, method.model_for_output(student), scans, references, class_values)
            _log_eval("after adaptation", after)
            write_atomic(run_dir / TARGET_EVAL, json.dumps({"before": objective.before, "after": after}, indent=2) + "\n")
    finally:
        runlog.draw()
        runlog.close()
    return run_dir


class _Adapting(Objective):
    """An adaptation :class:`~medseg.adaptation.base.Method` as the objective of the one
    training loop (:func:`medseg.training.loop.run_loop`): per step the method's
    ``before_step`` (a pseudo-label round), its ``loss`` on target patches (and labelled
    source patches with ``source_data``), then its ``after_step`` (the EMA teacher).
    Evaluated on the target (``target.eval_labels`` only) every ``target.eval_interval``
    steps and at the end."""

    bar_label = "adapt"

    def __init__(self, cfg: AdaptConfig, ctx: AdaptContext, method: Method, student: torch.nn.Module, run_dir: Path,
                 references: Any, class_values: dict[str, int]) -> None:
        self.cfg, self.ctx, self.method, self.student, self.run_dir = cfg, ctx, method, student, run_dir
        self.references, self.class_values = references, class_values
        self.source_data = None  # the prepared labelled source data (source_data), set by the runner
        self.device = ctx.device
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.optimizer = _build_optimizer(method.trainable_parameters(student), cfg)
        self.before: dict[str, Any] | None = None  # target scores of the source model
        self.after: dict[str, Any] | None = None  # ... and of the adapted one, at the last step
        self.payload = None  # the checkpoint's contents, set by the runner

    def reset_optimizer(self) -> None:
        """A fresh optimizer (a new pseudo-label round starts from a fresh state)."""
        self.optimizer = _build_optimizer(self.method.trainable_parameters(self.student), self.cfg)

    def batches(self, start: int, total: int):
        if self.cfg.source_data is None:
            yield from super().batches(start, total)
        else:
            yield from _source_batches(self.cfg, self.source_data, start, self.device)

    def before_step(self, iteration: int) -> None:
        self.method.before_step(self.student, iteration)

    def loss(self, batch: dict | None, iteration: int):
        return self.method.loss(self.student, iteration, batch)

    def after_step(self, iteration: int) -> None:
        self.method.after_step(self.student, iteration)

    def clip_parameters(self):
        return self.method.trainable_parameters(self.student)

    def loss_terms(self) -> list[str]:
        return list(self.method.loss_terms)

    def diverged(self, what: str, step: int) -> str:
        return f"the adaptation {what} at step {step}; lower adapt.lr"

    def evaluate(self, iteration: int) -> list[float] | None:
        if self.references is None:
            return None
        ctx = self.ctx
        result = evaluate(ctx.predictor, self.method.model_for_output(self.student), ctx.scans, self.references,
                          self.class_values)
        if iteration == self.cfg.adapt.iterations:
            self.after = result
        else:
            _log_eval(f"at step {iteration}", result)
        return _dice_list(result, self.class_values)

    def save_latest(self) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_DIR / LATEST, self.payload())

    def start_message(self, start: int, total: int) -> str:
        a, ctx = self.cfg.adapt, self.ctx
        return (f"adapting with {a.method} on {ctx.device} for steps {start + 1}-{total}, {len(ctx.scans)} target "
                f"scan(s), batch {a.batch_size}, patch {'x'.join(map(str, ctx.patch))}")

    def end_message(self, progress: Progress) -> str:
        return f"adapted run {self.run_dir}"


def _copy_label_stats(source: Path, target: Path) -> None:
    """The source run's ``label_stats.json`` into the adapted run (atomically); an unreadable
    one is not copied (a method that needs it has refused to start already)."""
    if not source.is_file():
        return
    try:
        data = source.read_bytes()
        json.loads(data)
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s), not copied into the adapted run", source, err)
        return
    write_atomic(target, data)


def _ending(scan) -> str:
    from medseg.data.io import ending_of

    return ending_of(scan.case.image_files[0])


def _dice_list(result: dict[str, Any], class_values: dict[str, int]) -> list[float]:
    return [result["mean"][name]["dice"] for name in class_values]


def _log_eval(what: str, result: dict[str, Any]) -> None:
    parts = [f"{n} Dice {v['dice']:.4f} Betti error {v['betti_error']:.2f}" for n, v in result["mean"].items()]
    log.info("target %s: %s", what, "; ".join(parts))

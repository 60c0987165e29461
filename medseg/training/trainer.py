"""``medseg train``: a training run composed from small parts.

:func:`run_training` wires together :mod:`medseg.training.data` (the preprocessing
cache, filled first where needed by :mod:`medseg.preprocessing`),
:func:`medseg.models.build_model`, :func:`medseg.losses.build_loss`,
:mod:`medseg.training.optim` (optimizer, per-iteration LR schedule),
:mod:`medseg.training.sampling` (patches as a pure function of seed and iteration),
:mod:`medseg.training.validation` (sliding-window Dice) and
:mod:`medseg.training.logs` (``metrics.csv``, TensorBoard, ``progress.png``), and runs
them in :mod:`medseg.training.loop`, the one optimisation loop ``medseg adapt`` runs too
(the supervised loss is its :class:`~medseg.training.loop.Objective`).

The run folder (``output_dir``)::

    config.yaml           the resolved config
    label_stats.json      class-ratio statistics of the training labels
    metrics.csv           one row per log interval / validation
    progress.png          loss curves and validation Dice
    train.log             the log lines
    provenance.json       what made the run: medseg, engine build, torch, device, command
                          (:mod:`medseg.runfolder.provenance`; a resume is appended to ``resumes``)
    tensorboard/          SummaryWriter events
    checkpoints/latest.pt every train.checkpoint_interval steps, at the end, and just
                          before each best.pt (which it then names: best_iteration)
    checkpoints/best.pt   best mean validation Dice so far

``--resume`` restores model, optimizer, scheduler, AMP scaler, RNG states, the
iteration, the best metric and the partial loss averages from ``latest.pt``, drops the
``metrics.csv`` rows written after it, and continues; patches are a function of
``(seed, iteration)``, so on the CPU the resumed run ends with exactly the parameters of
an uninterrupted one. A resumed config may change only the keys of
:data:`medseg.config.RESUME_MAY_CHANGE` (``train.iterations``, the intervals, workers,
``inference``, ``device``; the table is in :class:`medseg.config.TrainConfig`); any other
change is refused, naming the key and both values, before the run folder is touched. A
changed ``train.iterations`` recomputes the LR schedule for the new total from the resumed
step on. ``config.yaml`` is rewritten (atomically, as every file of the run folder) only
when a resume changed it; a missing or unreadable ``label_stats.json`` is rewritten from
the preprocessing cache. A run killed before its first checkpoint (``train.log`` but no
``latest.pt``) has trained nothing: ``--resume`` starts it again (its ``config.yaml``, if
written, is held to the same rule), and the temporaries of killed writers are removed.

Under ``torchrun`` (:mod:`medseg.distributed`) the same function trains with
:class:`~torch.nn.parallel.DistributedDataParallel`: ``train.batch_size`` is the global
batch, split evenly over the ranks (rank ``r`` of ``N`` makes samples ``r, r + N, ...``
of each iteration, :mod:`medseg.training.sampling`); each rank's loss is the mean over
its local batch and DDP averages the gradients, so a step is the step one process takes
on the whole batch. The logged loss is the mean over ranks, validation cases are
sharded and their Dice sums all-reduced. Rank 0 alone logs, draws the progress bar and
writes the run folder (checkpoints hold the unwrapped model's state dict, readable by a
single process); the others wait for its writes. ``--resume`` loads ``latest.pt`` on
every rank. Batch-coupled computations do not split: a loss with ``batch: true``
(batch Dice) or a BatchNorm network sees only the local batch on each rank.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from medseg import distributed
from medseg.atomic import check_output_folder, file_stamp_or_none, write_atomic
from medseg.config import RESUME_MAY_CHANGE, RunConfig, dump_config, validate_config
from medseg.data.dataset import dataset_place, read_dataset_json
from medseg.errors import CheckpointError, ConfigError
from medseg.losses import build_loss, deep_supervision_loss
from medseg.losses.deep_supervision import is_deep_supervision_output
from medseg.models import build_model, check_forward
from medseg.runfolder import (
    BEST,
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
from medseg.training.data import TrainingData, prepare_data
from medseg.training.logs import mean_dice
from medseg.training.loop import Objective, Progress, Schedule, run_loop
from medseg.training.optim import build_optimizer, build_scheduler, lr_factor
from medseg.training.sampling import loader_batches, local_batch_size, patch_loader
from medseg.training.validation import validate

log = logging.getLogger("medseg.training")

CONFIG_FILE = "config.yaml"
LABEL_STATS = "label_stats.json"


# --------------------------------------------------------------------------- small parts

def _check_resumable(cfg: RunConfig, stored: dict[str, Any], done: int, path: Path) -> None:
    """Refuse a resume that changes a key outside :data:`~medseg.config.RESUME_MAY_CHANGE`
    (one line: the key and both values), or ends the run before its checkpoint (step ``done``)."""
    try:  # a key added to the schema since the checkpoint was written gets its default
        stored = validate_config(stored, source=f"{path} (stored config)").model_dump(mode="json")
    except ConfigError:
        pass
    check_unchanged(stored, cfg.model_dump(mode="json"), RESUME_MAY_CHANGE, Path(cfg.output_dir) / CONFIG_FILE)
    if cfg.train.iterations < done:
        raise ConfigError(
            f"train.iterations: the config says {cfg.train.iterations}, but {path} is at iteration {done}; "
            "a resume may extend a run or end it sooner, not before its checkpoint"
        )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.as_tensor() if hasattr(value, "as_tensor") else value
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- the run

def run_training(cfg: RunConfig, resume: bool = False) -> Path:
    """Train as ``cfg`` says; returns the run folder.

    Raises
    ------
    ConfigError
        Bad model parameters or a patch size the network cannot take; ``output_dir`` (or a
        folder above it) is a file; ``output_dir`` already holds a run and ``resume`` is false; a resumed config changed a key
        outside :data:`~medseg.config.RESUME_MAY_CHANGE` or ends before the checkpoint.
    DataError
        A dataset problem (named file), found before anything is written.
    CheckpointError
        ``resume`` without ``checkpoints/latest.pt`` in a folder that holds no started run,
        or an unreadable checkpoint.
    MedsegError
        Under torchrun: the step failed on another rank (that rank reports its error).
    """
    # a file in the way would otherwise fail only where the run folder is first written, after the data
    check_output_folder(cfg.output_dir, "output_dir")
    place = dataset_place(cfg.output_dir, cfg.data.dataset)
    if place is not None:
        raise ConfigError(f"output_dir {cfg.output_dir}: {place}; write the run elsewhere")
    device = distributed.device_for_rank(resolve_device(cfg.device))
    with distributed.process_group(device), RunFolderLock(cfg.output_dir, enabled=distributed.is_main()) as lock:
        handlers = attach_console_handler()
        try:
            return _run(cfg, resume, handlers, lock)
        except BaseException as err:  # said in train.log too (_run adds its file handler to the list)
            log_the_end(handlers, err, f"medseg train {Path(cfg.output_dir) / CONFIG_FILE} --resume")
            raise
        finally:
            detach(handlers)


@dataclass
class _Parts:
    """What a run trains and how: built from the config, restored from a checkpoint."""

    cfg: RunConfig
    data: TrainingData
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    # What the training step calls: the DistributedDataParallel wrapper of ``model``
    # under torchrun, else None (``model`` itself). Checkpoints always store ``model``.
    train_model: torch.nn.Module | None = None
    # per case of the split, a digest of its files' names, sizes and times (_data_files)
    data_files: dict[str, str] | None = None


def _build_parts(cfg: RunConfig, checkpoint: dict[str, Any] | None) -> _Parts:
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest kernels
    device = distributed.device_for_rank(resolve_device(cfg.device))
    amp = bool(cfg.train.amp and device.type == "cuda")
    # the model and loss first: a config mistake shows before a long preprocessing
    info = read_dataset_json(cfg.data.dataset)
    seed_all(cfg.seed)
    model = build_model(cfg.model, cfg.spatial_dims, info.num_channels, info.num_classes, list(cfg.data.patch_size))
    check_forward(cfg.model, cfg.spatial_dims, info.num_channels, info.num_classes, list(cfg.data.patch_size),
                  local_batch_size(cfg.train.batch_size, distributed.world_size()))
    loss_fn = build_loss(cfg.losses, info.num_classes, cfg.spatial_dims)
    loss_fn.check_backends()
    data = prepare_data(cfg, preprocessing=checkpoint["preprocessing"] if checkpoint else None,
                        split=_stored_split(checkpoint))
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(model.parameters(), cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, cfg.train.iterations)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return _Parts(cfg, data, model, loss_fn, optimizer, scheduler, scaler, device, amp, data_files=_data_files(data))


def _stored_split(checkpoint: dict[str, Any] | None) -> dict[str, list[str]] | None:
    """A resumed run's split, kept by the resume (None: a fresh run, or a checkpoint
    without a readable one)."""
    split = (checkpoint or {}).get("split")
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        return None
    return {"train": [str(n) for n in split["train"]], "val": [str(n) for n in split["val"]]}


def _data_files(data: TrainingData) -> dict[str, str]:
    """Per case of the run (training and validation), a digest of its files' names, sizes
    and modification times (of the fingerprint the preprocessing cache was keyed by): kept
    in every checkpoint, so that a resume can tell that the data changed under the run.
    Not their inodes and status-change times: a dataset copied with its times (``cp -p``
    to a node's scratch disk before each resume) holds the same data."""
    import hashlib

    cases = data.cache.fingerprint.get("cases", {})
    return {case: hashlib.sha256(json.dumps([e[:3] for e in entries]).encode()).hexdigest()[:16]
            for case, entries in cases.items()}


def _warn_where_the_resume_differs(parts: _Parts, checkpoint: dict[str, Any], path: Path) -> None:
    """A resume on data that changed since the checkpoint goes on (a copy or a touch
    changes the times too), but says so, naming what changed: before, a run resumed on
    other data in silence (the split is the checkpoint's, prepare_data). Likewise a
    resume with another number of torchrun processes."""
    stored, now = checkpoint.get("data_files"), parts.data_files or {}
    if not isinstance(stored, dict):
        return  # a checkpoint of an older medseg
    added, removed = sorted(set(now) - set(stored)), sorted(set(stored) - set(now))
    modified = sorted(c for c in set(now) & set(stored) if now[c] != stored[c])
    what = [f"{len(names)} case(s) {verb} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for names, verb in ((added, "added"), (removed, "removed"), (modified, "whose files changed")) if names]
    if what:
        log.warning("%s: the dataset changed since %s: %s; training goes on with the data as it is now",
                    parts.cfg.data.dataset, path, "; ".join(what))
    then = checkpoint.get("world_size")
    if isinstance(then, int) and then != distributed.world_size():
        # the batch is split over another number of processes: the gradients' sums run in
        # another order (a checkpoint of an older medseg has no world_size: nothing to say)
        log.warning("%s was written by %d process(es), this resume runs %d: the run goes on, but it will differ "
                    "from an uninterrupted one by float rounding", path, then, distributed.world_size())


def _payload(parts: _Parts, progress: Progress) -> dict[str, Any]:
    """The checkpoint (format in :mod:`medseg.runfolder.checkpoint`)."""
    cfg, data, info = parts.cfg, parts.data, parts.data.info
    return {
        "iteration": progress.iteration,
        "config": cfg.model_dump(mode="json"),
        "dataset": info.to_json(),
        "preprocessing": data.preprocessing,
        "network": {
            "spatial_dims": cfg.spatial_dims,
            "in_channels": info.num_channels,
            "out_channels": info.num_classes,
            "patch_size": list(cfg.data.patch_size),
        },
        "split": {"train": [c.name for c in data.train_cases], "val": [c.name for c in data.val_cases]},
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.amp else None,
        "rng": capture_rng_state(),
        "best_metric": progress.best_metric,
        "best_iteration": progress.best_iteration,
        "loss_average": progress.average.state(),
        "loss_terms": progress.loss_terms,
        "data_files": parts.data_files,
        "world_size": distributed.world_size(),
    }


def _restore(parts: _Parts, checkpoint: dict[str, Any], path: Path) -> Progress:
    """Load the state dicts (RNG states are restored last, just before training)."""
    try:
        parts.model.load_state_dict(checkpoint["model"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            parts.scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: does not match this model ({str(err).splitlines()[0]})") from None
    # The next step's LR as the scheduler computes it (the same value unless train.iterations
    # changed: then the checkpoint holds the old schedule's, this is the new total's).
    tc = parts.cfg.train
    factor = lr_factor(parts.scheduler.last_epoch, tc.iterations, tc.scheduler)
    before = parts.optimizer.param_groups[0]["lr"]
    for group, base_lr in zip(parts.optimizer.param_groups, parts.scheduler.base_lrs):
        group["lr"] = base_lr * factor
    stored_total = ((checkpoint.get("config") or {}).get("train") or {}).get("iterations")
    now = parts.optimizer.param_groups[0]["lr"]
    if isinstance(stored_total, int) and stored_total != tc.iterations and now != before and distributed.is_main():
        # allowed (a run extended or ended sooner), said: the schedule is not the one it started with
        log.warning(
            "train.iterations changed from %d to %d on resume: the learning rate's %s schedule now runs to "
            "iteration %d (next step's lr %.3g, was %.3g)", stored_total, tc.iterations, tc.scheduler.name,
            tc.iterations, now, before,
        )
    return Progress(
        iteration=int(checkpoint["iteration"]),
        best_metric=checkpoint.get("best_metric"),
        best_iteration=checkpoint.get("best_iteration"),
        average=LossAverage(checkpoint.get("loss_average")),
        loss_terms=checkpoint.get("loss_terms"),
    )


def _check_world_size(cfg: RunConfig) -> None:
    world = distributed.world_size()
    try:
        local_batch_size(cfg.train.batch_size, world)
    except ValueError:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is the global batch and must be a multiple of the "
            f"{world} processes torchrun started"
        ) from None


def _wrap_for_training(parts: _Parts) -> None:
    """DistributedDataParallel around the model under torchrun (it broadcasts rank 0's weights)."""
    if not distributed.is_distributed():
        return
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [parts.device.index] if parts.device.type == "cuda" else None
    parts.train_model = DistributedDataParallel(parts.model, device_ids=device_ids)


def _run(cfg: RunConfig, resume: bool, handlers: list[logging.Handler], lock: RunFolderLock) -> Path:
    run_dir = Path(cfg.output_dir)
    latest_path = run_dir / CHECKPOINT_DIR / LATEST
    # Every rank checks and builds before rank 0 writes anything (the rank check of an
    # existing run folder must not see rank 0's fresh files).
    with distributed.synchronized("setting up the run"):
        _check_world_size(cfg)
        stamp = file_stamp_or_none(latest_path)  # before it is read: compared once the folder is locked
        checkpoint = resume_point(run_dir, resume, "train.log", check=partial(_check_resumable, cfg))

        # Everything that can fail on user input happens before the run folder is touched.
        parts = _build_parts(cfg, checkpoint)
        progress = _restore(parts, checkpoint, latest_path) if checkpoint is not None else Progress()
        if checkpoint is not None and distributed.is_main():
            _warn_where_the_resume_differs(parts, checkpoint, latest_path)
    _wrap_for_training(parts)

    with distributed.main_process("writing the run folder") as main:
        if main:
            lock.take(fresh=not resume)  # one process at a time in the folder, from its first write on
            if checkpoint is not None and file_stamp_or_none(latest_path) != stamp:
                # read while another process still trained the run, which then finished and
                # let go: resumed from the old checkpoint, the run trained its last steps
                # again over the finished run's checkpoints
                raise ConfigError(f"{latest_path}: changed while this resume started (another process trained "
                                  "the run meanwhile); run the command again to resume from where it is now")
            remove_dead_writes(run_dir)
            handlers += attach_file_handler(run_dir / "train.log")
            if checkpoint is not None:
                _complete_best(run_dir, checkpoint, latest_path)
            write_provenance(run_dir, parts.device, resumed_at=progress.iteration if checkpoint is not None else None)
            _write_config(run_dir / CONFIG_FILE, cfg)
            _write_label_stats(run_dir / LABEL_STATS, parts.data, resumed=checkpoint is not None)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])
        log.info("resuming %s at iteration %d of %d", run_dir, progress.iteration, cfg.train.iterations)
    if distributed.is_main():
        _warn_of_unfinished_ramps(cfg)
    _train_loop(parts, progress, run_dir)
    return run_dir


def _warn_of_unfinished_ramps(cfg: RunConfig) -> None:
    """Say which loss terms' ramps end after the run (``start: 0.9, ramp: 0.5``): their
    weight never reaches what the config gives. Allowed (a run shortened on purpose), but
    said once here, at the start of a training, not at every validation of the config."""
    total = cfg.train.iterations
    for i, term in enumerate(cfg.losses):
        first, length = term.schedule(total)
        if length > 0 and first + length > total:
            reached = (total - first) / length
            log.warning("losses[%d] (%s): its ramp ends at iteration %d, after the run's %d: its weight reaches "
                        "only %.0f %% of %g", i, term.name, first + length, total, 100 * reached, term.weight)


def _write_config(path: Path, cfg: RunConfig) -> None:
    """``config.yaml`` (atomically); left as it is when a resume did not change it."""
    text = dump_config(cfg)
    try:
        if path.read_text() == text:
            return
    except (OSError, ValueError):
        pass
    write_atomic(path, text)


def _write_label_stats(path: Path, data: TrainingData, resumed: bool) -> None:
    """``label_stats.json`` from the raw label histograms the cache keeps (no label file is
    read again); a resumed run rewrites it only when it is missing or unreadable."""
    if resumed:
        try:
            json.loads(path.read_text())
            return
        except FileNotFoundError:
            log.warning("%s: missing, writing it from the preprocessing cache", path)
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s), writing it again from the preprocessing cache", path, err)
    stats = data.cache.label_statistics([c.name for c in data.train_cases], data.info)
    write_atomic(path, json.dumps(stats, indent=2))


def _complete_best(run_dir: Path, checkpoint: dict[str, Any], latest_path: Path) -> None:
    """``best.pt`` of a run stopped between the two files of an improving step: its
    ``latest.pt`` names its own step as the best, and is what ``best.pt`` holds there
    (the same payload), so it is copied (:meth:`_Supervised.evaluated` writes them in
    that order)."""
    import shutil

    from medseg.atomic import atomic_path
    from medseg.runfolder.checkpoint import load_checkpoint

    step = checkpoint.get("iteration")
    if checkpoint.get("best_iteration") is None or checkpoint.get("best_iteration") != step:
        return
    best = run_dir / CHECKPOINT_DIR / BEST
    try:
        if best.is_file() and load_checkpoint(best).get("iteration") == step:
            return
    except CheckpointError:
        pass  # unreadable: written again below
    with atomic_path(best) as tmp:
        shutil.copyfile(latest_path, tmp)
    log.warning("%s: written again from %s (the run stopped between the two at iteration %d)", best, latest_path, step)


def _save(path: Path, parts: _Parts, progress: Progress) -> None:
    """Rank 0 writes the checkpoint; under torchrun the other ranks wait for it."""
    with distributed.main_process(f"saving {path}") as main:
        if main:
            save_checkpoint(path, _payload(parts, progress))


class _Supervised(Objective):
    """Supervised training for :func:`~medseg.training.loop.run_loop`: the run's loss on
    patch batches of the training set, validated by sliding-window Dice, ``best.pt`` on
    the best mean Dice."""

    def __init__(self, parts: _Parts, progress: Progress, run_dir: Path) -> None:
        self.parts, self.progress, self.run_dir = parts, progress, run_dir
        self._latest_at: int | None = None  # the step latest.pt was last written at
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.amp, self.device = parts.amp, parts.device
        # what the step calls: the DistributedDataParallel wrapper under torchrun
        self.model = parts.train_model if parts.train_model is not None else parts.model

    def batches(self, start: int, total: int):
        cfg = self.parts.cfg
        loader = patch_loader(
            self.parts.data.train_set, cfg.seed, cfg.train.batch_size, start, total, cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", rank=distributed.rank(), world_size=distributed.world_size(),
        )
        for batch in loader_batches(loader):
            yield _to_device(batch, self.device)

    def before_step(self, iteration: int) -> None:
        self.parts.loss_fn.set_iteration(iteration, self.parts.cfg.train.iterations)  # the terms' schedules

    def loss(self, batch: dict[str, Any], iteration: int):
        logits = self.model(batch["image"])
        if is_deep_supervision_output(logits, batch["image"]):  # DynUNet deep_supervision: true
            return deep_supervision_loss(self.parts.loss_fn, logits, batch["label"], batch=batch)
        return self.parts.loss_fn(logits, batch["label"], batch=batch)

    def clip_parameters(self):
        return self.model.parameters()

    def loss_terms(self) -> list[str]:
        return list(self.parts.loss_fn.names)

    def diverged(self, what: str, step: int) -> str:
        # a resume repeats the same steps with the same learning rate (it refuses another)
        return (f"the {what} at iteration {step} (training diverged); lower train.optimizer.lr (or set "
                f"train.grad_clip) and train again into a new output_dir")

    def evaluate(self, iteration: int) -> list[float] | None:
        parts = self.parts
        if not parts.data.val_items:
            return None
        return validate(parts.model, parts.data.val_items, parts.cfg, parts.data.info.num_classes, parts.device, parts.amp)

    def evaluated(self, iteration: int, loss: float, lr: float, dice: list[float] | None, rate: float) -> None:
        if _report_validation(self.parts, self.progress, iteration, loss, lr, dice, rate):
            # latest.pt first: every best.pt then has a latest.pt of its step or later, which
            # names it (best_iteration). A best.pt written first, as before, stood alone
            # when the run was killed between the two, or when validation ran before the
            # first checkpoint: the resume was refused for good ("latest.pt missing") or
            # went on from an earlier latest.pt beside a best.pt of steps it then redid.
            self.save_latest()
            _save(self.run_dir / CHECKPOINT_DIR / BEST, self.parts, self.progress)

    def save_latest(self) -> None:
        if self._latest_at == self.progress.iteration:  # written with this step's best.pt
            return
        _save(self.run_dir / CHECKPOINT_DIR / LATEST, self.parts, self.progress)
        self._latest_at = self.progress.iteration

    def start_message(self, start: int, total: int) -> str:
        cfg, parts, world = self.parts.cfg, self.parts, distributed.world_size()
        params = sum(p.numel() for p in parts.model.parameters()) / 1e6
        patch = "x".join(str(p) for p in cfg.data.patch_size)
        ranks = (f", {world} processes of batch {cfg.train.batch_size // world} ({distributed.backend_name()})"
                 if world > 1 else "")
        return (f"training {cfg.model.name} ({cfg.spatial_dims}D, {params:.2f}M parameters) on {parts.device}"
                f"{' with AMP' if parts.amp else ''} for iterations {start + 1}-{total}, batch {cfg.train.batch_size}, "
                f"patch {patch}{ranks}")

    def end_message(self, progress: Progress) -> str:
        best = progress.best_metric
        best_text = "n/a" if best is None else f"{best:.4f} at iteration {progress.best_iteration}"
        return f"best mean val Dice {best_text}; run folder {self.run_dir}"


def _train_loop(parts: _Parts, progress: Progress, run_dir: Path) -> None:
    tc = parts.cfg.train
    schedule = Schedule(total=tc.iterations, log_interval=tc.log_interval, checkpoint_interval=tc.checkpoint_interval,
                        eval_interval=tc.val_interval, grad_clip=tc.grad_clip)
    parts.model.train()
    run_loop(_Supervised(parts, progress, run_dir), progress, schedule, run_dir, list(parts.data.info.foreground_labels))


def _report_validation(
    parts: _Parts, progress: Progress, iteration: int, loss: float, lr: float, dice: list[float] | None, rate: float,
) -> bool:
    """One log line per validation; whether the mean Dice improved (``progress`` then
    holds it as the best)."""
    total = parts.cfg.train.iterations
    if dice is None:
        log.info("iteration %d/%d  loss %.4f  lr %.3g  (no validation cases)  (%.2f it/s)", iteration, total, loss, lr, rate)
        return False
    score = mean_dice(dice)
    improved = not math.isnan(score) and (progress.best_metric is None or score > progress.best_metric)
    if improved:
        progress.best_metric, progress.best_iteration = score, iteration
    names = list(parts.data.info.foreground_labels)
    per_class = " ".join(f"{n}={d:.4f}" for n, d in zip(names, dice))
    log.info(
        "iteration %d/%d  loss %.4f  lr %.3g  val Dice %s  mean %.4f%s  (%.2f it/s)",
        iteration, total, loss, lr, per_class, score, "  *best*" if improved else "", rate,
    )
    return improved

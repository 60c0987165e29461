"""``medseg train``: a training run composed from small parts.

:func:`run_training` wires together :mod:`medseg.training.data` (the preprocessing
cache, filled first where needed by :mod:`medseg.preprocessing`),
:func:`medseg.models.build_model`, :func:`medseg.losses.build_loss`,
:mod:`medseg.training.optim` (optimizer, per-iteration LR schedule),
:mod:`medseg.training.sampling` (patches as a pure function of seed and iteration),
:mod:`medseg.training.validation` (sliding-window Dice) and
:mod:`medseg.training.logs` (``metrics.csv``, TensorBoard, ``progress.png``).

The run folder (``output_dir``)::

    config.yaml           the resolved config
    label_stats.json      class-ratio statistics of the training labels
    metrics.csv           one row per log interval / validation
    progress.png          loss curves and validation Dice
    train.log             the log lines
    provenance.json       what made the run: medseg, engine build, torch, device, command
                          (:mod:`medseg.runfolder.provenance`; a resume is appended to ``resumes``)
    tensorboard/          SummaryWriter events
    checkpoints/latest.pt every train.checkpoint_interval steps and at the end
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medseg import distributed
from medseg.atomic import check_output_folder, write_atomic
from medseg.config import RESUME_MAY_CHANGE, RunConfig, dump_config, validate_config
from medseg.data.dataset import read_dataset_json
from medseg.errors import CheckpointError, ConfigError, MedsegError
from medseg.losses import build_loss, deep_supervision_loss
from medseg.losses.deep_supervision import is_deep_supervision_output
from medseg.models import build_model
from medseg.runfolder import (
    BEST,
    CHECKPOINT_DIR,
    LATEST,
    LossAverage,
    attach_console_handler,
    attach_file_handler,
    capture_rng_state,
    check_unchanged,
    detach,
    load_checkpoint,
    remove_dead_writes,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
    unfinished_start,
    write_provenance,
)
from medseg.training.data import TrainingData, prepare_data
from medseg.training.logs import RunLog, mean_dice
from medseg.training.optim import build_optimizer, build_scheduler, lr_factor
from medseg.training.sampling import local_batch_size, patch_loader
from medseg.training.validation import validate

log = logging.getLogger("medseg.training")

CONFIG_FILE = "config.yaml"
LABEL_STATS = "label_stats.json"


# --------------------------------------------------------------------------- small parts

def _holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def _check_resumable(cfg: RunConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse a resume that changes a key outside :data:`~medseg.config.RESUME_MAY_CHANGE`
    (one line: the key and both values), or ends the run before its checkpoint."""
    stored = checkpoint["config"]
    try:  # a key added to the schema since the checkpoint was written gets its default
        stored = validate_config(stored, source=f"{path} (stored config)").model_dump(mode="json")
    except ConfigError:
        pass
    check_unchanged(stored, cfg.model_dump(mode="json"), RESUME_MAY_CHANGE, Path(cfg.output_dir) / CONFIG_FILE)
    done = int(checkpoint["iteration"])
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
    device = distributed.device_for_rank(resolve_device(cfg.device))
    with distributed.process_group(device):
        handlers = attach_console_handler()
        try:
            return _run(cfg, resume, handlers)
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


@dataclass
class _Progress:
    """The counters a checkpoint must carry besides the state dicts."""

    iteration: int = 0
    best_metric: float | None = None
    best_iteration: int | None = None
    average: LossAverage = field(default_factory=LossAverage)
    loss_terms: list[str] | None = None


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
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.spatial_dims, info.num_channels, info.num_classes, list(cfg.data.patch_size))
    loss_fn = build_loss(cfg.losses, info.num_classes)
    data = prepare_data(cfg, preprocessing=checkpoint["preprocessing"] if checkpoint else None)
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(model.parameters(), cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, cfg.train.iterations)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return _Parts(cfg, data, model, loss_fn, optimizer, scheduler, scaler, device, amp)


def _payload(parts: _Parts, progress: _Progress) -> dict[str, Any]:
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
    }


def _restore(parts: _Parts, checkpoint: dict[str, Any], path: Path) -> _Progress:
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
    for group, base_lr in zip(parts.optimizer.param_groups, parts.scheduler.base_lrs):
        group["lr"] = base_lr * factor
    return _Progress(
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


def _run(cfg: RunConfig, resume: bool, handlers: list[logging.Handler]) -> Path:
    run_dir = Path(cfg.output_dir)
    latest_path = run_dir / CHECKPOINT_DIR / LATEST
    checkpoint: dict[str, Any] | None = None
    # Every rank checks and builds before rank 0 writes anything (the rank check of an
    # existing run folder must not see rank 0's fresh files).
    with distributed.synchronized("setting up the run"):
        _check_world_size(cfg)
        if resume and not latest_path.is_file():
            stored = unfinished_start(run_dir, "train.log")
            if stored is None:
                raise CheckpointError(
                    f"{run_dir}: nothing to resume, {CHECKPOINT_DIR}/{LATEST} not found (start without --resume)"
                )
            if stored:  # killed before its first checkpoint: nothing was trained, the run starts again
                _check_resumable(cfg, {"config": stored, "iteration": 0}, run_dir / CONFIG_FILE)
            log.warning("%s: stopped before its first checkpoint; starting the run again", run_dir)
        elif resume:
            checkpoint = load_checkpoint(latest_path)
            _check_resumable(cfg, checkpoint, latest_path)
        elif _holds_run(run_dir):
            raise ConfigError(
                f"output_dir {run_dir} already exists and is not empty; pass --resume to continue that run "
                "or choose a new output_dir"
            )

        # Everything that can fail on user input happens before the run folder is touched.
        parts = _build_parts(cfg, checkpoint)
        progress = _restore(parts, checkpoint, latest_path) if checkpoint is not None else _Progress()
    _wrap_for_training(parts)

    with distributed.main_process("writing the run folder") as main:
        if main:
            remove_dead_writes(run_dir)
            handlers += attach_file_handler(run_dir / "train.log")
            write_provenance(run_dir, parts.device, resumed_at=progress.iteration if checkpoint is not None else None)
            _write_config(run_dir / CONFIG_FILE, cfg)
            _write_label_stats(run_dir / LABEL_STATS, parts.data, resumed=checkpoint is not None)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])
        log.info("resuming %s at iteration %d of %d", run_dir, progress.iteration, cfg.train.iterations)
    _train_loop(parts, progress, run_dir)
    return run_dir


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


def _save(path: Path, parts: _Parts, progress: _Progress) -> None:
    """Rank 0 writes the checkpoint; under torchrun the other ranks wait for it."""
    with distributed.main_process(f"saving {path}") as main:
        if main:
            save_checkpoint(path, _payload(parts, progress))


def _train_step(parts: _Parts, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step on one batch; returns the loss and its terms.

    Under torchrun ``batch`` is this rank's share of the global batch; the returned loss
    and terms are their means over the ranks (the global batch's, for losses that are
    means over samples), the same on every rank.
    """
    model = parts.train_model if parts.train_model is not None else parts.model
    optimizer, scaler, tc = parts.optimizer, parts.scaler, parts.cfg.train
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=parts.device.type, enabled=parts.amp):
        logits = model(batch["image"])
        if is_deep_supervision_output(logits, batch["image"]):  # DynUNet deep_supervision: true
            loss, terms = deep_supervision_loss(parts.loss_fn, logits, batch["label"], batch=batch)
        else:
            loss, terms = parts.loss_fn(logits, batch["label"], batch=batch)
    shown = loss
    if distributed.is_distributed():
        # every rank sees the mean, so all of them stop together on a diverged loss
        values = [loss.detach()] + [torch.as_tensor(v).detach() for v in terms.values()]
        means = distributed.all_reduce_mean(torch.stack([v.to(torch.float64).cpu().reshape(()) for v in values]))
        shown = means[0]
        terms = dict(zip(terms, means[1:].tolist()))
    if not torch.isfinite(shown):
        raise MedsegError(
            f"the loss is {shown.item()} (training diverged); lower train.optimizer.lr "
            f"or resume from {CHECKPOINT_DIR}/{LATEST}"
        )
    scaler.scale(loss).backward()
    if tc.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    parts.scheduler.step()
    return shown.detach(), {k: float(v) for k, v in terms.items()}


def _train_loop(parts: _Parts, progress: _Progress, run_dir: Path) -> None:
    cfg, data, tc = parts.cfg, parts.data, parts.cfg.train
    total, start = tc.iterations, progress.iteration
    class_names = list(data.info.foreground_labels)
    main = distributed.is_main()
    rank, world = distributed.rank(), distributed.world_size()
    runlog: RunLog | None = None  # rank 0 only
    if progress.loss_terms is not None and main:
        runlog = RunLog(run_dir, progress.loss_terms, class_names, resume_iteration=start)
    if start >= total:
        log.info("run already complete: %d of %d iterations done", start, total)
        if runlog is not None:
            runlog.close()
        return

    loader = patch_loader(
        data.train_set, cfg.seed, tc.batch_size, start, total, cfg.data.num_workers,
        pin_memory=parts.device.type == "cuda", rank=rank, world_size=world,
    )
    log.info(
        "training %s (%dD, %.2fM parameters) on %s%s for iterations %d-%d, batch %d, patch %s%s",
        cfg.model.name, cfg.spatial_dims, sum(p.numel() for p in parts.model.parameters()) / 1e6,
        parts.device, " with AMP" if parts.amp else "", start + 1, total, tc.batch_size,
        "x".join(str(p) for p in cfg.data.patch_size),
        f", {world} processes of batch {tc.batch_size // world} ({distributed.backend_name()})" if world > 1 else "",
    )
    parts.model.train()
    bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True, disable=None if main else True)
    started = time.perf_counter()
    try:
        for batch in loader:
            lr = parts.optimizer.param_groups[0]["lr"]
            parts.loss_fn.set_iteration(progress.iteration, total)  # the terms' schedules
            loss, terms = _train_step(parts, _to_device(batch, parts.device))
            progress.iteration += 1
            iteration = progress.iteration
            if progress.loss_terms is None:
                progress.loss_terms = list(parts.loss_fn.names)
                if main:
                    runlog = RunLog(run_dir, progress.loss_terms, class_names, resume_iteration=start or None)
            progress.average.add(float(loss), terms)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

            validate_now = iteration % tc.val_interval == 0 or iteration == total
            if validate_now or iteration % tc.log_interval == 0:
                dice = validate(parts.model, data.val_items, cfg, data.info.num_classes, parts.device, parts.amp) \
                    if validate_now and data.val_items else None
                mean_loss, mean_terms = progress.average.means()
                progress.average.reset()
                if runlog is not None:
                    runlog.add_row(iteration, lr, mean_loss, mean_terms, dice)
                if validate_now:
                    rate = (iteration - start) / max(time.perf_counter() - started, 1e-9)
                    _report_validation(parts, progress, run_dir, iteration, mean_loss, lr, dice, rate)
                    if runlog is not None:
                        runlog.draw()
            if iteration % tc.checkpoint_interval == 0 or iteration == total:
                _save(run_dir / CHECKPOINT_DIR / LATEST, parts, progress)
    finally:
        bar.close()
        if runlog is not None:
            runlog.close()
    elapsed = time.perf_counter() - started
    done = progress.iteration - start
    best = progress.best_metric
    log.info(
        "finished %d iterations in %.0f s (%.2f it/s); best mean val Dice %s; run folder %s",
        done, elapsed, done / max(elapsed, 1e-9),
        "n/a" if best is None else f"{best:.4f} at iteration {progress.best_iteration}", run_dir,
    )


def _report_validation(
    parts: _Parts, progress: _Progress, run_dir: Path, iteration: int, loss: float, lr: float,
    dice: list[float] | None, rate: float,
) -> None:
    """One log line per validation; ``best.pt`` when the mean Dice improved."""
    total = parts.cfg.train.iterations
    if dice is None:
        log.info("iteration %d/%d  loss %.4f  lr %.3g  (no validation cases)  (%.2f it/s)", iteration, total, loss, lr, rate)
        return
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
    if improved:
        _save(run_dir / CHECKPOINT_DIR / BEST, parts, progress)

"""``medseg adapt``: adapt a trained run to an unlabelled target domain, into a new run folder.

:func:`run_adaptation` reads the source run (checkpoint, stored config, ``label_stats.json``)
without writing to it, preprocesses the target scans exactly as the source model expects
(the source's transforms and normalisation statistics, see
:mod:`medseg.adaptation.config`), and runs the configured method
(:mod:`~medseg.adaptation.pseudo_label`, :mod:`~medseg.adaptation.mean_teacher`,
:mod:`~medseg.adaptation.sfda`, :mod:`~medseg.adaptation.tent`) for ``adapt.iterations``
optimizer steps on target patches.

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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medseg.adaptation.base import AdaptContext, Method
from medseg.adaptation.config import AdaptConfig, dump_adapt_config, validate_adapt_config
from medseg.adaptation.source import LABEL_STATS, SourceRun, class_prior, ensure_affine_norms, load_source
from medseg.adaptation.target import evaluate, load_target, read_eval_labels
from medseg.atomic import write_atomic
from medseg.config import ModelConfig, dump_config, validate_config
from medseg.errors import CheckpointError, ConfigError, MedsegError
from medseg.models import build_model
from medseg.runfolder import (
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
from medseg.training.logs import RunLog

log = logging.getLogger("medseg.adaptation")

TARGET_EVAL = "target_eval.json"
CONFIG_FILE = "config.yaml"
# keys a resumed adaptation may change; everything else must match the checkpoint
_RESUME_FREE = {
    "adapt.checkpoint_interval", "adapt.log_interval", "target.eval_interval", "target.eval_labels", "device",
    "adapt.tent.max_iterations",
}


# --------------------------------------------------------------------------- parts

def _check_resumable(cfg: AdaptConfig, stored: dict[str, Any], path: Path) -> None:
    """Refuse a resume that changes a key outside ``_RESUME_FREE`` (and ``adapt.iterations``
    for the methods without a curriculum), naming the key and both values."""
    try:  # a key added to the schema since the checkpoint was written gets its default
        stored = validate_adapt_config(stored, source=f"{path} (stored config)").model_dump(mode="json")
    except ConfigError:
        pass
    free = set(_RESUME_FREE) | ({"adapt.iterations"} if cfg.adapt.method != "pseudo_label" else set())
    check_unchanged(stored, cfg.model_dump(mode="json"), free, Path(cfg.output_dir) / CONFIG_FILE)


def _inside(path: Path, folder: Path) -> bool:
    a, b = os.path.abspath(path), os.path.abspath(folder)
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


def _source_batches(cfg: AdaptConfig, source: SourceRun, start: int, device: torch.device):
    """Labelled source patches per step, through the source run's own training pipeline."""
    from medseg.training.data import prepare_data
    from medseg.training.sampling import patch_loader

    raw = source.config.model_dump(mode="json")
    raw["data"]["dataset"] = str(cfg.source_data.dataset)
    raw["data"]["val_fraction"] = 0.0
    raw["data"]["split_file"] = None
    raw["data"]["num_workers"] = 0
    run_cfg = validate_config(raw, source="source_data")
    data = prepare_data(run_cfg, preprocessing=source.payload["preprocessing"])
    loader = patch_loader(data.train_set, cfg.seed, cfg.source_data.batch_size, start, cfg.adapt.iterations, 0,
                          pin_memory=False)
    for batch in loader:
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
        return _run(cfg, resume, console)
    finally:
        detach(console)


def _run(cfg: AdaptConfig, resume: bool, handlers: list[logging.Handler]) -> Path:
    run_dir = Path(cfg.output_dir)
    latest = run_dir / CHECKPOINT_DIR / LATEST
    source_path = Path(cfg.source_run)
    if _inside(run_dir, source_path if source_path.is_dir() else source_path.parent.parent):
        raise ConfigError(f"output_dir {run_dir}: is (inside) the source run; the source run is never written to")
    checkpoint: dict[str, Any] | None = None
    if resume and not latest.is_file():
        stored = unfinished_start(run_dir, "adapt.log", CONFIG_FILE)
        if stored is None:
            raise CheckpointError(f"{run_dir}: nothing to resume, {CHECKPOINT_DIR}/{LATEST} not found (start without --resume)")
        if stored:  # killed before its first checkpoint: nothing was adapted, the run starts again
            _check_resumable(cfg, stored, run_dir / CONFIG_FILE)
        log.warning("%s: stopped before its first checkpoint; starting the adaptation again", run_dir)
    elif resume:
        checkpoint = load_checkpoint(latest)
        if "adaptation" not in checkpoint:
            raise CheckpointError(f"{latest}: not an adapted run (no 'adaptation' entry); resume it with medseg train")
        _check_resumable(cfg, checkpoint["adaptation"]["config"], latest)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"output_dir {run_dir} already exists and is not empty; pass --resume or choose a new output_dir")

    # Everything that can fail on user input happens before the run folder is touched.
    from medseg.inference.predictor import Predictor

    source = load_source(source_path)
    if checkpoint is not None and checkpoint["adaptation"]["provenance"]["source_checkpoint_sha256"] != source.sha256:
        raise CheckpointError(f"{source.checkpoint_path}: changed since this adaptation started (SHA-256 differs)")
    device = resolve_device(cfg.device)
    predictor = Predictor(source.payload, device, source=str(source.checkpoint_path))
    dims = predictor.spatial_dims
    patch = list(cfg.adapt.patch_size or source.config.data.patch_size)
    if len(patch) != dims:
        raise ConfigError(f"adapt.patch_size: {patch} has {len(patch)} values, the source model is {dims}D")
    scans = load_target(Path(cfg.target.dataset), cfg.target.subset, predictor, patch)
    references = None
    if cfg.target.eval_labels is not None:
        references = read_eval_labels(Path(cfg.target.eval_labels), scans, _ending(scans[0]))
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
    if cfg.source_data is not None:
        from medseg.losses import build_loss

        ctx.source_loss = build_loss(source.config.losses, num_classes).to(device)
    method = _make_method(ctx)
    student = method.prepare_model(student)
    optimizer = [_build_optimizer(method.trainable_parameters(student), cfg)]

    def reset_optimizer() -> None:
        optimizer[0] = _build_optimizer(method.trainable_parameters(student), cfg)

    ctx.reset_optimizer = reset_optimizer

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
    state: dict[str, Any] = {"iteration": 0, "average": LossAverage(), "loss_terms": list(method.loss_terms), "before": None}
    if checkpoint is not None:
        try:
            student.load_state_dict(checkpoint["adaptation"]["student"])
            optimizer[0].load_state_dict(checkpoint["optimizer"])
            method.load_state_dict(checkpoint["adaptation"]["method_state"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{latest}: does not match this adaptation ({str(err).splitlines()[0]})") from None
        provenance = checkpoint["adaptation"]["provenance"]
        state.update(iteration=int(checkpoint["iteration"]), average=LossAverage(checkpoint.get("loss_average")),
                     before=checkpoint["adaptation"].get("before"))

    remove_dead_writes(run_dir)
    handlers += attach_file_handler(run_dir / "adapt.log")
    class_values = dict(predictor.info.foreground_labels)
    if checkpoint is None:
        write_atomic(run_dir / CONFIG_FILE, dump_adapt_config(cfg))
        write_atomic(run_dir / "source_config.yaml", dump_config(validate_config(run_config)))
        # the adaptation's keys and the build record, also kept in every checkpoint
        provenance = write_provenance(run_dir, device, extra=provenance)
        _copy_label_stats((source.run_dir or source.checkpoint_path.parent.parent) / LABEL_STATS, run_dir / LABEL_STATS)
    else:
        write_provenance(run_dir, device, extra=provenance, resumed_at=state["iteration"])
        restore_rng_state(checkpoint["rng"])
        log.info("resuming %s at step %d of %d", run_dir, state["iteration"], cfg.adapt.iterations)

    runlog = RunLog(run_dir, state["loss_terms"], list(class_values),
                    resume_iteration=state["iteration"] if checkpoint is not None else None)
    try:
        if checkpoint is None and references is not None:
            state["before"] = evaluate(predictor, predictor.model, scans, references, class_values)
            _log_eval("before adaptation", state["before"])
            runlog.add_row(0, cfg.adapt.lr, math.nan, {}, _dice_list(state["before"], class_values))

        def payload() -> dict[str, Any]:
            return {
                "iteration": state["iteration"],
                "config": run_config,
                "dataset": source.payload["dataset"],
                "preprocessing": source.payload["preprocessing"],
                "network": source.payload.get("network"),
                "split": source.payload.get("split"),
                "model": method.model_for_output(student).state_dict(),
                "optimizer": optimizer[0].state_dict(),
                "scheduler": None,
                "scaler": None,
                "rng": capture_rng_state(),
                "best_metric": None,
                "best_iteration": None,
                "loss_average": state["average"].state(),
                "loss_terms": state["loss_terms"],
                "adaptation": {
                    "provenance": provenance,
                    "config": cfg.model_dump(mode="json"),
                    "student": student.state_dict(),
                    "method_state": method.state_dict(),
                    "before": state["before"],
                },
            }

        _loop(cfg, ctx, method, student, optimizer, state, runlog, payload, run_dir, references, class_values)
        if references is not None:
            after = state.get("after") or evaluate(predictor, method.model_for_output(student), scans, references, class_values)
            _log_eval("after adaptation", after)
            write_atomic(run_dir / TARGET_EVAL, json.dumps({"before": state["before"], "after": after}, indent=2) + "\n")
    finally:
        runlog.draw()
        runlog.close()
    return run_dir


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


def _loop(cfg, ctx, method, student, optimizer, state, runlog, payload, run_dir, references, class_values) -> None:
    a = cfg.adapt
    total, start = a.iterations, state["iteration"]
    if start >= total:
        log.info("adaptation already complete: %d of %d steps done", start, total)
        return
    source_iter = _source_batches(cfg, ctx.source, start, ctx.device) if cfg.source_data is not None else None
    log.info("adapting with %s on %s for steps %d-%d, %d target scan(s), batch %d, patch %s",
             a.method, ctx.device, start + 1, total, len(ctx.scans), a.batch_size, "x".join(map(str, ctx.patch)))
    bar = tqdm(total=total, initial=start, desc=f"adapt {a.method}", unit="it", dynamic_ncols=True, disable=None)
    started = time.perf_counter()
    try:
        for it in range(start, total):
            method.before_step(student, it)
            opt = optimizer[0]
            source_batch = next(source_iter) if source_iter is not None else None
            opt.zero_grad(set_to_none=True)
            loss, terms = method.loss(student, it, source_batch)
            if not torch.isfinite(loss):
                raise MedsegError(f"the adaptation loss is {loss.item()} at step {it + 1}; lower adapt.lr")
            loss.backward()
            if a.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(student), a.grad_clip)
            opt.step()
            method.after_step(student, it)
            state["iteration"] = step = it + 1
            state["average"].add(float(loss.detach()), terms)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            evaluate_now = references is not None and cfg.target.eval_interval and step % cfg.target.eval_interval == 0
            if step % a.log_interval == 0 or step == total or evaluate_now:
                dice = None
                if references is not None and (evaluate_now or step == total):
                    result = evaluate(ctx.predictor, method.model_for_output(student), ctx.scans, references, class_values)
                    if step == total:
                        state["after"] = result
                    else:
                        _log_eval(f"at step {step}", result)
                    dice = _dice_list(result, class_values)
                mean_loss, mean_terms = state["average"].pop()
                runlog.add_row(step, opt.param_groups[0]["lr"], mean_loss, mean_terms, dice)
            if step % a.checkpoint_interval == 0 or step == total:
                save_checkpoint(run_dir / CHECKPOINT_DIR / LATEST, payload())
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    log.info("finished %d steps in %.0f s (%.2f it/s); adapted run %s", total - start, elapsed,
             (total - start) / max(elapsed, 1e-9), run_dir)

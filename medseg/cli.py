"""The ``medseg`` command line: ``plan``, ``train``, ``preprocess``, ``adapt``, ``predict``, ``evaluate``, ``study``, ``report compare``, ``report html``.

Input mistakes (a bad config key, an unreadable file, a folder without a checkpoint)
are :class:`medseg.errors.MedsegError`; they are printed as one line
``medseg: error: ...`` with the error's exit code and no traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer

from medseg.errors import ArgumentError, MedsegError, RunStopped
from medseg.evaluation.summary import (
    DEFAULT_PERMUTATIONS,
    DEFAULT_PICTURED_CASES,
    DEFAULT_TOLERANCE_MM,
    DEFAULT_WORST_CASES,
)
from medseg.signals import ignore_from_now_on

app = typer.Typer(
    name="medseg",
    help="Topology-aware segmentation of 3D and 2D medical scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _one_process(command: str) -> None:
    """Refuse a command that has no torchrun mode when started under torchrun: each rank
    ran the whole job into one folder (the second refused by the first's lock, as if by
    another process, then killed mid-write by torchrun)."""
    from medseg.distributed import launched_world_size

    world = launched_world_size()
    if world > 1:
        raise MedsegError(
            f"medseg {command} runs as one process (WORLD_SIZE={world}); start it without torchrun "
            "(train, preprocess, predict and study use torchrun's processes)"
        )


def _peer_failed(err: BaseException) -> bool:
    """A collective broken because another process of the torchrun job stopped (it printed
    its own error): torch.distributed's DistError, or gloo's RuntimeError for a closed peer."""
    import torch.distributed as dist

    from medseg.distributed import launched_world_size

    if not isinstance(err, RuntimeError) or launched_world_size() <= 1:
        return False
    return isinstance(err, dist.DistError) or any(
        s in str(err) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


@contextmanager
def _writing(folder: Path | str) -> Iterator[None]:
    """A full disk, a read-only file system or a missing permission while the command
    writes is one line naming the file (``folder`` when the error does not say which)."""
    import errno

    from medseg.atomic import storage_error

    try:
        yield
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's writer wraps the OSError
        cause = storage_error(err, getattr(err, "filename", None) or folder)
        if cause is None:
            raise
        hint = {errno.EROFS: "; choose a folder on a writable file system"}.get(
            cause.errno, "" if cause.errno in (errno.EACCES, errno.EPERM) else "; make room, then run the command again"
        )
        raise MedsegError(f"{cause.filename}: {cause.strerror}{hint}") from None


def _print_version(value: bool) -> None:
    if value:
        from medseg.provenance import version_text

        print(version_text())
        raise typer.Exit(0)


@app.callback()
def _main_options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="print medseg's version, the topology engine's build (CPU/CUDA, architectures), torch and MONAI, and exit",
    ),
) -> None:
    """Topology-aware segmentation of 3D and 2D medical scans."""


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help="dataset folder in nnU-Net v2 / MSD layout (dataset.json inside)"),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="run config to write (.yaml/.yml); plans.json, fingerprint.json and fingerprint_samples.npz go next to "
        "it (default: plans/DATASET/config.yaml)",
    ),
    gpu_memory_gb: float = typer.Option(8.0, "--gpu-memory-gb", help="memory of the training GPU in GiB (nnU-Net's default: 8)"),
    model: str = typer.Option("dynunet", "--model", help="dynunet, unet, unetr or swinunetr"),
    topology_loss: str = typer.Option("none", "--topology-loss", help="loss added to dice_ce: cldice, skeleton_recall, betti_matching, mip, sauna, ... or none "
                                       "(betti_matching plans DynUNet without deep supervision; sauna replaces dice_ce, as its paper trains it)"),
    workers: int = typer.Option(2, "--workers", help="processes for the fingerprint"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="run folder written into the config (default: runs/NAME_MODEL)"),
) -> None:
    """Fingerprint a dataset and plan a run: a commented CONFIG.yaml for medseg train, plus plans.json,
    fingerprint.json and fingerprint_samples.npz."""
    from medseg.planning import run_plan

    result = run_plan(
        dataset, output=output, gpu_memory_gb=gpu_memory_gb, model=model, topology_loss=topology_loss,
        workers=workers, output_dir=output_dir,
    )
    for message in result.warnings:
        print(f"medseg: warning: {message}", file=sys.stderr)
    p = result.plan
    print(
        f"medseg: planned {p['model']} {p['spatial_dims']}D: spacing {p['target_spacing']}, patch {p['patch_size']}, "
        f"batch {p['batch_size']} (~{p['memory']['estimate_gib']:.1f} of {p['gpu_memory_gb']:g} GiB); "
        f"wrote {result.config}, {result.plans.name}, {result.fingerprint.name}"
    )


# what the command running says about going on after Ctrl-C, asked when it is said
_INTERRUPT_HINT: Callable[[], str] = lambda: ""  # noqa: E731


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config (see configs/quickstart.yaml)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key: --set train.iterations=100"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run folder's 'latest' checkpoint"),
) -> None:
    """Train a model; writes checkpoints, logs and the resolved config to output_dir."""
    from medseg.config import load_config
    from medseg.training.trainer import run_training

    cfg = load_config(config, set_ or [])
    global _INTERRUPT_HINT
    _INTERRUPT_HINT = _resume_hint("train", Path(cfg.output_dir), cfg.train.checkpoint_interval, cfg.train.iterations)
    with _writing(cfg.output_dir):
        run_training(cfg, resume=resume)


def _resume_hint(command: str, run_dir: Path, interval: int, iterations: int) -> Callable[[], str]:
    """What ``medseg COMMAND`` says about going on after it was stopped, asked when it is said."""

    def hint() -> str:
        config = run_dir / "config.yaml"
        if not config.is_file():  # stopped before the run folder was written
            return "; nothing was written to the run folder yet: run the same command again"
        resume = f"`medseg {command} {config} --resume`"
        if not (run_dir / "checkpoints" / "latest.pt").is_file():  # stopped before its first one
            return f"; {resume} starts the run again (no checkpoint yet: the first is at step {min(interval, iterations)})"
        return f"; {resume} continues from checkpoints/latest.pt (written every {interval} steps)"

    return hint


@app.command()
def preprocess(
    config: Path = typer.Argument(..., help="YAML run config: the data.* keys decide the cache"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key: --set data.cache_dir=/scratch/cache"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes (default: the cores, divided among torchrun processes)"),
) -> None:
    """Preprocess every training and validation case once into the on-disk cache that train reads (resumable)."""
    from medseg.config import load_config
    from medseg.preprocessing import run_preprocessing

    if workers is not None and workers < 1:  # one line, as plan and evaluate say it (not click's usage block)
        raise ArgumentError("workers", f"must be at least 1, got {workers}")

    from medseg.runfolder import attach_console_handler, detach

    cfg = load_config(config, set_ or [])
    handlers = attach_console_handler()  # its progress and warnings, as train's (they went to logging's last resort)
    try:
        result = run_preprocessing(cfg, workers=workers)
    finally:
        detach(handlers)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        linked = f", {result.linked} unchanged, linked from an earlier cache" if result.linked else ""
        print(f"medseg: {len(result.cases)} cases ({result.done} preprocessed now{linked}) in {result.folder}")


@app.command()
def adapt(
    config: Path = typer.Argument(..., help="YAML adaptation config (see configs/adapt/sfda.yaml)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key: --set adapt.iterations=50"),
    resume: bool = typer.Option(False, "--resume", help="continue from the adapted run's 'latest' checkpoint"),
) -> None:
    """Adapt a trained run to unlabelled target scans (pseudo_label, mean_teacher, sfda, tent) into a new run folder."""
    from medseg.adaptation import load_adapt_config, run_adaptation

    _one_process("adapt")
    cfg = load_adapt_config(config, set_ or [])
    global _INTERRUPT_HINT
    _INTERRUPT_HINT = _resume_hint("adapt", Path(cfg.output_dir), cfg.adapt.checkpoint_interval, cfg.adapt.iterations)
    with _writing(cfg.output_dir):
        run_adaptation(cfg, resume=resume)


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", help="run folder (uses checkpoint 'best', else 'latest') or a .pt checkpoint"),
    input: List[Path] = typer.Option(
        ..., "--input",
        help="folder of scans (nnU-Net naming CASE_0000.nii.gz) or files; several after one --input as a shell "
        "glob gives them (--input scans/*.nii.gz), or --input repeated",
    ),
    output: Path = typer.Option(
        ..., "--output",
        help="folder for the CASE<input ending> segmentations (CASE.nii.gz for CASE_0000.nii.gz) and predict_provenance.json (the model and options that made them); "
        "never an input folder",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="recompute cases whose output exists, also when made by another model or other options",
    ),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="flip test-time augmentation (default: run config)"),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="sliding-window overlap (default: run config)"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size", help="windows per forward pass (default: run config)"),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="also write CASE_prob.nii.gz (also on when the run config's inference.save_probabilities is)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    stitch_device: Optional[str] = typer.Option(
        None, "--stitch-device",
        help="keep the stitched class maps on cuda (the network's GPU) or cpu; auto: the GPU when they fit "
        "(default: run config, auto)",
    ),
    # --input a b c (a shell glob): b and c
    more_inputs: Optional[List[Path]] = typer.Argument(None, hidden=True, metavar="MORE_INPUT_FILES"),
) -> None:
    """Segment a folder of scans with a trained model (sliding window, geometry restored)."""
    from medseg.inference.predict import run_prediction

    with _writing(output):
        ok = run_prediction(
            model=model,
            inputs=list(input) + list(more_inputs or []),
            output=output,
            overwrite=overwrite,
            tta=tta,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            save_probabilities=save_probabilities,
            device=device,
            stitch_device=stitch_device,
        )
    if not ok:
        raise typer.Exit(code=1)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="folder of predicted CASE.nii.gz"),
    ref: Path = typer.Option(..., "--ref", help="folder of reference CASE.nii.gz (e.g. labelsTs)"),
    output: Path = typer.Option(..., "--output", help="folder for summary.json, metrics.csv and report.html"),
    dataset_json: Optional[Path] = typer.Option(None, "--dataset-json", help="labels to evaluate (default: found next to --ref, else all labels present)"),
    connectivity: Optional[int] = typer.Option(None, "--connectivity", help="foreground connectivity: 8/4 (2D), 26/6 (3D); default full"),
    workers: int = typer.Option(2, "--workers", help="parallel processes"),
    metrics: Optional[str] = typer.Option(
        None, "--metrics",
        help="comma-separated: dice, iou (both: overlap), hd95, surface_dice (nsd), cldice, betti, betti_matching "
        "(bme), components, volume; default all (hd95 and betti_matching are the costly ones)",
    ),
    tolerance_mm: float = typer.Option(
        DEFAULT_TOLERANCE_MM, "--tolerance-mm", help="tolerance of the normalised surface Dice, mm (pixels for PNG/TIF)"
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="scans CASE_0000.nii.gz shown in report.html (default: imagesTs next to --ref)"),
    worst_cases: int = typer.Option(
        DEFAULT_WORST_CASES, "--worst-cases", help="worst cases by Betti matching error pictured in report.html"
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.html"),
) -> None:
    """Overlap and topology metrics per case and label; summary.json, metrics.csv, report.html."""
    from medseg.evaluation.evaluate import run_evaluation

    _one_process("evaluate")
    with _writing(output):
        ok = run_evaluation(
            pred_dir=pred,
            ref_dir=ref,
            output=output,
            dataset_json=dataset_json,
            connectivity=connectivity,
            workers=workers,
            metrics=metrics,
            tolerance_mm=tolerance_mm,
            report=report,
            images_dir=images,
            worst_cases=worst_cases,
        )
    if not ok:
        raise typer.Exit(code=1)


@app.command()
def study(
    study_file: Path = typer.Argument(..., metavar="STUDY.yaml", help="the study: base config, variants, seeds, test folders (see benchmarks/topomortar_study.yaml)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key of every run: --set train.iterations=5"),
    parallel: int = typer.Option(1, "--parallel", help="runs at a time on this machine, each in its own process (GPUs shared out)"),
    summary: bool = typer.Option(False, "--summary", help="run nothing: compare the runs finished so far (e.g. while the study runs)"),
) -> None:
    """Train, test and evaluate every variant x seed (resumable), then compare: study.json, study.csv, study.html."""
    from medseg.study import run_study

    if not summary:  # finished runs are kept, an interrupted one resumes from its last checkpoint
        global _INTERRUPT_HINT
        _INTERRUPT_HINT = lambda: "; run the same command again to go on"  # noqa: E731
    if not run_study(study_file, set_ or [], parallel=parallel, summary_only=summary):
        raise typer.Exit(code=1)


report_app = typer.Typer(
    name="report",
    help="Reports of evaluations: compare two runs, or (re)write report.html.",
    no_args_is_help=True,
)
app.add_typer(report_app, name="report")


@report_app.command("compare")
def report_compare(
    a: Path = typer.Argument(..., metavar="RUN_OR_EVAL_A", help="a run folder (with evaluation/), an evaluation folder or a summary.json"),
    b: Path = typer.Argument(..., metavar="RUN_OR_EVAL_B", help="the same for run B; differences are B - A"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for compare.html and compare.json (default: terminal only)"),
    permutations: int = typer.Option(
        DEFAULT_PERMUTATIONS, "--permutations", help="resamples of the paired permutation test (exact when 2^n is fewer)"
    ),
    pictured_cases: int = typer.Option(
        DEFAULT_PICTURED_CASES, "--pictured-cases", help="cases per label pictured in compare.html: those whose topology error differs most"
    ),
) -> None:
    """Two evaluations of the same cases side by side: paired differences, Wilcoxon and permutation tests."""
    from medseg.evaluation.compare import run_compare

    run_compare(a, b, output=output, permutations=permutations, pictured_cases=pictured_cases)


@report_app.command("html")
def report_html(
    evaluation: Path = typer.Argument(..., metavar="EVALUATION", help="an evaluation folder or its summary.json"),
    output: Optional[Path] = typer.Option(None, "--output", help="HTML file to write (default: report.html next to summary.json)"),
    images: Optional[Path] = typer.Option(None, "--images", help="scans CASE_0000.nii.gz shown under the worst cases"),
    worst_cases: int = typer.Option(DEFAULT_WORST_CASES, "--worst-cases", help="worst cases by Betti matching error pictured"),
) -> None:
    """(Re)write report.html from an existing summary.json."""
    from medseg.evaluation.report import rewrite_report

    path = rewrite_report(evaluation, output=output, images_dir=images, worst_cases=worst_cases)
    print(f"medseg: wrote {path}")


_THREAD_STORAGE_ERRORS: list[str] = []  # held until the command's end (see _background_thread_error)


def _background_thread_error(args) -> None:
    """A full or read-only disk seen by a library's writer thread (TensorBoard's event
    file) is one line, not a traceback. The command's own next write usually reports the
    same disk; its line is then the one shown, and the thread's (a second line, or none,
    as the threads' timing went) is said only when the command ends without an error."""
    if args.exc_type is not None and issubclass(args.exc_type, OSError):
        from medseg.atomic import storage_error

        name = args.thread.name if args.thread is not None else "a background thread"
        line = f"medseg: error: {name}: {args.exc_value}\n"
        if storage_error(args.exc_value, "") is not None:
            _THREAD_STORAGE_ERRORS.append(line)
        else:
            sys.stderr.write(line)
        return
    threading.__excepthook__(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console command; returns the exit code."""
    try:  # a Slurm job's output file: each line as it is printed, in order with stderr's
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):
        pass
    previous, shown, unraisable = threading.excepthook, warnings.showwarning, sys.unraisablehook
    threading.excepthook = _background_thread_error
    warnings.showwarning = _medseg_warnings_in_one_line(shown)
    sys.unraisablehook = _without_data_loader_deaths(unraisable)
    _THREAD_STORAGE_ERRORS.clear()
    global _TERMINATED, _INTERRUPT_HINT
    _TERMINATED = False
    _INTERRUPT_HINT = lambda: ""  # noqa: E731  (set by the command that runs; not an earlier call's)
    # the main thread only (signal's rule), and not where SIGTERM was ignored on purpose
    on_term = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if on_term:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        code = _main(argv)
        if code == 0 and _THREAD_STORAGE_ERRORS:  # the command's writes went through, a thread's did not
            sys.stderr.write("".join(dict.fromkeys(_THREAD_STORAGE_ERRORS)))
            code = 1
        return code
    finally:
        threading.excepthook, warnings.showwarning, sys.unraisablehook = previous, shown, unraisable
        _THREAD_STORAGE_ERRORS.clear()
        if on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _without_data_loader_deaths(other: Callable[..., None]) -> Callable[..., None]:
    """A ``sys.unraisablehook`` that drops the "Exception ignored in
    _MultiProcessingDataLoaderIter.__del__" traceback of data-loading workers that died
    (killed with the command by a SIGTERM to its process group; the command says so in
    one line) and passes anything else to ``other``."""

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "DataLoader worker" in str(error):
            return
        other(unraisable)

    return hook


def _medseg_warnings_in_one_line(other: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints medseg's own warnings (a dataset's
    numTraining, a case's odd spacing) as one line, ``medseg: warning: ...``, as plan
    prints them (train and preprocess printed Python's form: medseg's source file, line
    number and code line), and passes others to ``other``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(category, "__module__", "").startswith("medseg."):
            (file or sys.stderr).write(f"medseg: warning: {message}\n")
        else:
            other(message, category, filename, lineno, file, line)

    return show


_TERMINATED = False  # the KeyboardInterrupt came from SIGTERM (_stop_on_sigterm)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (Slurm's scancel and time limit, docker stop, kill) stops a command as
    Ctrl-C does: its temporaries are removed, and train says how to resume. It used to end
    the process on the spot without a word."""
    global _TERMINATED
    _TERMINATED = True
    ignore_from_now_on(signal.SIGTERM)  # once: the clean-up is not interrupted again
    raise KeyboardInterrupt


def _command_typed(args: list[str]) -> str:
    """``medseg`` and the (sub)command words leading ``args`` (``medseg report compare``)."""
    import typer.main

    words, group = ["medseg"], typer.main.get_command(app)
    for arg in args:
        sub = getattr(group, "commands", {}).get(arg)
        if sub is None:
            break
        words.append(arg)
        group = sub
    return " ".join(words)


def _error(message: str, code: int) -> int:
    """Write ``medseg: error: MESSAGE`` to stderr in one write (the ranks of a torchrun share
    stderr, and print's two writes interleave) and return ``code``."""
    sys.stderr.write(f"medseg: error: {message}\n")
    sys.stderr.flush()
    return code


def _main(argv: list[str] | None) -> int:
    # a log file on a full disk must not print a traceback per line; the next write of the
    # output reports the full disk in one line
    logging.raiseExceptions = False
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from medseg.topology._backends import check_settings

        check_settings()
        empty = _empty_argument(args)
        if empty is not None:
            # a path given as "" is the current folder: evaluate --output '' wrote its results there
            return _error(empty, 2)
        try:
            # standalone_mode=False: a command's typer.Exit(code) comes back as the return value
            result = app(args=argv, standalone_mode=False)
        except (MedsegError, typer.Exit):
            raise
        except Exception as err:
            if _stopping(err):  # whatever the stop was turned into: said as the stop it is
                raise KeyboardInterrupt from err
            raise
    except MedsegError as err:
        message = err.for_cli() if isinstance(err, ArgumentError) else str(err)  # the library names arguments
        message = _one_line(_without_worker_traceback(message))  # a value's newline is echoed in the message
        if isinstance(err, RunStopped):  # nothing wrong with the inputs: say how to go on
            message += _INTERRUPT_HINT()
        return _error(message, err.exit_code)
    except typer.Exit as exit_:
        return exit_.exit_code
    except Warning as err:  # a warning made an error (PYTHONWARNINGS=error, python -W error): said as one
        return _error(f"{_one_line(str(err))} ({type(err).__name__}, raised as an error by the warnings filter)", 1)
    except OSError as err:
        # a path the system refuses (a name over 255 bytes, a link loop, a folder that
        # cannot be made: /proc/self/x): the one line a shell would give; the commands'
        # own checks name the option or key where they can
        where = f"{err.filename}: " if err.filename else ""
        return _error(_one_line(where + (err.strerror or str(err))), 1)
    except ValueError as err:
        if "embedded null byte" not in str(err):  # os.stat and open refuse such a path
            raise
        return _error("a path holds a NUL byte (\\0); check the paths of the command and its config", 2)
    except MemoryError:
        return _error(f"out of memory{_MEMORY_HINT}", 1)
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "Storage size calculation overflowed" in str(err):
            # torch's CPU allocator: an array far beyond this machine (a patch of 4096^3)
            return _error(f"out of memory ({_one_line(str(err).splitlines()[0])}){_MEMORY_HINT}", 1)
        if str(err).startswith("Symlink loop"):  # pathlib's resolve
            return _error(_one_line(str(err)), 2)
        from medseg.training.sampling import loader_failure

        reason = loader_failure(err)  # torch raises a worker's death wherever the main thread is
        if reason is not None:
            return _error(f"{reason}{_INTERRUPT_HINT()}", 1)
        if not _peer_failed(err):
            raise
        rank = os.environ.get("RANK", "?")
        return _error(f"rank {rank} stopped: another process of this torchrun job failed (its error is above)", 1)
    except KeyboardInterrupt:
        return _interrupted()
    except typer.Abort:
        return 1
    except typer.TyperException as err:  # usage errors (missing option, bad value, unknown option)
        # one line, as medseg's own errors (click's block is usage, "Try ... --help" and the error)
        context = getattr(err, "ctx", None)
        command = "medseg"
        if context is not None:  # the path after the program's own name (python -m medseg, a script's)
            command += context.command_path[len(context.find_root().info_name or ""):]
        if command == "medseg":  # an error of the parser before a context (--resume=yes): the words typed
            command = _command_typed(args)
        return _error(f"{_one_line(err.format_message())} (see {command} --help)", err.exit_code)
    if result == 130:  # typer turns Ctrl-C into exit code 130 without a word
        return _interrupted()
    return result if isinstance(result, int) else 0


_MEMORY_HINT = ("; a smaller data.patch_size, train.batch_size or inference.sw_batch_size (medseg adapt: "
                "adapt.patch_size, adapt.batch_size), or a coarser data.target_spacing, needs less")


def _stopping(err: BaseException) -> bool:
    """Whether ``err`` came of a stop: raised after SIGTERM (the data-loading workers died
    of the same signal, and torch raised that from its SIGCHLD handler; a worker's pipe
    was reset), or from the KeyboardInterrupt of a Ctrl-C or SIGTERM, which code it
    interrupted turned into its own error (pydantic's serializer into a
    PydanticSerializationError, a traceback where the stop's one line belonged)."""
    if _TERMINATED:
        return True
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _empty_argument(args: list[str]) -> str | None:
    """What is wrong when an option or argument is given an empty text, else None: every
    medseg argument is a path, a name or a number, none of which is empty."""
    for i, arg in enumerate(args):
        if arg == "":
            previous = args[i - 1] if i else ""
            if previous.startswith("-") and "=" not in previous:
                return f"{previous}: is empty; give a path or value"
            return f"argument {i + 1} is empty; give a path or value"
        if arg.startswith("--") and arg.endswith("=") and arg.count("=") == 1:  # --output=
            return f"{arg[:-1]}: is empty; give a path or value"
    return None


def _without_worker_traceback(message: str) -> str:
    """A data-loading worker's error as the worker raised it: torch re-raises it in the
    main process with "Caught X in DataLoader worker process 0" and the worker's whole
    traceback in the message (1,600 characters on one line)."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        _, sep, text = last.partition(": ")
        if sep:
            return text
    return message


def _one_line(message: str) -> str:
    """``message`` on one line: its line breaks written as ``\\n``."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _interrupted() -> int:
    """Says that the command was stopped (Ctrl-C or SIGTERM) and how to go on; the exit code.

    Under torchrun the stop reaches every rank and rank 0 says it: eight ranks printed
    the same line eight times."""
    what, code = ("stopped by SIGTERM", 128 + signal.SIGTERM) if _TERMINATED else ("interrupted", 130)
    if os.environ.get("RANK", "0") == "0":  # as the commands' own reports
        print(f"medseg: {what}{_INTERRUPT_HINT()}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

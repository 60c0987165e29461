"""The ``medseg`` command line: ``train``, ``predict``, ``evaluate``.

Input mistakes (a bad config key, an unreadable file, a folder without a checkpoint)
are :class:`medseg.errors.MedsegError`; they are printed as one line
``medseg: error: ...`` with the error's exit code and no traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from medseg.errors import MedsegError

app = typer.Typer(
    name="medseg",
    help="Topology-aware segmentation of 3D and 2D medical scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    run_training(cfg, resume=resume)


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", help="run folder (uses checkpoint 'best', else 'latest') or a .pt checkpoint"),
    input: List[Path] = typer.Option(..., "--input", help="folder of scans (nnU-Net naming CASE_0000.nii.gz) or files"),
    output: Path = typer.Option(..., "--output", help="folder for CASE.nii.gz segmentations"),
    overwrite: bool = typer.Option(False, "--overwrite", help="recompute cases whose output exists"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="flip test-time augmentation (default: run config)"),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="sliding-window overlap (default: run config)"),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size", help="windows per forward pass"),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="also write CASE_prob.nii.gz"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Segment a folder of scans with a trained model (sliding window, geometry restored)."""
    from medseg.inference.predict import run_prediction

    ok = run_prediction(
        model=model,
        inputs=list(input),
        output=output,
        overwrite=overwrite,
        tta=tta,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        save_probabilities=save_probabilities,
        device=device,
    )
    if not ok:
        raise typer.Exit(code=1)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="folder of predicted CASE.nii.gz"),
    ref: Path = typer.Option(..., "--ref", help="folder of reference CASE.nii.gz (e.g. labelsTs)"),
    output: Path = typer.Option(..., "--output", help="folder for summary.json and metrics.csv"),
    dataset_json: Optional[Path] = typer.Option(None, "--dataset-json", help="labels to evaluate (default: found next to --ref, else all labels present)"),
    connectivity: Optional[int] = typer.Option(None, "--connectivity", help="foreground connectivity: 8/4 (2D), 26/6 (3D); default full"),
    workers: int = typer.Option(2, "--workers", help="parallel processes"),
) -> None:
    """Overlap and topology metrics per case and label; summary.json + metrics.csv."""
    from medseg.evaluation.evaluate import run_evaluation

    ok = run_evaluation(
        pred_dir=pred,
        ref_dir=ref,
        output=output,
        dataset_json=dataset_json,
        connectivity=connectivity,
        workers=workers,
    )
    if not ok:
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console command; returns the exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except MedsegError as err:
        print(f"medseg: error: {err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as exit_:
        return exit_.exit_code
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    except typer.Abort:
        return 1
    except typer.TyperException as err:  # usage errors (missing option, bad value)
        err.show()
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Domain adaptation on a real shift: TopoMortar's ``colors`` and ``shadows`` test groups.

Source models: the CE+Dice runs of the TopoMortar study (``benchmarks/topomortar_cpu.yaml``,
trained on the 50 in-distribution training images), one per seed. Targets: the
out-of-distribution groups held in the prepared dataset (``imagesTs_colors``,
``imagesTs_shadows``; 50 images each), images only: their labels are used to score, never
to adapt. Every method runs with its shipped config (``configs/adapt/METHOD.yaml``: steps,
optimizer, method settings), only the source run, the target and the output folder
changed. Each model (the source, and every adapted one) then segments the group with
``medseg predict`` and is scored by ``medseg evaluate --connectivity 8`` (8-connected
foreground, as TopoMortar counts it): Dice and the Betti 0 and 1 errors, means over the
50 images. The table gives mean ± std over the seeds.

Target ``train`` is TopoMortar's self-distillation setting instead: the method adapts on
the 50 in-distribution training images (images only, from splits_final.json) and is
scored on the in-distribution test set. With the models trained on noisy or pseudo labels
(``benchmarks/topomortar_labels.yaml``) as sources, it asks whether self-training on the
training images repairs what the labels broke:

    medseg study benchmarks/topomortar_labels.yaml --parallel 2
    python benchmarks/adaptation_topomortar.py --sources studies/topomortar_labels/noisy \
        --targets train --methods mean_teacher,pseudo_label --workdir studies/topomortar_selftraining/noisy

    python data_scripts/prepare_topomortar.py --src ../shared/datasets/TopoMortar --out data/Dataset201_TopoMortar
    medseg study benchmarks/topomortar_cpu.yaml --parallel 2          # the source models
    python benchmarks/adaptation_topomortar.py                         # every method, both groups
    python benchmarks/adaptation_topomortar.py --methods sfda --targets colors --seeds 0

Runs go to ``--workdir`` (default ``studies/topomortar_adaptation``); a finished run
(its ``evaluation/summary.json`` exists) is read back instead of run again, so the script
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import medseg  # noqa: F401
except ImportError:  # a checkout without `pip install`
    sys.path.insert(0, str(REPO))

import numpy as np
import yaml

METHODS = ("pseudo_label", "sfda", "mean_teacher", "tent")
TARGETS = ("colors", "shadows", "train")  # train: adapt on the training images, score on the test set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "Dataset201_TopoMortar",
                        help="the prepared TopoMortar dataset (prepare_topomortar.py)")
    parser.add_argument("--sources", type=Path, default=REPO / "studies" / "topomortar_cpu" / "cedice",
                        help="folder of the source runs, one seed_N/ per seed (the study's baseline variant)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (source runs seed_N)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated groups: colors, shadows")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--iterations", type=int, default=None, help="override every method's steps (a quick look)")
    parser.add_argument("--workdir", type=Path, default=REPO / "studies" / "topomortar_adaptation")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's numbers here")
    return parser


def target_dataset(data: Path, group: str, workdir: Path) -> tuple[Path, Path, Path]:
    """The folder to adapt on (its ``imagesTs``: links to the group's images), and the images and labels that score.

    An out-of-distribution group adapts on and is scored on its own images; ``train`` adapts
    on the split's 50 training images and is scored on the in-distribution test set.
    """
    if group == "train":
        images, labels = data / "imagesTs", data / "labelsTs"
        split = json.loads((data / "splits_final.json").read_text())[0]["train"]
        adapt_on = [data / "imagesTr" / f"{case}_0000.png" for case in split]
    else:
        images, labels = data / f"imagesTs_{group}", data / f"labelsTs_{group}"
        adapt_on = sorted(images.glob("*")) if images.is_dir() else []
    if not images.is_dir() or not labels.is_dir() or not adapt_on or not all(f.is_file() for f in adapt_on):
        raise SystemExit(f"adaptation_topomortar.py: {group}: images or labels under {data} not found; "
                         "run prepare_topomortar.py")
    folder = workdir / "targets" / group
    if (folder / "imagesTs").is_symlink():  # an older layout linked the whole folder
        (folder / "imagesTs").unlink()
    (folder / "imagesTs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "dataset.json", folder / "dataset.json")
    for image in adapt_on:
        link = folder / "imagesTs" / image.name
        if not link.is_symlink():
            link.symlink_to(image.resolve())
    return folder, images, labels


def adapt_config(method: str, source: Path, target: Path, out: Path, seed: int, iterations: int | None) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "adapt" / f"{method}.yaml").read_text())
    raw["source_run"] = str(source)
    # scored once afterwards by predict + evaluate (score), not also by adapt's own target evaluation
    raw["target"] = {**raw.get("target", {}), "dataset": str(target), "subset": "Ts", "eval_labels": None}
    if iterations is not None:
        raw["adapt"]["iterations"] = iterations
    raw["output_dir"] = str(out)
    raw["seed"] = seed
    raw["device"] = "cpu"
    return raw


def adapt(raw: dict) -> Path:
    """``medseg adapt``'s code path; a finished and scored run (its evaluation/summary.json) is kept."""
    from medseg.adaptation import run_adaptation, validate_adapt_config

    out = Path(raw["output_dir"])
    if (out / "evaluation" / "summary.json").is_file():
        return out
    if out.exists():  # an interrupted run: start it again (an adaptation takes minutes)
        shutil.rmtree(out)
    return run_adaptation(validate_adapt_config(raw))


def score(model: Path, images: Path, labels: Path, out: Path) -> dict[str, float]:
    """Predict ``images`` with ``model`` and evaluate (8-connected foreground): per-image means."""
    from medseg.evaluation.evaluate import run_evaluation
    from medseg.evaluation.compare import load_evaluation
    from medseg.inference.predict import run_prediction

    summary = out / "evaluation" / "summary.json"
    if not summary.is_file():
        run_prediction(model, [images], out / "predictions", device="cpu")
        run_evaluation(out / "predictions", labels, out / "evaluation", connectivity=8,
                       metrics="dice,betti", report=False)
    evaluation = load_evaluation(summary)
    values: dict[str, list[float]] = {}
    for labels_of_case in evaluation.per_case.values():
        for metrics in labels_of_case.values():  # one foreground label: mortar
            for key, name in (("dice", "Dice"), ("betti_0", "betti_0_error"), ("betti_1", "betti_1_error")):
                if name in metrics:
                    values.setdefault(key, []).append(float(metrics[name]))
    return {k: float(np.nanmean(v)) for k, v in values.items()}


def fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    logging.getLogger("medseg").setLevel(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = args.targets.split(",")
    methods = args.methods.split(",")
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"adaptation_topomortar.py: --methods: unknown method {name!r} ({', '.join(METHODS)})")
    for seed in seeds:
        source = args.sources / f"seed_{seed}"
        if not (source / "checkpoints").is_dir():
            raise SystemExit(f"adaptation_topomortar.py: no source run {source} (run the TopoMortar study first)")
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    started = time.perf_counter()
    for group in targets:
        target, images, labels = target_dataset(args.data, group, args.workdir)
        for seed in seeds:
            source = args.sources / f"seed_{seed}"
            before = score(source, images, labels, args.workdir / group / "source" / f"seed_{seed}")
            for method in methods:
                t0 = time.perf_counter()
                run = adapt(adapt_config(method, source, target, args.workdir / group / method / f"seed_{seed}",
                                         seed, args.iterations))
                after = score(run, images, labels, run)
                row = rows.setdefault((group, method), {})
                for key in before:
                    row.setdefault(f"{key}_before", []).append(before[key])
                    row.setdefault(f"{key}_after", []).append(after[key])
                print(f"{group:8s} {method:12s} seed {seed}: Dice {before['dice']:.3f} -> {after['dice']:.3f}, "
                      f"Betti 0 {before['betti_0']:.2f} -> {after['betti_0']:.2f}, "
                      f"Betti 1 {before['betti_1']:.2f} -> {after['betti_1']:.2f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    print()
    print(f"TopoMortar targets {', '.join(targets)} ('train': adapted on the training images, scored on the test set); "
          f"{len(seeds)} source model(s) from {args.sources}; shipped adapt configs; mean ± std over seeds of the "
          f"per-image means; {time.perf_counter() - started:.0f} s in all")
    print()
    print("| target | method | Dice before | Dice after | β0 err. before | β0 err. after | β1 err. before | β1 err. after |")
    print("|---|---|---|---|---|---|---|---|")
    for (group, method), row in rows.items():
        print(f"| {group} | {method} | {fmt(row['dice_before'])} | {fmt(row['dice_after'])} | "
              f"{fmt(row['betti_0_before'], 2)} | {fmt(row['betti_0_after'], 2)} | "
              f"{fmt(row['betti_1_before'], 2)} | {fmt(row['betti_1_after'], 2)} |")
    if args.json:
        args.json.write_text(json.dumps({f"{g}/{m}": r for (g, m), r in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

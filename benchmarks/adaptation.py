#!/usr/bin/env python
"""Domain adaptation on synthetic vessels: target Dice and Betti errors before and after, per method.

For each seed: a source dataset (6 cases of 32^3 voxels, :func:`medseg.data.synthetic.make_dataset`)
and target datasets holding the *same trees* in the shifted grid, imaged as

* ``low_contrast``: the source imaging with vessels at 130 instead of 300 HU — the source
  model under-segments (a strong shift, Dice about 0.2);
* ``shifted``: the generator's shifted domain (:data:`medseg.data.synthetic.SHIFTED_DOMAIN`:
  lower contrast, twice the noise, stronger bias, gamma, blur) — the source model
  over-segments noise (Dice about 0.6).

A tiny UNet is trained on the source (``medseg train``'s code path), then every method
adapts it with ``medseg adapt``'s code path on the unlabelled target scans; the target
labels are used only to score (sliding window on the original grid, Dice and the Betti
error ``sum_k |beta_k(pred) - beta_k(ref)|`` per case, averaged). The table gives mean ±
standard deviation over seeds.

The methods run with their documented defaults (pseudo_label: prior-matched pseudo-labels
with a foreground-only curriculum; sfda: the class-ratio KL on whole-scan ratios), which
correct both an under- and an over-segmenting source model.

    python benchmarks/adaptation.py            # 3 seeds, both domains: about 1 min on 2 CPU cores
    python benchmarks/adaptation.py --quick    # 1 seed, low_contrast only: about 1 min
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from medseg.adaptation import run_adaptation, validate_adapt_config
from medseg.config import validate_config
from medseg.data.dataset import write_dataset_json
from medseg.data.io import write_image
from medseg.data.synthetic import LABELS, SHIFTED_DOMAIN, SOURCE_DOMAIN, make_case, make_dataset
from medseg.training.trainer import run_training

DOMAINS = {"low_contrast": replace(SOURCE_DOMAIN, vessel=130.0), "shifted": SHIFTED_DOMAIN}
TINY_UNET = {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}}


def methods(quick: bool) -> dict[str, dict]:
    n = 100 if quick else 150
    return {
        "pseudo_label": dict(iterations=n, pseudo_label={"rounds": 3, "threshold": 0.9, "curriculum": [0.2, 0.4, 0.6]}),
        "mean_teacher": dict(iterations=n),
        "sfda": dict(iterations=n),
        "tent": dict(iterations=50),
    }


def make_target(out: Path, params, cases: int, seed: int) -> Path:
    for i in range(cases):
        case = make_case(i, seed=seed, size=32, shifted=True, params=params)
        write_image(out / "imagesTr" / f"{case['name']}_0000.nii.gz", case["image"], case["geometry"])
        write_image(out / "labelsTr" / f"{case['name']}.nii.gz", case["label"], case["geometry"])
    write_dataset_json(out, {0: "CT"}, LABELS, cases)
    return out


def train_source(dataset: Path, out: Path, seed: int, iterations: int) -> Path:
    raw = {
        "data": {"dataset": str(dataset), "patch_size": [16, 16, 16], "val_fraction": 0.0,
                 "foreground_oversample": 0.5, "augmentation": {"affine_prob": 0.0}},
        "model": TINY_UNET,
        "train": {"iterations": iterations, "batch_size": 2, "val_interval": 10_000, "checkpoint_interval": 10_000,
                  "log_interval": 50, "optimizer": {"lr": 0.003}},
        "inference": {"overlap": 0.25, "sw_batch_size": 8},
        "output_dir": str(out), "seed": seed, "device": "cpu",
    }
    return run_training(validate_config(raw))


def adapt(source: Path, target: Path, out: Path, method: str, seed: int, settings: dict) -> dict:
    raw = {
        "source_run": str(source),
        "target": {"dataset": str(target), "eval_labels": str(target / "labelsTr")},
        "adapt": {"method": method, "batch_size": 2, "log_interval": 50, "checkpoint_interval": 1000, **settings},
        "output_dir": str(out), "seed": seed, "device": "cpu",
    }
    run = run_adaptation(validate_adapt_config(raw))
    return json.loads((run / "target_eval.json").read_text())


def fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, low_contrast domain, 100 steps")
    parser.add_argument("--seeds", type=counting(1), default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--domains", default=None, help="comma-separated: low_contrast, shifted")
    parser.add_argument("--source-iterations", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("medseg").setLevel(logging.WARNING)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    domains = (args.domains or ("low_contrast" if args.quick else "low_contrast,shifted")).split(",")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise SystemExit(f"--domains: unknown domain {unknown[0]!r}; choose from {', '.join(DOMAINS)}")
    plan = methods(args.quick)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medseg_adapt_bench_"))
    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, list[float]]]] = {d: {} for d in domains}
    try:
        for seed in seeds:
            src_data = work / f"seed{seed}" / "source_data"
            make_dataset(src_data, cases=6, test_cases=0, size=32, seed=seed)
            source = train_source(src_data, work / f"seed{seed}" / "source_run", seed, args.source_iterations)
            for domain in domains:
                target = make_target(work / f"seed{seed}" / f"target_{domain}", DOMAINS[domain], 6, seed)
                for method, settings in plan.items():
                    t0 = time.perf_counter()
                    result = adapt(source, target, work / f"seed{seed}" / f"{domain}_{method}", method, seed, settings)
                    row = results[domain].setdefault(method, {k: [] for k in ("d0", "d1", "b0", "b1", "t")})
                    for key, phase in (("0", "before"), ("1", "after")):
                        row["d" + key].append(result[phase]["mean"]["vessel"]["dice"])
                        row["b" + key].append(result[phase]["mean"]["vessel"]["betti_error"])
                    row["t"].append(time.perf_counter() - t0)
                    print(f"seed {seed} {domain:12s} {method:12s} Dice {row['d0'][-1]:.3f} -> {row['d1'][-1]:.3f}  "
                          f"Betti error {row['b0'][-1]:.2f} -> {row['b1'][-1]:.2f}  ({row['t'][-1]:.0f} s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"Target-domain vessel Dice and Betti error (sum over dimensions of |beta_pred - beta_ref|, mean per case), "
          f"mean ± std over {len(seeds)} seed(s); 6 target scans per seed, tiny 3D UNet; "
          f"{time.perf_counter() - started:.0f} s in all")
    print()
    print("| domain | method | steps | Dice before | Dice after | Δ Dice | Betti err. before | Betti err. after |")
    print("|---|---|---|---|---|---|---|---|")
    for domain in domains:
        for method, row in results[domain].items():
            delta = [a - b for a, b in zip(row["d1"], row["d0"])]
            print(f"| {domain} | {method} | {plan[method]['iterations']} | {fmt(row['d0'])} | {fmt(row['d1'])} | "
                  f"{'+' if np.mean(delta) >= 0 else ''}{fmt(delta)} | {fmt(row['b0'], 2)} | {fmt(row['b1'], 2)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

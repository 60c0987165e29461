"""Cost of each evaluation metric on a 256^3 vessel-tree case, and the Betti matching
error against the reference implementation.

The case is the synthetic generator's vessel tree at 256^3 (``make_case``, 3 loops);
the prediction is the reference mask with its boundary moved by smooth noise (signed
distance + unit-variance noise smoothed at 2 voxels, thresholded at 0), so it has
spurious components, broken branches and holes, as a network output does. Each metric
runs exactly as ``medseg evaluate`` runs it (``compute_label_metrics``: the masks
cropped to the bounding box of both foregrounds plus one voxel, default connectivity
26, i.e. the T construction for the Betti matching error).

"first call" is the first computation in this process (fresh memory: on virtual
machines fresh pages are expensive, see ``medseg/topology/csrc/big_vector.hpp``);
"steady" is the best of ``--repeat`` further calls, what every later case of an
evaluation worker costs.

The last row compares medseg's Betti matching error with the reference Betti-Matching-3D
(``topolosses==0.2.0``, its own threads) on the same kind of case at ``--reference-size``
(default 128^3: the reference needs about 14 GB at 256^3), V construction (the
reference's), side by side in this process, with the counts checked equal.

Usage::

    python benchmarks/evaluation.py
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import os
import sys
import time

import numpy as np
from scipy import ndimage

from medseg.data.synthetic import make_case
from medseg.evaluation.metrics import LABEL_METRICS, MetricContext, compute_label_metrics, confusion_counts
from medseg.topology import betti_matching

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from topology import reference_module  # noqa: E402  (benchmarks/topology.py)


def vessel_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(prediction, reference) boolean masks of one vessel-tree case, and its spacing."""
    case = make_case(0, seed=seed, size=size, dims=3, loops=3)
    ref = case["label"] > 0
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(ref.shape), 2.0)
    noise /= noise.std()
    signed = ndimage.distance_transform_edt(ref) - ndimage.distance_transform_edt(~ref)
    pred = (signed + noise) > 0
    return pred, ref, tuple(float(s) for s in case["geometry"].spacing)


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(first call, best of `repeat` further calls, last result) in seconds."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    steady = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        steady = min(steady, time.perf_counter() - t)
    return first, steady, out


def reference_error(ref_module, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Unmatched features per dimension by the reference (sublevel of 1 - mask)."""
    r = ref_module.compute_matching(1.0 - pred.astype(np.float64), 1.0 - target.astype(np.float64))
    return np.asarray(r.num_unmatched_input1) + np.asarray(r.num_unmatched_input2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=counting(1), default=2)
    ap.add_argument("--reference-size", type=int, default=128)
    args = ap.parse_args()

    pred, ref, spacing = vessel_pair(args.size)
    either = np.argwhere(pred | ref)
    crop = tuple(int(s) for s in either.max(axis=0) - either.min(axis=0) + 3)
    load = os.getloadavg()[0]
    print(
        f"vessel case {args.size}^3 (cropped to {crop[0]}x{crop[1]}x{crop[2]}), foreground "
        f"{ref.mean():.2%}, prediction differs in {np.mean(pred != ref):.2%} of voxels; "
        f"cores={len(os.sched_getaffinity(0))}; load average {load:.1f}"
    )
    context = MetricContext(spacing=spacing)
    counts = set(confusion_counts(pred, ref, context))  # added to every metric's output
    rows = []
    for name in LABEL_METRICS:
        first, steady, values = timed(lambda: compute_label_metrics(pred, ref, context, [name]), args.repeat)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k not in counts)
        rows.append((name, f"{first:.2f}", f"{steady:.2f}", shown[:80]))
        print(f"  {name:<16} first {first:6.2f} s   steady {steady:6.2f} s   {shown[:80]}", flush=True)

    print()
    print("| metric | first call (s) | steady (s) | values |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")

    ref_module = reference_module()
    if ref_module is None:
        print("\n(reference module topolosses==0.2.0 not installed: comparison skipped)")
        return
    n = args.reference_size
    small_pred, small_ref, _ = vessel_pair(n)
    ours_t = theirs_t = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        ours = betti_matching(small_pred.astype(np.float32), small_ref.astype(np.float32), construction="V", threads=None)
        ours_t = min(ours_t, time.perf_counter() - t)
        t = time.perf_counter()
        theirs = reference_error(ref_module, small_pred, small_ref)
        theirs_t = min(theirs_t, time.perf_counter() - t)
    ours_err = ours.num_unmatched_prediction + ours.num_unmatched_target
    same = "same counts" if np.array_equal(ours_err, theirs) else f"counts differ: {ours_err} vs {theirs}"
    print(
        f"\n| Betti matching error, vessel masks {n}^3, V (s) | {ours_t:.3f} | {theirs_t:.3f} (reference) "
        f"| {ours_t / theirs_t:.2f} | {same} |"
    )


if __name__ == "__main__":
    main()

"""medseg.topology.skeletonize against scikit-image's skeletonize, side by side.

Cases (all generated here, deterministic):

- the synthetic vessel tree at 256^3 (``make_case``, 3 loops) - the reference mask;
- a noisy "prediction" of it (the reference's signed distance plus smooth noise, as
  ``benchmarks/evaluation.py`` makes it): thicker, with spurs and small blobs;
- the 2D vessel tree at 1024^2;
- bars 1-8 voxels thick (24^3), where scikit-image's 3D skeleton loses objects.

Each timing is the best of ``--repeat`` runs after one warm-up call, both libraries in
this process. Also printed: whether each skeleton keeps the mask's Betti numbers.

    python benchmarks/skeleton.py [--size 256] [--size2d 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def best_time(fn, repeat: int):
    fn()  # warm-up (the 3D simple-point table fills on first sight of a neighbourhood)
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def vessel_masks(size: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from medseg.data.synthetic import make_case

    case = make_case(0, seed=seed, size=size, dims=dims, loops=3)
    ref = case["label"] > 0
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(ref.shape), 2.0)
    noise /= noise.std()
    signed = ndimage.distance_transform_edt(ref) - ndimage.distance_transform_edt(~ref)
    return ref, (signed + noise) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="3D vessel case edge (voxels)")
    ap.add_argument("--size2d", type=int, default=1024, help="2D vessel case edge (pixels)")
    ap.add_argument("--repeat", type=counting(1), default=3)
    args = ap.parse_args()

    from skimage.morphology import skeletonize as skimage_skeletonize

    from medseg.topology import betti_numbers, skeletonize

    threads = len(os.sched_getaffinity(0))
    print(f"medseg.topology.skeletonize vs skimage.morphology.skeletonize, {threads} cores, best of {args.repeat}\n")
    print("| case | foreground | medseg 1 thread (s) | medseg all cores (s) | scikit-image (s) | ratio, 1 thread "
          "| ratio, all cores | Betti kept medseg / scikit-image |")
    print("|---|---|---|---|---|---|---|---|")
    ref3, pred3 = vessel_masks(args.size, 3)
    ref2, pred2 = vessel_masks(args.size2d, 2)
    cases = [
        (f"vessel tree {args.size}^3", ref3),
        (f"noisy prediction {args.size}^3", pred3),
        (f"vessel tree {args.size2d}^2", ref2),
        (f"noisy prediction {args.size2d}^2", pred2),
    ]
    for name, mask in cases:
        t1, _ = best_time(lambda: skeletonize(mask, threads=1), args.repeat)
        tn, ours = best_time(lambda: skeletonize(mask), args.repeat)
        ts, theirs = best_time(lambda: skimage_skeletonize(mask), args.repeat)
        betti = betti_numbers(mask)
        kept = (
            f"{'yes' if np.array_equal(betti_numbers(ours), betti) else 'NO'} / "
            f"{'yes' if np.array_equal(betti_numbers(theirs), betti) else 'NO'}"
        )
        print(f"| {name} | {mask.mean():.2%} | {t1:.3f} | {tn:.3f} | {ts:.3f} | {t1 / ts:.3f} | {tn / ts:.3f} | {kept} |")

    print("\nBars t voxels thick (24^3, a[8:8+t, 8:8+t, 2:20]): skeleton voxels")
    print("| t | " + " | ".join(str(t) for t in range(1, 9)) + " |")
    print("|---|" + "---|" * 8)
    rows = {"medseg": [], "scikit-image": []}
    for t in range(1, 9):
        bar = np.zeros((24, 24, 24), bool)
        bar[8 : 8 + t, 8 : 8 + t, 2:20] = True
        rows["medseg"].append(int(skeletonize(bar).sum()))
        rows["scikit-image"].append(int((skimage_skeletonize(bar) > 0).sum()))
    for name, counts in rows.items():
        print(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")


if __name__ == "__main__":
    main()

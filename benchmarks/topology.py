"""Benchmark of medseg's persistent-homology engine against its competitors.

Runs medseg and the competitor side by side in the same process (alternating, best of
``--repeat`` runs) and prints a table with the ratios; peak memory is measured as the
peak RSS (VmHWM) of a fresh child process that computes one case, including the
Python interpreter, numpy and the input arrays (about 150 MiB at 128^3) on both sides.

Competitors: Betti-Matching-3D (the reference, as vendored in ``topolosses==0.2.0``)
for Betti matching, CubicalRipser (``cripser``) and gudhi for barcodes.

Threads: the reference parallelises each Betti matching internally with std::async
(up to three concurrent barcode computations in dimension 1), so medseg is given the
same machine: ``threads=--threads`` (default: all available cores, 2 on the CI box).
cripser is run with ``n_threads=1`` like medseg's single-image barcode; gudhi is
single-threaded. The batch row compares medseg with 1 thread and with 2 threads; the
one-pair row a pair's task graph on 1 thread and on ``--threads``, the share each pair
of a batch smaller than the thread count runs on.

Usage::

    python benchmarks/topology.py                 # full table (a few minutes)
    python benchmarks/topology.py --quick         # small sizes only
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from scipy.ndimage import gaussian_filter

import medseg.topology as topo


# ----------------------------------------------------------------------------- data


def realistic_pair(n: int, seed: int = 0, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A smooth binary target and a noisy sigmoid prediction of it (float64).

    target = thresholded gaussian-smoothed noise; prediction = sigmoid(6 (smoothed
    target - 0.5) + smoothed unit noise), i.e. a network output that is right in the
    large but has many small spurious features.
    """
    rng = np.random.default_rng(seed)
    shape = (n,) * ndim
    field = gaussian_filter(rng.standard_normal(shape), sigma=n / 16, mode="wrap")
    field = (field - field.mean()) / field.std()
    target = (field > 0.5).astype(np.float64)
    noise = gaussian_filter(rng.standard_normal(shape), 1.0)
    logits = 6.0 * (gaussian_filter(target, 1.0) - 0.5) + noise / noise.std()
    prediction = 1.0 / (1.0 + np.exp(-logits))
    return prediction, target


def noise_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, n, n)), rng.random((n, n, n))


def smooth_volume(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.standard_normal((n, n, n)), sigma=2.0)


# ------------------------------------------------------------------------ competitors


def reference_module():
    spec = importlib.util.find_spec("topolosses")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = os.path.join(spec.submodule_search_locations[0], "losses", "betti_matching", "src")
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if name.startswith("betti_matching") and name.endswith(".so"):
            s = importlib.util.spec_from_file_location("betti_matching", os.path.join(base, name))
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return mod
    return None


def run_medseg(pred, target, threads):
    m = topo.betti_matching(pred, target, filtration="superlevel", threads=threads)
    return m.num_matched.sum(), m.num_unmatched_prediction.sum(), m.num_unmatched_target.sum()


def run_reference(ref, pred, target):
    r = ref.compute_matching(1.0 - pred, 1.0 - target)
    return int(np.sum(r.num_matched)), int(np.sum(r.num_unmatched_input1)), int(np.sum(r.num_unmatched_input2))


def best_time(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def side_by_side(fa, fb, repeat):
    """Best-of times of two functions, interleaved so that machine noise hits both."""
    ta, tb, oa, ob = float("inf"), float("inf"), None, None
    for _ in range(repeat):
        t = time.perf_counter()
        oa = fa()
        ta = min(ta, time.perf_counter() - t)
        t = time.perf_counter()
        ob = fb()
        tb = min(tb, time.perf_counter() - t)
    return ta, tb, oa, ob


# ----------------------------------------------------------------------- peak memory


def child_peak_rss(which: str, n: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh child process computing one realistic pair."""
    cmd = [sys.executable, __file__, "--child", which, str(n), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child_main(which: str, n: int, threads: int) -> None:
    pred, target = realistic_pair(n)
    if which == "medseg":
        run_medseg(pred, target, threads)
    else:
        run_reference(reference_module(), pred, target)
    print(json.dumps({"peak_mib": peak_rss_kib() / 1024}))


def peak_rss_kib() -> float:
    """Peak resident set size of this process (VmHWM). getrusage's ru_maxrss is not
    used: a child started by a big parent inherits the parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=counting(1), default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "N", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    threads = args.threads or len(os.sched_getaffinity(0))
    ref = reference_module()
    rows: list[tuple[str, str, str, str, str]] = []

    def row(case, ours, theirs, ratio, note=""):
        rows.append((case, ours, theirs, ratio, note))
        print(f"  {case:<40} {ours:>12} {theirs:>14} {ratio:>10}  {note}", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"medseg threads={threads}; reference: its own std::async threads (up to 3 at once); "
        f"repeat={args.repeat}; cores={len(os.sched_getaffinity(0))}; load average {load:.1f}"
    )
    print(f"  {'case':<40} {'medseg':>12} {'competitor':>14} {'ratio':>10}")
    sizes = [32, 48] if args.quick else [64, 96, 128]
    if ref is None:
        print("  (reference module topolosses==0.2.0 not installed: matching rows skipped)")
    else:
        for n in sizes:
            pred, target = realistic_pair(n)
            repeat = args.repeat if n < 128 else max(1, args.repeat - 1)
            tm, tr, om, orf = side_by_side(
                lambda: run_medseg(pred, target, threads), lambda: run_reference(ref, pred, target), repeat
            )
            same = "same counts" if tuple(map(int, om)) == tuple(orf) else f"counts differ {om} vs {orf}"
            row(f"matching realistic {n}^3 (s)", f"{tm:.3f}", f"{tr:.3f}", f"{tm / tr:.2f}", same)
        n_mem = sizes[-1]
        mm = child_peak_rss("medseg", n_mem, threads)
        mr = child_peak_rss("reference", n_mem, threads)
        row(f"matching realistic {n_mem}^3 peak RSS (MiB)", f"{mm:.0f}", f"{mr:.0f}", f"{mm / mr:.2f}")
        n_noise = 32 if args.quick else 64
        pred, target = noise_pair(n_noise)
        tm, tr, om, orf = side_by_side(
            lambda: run_medseg(pred, target, threads), lambda: run_reference(ref, pred, target), args.repeat
        )
        same = "same counts" if tuple(map(int, om)) == tuple(orf) else "counts differ"
        row(f"matching uniform noise {n_noise}^3 (s)", f"{tm:.3f}", f"{tr:.3f}", f"{tm / tr:.2f}", same)

    import cripser
    import gudhi

    for n in ([32, 48] if args.quick else [96, 128]):
        vol = smooth_volume(n)
        tm, tc, _, _ = side_by_side(
            lambda: topo.barcode(vol, filtration="sublevel"),
            lambda: cripser.computePH(vol, maxdim=2, n_threads=1),
            args.repeat,
        )
        row(f"barcode smooth {n}^3 vs cripser (s)", f"{tm:.3f}", f"{tc:.3f}", f"{tm / tc:.2f}")

        def run_gudhi():
            cc = gudhi.CubicalComplex(vertices=vol)
            cc.persistence(homology_coeff_field=2)

        tg, _ = best_time(run_gudhi, 1)
        row(f"barcode smooth {n}^3 vs gudhi (s)", f"{tm:.3f}", f"{tg:.3f}", f"{tm / tg:.2f}")

    pred, target = realistic_pair(512, ndim=2)
    if ref is not None:
        tm, tr, _, _ = side_by_side(
            lambda: run_medseg(pred, target, threads), lambda: run_reference(ref, pred, target), args.repeat
        )
        row("matching 2D 512^2 (s)", f"{tm:.4f}", f"{tr:.4f}", f"{tm / tr:.2f}", "target < 0.1 s")
    else:
        tm, _ = best_time(lambda: run_medseg(pred, target, threads), args.repeat)
        row("matching 2D 512^2 (s)", f"{tm:.4f}", "-", "-", "target < 0.1 s")

    nb = 32 if args.quick else 64
    pairs = [realistic_pair(nb, seed=s) for s in range(4)]
    preds = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    t1, t2, _, _ = side_by_side(
        lambda: topo.betti_matching_batch(preds, targets, threads=1),
        lambda: topo.betti_matching_batch(preds, targets, threads=2),
        args.repeat,
    )
    row(f"batch of 4 pairs {nb}^3: 2 threads vs 1 (s)", f"{t2:.3f}", f"{t1:.3f}", f"{t1 / t2:.2f}x", "throughput gain")
    # a pair's own task graph on more threads: what each pair of a batch smaller than the
    # thread count gets a share of (two pairs on 8 threads: 4 each)
    if threads > 1:
        t1, tt, _, _ = side_by_side(
            lambda: topo.betti_matching_batch(preds[:1], targets[:1], threads=1),
            lambda: topo.betti_matching_batch(preds[:1], targets[:1], threads=threads),
            args.repeat,
        )
        row(f"one pair {nb}^3: {threads} threads vs 1 (s)", f"{tt:.3f}", f"{t1:.3f}", f"{t1 / tt:.2f}x", "speed-up")

    print()
    print("| case | medseg | competitor | ratio | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

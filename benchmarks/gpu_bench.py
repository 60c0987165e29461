"""Benchmark of the CUDA backend against the CPU engine (and the reference, if importable).

Realistic prediction/target pairs at 64^3, 96^3, 128^3 and a batch of 8 at 96^3:
barcodes and Betti matchings on backend="cuda" (numpy in, and CUDA tensors in when
torch has CUDA) and on the sequential CPU engine, checked identical (every coordinate,
in order), and the matching of Betti-Matching-3D (the reference) when importable.
Needs numpy (scipy only to build the data if present).

Usage: python benchmarks/gpu_bench.py [--repeat 2] [--sizes 64 96 128] [--batch 8]
Dry run without a GPU (the same code paths on CPU threads, small sizes):
       python benchmarks/gpu_bench.py --backend cpu-parallel --sizes 32 --batch 2 --repeat 1
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's medseg

import medseg.topology as topo  # noqa: E402
from medseg.topology import _inputs  # noqa: E402


def smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic gaussian smoothing by FFT (numpy only)."""
    out = np.fft.fftn(x)
    for axis, n in enumerate(x.shape):
        f = np.fft.fftfreq(n)
        g = np.exp(-2.0 * (np.pi * sigma * f) ** 2)
        shape = [1] * x.ndim
        shape[axis] = n
        out = out * g.reshape(shape)
    return np.fft.ifftn(out).real


def realistic_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    try:
        from topology import realistic_pair as rp  # benchmarks/topology.py (needs scipy)

        return rp(n, seed)
    except ImportError:
        rng = np.random.default_rng(seed)
        field = smooth(rng.standard_normal((n, n, n)), n / 16)
        field = (field - field.mean()) / field.std()
        target = (field > 0.5).astype(np.float64)
        noise = smooth(rng.standard_normal((n, n, n)), 1.0)
        logits = 6.0 * (smooth(target, 1.0) - 0.5) + noise / noise.std()
        return 1.0 / (1.0 + np.exp(-logits)), target


def best(fn, repeat: int) -> tuple[float, object]:
    t_best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def same(a, b) -> bool:
    return all(
        np.array_equal(x, y)
        for f in ("birth_coordinates", "death_coordinates", "essential_birth_coordinates")
        for x, y in zip(getattr(a, f), getattr(b, f))
    )


MATCH_FIELDS = [
    f"{s}_{side}_{end}_coordinates"
    for s in ("matched", "unmatched")
    for side in ("prediction", "target")
    for end in ("birth", "death")
]


def same_matching(a, b) -> bool:
    if not (np.array_equal(a.num_unmatched_prediction, b.num_unmatched_prediction)
            and np.array_equal(a.num_unmatched_target, b.num_unmatched_target)):
        return False
    return all(np.array_equal(x, y) for f in MATCH_FIELDS for x, y in zip(getattr(a, f), getattr(b, f)))


def fmt(t: float) -> str:
    return f"{t:8.3f}s" if t == t else f"{'-':>9}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=counting(1), default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 96, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU engine threads")
    ap.add_argument("--backend", default="cuda", help="cpu-parallel: dry run without a GPU")
    args = ap.parse_args()
    if args.backend == "cuda" and not _inputs.cuda_available():
        sys.exit("no CUDA backend or device: nothing to benchmark")
    torch, dev = None, False
    if args.backend == "cuda":
        try:
            import torch

            dev = torch.cuda.is_available()
        except ImportError:
            torch = None
    # the reference as benchmarks/topology.py loads it (a bare except here once hid a wrong call,
    # and the reference column stayed empty with the reference installed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from topology import reference_module

    ref = reference_module()
    if ref is None:
        print("reference (topolosses==0.2.0) not installed: its column stays empty")

    bar_rows, match_rows = [], []
    topo.barcode(np.zeros((8, 8, 8)), backend=args.backend)  # warm-up (context, CUB, memory pool)
    topo.betti_matching(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), backend=args.backend)
    for n in args.sizes:
        pred, target = realistic_pair(n)
        x, y = pred.astype(np.float32), target.astype(np.float32)
        # barcodes
        t_cpu, b_cpu = best(lambda: topo.barcode(x, backend="cpu"), 1)
        t_gpu, b_gpu = best(lambda: topo.barcode(x, backend=args.backend), args.repeat)
        assert same(b_gpu, b_cpu), f"{args.backend} barcode differs from the CPU engine at {n}^3"
        t_dev = float("nan")
        if dev:
            xt = torch.from_numpy(x).cuda()
            t_dev, b_dev = best(lambda: topo.barcode(xt, backend=args.backend), args.repeat)
            assert same(b_dev, b_cpu), "CUDA tensor barcode differs from the CPU engine"
        bar_rows.append((f"realistic {n}^3", t_gpu, t_dev, t_cpu, b_cpu.num_pairs.tolist()))
        # matchings
        t_mc, m_cpu = best(lambda: topo.betti_matching(x, y, backend="cpu", threads=args.threads), 1)
        t_mg, m_gpu = best(lambda: topo.betti_matching(x, y, backend=args.backend, threads=args.threads), args.repeat)
        assert same_matching(m_gpu, m_cpu), f"{args.backend} matching differs from the CPU engine at {n}^3"
        t_md = float("nan")
        if dev:
            xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
            t_md, m_dev = best(
                lambda: topo.betti_matching(xt, yt, backend=args.backend, threads=args.threads), args.repeat
            )
            assert same_matching(m_dev, m_cpu), "CUDA tensor matching differs from the CPU engine"
        t_ref = float("nan")
        if ref is not None:
            t_ref, _ = best(lambda: ref.compute_matching(1.0 - pred, 1.0 - target), 1)
        match_rows.append((f"realistic {n}^3", t_mg, t_md, t_mc, t_ref, m_cpu.num_matched.tolist()))
        print(f"realistic {n}^3 identical: barcode {t_gpu:.3f}s / {t_dev:.3f}s (cpu {t_cpu:.3f}s), "
              f"matching {t_mg:.3f}s / {t_md:.3f}s (cpu {t_mc:.3f}s)", flush=True)  # a timeout keeps these

    n = 96
    pairs = [realistic_pair(n, seed) for seed in range(args.batch)]
    xs = [p.astype(np.float32) for p, _ in pairs]
    ys = [t.astype(np.float32) for _, t in pairs]
    t_cpu, bc = best(lambda: topo.barcode_batch(xs, backend="cpu", threads=args.threads), 1)
    t_gpu, bg = best(lambda: topo.barcode_batch(xs, backend=args.backend), args.repeat)
    assert all(same(a, b) for a, b in zip(bc, bg)), "batch barcodes differ"
    bar_rows.append((f"batch {args.batch} x {n}^3", t_gpu, float("nan"), t_cpu, ""))
    t_mc, mc = best(lambda: topo.betti_matching_batch(xs, ys, backend="cpu", threads=args.threads), 1)
    t_mg, mg = best(lambda: topo.betti_matching_batch(xs, ys, backend=args.backend), args.repeat)
    assert all(same_matching(a, b) for a, b in zip(mc, mg)), "batch matchings differ"
    t_md = float("nan")
    if dev:
        bx = torch.from_numpy(np.stack(xs)[:, None]).cuda()
        by = torch.from_numpy(np.stack(ys)[:, None]).cuda()
        t_md, md = best(lambda: topo.betti_matching_batch(bx, by, backend=args.backend), args.repeat)
        assert all(same_matching(a[0], b) for a, b in zip(md, mc)), "batch matchings (tensors) differ"
    t_ref = float("nan")
    if ref is not None:
        t_ref, _ = best(lambda: [ref.compute_matching(1.0 - p, 1.0 - t) for p, t in pairs], 1)
    match_rows.append((f"batch {args.batch} x {n}^3", t_mg, t_md, t_mc, t_ref, ""))

    gpu = args.backend
    print()
    print(f"barcodes: {gpu} vs CPU engine (identical pairs checked)")
    print(f"{'case':<20} {gpu + ' (numpy)':>16} {gpu + ' (tensor)':>16} {'cpu engine':>11} {'cpu/' + gpu:>10}  pairs")
    for name, tg, td, tc, np_ in bar_rows:
        print(f"{name:<20} {fmt(tg):>16} {fmt(td):>16} {fmt(tc):>11} {tc / tg:>9.1f}x  {np_}")
    print()
    print(f"Betti matching: {gpu} vs CPU engine ({args.threads} host thread(s) each; identical results checked)"
          " vs reference (1 thread)")
    print(f"{'case':<20} {gpu + ' (numpy)':>16} {gpu + ' (tensor)':>16} {'cpu engine':>11} {'cpu/' + gpu:>10} "
          f"{'reference':>10}  matched")
    for name, tg, td, tc, tr, nm in match_rows:
        print(f"{name:<20} {fmt(tg):>16} {fmt(td):>16} {fmt(tc):>11} {tc / tg:>9.1f}x {fmt(tr):>10}  {nm}")


if __name__ == "__main__":
    main()

"""Benchmark of the CUDA backend against the CPU engine (and the reference, if importable).

Barcodes of realistic predictions at 64^3, 96^3, 128^3 and a batch of 8 at 96^3, on
backend="cuda" and backend="cpu", checked identical; Betti matching of the same pairs
on the CPU engine against Betti-Matching-3D (the matching has no device path yet, see
medseg/topology/csrc/CUDA.md). Needs numpy (scipy only to build the data if present).

Usage: python benchmarks/gpu_bench.py [--repeat 3] [--sizes 64 96 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 96, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backend", default="cuda", help=argparse.SUPPRESS)  # cpu-parallel: dry run without GPU
    args = ap.parse_args()
    if args.backend == "cuda" and not _inputs.cuda_available():
        sys.exit("no CUDA backend or device: nothing to benchmark")
    try:
        import torch

        dev = torch.cuda.is_available()
    except ImportError:
        torch, dev = None, False
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "topology"))
    try:
        from _bm_reference import load_reference

        ref = load_reference()
    except Exception:  # pytest missing or reference not installed
        ref = None

    rows = []
    topo.barcode(np.zeros((8, 8, 8)), backend=args.backend)  # warm-up (context, CUB)
    for n in args.sizes:
        pred, target = realistic_pair(n)
        x = pred.astype(np.float32)
        t_cpu, b_cpu = best(lambda: topo.barcode(x, backend="cpu"), args.repeat)
        t_gpu, b_gpu = best(lambda: topo.barcode(x, backend=args.backend), args.repeat)
        t_dev = float("nan")
        if dev:
            xt = torch.from_numpy(x).cuda()
            t_dev, b_dev = best(lambda: topo.barcode(xt, backend=args.backend), args.repeat)
            assert same(b_dev, b_cpu), "CUDA tensor barcode differs from the CPU engine"
        assert same(b_gpu, b_cpu), f"CUDA barcode differs from the CPU engine at {n}^3"
        t_m, _ = best(lambda: topo.betti_matching(pred, target, threads=2), 1)
        t_ref = float("nan")
        if ref is not None:
            t_ref, _ = best(lambda: ref.compute_matching(1.0 - pred, 1.0 - target), 1)
        rows.append((f"realistic {n}^3", t_gpu, t_dev, t_cpu, t_m, t_ref, b_cpu.num_pairs.tolist()))

    n = 96
    pairs = [realistic_pair(n, seed) for seed in range(args.batch)]
    xs = [p.astype(np.float32) for p, _ in pairs]
    t_cpu, bc = best(lambda: topo.barcode_batch(xs, backend="cpu", threads=2), 1)
    t_gpu, bg = best(lambda: topo.barcode_batch(xs, backend=args.backend), args.repeat)
    assert all(same(a, b) for a, b in zip(bc, bg)), "batch barcodes differ"
    t_m, _ = best(lambda: topo.betti_matching_batch([p for p, _ in pairs], [t for _, t in pairs], threads=2), 1)
    t_ref = float("nan")
    if ref is not None:
        t_ref, _ = best(lambda: [ref.compute_matching(1.0 - p, 1.0 - t) for p, t in pairs], 1)
    rows.append((f"batch {args.batch} x {n}^3", t_gpu, float("nan"), t_cpu, t_m, t_ref, ""))

    print()
    print("barcodes: CUDA backend vs CPU engine (identical pairs checked); matching: CPU engine vs reference")
    hdr = f"{'case':<20} {'cuda (numpy in)':>15} {'cuda (tensor)':>13} {'cpu engine':>11} {'cpu/cuda':>9} "
    hdr += f"{'matching cpu':>13} {'reference':>10}  pairs"
    print(hdr)
    for name, tg, td, tc, tm, tr, pairs_ in rows:
        print(
            f"{name:<20} {tg:>14.3f}s {td:>12.3f}{"s" if td == td else " "} {tc:>10.3f}s {tc / tg:>8.1f}x {tm:>12.3f}s {tr:>9.3f}{"s" if tr == tr else " "}  {pairs_}"
        )


if __name__ == "__main__":
    main()

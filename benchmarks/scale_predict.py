#!/usr/bin/env python
"""Benchmark item 5: ``medseg predict`` of one full-size CT against a plain MONAI loop.

One synthetic CT-like scan (int16 HU, 512x512x400 at 0.7x0.7x1 mm by default: body
ellipse, spine, vessels, noise; deterministic by seed) and one run folder with a 2-class
3D UNet at 0.8x0.8x1 mm, patch 128^3. The UNet has **random weights** (seeded): time
and memory do not depend on what the weights are, only on the shapes.

Each side runs in its own fresh process, measured from outside: wall time and peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``).

- ``medseg predict`` (the CLI), without TTA, and with ``--tta --save-probabilities``;
- a plain MONAI loop, the script a user would write: nibabel read, ``Spacing`` to
  0.8x0.8x1 mm, CT normalisation, ``sliding_window_inference`` (same window, overlap,
  gaussian blending, windows per batch), softmax, ``SpatialResample`` back to the scan's
  grid, argmax, nibabel write (no TTA);
- a baseline process that imports torch, MONAI and medseg, loads the model and runs one
  batch of windows: its peak RSS is the "model" share, so ``peak - baseline`` is what
  the scan itself costs, reported against the scan's size as float32.

    python benchmarks/scale_predict.py               # full size: ~10 min on 2 CPU cores
    python benchmarks/scale_predict.py --quick       # 256x256x200, ~1 min
    python benchmarks/scale_predict.py --no-tta-run  # skip the (8x slower) TTA run

``run_predict_benchmark(args)`` (``args`` from :func:`build_parser`) returns the rows;
``benchmarks/scale.py`` calls it for its item 5.
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install`
    sys.path.insert(0, str(REPO))

import numpy as np

MODEL_SPACING = (0.8, 0.8, 1.0)
CT_STATS = {"clip": [-200.0, 600.0], "mean": 100.0, "std": 150.0}  # the run's "fitted" CT statistics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="scan shape (voxels)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0], help="scan spacing (mm)")
    parser.add_argument("--quick", action="store_true", help="256x256x200 instead of --shape")
    parser.add_argument("--patch", type=counting(8), default=128, help="sliding window (cube side)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--device", default="cpu", help="device of both sides")
    parser.add_argument("--no-tta-run", action="store_true", help="skip medseg's --tta --save-probabilities run")
    parser.add_argument("--extra", default="", help="extra `medseg predict` options, e.g. '--stitch-device cpu'")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the scan and run here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", choices=["monai", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------- inputs

def make_scan(path: Path, shape, spacing, seed: int = 0) -> None:
    """A CT-like int16 scan in HU: air, a body ellipse, a spine, branching-ish vessels, noise."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2)[:, None] / (0.42 * nx)
    y = (np.arange(ny) - ny / 2)[None, :] / (0.32 * ny)
    body = x**2 + y**2 < 1
    spine = (np.arange(nx)[:, None] - nx / 2) ** 2 + (np.arange(ny)[None, :] - 0.68 * ny) ** 2 < (0.05 * nx) ** 2
    vessels = [(rng.uniform(0.3, 0.7) * nx, rng.uniform(0.3, 0.6) * ny, rng.uniform(3, 9), rng.uniform(0, 6.3))
               for _ in range(12)]
    image = np.empty(shape, dtype=np.int16)
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    for k in range(nz):  # slice by slice: the generator itself stays small
        hu = np.where(body, 40.0, -1000.0)
        hu[spine] = 700.0
        for cx, cy, r, phase in vessels:
            wx = cx + 0.08 * nx * np.sin(k / nz * 6.3 + phase)
            wy = cy + 0.05 * ny * np.cos(k / nz * 4.1 + phase)
            hu[(ii - wx) ** 2 + (jj - wy) ** 2 < r * r] = 250.0
        hu += rng.normal(0, 20, size=hu.shape)
        image[:, :, k] = np.clip(hu, -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(image, affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def make_run(root: Path, patch: int, sw_batch_size: int, seed: int = 0) -> Path:
    """A run folder with a random-weight 2-class 3D UNet trained 'at' MODEL_SPACING."""
    import torch

    from medseg.config import validate_config
    from medseg.models.factory import build_model
    from medseg.runfolder.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    cfg = validate_config({
        "data": {"dataset": str(root / "dataset"), "patch_size": [patch] * 3, "target_spacing": list(MODEL_SPACING)},
        "model": {"name": "unet", "params": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0}},
        "train": {"iterations": 1},
        "inference": {"sw_batch_size": sw_batch_size, "overlap": 0.5, "mode": "gaussian"},
        "output_dir": str(root),
    })
    net = build_model(cfg.model, 3, 1, 2, [patch] * 3)
    save_checkpoint(root / "checkpoints" / "best.pt", {
        "iteration": 0,
        "config": cfg.model_dump(mode="json"),
        "dataset": {"channel_names": {"0": "CT"}, "labels": {"background": 0, "vessel": 1},
                    "file_ending": ".nii.gz", "numTraining": 1},
        "preprocessing": {"version": 1, "channels": [{"name": "CT", "scheme": "ct", **CT_STATS}]},
        "model": net.state_dict(),
    })
    return root


# --------------------------------------------------------------------------- the children

def _load_net(run: Path):
    import torch

    from medseg.config import validate_config
    from medseg.models.factory import build_model

    ckpt = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    cfg = validate_config(ckpt["config"])
    net = build_model(cfg.model, 3, 1, 2, list(cfg.data.patch_size))
    net.load_state_dict(ckpt["model"])
    return net.eval(), cfg


def child_monai(args) -> None:
    """The plain MONAI loop (what a user writes by hand)."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Spacing, SpatialResample

    torch.set_num_threads(args.threads)
    net, cfg = _load_net(args.run)
    device = torch.device(args.device)
    net.to(device)
    nii = nib.load(str(args.scan))
    image = MetaTensor(torch.from_numpy(np.asanyarray(nii.dataobj).astype(np.float32))[None],
                       affine=torch.as_tensor(nii.affine))
    image = Spacing(pixdim=MODEL_SPACING, mode="bilinear", padding_mode="border")(image)
    image = (image.clamp(*CT_STATS["clip"]) - CT_STATS["mean"]) / CT_STATS["std"]
    with torch.no_grad():
        logits = sliding_window_inference(
            image[None].to(device), list(cfg.data.patch_size), args.sw_batch_size, net,
            overlap=args.overlap, mode="gaussian", device=torch.device("cpu"),
        )
    prob = torch.softmax(logits[0], dim=0)
    del logits, image
    prob = SpatialResample(mode="bilinear", padding_mode="border")(
        prob, dst_affine=torch.as_tensor(nii.affine), spatial_size=nii.shape
    )
    label = prob.argmax(0).to(torch.uint8).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, nii.affine), str(args.out / "scan.nii.gz"))


def child_baseline(args) -> None:
    """Imports, the model, and one batch of windows: the fixed cost of a predict process."""
    import torch

    import medseg.inference  # noqa: F401  (what `medseg predict` imports)

    torch.set_num_threads(args.threads)
    net, cfg = _load_net(args.run)
    net.to(args.device)
    with torch.no_grad():
        net(torch.zeros(args.sw_batch_size, 1, *cfg.data.patch_size, device=args.device))


# --------------------------------------------------------------------------- measuring

def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; its wall time and peak RSS (this child only: ``os.wait4``'s rusage)."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-8:]
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n" + "\n".join(tail))
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_predict_benchmark(args: argparse.Namespace) -> list[dict]:
    """Make the inputs, run every side in its own process, print and return the rows."""
    shape = (256, 256, 200) if args.quick else tuple(args.shape)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="medseg-scale-predict-")
        work = Path(tmp.name)
    else:
        work = args.workdir
    try:
        scan_dir = work / f"scan_{'x'.join(map(str, shape))}"
        scan = scan_dir / "scan_0000.nii.gz"
        if not scan.is_file():
            print(f"making {scan} ...", file=sys.stderr)
            make_scan(scan, shape, args.spacing)
        run = make_run(work / "run", args.patch, args.sw_batch_size)
        input_mib = float(np.prod(shape)) * 4 / 2**20
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--run", str(run), "--scan", str(scan), "--threads", str(args.threads), "--device", args.device,
                  "--sw-batch-size", str(args.sw_batch_size), "--overlap", str(args.overlap)]
        predict = [sys.executable, "-m", "medseg", "predict", "--model", str(run), "--input", str(scan_dir),
                   "--overwrite", "--device", args.device, "--overlap", str(args.overlap),
                   "--sw-batch-size", str(args.sw_batch_size), *args.extra.split()]
        sides = [("baseline (imports + model + one window batch)", me + ["--child", "baseline", *common])]
        sides.append(("medseg predict", predict + ["--output", str(work / "pred"), "--no-tta"]))
        if not args.no_tta_run:
            sides.append(("medseg predict --tta --save-probabilities",
                          predict + ["--output", str(work / "pred_tta"), "--tta", "--save-probabilities"]))
        sides.append(("plain MONAI loop", me + ["--child", "monai", *common, "--out", str(work / "pred_monai")]))

        rows = []
        for name, cmd in sides:
            print(f"running {name} ...", file=sys.stderr)
            rows.append({"side": name, **measure(cmd, env)})
        base = rows[0]["peak_rss_mib"]
        monai = next(r for r in rows if r["side"] == "plain MONAI loop")
        for r in rows:
            r["over_baseline_mib"] = r["peak_rss_mib"] - base
            r["over_baseline_per_input"] = r["over_baseline_mib"] / input_mib
            r["time_vs_monai"] = r["wall_s"] / monai["wall_s"]
            r["rss_vs_monai"] = r["peak_rss_mib"] / monai["peak_rss_mib"]
        labels = {p: work / p / "scan.nii.gz" for p in ("pred", "pred_monai")}
        agree = _agreement(labels["pred"], labels["pred_monai"])

        print(f"\nscan {'x'.join(map(str, shape))} at {'x'.join(f'{s:g}' for s in args.spacing)} mm, "
              f"float32 {input_mib:.0f} MiB; model grid {'x'.join(f'{s:g}' for s in MODEL_SPACING)} mm, "
              f"patch {args.patch}^3, overlap {args.overlap}, {args.sw_batch_size} windows/batch, "
              f"{args.threads} threads, {args.device}; random-weight UNet (8, 16, 32, 64)")
        print("| side | wall (s) | peak RSS (MiB) | peak − baseline (MiB) | ÷ float32 input | time / MONAI | RSS / MONAI |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['side']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['over_baseline_mib']:.0f} | "
                  f"{r['over_baseline_per_input']:.2f} | {r['time_vs_monai']:.2f} | {r['rss_vs_monai']:.2f} |")
        print(f"label maps medseg vs MONAI loop: {agree:.4%} of voxels equal")
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "rows": rows, "label_agreement": agree}, indent=2))
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def _agreement(a: Path, b: Path) -> float:
    import nibabel as nib

    x = np.asanyarray(nib.load(str(a)).dataobj)
    y = np.asanyarray(nib.load(str(b)).dataobj)
    return float((x == y).mean())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child == "monai":
        child_monai(args)
    elif args.child == "baseline":
        child_baseline(args)
    else:
        run_predict_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

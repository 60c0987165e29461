#!/usr/bin/env python
"""medseg on a real-sized dataset: preprocessing, loader throughput, memory, start-up.

A CT-like dataset made here (int16 HU, 512x512x100 voxels at 0.7x0.7x2.5 mm: a body
ellipse of soft tissue in air, noise, and thin tortuous vessels of 0.8-2.5 mm radius
as the label; deterministic by seed; 40 cases, 12 smaller ones with ``--quick``),
then, side by side in one run, with ratios:

``--storage``
    How a preprocessed case is best stored for random patch reads: 96^3 reads at
    random places of float32 cases preprocessed by medseg, from Blosc2 (LZ4, as the
    cache writes it; ZSTD), zarr 3 (if installed) and ``np.load(mmap_mode='r')``,
    "cold" (the case's file evicted from the page cache before each read,
    ``posix_fadvise(DONTNEED)``) and warm; and the bytes per case.
1. ``medseg plan`` + ``medseg preprocess`` against ``nnUNetv2_plan_and_preprocess -c
   3d_fullres`` on the same raw data with the same number of processes: wall time and
   peak memory (the sum over the process tree, sampled every 50 ms).
2. Training-data throughput, patches per second at the planned patch size with
   augmentation, after the workers started: medseg's loader (``patch_loader`` over the
   cache) against nnU-Net's ``nnUNetTrainer.get_dataloaders()`` (its data loader and
   batchgeneratorsv2 augmentation on its own preprocessed data), same worker count.
   nnU-Net's default augmentation does more per patch than medseg's (mirroring,
   low-resolution simulation, two gamma steps, deep-supervision targets), so a second
   row times both at equal work: medseg with every augmentation probability 0 against
   ``nnUNetTrainerNoDA`` (crop, oversampling and batching only; nnU-Net still makes its
   deep-supervision targets).
3. Peak RSS of a short ``medseg train`` (tiny UNet, warm cache, a few iterations and one
   validation) with 10, 20 and 40 cases (10 % of them validation cases): the training
   process's own peak (``wait4``) and the process tree's (with the DataLoader workers,
   whose shared pages count once per process there).
4. Time from ``medseg train`` to the end of the first iteration, warm cache, 40 cases.
5. ``--predict``: ``benchmarks/scale_predict.py`` (prediction of a full-size CT).

Items 1 and 2 need nnU-Net v2 in its own environment (``--nnunet-python``, e.g.
``.venv-nnunet/bin/python``); without it they are skipped with the reason.

    python benchmarks/scale.py --quick                     # ~10 min on 2 cores
    python benchmarks/scale.py --nnunet-python .venv-nnunet/bin/python
    python benchmarks/scale.py --only memory,startup       # a subset of the items
    python benchmarks/scale.py --storage --only storage

The dataset, caches and runs stay in ``--workdir`` (default ``/tmp/medseg-scale``), so a
second run skips the generation (and, where the cache is warm, the preprocessing).
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import medseg  # noqa: F401
except ImportError:  # a checkout without `pip install`
    sys.path.insert(0, str(REPO))

DATASET_ID = 950
DATASET_NAME = f"Dataset{DATASET_ID}_ScaleCT"
ITEMS = ("storage", "preprocess", "throughput", "memory", "startup", "predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 cases of 256x256x64 (subsets 4/8/12) instead of 40 of 512x512x100")
    parser.add_argument("--cases", type=counting(2), default=None, help="cases of the dataset (default 40, 12 with --quick)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="voxels per case (default 512 512 100)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 2.5], help="mm")
    parser.add_argument("--workers", type=int, default=2, help="processes of both sides (preprocessing, data loading)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medseg-scale"))
    parser.add_argument("--nnunet-python", default=None, help="python of an environment with nnunetv2 (items 1, 2)")
    parser.add_argument("--only", default=None, help=f"comma-separated items: {', '.join(ITEMS)}")
    parser.add_argument("--storage", action="store_true", help="add the storage measurement")
    parser.add_argument("--predict", action="store_true", help="add item 5 (benchmarks/scale_predict.py)")
    parser.add_argument("--patch", type=counting(8), nargs=3, default=None,
                        help="training patch (default: nnU-Net's 3d_fullres plan when item 1 ran, else 192 192 48)")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader (item 2)")
    parser.add_argument("--reads", type=int, default=40, help="patch reads per storage format and state")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=["nnunet_loader"], help=argparse.SUPPRESS)
    parser.add_argument("--trainer", default="nnUNetTrainer", help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------- the dataset

def _ball(radius_mm: float, spacing) -> np.ndarray:
    r = [int(math.ceil(radius_mm / s)) for s in spacing]
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij"), -1).reshape(-1, 3)
    mm = grid * np.asarray(spacing)
    return grid[(mm**2).sum(1) <= radius_mm**2]


def make_ct_case(index: int, shape, spacing, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU image and uint8 vessel label of case ``index`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    xx, yy = np.ogrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2 + rng.normal(0, shape[0] * 0.02), shape[1] / 2 + rng.normal(0, shape[1] * 0.02)
    ax, ay = shape[0] * rng.uniform(0.38, 0.45), shape[1] * rng.uniform(0.30, 0.38)
    body = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1  # (X, Y), extruded along z
    label = np.zeros(shape, np.uint8)
    extent = np.asarray(shape) * spacing
    for _ in range(int(rng.integers(8, 14))):
        offsets = _ball(rng.uniform(0.8, 2.5), spacing)
        while True:  # a start inside the body
            p = rng.uniform(0.1, 0.9, 3) * extent
            v = (p / spacing).astype(int)
            if body[v[0], v[1]]:
                break
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        for _ in range(int(rng.integers(150, 400))):
            v = np.round(p / spacing).astype(int)
            if np.any(v < 0) or np.any(v >= shape) or not body[v[0], v[1]]:
                break
            idx = np.clip(v + offsets, 0, np.asarray(shape) - 1)
            label[idx[:, 0], idx[:, 1], idx[:, 2]] = 1
            d = d + rng.normal(0, 0.15, 3)
            d /= np.linalg.norm(d)
            p = p + d * 0.7
    image = rng.standard_normal(shape, dtype=np.float32) * 15.0
    image += np.where(body[:, :, None], np.float32(40.0), np.float32(-1000.0))
    image[label > 0] += 260.0
    return np.clip(image, -1024, 3000).astype(np.int16), label


def _write_case(args) -> None:
    root, index, shape, spacing, seed = args
    from medseg.data.io import ImageGeometry, write_image

    image_file = root / "imagesTr" / f"ct_{index:03d}_0000.nii.gz"
    label_file = root / "labelsTr" / f"ct_{index:03d}.nii.gz"
    if image_file.is_file() and label_file.is_file():
        return
    image, label = make_ct_case(index, shape, spacing, seed)
    geometry = ImageGeometry.from_spacing(tuple(shape), tuple(spacing))
    write_image(label_file, label, geometry)
    write_image(image_file, image, geometry)


def make_dataset(root: Path, cases: int, shape, spacing, workers: int) -> Path:
    from medseg.data.dataset import write_dataset_json

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_case, [(root, i, tuple(shape), tuple(spacing), 0) for i in range(cases)]))
    write_dataset_json(root, channel_names={0: "CT"}, labels={"background": 0, "vessel": 1}, num_training=cases,
                       file_ending=".nii.gz", name=DATASET_NAME)
    print(f"dataset: {cases} cases of {'x'.join(map(str, shape))} at {spacing} mm in {root} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return root


# --------------------------------------------------------------------------- measuring

def _tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def run_measured(cmd: list[str], env: dict[str, str] | None = None, until: Path | None = None,
                 cwd: Path | None = None) -> dict[str, float]:
    """Run ``cmd``; wall time, its own peak RSS (wait4) and the tree's sampled peak (MB).

    With ``until``, the time until that file appears is recorded as ``until_s`` and the
    process is then stopped.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0.0}
    result: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], sum(_rss_mb(p) for p in _tree(proc.pid)))
            if until is not None and "until_s" not in result and until.exists():
                result["until_s"] = time.perf_counter() - start
                proc.send_signal(signal.SIGTERM)  # measured; the rest of the run is not
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if proc.returncode != 0 and until is None:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    result.update(wall_s=time.perf_counter() - start, peak_mb=usage.ru_maxrss / 1024, tree_peak_mb=peak["tree"])
    return result


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------- medseg runs

def medseg_raw(args, dataset: Path, split: Path | None, out: Path, patch, **train) -> dict[str, Any]:
    return {
        "data": {
            "dataset": str(dataset),
            "patch_size": list(patch),
            "target_spacing": None,
            "cache_dir": str(args.workdir / "cache"),
            "foreground_oversample": 0.33,
            **({"split_file": str(split)} if split is not None else {"val_fraction": 0.1}),
        },
        "model": {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}},
        "train": {"iterations": 6, "batch_size": 2, "val_interval": 6, "checkpoint_interval": 6, "log_interval": 1,
                  "amp": False, **train},
        "inference": {"overlap": 0.0, "sw_batch_size": 2},
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
    }


def _split(args, names: list[str], n: int) -> Path:
    val = max(1, round(0.1 * n))
    path = args.workdir / f"split_{n}.json"
    path.write_text(json.dumps({"train": names[: n - val], "val": names[n - val : n]}))
    return path


def _write_config(path: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def _preprocess(args, config: Path) -> dict[str, float]:
    return run_measured([sys.executable, "-m", "medseg", "preprocess", str(config), "--workers", str(args.workers)],
                        env=_env(OMP_NUM_THREADS="1"))


# --------------------------------------------------------------------------- storage

def storage_benchmark(args, dataset: Path) -> list[list[Any]]:
    """Random 96^3 reads from 4 cases stored in each format.

    The cases are the raw scans z-scored to float32: noisy float32, the hard case for
    compression. (medseg's cache of this dataset compresses far better: the CT scheme
    clips to the vessels' intensity window, which makes most voxels one value.)
    """
    import blosc2

    from medseg.data.io import read_image
    from medseg.preprocessing.storage import encode_array

    bench = args.workdir / "storage"
    shutil.rmtree(bench, ignore_errors=True)
    bench.mkdir(parents=True)
    arrays = []
    for f in sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[:4]:
        image = read_image(f)[0].astype(np.float32)
        arrays.append(((image - image.mean()) / image.std())[None])
    formats: dict[str, tuple[Any, Any]] = {}

    def b2(name: str, codec: str, clevel: int) -> None:
        for i, a in enumerate(arrays):
            chunks, blocks = (1, 64, 64, 64), (1, 16, 16, 16)
            data = blosc2.asarray(np.ascontiguousarray(a), chunks=chunks, blocks=blocks,
                                  cparams={"codec": getattr(blosc2.Codec, codec), "clevel": clevel, "nthreads": 1})
            (bench / f"{name}_{i}.b2nd").write_bytes(data.to_cframe())
        formats[name] = (lambda i, n=name: blosc2.open(str(bench / f"{n}_{i}.b2nd"), mode="r", dparams={"nthreads": 1}),
                         lambda i, n=name: [bench / f"{n}_{i}.b2nd"])

    for i, a in enumerate(arrays):  # what medseg writes
        (bench / f"medseg_{i}.b2nd").write_bytes(encode_array(a))
    formats["Blosc2 LZ4 (medseg's cache)"] = (
        lambda i: blosc2.open(str(bench / f"medseg_{i}.b2nd"), mode="r", dparams={"nthreads": 1}),
        lambda i: [bench / f"medseg_{i}.b2nd"])
    b2("Blosc2 ZSTD(1)", "ZSTD", 1)
    b2("Blosc2 ZSTD(8) (nnU-Net's)", "ZSTD", 8)
    try:
        import zarr

        for i, a in enumerate(arrays):
            z = zarr.create_array(store=str(bench / f"zarr_{i}.zarr"), shape=a.shape, chunks=(1, 64, 64, 64),
                                  dtype="float32",
                                  compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
            z[:] = a
        formats["zarr 3, Blosc LZ4"] = (lambda i: zarr.open_array(str(bench / f"zarr_{i}.zarr"), mode="r"),
                                        lambda i: [p for p in (bench / f"zarr_{i}.zarr").rglob("*") if p.is_file()])
    except ImportError:
        print("storage: zarr not installed, skipped", file=sys.stderr)
    for i, a in enumerate(arrays):
        np.save(bench / f"npy_{i}.npy", a)
    formats["numpy .npy, mmap_mode='r'"] = (lambda i: np.load(bench / f"npy_{i}.npy", mmap_mode="r"),
                                            lambda i: [bench / f"npy_{i}.npy"])

    def evict(files: list[Path]) -> None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    patch = (96, 96, 96)
    rows, base = [], {}
    for name, (opener, files) in formats.items():
        size = sum(f.stat().st_size for f in files(0)) / 1e6
        result = {}
        for state in ("cold", "warm"):
            rng = np.random.default_rng(1)
            times = []
            for _ in range(args.reads):
                i = int(rng.integers(len(arrays)))
                if state == "cold":
                    evict(files(i))
                array = opener(i)
                shape = array.shape[1:]
                lo = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, patch)]
                t = time.perf_counter()
                np.ascontiguousarray(array[(slice(None), *(slice(a, a + p) for a, p in zip(lo, patch)))])
                times.append(time.perf_counter() - t)
            result[state] = float(np.median(times)) * 1e3
        base = base or result
        rows.append([name, _f(size, 1), _f(result["cold"], 1), _f(result["warm"], 1),
                     _f(result["cold"] / base["cold"]), _f(result["warm"] / base["warm"])])
    shutil.rmtree(bench, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- nnU-Net

_NNUNET_PLAN = (
    "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry; "
    "sys.argv = ['nnUNetv2_plan_and_preprocess'] + sys.argv[1:]; plan_and_preprocess_entry()"
)


def _nnunet_env(args) -> dict[str, str]:
    base = args.workdir / "nnunet"
    return {**os.environ, "nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "preprocessed"),
            "nnUNet_results": str(base / "results"), "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": str(args.workers)}


def nnunet_plan_and_preprocess(args, dataset: Path) -> dict[str, float]:
    env = _nnunet_env(args)
    raw = Path(env["nnUNet_raw"])
    raw.mkdir(parents=True, exist_ok=True)
    link = raw / DATASET_NAME
    if not link.exists():
        link.symlink_to(dataset.resolve())
    shutil.rmtree(Path(env["nnUNet_preprocessed"]) / DATASET_NAME, ignore_errors=True)
    return run_measured([args.nnunet_python, "-c", _NNUNET_PLAN, "-d", str(DATASET_ID), "-c", "3d_fullres",
                         "-npfp", str(args.workers), "-np", str(args.workers)], env=env)


def nnunet_patch(args) -> tuple[list[int], int] | None:
    """nnU-Net's 3d_fullres patch in medseg's voxel order, and its batch size."""
    plans = Path(_nnunet_env(args)["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json"
    if not plans.is_file():
        return None
    p = json.loads(plans.read_text())
    c = p["configurations"]["3d_fullres"]
    back = p.get("transpose_backward", [0, 1, 2])
    patch_sitk = [c["patch_size"][i] for i in back]  # SimpleITK's (z, y, x) order
    return list(reversed(patch_sitk)), int(c["batch_size"])


def child_nnunet_loader(batches: int, trainer_name: str) -> None:
    """In the nnU-Net environment: patches/s of ``trainer_name``'s training data loader."""
    import nnunetv2.run.run_training as run_training
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

    # nnU-Net finds a trainer by importing every trainer module, and one of them imports
    # torchvision, whose compiled operators do not match the pinned CPU torch here
    known = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerNoDA": nnUNetTrainerNoDA}
    run_training.recursive_find_trainer_class_by_name = lambda name: known[name]
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, trainer_name=trainer_name, device=torch.device("cpu"))
    trainer.initialize()  # batch size, oversampling, the network (for the deep-supervision scales)
    loader, val_loader = trainer.get_dataloaders()
    batch = None
    for _ in range(3):
        batch = next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    elapsed = time.perf_counter() - start
    size = int(batch["data"].shape[0])
    print(json.dumps({"patches_per_s": batches * size / elapsed, "patch": list(batch["data"].shape[2:]), "batch": size}))
    for gen in (loader, val_loader):
        if hasattr(gen, "_finish"):
            gen._finish()
    os._exit(0)


def medseg_throughput(args, config_raw: dict[str, Any], batches: int) -> float:
    import torch

    from medseg.config import validate_config
    from medseg.training.data import prepare_data
    from medseg.training.sampling import patch_loader

    torch.set_num_threads(1)
    data = prepare_data(validate_config(config_raw))
    loader = iter(patch_loader(data.train_set, 0, config_raw["train"]["batch_size"], 0, batches + 3, args.workers,
                               pin_memory=False))
    for _ in range(3):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * config_raw["train"]["batch_size"] / (time.perf_counter() - start)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child == "nnunet_loader":
        child_nnunet_loader(args.batches, args.trainer)
        return 0
    items = set(args.only.split(",")) if args.only else set(ITEMS) - {"storage", "predict"}
    if args.storage:
        items.add("storage")
    if args.predict:
        items.add("predict")
    cases = args.cases or (12 if args.quick else 40)
    shape = args.shape or ([256, 256, 64] if args.quick else [512, 512, 100])
    args.workdir.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(args.workdir / DATASET_NAME, cases, shape, args.spacing, args.workers)
    names = [f"ct_{i:03d}" for i in range(cases)]
    subsets = [max(cases // 4, 2), max(cases // 2, 3), cases]
    nnunet = args.nnunet_python if args.nnunet_python and Path(args.nnunet_python).exists() else None
    why_not = "no --nnunet-python given" if not args.nnunet_python else f"{args.nnunet_python} not found"
    results: dict[str, Any] = {"cases": cases, "shape": shape, "spacing": args.spacing, "workers": args.workers}
    env1 = _env(OMP_NUM_THREADS="1")

    # 1. plan + preprocess
    if "preprocess" in items:
        rows = []
        plan_dir = args.workdir / "plan"
        shutil.rmtree(plan_dir, ignore_errors=True)
        shutil.rmtree(args.workdir / "cache_planned", ignore_errors=True)
        plan = run_measured([sys.executable, "-m", "medseg", "plan", str(dataset), "-o", str(plan_dir / "config.yaml"),
                             "--workers", str(args.workers)], env=env1)
        planned = plan_dir / "config.yaml"
        pre = run_measured([sys.executable, "-m", "medseg", "preprocess", str(planned), "--workers", str(args.workers),
                            "--set", f"data.cache_dir={args.workdir / 'cache_planned'}"], env=env1)
        ours = {"wall_s": plan["wall_s"] + pre["wall_s"], "tree_peak_mb": max(plan["tree_peak_mb"], pre["tree_peak_mb"])}
        results["preprocess_medseg"] = {"plan": plan, "preprocess": pre}
        if nnunet:
            theirs = nnunet_plan_and_preprocess(args, dataset)
            results["preprocess_nnunet"] = theirs
            rows.append(["wall time (s)", _f(ours["wall_s"], 0), _f(theirs["wall_s"], 0), _f(ours["wall_s"] / theirs["wall_s"])])
            rows.append(["peak memory, process tree (MB)", _f(ours["tree_peak_mb"], 0), _f(theirs["tree_peak_mb"], 0),
                         _f(ours["tree_peak_mb"] / theirs["tree_peak_mb"])])
        else:
            rows.append(["wall time (s)", _f(ours["wall_s"], 0), f"skipped: {why_not}", ""])
            rows.append(["peak memory, process tree (MB)", _f(ours["tree_peak_mb"], 0), "", ""])
        rows.append(["  of which medseg plan (s)", _f(plan["wall_s"], 0), "", ""])
        _table(f"1. plan + preprocess, {cases} cases, {args.workers} processes",
               ["", "medseg", "nnU-Net v2 (3d_fullres)", "medseg / nnU-Net"], rows)

    found = nnunet_patch(args) if nnunet else None
    patch = args.patch or (found[0] if found else [192, 192, 48])
    batch = found[1] if found else 2
    results["patch"], results["batch"] = patch, batch

    # the caches of the subsets (preprocessed once; later runs find them warm)
    splits = {n: _split(args, names, n) for n in subsets}
    configs = {n: _write_config(args.workdir / f"config_{n}.yaml",
                                medseg_raw(args, dataset, splits[n], args.workdir / f"run_{n}", patch, batch_size=batch))
               for n in subsets}
    cold = {}
    for n in subsets:
        cold[n] = _preprocess(args, configs[n])
        print(f"medseg preprocess, {n} cases: {cold[n]['wall_s']:.0f} s (warm if ~5 s)", file=sys.stderr)
    results["preprocess_subsets"] = cold

    if "storage" in items:
        rows = storage_benchmark(args, dataset)
        results["storage"] = rows
        _table(f"storage: median time of a 96^3 read at a random place, 4 z-scored cases of {'x'.join(map(str, shape))} float32",
               ["format", "MB/case", "cold (ms)", "warm (ms)", "cold / medseg", "warm / medseg"], rows)

    # 2. throughput: as configured, then at equal work (no augmentation on either side)
    if "throughput" in items:
        rows = []
        no_augmentation = {k: 0.0 for k in ("flip_prob", "rotate90_prob", "affine_prob", "intensity_scale_prob",
                                            "intensity_shift_prob", "gaussian_noise_prob", "gaussian_smooth_prob",
                                            "gamma_prob")}
        for label, augmentation, trainer in (("default augmentation", {}, "nnUNetTrainer"),
                                             ("no augmentation (equal work)", no_augmentation, "nnUNetTrainerNoDA")):
            raw = medseg_raw(args, dataset, splits[cases], args.workdir / "run_tp", patch, batch_size=batch)
            raw["data"]["augmentation"] = augmentation
            ours_tp = medseg_throughput(args, raw, args.batches)
            row = [label, _f(ours_tp), "", ""]
            if nnunet:
                done = subprocess.run([nnunet, str(Path(__file__).resolve()), "--child", "nnunet_loader", "--batches",
                                       str(args.batches), "--trainer", trainer, "--workdir", str(args.workdir)],
                                      env=_nnunet_env(args), capture_output=True, text=True)
                if done.returncode == 0:
                    theirs_tp = json.loads(done.stdout.strip().splitlines()[-1])
                    row[2:] = [_f(theirs_tp["patches_per_s"]), _f(ours_tp / theirs_tp["patches_per_s"])]
                    results[f"throughput_nnunet_{trainer}"] = theirs_tp
                else:
                    row[2] = "failed: " + done.stderr.strip().splitlines()[-1][:80]
            else:
                row[2] = f"skipped: {why_not}"
            results[f"throughput_medseg_{trainer}"] = ours_tp
            rows.append(row)
        _table(f"2. training data throughput (patches/s), patch {'x'.join(map(str, patch))}, batch {batch}, "
               f"{args.workers} workers", ["", "medseg", "nnU-Net v2", "medseg / nnU-Net"], rows)

    # 3. memory
    if "memory" in items:
        rows, peaks = [], {}
        for n in subsets:
            out = args.workdir / f"run_{n}"
            shutil.rmtree(out, ignore_errors=True)
            m = run_measured([sys.executable, "-m", "medseg", "train", str(configs[n])], env=env1)
            peaks[n] = m
            rows.append([n, _f(m["peak_mb"], 0), _f(m["tree_peak_mb"], 0), _f(m["peak_mb"] - peaks[subsets[0]]["peak_mb"], 0),
                         _f(m["wall_s"], 0)])
        results["memory"] = peaks
        _table("3. peak RSS of a short medseg train (warm cache; 10 % validation cases)",
               ["cases", "training process (MB)", "with workers (MB)", f"growth over {subsets[0]} cases (MB)", "wall (s)"], rows)

    # 4. start-up
    if "startup" in items:
        out = args.workdir / "run_startup"
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured([sys.executable, "-m", "medseg", "train", str(configs[cases]), "--set", f"output_dir={out}",
                          "--set", "train.iterations=50"], env=env1, until=out / "metrics.csv")
        results["startup"] = m
        _table("4. time from `medseg train` to the end of the first iteration (warm cache)",
               ["cases", "seconds", "goal"], [[cases, _f(m.get("until_s"), 1), "< 10"]])

    if "predict" in items:
        sys.path.insert(0, str(Path(__file__).parent))
        import scale_predict

        p_args = scale_predict.build_parser().parse_args(["--quick"] if args.quick else [])
        results["predict"] = scale_predict.run_predict_benchmark(p_args)

    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

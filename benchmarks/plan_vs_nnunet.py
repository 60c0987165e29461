#!/usr/bin/env python
"""``medseg plan`` against nnU-Net v2's ``nnUNetv2_plan_and_preprocess`` on three synthetic datasets.

The datasets (medseg's synthetic vessel trees, written in the nnU-Net v2 layout that both
read unchanged):

- ``iso3d``: 3D, 1 x 1 x 1 mm, 8 cases of 160^3 voxels (large enough that the 8 GB
  memory target, not the image size, bounds the patch);
- ``aniso3d``: 3D, 0.8 x 0.8 x 5 mm, 8 cases of 256 x 256 x 40 (nnU-Net's anisotropy
  rules: kernels 1 and no pooling across slices until in-plane caught up);
- ``2d``: 2D NIfTI, 1 x 1 mm, 200 cases of 256 x 256.

For each, ``medseg plan`` (this checkout, ``--model dynunet``) and
``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity -c 3d_fullres`` (``-c 2d``
for the 2D set) run with the same 8 GB target, and the table gives target spacing, patch,
batch and strides of both, in medseg's axis order (nnU-Net's are reversed, as SimpleITK
reads arrays, and transposed to put the coarsest axis first; both are undone here).

nnU-Net runs from its own environment, given by ``--nnunet-python``; create it with the
torch pin (without it pip pulls a multi-GB CUDA torch)::

    python3 -m venv .venv-nnunet && .venv-nnunet/bin/pip install nnunetv2 torch==2.13.0
    python benchmarks/plan_vs_nnunet.py --nnunet-python .venv-nnunet/bin/python   # ~5 min on 2 cores

``--small`` uses tiny datasets (a smoke test of the script, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.synthetic import make_dataset  # noqa: E402

DATASETS = {
    # name: (nnU-Net id, make_dataset arguments, nnU-Net configuration)
    "iso3d": (901, dict(cases=8, size=160, dims=3, spacing=(1.0, 1.0, 1.0)), "3d_fullres"),
    "aniso3d": (902, dict(cases=8, size=(256, 256, 40), dims=3, spacing=(0.8, 0.8, 5.0)), "3d_fullres"),
    "2d": (903, dict(cases=200, size=256, dims=2, spacing=(1.0, 1.0)), "2d"),
}
SMALL = {
    "iso3d": dict(cases=4, size=48, dims=3, spacing=(1.0, 1.0, 1.0)),
    "aniso3d": dict(cases=4, size=(64, 64, 12), dims=3, spacing=(0.8, 0.8, 5.0)),
    "2d": dict(cases=8, size=64, dims=2, spacing=(1.0, 1.0)),
}
_NNUNET_ENTRY = (
    "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry; "
    "sys.argv = ['nnUNetv2_plan_and_preprocess'] + sys.argv[1:]; plan_and_preprocess_entry()"
)


def run_medseg(dataset: Path, out: Path, gpu_gb: float, workers: int) -> tuple[dict, float]:
    config = out / "config.yaml"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "medseg", "plan", str(dataset), "-o", str(config), "--gpu-memory-gb", str(gpu_gb),
         "--workers", str(workers)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "plans.json").read_text()), time.perf_counter() - start


def run_nnunet(python: str, raw: Path, pre: Path, dataset_id: int, configuration: str, gpu_gb: float, workers: int) -> tuple[dict, float]:
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(pre.parent / "results"))
    start = time.perf_counter()
    memory = ["-gpu_memory_target", str(gpu_gb)] if gpu_gb != 8 else []  # 8: nnU-Net's default
    done = subprocess.run(
        [python, "-c", _NNUNET_ENTRY, "-d", str(dataset_id), "--verify_dataset_integrity", "-c", configuration,
         "-npfp", str(workers), "-np", str(workers), *memory],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode:
        sys.exit(f"nnUNetv2_plan_and_preprocess failed on dataset {dataset_id}:\n{done.stderr[-3000:]}")
    elapsed = time.perf_counter() - start
    plans_file = next(pre.glob(f"Dataset{dataset_id:03d}_*/nnUNet*Plans*.json"))
    return json.loads(plans_file.read_text()), elapsed


def nnunet_in_medseg_order(plans: dict, configuration: str) -> dict:
    """nnU-Net's spacing, patch and strides in medseg's (i, j, k) voxel order."""
    c = plans["configurations"][configuration]
    transpose = plans["transpose_forward"]
    dims = len(c["patch_size"])
    if dims == 2:  # 2d: the in-plane axes of the transposed 3D order
        transpose = [t - 1 for t in transpose[1:]] if transpose[0] == 0 else [0, 1]

    def back(values):
        arr = [None] * dims  # undo the transpose (array order), then reverse (SimpleITK's z, y, x)
        for i, t in enumerate(transpose):
            arr[t] = values[i]
        return arr[::-1]

    arch = c.get("architecture", {}).get("arch_kwargs", {})
    strides = arch.get("strides") or c.get("pool_op_kernel_sizes")
    return {
        "target_spacing": back(c["spacing"]),
        "patch_size": back(c["patch_size"]),
        "batch_size": c["batch_size"],
        "strides": [back(s) for s in strides],
        "kernels": [back(k) for k in (arch.get("kernel_sizes") or c.get("conv_kernel_sizes"))],
    }


def _s(values, digits=3):
    return "×".join(f"{float(v):.{digits}g}" for v in values)


def _strides(strides):
    return " ".join("".join(str(int(v)) for v in s) for s in strides[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnunet-python", required=True, help="python of an environment with nnunetv2 installed")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny datasets: a smoke test")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=None)
    args = parser.parse_args(argv)
    if not shutil.which(args.nnunet_python):
        parser.error(f"--nnunet-python: {args.nnunet_python} is not an executable (see the docstring to make one)")

    work = args.out or Path(tempfile.mkdtemp(prefix="plan_vs_nnunet_"))
    raw, pre = work / "nnUNet_raw", work / "nnUNet_preprocessed"
    rows = []
    try:
        for name, (dataset_id, kwargs, configuration) in DATASETS.items():
            if args.only and name not in args.only:
                continue
            kwargs = SMALL[name] if args.small else kwargs
            folder = raw / f"Dataset{dataset_id:03d}_Synthetic{name}"
            if not (folder / "dataset.json").is_file():
                start = time.perf_counter()
                make_dataset(folder, test_cases=0, seed=0, affine="identity", name=f"Synthetic{name}", **kwargs)
                print(f"{name}: wrote {kwargs['cases']} cases of {kwargs['size']} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            ours, t_ours = run_medseg(folder, work / "medseg" / name, args.gpu_memory_gb, args.workers)
            theirs_plans, t_theirs = run_nnunet(
                args.nnunet_python, raw, pre, dataset_id, configuration, args.gpu_memory_gb, args.workers
            )
            theirs = nnunet_in_medseg_order(theirs_plans, configuration)
            rows.append((name, ours, theirs, t_ours, t_theirs))
            print(f"{name}: medseg plan {t_ours:.0f} s, nnUNetv2_plan_and_preprocess {t_theirs:.0f} s", file=sys.stderr)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedseg plan (dynunet) vs nnU-Net v2 ExperimentPlanner, {args.gpu_memory_gb:g} GB target; medseg axis order\n")
    print("| dataset | | target spacing (mm) | patch | batch | strides after level 0 | medseg's estimate |")
    print("|---|---|---|---|---|---|---|")
    for name, ours, theirs, _, _ in rows:
        same = "same" if all(abs(a - b) < 1e-3 * max(a, b) for a, b in zip(ours["target_spacing"], theirs["target_spacing"])) else "DIFFERENT"
        print(f"| {name} | medseg | {_s(ours['target_spacing'], 4)} | {_s(ours['patch_size'])} | {ours['batch_size']} | "
              f"{_strides(ours['network']['params']['strides'])} | {ours['memory']['estimate_gib']:.2f} GiB; batch: "
              f"{ours['batch_size_rule']} |")
        print(f"| | nnU-Net | {_s(theirs['target_spacing'], 4)} ({same}) | {_s(theirs['patch_size'])} | "
              f"{theirs['batch_size']} | {_strides(theirs['strides'])} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write a synthetic vessel dataset in the nnU-Net v2 layout.

    python data_scripts/make_synthetic.py --out demo/Dataset001_SyntheticVessels --cases 8 --size 64
    python data_scripts/make_synthetic.py --out demo/Dataset002_SyntheticVesselsShifted --cases 8 --size 64 --shifted
    python data_scripts/make_synthetic.py --out demo/Dataset003_Vessels2D --dims 2 --size 128 --format png
    python data_scripts/make_synthetic.py --out demo/Dataset001_SyntheticVessels --faint --loops 2   # the demo's

Same --seed (and --cases/--size/--dims) gives the same trees; --shifted images them in
the shifted domain (contrast, noise, bias, blur, resolution); --faint images them with
faint thin branches, where Dice+CE breaks topology. The generator itself is
medseg.data.synthetic (importable from tests and the demo).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.prepare.output import check_dataset_output  # noqa: E402
from medseg.data.prepare.verify import publish_dataset, temporary_dataset  # noqa: E402
from medseg.data.synthetic import AFFINE_KINDS, FAINT_DOMAIN, make_dataset  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402

FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "png": ".png", "tif": ".tif"}


MAX_SIZE = 1024
"""Voxels per axis: more is a typo on this generator (a 1024^3 float32 volume is 4 GB)."""


def _bad_argument(args: argparse.Namespace) -> str | None:
    """The first argument out of range, as one line (None when all are fine)."""
    if args.cases < 1:
        return f"--cases: at least 1 training case, got {args.cases}"
    if args.test_cases < 0:
        return f"--test-cases: must be 0 or more, got {args.test_cases}"
    if args.loops < 0:
        return f"--loops: must be 0 or more, got {args.loops}"
    if len(args.size) not in (1, args.dims):
        return f"--size: one value or {args.dims} (one per axis), got {len(args.size)}"
    if any(not 8 <= s <= MAX_SIZE for s in args.size):
        return f"--size: each axis must be 8 to {MAX_SIZE} voxels, got {' '.join(map(str, args.size))}"
    if args.spacing is not None:
        if len(args.spacing) not in (1, args.dims):
            return f"--spacing: one value or {args.dims} (one per axis), got {len(args.spacing)}"
        if any(not (math.isfinite(s) and s > 0) for s in args.spacing):
            return f"--spacing: each value must be a positive number of mm, got {' '.join(map(str, args.spacing))}"
    if not str(args.out).strip():
        return "--out: empty; name the dataset folder to create"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (dataset.json, imagesTr/, ...)")
    parser.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    parser.add_argument("--test-cases", type=int, default=2, help="cases in imagesTs/labelsTs (default 2)")
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="voxels per axis, one value or one per axis (default 64)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    domain = parser.add_mutually_exclusive_group()
    domain.add_argument("--shifted", action="store_true", help="image the same trees in the shifted domain")
    domain.add_argument("--faint", action="store_true",
                        help="faint thin branches (half the contrast, more noise, wider blur): where Dice+CE breaks topology")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loops", type=int, default=1, help="extra segments joining branches into cycles (default 1)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="source-domain voxel size in mm (default 0.8 0.8 1.2 in 3D, 1 1 in 2D)")
    parser.add_argument("--affine", choices=AFFINE_KINDS, default="flipped",
                        help="voxel axes: identity (RAS), flipped (LPS-like, as DICOM conversions give) or oblique")
    parser.add_argument("--format", choices=sorted(FORMATS), default="nii.gz", help="file format (png: 2D only)")
    parser.add_argument("--name", default=None, help="dataset name in dataset.json")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    problem = _bad_argument(args)
    if problem:
        print(f"make_synthetic: error: {problem}", file=sys.stderr)
        return 2
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    spacing = tuple(args.spacing) if args.spacing else None
    if spacing is not None and len(spacing) == 1:
        spacing = spacing * args.dims
    start = time.perf_counter()
    tmp = temporary_dataset(args.out)
    try:
        check_dataset_output(args.out, args.force)
        # written next to --out and renamed at the end: an existing dataset is replaced
        # whole (--force), never mixed with the new cases
        summary = make_dataset(
            tmp,
            cases=args.cases,
            size=size,
            dims=args.dims,
            shifted=args.shifted,
            seed=args.seed,
            test_cases=args.test_cases,
            file_ending=FORMATS[args.format],
            loops=args.loops,
            spacing=spacing,
            affine=args.affine,
            name=args.name,
            params=FAINT_DOMAIN if args.faint else None,
        )
        publish_dataset(tmp, args.out, log=lambda line: print(f"make_synthetic: {line}", file=sys.stderr))
        summary["root"] = args.out
    except (ValueError, MedsegError) as err:
        print(f"make_synthetic: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    ending = summary["file_ending"]
    shapes = ", ".join(str(s) for s in summary["shapes"])
    spacings = ", ".join(str(s) for s in summary["spacings"])
    print(f"wrote {summary['root']} ({summary['domain']} domain, {args.dims}D, seed {args.seed}) in {elapsed:.1f} s")
    print(f"  dataset.json      channel 0: CT; labels background=0, vessel=1; file_ending {ending}")
    print(f"  imagesTr/labelsTr {len(summary['training'])} cases ({summary['training'][0]} .. {summary['training'][-1]})")
    if summary["test"]:
        print(f"  imagesTs/labelsTs {len(summary['test'])} cases ({summary['test'][0]} .. {summary['test'][-1]})")
    print(f"  shape {shapes}, spacing {spacings} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert an extracted Medical Segmentation Decathlon task into the nnU-Net v2 layout.

    python data_scripts/convert_msd.py Task05_Prostate/ --out data/Dataset005_Prostate
        -> imagesTr/prostate_00_0000.nii.gz, prostate_00_0001.nii.gz (T2, ADC), labelsTr/, dataset.json

For a task downloaded by hand (e.g. from the Google Drive links on medicaldecathlon.com);
``download.py`` runs the same conversion after downloading. The input is left untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.prepare.msd import convert_msd_task  # noqa: E402
from medseg.data.prepare.script import finish  # noqa: E402

PROG = "convert_msd.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("task", type=Path, help="MSD task folder (with dataset.json), or its parent")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create, e.g. data/Dataset008_HepaticVessel")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-test", action="store_true", help="skip the unlabelled imagesTs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{PROG}] {message}", file=sys.stderr)

    def work() -> Path:
        convert_msd_task(
            args.task, args.out, overwrite=args.force, include_test=not args.no_test, progress=not args.quiet, log=log
        )
        return args.out

    return finish(PROG, work, f"{args.out} is as it was")


if __name__ == "__main__":
    sys.exit(main())

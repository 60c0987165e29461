#!/usr/bin/env python
"""Convert folders of 2D images and masks (PNG, TIFF, JPEG, GIF) into the nnU-Net v2 layout.

    # DRIVE: training/images/21_training.tif + training/1st_manual/21_manual1.gif
    python data_scripts/convert_2d.py --images DRIVE/training/images --masks DRIVE/training/1st_manual \\
        --image-suffix _training --mask-suffix _manual1 --label-names vessel --out data/Dataset101_DRIVE
    # CHASE_DB1: Image_01L.jpg + Image_01L_1stHO.png in one folder
    python data_scripts/convert_2d.py --images CHASEDB1 --masks CHASEDB1 --mask-suffix _1stHO \\
        --foreground-threshold 127 --label-names vessel --out data/Dataset102_CHASEDB1

Images and masks are paired by name (minus ending and suffix); unmatched files are
listed and skipped (--strict makes them an error). RGB images become three channel
files (_0000 R, _0001 G, _0002 B), grey ones one; masks become integer labels (see
--foreground-threshold).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.prepare.natural2d import convert_2d_folders  # noqa: E402
from medseg.data.prepare.script import finish  # noqa: E402

PROG = "convert_2d.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--masks", type=Path, required=True, help="folder of masks (may be --images, with --mask-suffix)")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--image-suffix", default="", help="end of image stems to drop before matching, e.g. _training")
    parser.add_argument("--mask-suffix", default="", help="end of mask stems to drop before matching, e.g. _manual1")
    parser.add_argument("--foreground-threshold", type=float, default=None,
                        help="binarise masks: foreground where grey value > T (default: values are labels; "
                             "0/255 masks become 0/1)")
    parser.add_argument("--label-names", nargs="+", default=None, help="names of labels 1, 2, ... (default foreground)")
    parser.add_argument("--channel-names", nargs="+", default=None, help="names of the image channels (default R G B / gray)")
    parser.add_argument("--grayscale", action="store_true", help="convert RGB images to one grey channel")
    parser.add_argument("--name", default=None, help="dataset name in dataset.json (default: the --out folder name)")
    parser.add_argument("--exif", choices=("apply", "ignore"), default="apply",
                        help="apply: turn camera images upright as their EXIF orientation says, as viewers and "
                             "annotation tools show them (default); ignore: keep the stored pixels")
    parser.add_argument("--strict", action="store_true", help="unmatched images or masks are an error")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{PROG}] {message}", file=sys.stderr)

    def work() -> Path:
        convert_2d_folders(
            args.images, args.masks, args.out,
            image_suffix=args.image_suffix, mask_suffix=args.mask_suffix,
            foreground_threshold=args.foreground_threshold, label_names=args.label_names,
            grayscale=args.grayscale, channel_names=args.channel_names, name=args.name,
            strict=args.strict, overwrite=args.force, exif=args.exif, progress=not args.quiet, log=log,
        )
        return args.out

    return finish(PROG, work, f"{args.out} is as it was")


if __name__ == "__main__":
    sys.exit(main())

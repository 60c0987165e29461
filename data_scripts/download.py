#!/usr/bin/env python
"""Download a public dataset, verify it and convert it to the nnU-Net v2 layout.

    python data_scripts/download.py --list
    python data_scripts/download.py Task08_HepaticVessel --out data/
        -> data/Dataset008_HepaticVessel/{dataset.json, imagesTr/, labelsTr/, imagesTs/}
    python data_scripts/download.py Task01_BrainTumour --out data/ --keep-archive
    python data_scripts/download.py Task09_Spleen --out data/ --no-convert   # data/Task09_Spleen/ as published

An interrupted download resumes where it stopped when the command is run again (the
bytes so far are in DIR/.partial/). The archive is checked against its published MD5 /
SHA-256 before anything is unpacked; a mismatch moves it to DIR/.partial/NAME.corrupt.
Mirrors: --base-url (or $MEDSEG_DATA_BASE_URL) replaces the host, --url the whole URL;
--md5/--sha256 give the digest to expect from such a copy.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.data.prepare.archive import extract_archive  # noqa: E402
from medseg.data.prepare.download import PARTIAL_DIR, download_file  # noqa: E402
from medseg.data.prepare.msd import convert_msd_task, find_msd_task  # noqa: E402
from medseg.data.prepare.registry import REGISTRY, get_source  # noqa: E402
from medseg.data.prepare.script import finish  # noqa: E402
from medseg.errors import DataError  # noqa: E402

BASE_URL_ENV = "MEDSEG_DATA_BASE_URL"
PROG = "download.py"


def _log(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr)


def _list() -> None:
    for source in REGISTRY.values():
        checksum = source.checksum
        digest = f"{checksum[0]} {checksum[1]}" if checksum else "no published checksum (unverified)"
        print(f"{source.name:22s} {source.description}; {source.license}; {digest}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog="known datasets: " + ", ".join(REGISTRY)
    )
    parser.add_argument("dataset", nargs="?", help="registry name, e.g. Task08_HepaticVessel (see --list)")
    parser.add_argument("--out", type=Path, help="folder for the archive and the converted dataset")
    parser.add_argument("--list", action="store_true", help="list the known datasets and exit")
    parser.add_argument("--keep-archive", action="store_true", help="keep DIR/NAME.tar after unpacking")
    parser.add_argument("--no-convert", action="store_true", help="unpack the dataset as published, do not convert it")
    parser.add_argument("--no-extract", action="store_true", help="only download and verify the archive")
    parser.add_argument("--name", help="converted folder name (default DatasetNNN_Name, e.g. Dataset008_HepaticVessel)")
    parser.add_argument("--base-url", help=f"mirror to download from instead of the official host (env: {BASE_URL_ENV})")
    parser.add_argument("--url", help="full URL of the archive (overrides --base-url)")
    digest = parser.add_mutually_exclusive_group()
    digest.add_argument("--md5", help="expected MD5 of the archive (overrides the registry)")
    digest.add_argument("--sha256", help="expected SHA-256 of the archive (overrides the registry)")
    parser.add_argument("--force", action="store_true", help="replace an existing converted/unpacked dataset folder")
    parser.add_argument("--verify", action="store_true", help="read every converted case once (slow for large sets)")
    parser.add_argument("--retries", type=int, default=5, help="resumptions after a dropped connection (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before retrying (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.list and (not args.dataset or args.out is None):
        parser.error("DATASET and --out DIR are required (or --list)")
    # checked before an hour of downloading, not after it
    if args.retries < 0:
        parser.error(f"--retries: must be 0 or more, got {args.retries}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout: must be a positive number of seconds, got {args.timeout}")
    for flag, value, length in (("--md5", args.md5, 32), ("--sha256", args.sha256, 64)):
        if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
            parser.error(f"{flag}: expected {length} hexadecimal digits, got {value!r}")
    return args


def run(args: argparse.Namespace) -> Path:
    """Download, verify, unpack and convert; return the folder the user should use."""
    source = get_source(args.dataset)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    if args.no_extract:
        target = None
    elif args.no_convert:
        target = out / source.name
    else:
        target = out / (args.name or source.converted_name)
    # Refuse before spending an hour downloading, not after.
    if target is not None and target.exists() and not args.force:
        raise DataError(f"{target}: already exists (pass --force to replace it)")

    base_url = args.base_url or os.environ.get(BASE_URL_ENV) or None
    url = args.url or source.url(base_url)
    if args.md5:
        checksum = ("md5", args.md5)
    elif args.sha256:
        checksum = ("sha256", args.sha256)
    else:
        checksum = source.checksum
    if checksum is None:
        _log(f"warning: {source.name} has no published checksum; the download will be UNVERIFIED "
             f"(pass --md5 or --sha256 to check it)")
    _log(f"downloading {url}")
    archive = download_file(
        url, out / source.filename, checksum=checksum, expected_size=source.size,
        retries=args.retries, timeout=args.timeout, progress=progress, log=_log,
    )
    if target is None:
        _log(f"archive ready: {archive}")
        return archive

    extract_dir = out / PARTIAL_DIR / f"{source.name}.extract"
    if extract_dir.exists():
        shutil.rmtree(extract_dir)
    try:
        _log(f"unpacking {archive.name}")
        extract_archive(archive, extract_dir)
        task = find_msd_task(extract_dir)
        if args.no_convert:
            if target.exists():
                shutil.rmtree(target)
            os.replace(task, target)
        else:
            _log(f"converting {task.name} -> {target.name}")
            # The extracted copy is thrown away: move unchanged files rather than copy them.
            info = convert_msd_task(task, target, overwrite=args.force, move=True, progress=progress, log=_log,
                                    verify=args.verify)["info"]
            readable = "read" if args.verify else "listed"
            _log(f"{target}: {info.num_training} training case(s) {readable}, channels {info.channel_names}, "
                 f"labels {info.labels}")
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
    if not args.keep_archive:
        archive.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        _list()
        return 0
    return finish(PROG, lambda: run(args), "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())

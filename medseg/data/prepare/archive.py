"""Unpacking downloaded archives without trusting their member names.

Members are extracted only when they are plain files or folders whose paths stay inside
the destination (no absolute paths, no ``..``, no links, no devices): an archive is
untrusted input. macOS resource forks (``._name``, ``__MACOSX/``), which the MSD archives
contain next to every NIfTI file, are skipped, so that a later folder scan never takes
them for images.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from medseg.errors import DataError

__all__ = ["extract_archive", "is_junk_member"]


def is_junk_member(name: str) -> bool:
    """True for macOS metadata entries (``._x``, ``__MACOSX/...``, ``.DS_Store``)."""
    parts = PurePosixPath(name).parts
    return any(p.startswith("._") or p == "__MACOSX" or p == ".DS_Store" for p in parts)


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    path = PurePosixPath(name.replace("\\", "/"))
    root = os.path.abspath(dest)
    target = os.path.abspath(os.path.join(root, *path.parts)) if path.parts else root
    if path.is_absolute() or ".." in path.parts or os.path.commonpath([root, target]) != root:
        raise DataError(f"{archive}: member '{name}' points outside the extraction folder")
    return Path(target)


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Extract a ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz`` or ``.zip`` into ``dest``.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DataError
        The file is not a readable archive, is truncated, is empty or has a member that
        would land outside ``dest`` (one line naming the archive).
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            count = _extract_zip(archive, dest)
        else:
            count = _extract_tar(archive, dest)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        lines = str(err).strip().splitlines()
        reason = lines[0].rstrip(":") if lines else type(err).__name__
        raise DataError(f"{archive}: corrupt or truncated archive ({reason})") from None
    if count == 0:
        raise DataError(f"{archive}: archive holds no files")
    return dest


def _extract_tar(archive: Path, dest: Path) -> int:
    try:
        tar = tarfile.open(archive, mode="r:*")
    except tarfile.ReadError:
        raise DataError(f"{archive}: not a tar or zip archive (or truncated before its first member)") from None
    count = 0
    with tar:
        for member in tar:
            if is_junk_member(member.name):
                continue
            target = _safe_target(dest, member.name, archive)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                continue  # links, devices, fifos: never needed for image data
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - isfile() members always have data
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            if target.stat().st_size != member.size:
                raise DataError(f"{archive}: member '{member.name}' is truncated")
            count += 1
    return count


def _extract_zip(archive: Path, dest: Path) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if is_junk_member(info.filename):
                continue
            target = _safe_target(dest, info.filename, archive)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            count += 1
    return count

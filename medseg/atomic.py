"""Atomic file writes: a file is either its old content or its new one, never a torn mix.

The data goes to a hidden temporary file in the destination's folder (same file system),
is flushed to disk, and is renamed over the destination with :func:`os.replace`. The
temporary name ``.NAME.HOST-PID.tmp`` says which process wrote it, so a later run can
tell a dead writer's leftovers from a live one's. On any failure the temporary file is
removed and the destination is untouched.

:func:`write_atomic` takes the bytes or text; :func:`atomic_path` is the same procedure
for writers that want a file name (``torch.save``, matplotlib's ``savefig``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "STORAGE_ERRNOS",
    "atomic_path",
    "blocking_file",
    "check_output_folder",
    "clear_temporary",
    "storage_error",
    "file_sha256",
    "file_stamp",
    "file_stamp_or_none",
    "host_tag",
    "no_follow",
    "process_alive",
    "remove_dead_temporaries",
    "temporary_name",
    "write_atomic",
]

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
"""Errors of the place written to, not of the data: full disk, quota, file too large,
read-only file system, no permission."""

# ``.NAME.HOST-PID.tmp`` (see temporary_name)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.-]+)-(?P<pid>\d+)\.tmp$")


def host_tag() -> str:
    """This machine's name as it appears in temporary names (no '-' or '.')."""
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def temporary_name(path: str | Path) -> Path:
    """The hidden temporary file :func:`write_atomic` uses for ``path``: ``.NAME.HOST-PID.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}-{os.getpid()}.tmp")


def storage_error(err: BaseException | None, path: str | Path) -> OSError | None:
    """The :data:`STORAGE_ERRNOS` error behind ``err`` (itself, or what it was raised from
    or during: torch's writer turns the OSError of a full disk into a RuntimeError), as an
    OSError naming ``path``; None when ``err`` has another cause."""
    for _ in range(8):
        if err is None:
            return None
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return OSError(err.errno, os.strerror(err.errno), str(path))
        err = err.__cause__ or err.__context__
    return None


def no_follow(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that refuses a symbolic link at ``path`` (ELOOP): the
    files medseg appends to in its output folders (logs, journals, ``metrics.csv``). Opened
    through a link, another user's link in a shared folder had medseg append to the file
    it pointed at (``evaluate``'s journal, ``train.log`` of a resume)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def write_atomic(path: str | Path, data: str | bytes, mkdir: bool = True) -> Path:
    """Write ``data`` (text is UTF-8, newlines as given) to ``path`` atomically; returns ``path``.

    Raises
    ------
    OSError
        As the file system reports it (no space, no permission, ...); ``path`` is unchanged.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mkdir=mkdir) as tmp, open(tmp, "xb") as handle:
        handle.write(payload)
    return Path(path)


def write_atomic_group(files: dict[Path, str | bytes]) -> None:
    """Write several files that belong together (an evaluation's summary, table and page):
    every one is written to its temporary first, and only then are they renamed, so a
    full disk leaves the old set whole instead of new files beside an old one.

    Raises
    ------
    OSError
        As :func:`atomic_path` (naming the file); no file of the group is then replaced.
    """
    from contextlib import ExitStack

    with ExitStack() as stack:
        temporaries = {path: stack.enter_context(atomic_path(path)) for path in files}
        for path, tmp in temporaries.items():
            data = files[path]
            with open(tmp, "xb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_path(path: str | Path, mkdir: bool = True) -> Iterator[Path]:
    """The temporary file (:func:`temporary_name`) to write ``path``'s new content to.

    When the block ends the file is flushed to disk and renamed over ``path``; when the
    block raises (or the rename fails) it is removed and ``path`` is untouched. The name
    ends in ``.tmp``, so tell a writer that guesses the format from it which one to use
    (``fig.savefig(tmp, format="png")``).

    Raises
    ------
    OSError
        As the file system reports it; also when the block wrote no file. A full or
        read-only file system (:func:`storage_error`) is reported naming ``path``.
    DataError
        ``path`` is a folder, or a file stands where one of its folders should be
        (found before anything is written).
    """
    from medseg.errors import DataError

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, where a file is to be written")
    existing = blocking_file(path.parent)
    if existing is not None:
        raise DataError(f"{path}: cannot be written, {existing} exists and is not a folder")
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    clear_temporary(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        cause = storage_error(err, path)
        if cause is not None:
            raise cause from err
        raise
    _remove_dead_temporaries_of(path)


def clear_temporary(tmp: str | Path) -> None:
    """Remove what stands at one of this process's temporary names (:func:`temporary_name`)
    before it is made: a dead process of the same pid's leftover, or a link planted there.
    The name is predictable, and a writer that opened it through another user's link in
    a shared folder replaced the file the link pointed at (a report over someone's file;
    ``predict``'s staging folder wrote masks into theirs). medseg's own writers then
    create it exclusively (``open(tmp, "xb")``, ``mkdir``), which fails on anything
    standing there, a link included."""
    _remove_temporary(Path(tmp))


# Per folder, the dead writers' temporaries found at this process's first write there, by
# the file name they were for: a folder is listed once, not at every write (a cache of a
# thousand cases is written file by file into one folder).
_DEAD_FOUND: dict[str, dict[str, list[Path]]] = {}


def _remove_dead_temporaries_of(path: Path) -> None:
    """Remove what writers of ``path`` killed before their rename left (plan, report
    compare and report html never looked: their ``.NAME.HOST-PID.tmp`` stayed for good)."""
    folder = os.path.abspath(path.parent)
    try:
        found = _DEAD_FOUND.get(folder)
        if found is None:
            found = _DEAD_FOUND[folder] = {}
            for name, entry in _dead_temporaries(path.parent):
                found.setdefault(name, []).append(entry)
        for entry in found.pop(path.name, []):
            if _dead_temporary(entry):  # still: a pid reused meanwhile writes under the same name
                _remove_temporary(entry)
    except OSError:
        pass


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (one we may not signal does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(
    folder: str | Path, names: Iterable[str] | None = None, other_hosts_after_s: float | None = None
) -> int:
    """Remove the temporaries (``.NAME.HOST-PID.tmp`` files and folders) that killed writers
    left in ``folder``; returns how many were removed.

    One of this host whose process is gone is removed; a running process's never is. One
    of another host (a shared file system), whose process cannot be checked, only when
    ``other_hosts_after_s`` is given and it is older than that. ``names`` limits the
    clean-up to temporaries of those file names.
    """
    wanted = None if names is None else set(names)
    removed = 0
    for name, entry in _dead_temporaries(folder, other_hosts_after_s):
        if wanted is None or name in wanted:
            removed += _remove_temporary(entry)
    return removed


def _dead_temporaries(folder: str | Path, other_hosts_after_s: float | None = None) -> Iterator[tuple[str, Path]]:
    """``(name, entry)`` of every temporary in ``folder`` whose writer is dead
    (:func:`remove_dead_temporaries`); ``name`` is the file it was for."""
    for entry in Path(folder).iterdir():
        found = _TEMPORARY.match(entry.name)
        if found is not None and _dead_temporary(entry, other_hosts_after_s):
            yield found["name"], entry


def _dead_temporary(entry: Path, other_hosts_after_s: float | None = None) -> bool:
    """Whether the temporary ``entry`` (``.NAME.HOST-PID.tmp``) is a dead writer's: this
    host's with its process gone, or another host's older than ``other_hosts_after_s``."""
    found = _TEMPORARY.match(entry.name)
    if found is None:
        return False
    try:
        if found["host"] == host_tag():
            return not process_alive(int(found["pid"]))
        return other_hosts_after_s is not None and time.time() - entry.lstat().st_mtime >= other_hosts_after_s
    except FileNotFoundError:
        return False


def _remove_temporary(entry: Path) -> int:
    """Remove a temporary file or folder; 1 if it was there."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # another run may be removing it too
        else:
            entry.unlink()
    except FileNotFoundError:
        return 0
    return 1


def file_stamp(path: str | Path) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode]`` of a file: what tells, without reading it,
    that its bytes may have changed.

    Size and modification time alone miss a file replaced by another of the same size
    whose time came along: ``mv``, ``cp -p``, ``rsync -a`` and archives (whole-second
    times, often equal across a dataset's files) keep it. The replacement has another
    inode, and a rename changes the status-change time, which user programs cannot set
    (writing or ``touch``-ing a file changes it too).

    Raises
    ------
    OSError
        As :func:`os.stat`.
    """
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def file_stamp_or_none(path: str | Path | None) -> list[int] | None:
    """:func:`file_stamp`, or None for no path or a file that cannot be read."""
    if path is None:
        return None
    try:
        return file_stamp(path)
    except OSError:
        return None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def blocking_file(path: str | Path) -> Path | None:
    """The file that stands where ``path`` or a folder above it should be (the first of
    them that exists, when it is not a folder), or None."""
    path = Path(path)
    # is_symlink: a link to nowhere "does not exist", yet nothing can be made in its place
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_output_folder(path: str | Path, what: str, argument: bool = False) -> Path:
    """``path`` as a folder to write into, checked before any work: neither it nor a folder
    above it may be a file (writing would otherwise fail after the work is done).

    Raises
    ------
    DataError
        Naming ``what`` (a config key, e.g. ``output_dir``), the path and the file in the way;
        an :class:`~medseg.errors.ArgumentError` when ``what`` is a function's ``argument``.
    """
    from medseg.errors import ArgumentError, DataError

    path = Path(path)
    existing = blocking_file(path)
    if existing is not None:
        problem = (f"{existing} is a link to nothing ({os.readlink(existing)})" if not existing.exists()
                   else f"{existing} exists and is not a folder")
        raise ArgumentError(what, problem, path) if argument else DataError(f"{what} {path}: {problem}")
    return path


def make_writable_folder(folder: str | Path) -> list[Path]:
    """Create ``folder`` (and its missing parents) and check that a file can be written
    there, before a long piece of work rather than at its first write; returns the
    folders it created, deepest first (the caller may remove them if its work fails).

    Raises
    ------
    OSError
        The folder cannot be made or written (what it created is removed again); the
        caller words it (``err.strerror``) for its argument or setting.
    """
    folder = Path(folder)
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".medseg-probe-{host_tag()}-{os.getpid()}"  # unique on a shared file system too
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        remove_empty_folders(created)
        raise
    return created


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError:
            break

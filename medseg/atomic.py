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

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "host_tag", "temporary_name", "write_atomic"]


def host_tag() -> str:
    """This machine's name as it appears in temporary names (no '-' or '.')."""
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def temporary_name(path: str | Path) -> Path:
    """The hidden temporary file :func:`write_atomic` uses for ``path``: ``.NAME.HOST-PID.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}-{os.getpid()}.tmp")


def write_atomic(path: str | Path, data: str | bytes, mkdir: bool = True) -> Path:
    """Write ``data`` (text is UTF-8, newlines as given) to ``path`` atomically; returns ``path``.

    Raises
    ------
    OSError
        As the file system reports it (no space, no permission, ...); ``path`` is unchanged.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mkdir=mkdir) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)
    return Path(path)


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
        As the file system reports it; also when the block wrote no file.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise

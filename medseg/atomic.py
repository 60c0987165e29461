"""Atomic file writes: a file is either its old content or its new one, never a torn mix.

The data goes to a hidden temporary file in the destination's folder (same file system),
is flushed to disk, and is renamed over the destination with :func:`os.replace`. The
temporary name ``.NAME.HOST-PID.tmp`` says which process wrote it, so a later run can
tell a dead writer's leftovers from a live one's. On any failure the temporary file is
removed and the destination is untouched.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["host_tag", "temporary_name", "write_atomic"]


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
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path

"""One process at a time in a run folder: ``medseg train`` and ``medseg adapt`` hold an
exclusive lock on ``RUN/.medseg.lock`` from their first write to the end.

Two runs started into one ``output_dir`` both passed the "folder is empty" check and then
wrote one folder together (one run's config next to the other's checkpoints, their
metrics rows interleaved), each exiting 0. The lock is ``flock``: the kernel drops it
when the holder exits or is killed, so a crashed run never leaves the folder locked. The
file stays while the folder holds anything else; the checks for an empty run folder
ignore it, and it is never written (a refused command changes nothing in the folder). A
command that wrote nothing into the folder (an evaluation of which no case could be
evaluated) removes the file when it lets go, and the folders it made: a taker checks,
once it holds the lock, that the file it locked is still the one at the path, and tries
again if not, so the removal never lets two processes hold the folder. Under torchrun
rank 0 takes it for all ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.atomic import remove_empty_folders
from medseg.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

LOCK_FILE = ".medseg.lock"

# flock belongs to the open file, which a forked child shares: a DataLoader worker would
# hold the folder locked after its parent was killed, until it noticed. Children close
# their copies at once (exec'd ones never get them: os.open's descriptors are not
# inheritable), so the lock lives exactly as long as the process that took it.
_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunFolderLock:
    """The run folder's lock, taken at the first write (:meth:`take`) and held until the
    ``with`` block ends; nothing is created before that, so a command refused for a bad
    config or dataset leaves no folder behind. ``enabled=False`` (the other ranks of a
    torchrun job) makes it do nothing.
    """

    def __init__(self, run_dir: str | Path, what: str = "output_dir", enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.what = what
        self.enabled = enabled and fcntl is not None
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders take() made, deepest first

    def take(self, fresh: bool = False) -> None:
        """Lock the folder (creating it). ``fresh``: a new run, which the folder must not
        hold yet; it was empty when the run was checked, but another run may have
        started there since.

        Raises
        ------
        ConfigError
            Another process holds the lock (``output_dir RUN: in use by another medseg
            process; ...``), or ``fresh`` and the folder now holds a run.
        """
        if not self.enabled or self._fd is not None:
            return
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        path = self.run_dir / LOCK_FILE
        while True:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileNotFoundError:  # the folder was removed (release) between the two: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"{self.what} {self.run_dir}: in use by another medseg process; wait for it to finish or "
                    f"choose another {self.what}"
                ) from None
            try:  # the file its holder removed (release) before this process locked it: lock the new one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        _held.add(fd)
        if fresh and not holds_nothing(self.run_dir):
            raise ConfigError(
                f"{self.what} {self.run_dir}: another run started there meanwhile; choose a new {self.what}"
            )

    def release(self) -> None:
        if self._fd is None:
            return
        if holds_nothing(self.run_dir):  # nothing written: leave nothing, not even the folders it made
            try:
                (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # still locked: see take()
            except OSError:
                pass
            remove_empty_folders(self._created)
        _held.discard(self._fd)
        os.close(self._fd)  # releases the lock
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_nothing(run_dir: str | Path) -> bool:
    """True when ``run_dir`` is missing or holds nothing but the lock file."""
    run_dir = Path(run_dir)
    return not run_dir.is_dir() or all(p.name == LOCK_FILE for p in run_dir.iterdir())

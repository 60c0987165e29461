"""Where a run's log lines go: the terminal (around the progress bar) and the run folder's log file.

``medseg train`` logs to ``train.log``, ``medseg adapt`` to ``adapt.log``; both attach
the handlers below to the ``medseg`` logger for the length of the run and detach them
after (:func:`detach`), so that a run started from Python leaves logging as it found it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from medseg import distributed

__all__ = ["attach_console_handler", "attach_file_handler", "detach", "log_the_end"]

_PACKAGE = "medseg"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            # flushed line by line: in a Slurm job's output file (a pipe or file, block-buffered)
            # the progress lines arrived only at exit, and a SIGKILL lost them
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """The console's lines: warnings say so (they looked like progress lines; only the
    log file had their level)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            time, _, rest = line.partition(" ")
            line = f"{time} {record.levelname} {rest}"
        return line


class _HeldLines(logging.Handler):
    """The lines logged before the run folder exists (data preparation, the dataset's
    split), kept for its log file: ``train.log`` began at the first step without them."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


def attach_console_handler() -> list[logging.Handler]:
    """Log lines to stdout, flushed (through tqdm, so the bar stays intact), unless the app
    configured logging, and hold them for the log file :func:`attach_file_handler` opens
    later. Warnings are marked as such (``WARNING`` after the time).

    Under torchrun only rank 0 logs progress; the other ranks log warnings, prefixed with their rank.
    Returns the handlers added (for :func:`detach`).
    """
    package = logging.getLogger(_PACKAGE)
    if not distributed.is_main():
        package.setLevel(logging.WARNING)
    elif package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
    held = _HeldLines()
    added: list[logging.Handler] = [held]
    if not (package.handlers or logging.getLogger().handlers):
        console = _TqdmHandler()
        prefix = "" if distributed.is_main() else f"[rank {distributed.rank()}] "
        console.setFormatter(_ConsoleFormatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
        added.append(console)
    for handler in added:
        package.addHandler(handler)
    return added


class _AppendingFileHandler(logging.FileHandler):
    """logging's FileHandler, refusing a symbolic link where the log file goes
    (:func:`medseg.atomic.no_follow`)."""

    def _open(self):  # noqa: ANN202 (logging's signature)
        from medseg.atomic import no_follow

        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=no_follow)


def attach_file_handler(path: str | Path) -> list[logging.Handler]:
    """Append every log line (with its level) to ``path``, creating its folder, beginning
    with the lines held since :func:`attach_console_handler`; returns the handler added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _AppendingFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package = logging.getLogger(_PACKAGE)
    for held in [h for h in package.handlers if isinstance(h, _HeldLines)]:
        for record in held.records:  # what came before the folder existed, in order
            handler.handle(record)
        held.records.clear()
        package.removeHandler(held)
    package.addHandler(handler)
    return [handler]


def log_the_end(handlers: list[logging.Handler], error: BaseException, resume: str) -> None:
    """Write how a run ended to its log file(s) among ``handlers``: ``train.log`` stopped at
    its last progress line after a Ctrl-C, a SIGTERM or an error, whose line went to the
    console alone. ``resume``: the command that continues the run."""
    if isinstance(error, KeyboardInterrupt):
        text, level = f"stopped (Ctrl-C or SIGTERM); `{resume}` continues from the last checkpoint", logging.WARNING
    elif isinstance(error, Exception):
        text, level = f"failed: {(str(error) or type(error).__name__).splitlines()[0]}", logging.ERROR
    else:  # SystemExit and the like: nothing to say
        return
    record = logging.LogRecord(_PACKAGE, level, __file__, 0, text, None, None)
    for handler in handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def detach(handlers: list[logging.Handler]) -> None:
    """Remove and close the handlers the two functions above added."""
    package = logging.getLogger(_PACKAGE)
    for h in handlers:
        package.removeHandler(h)
        h.close()

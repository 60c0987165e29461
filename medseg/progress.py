"""Progress over a command's cases, on a terminal and in a log file alike.

tqdm's bar is made for a terminal: written to a file or a pipe (a Slurm job's output file,
``nohup``, ``| tee``) it is disabled, so ``predict`` over 500 scans, ``evaluate``, ``plan``'s
fingerprint and ``preprocess`` said nothing for hours and only their last line showed that
they had run at all. :func:`case_progress` keeps the bar on a terminal and elsewhere writes a
plain, flushed line at most every :data:`LINE_SECONDS`::

    14:02:31 predict: 12/500 cases (2 %), 3 min 20 s, about 2 h 15 min left

``medseg train`` and ``adapt`` log their own progress lines (``train.log``).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["LINE_SECONDS", "case_progress", "duration"]

#: Seconds between two progress lines in a log file (the first comes this long after the start).
LINE_SECONDS = 60.0


def duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 15 min"``: rounded to what a reader of a log wants."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class LineProgress:
    """tqdm's ``update``/``close`` interface, written as a line every ``interval`` seconds."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.clock = clock
        self.n = 0
        self.started = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self.file.write(self.line(now) + "\n")
            self.file.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.started
        text = f"{time.strftime('%H:%M:%S')} {self.desc}: {self.n}/{self.total} {self.unit}s"
        if self.total:
            text += f" ({100 * self.n // self.total} %)"
        text += f", {duration(elapsed)}"
        if 0 < self.n < self.total:
            text += f", about {duration(elapsed / self.n * (self.total - self.n))} left"
        return text

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def case_progress(total: int, desc: str, unit: str = "case", show: bool = True, file: TextIO | None = None,
                  interval: float | None = None, **bar_options):
    """A progress object with ``update(n)`` and ``close()`` over ``total`` items: tqdm's bar
    (``bar_options`` passed on) when ``file`` (default stderr) is a terminal, else a
    :class:`LineProgress`; nothing shown when ``show`` is false (another torchrun rank)."""
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    try:
        terminal = file.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        terminal = False
    if not show:
        return tqdm(total=total, disable=True)
    if terminal:
        return tqdm(total=total, desc=desc, unit=unit, file=file, **bar_options)
    return LineProgress(total, desc, unit, file, LINE_SECONDS if interval is None else interval)

"""Signals shared by the commands (:mod:`medseg.cli`) and the study's workers."""

from __future__ import annotations

import signal


def ignore_from_now_on(*signums: int) -> None:
    """Ignore ``signums`` from now on (the first stop's clean-up is not interrupted by the
    next), through a handler that does nothing rather than ``SIG_IGN``: a signal that had
    arrived but was not yet handled would otherwise raise ``OSError: Signal 15 ignored due
    to race condition`` at the next line of Python, a traceback in the middle of the
    clean-up (a study worker's log after Ctrl-C, where the terminal's SIGINT and the
    study's SIGTERM arrive together)."""
    for signum in signums:
        signal.signal(signum, _do_nothing)


def _do_nothing(signum, frame) -> None:
    """A signal handler that drops the signal."""

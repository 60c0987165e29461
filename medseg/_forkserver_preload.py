"""Imported first by the forkserver servers of medseg's worker pools
(:func:`medseg.process_pool.forkserver_context`), before the modules they preload, to keep
a command stopped in its first seconds (Ctrl-C, SIGTERM) at its one line
("medseg: interrupted", "medseg: stopped by SIGTERM"):

- a terminal's Ctrl-C reaches the server too (it is in the command's process group), and
  during its imports, seconds of them, it printed a KeyboardInterrupt traceback of 60
  lines. The server ignores SIGINT from now on, as multiprocessing has it do once its
  imports are done; the pool's workers take the command's own SIGINT handling back
  (``process_pool._start_worker``);
- a worker that the server forks after the command has stopped finds the pool's
  semaphores gone and printed a FileNotFoundError traceback from unpickling them
  (``_quiet_when_the_command_is_gone``).

Imported anywhere but in a forkserver server (whose ``sys.argv`` is ``['-c']``, the
server's command line), it does nothing."""

import signal
import sys


def _quiet_when_the_command_is_gone(kind, value, tb, other=sys.excepthook):
    """``sys.excepthook`` of the server and so of the workers it forks: drops the
    FileNotFoundError of a worker that unpickles the semaphores of a pool whose command
    has stopped (and removed them); passes anything else to ``other``."""
    import traceback

    if issubclass(kind, FileNotFoundError) and any(
        frame.name == "__setstate__" and frame.filename.endswith("synchronize.py")
        for frame in traceback.extract_tb(tb)
    ):
        return
    other(kind, value, tb)


if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_command_is_gone

"""How the data scripts end: one line for a mistake or Ctrl-C, the exit code, the result."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from medseg.errors import ArgumentError, MedsegError


def finish(prog: str, work: Callable[[], Any], interrupted: str) -> int:
    """Run ``work``; print its result (stdout) and return 0, or one line (stderr) and the exit code.

    An :class:`ArgumentError` is shown under the script's flag (``--label-names``, not
    ``label_names``); Ctrl-C gives ``PROG: interrupted; INTERRUPTED`` and 130.
    """
    try:
        result = work()
    except MedsegError as err:
        print(f"{prog}: error: {err.for_cli() if isinstance(err, ArgumentError) else err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    print(result)
    return 0

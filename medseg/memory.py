"""How much memory this process may use and holds: the checks that refuse or warn
before the kernel's out-of-memory killer ends a command without a word (evaluate's
Betti matching, predict's large cases)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["memory_limit_bytes", "resident_bytes"]


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the lowest limit of its cgroup and the cgroups
    above it (a container, a Slurm job; cgroup v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``) when lower than the machine's RAM, else the RAM; None
    where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/path" (v2) or "N:memory:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        folder = root / path.strip("/")
        for where in (folder, *folder.parents):  # a parent's limit holds too
            try:
                text = (where / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limits.append(int(text))
            if where == root:
                break
    return min(limits) if limits else None


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where it cannot be read)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0

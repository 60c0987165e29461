"""What made a run folder: medseg's version, the engine's build, the libraries, the device
and the command line, recorded next to every result and printed by ``medseg --version``.

A result without its provenance cannot be trusted a month later: was it the CPU engine or
the CUDA one, which torch, which command? :func:`build_info` answers for this
installation, :func:`provenance` adds the run (device, command line, host, time). Under
``torchrun`` the command is the launcher's (``torchrun --nproc-per-node 4 -m medseg.cli
train ...``, what a user reruns), next to the worker's own argv and the world size.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import socket
import sys
from typing import Any

__all__ = ["build_info", "provenance", "version_text"]


def _engine_info() -> dict[str, Any]:
    try:
        from medseg.topology import _engine  # noqa: F401
    except ImportError:
        from medseg.topology._inputs import engine_missing

        return {"cpu": False, "cuda": False, "error": engine_missing()}
    info: dict[str, Any] = {"cpu": True, "cuda": False}
    try:
        from medseg.topology import _engine_cuda
    except ImportError:
        return info
    info["cuda"] = True
    info["cuda_architectures"] = getattr(_engine_cuda, "cuda_architectures", "unknown")
    info["cuda_compiler"] = getattr(_engine_cuda, "cuda_compiler_version", "unknown")
    try:
        info["cuda_devices"] = int(_engine_cuda.device_count())
    except Exception:  # a driver problem must not break a provenance record
        info["cuda_devices"] = 0
    return info


def _version(module: str) -> str | None:
    """The module's version; from its installed metadata when it is not imported yet
    (importing MONAI for its version took 1 to 3.5 s of every ``medseg --version``)."""
    import sys

    if module not in sys.modules:
        from importlib import metadata

        try:
            return metadata.version(module)
        except metadata.PackageNotFoundError:
            pass  # a source checkout on sys.path: ask the module
    try:  # a plain str: torch's TorchVersion would not load from a weights_only checkpoint
        return str(__import__(module).__version__)
    except Exception:
        return None


def build_info() -> dict[str, Any]:
    """This installation: medseg, its engine build and the libraries that shape results."""
    import medseg

    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    return {
        "medseg": medseg.__version__,
        "engine": _engine_info(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torch_cuda": torch_cuda,
        "monai": _version("monai"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
    }


def _launcher_command() -> str | None:
    """Under torchrun, the launcher's command line: the workers' parent process, as Linux's
    ``/proc`` gives it (None elsewhere, or outside torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    return shlex.join(words) if words else None


def provenance(device: Any = None, argv: list[str] | None = None) -> dict[str, Any]:
    """:func:`build_info` plus this run: the device, the command line, the host and the time (UTC)."""
    info = build_info()
    info["device"] = None if device is None else str(device)
    if device is not None and str(device).startswith("cuda"):
        try:
            import torch

            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        except Exception:
            info["device_name"] = None
    command = shlex.join(sys.argv if argv is None else argv)
    launcher = _launcher_command()
    if launcher is not None:
        info["command"], info["worker_command"] = launcher, command
        info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    else:
        info["command"] = command
    info["host"] = socket.gethostname()
    info["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info


def version_text() -> str:
    """The lines ``medseg --version`` prints."""
    info = build_info()
    engine = info["engine"]
    if not engine["cpu"]:
        built = f"not built ({engine.get('error', 'import failed')})"
    elif engine["cuda"]:
        built = (f"CPU + CUDA (sm {engine['cuda_architectures']}, nvcc {engine['cuda_compiler']}, "
                 f"{engine['cuda_devices']} device(s) usable here)")
    else:
        built = "CPU only"
    return "\n".join([
        f"medseg {info['medseg']}",
        f"topology engine: {built}",
        f"torch {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (CPU build)"),
        f"MONAI {info['monai']}, numpy {info['numpy']}, Python {info['python']}",
    ])

"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) becomes a :class:`torch.device`.

Training, adaptation, prediction and the study's checks all resolve their device here.
The caller says what the user wrote the value in (``what``): the config key
``device``, or the CLI flag ``--device``, so the message names it either way.
"""

from __future__ import annotations

import torch

from medseg.errors import ArgumentError, ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device, what: str = "device", argument: bool = False) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given.

    Parameters
    ----------
    device : str or torch.device
        The requested device.
    what : str
        The config key the value came from, for the message; with ``argument``, the
        function argument (an :class:`~medseg.errors.ArgumentError`).

    Raises
    ------
    ConfigError
        ``cuda`` without a CUDA device torch can use, or a name other than the above,
        as ``{what} {device}: ...``.
    """
    def bad(problem: str) -> ConfigError:
        return ArgumentError(what, problem, device) if argument else ConfigError(f"{what} {device}: {problem}")

    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise bad("CUDA is not available on this machine (use cpu or auto)")
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise bad("expected auto, cpu or cuda")

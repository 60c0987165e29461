"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) becomes a :class:`torch.device`.

Training, adaptation, prediction and the study's checks all resolve their device here.
The caller says what the user wrote the value in (``what``): the config key
``device``, or the CLI flag ``--device``, so the message names it either way.
"""

from __future__ import annotations

import torch

from medseg.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given.

    Parameters
    ----------
    device : str or torch.device
        The requested device.
    what : str
        The config key or command-line flag the value came from, for the message.

    Raises
    ------
    ConfigError
        ``cuda`` without a CUDA device torch can use, or a name other than the above,
        as ``{what} {device}: ...``.
    """
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device}: CUDA is not available on this machine (use {what} cpu or auto)")
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise ConfigError(f"{what} {device}: expected auto, cpu or cuda")

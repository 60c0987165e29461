"""Checkpoints: the format, atomic save, ``weights_only`` load, and finding a run folder's checkpoint.

A checkpoint is a plain dict saved with :func:`torch.save` that loads with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts
(numpy/python RNG states are stored as lists). Keys (``format_version`` 1):

``iteration`` (int, optimizer steps done), ``config`` (the resolved RunConfig as JSON
data), ``dataset`` (``channel_names``, ``labels``, ``file_ending`` from dataset.json),
``preprocessing`` (per-channel normalisation statistics fitted on the training set),
``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler`` (state dicts or None),
``rng`` (torch / numpy / python states, see :func:`capture_rng_state`), ``best_metric``
(best mean validation Dice so far, or None) and ``best_iteration``.
Written by the trainer as well: ``network`` (``spatial_dims``, ``in_channels``,
``out_channels``, ``patch_size`` the model was built with), ``split`` (``train`` /
``val`` case names), ``loss_terms`` (names of the logged loss terms),
``loss_average`` (the running loss sums since the last ``metrics.csv`` row, so a
resumed run writes the same rows) and ``data_files`` (per case a digest of its files'
names, sizes and times: a resume warns when the data changed under the run).

A run folder keeps ``checkpoints/latest.pt`` (:data:`LATEST`) and ``checkpoints/best.pt``
(:data:`BEST`); an adapted run adds an ``adaptation`` entry (:mod:`medseg.adaptation.runner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medseg.atomic import atomic_path
from medseg.errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAMES = ("best", "latest")
LATEST = "latest.pt"  # every checkpoint interval and at the end; what --resume continues from
BEST = "best.pt"  # best mean validation Dice so far (training only)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`medseg.atomic.atomic_path`).

    A run killed while saving leaves the previous checkpoint intact.
    """
    payload = {"format_version": FORMAT_VERSION, **payload}
    # through a Python file: a full disk then surfaces as its OSError (torch's own writer
    # reports only "iostream error")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


def find_checkpoint(run_or_file: str | Path, prefer: tuple[str, ...] = CHECKPOINT_NAMES) -> Path:
    """Resolve a run folder (``best``, else ``latest``) or a checkpoint file to a file path."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    for name in prefer:
        candidate = path / CHECKPOINT_DIR / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no checkpoint found (expected {CHECKPOINT_DIR}/best.pt or {CHECKPOINT_DIR}/latest.pt)"
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", with_sha256: bool = False
) -> dict[str, Any] | tuple[dict[str, Any], str]:
    """Load a checkpoint with ``weights_only=True``; a damaged or foreign file is a CheckpointError.

    The file is read once, and its CRCs, its tensors and (``with_sha256``: returned as
    ``(payload, sha256)``) its hash all come from those bytes: a checkpoint replaced
    between two reads (a running ``train`` renames a new ``best.pt`` over the old one)
    gave ``medseg predict`` one file's weights and recorded the other's SHA-256.
    """
    import hashlib
    import io

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: not a readable medseg checkpoint "
                              f"({type(err).__name__}: {err.strerror or err})") from None
    damaged = _damaged_member(data)
    if damaged is not None:
        raise CheckpointError(
            f"{path}: damaged checkpoint ({damaged} fails its CRC-32 check: the file changed after it was "
            "written); use another checkpoint or a backup"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle with disallowed globals, not a torch file
        raise CheckpointError(f"{path}: not a readable medseg checkpoint ({_load_failure(data, err)})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: not a medseg checkpoint (missing 'model' or 'config')")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r}, this medseg reads {FORMAT_VERSION}")
    if with_sha256:
        return payload, hashlib.sha256(data).hexdigest()
    return payload


def _damaged_member(data: bytes) -> str | None:
    """The first member of the checkpoint's zip archive whose CRC-32 does not match, if any.

    torch.load does not check the CRCs its writer stores, so a flipped bit in the tensors
    loads as different weights without a word. 0.04 s per 100 MB here, about half of a
    torch.load. Anything that is no readable zip is left to torch.load and
    :func:`_load_failure` to describe.
    """
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError):
        return None


def _load_failure(data: bytes, err: Exception) -> str:
    """Why ``torch.load`` failed on a checkpoint's bytes, in one line, without torch's
    advice to load the file with ``weights_only=False`` (which would run whatever code a
    foreign file holds)."""
    import io
    import zipfile

    if data[:4] != b"PK\x03\x04":
        return "not a PyTorch file: a checkpoint is a zip archive"
    if not zipfile.is_zipfile(io.BytesIO(data)):  # the archive's directory is at its end
        return f"truncated: a zip archive without its end ({len(data)} bytes), as a write cut short leaves it"
    message = str(err).split("\n")[0]
    if "weights only" in message.lower() or "weights_only" in message:
        return f"{type(err).__name__}: it holds objects that a weights-only load refuses"
    return f"{type(err).__name__}: {message}"


# --------------------------------------------------------------------------- RNG state

def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators from ``seed``.

    medseg itself draws from torch's alone (data loading has generators of its own), but
    a checkpoint stores all three states (:func:`capture_rng_state`): numpy's and Python's
    were seeded from the OS at start-up, so two runs of one config wrote checkpoints of
    different bytes (a prediction folder then refused the retrained model as another
    one), and a user's transform or loss drawing from them differed between runs.
    """
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states in ``weights_only``-loadable form."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

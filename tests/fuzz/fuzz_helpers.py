"""Helpers of the input-fuzzing tests: image files built byte by byte (so that a header can
say anything: NaN spacing, a shape of 0, a complex voxel type), mutations of valid
files, the CLI run in this process with everything it prints captured, and the checks.

Every input goes through ``medseg.cli.main``; the checks (:func:`check`) are those of
the issue: exit code 0 only where the input is valid, otherwise a non-zero exit code
with ONE line on stderr naming the file or key, never a traceback, and no file that
existed before is changed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- settings

SCALE = int(os.environ.get("MEDSEG_FUZZ", "0") or 0)
"""``MEDSEG_FUZZ=N``: N times the examples, drawn at random (default: CI's fixed, derandomized set)."""


def fuzz_settings(max_examples: int) -> dict:
    """Hypothesis settings: ``max_examples`` fixed examples, or ``MEDSEG_FUZZ`` times as many random ones."""
    from hypothesis import HealthCheck

    return dict(max_examples=max_examples * max(SCALE, 1), deadline=None, derandomize=SCALE == 0, database=None,
                suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- counting

def report(record_property, what: str, tried: int) -> None:
    """Print how many inputs a test ran and hand the line to the terminal summary (also under xdist)."""
    line = f"{what}: {tried} inputs"
    print(line)
    record_property("fuzzed", line)


def TINY_TRAIN(dataset: Path, out: Path, iterations: int = 1, dims: int = 3) -> dict:  # noqa: N802 - a constant config
    """A run config that trains a tiny UNet for ``iterations`` steps (a second or two)."""
    return {
        "data": {"dataset": str(dataset), "patch_size": [16] * dims, "val_fraction": 0.0, "num_workers": 0,
                 "orientation": "RAS" if dims == 3 else None},
        "model": {"name": "unet", "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "train": {"iterations": iterations, "batch_size": 2, "val_interval": 100, "checkpoint_interval": 100,
                  "log_interval": 1},
        "inference": {"overlap": 0.25, "sw_batch_size": 4},
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
    }


# --------------------------------------------------------------------------- files

NIFTI_TYPES = {  # numpy dtype -> NIfTI datatype code, bits
    np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.int32): (8, 32),
    np.dtype(np.float32): (16, 32), np.dtype(np.complex64): (32, 64), np.dtype(np.float64): (64, 64),
    np.dtype(np.int8): (256, 8), np.dtype(np.uint16): (512, 16), np.dtype(np.uint32): (768, 32),
    np.dtype(np.int64): (1024, 64), np.dtype(np.uint64): (1280, 64), np.dtype(np.complex128): (1792, 128),
}


def nifti_bytes(data: np.ndarray, spacing=(1.0, 1.0, 1.0), *, dim: list[int] | None = None,
                datatype: int | None = None, bitpix: int | None = None, srow: np.ndarray | None = None,
                sform_code: int = 1, qform_code: int = 0, scl: tuple[float, float] = (float("nan"), 0.0),
                vox_offset: float = 352.0, magic: bytes = b"n+1\0", compressed: bool = False) -> bytes:
    """A NIfTI-1 single file written field by field, whatever the fields say.

    ``data`` gives the voxels (Fortran order) and, unless overridden, ``dim``,
    ``datatype`` and ``bitpix``; ``srow`` (3x4) the sform (default: ``diag(spacing)``).
    """
    data = np.asarray(data)
    code, bits = NIFTI_TYPES.get(data.dtype, (0, data.dtype.itemsize * 8))
    shape = list(data.shape)
    dims = dim if dim is not None else [len(shape), *shape, *[1] * (7 - len(shape))]
    spacing = list(spacing) + [1.0] * (7 - len(spacing))
    if srow is None:
        srow = np.zeros((3, 4))
        for i in range(3):
            srow[i, i] = spacing[i] if i < len(spacing) else 1.0
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, *[int(d) for d in dims[:8]])
    struct.pack_into("<h", header, 70, code if datatype is None else datatype)
    struct.pack_into("<h", header, 72, bits if bitpix is None else bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *[float(s) for s in spacing[:7]])
    struct.pack_into("<f", header, 108, vox_offset)
    struct.pack_into("<2f", header, 112, *scl)
    struct.pack_into("<b", header, 123, 10)  # xyzt_units: mm, s
    struct.pack_into("<2h", header, 252, qform_code, sform_code)
    for i in range(3):
        struct.pack_into("<4f", header, 280 + 16 * i, *[float(v) for v in srow[i]])
    header[344:348] = magic
    payload = bytes(header) + b"\0" * 4 + data.tobytes(order="F")
    return gzip.compress(payload, mtime=0) if compressed else payload


_NRRD_TYPES = {np.dtype(np.uint8): "uchar", np.dtype(np.int16): "short", np.dtype(np.int32): "int",
               np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.uint16): "ushort",
               np.dtype(np.int64): "int64"}


def nrrd_bytes(data: np.ndarray, spacing=(1.0, 1.0, 1.0), *, sizes: str | None = None, type_name: str | None = None,
               directions: str | None = None, encoding: str = "raw", dimension: int | None = None) -> bytes:
    data = np.asarray(data)
    n = data.ndim if dimension is None else dimension
    if directions is None:
        vectors = []
        for i in range(data.ndim):
            v = ["0"] * data.ndim
            v[i] = repr(float(spacing[i]))
            vectors.append("(" + ",".join(v) + ")")
        directions = " ".join(vectors)
    raw = data.tobytes(order="F")
    lines = ["NRRD0004", f"type: {type_name or _NRRD_TYPES.get(data.dtype, str(data.dtype))}", f"dimension: {n}",
             f"space dimension: {data.ndim}", f"sizes: {sizes or ' '.join(str(s) for s in data.shape)}",
             f"space directions: {directions}", "endian: little", f"encoding: {encoding}"]
    body = gzip.compress(raw, mtime=0) if encoding == "gzip" else raw
    return ("\n".join(lines) + "\n\n").encode() + body


_MET_TYPES = {np.dtype(np.uint8): "MET_UCHAR", np.dtype(np.int16): "MET_SHORT", np.dtype(np.int32): "MET_INT",
              np.dtype(np.float32): "MET_FLOAT", np.dtype(np.float64): "MET_DOUBLE", np.dtype(np.uint16): "MET_USHORT"}


def mha_bytes(data: np.ndarray, spacing=(1.0, 1.0, 1.0), *, dimsize: str | None = None, element_type: str | None = None,
              element_spacing: str | None = None, ndims: int | None = None, components: int = 1) -> bytes:
    data = np.asarray(data)
    lines = ["ObjectType = Image", f"NDims = {data.ndim if ndims is None else ndims}", "BinaryData = True",
             "BinaryDataByteOrderMSB = False", "CompressedData = False",
             f"ElementSpacing = {element_spacing or ' '.join(repr(float(s)) for s in spacing[:data.ndim])}",
             f"DimSize = {dimsize or ' '.join(str(s) for s in data.shape)}",
             f"ElementNumberOfChannels = {components}",
             f"ElementType = {element_type or _MET_TYPES.get(data.dtype, 'MET_FLOAT')}", "ElementDataFile = LOCAL"]
    return ("\n".join(lines) + "\n").encode() + data.tobytes(order="F")


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG") if mode else Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(ending: str, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> bytes:
    """A valid file of ``ending`` holding ``data``."""
    if ending == ".nii":
        return nifti_bytes(data, spacing)
    if ending == ".nii.gz":
        return nifti_bytes(data, spacing, compressed=True)
    if ending == ".nrrd":
        return nrrd_bytes(data, spacing)
    if ending == ".mha":
        return mha_bytes(data, spacing)
    if ending == ".png":
        return png_bytes(np.asarray(data))
    raise ValueError(ending)


# --------------------------------------------------------------------------- mutations of bytes

def truncate(blob: bytes, fraction: float) -> bytes:
    return blob[: int(len(blob) * fraction)]


def flip(blob: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(blob)
    for p, v in zip(positions, values):
        if out:
            out[p % len(out)] = v
    return bytes(out)


def gunzip_mutate(blob: bytes, mutate) -> bytes:
    """Mutate the bytes inside a gzip stream and compress again (a header fuzz of .nii.gz)."""
    return gzip.compress(mutate(gzip.decompress(blob)), mtime=0)


# --------------------------------------------------------------------------- running the CLI

@dataclass
class Result:
    code: int | None
    out: str
    err: str
    escaped: str | None  # an exception that left medseg.cli.main (a traceback for the user)


def _stream_handlers() -> list:
    import logging

    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


def _retarget(handlers: list, old, new) -> None:
    for handler in handlers:
        if handler.stream is old:
            handler.setStream(new)


@contextlib.contextmanager
def _fd_captured():
    """stdout and stderr of this process into files: Python's streams, logging handlers
    bound to them (nibabel's), and what C++ libraries print to the file descriptors (ITK)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    streams = {fd: io.TextIOWrapper(open(files[fd].fileno(), "wb", closefd=False), write_through=True)
               for fd in (1, 2)}
    old = {1: sys.stdout, 2: sys.stderr}
    handlers = _stream_handlers()
    text: dict[int, str] = {}
    try:
        for fd in (1, 2):
            os.dup2(files[fd].fileno(), fd)
            _retarget(handlers, old[fd], streams[fd])
        sys.stdout, sys.stderr = streams[1], streams[2]
        yield text
    finally:
        sys.stdout, sys.stderr = old[1], old[2]
        handlers = _stream_handlers()  # also those created meanwhile
        for fd in (1, 2):
            streams[fd].flush()
            _retarget(handlers, streams[fd], old[fd])
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            text[fd] = files[fd].read().decode("utf-8", "replace")
            streams[fd].close()
            files[fd].close()


class TimedOut(BaseException):
    """A run took longer than :data:`RUN_LIMIT_S` (an accepted input that never ends)."""


RUN_LIMIT_S = 60


def _alarm(signum, frame):
    raise TimedOut(f"still running after {RUN_LIMIT_S} s")


def run_cli(argv: list[Any]) -> Result:
    """``medseg.cli.main(argv)`` in this process; what it printed and whether anything escaped.

    A run is stopped after :data:`RUN_LIMIT_S` seconds (reported as escaped), and torch's
    process-wide settings a config may switch (deterministic algorithms) are restored.
    """
    import signal
    import warnings

    import torch

    from medseg.cli import main

    escaped = None
    code = None
    deterministic = torch.are_deterministic_algorithms_enabled()
    previous = signal.signal(signal.SIGALRM, _alarm)
    with _fd_captured() as text, warnings.catch_warnings():
        warnings.simplefilter("default")
        signal.alarm(RUN_LIMIT_S)
        try:
            code = main([str(a) for a in argv])
        except BaseException as err:  # noqa: BLE001 - what a user would see as a traceback
            import traceback

            escaped = "".join(traceback.format_exception(err))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            torch.use_deterministic_algorithms(deterministic)
    return Result(code, text.get(1, ""), text.get(2, ""), escaped)


# --------------------------------------------------------------------------- checks

def snapshot(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (what must not change)."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check(result: Result, names: list[str], valid: bool | None, before: dict[str, str], after: dict[str, str],
          what: str) -> list[str]:
    """The problems of one run: ``valid`` True (must pass), False (must fail), None (either).

    A failure must print exactly one line on stderr, naming one of ``names``."""
    problems = []
    if result.escaped is not None:
        return [f"{what}: traceback: {result.escaped.strip().splitlines()[-1]}"]
    text = result.out + result.err
    if "Traceback" in text:
        problems.append(f"{what}: 'Traceback' printed: {text[-800:]!r}")
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    if result.code == 0:
        if valid is False:
            problems.append(f"{what}: accepted (exit code 0) an invalid input")
    else:
        if valid is True:
            problems.append(f"{what}: refused a valid input: {result.err.strip()[-500:]!r}")
        elif len(lines) != 1:
            problems.append(f"{what}: {len(lines)} lines on stderr: {result.err[-800:]!r}")
        elif not any(n and str(n) in lines[0] for n in names):
            problems.append(f"{what}: the line names none of {names}: {lines[0]!r}")
    changed = sorted(k for k in before if before[k] != after.get(k))
    if changed:
        problems.append(f"{what}: changed or removed existing files {changed[:3]}")
    return problems


# --------------------------------------------------------------------------- wrong types at any key

def key_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON/YAML tree (mappings by key, lists by index), leaves and inner nodes."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out += key_paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append((*prefix, i))
            out += key_paths(v, (*prefix, i))
    return out


def replaced(tree: Any, path: tuple, value: Any) -> Any:
    """A deep copy of ``tree`` with the value at ``path`` replaced."""
    tree = json.loads(json.dumps(tree))
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return tree


def dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


WRONG_VALUES: list[Any] = [None, [], [1, "a"], {}, {"x": 1}, "text", "", -1, -1.5, 0, 10**30, 1e308, math.nan,
                           math.inf, True]
"""Values of other types (and out-of-range numbers) put at a key."""


def same_type(a: Any, b: Any) -> bool:
    """Whether ``b`` could stand where ``a`` stood (so the input may still be valid)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return type(a) is type(b)


# --------------------------------------------------------------------------- odd but well-formed files

NAN, INF = float("nan"), float("inf")


def odd_files(ending: str, data: np.ndarray, spacing, role: str) -> list[tuple[str, bytes, bool | None]]:
    """Files of ``ending`` whose header or voxels say something odd: ``(name, bytes, valid)``.

    ``data`` is a valid label map (``role="label"``, read by ``evaluate``) or scan
    (``role="scan"``, read by ``predict``/``train``) of ``spacing``; ``valid`` says whether
    the file must be accepted (True), refused (False), or may be either (None).
    """
    label = role == "label"
    d = np.asarray(data)
    out: list[tuple[str, bytes, bool | None]] = []
    if ending in (".nii", ".nii.gz"):
        gz = ending == ".nii.gz"

        def nii(*args, **kwargs) -> bytes:
            return nifti_bytes(*args, compressed=gz, **kwargs)

        srow = np.zeros((3, 4))
        for i in range(3):
            srow[i, i] = spacing[i]
        singular = srow.copy()
        singular[:, 1] = singular[:, 0]
        out += [
            ("nan spacing (qform)", nii(d, (NAN, spacing[1], spacing[2]), sform_code=0, qform_code=1), False),
            ("zero spacing (qform)", nii(d, (0.0, 0.0, 0.0), sform_code=0, qform_code=1), False),
            ("zero sform", nii(d, spacing, srow=np.zeros((3, 4))), False),
            ("nan sform", nii(d, spacing, srow=np.full((3, 4), NAN)), False),
            ("inf sform", nii(d, spacing, srow=np.full((3, 4), INF)), False),
            ("singular sform", nii(d, spacing, srow=singular), False),
            ("0-sized", nii(np.zeros((0, 16, 16), d.dtype), spacing), False),
            ("1x1x32000", nii(np.zeros((1, 1, 32000), d.dtype), spacing), None if not label else False),
            ("dims larger than the data", nii(d, spacing, dim=[3, 1000, 1000, 1000, 1, 1, 1, 1]), False),
            ("negative dim", nii(d, spacing, dim=[3, -16, 16, 16, 1, 1, 1, 1]), False),
            ("8 dims", nii(d, spacing, dim=[8, 16, 16, 16, 1, 1, 1, 1]), False),
            ("complex64", nii(d.astype(np.complex64), spacing), False),
            ("complex128", nii(d.astype(np.complex128), spacing), False),
            ("binary datatype", nii(d.astype(np.uint8), spacing, datatype=1, bitpix=1), False),
            ("unknown datatype", nii(d, spacing, datatype=9999), False),
            ("fractional floats", nii(d.astype(np.float32) + 0.5, spacing), not label),
            ("integral floats", nii(d.astype(np.float32), spacing), True),
            ("float64", nii(d.astype(np.float64), spacing), True),
            ("NaN voxels", nii(np.full(d.shape, NAN, np.float32), spacing), False),
            ("Inf voxels", nii(np.full(d.shape, INF, np.float32), spacing), False),
            ("scl_slope 0.5", nii(d.astype(np.int16), spacing, scl=(0.5, 0.0)), not label),
            ("scl_slope inf", nii(d.astype(np.int16), spacing, scl=(INF, 0.0)), None),
            ("int64 2**40", nii(d.astype(np.int64) * 2**40, spacing), None),
            ("vox_offset 1e9", nii(d, spacing, vox_offset=1e9), False),
            ("vox_offset -100", nii(d, spacing, vox_offset=-100.0), False),
            ("bad magic", nii(d, spacing, magic=b"xyz\0"), False),
            ("2 channels", nii(np.stack([d, d], -1), spacing), False),
            ("5D", nii(d[..., None, None].repeat(2, 3).repeat(2, 4), spacing), False),
        ]
    elif ending == ".nrrd":
        out += [
            ("nan spacing", nrrd_bytes(d, (NAN, spacing[1], spacing[2])), False),
            ("zero spacing", nrrd_bytes(d, (0.0, 0.0, 0.0)), False),
            ("0-sized", nrrd_bytes(d, spacing, sizes="0 16 16"), False),
            ("sizes larger than the data", nrrd_bytes(d, spacing, sizes="1000 1000 1000"), False),
            ("1x1x100000", nrrd_bytes(np.zeros((1, 1, 100000), d.dtype), spacing), None if not label else False),
            ("complex type", nrrd_bytes(d, spacing, type_name="complex"), False),
            ("4 dimensions, 3 sizes", nrrd_bytes(d, spacing, dimension=4), False),
            ("gzip truncated", truncate(nrrd_bytes(d, spacing, encoding="gzip"), 0.7), False),
            ("fractional floats", nrrd_bytes(d.astype(np.float32) + 0.5, spacing), not label),
            ("integral floats", nrrd_bytes(d.astype(np.float32), spacing), True),
            ("NaN voxels", nrrd_bytes(np.full(d.shape, NAN, np.float32), spacing), False),
        ]
    elif ending == ".mha":
        out += [
            ("nan spacing", mha_bytes(d, (NAN, spacing[1], spacing[2])), False),
            ("zero spacing", mha_bytes(d, (0.0, 0.0, 0.0)), False),
            ("0-sized", mha_bytes(d, spacing, dimsize="0 16 16"), False),
            ("negative size", mha_bytes(d, spacing, dimsize="-16 16 16"), False),
            ("huge size", mha_bytes(d, spacing, dimsize="100000 100000 100000"), False),
            ("unknown element type", mha_bytes(d, spacing, element_type="MET_FOO"), False),
            ("NDims 4, 3 sizes", mha_bytes(d, spacing, ndims=4), False),
            ("3 components", mha_bytes(np.repeat(d[..., None], 3, -1), spacing, components=3), False),
            ("fractional floats", mha_bytes(d.astype(np.float32) + 0.5, spacing), not label),
            ("integral floats", mha_bytes(d.astype(np.float32), spacing), True),
            ("NaN voxels", mha_bytes(np.full(d.shape, NAN, np.float32), spacing), False),
        ]
    elif ending == ".png":
        plane = d if d.ndim == 2 else d[:, :, d.shape[2] // 2]
        plane = plane.astype(np.uint8)
        out += [
            ("RGB", png_bytes(np.stack([plane] * 3, -1)), False if label else None),
            ("gray + alpha", png_bytes(np.stack([plane, plane], -1), mode="LA"), False if label else None),
            ("1 bit", png_bytes(plane.astype(bool)), True if label else None),
            ("16 bit", png_bytes(plane.astype(np.uint16) * 1000), True if label else None),
            ("palette", png_bytes(plane, mode="P"), True if label else None),
            ("1x1", png_bytes(np.zeros((1, 1), np.uint8)), False if label else None),
        ]
    return out

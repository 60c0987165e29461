"""How a preprocessed case is stored, and how a patch is read back without the rest.

Files per case, in the cache folder::

    CASE.b2nd        image, float32 (C, *shape), Blosc2 NDArray
    CASE_seg.b2nd    label, (1, *shape), uint8 (int32 beyond 255 labels), Blosc2 NDArray
    CASE.json        shape, crop, affine, class locations, projections, histogram,
                     the two files' sizes and SHA-256, the cache key; written last

Each file is written whole to a hidden temporary name and renamed into place
(:func:`write_atomic`), and ``CASE.json`` comes last, so a case is complete exactly
when its JSON is there and names files of the recorded sizes (:func:`valid_case_meta`);
a killed writer leaves at most a temporary file, which the next writer of that case
removes. Nothing in the files depends on the time or the machine: the same inputs give
the same bytes.

**Why Blosc2.** The training loader reads a patch (plus the rotation margin) at a
random place of a random case, thousands of times per epoch. Measured by
``python benchmarks/scale.py --only storage`` on the 2-core development VM (shared,
so +-20 %): median time of a 96^3 read at a random place of 4 cases of 512x512x100
float32 (z-scored noisy CT, the hard case for compression); "cold" evicts the case's
file from the page cache before each read::

    format                        MB/case   cold (ms)   warm (ms)
    Blosc2 LZ4, chunks 64^3          83.0        12.5         5.9   <- this cache
    Blosc2 ZSTD(1)                   54.5        16.2        12.9
    Blosc2 ZSTD(8) (nnU-Net's)       65.5        19.8        15.9
    zarr 3, Blosc LZ4, 64^3          85.0        14.3        12.3
    numpy .npy, mmap_mode='r'       104.9        21.3         1.6

The same dataset as medseg's cache stores it (the CT scheme clips to the vessels'
intensity window, so most voxels share one value) takes 0.6 MB per case and 0.7 ms per
warm read. A memory map is faster once the pages are cached, but a patch costs far
more to augment (a 192x192x56 one about 0.4 s of CPU, benchmark item 2), so the 4 ms
saved matter little, while its costs do: the page cache (the whole uncompressed dataset) must be warm, and every page a
patch touches counts in the training process's resident memory while the file is
mapped, so the RSS of a long run grows with the dataset. Blosc2 decompresses only the
16^3 blocks a slice touches, reads them with plain file I/O (nothing stays mapped),
is faster cold and smaller on disk; LZ4 decompresses 2-3 times faster than ZSTD for
a third more bytes. zarr decompresses whole chunks. nnU-Net v2 stores ``.b2nd`` too.

Chunks of 64^3 (256^2 in 2D) voxels hold 1 MiB of float32 and are independent of the
patch size, so changing the patch never invalidates the cache; blocks of 16^3 (64^2)
float32 voxels (32^3 / 128^2 for the uint8 label) fit in an L1 cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.atomic import file_sha256, remove_dead_temporaries, temporary_name, write_atomic
from medseg.errors import DataError, MedsegError
from medseg.preprocessing.case import PreprocessedCase

__all__ = [
    "CASE_FORMAT",
    "CachedCase",
    "case_files",
    "check_case_names",
    "colliding_case_names",
    "link_case",
    "valid_case_meta",
    "read_case_meta",
    "write_case",
]

log = logging.getLogger("medseg.preprocessing")

# Bump when the files' layout or encoding changes: it is part of the cache key.
CASE_FORMAT = 1
_CODEC = "LZ4"
_CLEVEL = 5
_STALE_TEMPORARY_S = 24 * 3600


def case_files(name: str) -> tuple[str, str, str]:
    """The image, label and metadata file names of case ``name``."""
    return f"{name}.b2nd", f"{name}_seg.b2nd", f"{name}.json"


#: The cache folder's own files besides the cases' (medseg.preprocessing.cache).
FOLDER_FILES = ("manifest.json",)


def colliding_case_names(names: Sequence[str]) -> str | None:
    """What shares a cache file name, e.g. ``"cases 'liver' and 'liver_seg'"`` (case
    ``liver_seg``'s image is case ``liver``'s label; nnU-Net's layout has the same
    limit) or a case and one of :data:`FOLDER_FILES`; None when every file is one case's."""
    owner: dict[str, str] = {f: f"the cache's own {f}" for f in FOLDER_FILES}
    for name in names:
        for file in case_files(name):
            first = owner.setdefault(file, name)
            if first != name:
                return (f"cases '{first}' and '{name}'" if file not in FOLDER_FILES
                        else f"case '{name}' and {first}")
    return None


def check_case_names(root: Path, names: Sequence[str]) -> None:
    """Refuse cases that would share a cache file (:func:`colliding_case_names`): checked by
    ``plan`` as by ``preprocess`` and ``train``, so that a planned config can run."""
    collision = colliding_case_names(names)
    if collision is not None:
        raise DataError(f"{root}: {collision} would share a file in the preprocessing cache (a case's label is "
                        "stored as CASE_seg.b2nd, its record as CASE.json); rename one")


# --------------------------------------------------------------------------- writing

def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove temporary files of case ``name`` left by a writer that no longer runs.

    A file from this host whose process is gone is removed; one from another host (a
    shared file system) only after a day, since that process cannot be checked.
    """
    remove_stale_temporaries_of(folder, case_files(name))


def remove_stale_temporaries_of(folder: Path, names: Sequence[str]) -> None:
    """:func:`remove_stale_temporaries` for the cache's files ``names`` in ``folder``."""
    remove_dead_temporaries(folder, names=names, other_hosts_after_s=_STALE_TEMPORARY_S)


def _chunking(shape: Sequence[int], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and blocks of a ``(C, *spatial)`` array: one channel each, sides from the
    dimensionality and item size (see the module docstring), clipped to the array."""
    spatial = len(shape) - 1
    block = (16 if itemsize >= 4 else 32) if spatial == 3 else (64 if itemsize >= 4 else 128)
    blocks = (1, *(min(block, s) for s in shape[1:]))
    chunks = (1, *(min(4 * block if itemsize >= 4 else 2 * block, s) for s in shape[1:]))
    return chunks, blocks


def encode_array(array: np.ndarray) -> bytes:
    """The Blosc2 NDArray file of ``array`` (single-threaded, so the bytes are reproducible)."""
    import blosc2

    array = np.ascontiguousarray(array)
    chunks, blocks = _chunking(array.shape, array.dtype.itemsize)
    cparams = {"codec": getattr(blosc2.Codec, _CODEC), "clevel": _CLEVEL, "nthreads": 1}
    return blosc2.asarray(array, chunks=chunks, blocks=blocks, cparams=cparams).to_cframe()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _from_b64(text: str, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape)


def write_case(folder: Path, case: PreprocessedCase, key: str) -> dict[str, Any]:
    """Write ``case`` into ``folder`` (image, label, then the JSON); returns the JSON's content.

    Raises
    ------
    MedsegError
        One line naming ``folder`` when the file system refuses (full disk, no
        permission). No partial file is left; an image or label already renamed into
        place has no JSON yet, so the case does not count as complete.
    """
    image_name, label_name, meta_name = case_files(case.name)
    remove_stale_temporaries(folder, case.name)
    try:
        files = {}
        for name, array in ((image_name, case.image), (label_name, case.label)):
            data = encode_array(array)
            write_atomic(folder / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {
            "format": CASE_FORMAT,
            "key": key,
            "name": case.name,
            "shape": [int(s) for s in case.image.shape[1:]],
            "channels": int(case.image.shape[0]),
            "label_dtype": case.label.dtype.str,
            "bbox": [[int(a), int(b)] for a, b in case.bbox],
            "grid_shape": list(case.grid_shape),
            "affine": np.asarray(case.affine, dtype=np.float64).round(9).tolist(),
            "raw_histogram": {str(k): int(v) for k, v in sorted(case.raw_histogram.items())},
            "class_locations": {
                str(v): {"count": int(len(loc)), "int32": _b64(loc)} for v, loc in sorted(case.class_locations.items())
            },
            "projections": [_b64(np.packbits(p.ravel())) for p in case.projections],
            "files": files,
        }
        write_atomic(folder / meta_name, (json.dumps(meta, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise MedsegError(f"{folder}: cannot write the preprocessing cache ({err.strerror or err})") from None
    return meta


def link_case(source: Path, source_key: str, folder: Path, name: str, key: str) -> dict[str, Any] | None:
    """Put case ``name`` of the cache folder ``source`` (complete under ``source_key``) into
    ``folder`` under ``key``, without preprocessing it again: its image and label files are
    hard links to the source's (a copy where the file system has none), and its JSON is
    the source's with the new key, written last. Returns the new JSON, or None when the
    source's case is incomplete, its files are not the bytes recorded when they were
    written (their SHA-256 is checked: a damaged file would be carried into the new folder
    unseen), or they vanished meanwhile (an old folder deleted): the case is then
    preprocessed.

    For a case whose inputs did not change (:func:`medseg.preprocessing.cache.unchanged_elsewhere`):
    adding one case to a dataset, or touching one file, changed the whole cache's key and
    preprocessed every case again. The files are the same bytes either way.

    Raises
    ------
    MedsegError
        One line naming ``folder`` when the file system refuses (full disk, no permission).
    """
    meta = valid_case_meta(source, name, source_key, verify=True)
    if meta is None:
        return None
    remove_stale_temporaries(folder, name)
    try:
        for file in meta["files"]:
            if not _place(source / file, folder / file):
                return None
        meta = {**meta, "key": key}
        write_atomic(folder / case_files(name)[2], (json.dumps(meta, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise MedsegError(f"{folder}: cannot write the preprocessing cache ({err.strerror or err})") from None
    return meta


def _place(source: Path, target: Path) -> bool:
    """``target`` becomes ``source``'s bytes: a hard link, else a copy, through a temporary
    renamed into place. False when ``source`` is gone (its folder was deleted meanwhile).

    Raises
    ------
    OSError
        Where the target's file system refuses (nothing is left behind).
    """
    if target.exists() and os.path.samefile(source, target):  # linked already (another process, an earlier run)
        return True
    tmp = temporary_name(target)
    try:
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            return False
        except OSError:  # another file system, or one without hard links
            try:
                shutil.copyfile(source, tmp)
            except FileNotFoundError:
                if not source.exists():
                    return False
                raise
        os.replace(tmp, target)
        return True
    finally:
        if os.path.lexists(tmp):  # a failed copy; or a rename onto a link of the same file, which does nothing
            os.unlink(tmp)


# --------------------------------------------------------------------------- reading

def read_case_meta(folder: Path, name: str) -> dict[str, Any] | None:
    """The JSON of case ``name``, or None when it is missing or unreadable."""
    try:
        return json.loads((folder / case_files(name)[2]).read_text())
    except (OSError, ValueError):
        return None


def valid_case_meta(folder: Path, name: str, key: str, verify: bool = False) -> dict[str, Any] | None:
    """The JSON of case ``name`` if the case is complete: its JSON (this ``key``, this
    format) and the image and label files of the sizes it records; else None. With
    ``verify``, the files' SHA-256 must be the recorded ones too (a file changed in place
    at the same size; one read of the files)."""
    meta = read_case_meta(folder, name)
    if meta is None or meta.get("format") != CASE_FORMAT or meta.get("key") != key or meta.get("name") != name:
        return None
    try:
        if not all((folder / file).stat().st_size == info["bytes"] for file, info in meta["files"].items()):
            return None
        if verify:
            for file, info in meta["files"].items():
                if file_sha256(folder / file, chunk=1 << 22) != info["sha256"]:
                    log.warning("%s: its SHA-256 is not the one recorded when it was written; preprocessing the "
                                "case again", folder / file)
                    return None
        return meta
    except (OSError, KeyError, TypeError, AttributeError):
        return None


class CachedCase:
    """A case of the cache: its shape and foreground summary, and reads of any region.

    The arrays are opened lazily, once per process (a DataLoader worker opens its
    own), and read with plain file I/O; :meth:`load` keeps them decompressed in memory
    instead. The heavier metadata (class locations, projections) is decoded on demand
    and not kept.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.name = str(meta["name"])
        self.shape = tuple(int(s) for s in meta["shape"])
        self.channels = int(meta["channels"])
        self.bbox = [tuple(b) for b in meta["bbox"]]
        self.raw_histogram = {int(k): int(v) for k, v in meta.get("raw_histogram", {}).items()}
        self.class_counts = {int(k): int(v["count"]) for k, v in meta["class_locations"].items()}
        self._arrays: tuple[Any, Any] | None = None
        self._pid = -1
        self._in_memory = False

    def __getstate__(self) -> dict[str, Any]:
        # a worker started with spawn opens the files itself; arrays in memory travel
        state = dict(self.__dict__)
        if not self._in_memory:
            state["_arrays"], state["_pid"] = None, -1
        return state

    # ---- arrays
    def _open(self) -> tuple[Any, Any]:
        if self._in_memory and self._arrays is not None:
            return self._arrays
        if self._arrays is None or self._pid != os.getpid():
            import blosc2

            image_name, label_name, _ = case_files(self.name)
            try:
                self._arrays = tuple(  # type: ignore[assignment]
                    blosc2.open(str(self.folder / f), mode="r", dparams={"nthreads": 1}) for f in (image_name, label_name)
                )
            except Exception as err:
                raise MedsegError(f"{self.folder / image_name}: unreadable cache file ({err}); rerun medseg preprocess") from None
            self._pid = os.getpid()
        assert self._arrays is not None
        return self._arrays

    def _decompressed(self, which: int, region: Any) -> np.ndarray:
        """``region`` of the image (``which`` 0) or label (1) array; a file damaged after it
        was written (its size unchanged, so the cache took it) is named, not a bare
        Blosc2 error from deep in a data loader."""
        array = self._open()[which]
        if isinstance(array, np.ndarray):
            return array[region]
        try:
            return np.asarray(array[region])
        except Exception as err:
            path = self.folder / case_files(self.name)[which]
            raise MedsegError(
                f"{path}: corrupt cache file ({type(err).__name__}: {err}); delete it and rerun medseg preprocess"
            ) from None

    def load(self) -> "CachedCase":
        """Decompress both arrays into memory (reads afterwards are slices)."""
        image, label = self._decompressed(0, ...), self._decompressed(1, ...)
        self._arrays = (np.ascontiguousarray(image), np.ascontiguousarray(label))
        self._in_memory = True
        return self

    def whole(self) -> tuple[np.ndarray, np.ndarray]:
        """The image ``(C, *shape)`` float32 and label ``(1, *shape)``."""
        return self._decompressed(0, ...), self._decompressed(1, ...)

    def read(self, lower: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image and label of the box ``[lower, lower + size)``; outside the case each voxel
        repeats the nearest voxel of the case's border (MONAI's ``padding_mode="border"``).

        Only the Blosc2 blocks inside the box are read and decompressed. Zeros would not
        do: after the CT normalisation 0 is the foreground's mean intensity, so a zero
        border would look like an unlabelled vessel.
        """
        inside, pad = _clip(lower, size, self.shape)
        region = (slice(None), *inside)
        out_image = self._decompressed(0, region)
        out_label = self._decompressed(1, region)
        if any(p != (0, 0) for p in pad):
            out_image = np.pad(out_image, [(0, 0), *pad], mode="edge")
            out_label = np.pad(out_label, [(0, 0), *pad], mode="edge")
        return out_image, out_label

    # ---- foreground summaries
    def _meta(self) -> dict[str, Any]:
        meta = read_case_meta(self.folder, self.name)
        if meta is None:
            raise MedsegError(f"{self.folder / case_files(self.name)[2]}: cache file vanished; rerun medseg preprocess")
        return meta

    def class_locations(self, value: int) -> np.ndarray:
        """``(n, dims)`` voxel coordinates of foreground class ``value`` (a subsample)."""
        entry = self._meta()["class_locations"][str(value)]
        return _from_b64(entry["int32"], np.int32, (entry["count"], len(self.shape)))

    def projection(self, axis: int) -> np.ndarray:
        """bool, the foreground's maximum along ``axis``, with that axis kept (length 1)."""
        shape = [s for a, s in enumerate(self.shape) if a != axis]
        bits = np.frombuffer(base64.b64decode(self._meta()["projections"][axis]), dtype=np.uint8)
        flat = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool)
        return np.expand_dims(flat.reshape(shape), axis)

    def projection_region(self, axes: Sequence[int], lower: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """uint8 ``(len(axes), *size)``: channel ``k`` is :meth:`projection` ``(axes[k])`` in the
        box, broadcast along that axis (the crop of the whole volume's ``label_projection``),
        padded outside the case as :meth:`read` pads the label."""
        inside, pad = _clip(lower, size, self.shape)
        out = []
        for axis in axes:
            proj = self.projection(axis)
            region = tuple(slice(0, 1) if a == axis else s for a, s in enumerate(inside))
            part = proj[region]
            reps = [inside[a].stop - inside[a].start if a == axis else 1 for a in range(len(inside))]
            out.append(np.pad(np.tile(part, reps), pad, mode="edge"))
        return np.stack(out).astype(np.uint8)


def _clip(lower: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> tuple[list[slice], list[tuple[int, int]]]:
    """The part of the box inside the case, and the padding around it (the box must overlap the case)."""
    inside, pad = [], []
    for lo, n, s in zip(lower, size, shape):
        lo, n = int(lo), int(n)
        a, b = max(lo, 0), min(lo + n, s)
        if b <= a:
            raise ValueError(f"box [{lo}, {lo + n}) does not overlap a case axis of length {s}")
        inside.append(slice(a, b))
        pad.append((a - lo, lo + n - b))
    return inside, pad

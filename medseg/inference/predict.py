"""``medseg predict``: segment a batch of scans with a trained model.

For every case found in ``--input`` (folders and/or files, nnU-Net naming
``CASE_0000.nii.gz`` for channels), :class:`~medseg.inference.predictor.Predictor`
preprocesses, runs the sliding window and maps the probabilities back to the input grid.
The output ``OUTPUT/CASE<ending>`` (the input's file ending) has exactly the input's
shape and affine, and reuses the input's header (``write_image(reference_path=...)``).
With probabilities requested, ``OUTPUT/CASE_prob.nii.gz`` holds them as a 4D NIfTI
(channels last, one per class, float32: softmax probabilities, sigmoids for a multi-label
head (every loss term with ``sigmoid: true``), or ``(1 + tanh) / 2`` maps for a model
trained by SAUNA regression alone) with the same affine; it is written as the
classes are mapped back, slab by slab, never held whole in memory.

Memory: a case takes at most about 3x the float32 size of the larger of the scan and its
network grid (the scan resampled to ``data.target_spacing``) besides the network (measured
2.6x for a 512x512x400 CT at its own spacing, 2.7x the grid for a 512x512x120 CT at 5 mm
slices brought to 1 mm; see :mod:`medseg.inference.predictor` for each stage): the scan
is resampled by slabs, the windows are stitched by bands into float16 class maps, which
are mapped back by slabs.

Batch behaviour:

* the next case is read and preprocessed in a background thread while the current one
  is on the network, unless the current one has more than ``PREFETCH_MAX_VOXELS``
  voxels: then the next is read only after it, so that two large scans are never in
  memory together;
* ``--output`` may neither be an input folder nor hold a name that is an input file
  (compared by name and by real path, symlinks resolved): such a run is refused before
  the model is read, and nothing is written;
* ``OUTPUT/predict_provenance.json`` (:data:`PROVENANCE`) records what the outputs are
  made of: the SHA-256 of the checkpoint file (the digest ``medseg adapt`` records of
  its source) and every option that changes their values (:func:`_provenance`), and,
  under ``made_by``, which medseg, engine build, torch, device and command wrote the
  record (:func:`medseg.provenance.provenance`; recorded, not compared). A
  case whose output exists is skipped unless ``overwrite`` (an interrupted batch
  resumes where it stopped), but only under the same record: a folder predicted with
  another checkpoint or other options, or holding outputs without a record, is refused
  (naming the differing keys) unless ``overwrite``, which first removes those outputs,
  so that the folder never mixes two models' results, even after a kill or a failed
  case;
* outputs are written atomically: each process writes into its own hidden folder
  ``OUTPUT/.predict.HOST-PID.tmp`` (:func:`medseg.atomic.temporary_name`) and renames
  the finished file into place, so a killed run never leaves a half-written file under
  a final name; the next run removes the temporaries of this host's writers that are
  no longer running, and never takes a temporary file for an output;
* a case that fails (unreadable file, NaN voxels, wrong channel count, ...) is reported
  as one line naming it and the others go on; the return value says whether all passed.

Under ``torchrun`` (:mod:`medseg.distributed`) the cases are sharded: case ``i`` of the
sorted case list goes to rank ``i % N``, each rank on its own device (GPU
``LOCAL_RANK``), and writes exactly the files one process would write for it. Rank 0
prints the summary of all ranks; the return value (hence every rank's exit code) is
false when a case failed on any rank. Every rank checks the output folder and its
record before any case is read; rank 0 alone cleans the folder and writes the record.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from medseg import distributed
from medseg.errors import ArgumentError, DataError, MedsegError

__all__ = ["run_prediction", "compared_provenance", "PROBABILITY_SUFFIX", "PREFETCH_MAX_VOXELS", "PROVENANCE"]

PROBABILITY_SUFFIX = "_prob.nii.gz"
# what made the outputs of a folder (see _provenance)
PROVENANCE = "predict_provenance.json"
# recorded for the reader but not compared: a run folder may be moved or copied, and
# another process (host, time, command, a rank of torchrun) may continue the folder
_NOT_COMPARED = ("checkpoint", "made_by")
# a temporary file or folder of medseg.atomic.temporary_name: .NAME.HOST-PID.tmp
# a channel suffix of nnU-Net's naming (medseg.data.dataset groups CASE_XXXX files)
_CHANNEL = re.compile(r"^(?P<case>.+)_\d{4}$")
# a scan up to 256^3 overlaps with reading the next one (cheap); a larger one does not
PREFETCH_MAX_VOXELS = 256**3


def _output_paths(case, output: Path) -> tuple[Path, Path]:
    from medseg.data.io import ending_of

    ending = ending_of(case.image_files[0])
    return output / f"{case.name}{ending}", output / f"{case.name}{PROBABILITY_SUFFIX}"


def _check_outputs_distinct(cases, output: Path, save_probabilities: bool) -> None:
    """Refuse two cases whose outputs share a name: case ``X``'s probabilities and case
    ``X_prob``'s mask are both ``X_prob.nii.gz``, and the one written last replaced the
    other without a word (a rerun then skipped ``X`` as finished)."""
    written: dict[str, tuple[Any, str]] = {}
    for case in cases:
        seg_path, prob_path = _output_paths(case, output)
        for path, what in ((seg_path, "mask"), *(((prob_path, "probabilities"),) if save_probabilities else ())):
            other = written.setdefault(path.name, (case, what))
            if other[0] is not case:
                raise DataError(f"{other[0].image_files[0]} and {case.image_files[0]}: case '{other[0].name}''s "
                                f"{other[1]} and case '{case.name}''s {what} would both be {path}; rename one of "
                                "the scans")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal real paths, or one existing file (hard links,
    a case-insensitive file system)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _check_output_is_not_input(inputs: list[str | Path], output: Path) -> None:
    """Refuse an ``output`` that is an input folder or file, or would overwrite an input.

    Run before the model is read, when the case names (which depend on the model's
    channel count) are not known yet, so every name an input file can give its case is
    checked: its own name (a case without a channel suffix) and the name without
    ``_XXXX``, each as the segmentation and as the probabilities.

    Raises
    ------
    MedsegError
        Naming ``output``, the input it collides with, and the problem.
    """
    from medseg.data.io import SUPPORTED_ENDINGS, ending_of, strip_ending

    files: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            if _same_file(given, output):
                raise ArgumentError(
                    "output", f"is the input folder {given}; the predictions would be mixed with the scans "
                    "(choose another output folder)", output,
                )
            files.extend(p for p in sorted(given.iterdir()) if p.is_file() and ending_of(p) in SUPPORTED_ENDINGS)
        elif given.is_file():
            files.append(given)
    for file in files:
        if _same_file(file, output):
            raise ArgumentError("output", f"is the input scan {file} (choose an output folder)", output)
        ending = ending_of(file)
        stem = strip_ending(file, ending)
        channel = _CHANNEL.match(stem)
        for case in (stem, *((channel["case"],) if channel else ())):
            for name in (f"{case}{ending}", f"{case}{PROBABILITY_SUFFIX}"):
                if _same_file(output / name, file):
                    raise ArgumentError(
                        "output", f"{name} would overwrite the input scan {file} (choose another output folder)", output
                    )


def _provenance(predictor, tta: bool, overlap: float, save_probabilities: bool) -> dict[str, Any]:
    """What the outputs of this run are made of, as recorded in :data:`PROVENANCE`.

    The checkpoint's SHA-256 stands for the network, its preprocessing and the run
    config; then every option that changes the values written: the test-time flips,
    the overlap and the blending mode of the windows, whether probabilities are written,
    the stitched class maps' dtype, and mixed precision (used on CUDA). The windows per
    forward pass and where the class maps are stitched change no value and are left out.
    The checkpoint's path and ``made_by`` (:func:`medseg.provenance.provenance`: the
    build, device, command, host and time of the process that wrote the record) are
    recorded for the reader, not compared (:func:`compared_provenance`).
    """
    from medseg import __version__
    from medseg.atomic import file_sha256
    from medseg.inference.predictor import STITCH_DTYPE
    from medseg.provenance import provenance

    return {
        "medseg_version": __version__,
        "checkpoint_sha256": predictor.checkpoint_sha256 or file_sha256(predictor.checkpoint_path),
        "tta": bool(tta),
        "overlap": float(overlap),
        "mode": predictor.config.inference.mode,
        "save_probabilities": bool(save_probabilities),
        "stitch_dtype": str(STITCH_DTYPE).removeprefix("torch."),
        "amp": predictor.amp,
        "checkpoint": os.path.abspath(predictor.checkpoint_path),  # read from anywhere, as the run's config's paths
        "made_by": provenance(predictor.device),
    }


def compared_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """The keys of a :data:`PROVENANCE` record that must match for a folder to take more outputs."""
    return {k: v for k, v in record.items() if k not in _NOT_COMPARED}


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    text = json.dumps(value)
    return text[:13] + '..."' if isinstance(value, str) and len(value) > 16 else text


def _check_provenance(output: Path, provenance: dict[str, Any], cases, overwrite: bool) -> tuple[bool, list[Path]]:
    """Compare ``output``'s record with this run's: whether to write the record, and the
    outputs of other settings to remove first (only with ``overwrite``).

    Only the final names of the cases' outputs count; hidden temporaries never do.

    Raises
    ------
    MedsegError
        Without ``overwrite``: the record differs (naming the keys, old -> new), is
        unreadable, or is missing while outputs exist.
    """
    advice = "use another --output, or --overwrite to redo every case"
    path = output / PROVENANCE
    existing = [p for case in cases for p in _output_paths(case, output) if p.is_file()]
    if not path.exists():
        if existing and not overwrite:
            raise MedsegError(
                f"{output}: holds {len(existing)} file(s) named as this run's outputs ({existing[0].name}, ...) but no {PROVENANCE} "
                f"saying which model and options made them; {advice}"
            )
        return True, existing
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        if not overwrite:
            raise MedsegError(f"{path}: unreadable ({(str(err).splitlines() or [''])[0]}); {advice}") from None
        return True, existing
    then, now = compared_provenance(recorded), compared_provenance(provenance)
    changed = [k for k in dict.fromkeys([*now, *then]) if then.get(k) != now.get(k)]
    if not changed:
        return False, []
    if not overwrite:
        differences = ", ".join(f"{k} {_shown(recorded.get(k))} -> {_shown(provenance.get(k))}" for k in changed)
        raise MedsegError(f"{output}: predicted with other settings ({differences}; see {PROVENANCE}); {advice}")
    # the record is the folder's: once it names the new settings, every output the old ones
    # made must go, not only this run's cases' (a later run over all cases kept the others)
    return True, _all_outputs(output)


def _all_outputs(output: Path) -> list[Path]:
    """Every segmentation or probability map in ``output`` (files with an image ending)."""
    from medseg.data.io import SUPPORTED_ENDINGS, ending_of

    return sorted(p for p in output.iterdir()
                  if p.is_file() and not p.name.startswith(".") and ending_of(p) in SUPPORTED_ENDINGS)


def _prepare_output(output: Path, provenance: dict[str, Any] | None, stale: list[Path]) -> None:
    """Before any case: remove dead writers' temporaries and the ``stale`` outputs of other
    settings, then write ``provenance`` (``None``: the folder's record is already it)."""
    from medseg.atomic import remove_dead_temporaries, write_atomic

    remove_dead_temporaries(output)
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(f"medseg: removed {len(stale)} file(s) of other settings from {output} (--overwrite)", file=sys.stderr)
    if provenance is not None:
        write_atomic(output / PROVENANCE, json.dumps(provenance, indent=2) + "\n")


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """This process's folder for unfinished outputs, ``OUTPUT/.predict.HOST-PID.tmp``,
    made afresh; removed with what a failed case left in it. Whatever stood at its name
    goes first: a dead process of the same pid's folder, or another user's link to a
    folder of theirs, into which the outputs were written (replacing files of the same
    names there)."""
    from medseg.atomic import clear_temporary, temporary_name

    staging = temporary_name(output / "predict")
    clear_temporary(staging)
    try:
        staging.mkdir()
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _ProbabilityFile:
    """``CASE_prob.nii.gz`` written while the classes are mapped back, atomically.

    A channels-last 4D NIfTI is stored class after class, each in Fortran order (the
    first axis fastest), so the slabs :meth:`Predictor.to_original_grid
    <medseg.inference.predictor.Predictor.to_original_grid>` hands over (classes in order,
    slabs ascending along the last axis) are appended as they come. The header places
    the voxels as the scan's own does (a NIfTI ``reference`` of this geometry: its sform,
    qform, codes, spacings and units as stored, :func:`medseg.data.io.stored_nifti_geometry`;
    with only the sform, ITK placed the file 3 mm off a scan whose qform differed), else
    as ``nib.save(nib.Nifti1Image(data, affine))`` writes it (sform "aligned", qform
    "unknown", millimetre units); float32, the "vector" intent. The file is
    written in the process's ``staging`` folder and appears under its name only when
    every slab was written.
    """

    def __init__(self, path: Path, geometry, classes: int, staging: Path, reference: Path | None = None) -> None:
        import nibabel as nib
        from nibabel.openers import Opener

        from medseg.data.io import NIFTI_ENDINGS, ending_of, set_geometry_fields, stored_nifti_geometry

        shape = tuple(geometry.shape)
        self.spatial = shape
        # a 2D image is stored (X, Y, 1, classes), the layout medseg's reader takes back
        header = nib.Nifti1Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape((*shape, *((1,) if len(shape) == 2 else ()), classes))
        affine = np.asarray(geometry.affine)
        header.set_sform(affine, code="aligned")
        header.set_qform(affine, code="unknown")
        header.set_xyzt_units("mm")
        header.set_intent("vector")
        if reference is not None and ending_of(reference) in NIFTI_ENDINGS:
            stored = stored_nifti_geometry(reference, affine)
            if stored is not None:
                set_geometry_fields(header, stored)
        self.path = path
        self.classes = classes
        self.next = (0, 0)  # the class and the first index along the last axis expected next
        staging.mkdir(parents=True, exist_ok=True)
        self.tmp = staging / path.name
        self.file = Opener(str(self.tmp), "wb")  # gzip, nibabel's compression level
        header.write_to(self.file)

    def __call__(self, c: int, index: tuple, values: np.ndarray) -> None:
        last = index[-1]
        if (c, last.start) != self.next:
            raise RuntimeError(f"probability slab ({c}, {last.start}) out of order, expected {self.next}")
        self.file.write(np.asarray(values, dtype=np.float32).tobytes(order="F"))
        self.next = (c, last.stop) if last.stop < self.spatial[-1] else (c + 1, 0)

    def __enter__(self) -> "_ProbabilityFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.close()
            if exc_type is None:
                if self.next != (self.classes, 0):
                    raise RuntimeError(f"{self.path}: incomplete probabilities (next slab {self.next})")
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def _load(predictor, case, info) -> tuple[dict[str, Any], dict[str, Any]]:
    """The case read and preprocessed; the scan's array is dropped once resampled."""
    from medseg.data.dataset import load_case
    from medseg.inference.predictor import release_freed_memory

    loaded = load_case(case, info, check_labels=False)
    preprocessed = predictor.preprocess(loaded, consume=True)
    release_freed_memory()  # the reading's and resampling's temporaries, in this thread's arena
    return loaded, preprocessed


def case_memory_bytes(scan_voxels: int, grid_voxels: int, channels: int, classes: int) -> float:
    """About the memory a case takes while predicted with its class maps in host memory:
    per voxel of the larger of the scan and its network grid, the scan's channels
    (float32), one float32 working copy (resampling, blending) and the class maps
    (float16). For one channel and two classes that is 3x the scan's float32 size, what
    README measured (2.7x the grid of an upsampled CT; test_bounded_memory: 3.45x)."""
    return 4.0 * max(scan_voxels, grid_voxels) * (channels + 1 + classes / 2)


def _memory_warning(case_name: str, loaded: dict, preprocessed: dict, predictor) -> str | None:
    """A line saying that the case may not fit in this machine's (or container's, or
    Slurm job's) memory beside what the command holds, or None. The kernel's
    out-of-memory killer ends the command without a word; this line is what the user
    sees last."""
    from medseg.memory import memory_limit_bytes, resident_bytes

    limit = memory_limit_bytes()
    if limit is None:
        return None
    grid = tuple(preprocessed["image"].shape[1:])
    scan = tuple(loaded["geometry"].shape)
    need = case_memory_bytes(math.prod(scan), math.prod(grid), predictor.info.num_channels, predictor.num_classes)
    held = resident_bytes()
    if need + held <= 0.9 * limit:
        return None
    where = "its network grid" if math.prod(grid) > math.prod(scan) else "the scan"
    size = "x".join(map(str, grid if where == "its network grid" else scan))
    return (f"medseg: warning: case {case_name} needs about {need / 2**30:.1f} GB ({size} voxels of {where}) besides "
            f"the {held / 2**30:.1f} GB this command holds, more than 90 % of the {limit / 2**30:.1f} GB of memory "
            "here: the kernel may stop the command (a rerun skips the cases written)")


def _one_line(case_name: str, err: BaseException) -> str:
    if isinstance(err, MedsegError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return f"case {case_name}: {text.splitlines()[0] if text else type(err).__name__}"


def run_prediction(
    model: str | Path,
    inputs: list[str | Path],
    output: str | Path,
    overwrite: bool = False,
    tta: bool | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    save_probabilities: bool = False,
    device: str = "auto",
    stitch_device: str | None = None,
) -> bool:
    """Predict every case of ``inputs`` into ``output``.

    Parameters
    ----------
    model : path
        Run folder (checkpoint ``best``, else ``latest``) or a checkpoint file.
    inputs : list of paths
        Folders of scans and/or scan files; ``CASE_XXXX`` suffixes group channels.
    output : path
        Folder for ``CASE<ending>`` (created), and :data:`PROVENANCE`; neither an input
        folder nor a folder where an output would replace an input.
    overwrite : bool
        Recompute cases whose output exists (default: skip them), also when they were
        made with another checkpoint or other options (their outputs are removed first).
    tta, overlap, sw_batch_size : optional
        Flip test-time augmentation, sliding-window overlap and windows per forward
        pass; ``None`` takes the run config's ``inference`` section.
    save_probabilities : bool
        Also write ``CASE_prob.nii.gz`` (or when the run config says so).
    device : str
        ``auto``, ``cpu`` or ``cuda``; AMP autocast is used on CUDA.
    stitch_device : str, optional
        Where the stitched class maps are kept: ``auto``, ``cpu`` or ``cuda`` (see
        :func:`~medseg.inference.predictor.resolve_stitch_device`); ``None`` takes the
        run config's ``inference.stitch_device``.

    Returns
    -------
    bool
        True if every case was predicted (or skipped because its output existed).

    Raises
    ------
    CheckpointError
        No checkpoint in the run folder, or an unreadable/incompatible checkpoint.
    DataError
        Inputs that do not exist, hold no images, or miss a channel file.
    MedsegError
        Bad option values (device, stitch device, overlap, sw_batch_size); an output
        folder that is or would overwrite an input; without ``overwrite``, an output
        folder predicted with another checkpoint or other options (or whose outputs have
        no record); under torchrun, one of the above on another rank.
    """
    from medseg.inference.predictor import resolve_stitch_device
    from medseg.runfolder import resolve_device

    if overlap is not None and not 0 <= overlap < 1:
        raise ArgumentError("overlap", "must be in [0, 1)", overlap)
    if sw_batch_size is not None and sw_batch_size < 1:
        raise ArgumentError("sw_batch_size", "must be a positive integer", sw_batch_size)
    where = distributed.device_for_rank(resolve_device(device, "device", argument=True))
    if stitch_device is not None:
        stitch_device = resolve_stitch_device(stitch_device, where, "stitch_device", argument=True)
    from medseg.runfolder.lock import RunFolderLock

    with distributed.process_group(where):
        # one command at a time per output folder (rank 0 holds it for a torchrun job): two
        # at once, with other options, left outputs of both under one record
        with RunFolderLock(Path(output), "--output", enabled=distributed.rank() == 0) as lock:
            return _predict_all(
                model, inputs, Path(output), overwrite, tta, overlap, sw_batch_size, save_probabilities, where,
                stitch_device, lock,
            )


def _check_some_case_fits(cases, spatial_dims: int, num_channels: int) -> None:
    """Refuse inputs of which no case has the model's dimension (a 2D model given 3D
    scans) or its number of channels (a folder of label maps given to an RGB model), from
    the files' headers, before the output folder is made: every case would fail, one line
    each, and leave a folder holding only its record. Where some cases fit, the others
    fail as cases (reported, the batch goes on), as an unreadable one does."""
    from medseg.data.io import read_geometry
    from medseg.inference.predictor import slice_hint

    dims, shapes, channels = {}, {}, {}
    for case in cases:
        try:
            headers = [read_geometry(f) for f in case.image_files]
        except DataError:
            continue  # reported with its case
        dims[case.image_files[0]] = headers[0][1].ndim
        shapes[case.image_files[0]] = tuple(headers[0][1].shape)
        channels[case.image_files[0]] = sum(c for c, _ in headers)
    if dims and spatial_dims not in dims.values():
        first, ndim = next(iter(dims.items()))
        others = f" (and no input is {spatial_dims}D)" if len(cases) > 1 else ""
        raise DataError(f"{first}: {ndim}D image, but the model was trained on {spatial_dims}D patches{others}"
                        + slice_hint(shapes[first], spatial_dims))
    if channels and num_channels not in channels.values():
        first, count = next(iter(channels.items()))
        others = f" (and no input has {num_channels})" if len(cases) > 1 else ""
        raise DataError(f"{first}: {count} channel(s), but the model was trained on {num_channels}{others}")


def _predict_all(
    model, inputs, output: Path, overwrite, tta, overlap, sw_batch_size, save_probabilities, device, stitch_device,
    lock,
) -> bool:
    from medseg.atomic import check_output_folder, storage_error
    from medseg.data.dataset import cases_from_paths
    from medseg.inference.predictor import Predictor, release_freed_memory, resolve_stitch_device
    from medseg.progress import case_progress

    with distributed.synchronized("reading the model and the inputs"):
        _check_output_is_not_input(inputs, output)
        check_output_folder(output, "output", argument=True)
        predictor = Predictor.from_path(model, device)
        if stitch_device is None:  # the run config's, named as its key
            stitch_device = resolve_stitch_device(
                predictor.config.inference.stitch_device, device, "inference.stitch_device"
            )
        info = predictor.info
        # a case whose files form none (a missing channel, a name two files share) is
        # reported and left out, as a case that fails to read: one such case stopped a folder
        unformed: list[str] = []
        cases = cases_from_paths([Path(p) for p in inputs], num_channels=info.num_channels, problems=unformed)
        if not cases:
            more = f" (and {len(unformed) - 1} more problem(s))" if len(unformed) > 1 else ""
            raise DataError(f"{unformed[0]}{more}; no case left to predict")
        _check_some_case_fits(cases, predictor.spatial_dims, info.num_channels)
        inference = predictor.config.inference
        tta = inference.tta_flips if tta is None else tta
        overlap = inference.overlap if overlap is None else overlap
        save_probabilities = save_probabilities or inference.save_probabilities
        _check_outputs_distinct(cases, output, save_probabilities)
        provenance = _provenance(predictor, tta, overlap, save_probabilities)
        if output.is_dir():  # a folder that will be refused is refused before the lock file is put in it
            _check_provenance(output, provenance, cases, overwrite)
        lock.take()  # creates the folder: the inputs are checked by now
        record, stale = _check_provenance(output, provenance, cases, overwrite)
        output.mkdir(parents=True, exist_ok=True)

    with distributed.main_process(f"preparing {output}") as main:
        if main:
            _prepare_output(output, provenance if record else None, stale)
            for problem in unformed:
                print(f"medseg: {problem}", file=sys.stderr)

    todo = []
    skipped = 0
    # this rank's share; deciding before any rank writes keeps the skip test race-free
    for case in cases[distributed.rank() :: distributed.world_size()]:
        seg_path, prob_path = _output_paths(case, output)
        done = seg_path.is_file() and (not save_probabilities or prob_path.is_file())
        if done and not overwrite:
            skipped += 1
        else:
            todo.append(case)
    skipped = int(distributed.all_reduce_sum(torch.tensor([skipped])).item())
    if skipped and main:
        print(
            f"medseg: {skipped} case(s) already predicted in {output} with this model and these options, skipped "
            "(--overwrite recomputes them)",
            file=sys.stderr,
        )

    failed: list[str] = []
    from medseg.data.io import write_image

    # the class maps live in host memory (not on a GPU, where they take the GPU's memory)
    host_maps = predictor.device.type == "cpu" or stitch_device == "cpu"

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch") as loader, _staging(output) as staging:
        upcoming: Future | None = loader.submit(_load, predictor, todo[0], info) if todo else None
        bar = case_progress(len(todo), "predict", show=main)
        for i, case in enumerate(todo):
            current, upcoming = upcoming, None
            following = todo[i + 1] if i + 1 < len(todo) else None
            seg_path, prob_path = _output_paths(case, output)
            try:
                loaded, preprocessed = current.result()
                if host_maps and (warning := _memory_warning(case.name, loaded, preprocessed, predictor)):
                    print(warning, file=sys.stderr, flush=True)
                if following is not None and math.prod(loaded["geometry"].shape) <= PREFETCH_MAX_VOXELS:
                    upcoming = loader.submit(_load, predictor, following, info)
                probabilities = (
                    _ProbabilityFile(prob_path, loaded["geometry"], predictor.num_classes, staging,
                                     reference=case.image_files[0])
                    if save_probabilities else nullcontext()
                )
                with probabilities as sink:
                    label = predictor.segment(
                        loaded, preprocessed, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta,
                        stitch_device=stitch_device, on_probabilities=sink, consume=True,
                    )
                write_image(staging / seg_path.name, label, loaded["geometry"], reference_path=case.image_files[0])
                os.replace(staging / seg_path.name, seg_path)
            except MemoryError as err:
                failed.append(case.name)
                print(f"medseg: {_one_line(case.name, err)} (out of memory)", file=sys.stderr)
            except OSError as err:
                if storage_error(err, output) is not None:
                    raise  # the output folder (full, read-only), not this case: every next case would fail too
                failed.append(case.name)
                print(f"medseg: {_one_line(case.name, err)}", file=sys.stderr)
            except Exception as err:  # one bad case must not stop the batch
                failed.append(case.name)
                print(f"medseg: {_one_line(case.name, err)}", file=sys.stderr)
            release_freed_memory()
            bar.update()
            if upcoming is None and following is not None:  # a large case: read the next one now
                upcoming = loader.submit(_load, predictor, following, info)
        bar.close()
    done = int(distributed.all_reduce_sum(torch.tensor([len(todo) - len(failed)])).item())
    order = {case.name: i for i, case in enumerate(cases)}
    failed = sorted(distributed.gather_lists(failed), key=lambda name: order.get(name, len(order)))
    if main:
        named = failed + ([f"{len(unformed)} input problem(s) above"] if unformed else [])
        print(
            f"medseg: predicted {done} case(s), skipped {skipped}, failed {len(failed) + len(unformed)}"
            + (f" ({', '.join(named)})" if named else "")
            + f"; outputs in {output}"
        )
    return not failed and not unformed

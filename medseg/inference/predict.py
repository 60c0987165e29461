"""``medseg predict``: segment a batch of scans with a trained model.

For every case found in ``--input`` (folders and/or files, nnU-Net naming
``CASE_0000.nii.gz`` for channels), :class:`~medseg.inference.predictor.Predictor`
preprocesses, runs the sliding window and maps the probabilities back to the input grid.
The output ``OUTPUT/CASE<ending>`` (the input's file ending) has exactly the input's
shape and affine, and reuses the input's header (``write_image(reference_path=...)``).
With probabilities requested, ``OUTPUT/CASE_prob.nii.gz`` holds them as a 4D NIfTI
(channels last, one per class, float32: softmax probabilities, or ``(1 + tanh) / 2`` maps
for a model trained by SAUNA regression alone) with the same affine; it is written as the
classes are mapped back, slab by slab, never held whole in memory.

Memory: a case takes at most about 3x its size as float32 besides the network (measured
2.6x for a 512x512x400 CT; see :mod:`medseg.inference.predictor` for each stage): the scan
is resampled by slabs, the windows are stitched by bands into float16 class maps, which
are mapped back by slabs.

Batch behaviour:

* the next case is read and preprocessed in a background thread while the current one
  is on the network, unless the current one has more than ``PREFETCH_MAX_VOXELS``
  voxels: then the next is read only after it, so that two large scans are never in
  memory together;
* a case whose output exists is skipped unless ``overwrite`` (an interrupted batch
  resumes where it stopped); outputs are written atomically, so a killed run never
  leaves a half-written file under a final name;
* a case that fails (unreadable file, NaN voxels, wrong channel count, ...) is reported
  as one line naming it and the others go on; the return value says whether all passed.

Under ``torchrun`` (:mod:`medseg.distributed`) the cases are sharded: case ``i`` of the
sorted case list goes to rank ``i % N``, each rank on its own device (GPU
``LOCAL_RANK``), and writes exactly the files one process would write for it. Rank 0
prints the summary of all ranks; the return value (hence every rank's exit code) is
false when a case failed on any rank.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import distributed
from medseg.errors import DataError, MedsegError

__all__ = ["run_prediction", "PROBABILITY_SUFFIX", "PREFETCH_MAX_VOXELS"]

PROBABILITY_SUFFIX = "_prob.nii.gz"
# a scan up to 256^3 overlaps with reading the next one (cheap); a larger one does not
PREFETCH_MAX_VOXELS = 256**3


def _output_paths(case, output: Path) -> tuple[Path, Path]:
    from medseg.data.io import ending_of

    ending = ending_of(case.image_files[0])
    return output / f"{case.name}{ending}", output / f"{case.name}{PROBABILITY_SUFFIX}"


class _ProbabilityFile:
    """``CASE_prob.nii.gz`` written while the classes are mapped back, atomically.

    A channels-last 4D NIfTI is stored class after class, each in Fortran order (the
    first axis fastest), so the slabs :meth:`Predictor.to_original_grid
    <medseg.inference.predictor.Predictor.to_original_grid>` hands over (classes in order,
    slabs ascending along the last axis) are appended as they come. The header is the
    one ``nib.save(nib.Nifti1Image(data, affine))`` writes (sform "aligned", qform
    "unknown", float32), with millimetre units and the "vector" intent. The file appears
    under its name only when every slab was written.
    """

    def __init__(self, path: Path, geometry, classes: int) -> None:
        import nibabel as nib
        from nibabel.openers import Opener

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
        self.path = path
        self.classes = classes
        self.next = (0, 0)  # the class and the first index along the last axis expected next
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.tmp-{uuid.uuid4().hex[:8]}.nii.gz")
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
        Folder for ``CASE<ending>`` (created).
    overwrite : bool
        Recompute cases whose output exists (default: skip them).
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
        Bad option values (device, stitch device, overlap, sw_batch_size); under
        torchrun, one of the above on another rank.
    """
    from medseg.inference.predictor import resolve_device, resolve_stitch_device

    if overlap is not None and not 0 <= overlap < 1:
        raise MedsegError(f"--overlap {overlap}: must be in [0, 1)")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise MedsegError(f"--sw-batch-size {sw_batch_size}: must be a positive integer")
    where = distributed.device_for_rank(resolve_device(device))
    if stitch_device is not None:
        resolve_stitch_device(stitch_device, where)
    with distributed.process_group(where):
        return _predict_all(
            model, inputs, Path(output), overwrite, tta, overlap, sw_batch_size, save_probabilities, where,
            stitch_device,
        )


def _predict_all(
    model, inputs, output: Path, overwrite, tta, overlap, sw_batch_size, save_probabilities, device, stitch_device
) -> bool:
    from tqdm import tqdm

    from medseg.data.dataset import cases_from_paths
    from medseg.inference.predictor import Predictor, release_freed_memory, resolve_stitch_device

    with distributed.synchronized("reading the model and the inputs"):
        predictor = Predictor.from_path(model, device)
        stitch_device = resolve_stitch_device(stitch_device or predictor.config.inference.stitch_device, device)
        info = predictor.info
        cases = cases_from_paths([Path(p) for p in inputs], num_channels=info.num_channels)
        save_probabilities = save_probabilities or predictor.config.inference.save_probabilities
        if output.exists() and not output.is_dir():
            raise DataError(f"{output}: exists and is not a folder")
        output.mkdir(parents=True, exist_ok=True)

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
    main = distributed.is_main()
    if skipped and main:
        print(f"medseg: {skipped} case(s) already predicted in {output}, skipped (--overwrite recomputes them)", file=sys.stderr)

    failed: list[str] = []
    from medseg.data.io import write_image

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch") as loader:
        upcoming: Future | None = loader.submit(_load, predictor, todo[0], info) if todo else None
        bar = tqdm(todo, desc="predict", unit="case", disable=None if main else True, file=sys.stderr)
        for i, case in enumerate(bar):
            current, upcoming = upcoming, None
            following = todo[i + 1] if i + 1 < len(todo) else None
            seg_path, prob_path = _output_paths(case, output)
            try:
                loaded, preprocessed = current.result()
                if following is not None and math.prod(loaded["geometry"].shape) <= PREFETCH_MAX_VOXELS:
                    upcoming = loader.submit(_load, predictor, following, info)
                probabilities = (
                    _ProbabilityFile(prob_path, loaded["geometry"], predictor.num_classes)
                    if save_probabilities else nullcontext()
                )
                with probabilities as sink:
                    label = predictor.segment(
                        loaded, preprocessed, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta,
                        stitch_device=stitch_device, on_probabilities=sink, consume=True,
                    )
                write_image(seg_path, label, loaded["geometry"], reference_path=case.image_files[0])
            except MemoryError as err:
                failed.append(case.name)
                print(f"medseg: {_one_line(case.name, err)} (out of memory)", file=sys.stderr)
            except Exception as err:  # one bad case must not stop the batch
                failed.append(case.name)
                print(f"medseg: {_one_line(case.name, err)}", file=sys.stderr)
            release_freed_memory()
            if upcoming is None and following is not None:  # a large case: read the next one now
                upcoming = loader.submit(_load, predictor, following, info)
    done = int(distributed.all_reduce_sum(torch.tensor([len(todo) - len(failed)])).item())
    order = {case.name: i for i, case in enumerate(cases)}
    failed = sorted(distributed.gather_lists(failed), key=lambda name: order.get(name, len(order)))
    if main:
        print(
            f"medseg: predicted {done} case(s), skipped {skipped}, failed {len(failed)}"
            + (f" ({', '.join(failed)})" if failed else "")
            + f"; outputs in {output}"
        )
    return not failed

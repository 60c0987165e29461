"""A trained model ready to segment one case: load the run, preprocess, slide, invert.

:class:`Predictor` holds what a checkpoint stores (config, dataset description,
preprocessing statistics, weights) and turns a loaded case (``load_case``'s dict) into
a label map (and class probabilities) on the case's *original* grid:

1. the ``infer`` transforms of :func:`medseg.data.transforms.build_transforms`
   (reorient, resample to ``data.target_spacing``, normalise), with the reorientation
   and the resampling fused into one resample done slab by slab
   (:func:`medseg.inference.resample.run_transforms`);
2. sliding-window inference with MONAI's windows and gaussian weights, the training
   patch as window, ``overlap`` and ``sw_batch_size``; softmax over classes; optionally
   averaged over mirrored inputs (test-time augmentation: every combination of flipped
   spatial axes, as nnU-Net mirrors). Stitched band by band
   (:func:`medseg.inference.sliding_window.class_maps`): the logits in float32, the class
   maps of the whole volume in float16, on the CPU or the GPU (``stitch_device``);
3. the class maps are mapped back to the original grid (linear interpolation, the
   inverse of step 1's resample) one slab at a time and only then argmaxed, so the
   label map has exactly the input's shape and affine and boundaries are not blocky
   after resampling; the probabilities can be streamed to a file, class by class and
   slab by slab (``on_probabilities``).

Memory, for a scan of N voxels (4N bytes as float32), a network grid of M voxels and C
classes, the largest arrays of each stage: reading 6N (an int16 file and its float32
copy); resampling 4N + 4M; normalising the M-voxel image (``NormalizeChannelsd``'s
copies: 16M); stitching 4M (the image) + 2CM (the class maps) + the band; inverting
2CM + N (the labels), plus 4N (a running maximum) when the probabilities are saved.
MONAI's whole-volume resample takes ~60 bytes per output voxel, its stitching 4CM + 4M.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medseg.errors import ArgumentError, CheckpointError, DataError, MedsegError
from medseg.runfolder import find_checkpoint, load_checkpoint, resolve_device
from medseg.tensors import channel_argmax

__all__ = ["Predictor", "resolve_device", "resolve_stitch_device", "release_freed_memory", "STITCH_DTYPE"]

# dtype of the whole-volume class maps in medseg predict (see medseg.inference.sliding_window)
STITCH_DTYPE = torch.float16
# "auto" keeps the class maps on the GPU when they and the band take at most this share of
# its free memory (the rest is for the network's activations)
_GPU_SHARE = 0.5

ProbabilitySink = Callable[[int, tuple, np.ndarray], None]


def resolve_stitch_device(
    stitch_device: str, device: torch.device, what: str = "stitch_device", argument: bool = False
) -> str:
    """Check a stitch device against the network's device; returns ``auto``, ``cpu`` or ``cuda``.

    ``cpu``: the class maps of the whole volume are kept in host memory (finished bands
    are moved there). ``cuda``: kept on the network's GPU (2 bytes per class and voxel
    there, no transfers until the inversion). ``auto``: ``cpu`` when the network runs on
    the CPU; on a GPU, ``cuda`` when the class maps and the band take at most half of its
    free memory, else ``cpu``, and ``cpu`` again if the GPU runs out of memory during the
    pass (nnU-Net's fallback when its results do not fit on the device).

    ``what`` is the config key the value came from (``inference.stitch_device``), named in
    the messages; with ``argument``, the function argument (an
    :class:`~medseg.errors.ArgumentError`, which the CLI shows under its flag).

    Raises
    ------
    MedsegError
        A name other than the three; ``cuda`` without CUDA, or with the network on the CPU.
    """
    def bad(problem: str) -> MedsegError:
        return ArgumentError(what, problem, stitch_device) if argument else MedsegError(f"{what} {stitch_device}: {problem}")

    name = str(stitch_device).lower()
    if name not in ("auto", "cpu", "cuda"):
        raise bad("expected auto, cpu or cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise bad("CUDA is not available on this machine (use cpu)")
        if device.type != "cuda":
            raise bad("the network runs on the CPU; stitching on the GPU needs the network on cuda too")
    return name


def release_freed_memory() -> None:
    """Give the allocator's freed pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Arrays below glibc's mmap threshold (which earlier frees raise up to 32 MB) live in
    heap arenas that keep their freed pages; called between the stages of a case, this
    stops one stage's temporaries from adding to the next stage's peak.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (0-based), the empty one first."""
    axes = range(spatial_dims)
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


def slice_hint(shape: tuple[int, ...], spatial_dims: int) -> str:
    """For a 2D model given a one-voxel-thick 3D image whose thin axis is not the last
    (a coronal or sagittal slice cut as X×1×Z): how to store it so that it reads as 2D."""
    if spatial_dims == 2 and len(shape) == 3 and 1 in shape[:2] and shape[2] != 1:
        dims = "×".join(map(str, shape))
        return (f" (a single slice stored {dims}: medseg reads a slice as 2D when its thin axis is the last, "
                "X×Y×1; store it so, e.g. with its axes reordered and the affine's columns with them)")
    return ""


class Predictor:
    """A network and its preprocessing, rebuilt from a checkpoint.

    Parameters
    ----------
    checkpoint : dict
        A loaded medseg checkpoint (:func:`medseg.runfolder.checkpoint.load_checkpoint`).
    device : torch.device
        Where the network runs; inputs are moved there window batch by window batch.
    source : str
        Where the checkpoint came from, for error messages.

    Attributes
    ----------
    checkpoint_path : Path or None
        The checkpoint file, when loaded by :meth:`from_path`.
    checkpoint_sha256 : str or None
        SHA-256 of the bytes the weights were loaded from (:meth:`from_path`), which
        ``medseg predict`` records.

    Raises
    ------
    CheckpointError
        The checkpoint's config, dataset description or weights do not fit this medseg.
    """

    def __init__(self, checkpoint: dict[str, Any], device: torch.device, source: str = "checkpoint") -> None:
        from medseg.config import validate_config
        from medseg.data.dataset import DatasetInfo
        from medseg.data.transforms import build_transforms
        from medseg.models.factory import build_model

        for key in ("dataset", "preprocessing"):
            if key not in checkpoint:
                raise CheckpointError(f"{source}: not a medseg checkpoint (missing '{key}')")
        try:
            self.config = validate_config(checkpoint["config"], source=f"{source} (stored config)")
            dataset = checkpoint["dataset"]
            self.info = DatasetInfo(
                root=Path(self.config.data.dataset),
                name=str(dataset.get("name", "")),
                channel_names={int(k): str(v) for k, v in dataset["channel_names"].items()},
                labels={str(k): int(v) for k, v in dataset["labels"].items()},
                file_ending=str(dataset.get("file_ending", ".nii.gz")),
                num_training=int(dataset.get("numTraining", 0)),
            )
        except MedsegError as err:
            raise CheckpointError(str(err)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{source}: unusable 'dataset' entry ({type(err).__name__}: {err})") from None
        self.source = source
        self.checkpoint_path: Path | None = None
        self.checkpoint_sha256: str | None = None
        self.device = device
        self.spatial_dims = self.config.spatial_dims
        self.num_classes = self.info.num_classes
        try:
            from medseg.losses.registry import output_activation

            # a model trained by regression (SAUNA only) emits tanh maps, a multi-label head
            # sigmoid logits, not softmax logits
            self.output_activation = output_activation(self.config.losses, self.num_classes)
            self.transforms = build_transforms(self.config, self.info, checkpoint["preprocessing"], mode="infer")
            self.model = build_model(
                self.config.model, self.spatial_dims, self.info.num_channels, self.num_classes,
                list(self.config.data.patch_size),
            )
            self.model.load_state_dict(checkpoint["model"])
        except MedsegError as err:  # a config this medseg cannot rebuild
            raise CheckpointError(f"{source}: {err}") from None
        except (RuntimeError, KeyError, TypeError) as err:
            reason = (str(err).splitlines() or [""])[0]
            raise CheckpointError(
                f"{source}: cannot rebuild the network from it ({type(err).__name__}: {reason})"
            ) from None
        self.model.to(device).eval()

    @classmethod
    def from_path(cls, model: str | Path, device: str | torch.device = "auto") -> "Predictor":
        """Load a run folder (checkpoint ``best``, else ``latest``) or a checkpoint file."""
        path = find_checkpoint(model)
        payload, sha256 = load_checkpoint(path, map_location="cpu", with_sha256=True)
        predictor = cls(payload, resolve_device(device), source=str(path))
        predictor.checkpoint_path = Path(path)
        predictor.checkpoint_sha256 = sha256  # of the bytes these weights came from
        return predictor

    @property
    def amp(self) -> bool:
        """Whether the network runs under mixed-precision autocast (on CUDA); it changes
        the values, so ``medseg predict`` records it."""
        return self.device.type == "cuda"

    # ------------------------------------------------------------------ steps

    def preprocess(self, case: dict[str, Any], consume: bool = False) -> dict[str, Any]:
        """Apply the ``infer`` transforms to a ``load_case`` dict.

        Returns ``{"image": MetaTensor, "name": ...}``: the normalised image on the
        network's grid, whose ``affine`` is that grid's. ``consume=True`` takes ``image``
        out of ``case`` so that the scan's array is freed as soon as it is resampled
        (``medseg predict`` does; ``case`` keeps its ``geometry``).
        """
        from medseg.inference.resample import run_transforms

        ndim = np.asarray(case["image"]).ndim - 1
        if ndim != self.spatial_dims:
            first = case.get("image_files", [case["name"]])[0]
            raise DataError(f"{first}: {ndim}D image, but the model was trained on {self.spatial_dims}D patches"
                            + slice_hint(np.shape(case["image"])[1:], self.spatial_dims))
        image = case.pop("image") if consume else case["image"]
        data = {"image": image, "geometry": case["geometry"], "name": case["name"]}
        del image
        return run_transforms(self.transforms, data)

    def class_maps(
        self,
        image: torch.Tensor,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
        stitch_device: str | None = None,
        dtype: torch.dtype = STITCH_DTYPE,
    ) -> torch.Tensor:
        """Class maps ``(classes, *spatial)`` on the preprocessed grid minus 0.5, in ``dtype``.

        Softmax probabilities, sigmoids for a multi-label head (loss terms with
        ``sigmoid: true``), or for a model trained by regression only (SAUNA) the
        per-class soft maps ``(1 + tanh(output)) / 2`` in [0, 1] (0.5 on the regressed
        mask's boundary; they need not sum to 1). The label is their argmax either way.
        They are stored centred, ``maps - 0.5`` (float16 is finer there; see
        :mod:`medseg.inference.sliding_window`), on the CPU or the network's GPU as
        ``stitch_device`` says (:func:`resolve_stitch_device`; ``None`` takes
        ``inference.stitch_device``). :meth:`probabilities` gives them uncentred.
        """
        from medseg.inference.sliding_window import band_bytes, class_maps

        inference = self.config.inference
        if stitch_device is None:
            requested, what = inference.stitch_device, "inference.stitch_device"
        else:
            requested, what = stitch_device, "stitch_device"
        choice = resolve_stitch_device(requested, self.device, what, argument=stitch_device is not None)
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        plain = plain.float()
        if choice == "auto" and self.device.type == "cuda":
            shape = tuple(plain.shape[1:])
            need = self.num_classes * int(np.prod(shape)) * torch.finfo(dtype).bits // 8
            need += band_bytes(shape, self.config.data.patch_size, self.num_classes)
            free, _ = torch.cuda.mem_get_info(self.device)
            choice = "cuda" if need <= _GPU_SHARE * free else "cpu"
        options = dict(
            window=list(self.config.data.patch_size),
            overlap=inference.overlap if overlap is None else overlap,
            sw_batch_size=inference.sw_batch_size if sw_batch_size is None else sw_batch_size,
            mode=inference.mode,
            activation=self.output_activation,
            flips=_flip_combinations(self.spatial_dims) if (inference.tta_flips if tta is None else tta) else [()],
            device=self.device,
            dtype=dtype,
            amp=self.amp,
        )
        if choice == "cuda":
            try:
                return class_maps(plain, self.model, out_device=self.device, **options)
            except torch.cuda.OutOfMemoryError:
                if str(requested).lower() != "auto":
                    raise
            # outside the except clause: the failed pass's GPU tensors are gone with its traceback
            torch.cuda.empty_cache()
            warnings.warn("the class maps did not fit on the GPU; stitching them on the CPU", stacklevel=2)
        return class_maps(plain, self.model, out_device="cpu", **options)

    @torch.no_grad()
    def probabilities(
        self,
        image: torch.Tensor,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
    ) -> torch.Tensor:
        """Class maps ``(classes, *spatial)`` in [0, 1], float32 on the CPU (what adaptation trains on)."""
        from medseg.inference.sliding_window import CENTRE

        centred = self.class_maps(image, overlap, sw_batch_size, tta, stitch_device="cpu", dtype=torch.float32)
        return centred.add_(CENTRE)

    def to_original_grid(
        self,
        maps: torch.Tensor,
        affine: Any,
        geometry,
        on_probabilities: ProbabilitySink | None = None,
    ) -> np.ndarray:
        """The label map on the case's original grid (``geometry``) from centred class maps.

        The class maps are resampled back (linear interpolation in float64 with border
        padding, what ``Invertd`` of the preprocessing did) one slab of the original grid
        at a time, and argmaxed in float32 (the first class wins a tie). With
        ``on_probabilities``, one class at a time instead, keeping a running maximum:
        ``on_probabilities(c, index, values)`` receives every slab of class ``c`` as
        float32 ``values`` for the spatial slices ``index``, classes in order, each in
        ascending slabs along the last axis (a NIfTI file's order).
        """
        from medseg.inference.resample import index_map, resample_slabs
        from medseg.inference.sliding_window import CENTRE

        def uncentred(slab: torch.Tensor) -> torch.Tensor:
            # linear interpolation commutes with the shift, so it is undone after it, in
            # float64 (and clamped: -0.5 + 0.5 may round to -1e-16)
            return slab.add_(CENTRE).clamp_(0.0, 1.0).to(torch.float32)

        shape = tuple(geometry.shape)
        matrix = index_map(geometry.affine, affine, len(shape))
        label = np.zeros(shape, dtype=np.uint8 if self.num_classes <= 256 else np.int32)
        if on_probabilities is None:
            for index, slab in resample_slabs(maps, matrix, shape, axis=-1):
                label[index] = channel_argmax(uncentred(slab), dim=0).cpu().numpy()
            return label
        best = np.empty(shape, dtype=np.float32)
        for c in range(maps.shape[0]):
            for index, slab in resample_slabs(maps[c : c + 1], matrix, shape, axis=-1):
                values = uncentred(slab)[0].cpu().numpy()
                on_probabilities(c, index, values)
                if c == 0:
                    best[index] = values
                    continue
                better = values > best[index]
                np.copyto(best[index], values, where=better)
                label[index][better] = c
        return label

    def segment(
        self,
        case: dict[str, Any],
        preprocessed: dict[str, Any] | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
        stitch_device: str | None = None,
        on_probabilities: ProbabilitySink | None = None,
        consume: bool = False,
        dtype: torch.dtype = STITCH_DTYPE,
    ) -> np.ndarray:
        """The label map ``(*spatial)`` of a case on its original grid (see :meth:`to_original_grid`).

        ``case`` is :func:`medseg.data.dataset.load_case`'s dict (its ``geometry`` is
        used); ``preprocessed`` the result of :meth:`preprocess` if it was computed ahead
        (e.g. by a prefetch thread). ``consume=True`` takes the image out of both dicts,
        freeing it once the class maps are made. ``dtype`` is the class maps' (float32
        doubles their memory; medseg predict keeps float16).
        """
        if preprocessed is None:
            preprocessed = self.preprocess(case, consume=consume)
        image = preprocessed.pop("image") if consume else preprocessed["image"]
        affine = image.affine
        maps = self.class_maps(image, overlap, sw_batch_size, tta, stitch_device, dtype)
        del image
        release_freed_memory()
        return self.to_original_grid(maps, affine, case["geometry"], on_probabilities)

    def predict_case(
        self,
        case: dict[str, Any],
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
        preprocessed: dict[str, Any] | None = None,
        stitch_device: str | None = None,
        dtype: torch.dtype = STITCH_DTYPE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Label map ``(*spatial)`` and probabilities ``(classes, *spatial)`` (float32) on the original grid.

        :meth:`segment` with the probabilities collected in one array (``classes`` times
        the scan's size; ``medseg predict`` streams them to a file instead).
        """
        shape = tuple(case["geometry"].shape)
        prob = np.empty((self.num_classes, *shape), dtype=np.float32)

        def keep(c: int, index: tuple, values: np.ndarray) -> None:
            prob[(c, *index)] = values

        label = self.segment(
            case, preprocessed, overlap, sw_batch_size, tta, stitch_device, on_probabilities=keep, dtype=dtype
        )
        return label, prob

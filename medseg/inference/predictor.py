"""A trained model ready to segment one case: load the run, preprocess, slide, invert.

:class:`Predictor` holds what a checkpoint stores (config, dataset description,
preprocessing statistics, weights) and turns a loaded case (``load_case``'s dict) into
class probabilities and a label map on the case's *original* grid:

1. the ``infer`` transforms of :func:`medseg.data.transforms.build_transforms`
   (reorient, resample to ``data.target_spacing``, normalise);
2. MONAI :func:`~monai.inferers.sliding_window_inference` with the training patch as
   window, gaussian blending, ``overlap`` and ``sw_batch_size``; softmax over classes;
   optionally averaged over mirrored inputs (test-time augmentation: every combination
   of flipped spatial axes, as nnU-Net mirrors);
3. the probabilities are mapped back through the inverse of the spatial transforms
   (``monai.transforms.Invertd``, linear interpolation) and only then argmaxed, so the
   label map has exactly the input's shape and affine and boundaries are not
   blocky after resampling.
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import CheckpointError, DataError, MedsegError

__all__ = ["Predictor", "resolve_device"]


def _class_maps(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, C, *spatial) network outputs -> per-class maps in [0, 1] (see Predictor.probabilities)."""
    if activation == "tanh":
        return (1.0 + torch.tanh(logits)) / 2.0
    return torch.softmax(logits, dim=1)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MedsegError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise MedsegError(f"--device {device}: expected auto, cpu or cuda")


def _flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (as tensor dims of a (B, C, *spatial) batch)."""
    axes = [2 + a for a in range(spatial_dims)]
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


class Predictor:
    """A network and its preprocessing, rebuilt from a checkpoint.

    Parameters
    ----------
    checkpoint : dict
        A loaded medseg checkpoint (:func:`medseg.training.checkpoint.load_checkpoint`).
    device : torch.device
        Where the network runs; inputs are moved there window batch by window batch.
    source : str
        Where the checkpoint came from, for error messages.

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
        self.device = device
        self.spatial_dims = self.config.spatial_dims
        self.num_classes = self.info.num_classes
        try:
            from medseg.losses.registry import output_activation

            # a model trained by regression (SAUNA only) emits tanh maps, not softmax logits
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
        from medseg.training.checkpoint import find_checkpoint, load_checkpoint

        path = find_checkpoint(model)
        return cls(load_checkpoint(path, map_location="cpu"), resolve_device(device), source=str(path))

    # ------------------------------------------------------------------ steps

    def preprocess(self, case: dict[str, Any]) -> dict[str, Any]:
        """Apply the ``infer`` transforms to a ``load_case`` dict (keeps ``geometry`` aside)."""
        ndim = np.asarray(case["image"]).ndim - 1
        if ndim != self.spatial_dims:
            first = case.get("image_files", [case["name"]])[0]
            raise DataError(f"{first}: {ndim}D image, but the model was trained on {self.spatial_dims}D patches")
        data = {"image": case["image"], "geometry": case["geometry"], "name": case["name"]}
        return self.transforms(data)

    @torch.no_grad()
    def probabilities(
        self,
        image: torch.Tensor,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
    ) -> torch.Tensor:
        """Class maps ``(classes, *spatial)`` on the preprocessed grid, on the CPU, float32.

        Softmax probabilities, or for a model trained by regression only (SAUNA) the
        per-class soft maps ``(1 + tanh(output)) / 2`` in [0, 1] (0.5 on the regressed
        mask's boundary; they need not sum to 1). The label is their argmax either way.
        """
        from monai.inferers import sliding_window_inference

        inference = self.config.inference
        overlap = inference.overlap if overlap is None else overlap
        sw_batch_size = inference.sw_batch_size if sw_batch_size is None else sw_batch_size
        tta = inference.tta_flips if tta is None else tta
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        batch = plain.unsqueeze(0).to(self.device, dtype=torch.float32)
        amp = torch.autocast("cuda") if self.device.type == "cuda" else nullcontext()
        flips = _flip_combinations(self.spatial_dims) if tta else [()]
        total = None
        for axes in flips:
            x = torch.flip(batch, axes) if axes else batch
            with amp:
                logits = sliding_window_inference(
                    x,
                    roi_size=list(self.config.data.patch_size),
                    sw_batch_size=sw_batch_size,
                    predictor=self.model,
                    overlap=overlap,
                    mode=inference.mode,
                )
            prob = _class_maps(logits.float(), self.output_activation)
            prob = torch.flip(prob, axes) if axes else prob
            total = prob if total is None else total + prob
        return (total / len(flips))[0].cpu()

    def invert(self, probabilities: torch.Tensor, preprocessed: dict[str, Any]) -> np.ndarray:
        """Map probabilities from the preprocessed grid back to the case's original grid."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        data = {"image": preprocessed["image"], "pred": MetaTensor(probabilities)}
        invert = Invertd(keys="pred", transform=self.transforms, orig_keys="image", nearest_interp=False)
        with warnings.catch_warnings():
            # Orientation's inverse of a 2D image names 3 axis codes (from the 4x4 affine)
            warnings.filterwarnings("ignore", message="axcodes .* length is smaller", category=UserWarning)
            inverted = invert(data)["pred"]
        out = inverted.as_tensor() if hasattr(inverted, "as_tensor") else torch.as_tensor(inverted)
        return out.numpy().astype(np.float32, copy=False)

    def predict_case(
        self,
        case: dict[str, Any],
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        tta: bool | None = None,
        preprocessed: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Label map ``(*spatial)`` and probabilities ``(classes, *spatial)`` on the original grid.

        ``case`` is :func:`medseg.data.dataset.load_case`'s dict; ``preprocessed`` the
        result of :meth:`preprocess` if it was computed ahead (e.g. by a prefetch thread).
        """
        preprocessed = self.preprocess(case) if preprocessed is None else preprocessed
        prob = self.probabilities(preprocessed["image"], overlap, sw_batch_size, tta)
        prob = self.invert(prob, preprocessed)
        shape = tuple(case["geometry"].shape)
        if tuple(prob.shape[1:]) != shape:  # the inverse must restore the grid exactly
            raise RuntimeError(f"inverted prediction has shape {prob.shape[1:]}, input has {shape}")
        label = prob.argmax(axis=0)
        dtype = np.uint8 if self.num_classes <= 256 else np.int32
        return label.astype(dtype), prob

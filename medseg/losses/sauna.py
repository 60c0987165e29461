"""SAUNA regression loss: focal-L1 plus the hypercube soft Jaccard (Dang et al., WACV 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medseg.data.topology_targets import sauna_targets
from medseg.losses._prepare import EPS, check_input, check_reduction, label_map, reduce, summable
from medseg.tensors import label_array


def focal_l1(pred: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 1.0) -> torch.Tensor:
    """Per-sample, per-channel focal-L1 (B, C) of predictions and targets in [-1, 1].

    ``w = alpha·|p - g|^beta`` where ``sign(p) == sign(g)`` (strictly: ``p·g > 0``), ``w = 1``
    where they disagree; ``L = mean over voxels of w·|p - g|``. A voxel on the right side of
    zero is down-weighted the closer it is to its target; a voxel on the wrong side (the
    mask would be wrong there) always weighs 1.
    """
    diff = (pred - target).abs()
    agree = pred * target > 0
    w = torch.where(agree, alpha * diff.clamp_min(EPS) ** beta, torch.ones_like(diff))
    return (w * diff).flatten(2).mean(-1)


def hypercube_jaccard(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel soft Jaccard loss (B, C) on [-1, 1]^N.

    The foreground parts ``x = relu(p), y = relu(g)`` and the background parts
    ``x = relu(-p), y = relu(-g)`` each give ``I = Σ|x+y| - Σ|x-y|`` and
    ``U = Σ|x+y| + Σ|x-y|`` (for x, y >= 0 these are ``2·Σmin(x, y)`` and ``2·Σmax(x, y)``,
    the soft intersection and union); ``L = 1 - (I_fg + I_bg) / max(U_fg + U_bg, ε)``.
    """
    def parts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (x + y).abs().flatten(2).sum(-1)
        d = (x - y).abs().flatten(2).sum(-1)
        return s - d, s + d

    i_fg, u_fg = parts(torch.relu(pred), torch.relu(target))
    i_bg, u_bg = parts(torch.relu(-pred), torch.relu(-target))
    return 1.0 - (i_fg + i_bg) / (u_fg + u_bg).clamp_min(EPS)


class SaunaLoss(nn.Module):
    """Regression of the signed soft SAUNA target with focal-L1 and the hypercube soft Jaccard.

    The model's output is read as ``p = tanh(input)`` in [-1, 1]; its mask is ``p > 0``
    (equivalently ``input > 0``; ``medseg predict`` saves ``(1 + p) / 2`` as the class map
    of a model trained with this loss alone). The target ``g``
    is :func:`medseg.data.topology_targets.sauna_target` of the label: ``+1`` on
    centrelines, soft near the boundary of thick structures, ``-1`` far outside, with
    ``sign(g) == mask``. Per sample and channel:

        ``L = focal_l1(p, g; alpha, beta) + jaccard_weight·hypercube_jaccard(p, g)``

    (see :func:`focal_l1`, :func:`hypercube_jaccard`), averaged over channels, then reduced
    over the batch. Defaults are the paper's (``alpha = 2, beta = 1``, Jaccard weight 1).

    Channels: a 1-channel head regresses the target of ``label > 0``; a C-channel head
    regresses, in channel k, the target of ``label == k`` (one-vs-rest, so the argmax of the
    channels is the class); ``include_background=False`` leaves channel 0 out of the loss.

    The target is read from the batch key ``'sauna'`` when the pipeline computed it
    (:class:`medseg.data.topology_targets.SaunaTargetd` after spatial augmentation, with the
    voxel spacing of the image: the fast path). Otherwise it is computed here from
    ``target`` on the CPU with ``spacing`` (default isotropic 1): the slow path.

    References: T. Dang, H. H. Nguyen, A. Tiulpin, "SAUNA: Image-level Regression for
    Uncertainty-aware Retinal Image Segmentation", WACV 2025, arXiv:2405.16815; the
    volumetric precedent: T. Dang et al., "SiNGR: Brain Tumor Segmentation via Signed
    Normalized Geodesic Transform Regression", MICCAI 2024, arXiv:2405.16813.

    Args:
        alpha: focal-L1 scale of agreeing voxels (> 0).
        beta: focal-L1 exponent (>= 0).
        jaccard_weight: weight of the soft Jaccard term (>= 0).
        include_background: score channel 0 of a C-channel head; ignored for one channel.
        spacing: voxel spacing for the on-the-fly target.
        inside_window, outside_window: thickness windows of the target (see ``sauna_target``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a (B,) tensor).

    Raises:
        ValueError: non-positive ``alpha``, negative ``beta``/``jaccard_weight``, bad windows.
    """

    #: batch key -> keyword argument of :meth:`forward`
    batch_keys = {"sauna": "sauna_target"}
    #: the activation that turns this loss's input into the model's output map
    output_activation = "tanh"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        jaccard_weight: float = 1.0,
        include_background: bool = True,
        spacing: Sequence[float] | None = None,
        inside_window: float = 1.0,
        outside_window: float = 2.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if alpha <= 0 or beta < 0 or jaccard_weight < 0:
            raise ValueError("alpha must be > 0, beta and jaccard_weight >= 0")
        if inside_window <= 0 or outside_window <= 0:
            raise ValueError("inside_window and outside_window must be > 0")
        self.alpha, self.beta, self.jaccard_weight = float(alpha), float(beta), float(jaccard_weight)
        self.include_background = include_background
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        if self.spacing is not None and not all(0 < s < float("inf") for s in self.spacing):
            raise ValueError(f"spacing must be positive numbers, got {list(spacing)}")
        self.inside_window, self.outside_window = float(inside_window), float(outside_window)
        self.reduction = check_reduction(reduction)

    @torch.compiler.disable  # numpy and scipy on the labels: traced, every new label batch recompiled
    def targets_from_labels(self, target: torch.Tensor, num_channels: int) -> torch.Tensor:
        """SAUNA targets (B, num_channels, *spatial) of a label batch (B, 1, ...), on the CPU."""
        labels = label_array(target)
        out = np.stack(
            [
                sauna_targets(labels[b, 0], num_channels, self.spacing, self.inside_window, self.outside_window)
                for b in range(labels.shape[0])
            ]
        )
        return torch.from_numpy(out).to(target.device)

    def check_spatial_dims(self, spatial_dims: int) -> None:
        """Raise ValueError if ``spacing`` does not give one value per spatial axis."""
        if self.spacing is not None and len(self.spacing) != spatial_dims:
            raise ValueError(f"spacing {list(self.spacing)} has {len(self.spacing)} values, the data {spatial_dims} axes")

    def forward(self, input: torch.Tensor, target: torch.Tensor, sauna_target: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` (B, C, ...) raw output; ``target`` (B, 1, ...) labels; ``sauna_target`` (B, C, ...) or None."""
        check_input(input, target, "SaunaLoss")
        input = summable(input)
        n = input.shape[1]
        if sauna_target is None:
            sauna_target = self.targets_from_labels(label_map(target, "SaunaLoss"), n)
        if sauna_target.shape != input.shape:
            raise ValueError(
                f"SaunaLoss: SAUNA target {tuple(sauna_target.shape)} must match input {tuple(input.shape)} "
                "(SaunaTargetd num_classes must equal the model's output channels)"
            )
        pred = torch.tanh(input)
        g = sauna_target.to(device=pred.device, dtype=pred.dtype)
        if not self.include_background and n > 1:
            pred, g = pred[:, 1:], g[:, 1:]
        loss = focal_l1(pred, g, self.alpha, self.beta)
        if self.jaccard_weight > 0:
            loss = loss + self.jaccard_weight * hypercube_jaccard(pred, g)
        return reduce(loss.mean(dim=1), self.reduction)

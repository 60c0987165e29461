"""Skeleton Recall loss (Kirchhoff et al., ECCV 2024)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medseg.data.topology_targets import skeleton_tube
from medseg.losses._prepare import (
    EPS,
    activate,
    check_activation_flags,
    check_input,
    check_reduction,
    label_map,
    reduce,
    resolve_activation,
)
from medseg.tensors import label_array


def tubed_skeleton_batch(target: torch.Tensor, tube_radius: int, footprint: str) -> torch.Tensor:
    """Tubed skeletons (B, 1, *spatial) of a label batch (B, 1, *spatial), on the CPU."""
    labels = label_array(target)
    tubes = np.stack([skeleton_tube(labels[b, 0], tube_radius, footprint) for b in range(len(labels))])
    return torch.from_numpy(tubes[:, None].astype(np.int64)).to(target.device)


class SkeletonRecallLoss(nn.Module):
    """Soft recall of the tubed skeleton of every foreground class.

    With ``P_c`` the predicted probability of class ``c`` and ``S_c`` the tubed skeleton of
    class ``c`` (:func:`medseg.data.topology_targets.skeleton_tube`: each class skeletonised
    on its own, dilated, clipped to the class):

        ``L = - mean_{c >= 1} (Σ P_c·S_c + smooth_nr) / max(Σ S_c + smooth_dr, ε)``

    per sample (or over the batch with ``batch=True``), then reduced over the batch. The
    value lies in [-1, 0] while ``smooth_nr <= smooth_dr`` (the defaults); a class absent from the patch contributes the constant
    ``-smooth_nr/smooth_dr`` and no gradient. The loss only rewards covering the skeleton,
    so it must be combined with a volumetric loss (the paper: Dice + CE,
    ``losses: [{name: dice_ce}, {name: skeleton_recall, weight: 1.0}]``).

    The skeleton is read from the batch key ``'skeleton'`` when the data pipeline computed
    it (:class:`medseg.data.topology_targets.SkeletonTubed`, after spatial augmentation:
    the fast path). Otherwise it is computed here from ``target`` with
    :func:`medseg.topology.skeletonize` (topology-preserving thinning, as
    ``skeleton_tube`` does) on the CPU, every step (the slow path: tens of milliseconds per 3D patch).

    Background is never scored (its skeleton is meaningless; the reference refuses it too).
    For a 1-channel sigmoid head the only channel is the foreground and ``S = tube(label > 0)``.

    Reference: Y. Kirchhoff, M. R. Rokuss, S. Roy, B. Kovacs, C. Ulrich, T. Wald, M. Zenk,
    P. Vollmuth, J. Kleesiek, F. Isensee, K. Maier-Hein, "Skeleton Recall Loss for
    Connectivity Conserving and Resource Efficient Segmentation of Thin Tubular
    Structures", ECCV 2024, arXiv:2404.03010.

    Args:
        tube_radius: dilation radius (voxels) of the on-the-fly skeleton; the pipeline's
            :class:`SkeletonTubed` should use the same (``required_target_transforms`` does).
        footprint: ``'ball'`` or ``'diamond'`` dilation shape (see ``skeleton_tube``).
        sigmoid, softmax: see :mod:`medseg.losses._prepare` (``None``: from the channel count).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a (B,) tensor, (1,) with ``batch=True``).
        smooth_nr, smooth_dr: added to the numerator and the denominator.
        batch: sum over the batch before the ratio (the reference's ``batch_dice``).

    Raises:
        ValueError: negative ``tube_radius`` or smoothing, bad ``footprint``, incompatible
            activation flags.
    """

    #: batch key -> keyword argument of :meth:`forward`
    batch_keys = {"skeleton": "skeleton"}

    def __init__(
        self,
        tube_radius: int = 2,
        footprint: str = "ball",
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        reduction: str = "mean",
        smooth_nr: float = 1.0,
        smooth_dr: float = 1.0,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(tube_radius, bool) or not isinstance(tube_radius, int) or tube_radius < 0:
            raise ValueError(f"tube_radius must be a non-negative integer, got {tube_radius!r}")
        if footprint not in ("ball", "diamond"):
            raise ValueError(f"footprint must be 'ball' or 'diamond', got {footprint!r}")
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError("smooth_nr and smooth_dr must be >= 0")
        check_activation_flags(sigmoid, softmax)
        self.tube_radius = tube_radius
        self.footprint = footprint
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.reduction = check_reduction(reduction)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch

    def forward(self, input: torch.Tensor, target: torch.Tensor, skeleton: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` (B, C, ...) logits; ``target`` (B, 1, ...) labels; ``skeleton`` (B, 1, ...) tubes or None."""
        check_input(input, target, "SkeletonRecallLoss")
        target = label_map(target, "SkeletonRecallLoss")
        n = input.shape[1]
        if skeleton is None:
            skeleton = tubed_skeleton_batch(target, self.tube_radius, self.footprint)
        elif skeleton.shape != target.shape:
            raise ValueError(f"SkeletonRecallLoss: skeleton {tuple(skeleton.shape)} must match target {tuple(target.shape)}")
        skeleton = skeleton.to(input.device)
        probs = activate(input, resolve_activation(n, self.sigmoid, self.softmax))
        if n == 1:
            skel = (skeleton > 0).to(probs.dtype)
        else:
            classes = torch.arange(1, n, device=input.device).view(1, n - 1, *([1] * (input.dim() - 2)))
            skel = (skeleton.long() == classes).to(probs.dtype)
            probs = probs[:, 1:]
        axes = tuple(range(2, input.dim()))
        inter = torch.sum(probs * skel, axes)
        total = torch.sum(skel, axes)
        if self.batch:
            inter, total = inter.sum(0, keepdim=True), total.sum(0, keepdim=True)
        recall = (inter + self.smooth_nr) / (total + self.smooth_dr).clamp_min(EPS)
        loss = -recall.mean(dim=1)
        return reduce(loss, self.reduction)

"""Centerline boundary Dice, cbDice (Shi et al., MICCAI 2024)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.networks import one_hot
from torch import nn

from medseg.data.topology_targets import inner_distance, skeleton_distance_batch
from medseg.losses._prepare import (
    EPS,
    activate,
    check_activation_flags,
    check_iterations,
    check_input,
    check_reduction,
    reduce,
    resolve_activation,
    target_as_channels,
)
from medseg.losses.cldice import soft_skeleton
from medseg.tensors import channel_argmax


def label_skeleton_and_distance(
    target: torch.Tensor,
    onehot: torch.Tensor,
    given: torch.Tensor | None,
    include_background: bool,
    name: str,
    skeleton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel skeleton and inner distance (B, C, *spatial) of the target's classes.

    ``given`` is the pipeline's (B, 2, *spatial) :func:`~medseg.data.topology_targets.skeleton_distance`
    (or None: computed here on the CPU, with the skeleton only where ``skeleton``); each
    voxel carries its own class's values, so multiplying by the one-hot target spreads
    them over the channels.
    """
    if given is None:
        given = skeleton_distance_batch(target, onehot.shape[1], include_background, skeleton)
    elif given.shape[0] != onehot.shape[0] or given.shape[1] != 2 or given.shape[2:] != onehot.shape[2:]:
        raise ValueError(
            f"{name}: skeleton_distance {tuple(given.shape)} must be (B, 2, *spatial) for target "
            f"{tuple(target.shape)} (SkeletonDistanced writes it)"
        )
    given = given.to(device=onehot.device, dtype=onehot.dtype)
    return given[:, :1] * onehot, given[:, 1:2] * onehot


def hard_prediction(probs: torch.Tensor, activation: str) -> torch.Tensor:
    """The mask the model outputs, per channel: argmax over softmax channels, else ``p > 0.5``."""
    n = probs.shape[1]
    if activation == "softmax" or (activation == "none" and n > 1):
        return one_hot(channel_argmax(probs, dim=1, keepdim=True), num_classes=n, dim=1).to(probs.dtype)
    return (probs > 0.5).to(probs.dtype)


_DISTANCE_POOL: ThreadPoolExecutor | None = None


def _distance_pool() -> ThreadPoolExecutor:
    """Threads for the images' distance transforms (scipy's releases the GIL: 24 -> 14 ms
    for 8 x 256² masks on 2 cores); created on first use, one per core."""
    global _DISTANCE_POOL
    if _DISTANCE_POOL is None:
        _DISTANCE_POOL = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))), thread_name_prefix="medseg-edt")
    return _DISTANCE_POOL


def _forget_pool_in_child() -> None:  # a forked child has none of the pool's threads
    global _DISTANCE_POOL
    _DISTANCE_POOL = None


os.register_at_fork(after_in_child=_forget_pool_in_child)


def inner_distances(masks: torch.Tensor) -> torch.Tensor:
    """:func:`~medseg.data.topology_targets.inner_distance` of every (sample, channel) of a
    binary batch, the images spread over threads."""
    arr = (masks.detach().to("cpu") > 0.5).numpy()  # compared in torch: numpy has no bfloat16
    out = np.zeros(arr.shape, dtype=np.float32)

    def one(bc: tuple[int, int]) -> None:
        if arr[bc].any():
            out[bc] = inner_distance(arr[bc])

    images = [(b, c) for b in range(arr.shape[0]) for c in range(arr.shape[1])]
    if len(images) > 1:
        list(_distance_pool().map(one, images))
    else:
        for bc in images:
            one(bc)
    return torch.from_numpy(out).to(device=masks.device, dtype=masks.dtype)


def radius_weights(
    skeleton: torch.Tensor, distance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised distance, skeleton radius and inverse-radius weight of (B, C, *spatial) maps.

    Returns ``(D̃, R̃, W)`` with ``R = D·S``, ``r_max = max(max R, 1)``, ``r_min`` the
    smallest radius on the skeleton (1 without one), ``D̃ = min(D, r_max)/r_max``,
    ``R̃ = R/r_max`` and ``W = S·((r_max - R + r_min)/r_max)^k``, ``k`` = number of spatial
    dimensions - 1.
    """
    axes = tuple(range(2, skeleton.dim()))
    on_skeleton = skeleton > 0.5
    radius = distance * on_skeleton
    r_max = radius.amax(dim=axes, keepdim=True).clamp_min(1.0)
    r_min = torch.where(on_skeleton, radius, torch.full_like(radius, float("inf"))).amin(dim=axes, keepdim=True)
    r_min = torch.where(torch.isfinite(r_min), r_min, torch.ones_like(r_min)).clamp_min(1.0)
    power = skeleton.dim() - 3
    weight = on_skeleton * ((r_max - radius + r_min) / r_max) ** power
    return torch.minimum(distance, r_max) / r_max, radius / r_max, weight


class CenterlineBoundaryDiceLoss(nn.Module):
    """cbDice: clDice whose skeleton terms are weighted by distances and vessel radii.

    For every sample and class, with ``L`` the label mask, ``p`` the predicted probability
    and ``P = [p > 0.5]`` (the argmax for a softmax head) the predicted mask, each mask
    ``M ∈ {L, P}`` gives (:func:`radius_weights`):

    - ``S_M`` its skeleton, ``D_M`` the distance of each voxel of ``M`` to the outside
      (``scipy.ndimage.distance_transform_edt``), ``R_M = D_M`` on ``S_M``;
    - with ``r_max = max(max R_M, 1)`` and ``r_min`` the smallest radius on ``S_M``: the
      clipped distance ``D̃_M = min(D_M, r_max)/r_max``, the radius ``R̃_M = R_M/r_max``
      and, on the skeleton, the inverse-radius weight ``W_M = ((r_max - R_M + r_min)/r_max)^k``
      (``k = 1`` in 2D, ``2`` in 3D: cross-section length or area), so that thin vessels
      count about as much as thick ones (the paper's "diameter imbalance").

    The prediction side is multiplied by ``p``: ``Q_S^P = W_P·p``, ``Q_V^P = D̃_P·p``,
    ``Q_R^P = R̃_P·p``; the label side is ``Q_S^L = W_L``, ``Q_V^L = D̃_L``, ``Q_R^L = R̃_L``. Then

    - ``Tprec = (Σ Q_S^P·Q_V^L + smooth_nr) / max(Σ Q_S^P·ρ_prec + smooth_dr, ε)``,
      ``ρ_prec = Q_R^L`` on ``S_L``, else ``Q_R^P``;
    - ``Tsens = (Σ Q_S^L·Q_V^P + smooth_nr) / max(Σ Q_S^L·ρ_sens + smooth_dr, ε)``,
      ``ρ_sens = Q_R^P`` on ``S_P``, else ``Q_R^L``;
    - ``cbDice = 2·Tprec·Tsens / max(Tprec + Tsens, ε)``, ``L = 1 - cbDice``,

    averaged over classes, then reduced over the batch. Each skeleton point of one mask is
    scored by how deep inside the other mask it lies (``D̃``) relative to the vessel's radius
    (``ρ``, the other mask's radius where the skeletons meet): a prediction shifted off the
    centreline or of the wrong width loses, which plain clDice does not see. Both
    skeletons come from one algorithm (the soft skeleton of a binary mask, as in the
    official code), so a correct mask (``P = L``) has ``S_P = S_L`` and
    ``Tprec = Tsens = 1`` whatever ``p``: the term is 0 and flat there, and a volumetric
    term must hold ``p`` at the label. (With the label's skeleton from topology-preserving
    thinning, as medseg had it until 2026-12-06, the two skeletons differed at a correct
    mask: two 3D bars at ``p = 0.8`` scored -0.09, and the gradient lowered ``p`` on a
    third of a correct label.)

    Only ``p`` carries gradient: masks, skeletons and distances of the prediction are of
    the binarised prediction, so voxels predicted as background (``p <= 0.5``) get no
    gradient from this term. Combine it with a volumetric loss, as the authors do
    (CE·3 + Dice·1 + cbDice·2): ``losses: [{name: dice_ce}, {name: cbdice, weight: 1.0}]``.

    Skeletons: :func:`medseg.losses.cldice.soft_skeleton` of the binary label and of the
    binarised prediction, in one call on the device without gradient, as in the authors'
    code. Distances: the label's is read from the batch key ``'skeleton_distance'`` when
    the data pipeline computed it (:class:`medseg.data.topology_targets.SkeletonDistanced`,
    after spatial augmentation: the fast path), else computed here on the CPU (a one-hot
    target is read as the label map of its argmax); the prediction's is computed on the
    CPU every step.

    Differences from the official code (github.com/PengchengShi1220/cbDice, ``loss/cbdice_loss.py``):

    - classes are scored separately and averaged, and sums are per sample; the official
      loss merges all foreground classes into one (max over the foreground logits, then a
      two-class softmax) and sums over the whole batch;
    - ``L = 1 - cbDice``; the official returns ``-cbDice`` (nnU-Net's convention; same gradient);
    - ``r_min`` is the smallest radius on the skeleton; the official takes the minimum over
      the whole patch, zeros off the skeleton included, so that it is always 1 there. The
      two agree when the thinnest vessel has radius 1;
    - the official code offers topology-preserving skeletonisation (Menten et al., ICCV
      2023) as an option besides its default soft skeleton; medseg has the default only;
    - a mask filling the whole patch has distance 1 everywhere (the official leaves it to
      the distance transform, which is undefined without a background voxel);
    - every denominator has the floor ``ε`` (:data:`medseg.losses._prepare.EPS`).

    The inverse-radius weight is the official code's current "linear" form; its README
    records that it replaced an earlier reciprocal ``1/R̃^k``.

    Reference: P. Shi, J. Hu, Y. Yang, Z. Gao, W. Liu, T. Ma, "Centerline Boundary Dice
    Loss for Vascular Segmentation", MICCAI 2024, pp. 46-56, arXiv:2407.01517.

    Args:
        iterations: erosion steps of the prediction's soft skeleton (>= 0; the authors use 10);
            should reach the largest expected radius, in voxels.
        smooth_nr: added to the Tprec/Tsens numerators (the authors: 1e-3).
        smooth_dr: added to the Tprec/Tsens denominators (the authors: 1e-3).
        include_background: score channel 0 too (default False); ignored for one channel.
        to_onehot_y, sigmoid, softmax: see :mod:`medseg.losses._prepare` (``None``: from the
            number of channels).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a (B,) tensor).

    Raises:
        ValueError: negative ``iterations`` or smoothing, incompatible activation flags,
            unknown ``reduction``; in ``forward``, a ``skeleton_distance`` of the wrong shape.
    """

    #: batch key -> keyword argument of :meth:`forward`
    batch_keys = {"skeleton_distance": "skeleton_distance"}
    #: reads only the distance channel of 'skeleton_distance' (its label skeleton is the
    #: soft skeleton): the pipeline skips the thinning unless another term reads it
    reads_label_skeleton = False

    def __init__(
        self,
        iterations: int = 10,
        smooth_nr: float = 1e-3,
        smooth_dr: float = 1e-3,
        include_background: bool = False,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_iterations(iterations)
        for key, value in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        check_activation_flags(sigmoid, softmax)
        self.iterations = iterations
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.reduction = check_reduction(reduction)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, skeleton_distance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``input`` (B, C, ...) logits; ``target`` (B, 1, ...) labels; ``skeleton_distance`` (B, 2, ...) or None."""
        check_input(input, target, "CenterlineBoundaryDiceLoss")
        n = input.shape[1]
        activation = resolve_activation(n, self.sigmoid, self.softmax)
        probs = activate(input, activation)
        label = (target_as_channels(target, n, self.to_onehot_y) > 0.5).to(probs.dtype)
        _, dist_l = label_skeleton_and_distance(
            target, label, skeleton_distance, self.include_background, "CenterlineBoundaryDiceLoss", skeleton=False
        )
        pred = hard_prediction(probs.detach(), activation)
        if not self.include_background and n > 1:
            probs, label, pred, dist_l = (t[:, 1:] for t in (probs, label, pred, dist_l))
        with torch.no_grad():
            # one algorithm for both skeletons, so that a correct mask has the label's
            both = (soft_skeleton(torch.cat([pred, label]), self.iterations) > 0.5).to(probs.dtype)
            skel_p, skel_l = both[: pred.shape[0]], both[pred.shape[0]:]
            dist_p = inner_distances(pred)
        dn_l, rn_l, w_l = radius_weights(skel_l, dist_l)
        dn_p, rn_p, w_p = radius_weights(skel_p, dist_p)
        qs_p, qv_p, qr_p = w_p * probs, dn_p * probs, rn_p * probs
        rho_prec = torch.where(skel_l > 0.5, rn_l, qr_p)
        rho_sens = torch.where(skel_p > 0.5, qr_p, rn_l)
        axes = tuple(range(2, probs.dim()))
        tprec = (torch.sum(qs_p * dn_l, axes) + self.smooth_nr) / (
            torch.sum(qs_p * rho_prec, axes) + self.smooth_dr
        ).clamp_min(EPS)
        tsens = (torch.sum(w_l * qv_p, axes) + self.smooth_nr) / (
            torch.sum(w_l * rho_sens, axes) + self.smooth_dr
        ).clamp_min(EPS)
        cbdice = 2.0 * tprec * tsens / (tprec + tsens).clamp_min(EPS)
        return reduce((1.0 - cbdice).mean(dim=1), self.reduction)

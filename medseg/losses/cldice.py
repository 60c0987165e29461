"""Soft clDice (Shit et al., CVPR 2021), combined with soft Dice.

The soft skeleton is MONAI's :func:`monai.losses.cldice.soft_skel` (iterated min-pool
erosion and max-pool dilation, honouring ``iter_``); the loss around it is our own because
MONAI's clDice losses have faults that matter for training:

- a 1-channel sigmoid head must give a real loss. MONAI's original implementation (PR
  6763) summed the skeletons over ``[:, 1:]`` unconditionally, dropping the only channel
  of a binary head as "background": ``Tprec = Tsens = smooth/smooth = 1`` and a loss of
  exactly 0 (MONAI issue 8239). MONAI 1.6 scores channel 0 again; here the single channel
  is the foreground whatever ``include_background`` says;
- every denominator has a floor (:data:`medseg.losses._prepare.EPS`): MONAI gives NaN for
  ``smooth_nr = smooth_dr = 0`` on an empty target (0/0) and refuses ``smooth = 0``;
- classes are scored separately and averaged (as Dice does) instead of pooling all
  channels into one skeleton sum, so a thin class is not drowned by a thick one.
"""

from __future__ import annotations

import torch
from monai.losses.cldice import soft_skel
from torch import nn

from medseg.losses._prepare import (
    EPS,
    check_activation_flags,
    check_input,
    check_reduction,
    probabilities_and_target,
    reduce,
)


def soft_skeleton(image: torch.Tensor, iterations: int) -> torch.Tensor:
    """Soft skeleton of a (B, C, H, W[, D]) map in [0, 1] after ``iterations`` erosions.

    ``skel_0 = relu(I - open(I))``; for k = 1..iterations: ``I <- erode(I)``,
    ``δ = relu(I - open(I))``, ``skel <- skel + relu(δ - skel·δ)``. Erosion is a min-pool
    over the 3-voxel cross (per axis), dilation a 3^n max-pool.
    """
    if image.dim() not in (4, 5):
        raise ValueError(f"soft_skeleton needs a 4D or 5D tensor, got shape {tuple(image.shape)}")
    return soft_skel(image, iterations)


class SoftclDiceLoss(nn.Module):
    """Soft Dice and soft clDice, ``L = (1 - alpha)·L_Dice + alpha·L_clDice``.

    With ``S_P = soft_skeleton(P)`` and ``S_G = soft_skeleton(G)`` computed per sample ``b`` and
    class ``c`` of the prediction ``P`` (probabilities) and the target ``G`` (one-hot):

    - topology precision ``Tprec = (Σ S_P·G + smooth_nr) / max(Σ S_P + smooth_dr, ε)``,
    - topology sensitivity ``Tsens = (Σ S_G·P + smooth_nr) / max(Σ S_G + smooth_dr, ε)``,
    - ``L_clDice = 1 - 2·Tprec·Tsens / max(Tprec + Tsens + smooth, ε)``,

    averaged over classes, then reduced over the batch; ``L_Dice`` is the soft Dice of
    :class:`medseg.losses.dice.DiceLoss` with the same smoothing. ``alpha = 1`` gives plain
    clDice, which the paper advises always to combine with a volumetric loss.

    Reference: S. Shit, J. C. Paetzold et al., "clDice - a Novel Topology-Preserving Loss
    Function for Tubular Structure Segmentation", CVPR 2021, arXiv:2003.07311.

    Args:
        iterations: erosion steps of the soft skeleton (>= 0); should reach the largest
            expected radius of the structures, in voxels.
        alpha: weight of clDice against soft Dice, in [0, 1].
        smooth: added to the harmonic-mean denominator; may be 0.
        smooth_nr: added to the Tprec/Tsens numerators (and Dice's).
        smooth_dr: added to the Tprec/Tsens denominators (and Dice's).
        include_background: score channel 0 too. Default False (the skeleton of the
            background is rarely meaningful; unlike MONAI's default); ignored for one channel.
        to_onehot_y, sigmoid, softmax: see :mod:`medseg.losses._prepare` (``None``: from the
            number of channels).
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (a (B,) tensor).

    Raises:
        ValueError: negative ``iterations``, ``alpha`` outside [0, 1], negative smoothing,
            incompatible activation flags, unknown ``reduction``.
    """

    def __init__(
        self,
        iterations: int = 3,
        alpha: float = 0.5,
        smooth: float = 1e-4,
        smooth_nr: float = 1.0,
        smooth_dr: float = 1.0,
        include_background: bool = False,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        for key, value in (("smooth", smooth), ("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        check_activation_flags(sigmoid, softmax)
        self.iterations = iterations
        self.alpha = float(alpha)
        self.smooth = float(smooth)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.reduction = check_reduction(reduction)

    def cldice(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample clDice loss (B,) of probabilities and a one-hot target of equal shape."""
        axes = tuple(range(2, probs.dim()))
        skel_pred = soft_skeleton(probs, self.iterations)
        skel_true = soft_skeleton(target, self.iterations)
        tprec = (torch.sum(skel_pred * target, axes) + self.smooth_nr) / (
            torch.sum(skel_pred, axes) + self.smooth_dr
        ).clamp_min(EPS)
        tsens = (torch.sum(skel_true * probs, axes) + self.smooth_nr) / (
            torch.sum(skel_true, axes) + self.smooth_dr
        ).clamp_min(EPS)
        per_class = 1.0 - 2.0 * tprec * tsens / (tprec + tsens + self.smooth).clamp_min(EPS)
        return per_class.mean(dim=1)

    def soft_dice(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample soft Dice loss (B,) with the same smoothing as clDice."""
        axes = tuple(range(2, probs.dim()))
        inter = torch.sum(probs * target, axes)
        denom = torch.sum(probs, axes) + torch.sum(target, axes)
        dice = (2.0 * inter + self.smooth_nr) / (denom + self.smooth_dr).clamp_min(EPS)
        return (1.0 - dice).mean(dim=1)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_input(input, target, "SoftclDiceLoss")
        probs, tgt = probabilities_and_target(
            input,
            target,
            sigmoid=self.sigmoid,
            softmax=self.softmax,
            to_onehot_y=self.to_onehot_y,
            include_background=self.include_background,
        )
        loss = self.alpha * self.cldice(probs, tgt)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * self.soft_dice(probs, tgt)
        return reduce(loss, self.reduction)

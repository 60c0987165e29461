"""Dice and Dice + cross-entropy: thin wrappers of MONAI's losses with medseg's activation rule.

The computation is MONAI's (``monai.losses.DiceLoss``, ``monai.losses.DiceCELoss``); what
the wrappers add is the activation chosen from the number of channels (see
:mod:`medseg.losses._prepare`): a 1-channel head gets sigmoid and, in Dice+CE, binary
cross-entropy on the logits (MONAI's ``DiceCELoss`` switches to ``BCEWithLogitsLoss`` when
``input.shape[1] == 1``); a C-channel head gets softmax, a one-hot target for Dice and
cross-entropy on the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from monai.losses import DiceLoss as _MonaiDiceLoss
from torch import nn
from torch.nn import functional as F

from medseg.losses._prepare import (
    activate,
    check_activation_flags,
    check_input,
    resolve_activation,
    summable,
    target_as_channels,
)


class DiceLoss(nn.Module):
    """Soft Dice loss (Milletari et al., V-Net, 3DV 2016), computed by MONAI's ``DiceLoss``.

    Per sample and class, ``L = 1 - (2·Σ p·g + smooth_nr) / (Σ p + Σ g + smooth_dr)``,
    averaged over classes, then reduced over the batch. ``input`` is the raw network output
    (B, C, H, W[, D]), ``target`` an integer label map (B, 1, ...) or one-hot (B, C, ...).

    Args:
        include_background: if False, channel 0 (background) is left out; ignored for a
            1-channel head, whose only channel is the foreground.
        to_onehot_y: one-hot the target to C classes. ``None``: when C > 1 and the target
            has one channel.
        sigmoid: apply sigmoid to ``input``. ``None``: when C == 1.
        softmax: apply softmax to ``input``. ``None``: when C > 1.
        squared_pred: squared predictions and targets in the denominator.
        jaccard: soft Jaccard (IoU) instead of Dice.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch (and classes).
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        batch: sum intersection and union over the batch before the ratio.
        class_weights: one weight per (kept) class. Called ``weight`` in MONAI; renamed
            because ``weight`` is the term's weight in a medseg loss config.

    Raises:
        ValueError: ``sigmoid`` and ``softmax`` both True, or ``softmax`` with one channel.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_activation_flags(sigmoid, softmax)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self._kwargs = dict(
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        # Validate the MONAI arguments now rather than at the first batch.
        _MonaiDiceLoss(**self._kwargs)
        self._cache: dict[tuple, nn.Module] = {}

    def _weighted_classes(self, n_channels: int) -> int:
        """How many ``class_weights`` a head of ``n_channels`` outputs takes (MONAI's
        DiceLoss: the classes the Dice keeps)."""
        return n_channels if self.include_background or n_channels == 1 else n_channels - 1

    def check_channels(self, n_channels: int) -> None:
        """Raise ValueError when ``class_weights`` does not fit a head of ``n_channels``
        outputs (MONAI says so only at the first batch)."""
        expected = self._weighted_classes(n_channels)
        if self.class_weights is not None and len(self.class_weights) != expected:
            kept = "" if expected == n_channels else " (include_background: false leaves out channel 0)"
            raise ValueError(f"class_weights has {len(self.class_weights)} entries; the model's {n_channels} output "
                             f"channel(s) take {expected}{kept}")

    def _monai_flags(self, n_channels: int) -> dict:
        to_onehot = self.to_onehot_y if self.to_onehot_y is not None else n_channels > 1
        return dict(
            # A 1-channel head has no background channel to drop.
            include_background=self.include_background or n_channels == 1,
            to_onehot_y=bool(to_onehot) and n_channels > 1,
            # The activation is applied before MONAI's loss (_activated): the same sigmoid
            # or softmax that MONAI would apply, shared with the other terms of a
            # composite loss (medseg.losses._prepare.shared_preparation).
            sigmoid=False,
            softmax=False,
        )

    def _activated(self, input: torch.Tensor) -> torch.Tensor:
        return activate(input, resolve_activation(input.shape[1], self.sigmoid, self.softmax))

    def _loss_for(self, input: torch.Tensor, target: torch.Tensor) -> nn.Module:
        flags = self._monai_flags(input.shape[1])
        if flags["to_onehot_y"] and target.shape[1] != 1:
            flags["to_onehot_y"] = False  # already one-hot
        key = (tuple(sorted(flags.items())), input.device, input.dtype)
        if key not in self._cache:
            weight = None
            if self.class_weights is not None:
                weight = torch.tensor(self.class_weights, dtype=input.dtype, device=input.device)
            self._cache[key] = self._build(flags, weight)
        return self._cache[key]

    def _build(self, flags: dict, weight: torch.Tensor | None) -> nn.Module:
        return _MonaiDiceLoss(**flags, **self._kwargs, weight=weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_input(input, target, type(self).__name__)
        input = summable(input)
        target = target.to(input.dtype) if input.shape[1] == 1 else target
        return self._loss_for(input, target)(self._activated(input), target)


class DiceCELoss(DiceLoss):
    """Dice + cross-entropy, ``lambda_dice·Dice + lambda_ce·CE``, computed by MONAI's ``DiceCELoss``.

    The Dice part is :class:`DiceLoss`. The cross-entropy is taken on the raw logits:
    ``CrossEntropyLoss`` for C > 1 (label map or one-hot target), ``BCEWithLogitsLoss`` for a
    1-channel head (MONAI selects it from ``input.shape[1] == 1``). This is nnU-Net's default
    training loss (Isensee et al., Nature Methods 2021).

    Args:
        include_background, to_onehot_y, sigmoid, softmax, squared_pred, jaccard, smooth_nr,
        smooth_dr, batch, class_weights: as in :class:`DiceLoss` (``class_weights`` also
            weights the cross-entropy, or is BCE's ``pos_weight`` for one channel).
        reduction: ``"mean"`` or ``"sum"`` (MONAI's Dice+CE cannot return per-sample values).
        lambda_dice: weight of the Dice part (>= 0).
        lambda_ce: weight of the cross-entropy part (>= 0).
        label_smoothing: cross-entropy label smoothing in [0, 1].
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        class_weights: Sequence[float] | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        check_activation_flags(sigmoid, softmax)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self._kwargs = dict(
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            label_smoothing=label_smoothing,
        )
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        _MonaiDiceCELoss(**self._kwargs)
        self._cache = {}

    def _weighted_classes(self, n_channels: int) -> int:
        # MONAI's DiceCELoss: one weight per class for the cross-entropy; its Dice drops
        # the background's weight itself
        return n_channels

    def _build(self, flags: dict, weight: torch.Tensor | None) -> nn.Module:
        return _MonaiDiceCELoss(**flags, **self._kwargs, weight=weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's ``DiceCELoss.forward`` with the Dice part on the shared activation."""
        check_input(input, target, type(self).__name__)
        input = summable(input)
        target = target.to(input.dtype) if input.shape[1] == 1 else target
        loss = self._loss_for(input, target)
        dice = loss.dice(self._activated(input), target)
        if input.shape[1] == 1:
            ce = loss.bce(input, target)  # on the logits
        elif resolve_activation(input.shape[1], self.sigmoid, self.softmax) == "sigmoid":
            ce = self._multilabel_bce(input, target, loss.cross_entropy.reduction)
        else:
            ce = loss.ce(input, target)
        return loss.lambda_dice * dice + loss.lambda_ce * ce

    def _multilabel_bce(self, input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
        """A multi-label sigmoid head's cross-entropy: a binary one per channel, as its Dice
        part is. MONAI's DiceCELoss takes the softmax cross-entropy over the channels for
        every head of C > 1 (a perfect multi-label prediction stayed at 0.087, and a voxel
        of no label got no gradient from it); ``class_weights`` weigh the channels' positives."""
        channels = target_as_channels(target, input.shape[1], self.to_onehot_y)
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=input.dtype, device=input.device)
            weight = weight.view(1, -1, *([1] * (input.dim() - 2)))
        return F.binary_cross_entropy_with_logits(input, channels.to(input.dtype), pos_weight=weight,
                                                  reduction=reduction)

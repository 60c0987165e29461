"""Overlap and topology losses, composable in a run config.

Every loss is a ``torch.nn.Module`` with MONAI's argument names, called as
``loss(input, target)``: ``input`` the raw network output (B, C, H, W[, D]), ``target``
the integer label map (B, 1, H, W[, D]). A 1-channel output is a sigmoid binary head, a
C-channel output a softmax head (see :mod:`medseg.losses._prepare`).

========================  ==========================================================
name                      loss
========================  ==========================================================
``dice``                  :class:`~medseg.losses.dice.DiceLoss` (MONAI)
``dice_ce``               :class:`~medseg.losses.dice.DiceCELoss` (MONAI; BCE for 1 channel)
``cldice``                :class:`~medseg.losses.cldice.SoftclDiceLoss` (Shit et al. 2021)
``skeleton_recall``       :class:`~medseg.losses.skeleton_recall.SkeletonRecallLoss` (Kirchhoff et al. 2024)
``mip``                   :class:`~medseg.losses.mip.MIPLoss` (SPOCKMIP, Radhakrishna et al. 2024)
``sauna``                 :class:`~medseg.losses.sauna.SaunaLoss` (Dang et al. 2025)
``cbdice``                :class:`~medseg.losses.cbdice.CenterlineBoundaryDiceLoss` (Shi et al. 2024)
``clce``                  :class:`~medseg.losses.clce.CenterlineCrossEntropyLoss` (Acebes et al. 2024)
``betti_matching``        ``medseg.losses.betti_matching.BettiMatchingLoss`` (loaded on request)
========================  ==========================================================

A network with deep supervision (DynUNet ``deep_supervision: true``) is trained with
:func:`~medseg.losses.deep_supervision.deep_supervision_loss` over its heads.

Example::

    >>> import torch
    >>> from medseg.losses import get_loss
    >>> loss = get_loss("cldice", iterations=5, alpha=0.5)
    >>> value = loss(torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 1, 32, 32)))
"""

from medseg.losses.deep_supervision import deep_supervision_loss
from medseg.losses.registry import (
    LOSS_NAMES,
    CompositeLoss,
    build_loss,
    get_loss,
    required_target_transforms,
)

__all__ = ["LOSS_NAMES", "CompositeLoss", "build_loss", "deep_supervision_loss", "get_loss", "required_target_transforms"]


def __getattr__(name: str):
    """``BettiMatchingLoss`` on first use: importing it loads the topology engine, which
    a run without that loss never needs (PEP 562)."""
    if name == "BettiMatchingLoss":
        from medseg.losses.betti_matching import BettiMatchingLoss

        return BettiMatchingLoss
    raise AttributeError(f"module 'medseg.losses' has no attribute {name!r}")

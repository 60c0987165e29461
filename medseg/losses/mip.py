"""Maximum-intensity-projection loss (SPOCKMIP, Radhakrishna et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.losses._prepare import (
    EPS,
    activate,
    check_activation_flags,
    check_input,
    check_reduction,
    reduce,
    resolve_activation,
)
from medseg.losses.dice import DiceCELoss, DiceLoss

_AXIS_NAMES = {"x": 0, "y": 1, "z": 2}


def focal_tversky(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 0.75,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Per-sample focal Tversky loss (B,) of (B, ...) probabilities and a (B, ...) binary target.

    ``TI = (TP + smooth) / max(TP + alpha·FN + beta·FP + smooth, ε)`` with ``TP = Σ p·g``,
    ``FN = Σ (1-p)·g``, ``FP = Σ p·(1-g)``; ``L = max(1 - TI, ε)^gamma``. The floor keeps
    the gradient finite at a perfect prediction, where ``d/dx x^0.75`` is infinite.

    Reference: N. Abraham, N. M. Khan, "A Novel Focal Tversky Loss Function with Improved
    Attention U-Net for Lesion Segmentation", ISBI 2019.
    """
    p = pred.reshape(pred.shape[0], -1)
    g = target.reshape(target.shape[0], -1).to(p.dtype)
    tp = torch.sum(p * g, 1)
    fn = torch.sum((1.0 - p) * g, 1)
    fp = torch.sum(p * (1.0 - g), 1)
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth).clamp_min(EPS)
    return (1.0 - ti).clamp_min(EPS) ** gamma


def _parse_axes(axes: int | str | Sequence[int | str]) -> tuple[int | str, ...]:
    items = (axes,) if isinstance(axes, (int, str)) else tuple(axes)
    if not items:
        raise ValueError("axes must name at least one spatial axis")
    for a in items:
        if isinstance(a, bool) or not (isinstance(a, int) or a in _AXIS_NAMES):
            raise ValueError(f"axes: {a!r} is not a spatial axis index or one of 'x', 'y', 'z'")
    return items


def spatial_axes(axes: Sequence[int | str], n_spatial: int) -> tuple[int, ...]:
    """Spatial axis indices in ``0..n_spatial-1`` ('x', 'y', 'z' = 0, 1, 2; negative from the last)."""
    out = []
    for a in axes:
        idx = _AXIS_NAMES[a] if isinstance(a, str) else a
        if not -n_spatial <= idx < n_spatial:
            raise ValueError(f"MIPLoss: axis {a!r} does not exist in {n_spatial} spatial dimensions")
        out.append(idx % n_spatial)
    if len(set(out)) != len(out):
        raise ValueError(f"MIPLoss: axes {list(axes)} name one axis twice (its projection would count twice)")
    return tuple(out)


class MIPLoss(nn.Module):
    """Focal Tversky loss on maximum intensity projections, plus a segmentation loss.

    ``L = segmentation_weight·L_seg(input, target) + mip_weight·Σ_a mean_k FT(MIP_a(P_k), MIP_a(G_k))``

    where ``P_k`` is the probability of foreground class ``k`` (the sigmoid of a 1-channel
    head; channel ``k = 1..C-1`` after the softmax for C > 1), ``G_k = (label == k)``,
    ``MIP_a(X) = max over spatial axis a`` of X, and ``FT`` the per-sample
    :func:`focal_tversky` (``alpha`` on false negatives, ``beta`` on false positives,
    ``gamma``), averaged over the foreground classes. SPOCKMIP segments one class (vessels);
    with several (artery and vein) each class is projected on its own, as every other loss
    here treats classes: a projection of "any foreground" scored an artery predicted as vein,
    or the two swapped, as perfect. Several axes are summed, as in the paper's multi-axis
    variant. Projections
    are taken on the (B, K, *spatial) tensors as they are - axis ``a`` of the patch, with no
    permutation - so the prediction and the label are projected along the same axis. (The
    reference code moves the last axis to the front of the network input and then projects
    the output along the last axis, i.e. along a different axis than the label's MIP.)

    ``L_seg`` is :class:`medseg.losses.dice.DiceCELoss` by default; ``segmentation_weight =
    0, mip_weight = 1`` gives the plain MIP term to combine with others in a config.

    Target projection:

    - ``'patch'`` (default): ``MIP_a(G)`` of the patch's label.
    - ``'volume'`` (the paper's variant): the projection of the *whole* label volume along
      ``a``, cropped to the patch's window, read from the batch key ``'label_mip'`` that
      :class:`medseg.data.topology_targets.LabelProjectiond` writes *before* cropping
      (shape (B, len(axes), *spatial), channel k broadcast along ``axes[k]``). Structures
      outside the patch along the projection axis then count as foreground, as in the paper.
      The projection (and the cache's, medseg/preprocessing) is of the foreground as a whole,
      so this variant takes one foreground class (a 1-channel or 2-channel head).

    Reference: C. Radhakrishna, K. V. Chintalapati, ..., S. Chatterjee, "SPOCKMIP: Segmentation of Vessels in
    MRAs with Enhanced Continuity using Maximum Intensity Projection as Loss",
    arXiv:2407.08655, 2024.

    Args:
        axes: spatial axes to project along: indices (negative from the last) or
            'x', 'y', 'z' (= 0, 1, 2). Default ``-1``: the last spatial axis, z of a
            (B, C, X, Y, Z) patch in RAS orientation.
        segmentation_weight: weight of ``L_seg`` (>= 0). Default 0.7.
        mip_weight: weight of the MIP term (>= 0). Default 0.3.
        segmentation: ``'dice_ce'``, ``'dice'`` or ``'focal_tversky'`` (the paper's; on the
            volume, same alpha/beta/gamma).
        alpha: focal Tversky weight of false negatives. Default 0.7.
        beta: weight of false positives. Default 0.3.
        gamma: focal exponent. Default 0.75.
        smooth: added to the Tversky numerator and denominator. Default 1.
        target_projection: ``'patch'`` or ``'volume'``.
        sigmoid, softmax, to_onehot_y: see :mod:`medseg.losses._prepare`.
        reduction: ``"mean"`` or ``"sum"``: the MIP term's over the batch; the
            segmentation term (Dice+CE) takes it as MONAI's DiceCELoss does, so its
            ``"sum"`` adds the cross-entropy over every voxel as well (the total then grows
            with the patch, not with the batch alone). ``"none"``: (B,) MIP term only,
            when ``segmentation_weight`` is 0.

    Raises:
        ValueError: bad axes, negative weights, bad ``segmentation`` or ``target_projection``;
            ``target_projection='volume'`` with more than one foreground class (``check_channels``).
    """

    def __init__(
        self,
        axes: int | str | Sequence[int | str] = -1,
        segmentation_weight: float = 0.7,
        mip_weight: float = 0.3,
        segmentation: str = "dice_ce",
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 0.75,
        smooth: float = 1.0,
        target_projection: str = "patch",
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        to_onehot_y: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.axes = _parse_axes(axes)
        if segmentation_weight < 0 or mip_weight < 0:
            raise ValueError("segmentation_weight and mip_weight must be >= 0")
        if segmentation not in ("dice_ce", "dice", "focal_tversky"):
            raise ValueError(f"segmentation must be 'dice_ce', 'dice' or 'focal_tversky', got {segmentation!r}")
        if target_projection not in ("patch", "volume"):
            raise ValueError(f"target_projection must be 'patch' or 'volume', got {target_projection!r}")
        if gamma <= 0 or smooth < 0 or alpha < 0 or beta < 0:
            raise ValueError("gamma must be > 0; alpha, beta and smooth >= 0")
        check_activation_flags(sigmoid, softmax)
        self.reduction = check_reduction(reduction)
        if reduction == "none" and segmentation_weight > 0:
            raise ValueError("reduction='none' needs segmentation_weight=0 (Dice+CE has no per-sample values)")
        self.segmentation_weight = float(segmentation_weight)
        self.mip_weight = float(mip_weight)
        self.segmentation = segmentation
        self.alpha, self.beta, self.gamma, self.smooth = float(alpha), float(beta), float(gamma), float(smooth)
        self.target_projection = target_projection
        self.sigmoid, self.softmax, self.to_onehot_y = sigmoid, softmax, to_onehot_y
        self.seg_loss: nn.Module | None = None
        if segmentation_weight > 0 and segmentation != "focal_tversky":
            cls = DiceCELoss if segmentation == "dice_ce" else DiceLoss
            self.seg_loss = cls(sigmoid=sigmoid, softmax=softmax, to_onehot_y=to_onehot_y, reduction=reduction)

    @property
    def batch_keys(self) -> dict[str, str]:
        return {"label_mip": "label_mip"} if self.target_projection == "volume" else {}

    def foreground(self, input: torch.Tensor) -> torch.Tensor:
        """Probability of each foreground class (B, K, *spatial) from raw logits: the sigmoid
        of a 1-channel head (K = 1); channels 1..C-1 after the softmax, or the sigmoids of a
        multi-label head, for C > 1 (K = C - 1)."""
        n = input.shape[1]
        probs = activate(input, resolve_activation(n, self.sigmoid, self.softmax))
        return probs if n == 1 else probs[:, 1:]

    def foreground_target(self, target: torch.Tensor, n: int) -> torch.Tensor:
        """The target of each foreground class (B, K, *spatial), read as :meth:`foreground`
        reads the output of ``n`` channels: a 1-channel target of a 1-channel head as it is
        (soft values kept), a label map's ``label == k`` for k = 1..n-1, a one-hot (or
        multi-label) target's channels 1..n-1."""
        if target.shape[1] == 1:
            if n == 1:
                return target.float()
            return torch.cat([target == k for k in range(1, n)], dim=1).float()
        return target[:, 1:].float()

    def check_channels(self, out_channels: int) -> None:
        """Raise ValueError if the volume projection would meet more than one foreground class."""
        if self.target_projection == "volume" and out_channels > 2:
            raise ValueError(
                f"target_projection 'volume' projects the foreground of all classes together, so it takes one "
                f"foreground class, and the model has {out_channels - 1}; use target_projection 'patch' "
                "(each class projected on its own)"
            )

    def check_spatial_dims(self, spatial_dims: int) -> None:
        """Raise ValueError if ``axes`` names an axis that ``spatial_dims``-D inputs lack."""
        spatial_axes(self.axes, spatial_dims)

    def _class_mean(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample :func:`focal_tversky` (B,) of (B, K, ...) maps: each class on its own, averaged."""
        b, k = pred.shape[:2]
        ft = focal_tversky(pred.reshape(b * k, -1), target.reshape(b * k, -1), self.alpha, self.beta, self.gamma,
                           self.smooth)
        return ft.reshape(b, k).mean(dim=1)

    def forward(self, input: torch.Tensor, target: torch.Tensor, label_mip: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` (B, C, ...) logits; ``target`` (B, 1, ...) labels; ``label_mip`` (B, len(axes), ...) or None."""
        check_input(input, target, "MIPLoss")
        n_spatial = input.dim() - 2
        axes = spatial_axes(self.axes, n_spatial)
        fg = self.foreground(input)
        fg_target = self.foreground_target(target, input.shape[1]).to(fg.dtype)
        if self.target_projection == "volume":
            try:
                self.check_channels(input.shape[1])
            except ValueError as err:
                raise ValueError(f"MIPLoss: {err}") from None
            if label_mip is None:
                raise ConfigError(
                    "mip: target_projection='volume' needs the batch key 'label_mip' "
                    "(LabelProjectiond on the whole label before cropping); use target_projection='patch' otherwise"
                )
            if label_mip.shape[0] != input.shape[0] or label_mip.shape[1] != len(axes) or label_mip.shape[2:] != input.shape[2:]:
                raise ValueError(
                    f"MIPLoss: label_mip has shape {tuple(label_mip.shape)}, expected "
                    f"({input.shape[0]}, {len(axes)}, {', '.join(map(str, input.shape[2:]))})"
                )
        mip = torch.zeros(input.shape[0], device=input.device, dtype=fg.dtype)
        for k, a in enumerate(axes):
            dim = a + 2
            pred_proj = fg.amax(dim=dim)
            if self.target_projection == "volume":
                tgt_proj = (label_mip[:, k : k + 1] > 0).to(fg.dtype).amax(dim=dim)
            else:
                tgt_proj = fg_target.amax(dim=dim)
            mip = mip + self._class_mean(pred_proj, tgt_proj)
        loss = reduce(mip, self.reduction) * self.mip_weight
        if self.segmentation_weight > 0:
            if self.seg_loss is not None:
                seg = self.seg_loss(input, target)
            else:
                seg = reduce(self._class_mean(fg, fg_target), self.reduction)
            loss = loss + self.segmentation_weight * seg
        return loss

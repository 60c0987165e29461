"""Source-free domain adaptation with a class-ratio prior (Bateson et al., MedIA 2022).

Loss on softmax predictions ``p`` ``(B, K, *spatial)`` of unlabelled target patches::

    L = sum_k w_k * mean_voxels(-p_k log p_k)  +  lambda * KL(tau_hat || tau)
    tau_hat_k = mean_voxels(p_k)                       (per sample, or pooled over the batch)
    KL(tau_hat || tau) = sum_k tau_hat_k log(tau_hat_k / tau_k)

The entropy term makes predictions confident; alone it collapses to the dominant class,
which the KL term prevents by holding the predicted class proportions near a prior
``tau`` (anatomical knowledge: here the class ratios of the source training labels,
``label_stats.json``, which carries no image and is allowed in the source-free setting).

Structure absent: on a sample whose predicted ratio of foreground class ``k`` is below
``absent_threshold``, ``k`` is treated as absent: ``tau_k`` is moved to the background
and the term of ``k`` leaves the sum, so the prior never forces a structure into a patch
that does not show it (Bateson et al. likewise do not apply the size prior to images
where the structure is predicted absent).

Ratio scope: the prior is a statistic of whole images (Bateson et al. apply it per 2D
image), but a step sees random patches, whose true ratio varies from 0 to several times
the scan's. Holding every patch (or batch of patches) to ``tau`` forces foreground into
patches without structure and removes it from patches full of it. With
``ratio_scope="scan"`` (the default) ``tau_hat`` is the ratio of the patch's *whole scan*:
the scan's ratio from a sliding-window pass of the model (refreshed every
``sfda.refresh_interval`` steps), plus the change of the patch's own mean since that pass
``tau_hat = tau_scan + mean_patch(p) - stopgrad(mean_patch(p_refresh))``. Its value is the
whole-scan ratio and its gradient that of the patch ratio.

Means and ratios run over the scans' own voxels: the padding of a scan smaller than the
patch is left out (:func:`medseg.adaptation.target.own_voxel_masks`).

Defaults follow the paper and the authors' released code: class weights 0.1 (background)
and 0.9 (foreground) in the entropy, ``lambda = 1``, Adam with a small learning rate
(5e-4 in their 2D experiments; ``adapt.lr``).

References
----------
M. Bateson, H. Kervadec, J. Dolz, H. Lombaert, I. Ben Ayed. Source-free domain
adaptation for image segmentation. Medical Image Analysis 82, 102617 (2022).
"""

from __future__ import annotations

from typing import Sequence

import torch

import copy

from medseg.adaptation.base import AdaptContext, Method
from medseg.adaptation.target import crop, masked_mean, probabilities_with
from medseg.errors import ConfigError

_EPS = 1e-8


def weighted_entropy(probs: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k w_k mean_{b, voxels}(-p_k log p_k)`` for probabilities ``(B, K, *spatial)``; ``w = 1`` when None.

    ``mask`` ``(B, 1, *spatial)``: the voxels the mean runs over (a scan's own voxels,
    :func:`medseg.adaptation.target.own_voxel_masks`); all when None.
    """
    ent = -(probs * torch.log(probs.clamp_min(_EPS)))  # (B, K, ...)
    if mask is None:
        per_class = ent.transpose(0, 1).reshape(probs.shape[1], -1).mean(dim=1)
    else:
        per_class = masked_mean(ent, mask, [0, *range(2, ent.ndim)])
    if weights is None:
        return per_class.sum()
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    return (w * per_class).sum()


def class_ratio_kl(
    probs: torch.Tensor, prior: Sequence[float] | torch.Tensor, absent_threshold: float = 0.0, scope: str = "sample",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over samples of ``KL(tau_hat || tau)`` with the structure-absent rule (module docstring).

    ``scope="batch"`` pools the voxels of all samples into one ``tau_hat``. Background is
    class 0 and is never absent. ``mask`` ``(B, 1, *spatial)``: the voxels the ratios are
    taken over (all when None).
    """
    k = probs.shape[1]
    tau = torch.as_tensor(prior, dtype=probs.dtype, device=probs.device)
    if tau.numel() != k:
        raise ConfigError(f"adapt.sfda.prior: {tau.numel()} ratios given, the model has {k} classes (incl. background)")
    if mask is not None:
        spatial = list(range(2, probs.ndim))
        if scope == "batch":
            tau_hat = masked_mean(probs, mask, [0, *spatial])[:, None]  # (K, 1)
        else:
            tau_hat = masked_mean(probs, mask, spatial).transpose(0, 1)  # (K, B)
        return ratio_kl(tau_hat, tau, absent_threshold)
    flat = probs.transpose(0, 1).reshape(k, probs.shape[0], -1)  # (K, B, V)
    if scope == "batch":
        tau_hat = flat.reshape(k, -1).mean(dim=1, keepdim=True)  # (K, 1)
    else:
        tau_hat = flat.mean(dim=2)  # (K, B)
    return ratio_kl(tau_hat, tau, absent_threshold)


def ratio_kl(tau_hat: torch.Tensor, prior: Sequence[float] | torch.Tensor, absent_threshold: float = 0.0) -> torch.Tensor:
    """Mean over columns of ``KL(tau_hat[:, j] || tau)`` for estimated ratios ``(K, J)``, structure-absent rule included."""
    tau = torch.as_tensor(prior, dtype=tau_hat.dtype, device=tau_hat.device)
    present = tau_hat.detach() >= absent_threshold
    present[0] = True
    prior_b = tau[:, None].expand_as(tau_hat).clone()
    moved = (prior_b * (~present)).sum(dim=0)
    prior_b = torch.where(present, prior_b, torch.zeros_like(prior_b))
    prior_b[0] = prior_b[0] + moved
    terms = tau_hat * (torch.log(tau_hat.clamp_min(_EPS)) - torch.log(prior_b.clamp_min(_EPS)))
    terms = torch.where(present, terms, torch.zeros_like(terms))
    return terms.sum(dim=0).mean()


def sfda_loss(probs: torch.Tensor, prior, entropy_weights, kl_weight: float, absent_threshold: float,
              scope: str, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    ent = weighted_entropy(probs, entropy_weights, mask)
    kl = class_ratio_kl(probs, prior, absent_threshold, scope, mask)
    return ent + kl_weight * kl, {"entropy": float(ent.detach()), "kl_prior": float(kl.detach())}


def default_entropy_weights(num_classes: int) -> list[float]:
    return [0.1] + [0.9] * (num_classes - 1)


class SFDA(Method):
    name = "sfda"
    loss_terms = ("entropy", "kl_prior")

    def __init__(self, ctx: AdaptContext, prior: list[float]) -> None:
        super().__init__(ctx)
        sc = ctx.cfg.adapt.sfda
        if len(prior) != ctx.num_classes:
            raise ConfigError(
                f"adapt.sfda.prior: {len(prior)} ratios given, the source model has {ctx.num_classes} classes (incl. background)"
            )
        weights = sc.entropy_weights or default_entropy_weights(ctx.num_classes)
        if len(weights) != ctx.num_classes:
            raise ConfigError(f"adapt.sfda.entropy_weights: {len(weights)} given, the model has {ctx.num_classes} classes")
        self.prior = list(prior)
        self.weights = list(weights)
        self.refresh_state: dict | None = None  # weights of the last sliding-window pass (scan scope)
        self.maps: list[torch.Tensor] | None = None

    def before_step(self, model, iteration):
        sc = self.ctx.cfg.adapt.sfda
        if sc.ratio_scope != "scan":
            return
        if iteration % sc.refresh_interval == 0 or self.refresh_state is None:
            self.refresh_state = copy.deepcopy(model.state_dict())
            self.maps = None
        if self.maps is None:  # a refresh, or resumed: recompute from the stored weights
            net = self.ctx.build_model()
            net.load_state_dict(self.refresh_state)
            self.maps = [probabilities_with(self.ctx.predictor, net, scan) for scan in self.ctx.scans]
            self.scan_ratio = [_unpadded(m, scan).reshape(m.shape[0], -1).mean(dim=1)
                               for m, scan in zip(self.maps, self.ctx.scans)]

    def loss(self, model, iteration, source_batch):
        sc = self.ctx.cfg.adapt.sfda
        specs = self.ctx.batch_specs(iteration)
        x = self.ctx.views(specs)
        probs = torch.softmax(model(x).float(), dim=1)
        mask = self.ctx.own_voxels(specs)  # None unless a patch reaches into a small scan's padding
        if sc.ratio_scope != "scan":
            return sfda_loss(probs, self.prior, self.weights, sc.kl_weight, sc.absent_threshold, sc.ratio_scope, mask)
        k = probs.shape[1]
        if mask is None:
            patch_now = probs.transpose(0, 1).reshape(k, probs.shape[0], -1).mean(dim=2)  # (K, B); flips keep the mean
            unflipped = None
        else:
            patch_now = masked_mean(probs, mask, range(2, probs.ndim)).transpose(0, 1)
            unflipped = self.ctx.own_voxels(specs, view=None).cpu()  # the frame of the refresh maps
        cols = []
        for b, s in enumerate(specs):
            window = crop(self.maps[s.case], s.start, self.ctx.patch)
            if unflipped is None:
                before = window.reshape(k, -1).mean(dim=1).to(probs)
            else:
                before = masked_mean(window, unflipped[b].to(window.device), range(1, window.ndim)).to(probs)
            cols.append(self.scan_ratio[s.case].to(probs) + patch_now[:, b] - before)
        tau_hat = torch.stack(cols, dim=1).clamp(0.0, 1.0)
        ent = weighted_entropy(probs, self.weights, mask)
        kl = ratio_kl(tau_hat, self.prior, sc.absent_threshold)
        return ent + sc.kl_weight * kl, {"entropy": float(ent.detach()), "kl_prior": float(kl.detach())}

    def state_dict(self):
        return {"refresh": self.refresh_state}

    def load_state_dict(self, state):
        self.refresh_state = state.get("refresh")
        self.maps = None


def _unpadded(probs: torch.Tensor, scan) -> torch.Tensor:
    """``(K, *spatial)`` restricted to the scan's own voxels (without the padding up to the patch size)."""
    return probs[(slice(None),) + tuple(slice(0, n) for n in scan.own_shape)]

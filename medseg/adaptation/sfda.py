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

from medseg.adaptation.base import AdaptContext, Method
from medseg.errors import ConfigError

_EPS = 1e-8


def weighted_entropy(probs: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k w_k mean_{b, voxels}(-p_k log p_k)`` for probabilities ``(B, K, *spatial)``; ``w = 1`` when None."""
    ent = -(probs * torch.log(probs.clamp_min(_EPS)))  # (B, K, ...)
    per_class = ent.transpose(0, 1).reshape(probs.shape[1], -1).mean(dim=1)
    if weights is None:
        return per_class.sum()
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    return (w * per_class).sum()


def class_ratio_kl(
    probs: torch.Tensor, prior: Sequence[float] | torch.Tensor, absent_threshold: float = 0.0, scope: str = "sample"
) -> torch.Tensor:
    """Mean over samples of ``KL(tau_hat || tau)`` with the structure-absent rule (module docstring).

    ``scope="batch"`` pools the voxels of all samples into one ``tau_hat``. Background is
    class 0 and is never absent.
    """
    k = probs.shape[1]
    tau = torch.as_tensor(prior, dtype=probs.dtype, device=probs.device)
    if tau.numel() != k:
        raise ConfigError(f"adapt.sfda.prior: {tau.numel()} ratios given, the model has {k} classes (incl. background)")
    flat = probs.transpose(0, 1).reshape(k, probs.shape[0], -1)  # (K, B, V)
    if scope == "batch":
        tau_hat = flat.reshape(k, -1).mean(dim=1, keepdim=True)  # (K, 1)
    else:
        tau_hat = flat.mean(dim=2)  # (K, B)
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
              scope: str) -> tuple[torch.Tensor, dict[str, float]]:
    ent = weighted_entropy(probs, entropy_weights)
    kl = class_ratio_kl(probs, prior, absent_threshold, scope)
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

    def loss(self, model, iteration, source_batch):
        sc = self.ctx.cfg.adapt.sfda
        x = self.ctx.views(self.ctx.batch_specs(iteration))
        probs = torch.softmax(model(x).float(), dim=1)
        return sfda_loss(probs, self.prior, self.weights, sc.kl_weight, sc.absent_threshold, sc.ratio_scope)

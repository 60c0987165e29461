"""Tent: test-time entropy minimisation (Wang et al., ICLR 2021).

Minimises the Shannon entropy ``mean_voxels(-sum_k p_k log p_k)`` of the predictions on
target patches, updating only the affine parameters (scale ``gamma``, shift ``beta``) of
the normalisation layers — BatchNorm and InstanceNorm (1/2/3D), and GroupNorm /
LayerNorm where a network has them — with every other parameter frozen. Normalisation
uses the statistics of the current batch (InstanceNorm always does; BatchNorm is kept in
training mode, so its running statistics also move to the target domain and are what
the saved model uses at inference). Steps are bounded (``adapt.tent.max_iterations``):
Tent is meant for few passes and degrades with many. The mean runs over the scans' own
voxels: the padding of a scan smaller than the patch is left out (it is no part of the
target domain; see :func:`medseg.adaptation.target.own_voxel_masks`).

Networks whose norms have no affine parameters (MONAI's default InstanceNorm) get them
with identity initialisation when ``adapt.tent.enable_affine`` is true
(:func:`medseg.adaptation.source.ensure_affine_norms`).

References
----------
D. Wang, E. Shelhamer, S. Liu, B. Olshausen, T. Darrell. Tent: Fully test-time
adaptation by entropy minimization. ICLR 2021.
"""

from __future__ import annotations

import torch

from medseg.adaptation.base import Method
from medseg.adaptation.sfda import weighted_entropy
from medseg.adaptation.source import norm_layers


def norm_affine_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = []
    for _, module in norm_layers(model):
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if isinstance(p, torch.nn.Parameter):
                params.append(p)
    return params


class Tent(Method):
    name = "tent"
    loss_terms = ("entropy",)

    def prepare_model(self, model):
        keep = {id(p) for p in norm_affine_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        return model

    def trainable_parameters(self, model):
        return norm_affine_parameters(model)

    def loss(self, model, iteration, source_batch):
        specs = self.ctx.batch_specs(iteration)
        probs = torch.softmax(model(self.ctx.views(specs)).float(), dim=1)
        ent = weighted_entropy(probs, mask=self.ctx.own_voxels(specs))  # the padding of small scans left out
        return ent, {"entropy": float(ent.detach())}

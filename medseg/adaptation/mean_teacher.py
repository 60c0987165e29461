"""Mean teacher: an EMA of the student supervises it through consistency (Tarvainen & Valpola 2017).

Each step cuts target patches and makes two views of each: the teacher's (intensity
augmentation only) and the student's (another intensity augmentation and random flips).
The student's softmax is un-flipped and compared voxel by voxel with the teacher's
softmax (mean squared error, the paper's choice for classification); the teacher gets
no gradient. The consistency weight ramps up as ``weight * exp(-5 (1 - t/T)^2)``
(their sigmoid-shaped ramp-up). After each optimizer step::

    decay_t = min(decay, 1 - 1 / (t + 1))      (t = 1, 2, ...: the steps taken)
    teacher = decay_t * teacher + (1 - decay_t) * student

for every parameter and every floating-point buffer (BatchNorm running statistics);
integer buffers (``num_batches_tracked``) are copied. Optional terms: cross-entropy on
the teacher's confident argmax (``confidence_weight``) and the supervised loss on
labelled source patches (``source_data``), as in the semi-supervised original.
Both consistency and confident cross-entropy leave out the padding of scans smaller
than the patch (:func:`medseg.adaptation.target.own_voxel_masks`).
The adapted run saves the teacher (the better, smoothed model).

References
----------
A. Tarvainen, H. Valpola. Mean teachers are better role models: weight-averaged
consistency targets improve semi-supervised deep learning results. NeurIPS 2017.
"""

from __future__ import annotations

import math

import torch

from medseg.adaptation.base import Method
from medseg.adaptation.pseudo_label import masked_cross_entropy
from medseg.adaptation.target import masked_mean


def sigmoid_rampup(iteration: int, length: int) -> float:
    """``exp(-5 (1 - t/T)^2)`` for ``t < T``, 1 afterwards (and for ``T = 0``)."""
    if length <= 0:
        return 1.0
    t = min(max(iteration, 0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def ema_decay(steps: int, decay: float) -> float:
    """``min(decay, 1 - 1/(t + 1))`` after the student's ``t``-th step (``t`` from 1, as in
    Tarvainen & Valpola's code, which counts the step before it updates the teacher: the
    first update keeps half of the source model; counting from 0 made it a copy of the
    student, and the source weights were never in the teacher)."""
    return min(decay, 1.0 - 1.0 / (steps + 1))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` for parameters and float buffers."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        else:
            t.copy_(s)


class MeanTeacher(Method):
    name = "mean_teacher"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        mt = ctx.cfg.adapt.mean_teacher
        self.loss_terms = ("consistency",) + (("confident_ce",) if mt.confidence_weight > 0 else ()) \
            + (("source",) if ctx.cfg.source_data else ())
        self.teacher = ctx.build_model()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def loss(self, model, iteration, source_batch):
        mt = self.ctx.cfg.adapt.mean_teacher
        specs = self.ctx.batch_specs(iteration, num_views=2)
        with torch.no_grad():
            # eval mode: a BatchNorm teacher must not update its (EMA) running statistics itself
            self.teacher.eval()
            teacher_probs = torch.softmax(self.teacher(self.ctx.views(specs, 0)).float(), dim=1)
        logits = model(self.ctx.views(specs, 1))
        # undo the student's flips so voxel v of both outputs is the same anatomy
        logits = torch.stack([s.views[1].undo(l) for s, l in zip(specs, logits)])
        probs = torch.softmax(logits.float(), dim=1)
        # the scans' own voxels in the un-flipped frame (None: no patch reaches into a small scan's padding)
        own = self.ctx.own_voxels(specs, view=None)
        squared = ((probs - teacher_probs) ** 2).sum(dim=1)
        consistency = squared.mean() if own is None else masked_mean(squared, own[:, 0], range(squared.ndim))
        w = mt.weight * sigmoid_rampup(iteration, mt.rampup_iterations)
        loss = w * consistency
        terms = {"consistency": float(consistency.detach())}
        if mt.confidence_weight > 0:
            conf, label = teacher_probs.max(dim=1)
            confident = conf >= mt.threshold
            ce = masked_cross_entropy(logits, label, confident if own is None else confident & own[:, 0])
            loss = loss + mt.confidence_weight * ce
            terms["confident_ce"] = float(ce.detach())
        sup, sup_terms = self.supervised_source(model, source_batch)
        if sup is not None:
            loss = loss + sup
            terms.update(sup_terms)
        return loss, terms

    def after_step(self, model, iteration):
        ema_update(self.teacher, model, ema_decay(iteration + 1, self.ctx.cfg.adapt.mean_teacher.decay))

    def model_for_output(self, model):
        return self.teacher

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])

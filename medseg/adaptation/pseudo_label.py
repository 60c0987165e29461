"""Self-training on pseudo-labels with a confidence threshold and a percentile curriculum.

The ``adapt.iterations`` steps are split into ``rounds`` equal rounds. At the start of
round ``r`` the teacher (the source model in round 0, the student at the end of round
``r - 1`` afterwards) predicts every target scan by sliding window; voxel ``v`` gets the
pseudo-label ``argmax_k p_k(v)`` and takes part in the loss when

* ``confidence(v) = max_k p_k(v) >= threshold`` (if a threshold is set), and
* with a curriculum, ``confidence(v)`` is among the top ``curriculum[r]`` fraction of the
  voxels pseudo-labelled with the same class, over all target scans (class-wise
  percentiles, so that the abundant background does not take every place; Curriculum
  Labeling grows the admitted fraction by 20% each round).

The student minimises the cross-entropy over admitted voxels (plus an optional masked
soft Dice), optionally with labelled source patches (``source_data``) through the source
run's own loss. With ``reinitialize_student`` it restarts from the source weights and a
fresh optimizer every round, so errors it learnt in one round are not reinforced in
the next (Cascante-Bonilla et al. restart from scratch, which needs labelled data).

References
----------
P. Cascante-Bonilla, F. Tan, Y. Qi, V. Ordonez. Curriculum Labeling: Revisiting
pseudo-labeling for semi-supervised learning. AAAI 2021.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import numpy as np
import torch

from medseg.adaptation.base import Method
from medseg.adaptation.target import crop, probabilities_with

log = logging.getLogger("medseg.adaptation")


def confidence_mask(
    probs: Sequence[torch.Tensor], threshold: float | None = None, fraction: float | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pseudo-labels and admitted-voxel masks for a list of ``(K, *spatial)`` probability maps.

    ``fraction``: per class, keep the voxels whose confidence is at least the
    ``1 - fraction`` quantile of the confidences of all voxels labelled with that class
    (ties at the cut are kept). Returns ``(labels, masks)``, int64 and bool, ``(*spatial)``.
    """
    labels = [p.argmax(dim=0) for p in probs]
    confs = [p.max(dim=0).values for p in probs]
    masks = [torch.ones_like(c, dtype=torch.bool) for c in confs]
    if threshold is not None:
        masks = [m & (c >= threshold) for m, c in zip(masks, confs)]
    if fraction is not None and fraction < 1:
        k = probs[0].shape[0]
        for cls in range(k):
            values = torch.cat([c[l == cls] for c, l in zip(confs, labels)])
            if values.numel() == 0:
                continue
            cut = float(np.quantile(values.double().numpy(), 1.0 - fraction, method="higher"))
            masks = [m & ((l != cls) | (c >= cut)) for m, c, l in zip(masks, confs, labels)]
    return labels, masks


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over voxels where ``mask`` is true (0 when none is)."""
    ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    m = mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def masked_soft_dice(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - mean over foreground classes of soft Dice`` restricted to admitted voxels."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = torch.nn.functional.one_hot(labels, k).movedim(-1, 1).to(probs.dtype)
    m = mask.unsqueeze(1).to(probs.dtype)
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot * m).sum(dims)
    denom = ((probs + onehot) * m).sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return 1.0 - dice[1:].mean()


def round_of(iteration: int, total: int, rounds: int) -> int:
    """The round that step ``iteration`` (0-based) belongs to: equal shares of ``total``."""
    return min(iteration * rounds // total, rounds - 1)


def round_start(r: int, total: int, rounds: int) -> int:
    return -(-r * total // rounds)  # ceil


class PseudoLabel(Method):
    name = "pseudo_label"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        pl = ctx.cfg.adapt.pseudo_label
        self.loss_terms = ("ce",) + (("dice",) if pl.dice_weight > 0 else ()) + (("source",) if ctx.cfg.source_data else ())
        self.round: int | None = None
        self.teacher_state: dict | None = None  # weights of the current round's teacher
        self.labels: list[torch.Tensor] | None = None
        self.masks: list[torch.Tensor] | None = None
        self.admitted: list[float] = []

    def _make_labels(self) -> None:
        pl = self.ctx.cfg.adapt.pseudo_label
        teacher = self.ctx.build_model()
        teacher.load_state_dict(self.teacher_state)
        probs = [probabilities_with(self.ctx.predictor, teacher, scan) for scan in self.ctx.scans]
        fraction = pl.curriculum[self.round] if pl.curriculum is not None else None
        self.labels, self.masks = confidence_mask(probs, pl.threshold, fraction)
        kept = float(sum(int(m.sum()) for m in self.masks)) / sum(m.numel() for m in self.masks)
        fg = [float(((l > 0) & m).sum()) / max(float(m.sum()), 1.0) for l, m in zip(self.labels, self.masks)]
        log.info("pseudo_label round %d: %.1f%% of target voxels admitted (foreground %.2f%% of them)%s",
                 self.round + 1, 100 * kept, 100 * float(np.mean(fg)),
                 f", curriculum fraction {fraction:g}" if fraction is not None else "")

    def before_step(self, model, iteration):
        pl, total = self.ctx.cfg.adapt.pseudo_label, self.ctx.cfg.adapt.iterations
        r = round_of(iteration, total, pl.rounds)
        if self.round != r or self.teacher_state is None:
            new_round = self.round is None or r != self.round
            if new_round and iteration == round_start(r, total, pl.rounds):
                # the teacher of round r is the student as it ends round r - 1 (the source model for r = 0)
                self.teacher_state = copy.deepcopy(model.state_dict())
                if r > 0 and pl.reinitialize_student:
                    model.load_state_dict(self.ctx.source.state_dict)
                    self.ctx.reset_optimizer()
            self.round = r
            self.labels = None
        if self.labels is None:  # a new round, or resumed mid-round: recompute from the stored teacher
            self._make_labels()

    def loss(self, model, iteration, source_batch):
        pl = self.ctx.cfg.adapt.pseudo_label
        specs = self.ctx.batch_specs(iteration)
        x = self.ctx.views(specs)
        targets, masks = [], []
        for s in specs:
            lab = crop(self.labels[s.case][None], s.start, self.ctx.patch)[0]
            msk = crop(self.masks[s.case][None], s.start, self.ctx.patch)[0]
            targets.append(_flip(lab, s.views[0].flips))  # the view is flipped: so is its target
            masks.append(_flip(msk, s.views[0].flips))
        y = torch.stack(targets).to(self.ctx.device)
        m = torch.stack(masks).to(self.ctx.device)
        logits = model(x)
        ce = masked_cross_entropy(logits, y, m)
        loss, terms = ce, {"ce": float(ce.detach())}
        if pl.dice_weight > 0:
            d = masked_soft_dice(logits, y, m)
            loss = loss + pl.dice_weight * d
            terms["dice"] = float(d.detach())
        sup, sup_terms = self.supervised_source(model, source_batch)
        if sup is not None:
            loss = loss + sup
            terms.update(sup_terms)
        return loss, terms

    def state_dict(self):
        return {"round": self.round, "teacher": self.teacher_state}

    def load_state_dict(self, state):
        self.round = state.get("round")
        self.teacher_state = state.get("teacher")
        self.labels = None


def _flip(spatial: torch.Tensor, flips: tuple[int, ...]) -> torch.Tensor:
    """Flip a ``(*spatial)`` map like the ``(C, *spatial)`` view whose tensor axes are ``flips``."""
    return torch.flip(spatial, [d - 1 for d in flips]) if flips else spatial

"""Self-training on pseudo-labels with a confidence threshold and a percentile curriculum.

The ``adapt.iterations`` steps are split into ``rounds`` equal rounds. At the start of
round ``r`` the teacher (the source model in round 0, the student at the end of round
``r - 1`` afterwards) predicts every target scan by sliding window; voxel ``v`` gets the
pseudo-label ``argmax_k p_k(v)`` and takes part in the loss when

* ``confidence(v) = max_k p_k(v) >= threshold`` (if a threshold is set), and
* with a curriculum, ``confidence(v)`` is among the top ``curriculum[r]`` fraction of the
  voxels pseudo-labelled with the same class, over all target scans (class-wise
  percentiles, so that the abundant background does not take every place; Curriculum
  Labeling grows the admitted fraction by 20% each round). By default
  (``curriculum_classes="foreground"``) the percentiles apply to the foreground classes
  only: the least confident background voxels are the hard negatives around the source
  model's false positives, and dropping them first teaches the student to over-segment.

With ``prior_matching`` (the default, :func:`prior_matched_labels`) the pseudo-labels are
not the argmax: foreground class ``k`` takes the ``prior[k]`` fraction of all target
voxels with the highest ``p_k`` (class-balanced selection as in CBST, Zou et al. 2018,
with the proportions of the class-ratio prior from the source run's
``label_stats.json``), the rest is background above ``threshold`` and ignored below.
Under a shift the source model's calibration breaks (it over-segments noise, or misses
dim structures) while its ranking of voxels largely survives, so the argmax would feed
its size bias back into the student round after round.

With a curriculum, ``class_share_weighting`` weights the admitted voxels per class so
each class keeps its share among the voxels above the threshold
(:func:`class_share_weights`).

The student minimises the cross-entropy over admitted voxels (plus an optional masked
soft Dice), optionally with labelled source patches (``source_data``) through the source
run's own loss. With ``reinitialize_student`` it restarts from the source weights and a
fresh optimizer every round, so errors it learnt in one round are not reinforced in
the next (Cascante-Bonilla et al. restart from scratch, which needs labelled data).

References
----------
P. Cascante-Bonilla, F. Tan, Y. Qi, V. Ordonez. Curriculum Labeling: Revisiting
pseudo-labeling for semi-supervised learning. AAAI 2021.
Y. Zou, Z. Yu, B. V. K. V. Kumar, J. Wang. Unsupervised domain adaptation for semantic
segmentation via class-balanced self-training. ECCV 2018.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import numpy as np
import torch

from medseg.adaptation.base import Method
from medseg.adaptation.target import crop, probabilities_with
from medseg.tensors import channel_argmax

log = logging.getLogger("medseg.adaptation")


def confidence_mask(
    probs: Sequence[torch.Tensor], threshold: float | None = None, fraction: float | None = None,
    classes: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pseudo-labels and admitted-voxel masks for a list of ``(K, *spatial)`` probability maps.

    ``fraction``: per class, keep the voxels whose confidence is at least the
    ``1 - fraction`` quantile of the confidences of all voxels labelled with that class
    (ties at the cut are kept); only for the classes in ``classes`` (default: all), the
    others keep every voxel above ``threshold``. Returns ``(labels, masks)``, int64 and bool, ``(*spatial)``.
    """
    labels = [channel_argmax(p, dim=0) for p in probs]  # torch's CPU argmax over dim 0 is slow
    confs = [p.gather(0, label[None])[0] for p, label in zip(probs, labels)]  # the maximum, as p.max(0)
    masks = [torch.ones_like(c, dtype=torch.bool) for c in confs]
    if threshold is not None:
        masks = [m & (c >= threshold) for m, c in zip(masks, confs)]
    if fraction is not None and fraction < 1:
        k = probs[0].shape[0]
        for cls in (range(k) if classes is None else classes):
            values = torch.cat([c[l == cls] for c, l in zip(confs, labels)])
            if values.numel() == 0:
                continue
            cut = float(np.quantile(values.double().numpy(), 1.0 - fraction, method="higher"))
            masks = [m & ((l != cls) | (c >= cut)) for m, c, l in zip(masks, confs, labels)]
    return labels, masks


def prior_matched_labels(
    probs: Sequence[torch.Tensor], prior: Sequence[float], threshold: float | None = None,
    fraction: float | None = None, classes: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pseudo-labels whose class proportions follow the class-ratio prior, and admitted masks.

    Under a domain shift the argmax of the source model over- or under-segments (its
    confidence *ranking* transfers much better than its calibration), so instead of the
    argmax, foreground class ``k`` takes the ``prior[k]`` fraction of all target voxels
    (pooled over scans) with the highest ``p_k`` — the class-balanced selection of Zou et
    al. (CBST, 2018) with the proportions given by the prior. Every other voxel is
    background when ``p_0 >= threshold`` and *ignored* otherwise (not labelled
    background: it is the uncertain margin). With ``fraction``, only the top ``fraction``
    of the voxels of each class in ``classes`` (by ``p_k``; default: every class) are
    admitted: ``classes`` without 0 keeps background on the threshold alone (its least
    confident voxels are the hard negatives).
    """
    k = probs[0].shape[0]
    labels = [torch.zeros(p.shape[1:], dtype=torch.int64) for p in probs]
    fg_score = [torch.full(p.shape[1:], -1.0, dtype=p.dtype) for p in probs]
    for cls in range(1, k):
        values = torch.cat([p[cls].reshape(-1) for p in probs]).double().numpy()
        count = int(round(float(prior[cls]) * values.size))
        if count <= 0:
            continue
        cut = float(np.sort(values)[-count])
        for lab, score, p in zip(labels, fg_score, probs):
            take = (p[cls] >= cut) & (p[cls] > score)
            lab[take] = cls
            score[take] = p[cls][take]
    if threshold is None:
        masks = [torch.ones_like(lab, dtype=torch.bool) for lab in labels]
    else:
        masks = [(lab > 0) | (p[0] >= threshold) for lab, p in zip(labels, probs)]
    if fraction is not None and fraction < 1:
        for cls in (range(k) if classes is None else classes):
            # background: among the admitted voxels labelled 0 (the others are ignored)
            values = torch.cat([p[cls][(l == cls) & (m if cls == 0 else True)] for p, l, m in zip(probs, labels, masks)])
            if values.numel() == 0:
                continue
            cut = float(np.quantile(values.double().numpy(), 1.0 - fraction, method="higher"))
            masks = [m & ((l != cls) | (p[cls] >= cut)) for m, p, l in zip(masks, probs, labels)]
    return labels, masks


def class_share_weights(labels: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
                        num_classes: int) -> list[float]:
    """Per-class weights ``w_k`` that give each class, over the admitted voxels, the share it has in ``reference``.

    ``w_k = (R_k / R) / (n_k / n)`` with ``R_k`` the voxels pseudo-labelled ``k`` among the
    ``reference`` voxels (those above the confidence threshold, or all) and ``n_k`` those
    admitted by the curriculum; 1 for a class with no admitted voxel. A class-wise
    curriculum (the same top fraction of every class) keeps the rare class's share of the
    *predicted* map, but drops the least confident background — the hard negatives next
    to the structure — first; weighting by class share keeps the loss' class balance that
    of the confident pseudo-labels, so the student is not pushed towards the rare class.
    """
    ref = torch.zeros(num_classes, dtype=torch.float64)
    adm = torch.zeros(num_classes, dtype=torch.float64)
    for lab, m, r in zip(labels, masks, reference):
        ref += torch.bincount(lab[r].reshape(-1), minlength=num_classes)[:num_classes].double()
        adm += torch.bincount(lab[m].reshape(-1), minlength=num_classes)[:num_classes].double()
    if float(adm.sum()) == 0 or float(ref.sum()) == 0:
        return [1.0] * num_classes
    w = (ref / ref.sum()) / (adm / adm.sum()).clamp_min(1e-12)
    return [float(v) if a > 0 else 1.0 for v, a in zip(w, adm)]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         class_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean cross-entropy over voxels where ``mask`` is true (0 when none is).

    With ``class_weights``, voxel ``v`` counts ``w[label(v)]`` times (normalised by the
    total weight of the admitted voxels).
    """
    ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    m = mask.to(ce.dtype)
    if class_weights is not None:
        m = m * torch.as_tensor(class_weights, dtype=ce.dtype, device=ce.device)[labels]
    return (ce * m).sum() / m.sum().clamp_min(1e-12 if class_weights is not None else 1.0)


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
        self.class_weights: list[float] | None = None
        self.prior: list[float] | None = None
        if pl.prior_matching:
            self.prior = pl.prior
            if self.prior is None:
                from medseg.adaptation.source import LABEL_STATS, class_prior

                stats = ctx.source.label_stats()
                if stats is None:
                    log.warning("pseudo_label: the source run has no %s; argmax pseudo-labels (set "
                                "adapt.pseudo_label.prior for prior-matched ones)", LABEL_STATS)
                else:
                    labels = {str(n): int(v) for n, v in ctx.source.payload["dataset"]["labels"].items()}
                    self.prior = class_prior(stats, labels, ctx.num_classes, LABEL_STATS)
            if self.prior is not None and len(self.prior) != ctx.num_classes:
                from medseg.errors import ConfigError

                raise ConfigError(f"adapt.pseudo_label.prior: {len(self.prior)} ratios given, the source model has "
                                  f"{ctx.num_classes} classes (incl. background)")

    def _make_labels(self) -> None:
        pl = self.ctx.cfg.adapt.pseudo_label
        teacher = self.ctx.build_model()
        teacher.load_state_dict(self.teacher_state)
        probs = [probabilities_with(self.ctx.predictor, teacher, scan) for scan in self.ctx.scans]
        fraction = pl.curriculum[self.round] if pl.curriculum is not None else None
        classes = list(range(1, probs[0].shape[0])) if pl.curriculum_classes == "foreground" else None
        # the scans' own voxels: the padding of a scan smaller than the patch is never
        # labelled, ranked or counted (it is 0 after normalisation, which a CT model reads
        # as vessel: in the argmax mode it took most of the foreground quantile, and the
        # admitted share was of the padded grid)
        from medseg.adaptation.sfda import _unpadded
        from medseg.adaptation.target import pad_to

        full = [tuple(p.shape[1:]) for p in probs]
        probs = [_unpadded(p, scan) for p, scan in zip(probs, self.ctx.scans)]
        if self.prior is not None:
            labels, masks = prior_matched_labels(probs, self.prior, pl.threshold, fraction, classes)
        else:
            labels, masks = confidence_mask(probs, pl.threshold, fraction, classes)
        self.class_weights = None
        if pl.class_share_weighting and fraction is not None and fraction < 1:
            if self.prior is not None:
                _, reference = prior_matched_labels(probs, self.prior, pl.threshold, None)
            else:
                _, reference = confidence_mask(probs, pl.threshold, None)
            self.class_weights = class_share_weights(labels, masks, reference, probs[0].shape[0])
            log.info("pseudo_label round %d: class weights %s", self.round + 1,
                     ", ".join(f"{w:.3g}" for w in self.class_weights))
        kept = float(sum(int(m.sum()) for m in masks)) / sum(m.numel() for m in masks)
        fg = [float(((l > 0) & m).sum()) / max(float(m.sum()), 1.0) for l, m in zip(labels, masks)]
        self.labels = [pad_to(l[None], f, 0)[0] for l, f in zip(labels, full)]
        self.masks = [pad_to(m[None].to(torch.uint8), f, 0)[0].bool() for m, f in zip(masks, full)]
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
        ce = masked_cross_entropy(logits, y, m, self.class_weights)
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

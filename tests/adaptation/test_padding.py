"""The padding of target scans smaller than the patch is no part of any adaptation term.

Such a scan is padded up to the patch (``target.pad_to``; with zeros until 2026-12-06,
which after normalisation a source model reads as some tissue, now by repeating its
border). Tent's entropy, the mean teacher's consistency and SFDA's entropy and class
ratios used to average over the padding; the tests pad with constants of their own.
"""

from __future__ import annotations

import math

import pytest
import torch

from medseg.adaptation import validate_adapt_config
from medseg.adaptation.base import AdaptContext
from medseg.adaptation.mean_teacher import MeanTeacher
from medseg.adaptation.sfda import SFDA, class_ratio_kl, weighted_entropy
from medseg.adaptation.target import PatchSpec, TargetScan, View, own_voxel_masks, pad_to
from medseg.adaptation.tent import Tent

from adapt_helpers import adapt_raw

PATCH = [8, 8]


def _scan(own: tuple[int, int], padding_value: float = 0.0, seed: int = 0) -> TargetScan:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, *own), generator=g)
    padded = pad_to(image, PATCH, padding_value)
    return TargetScan(f"s{seed}", None, {}, {"image": image}, padded)


def test_masks_mark_the_scans_own_voxels_and_follow_the_views_flips():
    scans = [_scan((5, 6)), _scan((8, 8), seed=1)]
    specs = [PatchSpec(0, (0, 0), (View(),)), PatchSpec(0, (0, 0), (View((1,)),)), PatchSpec(1, (0, 0), (View(),))]
    masks = own_voxel_masks(specs, scans, PATCH, view=0, device=torch.device("cpu"))
    expected = torch.zeros(PATCH, dtype=torch.bool)
    expected[:5, :6] = True
    assert masks.shape == (3, 1, 8, 8) and masks.dtype == torch.bool
    assert torch.equal(masks[0, 0], expected)
    assert torch.equal(masks[1, 0], torch.flip(expected, [0]))  # tensor axis 1 of (C, H, W) is H
    assert bool(masks[2].all())
    unflipped = own_voxel_masks(specs, scans, PATCH, view=None, device=torch.device("cpu"))
    assert torch.equal(unflipped[1, 0], expected)
    # no sample reaches into padding: no mask, the terms stay plain means
    assert own_voxel_masks(specs[2:], scans, PATCH, view=0, device=torch.device("cpu")) is None


def test_masked_terms_equal_the_terms_of_the_own_voxels():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn((2, 3, 8, 8), generator=g), dim=1)
    mask = torch.zeros((2, 1, 8, 8), dtype=torch.bool)
    mask[0, :, :5, :6] = True
    mask[1] = True
    own = probs[0:1, :, :5, :6]
    weights = [0.1, 0.6, 0.3]
    assert float(weighted_entropy(probs[:1], weights, mask[:1])) == pytest.approx(float(weighted_entropy(own, weights)),
                                                                                rel=1e-6)
    prior = [0.7, 0.2, 0.1]
    per_sample = (float(class_ratio_kl(own, prior)) + float(class_ratio_kl(probs[1:], prior))) / 2
    assert float(class_ratio_kl(probs, prior, mask=mask)) == pytest.approx(per_sample, rel=1e-6)
    pooled = torch.cat([own.reshape(3, -1), probs[1].reshape(3, -1)], dim=1).mean(dim=1)
    expected = float((pooled * (pooled / torch.tensor(prior)).log()).sum())
    assert float(class_ratio_kl(probs, prior, scope="batch", mask=mask)) == pytest.approx(expected, rel=1e-6)


class _VoxelwisePredictor:
    """What the methods use of medseg's Predictor: softmax maps of a whole (padded) scan."""

    def __init__(self, model):
        self.model = model

    def probabilities(self, image, tta=False):
        return torch.softmax(self.model(image[None]), dim=1)[0]


def _context(source_run, target_dataset, tmp_path, method, padding_value, **adapt):
    cfg = validate_adapt_config(adapt_raw(source_run, target_dataset, tmp_path / "a", method, patch_size=PATCH,
                                          flip_prob=0.5, intensity_prob=0.5, **adapt))
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 1)  # voxel-wise: the padding's output depends on the padding alone

    def fresh():
        copy = torch.nn.Conv2d(1, 2, 1)
        copy.load_state_dict(model.state_dict())
        return copy

    scans = [_scan((5, 6), padding_value, seed=0), _scan((6, 5), padding_value, seed=1)]
    ctx = AdaptContext(cfg, None, _VoxelwisePredictor(model), scans, PATCH, 2, torch.device("cpu"), fresh)
    return ctx, model


@pytest.mark.parametrize("method, extra", [
    ("tent", {}),
    ("mean_teacher", {"mean_teacher": {"confidence_weight": 1.0, "threshold": 0.5}}),
    ("sfda", {"sfda": {"ratio_scope": "sample", "prior": [0.8, 0.2]}}),
    ("sfda", {"sfda": {"ratio_scope": "batch", "prior": [0.8, 0.2]}}),
    ("sfda", {"sfda": {"ratio_scope": "scan", "prior": [0.8, 0.2]}}),
])
def test_no_adaptation_term_depends_on_what_the_padding_holds(method, extra, source_run, target_dataset, tmp_path):
    values = []
    for padding_value in (0.0, 7.0):
        ctx, model = _context(source_run, target_dataset, tmp_path, method, padding_value, **extra)
        if method == "tent":
            m = Tent(ctx)
        elif method == "mean_teacher":
            m = MeanTeacher(ctx)
        else:
            m = SFDA(ctx, [0.8, 0.2])
        step = []
        for iteration in range(3):
            m.before_step(model, iteration)
            loss, terms = m.loss(model, iteration, None)
            assert math.isfinite(float(loss.detach()))
            step.append((float(loss.detach()), terms))
        values.append(step)
    for (loss_a, terms_a), (loss_b, terms_b) in zip(*values):
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7)
        assert terms_a == pytest.approx(terms_b, rel=1e-5, abs=1e-7)

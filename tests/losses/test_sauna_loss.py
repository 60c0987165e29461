import math

import numpy as np
import pytest
import torch

from medseg.data.topology_targets import SaunaTarget, sauna_target
from medseg.losses.sauna import SaunaLoss, focal_l1, hypercube_jaccard


def test_focal_l1_hand_computed():
    p = torch.tensor([[[0.5, -0.5]]])
    g = torch.tensor([[[1.0, 1.0]]])
    # agreeing voxel: w = 2·0.5 -> 0.5; disagreeing: w = 1 -> 1.5; mean 1.0
    assert math.isclose(float(focal_l1(p, g)), 1.0, rel_tol=1e-6)


def test_hypercube_jaccard_hand_computed():
    p = torch.tensor([[[0.5, -0.5]]])
    g = torch.tensor([[[1.0, -1.0]]])
    # fg: I = 1.5 - 0.5 = 1, U = 2; bg the same -> 1 - 2/4
    assert math.isclose(float(hypercube_jaccard(p, g)), 0.5, rel_tol=1e-6)
    assert float(hypercube_jaccard(g, g)) == pytest.approx(0.0, abs=1e-6)


def test_loss_hand_computed_through_tanh():
    target_map = torch.tensor([[[[1.0, -1.0]]]])
    logits = torch.atanh(torch.tensor([[[[0.5, -0.5]]]]))
    labels = torch.tensor([[[[1, 0]]]])
    # focal: both agree, w = 2·0.5, w·|d| = 0.5 each -> 0.5; Jaccard 0.5; total 1.0
    value = SaunaLoss()(logits, labels, sauna_target=target_map)
    assert math.isclose(float(value), 1.0, rel_tol=1e-5)


def test_on_the_fly_target_equals_pipeline_target():
    label = np.zeros((1, 12, 12), np.int64)
    label[0, 3:8, 2:10] = 1
    label[0, 10, :] = 1
    logits = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    precomputed = torch.as_tensor(SaunaTarget()(label))[None]
    assert torch.allclose(precomputed[0, 0], torch.from_numpy(sauna_target(label[0] > 0)))
    loss = SaunaLoss()
    labels = torch.from_numpy(label)[None]
    assert torch.allclose(loss(logits, labels), loss(logits, labels, sauna_target=precomputed))


def test_multiclass_channels_and_background_switch():
    labels = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    labels[..., 2:5, :] = 1
    labels[..., 6:9, :] = 2
    logits = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    with_bg = SaunaLoss()(logits, labels)
    without = SaunaLoss(include_background=False)(logits, labels)
    assert torch.isfinite(with_bg) and not torch.allclose(with_bg, without)
    # a perfect regression of every channel scores (almost) zero
    target = SaunaLoss().targets_from_labels(labels, 3).clamp(-0.999, 0.999)
    assert float(SaunaLoss()(torch.atanh(target), labels, sauna_target=target)) < 1e-3


def test_spacing_reaches_the_on_the_fly_target():
    labels = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    labels[..., 2:5, 1:11] = 1
    labels[..., 6:11, 4:7] = 1
    logits = torch.zeros(1, 1, 12, 12)
    iso = SaunaLoss()(logits, labels)
    aniso = SaunaLoss(spacing=(1.0, 3.0))(logits, labels)
    assert not torch.allclose(iso, aniso)


def test_shape_mismatch_and_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SaunaLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), sauna_target=torch.zeros(1, 1, 4, 4))
    for kwargs in ({"alpha": 0}, {"beta": -1}, {"jaccard_weight": -1}, {"inside_window": 0}):
        with pytest.raises(ValueError):
            SaunaLoss(**kwargs)

import math

import pytest
import torch

from medseg.data.topology_targets import LabelProjectiond
from medseg.errors import ConfigError
from medseg.losses.dice import DiceCELoss
from medseg.losses.mip import MIPLoss, focal_tversky


def test_focal_tversky_hand_computed():
    p = torch.tensor([[0.5, 0.5]])
    g = torch.tensor([[1.0, 0.0]])
    # TP 0.5, FN 0.5, FP 0.5: TI = 0.5 / (0.5 + 0.7·0.5 + 0.3·0.5) = 0.5; L = 0.5^0.75
    assert math.isclose(float(focal_tversky(p, g, smooth=0.0)), 0.5**0.75, rel_tol=1e-6)
    # α weighs false negatives: missing foreground costs more than a false positive
    miss = focal_tversky(torch.tensor([[0.0, 0.0]]), g, smooth=0.0)
    extra = focal_tversky(torch.tensor([[1.0, 1.0]]), g, smooth=0.0)
    assert miss > extra


def _rod_along_z():
    """Anisotropic volume (X=4, Y=6, Z=8) with a vessel along z at (x=1, y=2)."""
    label = torch.zeros(1, 1, 4, 6, 8, dtype=torch.long)
    label[0, 0, 1, 2, :] = 1
    return label


def test_projection_axis_is_the_named_axis():
    label = _rod_along_z()
    half = label.float().clone()
    half[..., 4:] = 0  # the vessel only over half of z: same z-projection, shorter x-projection
    z_only = MIPLoss(axes="z", segmentation_weight=0, mip_weight=1, sigmoid=False, smooth=0)
    assert float(z_only(half, label)) < 1e-3  # projection along z is the dot at (1, 2) for both
    x_only = MIPLoss(axes=0, segmentation_weight=0, mip_weight=1, sigmoid=False, smooth=0)
    # along x: the label projects to a full line on (y=2, z), the prediction to half of it;
    # TP 4, FN 4: TI = 4 / (4 + 0.7·4) = 1/1.7
    assert float(x_only(half, label)) == pytest.approx((1 - 1 / 1.7) ** 0.75, rel=1e-5)
    assert torch.equal(MIPLoss(axes=-1, sigmoid=False).foreground(half).amax(dim=-1), half.amax(dim=-1))
    # The reference permutes the prediction (last axis to the front) before projecting along
    # the last axis: that projection is not the label's z-projection, not even its shape.
    permuted = torch.movedim(half, -1, -3).amax(dim=-1)
    assert permuted.shape[2:] != label.amax(dim=-1).shape[2:]


def test_multi_axis_sums():
    label = _rod_along_z()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 4, 6, 8, generator=g)
    single = [MIPLoss(axes=a, segmentation_weight=0, mip_weight=1)(logits, label) for a in (0, 1, 2)]
    multi = MIPLoss(axes=("x", "y", "z"), segmentation_weight=0, mip_weight=1)(logits, label)
    assert torch.allclose(multi, sum(single))


def test_default_is_point7_segmentation_plus_point3_mip():
    label = _rod_along_z()
    logits = torch.randn(1, 1, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    total = MIPLoss()(logits, label)
    mip = MIPLoss(segmentation_weight=0, mip_weight=1)(logits, label)
    seg = DiceCELoss()(logits, label)
    assert torch.allclose(total, 0.7 * seg + 0.3 * mip)


def _two_rods() -> torch.Tensor:
    """(1, 1, 4, 6, 8) label map: an artery (1) and a vein (2), two rods along z."""
    label = torch.zeros(1, 1, 4, 6, 8, dtype=torch.long)
    label[0, 0, 1, 1] = 1
    label[0, 0, 2, 4] = 2
    return label


def _confident(label: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return 8.0 * torch.nn.functional.one_hot(label[:, 0], classes).movedim(-1, 1).float()


def test_multiclass_classes_are_projected_one_by_one():
    # an "any foreground" projection scored a swap of artery and vein, or an artery broken
    # by a stretch predicted as vein, as perfect
    label = _two_rods()
    swapped = torch.where(label > 0, 3 - label, label)
    broken = label.clone()
    broken[0, 0, 1, 1, 3:5] = 2
    for segmentation in ("dice_ce", "focal_tversky"):
        loss = MIPLoss(axes=("x", "y", "z"), segmentation=segmentation, segmentation_weight=0.7, mip_weight=0.3)
        perfect = float(loss(_confident(label), label))
        assert float(loss(_confident(swapped), label)) > perfect + 0.1
        assert float(loss(_confident(broken), label)) > perfect
    mip_only = MIPLoss(axes=("x", "y", "z"), segmentation_weight=0, mip_weight=1)
    perfect = float(mip_only(_confident(label), label))
    assert float(mip_only(_confident(broken), label)) > perfect + 0.01  # the artery's z-projection lost voxels


def test_multiclass_term_is_the_mean_of_each_class_alone():
    label = _two_rods()
    logits = torch.randn(1, 3, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, 1)
    loss = MIPLoss(axes=("y", "z"), segmentation="focal_tversky", segmentation_weight=0.5, mip_weight=1.0)
    expected = 0.0
    for k in (1, 2):
        p, g = probs[:, k : k + 1], (label == k).float()
        mip = sum(focal_tversky(p.amax(dim=a + 2), g.amax(dim=a + 2)) for a in (1, 2))
        expected = expected + (mip + 0.5 * focal_tversky(p, g)) / 2
    assert torch.allclose(loss(logits, label), expected.mean())
    one_hot = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1)
    assert torch.allclose(loss(logits, one_hot), expected.mean())
    binary = MIPLoss(segmentation="focal_tversky")
    two = torch.randn(1, 2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    rod = (label == 1).long()
    p1, g1 = torch.softmax(two, 1)[:, 1:], rod.float()  # two classes: as before, 1 - p_0 = p_1
    assert torch.allclose(binary(two, rod), 0.7 * focal_tversky(p1, g1) + 0.3 * focal_tversky(p1.amax(-1), g1.amax(-1)))


def test_volume_projection_takes_one_foreground_class():
    loss = MIPLoss(target_projection="volume")
    loss.check_channels(2)
    with pytest.raises(ValueError, match="one foreground class"):
        loss.check_channels(3)
    MIPLoss().check_channels(5)  # each class projected on its own


def test_volume_projection_from_the_batch():
    volume = torch.zeros(1, 4, 6, 12, dtype=torch.long)
    volume[0, 1, 2, 9:] = 1  # vessel outside the patch along z (patch is z < 8)
    data = LabelProjectiond(axes=(-1,))({"label": volume})
    patch_label = volume[None, :, :, :, :8]
    label_mip = torch.as_tensor(data["label_mip"])[None, :, :, :, :8]  # the crop cuts both
    assert label_mip.shape == (1, 1, 4, 6, 8) and label_mip[0, 0, 1, 2].all()
    logits = torch.full((1, 1, 4, 6, 8), -5.0)
    logits[0, 0, 1, 2, 0] = 5.0  # predicts the vessel's projection
    volume_loss = MIPLoss(segmentation_weight=0, mip_weight=1, smooth=0, target_projection="volume")
    patch_loss = MIPLoss(segmentation_weight=0, mip_weight=1, smooth=0)
    assert float(volume_loss(logits, patch_label, label_mip=label_mip)) < 0.15
    # the patch alone has no vessel: TP = 0, so TI = 0 and the loss is 1
    assert float(patch_loss(logits, patch_label)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="label_mip"):
        volume_loss(logits, patch_label)


def test_saturated_prediction_on_empty_patch_has_finite_gradient():
    logits = torch.full((1, 1, 4, 6, 8), -100.0, requires_grad=True)
    label = torch.zeros(1, 1, 4, 6, 8, dtype=torch.long)
    loss = MIPLoss(axes=("x", "y", "z"), segmentation="focal_tversky")(logits, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bad_arguments():
    for kwargs in ({"axes": []}, {"axes": "w"}, {"segmentation": "bce"}, {"target_projection": "slab"}, {"mip_weight": -1}):
        with pytest.raises(ValueError):
            MIPLoss(**kwargs)
    with pytest.raises(ValueError, match="does not exist"):
        MIPLoss(axes="z")(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))

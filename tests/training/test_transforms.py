"""Preprocessing and augmentation pipelines: patch shapes, normalisation, exact inverse.

Training patches come from the preprocessing cache (``medseg.training.sampling``); the
patch tests write the case into a temporary cache folder first.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medseg.config import validate_config
from medseg.data.dataset import DatasetInfo, check_dataset, load_case
from medseg.data.io import ImageGeometry
from medseg.data.transforms import build_transforms, channel_schemes, fit_preprocessing, patch_augmentations
from medseg.errors import ConfigError
from medseg.preprocessing.case import preprocess_loaded
from medseg.preprocessing.storage import CachedCase, write_case
from medseg.training.sampling import PatchSource


def _cfg(patch, **data):
    return validate_config(
        {"data": {"dataset": "ds", "patch_size": patch, **data}, "train": {"iterations": 1}, "output_dir": "run", "seed": 3}
    )


def _info(channels=("CT",), labels=("background", "vessel")):
    return DatasetInfo(
        root=".", name="t", channel_names=dict(enumerate(channels)), labels={n: i for i, n in enumerate(labels)},
        file_ending=".nii.gz", num_training=1,
    )


def _oblique_case(shape=(40, 30, 20), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    a = 0.3
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
    geom = ImageGeometry.from_spacing(shape, (0.8, 1.3, 2.0), origin=(10.0, -5.0, 3.0), direction=rot)
    image = (rng.normal(size=(channels, *shape)) * 100 + 40).astype(np.float32)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[0, 10:20, 5:15, 4:12] = 1
    return {"name": "case", "image": image, "label": label, "geometry": geom}


def test_ct_statistics_follow_nnunet():
    case = _oblique_case()
    cfg = _cfg([16, 16, 16])
    prep = fit_preprocessing([case], _info(), cfg)
    (ch,) = prep["channels"]
    fg = case["image"][0][case["label"][0] > 0].astype(np.float64)
    assert ch["scheme"] == "ct"
    np.testing.assert_allclose(ch["clip"], np.percentile(fg, [0.5, 99.5]), rtol=1e-5)
    assert ch["mean"] == pytest.approx(fg.mean(), rel=1e-5) and ch["std"] == pytest.approx(fg.std(), rel=1e-5)
    # fixed clip overrides the percentiles; the result is JSON/weights_only safe
    prep2 = fit_preprocessing([case], _info(), _cfg([16, 16, 16], normalization={"ct_clip": [-100, 200]}))
    assert prep2["channels"][0]["clip"] == [-100.0, 200.0]
    import json

    json.dumps(prep)


def test_channel_schemes_by_name_and_override():
    info = _info(channels=("ct", "T2", "ADC"))
    assert channel_schemes(info, _cfg([16, 16, 16])) == ["ct", "zscore", "zscore"]
    assert channel_schemes(info, _cfg([16, 16, 16], normalization={"scheme": "none"})) == ["none"] * 3


def test_nnunets_channel_names_choose_their_normalisation():
    """A channel named noNorm (or rescale_to_0_1, rgb_to_0_1) was z-scored like any other:
    nnU-Net v2 leaves the first untouched and maps the others to [0, 1]."""
    case = _oblique_case(channels=4)
    case["image"] = np.stack([np.asarray(case["image"][0]) * 40 + 100] * 4)  # values of 0..255-ish
    info = _info(channels=("noNorm", "rescale_to_0_1", "RGB_to_0_1", "T2"))
    cfg = _cfg([16, 16, 16], orientation=None)
    assert channel_schemes(info, cfg) == ["none", "rescale_to_0_1", "rgb_to_0_1", "zscore"]
    prep = fit_preprocessing([case], info, cfg)
    raw = torch.as_tensor(np.asarray(case["image"][0]), dtype=torch.float32)
    out = build_transforms(cfg, info, prep, "val")(copy.deepcopy(case))["image"].as_tensor()
    assert torch.allclose(out[0], raw)
    assert torch.allclose(out[1], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert torch.allclose(out[2], raw / 255, atol=1e-6)
    assert abs(float(out[3].mean())) < 1e-4


def test_a_ct_clip_without_a_ct_channel_is_said_to_have_no_effect():
    from medseg.data.dataset import DatasetWarning

    with pytest.warns(DatasetWarning, match=r"ct_clip is set, but no channel uses the ct scheme \(channels T1, T2\)"):
        fit_preprocessing([_oblique_case(channels=2)], _info(channels=("T1", "T2")),
                          _cfg([16, 16, 16], normalization={"ct_clip": [-100, 100]}))


def test_zscore_is_per_image():
    case = _oblique_case(channels=2)
    info = _info(channels=("T1", "T2"))
    cfg = _cfg([16, 16, 16], orientation=None)
    prep = fit_preprocessing([case], info, cfg)
    out = build_transforms(cfg, info, prep, "val")(copy.deepcopy(case))
    image = out["image"].as_tensor()
    assert torch.allclose(image.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(image.std(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)


def _patch_source(folder, case, cfg, info, prep):
    meta = write_case(folder, preprocess_loaded(copy.deepcopy(case), info, cfg, prep), key="test")
    return PatchSource([CachedCase(folder, meta)], cfg, info)


@pytest.mark.parametrize("dims", [2, 3])
def test_train_patches_have_patch_shape(dims, tmp_path):
    shape = (40, 30, 20)[:dims] if dims == 3 else (50, 12)  # an axis smaller than the patch gets padded
    rng = np.random.default_rng(1)
    case = {
        "name": "c",
        "image": rng.normal(size=(1, *shape)).astype(np.float32),
        "label": (rng.random((1, *shape)) > 0.9).astype(np.uint8),
        "geometry": ImageGeometry.from_spacing(shape, (1.0,) * dims),
    }
    patch = [24] * dims
    aug = {"affine_prob": 1.0, "rotate90_prob": 0.5, "gaussian_smooth_prob": 1.0, "gamma_prob": 1.0}
    cfg = _cfg(patch, target_spacing=[1.2] * dims, augmentation=aug)
    prep = fit_preprocessing([case], _info(), cfg)
    source = _patch_source(tmp_path, case, cfg, _info(), prep)
    for seed in range(3):
        out = source.make(0, seed)
        assert tuple(out["image"].shape) == (1, *patch)
        assert tuple(out["label"].shape) == (1, *patch)
        assert out["label"].dtype == torch.int64
        assert set(torch.unique(out["label"]).tolist()) <= {0, 1}
        assert "geometry" not in out and "label_fg_indices" not in out


def test_train_pipeline_is_reproducible_by_seed(tmp_path):
    case = _oblique_case()
    cfg = _cfg([16, 16, 16], augmentation={"affine_prob": 0.5, "gaussian_noise_prob": 0.5})
    prep = fit_preprocessing([case], _info(), cfg)
    runs = [_patch_source(tmp_path, case, cfg, _info(), prep).make(0, 42)["image"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], _patch_source(tmp_path, case, cfg, _info(), prep).make(0, 43)["image"])


def test_infer_is_invertible_to_the_original_grid():
    case = _oblique_case()
    cfg = _cfg([16, 16, 16], target_spacing=[1.0, 1.0, 1.0])
    prep = fit_preprocessing([case], _info(), cfg)
    tf = build_transforms(cfg, _info(), prep, "infer")
    data = {"name": "case", "image": case["image"], "geometry": case["geometry"]}
    out = tf(data)
    assert tuple(out["image"].shape[1:]) != case["geometry"].shape  # it was resampled and reoriented
    # what the predictor does: a prediction on the preprocessed grid, mapped back with Invertd
    out["pred"] = MetaTensor(torch.rand(2, *out["image"].shape[1:]))
    back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert tuple(back.shape) == (2, *case["geometry"].shape)
    np.testing.assert_allclose(back.affine.numpy(), case["geometry"].affine, atol=1e-6)
    # and the image itself comes back exactly (nearest-free resampling of an identity grid)
    img = tf.inverse(copy.deepcopy(out))["image"]
    np.testing.assert_allclose(img.affine.numpy(), case["geometry"].affine, atol=1e-6)


def test_infer_without_resampling_restores_values_exactly():
    case = _oblique_case()
    cfg = _cfg([16, 16, 16], normalization={"scheme": "none"})  # RAS reorientation only
    prep = fit_preprocessing([case], _info(), cfg)
    tf = build_transforms(cfg, _info(), prep, "infer")
    out = tf({"name": "case", "image": case["image"], "geometry": case["geometry"]})
    back = tf.inverse(out)["image"]
    np.testing.assert_array_equal(back.as_tensor().numpy(), case["image"])


def test_pipelines_on_a_dataset_fixture(synthetic_dataset_2d, tmp_path):
    info, cases = check_dataset(synthetic_dataset_2d)
    loaded = load_case(cases[0], info)
    cfg = _cfg([32, 32])
    prep = fit_preprocessing(cases[:2], info, cfg)  # Case objects are loaded
    patch = _patch_source(tmp_path, loaded, cfg, info, prep).make(0, 0)
    assert tuple(patch["image"].shape) == (1, 32, 32)
    whole = build_transforms(cfg, info, prep, "val")(dict(loaded))
    assert tuple(whole["image"].shape[1:]) == loaded["geometry"].shape


def test_inconsistent_settings_are_config_errors():
    case = _oblique_case()
    prep = fit_preprocessing([case], _info(), _cfg([16, 16, 16]))
    with pytest.raises(ConfigError, match=r"data\.target_spacing"):
        build_transforms(_cfg([16, 16, 16], target_spacing=[1.0, 1.0]), _info(), prep, "val")
    with pytest.raises(ConfigError, match=r"rotate90_prob"):
        patch_augmentations(_cfg([16, 24, 16], augmentation={"rotate90_prob": 0.5}), _info(), ["label"])
    with pytest.raises(ConfigError, match="preprocessing"):
        build_transforms(_cfg([16, 16, 16]), _info(channels=("CT", "MR")), prep, "val")


def test_gamma_bends_each_channel_in_its_own_range():
    """MONAI's gamma takes one min and range over all channels: a 0-1000 channel beside a
    z-scored one set the range the z-scored channel was bent in."""
    from monai.transforms import RandAdjustContrastd

    from medseg.data.transforms import ChannelwiseAdjustContrastd

    g = torch.Generator().manual_seed(0)
    zscored = torch.randn((1, 16, 16, 8), generator=g)
    raw = 1000 * torch.rand((1, 16, 16, 8), generator=g)
    gamma = ChannelwiseAdjustContrastd(keys="image", prob=1.0, gamma=(0.7, 1.5))
    for seed in range(5):
        gamma.set_random_state(seed)
        both = gamma({"image": torch.cat([zscored, raw])})["image"]
        for channel, original in ((0, zscored), (1, raw)):  # each keeps its own range
            assert float(both[channel].min()) == pytest.approx(float(original.min()), abs=1e-4)
            assert float(both[channel].max()) == pytest.approx(float(original.max()), rel=1e-5)
        assert float(both[0].std()) < 1.5 * float(zscored.std())
    # one channel: the same draws and values as MONAI's own transform
    monai_gamma = RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5))
    ours = ChannelwiseAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5))
    for seed in range(6):
        monai_gamma.set_random_state(seed)
        ours.set_random_state(seed)
        assert torch.equal(monai_gamma({"image": zscored})["image"], ours({"image": zscored})["image"])

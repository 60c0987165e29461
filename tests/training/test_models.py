"""build_model: the four MONAI networks in 2D and 3D, defaults, and ConfigErrors."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models import build_model, dynunet_plan, model_defaults

torch.set_num_threads(2)

# Tiny versions of each network: same code paths as the defaults, a fraction of the cost.
TINY = {
    "unet": ({"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, 16),
    "dynunet": ({"filters": [4, 8, 16, 32]}, 16),
    "unetr": ({"hidden_size": 24, "mlp_dim": 48, "num_heads": 2, "feature_size": 4}, 32),
    "swinunetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}, 64),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_forward_shape(name, dims):
    params, size = TINY[name]
    if name == "swinunetr" and dims == 3:  # batch norm lets a 32^3 patch (1-voxel bottleneck) run in eval
        params, size = {**params, "norm_name": "batch"}, 32
    patch = [size] * dims
    model = build_model(ModelConfig(name=name, params=params), dims, in_channels=2, out_channels=3, patch_size=patch)
    model.eval() if (name == "swinunetr" and dims == 3) else model.train()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *patch))
    assert out.shape == (1, 3, *patch)


def test_unet_defaults_are_the_documented_ones():
    d = model_defaults("unet", 3, [64, 64, 64])
    assert d == {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2, "norm": "INSTANCE"}
    model = build_model(ModelConfig(name="unet"), 3, 1, 2, [64, 64, 64])
    assert model.channels == (16, 32, 64, 128)


def test_unet_strides_follow_channels_when_omitted():
    model = build_model(ModelConfig(name="unet", params={"channels": [4, 8]}), 2, 1, 2, [8, 8])
    assert tuple(model.strides) == (2,)


def test_dynunet_plan_follows_patch_size():
    kernels, strides = dynunet_plan([64, 64, 16])
    assert strides[0] == [1, 1, 1]
    assert strides[1] == strides[2] == [2, 2, 2] and strides[3] == [2, 2, 1]
    # bottleneck keeps at least 4 voxels on every axis
    sizes = [64, 64, 16]
    for s in strides:
        sizes = [a // b for a, b in zip(sizes, s)]
    assert min(sizes) >= 4 and len(kernels) == len(strides)
    model = build_model(ModelConfig(name="dynunet", params={"filters": [2, 4, 8, 16, 32]}), 3, 1, 2, [64, 64, 16])
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 64, 64, 16)).shape == (1, 2, 64, 64, 16)


@pytest.mark.parametrize(
    "name, params, key",
    [
        ("unet", {"chanels": [4, 8]}, "model.params.chanels"),
        ("unet", {"in_channels": 3}, "model.params.in_channels"),
        ("unet", {"channels": [4, 8, 16], "strides": [2]}, "model.params.strides"),
        ("unetr", {"hidden_size": 30, "num_heads": 4}, "model.params.(hidden_size|num_heads)"),
        ("unetr", {"img_size": [96, 96, 96]}, "model.params.img_size"),
        ("swinunetr", {"feature_size": 13}, "model.params.feature_size"),
        ("swinunetr", {"img_size": [64, 64, 64]}, "model.params.img_size"),
        # MONAI's message names no key: the one whose default builds the network is named
        ("unet", {"channels": [4, 8], "strides": [2], "norm": "FOO"}, "model.params.norm:"),
        ("unet", {"act": "relux"}, "model.params.act:"),
        ("dynunet", {"upsample_kernel_size": [[2, 2, 2]]}, "model.params.upsample_kernel_size:"),
        ("swinunetr", {"window_size": 0, "feature_size": 12}, "model.params.window_size:"),
    ],
)
def test_bad_params_name_the_key(name, params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(ModelConfig(name=name, params=params), 3, 1, 2, [64, 64, 64])


def test_a_size_param_of_the_wrong_type_is_refused_by_the_schema_naming_the_key():
    """Counts and sizes are checked when the config is read, before any network is built."""
    from medseg.config import validate_config

    raw = {"data": {"dataset": "."}, "train": {"iterations": 1}, "output_dir": "x",
           "model": {"name": "unet", "params": {"channels": [4, 8], "num_res_units": "two"}}}
    with pytest.raises(ConfigError, match=r"model\.params.*num_res_units.*'two'"):
        validate_config(raw)


@pytest.mark.parametrize(
    "name, patch",
    [("unet", [30, 32, 32]), ("unetr", [40, 32, 32]), ("swinunetr", [48, 64, 64]), ("swinunetr", [32, 32, 32])],
)
def test_patch_incompatible_with_downsampling(name, patch):
    with pytest.raises(ConfigError, match=r"data\.patch_size"):
        build_model(ModelConfig(name=name), 3, 1, 2, patch)


def test_patch_size_length_must_match_dims():
    with pytest.raises(ConfigError, match=r"data\.patch_size"):
        build_model(ModelConfig(name="unet"), 3, 1, 2, [32, 32])


def test_a_3d_patch_on_a_2d_plans_dynunet_names_both():
    """--set data.patch_size=[256,256,256] on a 2D plan: MONAI's error blamed the kernels alone."""
    params = {"kernel_size": [[3, 3], [3, 3], [3, 3]], "strides": [[1, 1], [2, 2], [2, 2]]}
    with pytest.raises(ConfigError, match=r"^model\.params\.kernel_size: entries of 2 values \(one per axis\), but "
                                          r"data\.patch_size \[64, 64, 64\] has 3; give both for the same dimension"):
        build_model(ModelConfig(name="dynunet", params=params), 3, 1, 2, [64, 64, 64])


@pytest.mark.parametrize("name, params, dims, patch, error", [
    # MONAI builds these; they failed with a traceback at the first training step
    ("unet", {"channels": [4, 8, 16], "strides": [[2, 2], [2, 2, 2]], "num_res_units": 0}, 3, [16, 16, 16], "cannot run"),
    ("swinunetr", {"depths": [2, 2, 2], "num_heads": [3, 6, 12, 24], "feature_size": 12}, 3, [64, 64, 64],
     "rejected it|cannot run"),
    # and these made MONAI's constructor fail with an IndexError (a traceback before)
    ("dynunet", {"deep_supervision": True, "deep_supr_num": 5}, 3, [32, 32, 32], "rejected it"),
])
def test_networks_that_cannot_run_on_the_patch_are_refused_in_one_line(name, params, dims, patch, error):
    from medseg.models import check_forward

    with pytest.raises(ConfigError, match=rf"^model\.params.*: MONAI \w+ ({error})"):
        check_forward(ModelConfig(name=name, params=params), dims, 1, 2, patch)


def test_one_patch_a_step_through_a_batchnorm_bottleneck_is_blamed_on_the_batch_size():
    """Batch size 1 (Tent's natural setting) failed at the first step with torch's
    traceback, after the run folder was written."""
    from medseg.models import check_forward

    bn = ModelConfig(name="unet", params={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
                                          "norm": "BATCH"})
    check_forward(bn, 3, 1, 2, [4, 4, 4], batch_size=2)
    with pytest.raises(ConfigError, match=r"^adapt\.batch_size: 1 patch a step is too few .*BatchNorm"):
        check_forward(bn, 3, 1, 2, [4, 4, 4], batch_size=1, batch_key="adapt.batch_size")
    check_forward(bn, 3, 1, 2, [16, 16, 16], batch_size=1)  # a larger bottleneck has values enough
    instance = ModelConfig(name="unet", params={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0})
    check_forward(instance, 3, 1, 2, [8, 8, 8], batch_size=1)


def test_check_forward_accepts_every_default_network_and_leaves_the_random_stream_alone():
    from medseg.models import check_forward

    torch.manual_seed(0)
    expected = torch.rand(3)
    for name, patch in (("unet", [16, 16]), ("dynunet", [32, 32, 32]), ("unetr", [16, 16, 16]), ("swinunetr", [64, 64])):
        torch.manual_seed(0)
        check_forward(ModelConfig(name=name), len(patch), 2, 3, patch)
        assert torch.equal(torch.rand(3), expected), name  # SwinUNETR is built for real: its draws are undone

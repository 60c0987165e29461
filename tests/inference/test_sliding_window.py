"""Band-by-band stitching gives MONAI's sliding-window class maps (float32) or them within float16."""

import itertools

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from medseg.inference.sliding_window import CENTRE, band_bytes, class_maps


def _net(dims, seed=0, classes=3):
    torch.manual_seed(seed)
    return UNet(dims, 1, classes, channels=(4, 8), strides=(2,), num_res_units=0, norm="INSTANCE").eval()


def _monai(image, net, window, overlap, sw, mode, flips, activation="softmax"):
    """MONAI's sliding window per flipped image, class maps averaged over flips."""
    total = None
    with torch.no_grad():
        for axes in flips:
            dims = [1 + a for a in axes]
            x = image.flip(dims) if axes else image
            logits = sliding_window_inference(x[None], window, sw, net, overlap=overlap, mode=mode,
                                              padding_mode="replicate")[0]
            maps = torch.softmax(logits, 0) if activation == "softmax" else (1 + torch.tanh(logits)) / 2
            maps = maps.flip(dims) if axes else maps
            total = maps if total is None else total + maps
    return total / len(flips)


def _flips(dims):
    return [c for k in range(dims + 1) for c in itertools.combinations(range(dims), k)]


@pytest.mark.parametrize(
    "shape, window, overlap, sw, mode, tta",
    [
        ((37, 29, 23), (16, 16, 16), 0.5, 3, "gaussian", False),
        ((37, 29, 23), (16, 16, 16), 0.5, 2, "gaussian", True),
        ((33, 20, 41), (16, 8, 24), 0.3, 1, "constant", True),
        ((12, 30, 9), (16, 16, 16), 0.5, 4, "gaussian", True),  # smaller than the window: padded
        ((50, 43), (16, 16), 0.6, 5, "gaussian", True),
        ((16, 16, 16), (16, 16, 16), 0.5, 1, "gaussian", False),  # one window
    ],
)
def test_float32_stitching_is_monais(shape, window, overlap, sw, mode, tta):
    net = _net(len(shape))
    image = torch.randn(1, *shape)
    flips = _flips(len(shape)) if tta else [()]
    expected = _monai(image, net, list(window), overlap, sw, mode, flips)
    got = class_maps(image, net, window, overlap, sw, mode, flips=flips, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # the same logit sums; softmax of a band and the flips' running mean round differently
    assert (got + CENTRE - expected).abs().max() < 1e-6
    half = class_maps(image, net, window, overlap, sw, mode, flips=flips, dtype=torch.float16)
    assert half.dtype == torch.float16
    # centred float16: 2**-13 per rounding, one rounding per flip (sliding_window.py)
    bound = 2**-13 * (len(flips) + 1) / 2 if tta else 2**-13
    assert (half.float() + CENTRE - expected).abs().max() <= bound + 1e-6


def test_tanh_maps_and_the_band():
    net = _net(3, classes=2)
    image = torch.randn(1, 40, 21, 18)
    expected = _monai(image, net, [16, 16, 16], 0.5, 2, "gaussian", [()], activation="tanh")
    got = class_maps(image, net, (16, 16, 16), 0.5, 2, activation="tanh", dtype=torch.float32)
    assert (got + CENTRE - expected).abs().max() < 1e-6
    # the band: (classes + 1) float32 sums over one window's depth of rows
    assert band_bytes((40, 21, 18), (16, 16, 16), 2) == 4 * 3 * 16 * 21 * 18
    assert band_bytes((10, 21, 18), (16, 16, 16), 2) == 4 * 3 * 16 * 21 * 18


def test_wrong_network_output_is_named():
    def halves(x):  # a network whose output is smaller than its input
        return x[:, :, ::2, ::2]

    with pytest.raises(RuntimeError, match="the network returned"):
        class_maps(torch.randn(1, 20, 20), halves, (8, 8), 0.5, 1)

"""Sliding-window class maps with bounded memory: MONAI's windows and weights, stitched by bands.

MONAI's :func:`~monai.inferers.sliding_window_inference` stitches into a float32
``(classes, *volume)`` sum plus a count map, and medseg averaged the test-time flips in
more such arrays. :func:`class_maps` computes the same class maps with one whole-volume
array, the result:

* the windows are MONAI's: :func:`monai.data.utils.dense_patch_slices` with MONAI's scan
  interval ``int(window * (1 - overlap))``, an image smaller than the window padded on
  both sides as ``sliding_window_inference`` pads it, by repeating its border voxels
  (``padding_mode="replicate"``: training pads a case smaller than the patch so, and a
  network that never saw zero padding met it only at inference); the weights are
  :func:`monai.data.utils.compute_importance_map` (gaussian, sigma 0.125 of the window,
  clamped at 1e-3; or constant);
* the windows are visited in MONAI's order, which is ascending in their start along the
  first spatial axis. Once the windows starting at row ``s_k`` are added, rows before
  ``s_(k+1)`` get nothing more, so they are finished: their weighted logit sum is divided
  by their weight sum, turned into class maps (softmax, or ``(1 + tanh) / 2`` for a model
  trained by SAUNA regression alone) and written out. Only one window's depth of rows is
  held, the *band*: ``classes x window[0] x (rest of the volume)`` logit sums and
  ``window[0] x (rest of the volume)`` weight sums, float32, on the network's device, as
  a ring buffer (row ``r`` in slot ``r % window[0]``);
* the logits are accumulated in float32 with the same additions in the same order as
  MONAI's, so the stitched logits are MONAI's bit for bit; test-time augmentation runs
  the whole pass on the flipped image (windows cut from the mirrored position and
  flipped, so the image is never copied) and each finished band is flipped back and
  averaged into the output (a running mean, ``m += (p - m) / k`` for the k-th flip).

The output ``(classes, *volume)`` is kept in ``dtype`` on ``out_device``, *centred*: it
holds ``maps - 0.5`` (:data:`CENTRE`), in [-0.5, 0.5]. ``medseg predict`` keeps it in
float16, which resolves [-0.5, 0.5] twice as finely as [0, 1] (rounding by at most 2**-13,
1.2e-4) and ever more finely towards 0, i.e. towards 0.5 where two classes tie. The
running mean over k flips rounds once per flip, the last rounding counting most: at most
1.2e-4 * (k + 1) / 2, 5.5e-4 for the 8 flips of 3D (measured: 2.8e-4 on a 224x224x200
volume). So the probabilities move by less than 1e-3, and a label changes only where the
two best classes were within about 2e-4 of each other, voxels the model cannot tell apart
(tests/inference/test_bounded_memory.py: labels identical to the float32 path wherever
the margin exceeds 1e-3). The logits are never stored in float16; ``dtype=torch.float32``
gives MONAI's class maps to float rounding (1e-6).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["class_maps", "band_bytes", "CENTRE"]

# the output holds class maps minus this (see the module docstring)
CENTRE = 0.5

# finished rows are turned into class maps in pieces of about this many voxels (at most a
# quarter of the band): the temporaries of the division, activation and flip stay small
_FINISH_VOXELS = 1 << 21


def _activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(C, ...) network outputs -> per-class maps in [0, 1]."""
    if activation == "tanh":
        return (1.0 + torch.tanh(logits)) / 2.0
    if activation == "sigmoid":  # a multi-label head (every loss term with sigmoid: true)
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=0)


def _windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows ``sliding_window_inference`` visits on an image of ``shape`` (already padded)."""
    from monai.data.utils import dense_patch_slices

    # MONAI's scan interval (monai.inferers.utils._get_scan_interval)
    interval = [w if w == n else max(int(w * (1 - overlap)), 1) for w, n in zip(window, shape)]
    return dense_patch_slices(list(shape), list(window), interval)


def _padding(shape: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis for an image smaller than the window, as MONAI splits it."""
    return [((w - n) // 2, (w - n) - (w - n) // 2) if w > n else (0, 0) for n, w in zip(shape, window)]


def band_bytes(shape: Sequence[int], window: Sequence[int], classes: int) -> int:
    """Bytes of the band (logit and weight sums) for an image of ``shape`` (for device planning)."""
    padded = [max(n, w) for n, w in zip(shape, window)]
    rest = math.prod(padded[1:])
    return 4 * (classes + 1) * min(window[0], padded[0]) * rest


def _ring(start: int, stop: int, size: int) -> list[slice]:
    """The slots of rows [start, stop) in a ring buffer of ``size`` slots (one or two pieces)."""
    pieces, row = [], start
    while row < stop:
        slot = row % size
        n = min(stop - row, size - slot)
        pieces.append(slice(slot, slot + n))
        row += n
    return pieces


class _Band:
    """Weighted logit sums and weight sums of one window's depth of rows (row r in slot r % depth)."""

    def __init__(self, classes: int, depth: int, rest: Sequence[int], device: torch.device) -> None:
        self.logits = torch.zeros((classes, depth, *rest), dtype=torch.float32, device=device)
        self.weights = torch.zeros((depth, *rest), dtype=torch.float32, device=device)
        self.depth = depth

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor) -> None:
        """MONAI's ``output += logits * w; count += w`` for one window."""
        logits = logits * weight
        row = 0
        for slots in _ring(window[0].start, window[0].stop, self.depth):
            rows = slice(row, row + slots.stop - slots.start)
            self.logits[(slice(None), slots, *window[1:])] += logits[:, rows]
            self.weights[(slots, *window[1:])] += weight[rows]
            row = rows.stop

    def mean(self, start: int, stop: int, crop: tuple[slice, ...]) -> torch.Tensor:
        """``output / count`` of rows [start, stop), the other axes cut to ``crop``."""
        slots = _ring(start, stop, self.depth)
        pieces = [self.logits[(slice(None), s, *crop)] / self.weights[(s, *crop)] for s in slots]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def clear(self, start: int, stop: int) -> None:
        for slots in _ring(start, stop, self.depth):
            self.logits[:, slots].zero_()
            self.weights[slots].zero_()


@torch.no_grad()
def class_maps(
    image: torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    mode: str = "gaussian",
    activation: str = "softmax",
    flips: Sequence[tuple[int, ...]] = ((),),
    device: torch.device | str = "cpu",
    out_device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    amp: bool = False,
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Class maps ``(classes, *spatial)`` of ``image``, averaged over ``flips``, minus :data:`CENTRE`.

    Parameters
    ----------
    image : torch.Tensor
        ``(channels, *spatial)`` float32, the preprocessed scan (any device; windows are
        cut from it and moved to ``device``).
    network : callable
        ``(B, channels, *window) -> (B, classes, *window)`` logits, on ``device``.
    window : sequence of int
        The window (the training patch); ``overlap`` in [0, 1); ``sw_batch_size`` windows
        per forward pass; ``mode`` ``gaussian`` or ``constant`` blending.
    activation : {"softmax", "sigmoid", "tanh"}
        Softmax over classes, a sigmoid per class (multi-label heads), or ``(1 + tanh) / 2``
        per class.
    flips : sequence of tuples
        Spatial axes (0-based) to flip for each pass; ``((),)`` is no test-time augmentation.
    device : torch.device
        Where the network runs and the band is kept.
    out_device, dtype
        Where and in which dtype the (centred) output is kept (``medseg predict``: float16).
    amp : bool
        Run the network under CUDA autocast.
    """
    from monai.data.utils import compute_importance_map

    device, out_device = torch.device(device), torch.device(out_device)
    shape = tuple(image.shape[1:])
    window = tuple(int(w) if w and w > 0 else n for w, n in zip(window, shape))
    pad = _padding(shape, window)
    padded = tuple(n + a + b for n, (a, b) in zip(shape, pad))
    windows = _windows(padded, window, overlap)
    weight = compute_importance_map(
        tuple(min(w, n) for w, n in zip(window, padded)), mode=mode, sigma_scale=sigma_scale,
        device=device, dtype=torch.float32,
    )
    autocast = torch.autocast("cuda") if amp and device.type == "cuda" else nullcontext()
    out: torch.Tensor | None = None
    for k, axes in enumerate(flips, start=1):
        source = image
        if any(a or b for a, b in pad):  # small image: flipped, then padded, as MONAI sees it
            flipped = image.flip([1 + a for a in axes]) if axes else image
            source = F.pad(flipped[None], [p for a, b in reversed(pad) for p in (a, b)], mode="replicate")[0]
            axes_to_cut = ()
        else:
            axes_to_cut = axes
        band: _Band | None = None
        held = windows[0][0].start  # the first row not finished yet
        for first in range(0, len(windows), sw_batch_size):
            batch = windows[first : first + sw_batch_size]
            x = torch.stack([_cut(source, win, axes_to_cut) for win in batch]).to(device)
            with autocast:
                logits = network(x.float())
            logits = logits.float()
            if logits.shape[2:] != window or logits.shape[0] != len(batch):
                raise RuntimeError(f"the network returned {tuple(logits.shape)} for windows {tuple(x.shape)}")
            if band is None:
                band = _Band(logits.shape[1], window[0], padded[1:], device)
            if out is None:
                out = torch.zeros((logits.shape[1], *shape), dtype=dtype, device=out_device)
            for win, z in zip(batch, logits):
                if win[0].start > held:  # no later window reaches rows before its start
                    _finish(band, held, win[0].start, out, k, axes, pad, activation)
                    held = win[0].start
                band.add(win, z, weight)
            del x, logits
        _finish(band, held, padded[0], out, k, axes, pad, activation)
        del band, source
    assert out is not None
    return out


def _cut(image: torch.Tensor, window: tuple[slice, ...], axes: Sequence[int]) -> torch.Tensor:
    """The window of the image flipped along ``axes``: the mirrored window of ``image``, flipped."""
    if not axes:
        return image[(slice(None), *window)]
    shape = image.shape[1:]
    mirrored = [slice(n - s.stop, n - s.start) if d in axes else s for d, (s, n) in enumerate(zip(window, shape))]
    return image[(slice(None), *mirrored)].flip([1 + a for a in axes])


def _finish(band: _Band, start: int, stop: int, out: torch.Tensor, k: int, axes: Sequence[int],
            pad: Sequence[tuple[int, int]], activation: str) -> None:
    """Rows [start, stop) of the pass (flipped, padded frame) are complete: into ``out``, the k-th pass."""
    shape = out.shape[1:]
    rest = math.prod(band.weights.shape[1:])
    step = max(1, min(_FINISH_VOXELS, math.prod(band.weights.shape) // 4) // rest)
    crop = tuple(slice(a, a + n) for (a, _), n in zip(pad[1:], shape[1:]))
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        a, b = max(lo, pad[0][0]), min(hi, pad[0][0] + shape[0])  # rows of the image, not padding
        if a < b:
            maps = _activation(band.mean(a, b, crop), activation).sub_(CENTRE)
            if axes:
                maps = maps.flip([1 + d for d in axes])
            a, b = a - pad[0][0], b - pad[0][0]
            rows = slice(shape[0] - b, shape[0] - a) if 0 in axes else slice(a, b)
            _average_into(out, rows, maps, k)
        band.clear(lo, hi)


def _average_into(out: torch.Tensor, rows: slice, maps: torch.Tensor, k: int) -> None:
    """out[:, rows] becomes the mean of the k passes so far (k = 1: the maps themselves)."""
    if k == 1:
        out[:, rows] = maps.to(out.dtype).to(out.device)
        return
    mean = out[:, rows].to(maps.device, torch.float32)
    mean += (maps - mean) / k
    out[:, rows] = mean.to(out.dtype).to(out.device)

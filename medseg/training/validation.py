"""Validation during training: sliding-window inference on whole validation cases.

Dice is computed per foreground class on the preprocessed grid (after reorientation,
resampling to ``target_spacing`` and the crop to the non-zero region, which holds all
the reference foreground), as nnU-Net's online validation does; the exact evaluation on
the original grid is ``medseg predict`` + ``medseg evaluate``.

Under torchrun each rank validates its share of the cases (case ``i`` on rank
``i % N``) and the per-class Dice sums and case counts are all-reduced, so every rank
gets the mean over all cases, the number one process computes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from monai.inferers import sliding_window_inference

from medseg import distributed
from medseg.config import RunConfig
from medseg.tensors import channel_argmax


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, cfg: RunConfig, device: torch.device, amp: bool) -> torch.Tensor:
    """Sliding-window logits ``(1, C, *spatial)`` for one preprocessed image ``(channels, *spatial)``."""
    inputs = _plain(image).unsqueeze(0).to(device)
    with torch.autocast(device_type=device.type, enabled=amp):
        return sliding_window_inference(
            inputs,
            roi_size=list(cfg.data.patch_size),
            sw_batch_size=cfg.inference.sw_batch_size,
            predictor=model,
            overlap=cfg.inference.overlap,
            mode=cfg.inference.mode,
            padding_mode="replicate",  # as training pads a case smaller than the patch (and as predict does)
        ).float()


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: Sequence[dict[str, Any]],
    cfg: RunConfig,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
) -> list[float]:
    """Mean Dice over ``cases`` for each foreground class ``1 .. num_classes - 1``.

    ``cases`` is a sequence of ``{"image": (C, *spatial), "label": (1, *spatial)}``;
    it is indexed one case at a time (a :class:`~medseg.training.data.ValidationCases`
    reads each from the preprocessing cache then), so only one is in memory.

    A class absent from the reference of a case is left out of that class's mean
    (MONAI ``ignore_empty``); a class absent from the reference of every case scores 0
    (MONAI ``DiceMetric``'s ``mean_batch`` reduction, which this reproduces).
    Under torchrun every rank must call this with the same ``cases`` (a collective).
    """
    was_training = model.training
    model.eval()
    # Per-case scores with MONAI's functional Dice: DiceMetric's buffers would all-gather
    # across ranks by themselves (and hang on a rank without cases).
    scores = torch.zeros(0, num_classes - 1)
    try:
        per_case = []
        # one case at a time: ``cases`` may read each from the cache on access
        for index in range(distributed.rank(), len(cases), distributed.world_size()):
            per_case.append(_case_dice(model, cases[index], cfg, num_classes, device, amp))
        if per_case:
            scores = torch.cat(per_case, dim=0)
        # DiceMetric's "mean_batch" reduction (a nan case weighs 0), as sums and counts
        # so that ranks can add theirs up
        scored = ~torch.isnan(scores)
        sums = distributed.all_reduce_sum(torch.where(scored, scores, torch.zeros_like(scores)).sum(0))
        counts = distributed.all_reduce_sum(scored.float().sum(0))
    finally:
        model.train(was_training)
    per_class = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    absent = [c + 1 for c in range(num_classes - 1) if counts[c] == 0 and c + 1 not in _ABSENT_REPORTED]
    if absent and len(cases) and distributed.is_main():
        # a 0 that is no score: the user saw 'val Dice 0.0000 *best*' and best.pt frozen at the first validation
        _ABSENT_REPORTED.update(absent)
        logging.getLogger("medseg.training").warning(
            "no validation case contains class(es) %s: their val Dice is 0 by convention (MONAI's), not a score, "
            "and best.pt follows the other classes only (or stays at the first validation); give the validation "
            "split cases with foreground (data.split_file)", ", ".join(map(str, absent)))
    return [float(v) for v in per_class]


_ABSENT_REPORTED: set[int] = set()  # classes reported absent from the validation cases (once per process)


def _case_dice(
    model: torch.nn.Module, case: dict[str, Any], cfg: RunConfig, num_classes: int, device: torch.device, amp: bool
) -> torch.Tensor:
    """``(1, num_classes - 1)`` Dice of one case, ``nan`` where the reference lacks the class.

    MONAI's ``compute_dice(..., ignore_empty=True)`` on one-hot maps, computed from
    voxel counts per class instead (one-hot maps of a 512x512x100 CT would take 0.4 GB
    per class); the case's arrays are freed on return, before the next case is read.
    """
    logits = predict_logits(model, case["image"], cfg, device, amp)
    pred = _label_map(logits)
    del logits
    label = _plain(case["label"])[0].to(device)
    scores = []
    for c in range(1, num_classes):
        truth, guess = label == c, pred == c
        reference = int(truth.sum())
        if reference == 0:
            scores.append(float("nan"))
        else:
            scores.append(2.0 * int((truth & guess).sum()) / (reference + int(guess.sum())))
    return torch.tensor([scores], dtype=torch.float32)


def _label_map(logits: torch.Tensor) -> torch.Tensor:
    """``channel_argmax(logits, dim=1)[0]`` of ``(1, C, *spatial)`` logits, the same
    indices, computed a slab of the first spatial axis at a time into a uint8 map (int64
    beyond 256 classes). The whole-volume argmax took a contiguous copy of the logits and
    an int64 map: with MONAI's output that was 6x the case's float32 size, twice what
    ``medseg predict`` takes for it, and a run that could predict a case was killed at its
    first validation."""
    classes, first = logits.shape[1], logits.shape[2]
    out = torch.empty(tuple(logits.shape[2:]), dtype=torch.uint8 if classes <= 256 else torch.int64,
                      device=logits.device)
    step = max(1, first // 16)
    for start in range(0, first, step):
        out[start : start + step] = channel_argmax(logits[:, :, start : start + step], dim=1)[0]
    return out

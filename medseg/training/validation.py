"""Validation during training: sliding-window inference on whole validation cases.

Dice is computed per foreground class on the preprocessed grid (after reorientation and
resampling to ``target_spacing``), as nnU-Net's online validation does; the exact
evaluation on the original grid is ``medseg predict`` + ``medseg evaluate``.

Under torchrun each rank validates its share of the cases (case ``i`` on rank
``i % N``) and the per-class Dice sums and case counts are all-reduced, so every rank
gets the mean over all cases, the number one process computes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice

from medseg import distributed
from medseg.config import RunConfig


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

    A class absent from the reference of a case is left out of that class's mean
    (MONAI ``ignore_empty``); a class absent from the reference of every case scores 0
    (MONAI ``DiceMetric``'s ``mean_batch`` reduction, which this reproduces).
    Under torchrun every rank must call this with the same ``cases`` (a collective).
    """
    was_training = model.training
    model.eval()
    shard = list(cases)[distributed.rank() :: distributed.world_size()]
    # Per-case scores with MONAI's functional Dice: DiceMetric's buffers would all-gather
    # across ranks by themselves (and hang on a rank without cases).
    scores = torch.zeros(0, num_classes - 1)
    try:
        per_case = []
        for case in shard:
            logits = predict_logits(model, case["image"], cfg, device, amp)
            pred = logits.argmax(dim=1, keepdim=True)
            label = _plain(case["label"]).unsqueeze(0).to(device).long()
            per_case.append(compute_dice(
                _one_hot(pred, num_classes), _one_hot(label, num_classes),
                include_background=False, ignore_empty=True, num_classes=num_classes,
            ).float().cpu())
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
    return [float(v) for v in per_class]


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    shape = list(labels.shape)
    shape[1] = num_classes
    out = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.clamp(0, num_classes - 1), 1.0)

"""Validation during training: sliding-window inference on whole validation cases.

Dice is computed per foreground class on the preprocessed grid (after reorientation and
resampling to ``target_spacing``), as nnU-Net's online validation does; the exact
evaluation on the original grid is ``medseg predict`` + ``medseg evaluate``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

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

    A class absent from both prediction and reference of a case is left out of that
    class's mean (MONAI ``ignore_empty``); a class absent from every case scores ``nan``.
    """
    was_training = model.training
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    try:
        for case in cases:
            logits = predict_logits(model, case["image"], cfg, device, amp)
            pred = logits.argmax(dim=1, keepdim=True)
            label = _plain(case["label"]).unsqueeze(0).to(device).long()
            metric(y_pred=_one_hot(pred, num_classes), y=_one_hot(label, num_classes))
        per_class = metric.aggregate()
    finally:
        model.train(was_training)
    return [float(v) for v in per_class.cpu()]


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    shape = list(labels.shape)
    shape[1] = num_classes
    out = torch.zeros(shape, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.clamp(0, num_classes - 1), 1.0)

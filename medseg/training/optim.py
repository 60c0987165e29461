"""Optimizer and learning-rate schedule, both stepped once per training iteration."""

from __future__ import annotations

import math

import torch

from medseg.config import OptimizerConfig, SchedulerConfig


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW, Adam, or SGD with Nesterov momentum (nnU-Net's choice: lr 1e-2, momentum 0.99)."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    raise AssertionError(cfg.name)  # the config's Literal makes this unreachable


def lr_factor(iteration: int, total: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the base learning rate before optimizer step ``iteration`` (0-based).

    Linear warm-up over ``warmup_iterations`` steps (from ``1 / warmup`` to 1), then
    ``poly``: ``(1 - t) ** poly_power`` (nnU-Net), ``cosine``: ``(1 + cos(pi t)) / 2``,
    ``constant``: 1, where ``t`` is the fraction of the post-warm-up steps done.
    """
    warmup = min(cfg.warmup_iterations, max(total - 1, 0))
    if iteration < warmup:
        return (iteration + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max((iteration - warmup) / span, 0.0), 1.0)
    if cfg.name == "poly":
        return (1.0 - t) ** cfg.poly_power
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_iterations: int):
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_factor`.

    The factor is a pure function of the step count, so a resumed run (whose
    ``last_epoch`` comes from the checkpoint) continues the same curve.
    """

    def factor(step: int) -> float:
        return lr_factor(step, total_iterations, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

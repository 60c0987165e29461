"""What every adaptation method gets from the runner, and what it must provide.

A method is a small stateful object: it says which parameters the optimizer updates,
computes the loss of one step on a batch of target patches (and, for semi-supervised
methods, a batch of labelled source patches), and may act before a step (a new
pseudo-label round) or after it (the EMA teacher). Its state goes into the checkpoint
under ``adaptation.method_state`` so ``--resume`` continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from medseg.adaptation.config import AdaptConfig
from medseg.adaptation.source import SourceRun
from medseg.adaptation.target import PatchSpec, TargetScan, own_voxel_masks, stack_views, target_batch


@dataclass
class AdaptContext:
    cfg: AdaptConfig
    source: SourceRun
    predictor: Any  # medseg.inference.Predictor of the source run (transforms, sliding window)
    scans: list[TargetScan]
    patch: list[int]
    num_classes: int
    device: torch.device
    build_model: Callable[[], torch.nn.Module]  # a fresh network with the source weights, on device
    reset_optimizer: Callable[[], None] = field(default=lambda: None)
    source_loss: Any = None  # CompositeLoss of the source run, when source_data is given

    def batch_specs(self, iteration: int, num_views: int = 1) -> list[PatchSpec]:
        a = self.cfg.adapt
        return target_batch(self.cfg.seed, iteration, a.batch_size, self.scans, self.patch,
                            a.flip_prob, a.intensity_prob, num_views)

    def views(self, specs: Sequence[PatchSpec], view: int = 0) -> torch.Tensor:
        return stack_views(specs, self.scans, self.patch, view, self.device)

    def own_voxels(self, specs: Sequence[PatchSpec], view: int | None = 0) -> torch.Tensor | None:
        """``(B, 1, *patch)`` bool mask of the scans' own voxels in view ``view`` (None: un-flipped);
        None when no patch reaches into padding (:func:`~medseg.adaptation.target.own_voxel_masks`)."""
        return own_voxel_masks(specs, self.scans, self.patch, view, self.device)


class Method:
    """Base class; subclasses set ``name`` and ``loss_terms`` and implement :meth:`loss`."""

    name = "method"
    loss_terms: tuple[str, ...] = ()

    def __init__(self, ctx: AdaptContext) -> None:
        self.ctx = ctx

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Called once on the freshly loaded student (e.g. Tent freezes parameters)."""
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def before_step(self, model: torch.nn.Module, iteration: int) -> None:
        pass

    def loss(self, model: torch.nn.Module, iteration: int, source_batch: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, iteration: int) -> None:
        pass

    def model_for_output(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network the adapted run saves (mean teacher: the teacher)."""
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # helpers ------------------------------------------------------------
    def supervised_source(self, model: torch.nn.Module, source_batch: dict | None) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The source run's own loss on labelled source patches (semi-supervised mixing)."""
        if source_batch is None or self.ctx.source_loss is None:
            return None, {}
        logits = model(source_batch["image"])
        loss, _ = self.ctx.source_loss(logits, source_batch["label"], batch=source_batch)
        weight = self.ctx.cfg.source_data.weight if self.ctx.cfg.source_data else 1.0
        return weight * loss, {"source": float(loss.detach())}

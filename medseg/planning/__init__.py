"""Experiment planning (nnU-Net's ``experiment_planning`` stage): from a dataset to a run config.

- :mod:`~medseg.planning.fingerprint`: one parallel pass over the training cases
  (shapes, spacings, orientation, intensities, label counts and thickness), and the
  functions that give ``fit_preprocessing``'s and ``label_statistics``' results from it.
- :mod:`~medseg.planning.network_topology`: U-Net levels, kernels and strides from the
  patch and the spacing.
- :mod:`~medseg.planning.memory`: the memory of a training step, counted and estimated.
- :mod:`~medseg.planning.planner`: the plan (target spacing, patch, batch, network,
  foreground oversampling, loss).
- :mod:`~medseg.planning.writer` and :mod:`~medseg.planning.run`: ``medseg plan``'s files.
"""

from medseg.planning.fingerprint import (
    compute_fingerprint,
    label_statistics_from_fingerprint,
    load_samples,
    preprocessing_from_fingerprint,
)
from medseg.planning.memory import estimate_training_memory
from medseg.planning.network_topology import unet_topology
from medseg.planning.planner import PlanWarning, plan_experiment, target_spacing
from medseg.planning.run import run_plan
from medseg.planning.writer import read_fingerprint

__all__ = [
    "PlanWarning",
    "compute_fingerprint",
    "estimate_training_memory",
    "label_statistics_from_fingerprint",
    "load_samples",
    "plan_experiment",
    "preprocessing_from_fingerprint",
    "read_fingerprint",
    "run_plan",
    "target_spacing",
    "unet_topology",
]

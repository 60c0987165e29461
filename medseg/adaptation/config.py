"""The typed adaptation configuration (``medseg adapt CONFIG.yaml``), validated like a run config.

Unknown keys are errors naming the key; ``--set adapt.iterations=50`` overrides dotted
keys before validation (:func:`medseg.config.apply_overrides`).

Example (``configs/adapt/sfda.yaml``)::

    source_run: demo/runs/quickstart
    target:
      dataset: demo/Dataset002_SyntheticVesselsShifted
    adapt:
      method: sfda
      iterations: 200
    output_dir: demo/runs/quickstart_sfda

What the adapted run reuses from the source run and what it decides itself:

* network, dataset description (channels, labels) and **preprocessing statistics are
  the source's**. For per-image z-score channels this does not matter; for CT channels
  (clip + z-score with the source training set's foreground statistics) it means the
  target scans are normalised as the source model expects, and the adaptation has to
  absorb the intensity shift. A CT scanner calibrated in HU keeps its units, so
  re-fitting on the (unlabelled) target would mostly swap an intensity shift for a
  foreground-definition shift; it is not offered.
* patch size and sliding-window settings default to the source config's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from medseg.config import MAX_COUNT, MAX_LR, MAX_PATCH, MAX_WEIGHT, _Strict, read_yaml_with_overrides, validate_model

METHODS = ("pseudo_label", "mean_teacher", "sfda", "tent")


def class_ratios(value: list[float] | None) -> list[float] | None:
    """A class-ratio prior: non-negative ratios (background included) summing to 1."""
    if value is None:
        return value
    negative = [v for v in value if v < 0]
    if negative:
        raise ValueError(f"class ratios must not be negative, got {negative[0]:g}")
    if abs(sum(value) - 1.0) > 1e-3:
        raise ValueError(f"class ratios (background included) must sum to 1, got {sum(value):.4g}")
    return value


class TargetConfig(_Strict):
    """The unlabelled target domain."""

    dataset: Path = Field(..., description="target dataset folder (dataset.json, images<subset>/); labels not needed")
    subset: Literal["Tr", "Ts"] = Field("Tr", description="adapt on images<subset>/ (imagesTr or imagesTs)")
    eval_labels: Path | None = Field(
        None,
        description="folder of reference labels CASE<ending> for the target scans (e.g. the target's labelsTr); "
        "only reported (target Dice and Betti errors before, during and after), never used to adapt or select",
    )
    eval_interval: int | None = Field(None, gt=0, description="evaluate every N steps (default: before and after only)")


class SourceDataConfig(_Strict):
    """Labelled source data mixed into each step (semi-supervised; pseudo_label and mean_teacher)."""

    dataset: Path = Field(..., description="labelled source dataset (the layout medseg train reads)")
    batch_size: int = Field(1, gt=0, le=2**16, description="labelled source patches per step, besides the target batch")
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of the supervised source loss (the source run's losses)")


class PseudoLabelConfig(_Strict):
    """Self-training on the teacher's confident voxels.

    Each round the teacher (round 0: the source model; later: the student of the round
    before) predicts every target scan (sliding window, softmax); a voxel keeps its
    argmax pseudo-label when its confidence (max probability) is at least ``threshold``
    and, with ``curriculum``, is among the top ``curriculum[round]`` fraction of voxels
    predicted as the same class (class-wise, so that background does not take all the
    places; Cascante-Bonilla et al. 2021 grow the fraction by 20% each round; by default
    for the foreground classes only, ``curriculum_classes``). Other voxels are ignored by
    the loss. With ``prior_matching`` (default) the foreground pseudo-labels are the
    ``prior[k]`` fraction of voxels with the highest ``p_k`` instead of the argmax (see
    :mod:`medseg.adaptation.pseudo_label`).
    """

    rounds: int = Field(3, gt=0, le=MAX_COUNT, description="teacher predictions of the target scans, each followed by training")
    threshold: float | None = Field(0.9, ge=0, le=1, description="minimum confidence; None: no threshold")
    curriculum: list[float] | None = Field(
        None, description="fraction of voxels kept per class and round, non-decreasing in (0, 1], e.g. [0.2, 0.4, 0.6]"
    )
    reinitialize_student: bool = Field(
        True,
        description="restart the student from the source weights (and a fresh optimizer) each round: "
        "Curriculum Labeling's remedy for concept drift (they restart from random weights, which needs labels)",
    )
    dice_weight: float = Field(0.0, ge=0, le=MAX_WEIGHT, description="add a masked soft Dice term to the masked cross-entropy")
    curriculum_classes: Literal["foreground", "all"] = Field(
        "foreground",
        description="classes the curriculum percentiles apply to; 'foreground': background voxels are kept on the "
        "threshold alone (its least confident voxels are the hard negatives around the source model's false "
        "positives, which a background percentile would drop first)",
    )
    prior_matching: bool = Field(
        True,
        description="pseudo-label foreground class k as the prior[k] fraction of target voxels with the highest "
        "p_k (CBST-style class-balanced selection), other voxels background above threshold and ignored below; "
        "False: argmax pseudo-labels",
    )
    prior: list[float] | None = Field(
        None, description="class ratios incl. background for prior_matching; default: label_stats.json of the source run"
    )
    class_share_weighting: bool = Field(
        True,
        description="with a curriculum, weight the admitted voxels per class so that each class keeps the share it "
        "has among the voxels above the threshold (a class-wise curriculum drops background hard negatives first "
        "and would otherwise tilt the loss towards the rare class)",
    )

    @field_validator("prior")
    @classmethod
    def _distribution(cls, value: list[float] | None) -> list[float] | None:
        return class_ratios(value)

    @field_validator("curriculum")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value or any(not 0 < v <= 1 for v in value):
            raise ValueError("fractions must be in (0, 1]")
        if any(b < a for a, b in zip(value, value[1:])):
            raise ValueError("fractions must not decrease from round to round")
        return value


class MeanTeacherConfig(_Strict):
    """EMA teacher and consistency under augmentation (Tarvainen & Valpola 2017).

    ``teacher = decay_t * teacher + (1 - decay_t) * student`` after every step, for the
    parameters and the floating-point normalisation buffers (BatchNorm running
    statistics), with ``decay_t = min(decay, 1 - 1 / (t + 1))`` (the ramped decay of
    their code). Consistency: mean squared error between student and teacher softmax on
    two views of the same patch (intensity augmentations, and a flip of the student's
    view that is undone on its output), weighted by ``weight * exp(-5 (1 - t/T)^2)`` for
    ``t < T = rampup_iterations``.
    """

    decay: float = Field(0.99, ge=0, lt=1, description="the teacher's EMA decay (ramped: min(decay, 1 - 1/(t + 1)) after step t = 1, 2, ...)")
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of the consistency term")
    rampup_iterations: int = Field(50, ge=0, le=MAX_COUNT, description="steps of the consistency weight's ramp-up")
    confidence_weight: float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="also train on the teacher's argmax where its confidence >= threshold (cross-entropy)"
    )
    threshold: float = Field(0.9, ge=0, le=1, description="the teacher's confidence for confidence_weight's term")


class SFDAConfig(_Strict):
    """Source-free adaptation (Bateson et al., MedIA 2022): entropy + class-ratio prior.

    ``loss = sum_k w_k mean_voxels(-p_k log p_k) + kl_weight * KL(tau_hat || tau)`` with
    ``tau_hat`` the mean softmax over the voxels of a sample (``ratio_scope``) and ``tau``
    the prior (``ratio_scope``: ``scan`` by default, see :mod:`medseg.adaptation.sfda`).
    A foreground class whose predicted ratio on a sample is below
    ``absent_threshold`` is taken as absent there: its prior mass moves to background
    and its term leaves the KL, so the prior does not force a structure into a sample
    that does not show it.
    """

    kl_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="lambda of the KL term")
    entropy_weights: list[float] | None = Field(
        None, description="w_k per class incl. background; default 0.1 for background, 0.9 for each foreground class"
    )
    prior: list[float] | None = Field(
        None,
        description="class ratios incl. background, summing to 1; default: ratio_mean of label_stats.json of the source run",
    )
    absent_threshold: float = Field(1e-4, ge=0, lt=1, description="a class predicted below this ratio on a sample is "
                                    "taken as absent there (its prior mass goes to background)")
    ratio_scope: Literal["sample", "batch", "scan"] = Field(
        "scan",
        description="tau_hat per patch, pooled over the batch's patches, or of the patch's whole scan (the scan's "
        "sliding-window ratio corrected by the patch's change since; the prior is a whole-image statistic)",
    )
    refresh_interval: int = Field(25, gt=0, le=MAX_COUNT, description="scan scope: steps between sliding-window passes over the scans")

    @field_validator("prior")
    @classmethod
    def _distribution(cls, value: list[float] | None) -> list[float] | None:
        return class_ratios(value)

    @field_validator("entropy_weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        # a negative weight turned that class's entropy minimisation into maximisation
        if value is not None and not all(math.isfinite(w) and w >= 0 for w in value):
            raise ValueError(f"must be finite numbers >= 0, one per class, got {value}")
        return value


class TentConfig(_Strict):
    """Test-time entropy minimisation (Wang et al., ICLR 2021) on normalisation affine parameters only.

    Norm layers use batch (instance) statistics while adapting; BatchNorm running
    statistics keep updating with their momentum, so the saved model carries target
    statistics. MONAI's InstanceNorm layers have no affine parameters by default:
    ``enable_affine`` adds them with identity initialisation (weight 1, bias 0, so the
    adapted model starts as the source model) and records ``affine: true`` in the
    stored model config so that the run reloads; without it such a model is refused.
    """

    enable_affine: bool = Field(True, description="give InstanceNorm layers identity affine parameters to adapt")
    max_iterations: int = Field(200, gt=0, le=MAX_COUNT, description="refuse adapt.iterations above this: Tent degrades with many passes")


class AdaptSection(_Strict):
    method: Literal["pseudo_label", "mean_teacher", "sfda", "tent"] = Field(..., description="the adaptation method")
    iterations: int = Field(..., gt=0, le=MAX_COUNT, description="optimizer steps in all (pseudo_label: over all rounds)")
    batch_size: int = Field(2, gt=0, le=2**16, description="target patches per step")
    patch_size: list[int] | None = Field(None, description="default: the source run's data.patch_size")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="torch.optim's Adam, AdamW or SGD")
    lr: float = Field(5e-4, gt=0, le=MAX_LR, description="Bateson et al. use Adam 5e-4 (2D); Tent 1e-3 Adam")
    weight_decay: float = Field(0.0, ge=0, le=1, description="the optimizer's weight decay (at most 1)")
    grad_clip: float | None = Field(12.0, gt=0, description="clip the gradient norm; None disables")
    flip_prob: float = Field(0.5, ge=0, le=1, description="random flips of target patches (per axis)")
    intensity_prob: float = Field(0.5, ge=0, le=1, description="random intensity change a * x + b (a in [0.8, 1.2], b in [-0.2, 0.2]) plus Gaussian noise (std 0.05) of target patches")
    checkpoint_interval: int = Field(50, gt=0, le=MAX_COUNT, description="write checkpoint 'latest' every N steps")
    log_interval: int = Field(10, gt=0, le=MAX_COUNT, description="append the mean loss to metrics.csv every N steps")
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    mean_teacher: MeanTeacherConfig = Field(default_factory=MeanTeacherConfig)
    sfda: SFDAConfig = Field(default_factory=SFDAConfig)
    tent: TentConfig = Field(default_factory=TentConfig)

    @model_validator(mode="after")
    def _checks(self) -> "AdaptSection":
        if self.method == "tent" and self.iterations > self.tent.max_iterations:
            raise ValueError(
                f"tent: iterations {self.iterations} exceeds tent.max_iterations {self.tent.max_iterations} "
                "(Tent degrades with many passes; raise adapt.tent.max_iterations to insist)"
            )
        if self.method == "pseudo_label":
            pl = self.pseudo_label
            if pl.threshold is None and pl.curriculum is None:
                raise ValueError("pseudo_label: set threshold, curriculum or both")
            if pl.curriculum is not None and len(pl.curriculum) < pl.rounds:
                raise ValueError(f"pseudo_label.curriculum: {len(pl.curriculum)} fraction(s) for {pl.rounds} rounds")
            if self.iterations < pl.rounds:
                raise ValueError(f"iterations: {self.iterations} is fewer than pseudo_label.rounds {pl.rounds}")
        if self.patch_size is not None and (len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1
                                            or max(self.patch_size) > MAX_PATCH):
            raise ValueError(f"patch_size: must be 2 or 3 integers from 1 to {MAX_PATCH}")
        return self


class AdaptConfig(_Strict):
    """``medseg adapt`` config: a source run, an unlabelled target dataset, a method."""

    source_run: Path = Field(..., description="run folder of the source model (or a checkpoint file); only read")
    target: TargetConfig
    source_data: SourceDataConfig | None = None
    adapt: AdaptSection
    output_dir: Path = Field(..., description="the NEW run folder of the adapted model")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds patch sampling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is usable, else cpu")

    @model_validator(mode="after")
    def _checks(self) -> "AdaptConfig":
        if self.source_data is not None and self.adapt.method in ("sfda", "tent"):
            raise ValueError(f"source_data: {self.adapt.method} is source-free; remove source_data or pick another method")
        return self


def validate_adapt_config(raw: dict, source: str = "config") -> AdaptConfig:
    return validate_model(AdaptConfig, raw, source)


def load_adapt_config(path: str | Path, overrides: list[str] | None = None) -> AdaptConfig:
    """Read a YAML adaptation config, apply ``--set`` overrides, validate (ConfigError naming the key)."""
    return validate_model(AdaptConfig, read_yaml_with_overrides(path, overrides), source=str(path), overrides=overrides)


def dump_adapt_config(cfg: AdaptConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""The typed run configuration: the single source of truth for options and defaults.

A config is a YAML file validated by :class:`RunConfig`; ``--set a.b=value`` overrides
dotted keys before validation. Unknown keys are errors (``extra="forbid"``) so a typo
such as ``train.iteratons`` is reported by name instead of silently ignored.

Example (``configs/quickstart.yaml``)::

    data:
      dataset: demo/Dataset001_SyntheticVessels
      patch_size: [48, 48, 48]
    train:
      iterations: 400
    output_dir: demo/runs/quickstart
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ArgumentError, ConfigError


def absolute_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute from the current folder (``..`` folded)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite float is no setting (a NaN clip bound or
    # learning rate surfaces only as a NaN loss, a negative infinity as a silent no-op)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any, info) -> Any:
        """An empty string for a path would be the current folder (a run written into it)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and not value.strip() and Path in getattr(annotation, "__args__", (annotation,)):
            raise ValueError("is empty; give a path (or leave the key out)")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, value: Any, info) -> Any:
        """true/false where a number goes: pydantic would read it as 1/0 (a loss weight of
        ``true`` trained at 1.0, a schedule ``start: true`` began at iteration 1). Text that
        is no number, where an ``int | float`` goes: one line, where pydantic gave one per
        member of the union (``key 'start.int': ...; key 'start.float': ...``)."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = getattr(annotation, "__args__", (annotation,))
        if isinstance(value, bool):
            if bool not in kinds and any(kind in (int, float) for kind in kinds):
                raise ValueError(f"must be a number, got {str(value).lower()}")
        elif {int, float} <= set(kinds) <= {int, float, type(None)} and not isinstance(value, (int, float)):
            if value is None and type(None) in kinds:
                return value
            try:
                float(value)  # a number in quotes, read as pydantic reads it
            except (TypeError, ValueError):
                raise ValueError(f"must be a number, got {'null' if value is None else repr(value)}") from None
        return value

    #: path fields a model resolves itself (another base folder than the current one)
    _paths_resolved_by_model: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _absolute_path(cls, value: Any, info) -> Any:
        """A path is made absolute (``~`` expanded, relative to the current folder) when the
        config is read: the run folder's config.yaml and its checkpoints then name the same
        files from any folder a resume or a study is started in. A stored relative path (a
        run of an earlier medseg) reads as before, from the current folder."""
        if isinstance(value, Path) and info.field_name not in cls._paths_resolved_by_model:
            return absolute_path(value)
        return value


#: Most DataLoader workers a config may ask for (each is a process holding its own copy
#: of the pipeline; a typo such as 1000000 would otherwise fork until memory runs out).
MAX_DATA_WORKERS = 64

#: Largest ``data.patch_size`` entry, and largest count (iterations, intervals): beyond
#: them a value is a typo, which would otherwise overflow deep inside numpy or torch.
MAX_PATCH = 4096
MAX_COUNT = 2**31 - 1
#: Largest weight of a loss term (a larger one only overflows the loss).
MAX_WEIGHT = 1e6


class AugmentationConfig(_Strict):
    """MONAI random augmentations applied to training patches (probabilities per patch)."""

    flip_prob: float = Field(0.5, ge=0, le=1, description="RandFlipd per spatial axis")
    rotate90_prob: float = Field(0.0, ge=0, le=1, description="RandRotate90d in the first two axes")
    affine_prob: float = Field(0.2, ge=0, le=1, description="RandAffined (rotation, scaling)")
    rotate_range_deg: float = Field(15.0, ge=0, le=180, description="RandAffined's rotation: up to this many degrees about each axis; a 3D patch more than 3 times longer than its shortest side turns about that side's axis only (in-plane, as nnU-Net), and the MIP loss's whole-volume targets allow turns about their axis only")
    scale_range: float = Field(0.1, ge=0, le=0.5, description="RandAffined's scaling: by up to this fraction")
    intensity_scale_prob: float = Field(0.15, ge=0, le=1, description="RandScaleIntensityd")
    intensity_shift_prob: float = Field(0.15, ge=0, le=1, description="RandShiftIntensityd")
    gaussian_noise_prob: float = Field(0.1, ge=0, le=1, description="RandGaussianNoised")
    gaussian_smooth_prob: float = Field(0.1, ge=0, le=1, description="RandGaussianSmoothd")
    gamma_prob: float = Field(0.1, ge=0, le=1, description="RandAdjustContrastd's gamma in (0.7, 1.5), per channel (each channel its own range and gamma, as nnU-Net)")


class NormalizationConfig(_Strict):
    """Intensity normalisation per channel, as nnU-Net chooses it from the channel name.

    ``auto``: channels named ``CT`` (case-insensitive) get ``ct`` (clip to the
    [0.5, 99.5] percentiles of the foreground intensities of the training set, then
    z-score with the foreground mean/std), ``noNorm`` gets ``none`` (intensities
    untouched), ``rescale_to_0_1`` a per-image min-max to [0, 1], ``rgb_to_0_1`` a
    division by 255, and every other channel ``zscore`` (per-image mean/std), as nnU-Net
    v2 reads these names (:data:`medseg.data.transforms.NNUNET_CHANNEL_SCHEMES`).
    """

    scheme: Literal["auto", "zscore", "ct", "rescale_to_0_1", "rgb_to_0_1", "none"] = Field(
        "auto", description="auto: by channel name as nnU-Net v2 (CT: ct, noNorm: none, rescale_to_0_1, rgb_to_0_1, "
        "others: zscore); or one scheme for all channels"
    )
    ct_clip: tuple[float, float] | None = Field(
        None, description="fixed (low, high) clip for the ct scheme instead of dataset percentiles"
    )

    @field_validator("ct_clip")
    @classmethod
    def _clip_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not -1e30 < value[0] < value[1] < 1e30:
            raise ValueError(f"must be (low, high) with low < high, both within +-1e30, got {list(value)}")
        return value


class DataConfig(_Strict):
    dataset: Path = Field(..., description="dataset folder in nnU-Net v2 / MSD layout (dataset.json inside)")
    split_file: Path | None = Field(
        None, description="JSON/YAML with 'train' and 'val' case-name lists; seeded split otherwise"
    )
    val_fraction: float = Field(0.2, ge=0, lt=1, description="validation share of the seeded split (no split_file)")
    patch_size: list[int] = Field(default_factory=lambda: [64, 64, 64], description="training patch, voxels per axis")
    target_spacing: list[float] | None = Field(
        None, description="resample to this spacing in mm (Spacingd); None keeps the native spacing"
    )
    orientation: str | None = Field("RAS", description="reorient (Orientationd) to these axis codes; None keeps it")
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    foreground_oversample: float = Field(
        0.33, ge=0, le=1,
        description="fraction of patches centred on a foreground voxel (of a class drawn among the case's); "
        "the others are placed uniformly at random",
    )
    fingerprint: Path | None = Field(
        None,
        description="fingerprint.json written by medseg plan: the normalisation statistics come from it "
        "instead of a pass over the training cases (refused when a case file changed since)",
    )
    cache_dir: Path | None = Field(
        None,
        description="folder of the preprocessed cache (medseg preprocess); None: $MEDSEG_CACHE, else "
        "$XDG_CACHE_HOME/medseg, else ~/.cache/medseg",
    )
    cache_rate: float = Field(
        0.0, ge=0, le=1,
        description="fraction of the training cases held decompressed in memory (read once from the cache); "
        "the others are read patch by patch, so memory does not grow with them",
    )
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description=f"DataLoader worker processes making patches (0-{MAX_DATA_WORKERS}; at most twice the cores "
        "are started); auto: min(cores - 1, 8) of the cores per process (0 on one core)",
    )

    _paths_resolved_by_model: ClassVar[frozenset[str]] = frozenset({"split_file"})

    @model_validator(mode="after")
    def _split_file_path(self) -> "DataConfig":
        """``split_file`` is looked up as given (from the current folder), then inside the
        dataset (nnU-Net's ``splits_final.json``); stored as the absolute path found, or
        from the current folder when neither exists (training then names it)."""
        split = self.split_file
        if split is not None and not split.is_absolute():
            found = absolute_path(split)
            inside = self.dataset / split
            if not found.is_file() and not split.parts[0].startswith("~") and inside.is_file():
                found = absolute_path(inside)
            object.__setattr__(self, "split_file", found)  # not validate_assignment: no recursion
        return self

    @field_validator("patch_size")
    @classmethod
    def _patch_dims(cls, value: list[int]) -> list[int]:
        if len(value) not in (2, 3) or any(not 1 <= v <= MAX_PATCH for v in value):
            raise ValueError(f"must be 2 or 3 integers from 1 to {MAX_PATCH}, got {value}")
        return value

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, value: list[float] | None) -> list[float] | None:
        # 1e-6 mm (1 nm) and up: electron microscopy's voxels are a few nm; 1e-40 underflowed
        # float32 in the cached affine, and every label came out empty without a word
        if value is not None and (len(value) not in (2, 3) or any(not 1e-6 <= v < 1e6 for v in value)):
            raise ValueError(f"must be 2 or 3 spacings in mm from 1e-6 (1 nm) to below 1e6, got {value}")
        return value

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str | None) -> str | None:
        if value:
            axes = ["LRPAIS".find(c) // 2 if c and c in "LRPAIS" else -1 for c in value]
            if len(value) not in (2, 3) or min(axes) < 0 or len(set(axes)) != len(axes):
                raise ValueError(
                    f"must be 2 or 3 axis codes, one of L/R, P/A, I/S per axis (e.g. RAS), or null, got {value!r}"
                )
        return value

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_DATA_WORKERS):
            return value
        raise ValueError(f"must be 'auto' or an integer from 0 to {MAX_DATA_WORKERS}, got {value!r}")


class ModelConfig(_Strict):
    """A MONAI network (:func:`medseg.models.build_model`). ``params`` go to the MONAI
    constructor unchanged; ``spatial_dims``, ``in_channels`` and ``out_channels`` are set
    by medseg and may not appear in ``params``.

    Output convention: ``out_channels`` is the number of classes in dataset.json,
    background included (2 for a binary vessel dataset); the network emits logits for a
    softmax over classes and the segmentation is their argmax.

    Defaults per name (overridden by ``params``):

    ``unet`` (MONAI ``UNet``): channels (16, 32, 64, 128), strides (2, 2, 2) (one 2 per
    level when only ``channels`` is given), num_res_units 2, norm INSTANCE; the patch
    must be divisible by the product of the strides.
    ``dynunet`` (``DynUNet``): kernels 3 and strides planned from the patch size as
    nnU-Net does (:func:`medseg.models.dynunet_plan`: stride 1 first, then halve every
    even axis of at least 8, leaving at least 4 at the bottleneck), upsample_kernel_size =
    strides[1:], norm_name instance, deep_supervision false (true: the loss is taken on every head, nnU-Net's weights,
    see :mod:`medseg.losses.deep_supervision`; inference uses the final output).
    ``unetr`` (``UNETR``): img_size = the patch size (each axis a multiple of 16),
    feature_size 16, MONAI's hidden_size 768 / mlp_dim 3072 / num_heads 12.
    ``swinunetr`` (``SwinUNETR``): feature_size 24 (a multiple of 12); each patch axis a
    multiple of 32 and, with instance norm, at least 64.
    """

    name: Literal["unet", "dynunet", "unetr", "swinunetr"] = Field("unet", description="the MONAI network")
    params: dict[str, Any] = Field(default_factory=dict, description="the MONAI constructor's arguments (see ModelConfig)")

    @field_validator("params")
    @classmethod
    def _sizes(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The sizes and counts among the MONAI arguments, checked before MONAI sees them
        (a float, a zero or 10**30 there fails deep in the first forward pass, or never ends)."""
        for key, (low, high) in _SIZE_PARAMS.items():
            if key in params and not (key in _OPTIONAL_PARAMS and params[key] is None) \
                    and not _sizes_within(params[key], low, high):
                raise ValueError(
                    f"{key}: must be an integer from {low} to {high} or a non-empty list of them, got {params[key]!r}"
                )
        return params


# MONAI constructor arguments that are sizes or counts (per axis, per level), with their ranges
_SIZE_PARAMS: dict[str, tuple[int, int]] = {
    **{k: (1, 2**16) for k in ("channels", "strides", "kernel_size", "upsample_kernel_size", "filters", "img_size",
                              "feature_size", "hidden_size", "mlp_dim", "num_heads", "patch_size")},
    "num_res_units": (0, 64),  # blocks per level
    "depths": (1, 64),
}
_OPTIONAL_PARAMS = {"filters", "upsample_kernel_size"}


def _sizes_within(value: Any, low: int, high: int, depth: int = 0) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and depth < 2 and all(_sizes_within(v, low, high, depth + 1) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


#: The largest learning rate a config takes (train.optimizer.lr, adapt.lr).
MAX_LR = 1e6


class LossTerm(_Strict):
    """One weighted term of the training loss; extra keys are the loss's parameters.

    ``start`` and ``ramp`` schedule the term's weight over training, as the clDice
    authors and TopoMortar (``activate_when``) switch a topology loss on only once the
    network segments roughly: the term is off for the first ``start`` steps (logged
    iterations 1 to ``start``), then its weight rises linearly to ``weight``, reached at
    logged iteration ``start + ramp``. Each is an iteration count (an integer) or a
    fraction of ``train.iterations`` (a number in [0, 1)). A term its schedule holds at
    0 is not computed at that iteration; a term of ``weight: 0`` is computed and logged
    only (a value to watch), never trained on.

    ``heads`` matters with deep supervision only: ``all`` (the default) computes the term
    on every output head, ``final`` on the full-resolution output alone, with the share of
    the weight that head has under ``all`` (see :mod:`medseg.losses.deep_supervision`). A
    persistence loss on DynUNet's upsampled heads costs one full-size matching per head;
    ``final`` keeps one. Under ``all`` the Betti matching term runs the heads' matchings
    in one engine call and prepares each target's barcode once for all of them
    (``BettiMatchingLoss.forward_heads``: 9-12 % less than a call per head on 2 cores,
    and the threads kept busy where the batch alone is smaller than their number).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = Field(..., description="a loss of medseg.losses.LOSS_NAMES; other keys are its parameters")
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="its weight in the sum")
    start: int | float = Field(0, ge=0, description="steps the term is off (logged iterations 1 to start): an integer, or a fraction < 1 of train.iterations")
    ramp: int | float = Field(0, ge=0, description="iterations (or a fraction < 1 of train.iterations) to reach the full weight")
    heads: Literal["all", "final"] = Field("all", description="with deep supervision: the term on every head, or the final output only")

    @field_validator("start", "ramp")
    @classmethod
    def _count_or_fraction(cls, value: int | float, info) -> int | float:
        if isinstance(value, float) and value >= 1:
            if value.is_integer():
                return int(value)
            raise ValueError(f"{info.field_name} must be an integer iteration or a fraction below 1, got {value}")
        return value

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def schedule(self, iterations: int) -> tuple[int, int]:
        """(first iteration index, ramp length) in iterations for a run of ``iterations``."""
        return resolve_schedule(self.start, self.ramp, iterations)


def resolve_schedule(start: int | float, ramp: int | float, iterations: int) -> tuple[int, int]:
    """A loss term's ``start`` and ``ramp`` (integers: iterations; floats: fractions of
    ``iterations``) as (first iteration index, ramp length in iterations)."""

    def count(value: int | float) -> int:
        return int(round(value * iterations)) if isinstance(value, float) else int(value)

    return count(start), count(ramp)


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="torch.optim's AdamW, Adam or SGD")
    # le: a learning rate float32 cannot hold (1e39) failed at the first step, after the run
    # folder was written, with a traceback; nothing trains above 1e6 either
    lr: float = Field(1e-3, gt=0, le=MAX_LR, description="initial learning rate")
    weight_decay: float = Field(1e-5, ge=0, le=1, description="the optimizer's weight decay (at most 1)")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD only (nesterov)")


class SchedulerConfig(_Strict):
    name: Literal["poly", "cosine", "constant"] = Field(
        "poly", description="after the warm-up, lr times (1 - t)^poly_power (poly, nnU-Net's), (1 + cos(pi t))/2 "
        "(cosine) or 1 (constant), t the share of the steps after the warm-up done"
    )
    warmup_iterations: int = Field(0, ge=0, description="linear warm-up over this many steps (from lr/warmup to lr)")
    poly_power: float = Field(0.9, gt=0, description="the poly schedule's exponent")


# What ``medseg train CONFIG --resume`` may change against the run's checkpoint: dotted
# keys, each covering its sub-keys (TrainConfig's docstring has the table). Any other
# change is refused before the run folder is touched (medseg.training.trainer).
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.iterations",
    "train.val_interval",
    "train.checkpoint_interval",
    "train.log_interval",
    "data.num_workers",
    "data.cache_dir",
    "data.cache_rate",
    "inference",
    "device",
    "output_dir",
)


class TrainConfig(_Strict):
    """Optimizer steps, batch, intervals, optimizer and learning-rate schedule.

    What a resumed run (``medseg train CONFIG --resume``) may change is
    :data:`RESUME_MAY_CHANGE`; everything else is fixed by the checkpoint:

    =================================  ===================================================
    key                                on ``--resume``
    =================================  ===================================================
    ``train.iterations``               may change, not below the checkpoint's iteration
                                       (extend or shorten a run); the LR schedule and loss
                                       terms' fractional ``start`` / ``ramp`` then follow
                                       the new total from the resumed step on (with
                                       ``poly`` the LR steps up at that step), so the
                                       result is not the run trained with the new total
                                       from the start
    ``train.val_interval``,            may change
    ``train.checkpoint_interval``,
    ``train.log_interval``
    ``data.num_workers``,              may change (where and how fast patches are read;
    ``data.cache_dir``,                patches depend only on the seed and the iteration)
    ``data.cache_rate``
    ``inference.*``, ``device``,       may change (``device``: the run continues on it)
    ``output_dir``
    ``model.*``, ``losses``,           refused: they shape the network and what it is
    ``seed``                           trained on
    ``train.optimizer.*``,             refused: the optimizer state and the schedule in
    ``train.scheduler.*``,             the checkpoint belong to them (a changed ``lr`` or
    ``train.batch_size``,              ``weight_decay`` would be overridden by it)
    ``train.amp``, ``train.grad_clip``,
    ``train.deterministic``
    ``data.*`` (all other keys:        refused: the patches (dataset, split, spacing,
    ``dataset``, ``patch_size``, ...)  orientation, normalisation, augmentation,
                                       foreground oversampling, fingerprint)
    =================================  ===================================================

    A refusal is one line naming the key and both values; the run folder (``config.yaml``
    included) is left as it was. Start a new ``output_dir`` to train with other values.
    """

    iterations: int = Field(..., gt=0, le=MAX_COUNT, description="total optimizer steps")
    batch_size: int = Field(
        2, gt=0, le=2**16, description="the global batch: patches per optimizer step, split evenly over torchrun processes"
    )
    val_interval: int = Field(100, gt=0, le=MAX_COUNT, description="validate (sliding window on whole val cases) every N steps")
    checkpoint_interval: int = Field(50, gt=0, le=MAX_COUNT, description="write checkpoint 'latest' every N steps")
    log_interval: int = Field(10, gt=0, le=MAX_COUNT, description="append the mean training loss to metrics.csv every N steps")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    amp: bool = Field(True, description="automatic mixed precision; only takes effect on CUDA")
    grad_clip: float | None = Field(12.0, gt=0, description="clip the gradient norm; None disables")
    deterministic: bool = Field(
        False, description="torch's deterministic algorithms and cuDNN's (slower; warns where none exists)"
    )


class InferenceConfig(_Strict):
    overlap: float = Field(0.5, ge=0, lt=1, description="sliding-window overlap (predict --overlap)")
    sw_batch_size: int = Field(4, gt=0, description="windows per forward pass (predict --sw-batch-size)")
    mode: Literal["gaussian", "constant"] = Field("gaussian", description="blending of overlapping windows")
    tta_flips: bool = Field(False, description="average predictions over axis flips")
    save_probabilities: bool = Field(False, description="predict also writes CASE_prob.nii.gz")
    stitch_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the whole-volume class maps (float16) are kept while windows are stitched: "
        "cuda (the network's GPU), cpu, or auto (the GPU when they take at most half of its free memory)",
    )


class RunConfig(_Strict):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="dice_ce", weight=1.0)])
    train: TrainConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    output_dir: Path = Field(..., description="the run folder: checkpoints, logs, resolved config")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the split, model init, patch sampling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is usable, else cpu")

    @model_validator(mode="after")
    def _has_loss(self) -> "RunConfig":
        if not self.losses:
            raise ValueError("losses: at least one loss term is required")
        for i, term in enumerate(self.losses):
            first, _ = term.schedule(self.train.iterations)
            if first >= self.train.iterations:
                raise ValueError(
                    f"losses[{i}] ({term.name}): start {term.start} is iteration {first}, at or after the end of "
                    f"training (train.iterations = {self.train.iterations}); the term would never be used"
                )
        # terms only ever switch on, so a step without any is one of the first: its loss
        # would be a constant 0 with nothing to differentiate (step 1 failed in backward)
        weighted = [term for term in self.losses if term.weight > 0]
        if not weighted:
            raise ValueError("losses: every term has weight 0; nothing would be trained")
        first = min(term.schedule(self.train.iterations)[0] for term in weighted)
        if first > 0:
            raise ValueError(
                f"losses: no term is on in iterations 1 to {first} (every term's start is later); "
                "let one term (e.g. dice_ce) start at 0"
            )
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.data.patch_size)


# --------------------------------------------------------------------------- loading

def _parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except (RecursionError, ValueError) as err:  # [[[[... nested thousands deep; an integer of 4,300+ digits
        raise ConfigError(f"--set value {text[:40]!r}{'...' if len(text) > 40 else ''}: {_yaml_limit(err)}") from None


def _yaml_limit(err: BaseException) -> str:
    """What a YAML text that parses yet cannot be built ran into, in words."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return f"a value Python cannot read ({str(err).splitlines()[0]})"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides with dotted keys (``train.iterations=10``) to a raw dict."""
    for item in overrides:
        if "=" not in item:
            raise ArgumentError("overrides", "expected KEY=VALUE, e.g. train.iterations=100", repr(item), flag="--set")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ArgumentError("overrides", "empty key segment", repr(item), flag="--set")
        section(raw, parts[:-1], f"--set {key}")[parts[-1]] = _parse_scalar(value)
    return raw


def section(raw: dict[str, Any], path: list[str], where: str) -> dict[str, Any]:
    """The mapping at dotted ``path`` in a raw config, created where missing.

    Raises:
        ConfigError: ``{where}: 'part' is not a section`` when a value stands in the way.
    """
    node = raw
    for part in path:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is not a section")
        node = child
    return node


def _loss_term_named(raw: Any, loc: tuple) -> str:
    """`` (NAME)`` when ``loc`` lies inside a loss term of ``raw`` (``losses.0.weight`` of a
    ``{name: dice_ce}`` term), else ``""``: the term's name says which one is meant."""
    node = raw
    for i, part in enumerate(loc):
        if isinstance(part, int) and i > 0 and loc[i - 1] == "losses" and isinstance(node, list) and part < len(node):
            name = node[part].get("name") if isinstance(node[part], dict) else None
            return f" ({name})" if isinstance(name, str) and i + 1 < len(loc) else ""
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return ""
    return ""


def _format_validation_error(
    source: str, err: ValidationError, overrides: list[str] | None = None, raw: Any = None
) -> str:
    """One line: ``SOURCE: problem; problem``, where a problem with a key a ``--set`` gave is
    ``--set KEY=VALUE: problem`` (the mistake is on the command line, not in the file), and a
    key inside a loss term is followed by the term's name."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides or []}
    problems, from_set = [], []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        term = _loss_term_named(raw, e["loc"])
        if e["type"] == "extra_forbidden":
            problem = keyed = f"unknown key '{loc}'{term}"
        elif e["type"] == "missing":
            problem, keyed = "missing", f"missing required key '{loc}'{term}"
        elif not e["loc"]:  # a model-level check names its keys itself; drop pydantic's "Value error, "
            problem = keyed = e["msg"].removeprefix("Value error, ")
        else:  # a field check's own message, without pydantic's "Value error, "
            msg = e["msg"].removeprefix("Value error, ")
            problem, keyed = msg, f"key '{loc}'{term}: {msg}"
        # an unknown section ('trian' of --set trian.iterations=5) is the --set's mistake too,
        # and so is a key inside a value the --set gave (losses.0.name of --set losses=[...])
        item = given.get(loc) or next(
            (v for k, v in given.items() if k.startswith(f"{loc}.") or loc.startswith(f"{k}.")), None
        )
        if item is not None:  # the key itself when the --set names another (a section, or a value holding it)
            from_set.append(f"--set {item}: {problem if loc in given else keyed}")
        else:
            problems.append(keyed)
    return "; ".join(from_set + ([f"{source}: " + "; ".join(problems)] if problems else []))


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_model(
    schema: type[ModelT], raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None
) -> ModelT:
    """Validate a raw dict against a config schema; :class:`ConfigError` names the key, and
    the ``--set`` of ``overrides`` that gave it where one did."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err, overrides, raw)) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} appears twice (line {line})")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last silently: a study with two variants of one name ran only one of them)."""

    def construct_mapping(self, node, deep=False):  # noqa: D102
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *defaults, merged by the base class (its keys
                continue  # may be given again here: the explicit one wins, as YAML says)
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def example_configs_folder() -> Path | None:
    """The example configs: ``configs/`` of the checkout medseg runs from, else the copy a
    wheel installs beside the package (``medseg/configs``, CMakeLists.txt); None when
    neither is there."""
    package = Path(__file__).resolve().parent
    for folder in (package.parent / "configs", package / "configs"):
        if (folder / "quickstart.yaml").is_file():
            return folder
    return None


def read_yaml_with_overrides(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping and apply ``--set`` overrides; one-line ConfigError on a bad file."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if not path.exists() and path.parts[:1] == ("configs",):  # the README's examples, run outside a checkout
            examples = example_configs_folder()
            shipped = examples / Path(*path.parts[1:]) if examples is not None else None
            if shipped is not None and shipped.is_file():
                hint = f"; medseg's example is {shipped}: copy it here and edit its paths"
            else:
                hint = "; `medseg plan DATASET` writes a config for a dataset"
        raise ConfigError(f"{path}: " + ("is not a file" if path.exists() else "config file not found") + hint)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: unreadable ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except (RecursionError, ValueError) as err:
        raise ConfigError(f"{path}: {_yaml_limit(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return apply_overrides(raw, overrides or [])


def validate_config(raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`; raises :class:`ConfigError` naming the key
    (and the ``--set`` of ``overrides`` that gave it)."""
    return validate_model(RunConfig, raw, source, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, validate.

    Relative paths in the config (``data.dataset``, ``output_dir``, ``data.split_file``)
    are taken relative to the current working directory, as the CLI user typed them.
    """
    return validate_model(RunConfig, read_yaml_with_overrides(path, overrides), source=str(path), overrides=overrides)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder stores as ``config.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

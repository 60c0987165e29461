"""Loss names -> loss modules, and the weighted sum a run config asks for.

A run config lists loss terms, each ``{name, weight, **params}``::

    losses:
      - {name: dice_ce, weight: 1.0}
      - {name: cldice, weight: 0.5, iterations: 5}

:func:`build_loss` turns that list into a :class:`CompositeLoss`; :func:`get_loss` builds
one loss by name. Parameters are checked against the loss's constructor, so a typo is an
error that names the loss and the parameter instead of being ignored.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from medseg.config import LossTerm, resolve_schedule, validate_model
from medseg.errors import ConfigError
from medseg.losses._prepare import shared_preparation, summable
from medseg.losses.deep_supervision import combine_heads


def _import(module: str, attr: str) -> Callable[[], type]:
    def load() -> type:
        return getattr(importlib.import_module(module), attr)

    return load


# Each entry is loaded on first use. betti_matching lives in a module written separately
# (issue B); the registry must work, and name it, whether or not that module is present.
_REGISTRY: dict[str, Callable[[], type]] = {
    "dice": _import("medseg.losses.dice", "DiceLoss"),
    "dice_ce": _import("medseg.losses.dice", "DiceCELoss"),
    "cldice": _import("medseg.losses.cldice", "SoftclDiceLoss"),
    "skeleton_recall": _import("medseg.losses.skeleton_recall", "SkeletonRecallLoss"),
    "mip": _import("medseg.losses.mip", "MIPLoss"),
    "sauna": _import("medseg.losses.sauna", "SaunaLoss"),
    "cbdice": _import("medseg.losses.cbdice", "CenterlineBoundaryDiceLoss"),
    "clce": _import("medseg.losses.clce", "CenterlineCrossEntropyLoss"),
    "betti_matching": _import("medseg.losses.betti_matching", "BettiMatchingLoss"),
}

#: Every loss name a config may use.
LOSS_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _loss_class(name: str, where: str) -> type:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, LOSS_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown loss '{name}'{hint}; valid: {', '.join(LOSS_NAMES)}")
    try:
        return _REGISTRY[name]()
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"{where} ({name}): this loss is not available in this installation "
            f"(module {err.name or 'unknown'} is missing)"
        ) from None
    except ImportError as err:
        raise ConfigError(f"{where} ({name}): this loss could not be loaded: {err}") from None


def _activation(terms: Iterable[tuple[type, bool]], out_channels: int) -> str:
    """``terms``: (class, whether it reads the outputs through sigmoids) per term."""
    terms = list(terms)
    if all(getattr(cls, "output_activation", None) == "tanh" for cls, _ in terms):
        return "tanh"
    if out_channels == 1 or any(sigmoid for _, sigmoid in terms):  # build_loss refuses a mix
        return "sigmoid"
    return "softmax"


def output_activation(terms: Iterable[LossTerm], out_channels: int) -> str:
    """How a model trained with the loss ``terms`` maps its output to per-class maps.

    'tanh' when every term is a regression of signed targets (SAUNA), 'sigmoid' for one
    channel or a multi-label head (terms with ``sigmoid: true``), else 'softmax'. The mask
    is ``output > 0`` for one channel and the argmax over channels for more, whatever the
    activation (the activations keep the order of the channels); the probabilities that
    ``predict`` saves and the test-time flips average are the activation's.
    """
    return _activation([(_loss_class(t.name, "losses"), bool(t.params().get("sigmoid"))) for t in terms],
                       out_channels)


def _parameters(cls: type) -> tuple[list[str], bool]:
    """Constructor parameter names, and whether it takes ``**kwargs``."""
    sig = inspect.signature(cls.__init__)
    names, var_kw = [], False
    for p in list(sig.parameters.values())[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return names, var_kw


def _value_problem(annotation: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for a constructor parameter annotated ``annotation``
    (bool, int, float, str, a sequence of numbers, each optionally ``| None``), or None
    (also for annotations this does not check, left to the constructor).

    Why: a loss's parameters come from YAML as they are written, past pydantic, and
    Python takes anything for a flag: ``include_background: "false"`` (quoted) trained
    on the background as with ``true``, and a NaN smoothing term first showed as a NaN
    loss at the first step, after the run folder was written."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if args:
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            return None
        annotation = kinds[0]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number" if annotation is float else "must be a whole number"
        if annotation is int and not isinstance(value, int):
            return "must be a whole number"
        return None if math.isfinite(value) else "must be a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple, collections.abc.Sequence) and typing.get_args(annotation)[:1] == (float,):
        if not isinstance(value, (list, tuple)):
            return "must be a list of numbers"
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
            return "must be a list of finite numbers"
    return None


#: Parameters no loss takes below 0, whichever loss has them (MONAI checks a negative class
#: weight only in the first step; a negative smoothing term or cache budget passed silently).
_NON_NEGATIVE = ("smooth_nr", "smooth_dr", "class_weights", "target_cache_bytes")


def _check_values(cls: type, params: Mapping[str, Any], name: str, where: str) -> None:
    """Each parameter's value against its annotation in the loss's constructor
    (:func:`_value_problem`), and the :data:`_NON_NEGATIVE` ones against 0."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation this Python cannot resolve: left to the constructor
        return
    for key, value in params.items():
        problem = _value_problem(hints[key], value) if key in hints else None
        if problem is None and key in _NON_NEGATIVE and value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, (int, float)) and v < 0 for v in values):
                problem = "must not be negative"
        if problem is not None:
            raise ConfigError(f"{where} ({name}): {key} {problem}, got {value!r}")


def _make(name: str, params: Mapping[str, Any], where: str) -> nn.Module:
    cls = _loss_class(name, where)
    valid, var_kw = _parameters(cls)
    if not var_kw:
        for key in params:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"{where} ({name}): unknown parameter '{key}'{hint}; valid: {', '.join(valid) or '(none)'}"
                )
    _check_values(cls, params, name, where)
    try:
        return cls(**params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where} ({name}): {err}") from None


def get_loss(name: str, **params: Any) -> nn.Module:
    """The loss called ``name``, built with ``params``; called as ``loss(input, target)``.

    ``input`` is the raw network output (B, C, *spatial), ``target`` the integer label map
    (B, 1, *spatial). Activations default to sigmoid for one channel and softmax for more
    (see :mod:`medseg.losses._prepare`).

    Raises:
        ConfigError: unknown name, unknown parameter, or a bad parameter value.
    """
    return _make(name, params, "loss")


def _accepts(module_cls: type, key: str) -> bool:
    valid, var_kw = _parameters(module_cls)
    return key in valid or var_kw


def _term_name(name: str, seen: dict[str, int]) -> str:
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}_{seen[name]}"


class CompositeLoss(nn.Module):
    """``total = Σ weight_i · term_i(input, target)``, with each term's value for logging.

    ``forward(input, target, batch)`` returns ``(total, parts)`` where ``parts`` maps each
    term's unique name (``'cldice'``, ``'cldice_2'`` when repeated) to its detached,
    *unweighted* value. Terms that can use a target precomputed by the data pipeline
    (``skeleton_recall``: ``'skeleton'``, ``sauna``: ``'sauna'``, ``cbdice`` and ``clce``:
    ``'skeleton_distance'``, ``mip`` with ``target_projection='volume'``: ``'label_mip'``)
    receive ``batch[key]`` when present.
    The terms see ``input`` as float32, also under mixed precision, and share its
    activation and the encoded target within one call
    (:func:`~medseg.losses._prepare.shared_preparation`: one softmax forward and backward
    per step, not one per term).

    Schedules: ``schedules[i] = (start, ramp)`` of :class:`~medseg.config.LossTerm`. After
    :meth:`set_iteration` the weight of term i is ``weight_i · clip((t - start + 1) / ramp,
    0, 1)`` at iteration index t (0 before ``start``, full at once when ``ramp`` is 0); a
    term its schedule holds at 0 is skipped (not computed, and absent from ``parts``),
    while a term configured with weight 0 is computed and logged in ``parts`` (a metric
    watched during training) and adds nothing to the loss. Without
    :meth:`set_iteration` every term has its full weight.

    ``final_only[i]``: term i is skipped on the deep-supervision heads (``forward`` with
    ``head > 0``), the ``heads: final`` of :class:`~medseg.config.LossTerm`.
    """

    def __init__(
        self,
        terms: Iterable[tuple[str, float, nn.Module]],
        out_channels: int,
        schedules: Iterable[tuple[int | float, int | float]] | None = None,
        final_only: Iterable[bool] | None = None,
    ) -> None:
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ConfigError("losses: at least one loss term is required")
        self.final_only = list(final_only) if final_only is not None else [False] * len(terms)
        if len(self.final_only) != len(terms):
            raise ValueError(f"{len(self.final_only)} final_only flags for {len(terms)} loss terms")
        self.names = [t[0] for t in terms]
        self.weights = [float(t[1]) for t in terms]
        self.terms = nn.ModuleList(t[2] for t in terms)
        self.out_channels = out_channels
        self.schedules = list(schedules) if schedules is not None else [(0, 0)] * len(terms)
        if len(self.schedules) != len(terms):
            raise ValueError(f"{len(self.schedules)} schedules for {len(terms)} loss terms")
        self.current_weights = list(self.weights)

    def check_backends(self) -> None:
        """Raise ConfigError, naming the term, when a term's engine ``backend`` cannot run
        here (``backend: cuda`` without a CUDA device): the trainer asks before it writes
        the run folder, where the first step found it and the folder then blocked the
        corrected run. Not at build time: a config is also read where it does not train
        (preprocessing on a CPU node)."""
        from medseg.errors import MedsegError
        from medseg.topology._backends import resolve_backend

        for i, (name, term) in enumerate(zip(self.names, self.terms)):
            backend = getattr(term, "backend", None)
            if isinstance(backend, str):
                try:
                    resolve_backend(backend)
                except MedsegError as err:
                    raise ConfigError(f"losses[{i}] ({name}).backend: {err}") from None

    def set_iteration(self, iteration: int, total: int) -> list[float]:
        """Set (and return) each term's weight for iteration index ``iteration`` of ``total``."""
        weights = []
        for weight, (start, ramp) in zip(self.weights, self.schedules):
            first, length = resolve_schedule(start, ramp, total)
            if iteration < first:
                factor = 0.0
            else:
                factor = 1.0 if length <= 0 else min(1.0, (iteration - first + 1) / length)
            weights.append(weight * factor)
        self.current_weights = weights
        return weights

    @property
    def derived_target_keys(self) -> set[str]:
        """Batch keys that the terms read when present (and compute themselves otherwise)."""
        keys: set[str] = set()
        for term in self.terms:
            keys.update(getattr(term, "batch_keys", {}) or {})
        return keys

    @property
    def output_activation(self) -> str:
        """See :func:`output_activation`."""
        return _activation([(type(t), bool(getattr(t, "sigmoid", False))) for t in self.terms], self.out_channels)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, batch: Mapping[str, Any] | None = None, head: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``head``: which deep-supervision output ``input`` is (0: the final one)."""
        # Sums over a 96^3 patch overflow float16; the terms are computed in float32 even
        # when the network runs under autocast (float64 stays float64).
        _check_logits(input, self.out_channels)
        input = summable(input)
        values = {}
        with shared_preparation():  # the terms share one activation of input, one encoding of target
            for name, _, term, final_only in self._active_terms():
                if final_only and head > 0:
                    continue  # heads: final
                extra = self._batch_inputs(term, batch, input.device)
                values[name] = self._term_value(name, term, input, target, extra)
        return self._weighted(values, input.device)

    def forward_heads(
        self, outputs: torch.Tensor, target: torch.Tensor, batch: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over deep-supervision heads, ``sum_i w_i * forward(outputs[:, i], head=i)``
        (:func:`~medseg.losses.deep_supervision.deep_supervision_loss`, the same sums in the
        same order). ``outputs`` (B, 1 + H, C, *spatial). A term with a ``forward_heads``
        of its own (Betti matching: one engine call for all heads) computes every head in
        one call, the others head by head. Returns ``(total, parts)``, each part the
        term's weighted mean over the heads it ran on (the head weights normalised to
        those heads: a ``final`` term's part is its value on the final output).
        """
        _check_logits(outputs, self.out_channels, channel_axis=2)
        outputs = summable(outputs)
        count = outputs.shape[1]
        head_outputs = outputs.unbind(1)  # one tensor per head, shared by the terms (shared_preparation)
        per_head: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
        with shared_preparation():
            for name, _, term, final_only in self._active_terms():
                heads = 1 if final_only else count
                extra = self._batch_inputs(term, batch, outputs.device)
                if heads > 1 and hasattr(term, "forward_heads") and not extra:
                    values = _plain(term.forward_heads(outputs, target))
                    if values.shape != (heads,):
                        raise ValueError(f"loss term '{name}' returned shape {tuple(values.shape)} for {heads} heads")
                    for i in range(heads):
                        per_head[i][name] = values[i]
                else:
                    for i in range(heads):
                        per_head[i][name] = self._term_value(name, term, head_outputs[i], target, extra)
        return combine_heads((self._weighted(values, outputs.device) for values in per_head), count, outputs.device)

    def _active_terms(self) -> Iterable[tuple[str, float, nn.Module, bool]]:
        """(name, current weight, term, final only) of the terms computed at this iteration."""
        for name, weight, configured, term, final_only in zip(
            self.names, self.current_weights, self.weights, self.terms, self.final_only
        ):
            if weight == 0.0 and configured != 0.0:
                continue  # scheduled off at this iteration: not computed
            yield name, weight, term, final_only

    @staticmethod
    def _batch_inputs(term: nn.Module, batch: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
        """The term's precomputed targets from the batch (its ``batch_keys``), on ``device``."""
        extra = {}
        if batch is not None:
            for key, arg in (getattr(term, "batch_keys", {}) or {}).items():
                if key in batch and batch[key] is not None:
                    value = batch[key]
                    extra[arg] = value.to(device) if isinstance(value, torch.Tensor) else value
        return extra

    @staticmethod
    def _term_value(
        name: str, term: nn.Module, input: torch.Tensor, target: torch.Tensor, extra: Mapping[str, Any]
    ) -> torch.Tensor:
        """The term's scalar value; ``extra``: its inputs from the batch (:meth:`_batch_inputs`)."""
        value = term(input, target, **extra)
        if value.dim() != 0:
            raise ValueError(f"loss term '{name}' returned shape {tuple(value.shape)}; a scalar is required")
        return _plain(value)

    def _weighted(
        self, values: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sum of weight * value in the terms' order, each value detached)``."""
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        for name, weight, _, _ in self._active_terms():
            if name in values:
                parts[name] = values[name].detach()
                total = total + weight * values[name]
        return total, parts

    def target_transforms(self) -> list:
        """MONAI dictionary transforms (on key 'label') that precompute the terms' targets.

        To run after spatial augmentation and cropping; see :func:`required_target_transforms`.
        """
        from medseg.data.topology_targets import SaunaTargetd, SkeletonDistanced, SkeletonTubed

        transforms, done = [], set()
        for term in self.terms:
            keys = getattr(term, "batch_keys", {}) or {}
            if "skeleton" in keys and "skeleton" not in done:
                transforms.append(SkeletonTubed("label", "skeleton", term.tube_radius, term.footprint))
                done.add("skeleton")
            if "sauna" in keys and "sauna" not in done:
                transforms.append(
                    SaunaTargetd(
                        "label",
                        "sauna",
                        num_classes=self.out_channels,
                        spacing=term.spacing,
                        inside_window=term.inside_window,
                        outside_window=term.outside_window,
                    )
                )
                done.add("sauna")
            if "skeleton_distance" in keys and "skeleton_distance" not in done:
                # one target for every term that reads it: with the background if any scores
                # it, and the (costly) thinning if any reads the skeleton
                readers = [t for t in self.terms if "skeleton_distance" in (getattr(t, "batch_keys", {}) or {})]
                transforms.append(
                    SkeletonDistanced(
                        "label", "skeleton_distance", num_classes=self.out_channels,
                        include_background=any(getattr(t, "include_background", False) for t in readers),
                        skeleton=any(getattr(t, "reads_label_skeleton", True) for t in readers),
                    )
                )
                done.add("skeleton_distance")
        return transforms

    def pre_crop_transforms(self) -> list:
        """Transforms to run on the whole volume *before* cropping (the MIP loss's
        ``target_projection='volume'``: writes 'label_mip', which the crop must also cut)."""
        from medseg.data.topology_targets import LabelProjectiond

        for term in self.terms:
            if "label_mip" in (getattr(term, "batch_keys", {}) or {}):
                axes = [a if isinstance(a, int) else {"x": 0, "y": 1, "z": 2}[a] for a in term.axes]
                return [LabelProjectiond("label", "label_mip", axes=axes)]
        return []


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MONAI's MetaTensor inputs propagate into the loss values), same graph."""
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _check_logits(input: Any, out_channels: int, channel_axis: int = 1) -> None:
    """The composite's input before its terms see it: a tensor (numpy arrays failed with
    ``AttributeError: ... 'dim'``), floating-point (integer "logits" were taken in
    silence, where every term refuses them, check_input), with the channels the loss was
    built for (a composite for 1 channel trained a 3-channel output as a multi-label
    sigmoid head, silently)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"CompositeLoss: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise ValueError(f"CompositeLoss: input must be floating-point logits or probabilities, got dtype {input.dtype}")
    if input.dim() > channel_axis and input.shape[channel_axis] != out_channels:
        raise ValueError(
            f"CompositeLoss: input {tuple(input.shape)} has {input.shape[channel_axis]} channels (axis "
            f"{channel_axis}), but the loss was built for out_channels={out_channels}"
        )


def build_loss(terms: list[LossTerm], out_channels: int, spatial_dims: int | None = None) -> CompositeLoss:
    """The weighted sum of the config's loss terms for a model with ``out_channels`` outputs.

    With ``spatial_dims`` (2 or 3), parameters that name spatial axes (``mip``'s ``axes``)
    are checked against it here, so such a mistake shows before training starts.

    Activation convention: for ``out_channels == 1`` every term that takes ``sigmoid`` gets
    ``sigmoid=True`` (a binary sigmoid head); for ``out_channels > 1``, ``softmax=True`` and
    ``to_onehot_y=True``. A value the user set in the term wins.

    Raises:
        ConfigError: naming the term (``losses[1] (cldice): unknown parameter 'iteratons';
            valid: ...``) for an unknown loss or parameter, a bad value, ``softmax`` with one
            output channel, or a term that does not return a scalar (``reduction='none'``).
    """
    if out_channels < 1:
        raise ConfigError(f"losses: out_channels must be >= 1, got {out_channels}")
    if not terms:
        raise ConfigError("losses: at least one loss term is required")
    built, names, schedules, final_only, seen = [], [], [], [], {}
    for i, term in enumerate(terms):
        if not isinstance(term, LossTerm):
            name = term.get("name") if isinstance(term, dict) else None
            term = validate_model(LossTerm, term, f"losses[{i}]" + (f" ({name})" if isinstance(name, str) else ""))
        schedules.append((term.start, term.ramp))
        final_only.append(term.heads == "final")
        where = f"losses[{i}]"
        params = term.params()
        cls = _loss_class(term.name, where)
        if params.get("reduction") == "none":
            raise ConfigError(f"{where} ({term.name}): reduction 'none' gives no scalar to train on; use 'mean' or 'sum'")
        if out_channels == 1 and params.get("softmax"):
            raise ConfigError(f"{where} ({term.name}): softmax=True needs out_channels > 1 (the model has 1)")
        defaults = (
            {"sigmoid": True, "softmax": False}
            if out_channels == 1
            else {"softmax": True, "sigmoid": False, "to_onehot_y": True}
        )
        if params.get("sigmoid") and out_channels > 1:
            defaults = {"softmax": False}  # multi-label sigmoid head chosen by the user
        for key, value in defaults.items():
            if key not in params and _accepts(cls, key):
                params[key] = value
        if out_channels > 1 and params.get("to_onehot_y") is False:
            # training's targets are (B, 1, ...) label maps: compared channel by channel with
            # the outputs they failed at step 1, after the run folder was written
            raise ConfigError(f"{where} ({term.name}): to_onehot_y: false with {out_channels} output channels; "
                              "medseg's targets are label maps, and one-hot targets are recognised by their "
                              "shape, so leave to_onehot_y out")
        if out_channels > 1 and params.get("softmax") is False and not params.get("sigmoid"):
            # the terms would read the network's raw logits as probabilities (a clDice of
            # -1.4e6, trained on in silence)
            raise ConfigError(f"{where} ({term.name}): softmax: false leaves the {out_channels} output channels "
                              "without an activation (medseg's networks output logits); set sigmoid: true for a "
                              "multi-label head, or leave softmax out")
        module = _make(term.name, params, where)
        if hasattr(module, "check_channels"):
            try:
                module.check_channels(out_channels)
            except ValueError as err:
                raise ConfigError(f"{where} ({term.name}): {err}") from None
        if spatial_dims is not None and hasattr(module, "check_spatial_dims"):
            try:
                module.check_spatial_dims(spatial_dims)
            except ValueError as err:
                raise ConfigError(f"{where} ({term.name}): {err}") from None
        built.append((_term_name(term.name, seen), term.weight, module))
        names.append(term.name)
    if out_channels > 1:
        # one head, one activation: a softmax term and a sigmoid term would train the same
        # logits towards two meanings, and predict could save only one of them
        reads = {i: bool(getattr(m, "sigmoid", False))
                 for i, (_, _, m) in enumerate(built) if _accepts(type(m), "sigmoid")}
        if len(set(reads.values())) > 1:
            sig = ", ".join(f"losses[{i}] ({names[i]})" for i, v in reads.items() if v)
            soft = ", ".join(f"losses[{i}] ({names[i]})" for i, v in reads.items() if not v)
            raise ConfigError(f"losses: {sig} read the {out_channels} output channels through sigmoids "
                              f"(a multi-label head) and {soft} through a softmax; set sigmoid: true on every term "
                              "or on none")
    if out_channels > 1 and _activation([(type(m), False) for _, _, m in built], out_channels) == "tanh":
        # the label map is the argmax over every channel's tanh map, channel 0 included
        for i, (_, _, module) in enumerate(built):
            if getattr(module, "include_background", True) is False:
                raise ConfigError(
                    f"losses[{i}] ({names[i]}): include_background: "
                    "false leaves channel 0 untrained, yet a model trained on SAUNA terms alone labels each voxel "
                    "by the argmax over every channel, channel 0 included; leave it true, or add a term that "
                    "trains channel 0 (e.g. dice_ce)"
                )
    return CompositeLoss(built, out_channels, schedules=schedules, final_only=final_only)


def required_target_transforms(terms: list[LossTerm] | CompositeLoss, out_channels: int | None = None) -> list:
    """MONAI dictionary transforms that precompute the derived targets of ``terms``.

    They read key ``'label'`` and write ``'skeleton'`` (for ``skeleton_recall``), ``'sauna'``
    (for ``sauna``) and ``'skeleton_distance'`` (for ``cbdice`` and ``clce``), and belong in
    the training pipeline after spatial augmentation and cropping. Losses whose key is
    missing from the batch compute the target themselves (slower). ``out_channels`` sets the
    SAUNA target's channels and the classes of ``'skeleton_distance'``; it is taken from a
    :class:`CompositeLoss`, and defaults to 1 for a list of terms.
    """
    composite = terms if isinstance(terms, CompositeLoss) else build_loss(list(terms), out_channels or 1)
    return composite.target_transforms()

"""Build a MONAI network from :class:`medseg.config.ModelConfig`.

medseg does not define networks of its own: ``unet``, ``dynunet``, ``unetr`` and
``swinunetr`` are MONAI's ``UNet``, ``DynUNet``, ``UNETR`` and ``SwinUNETR``. This module
fills in the arguments medseg knows (spatial dims, channel counts, patch size), applies
the documented defaults, and turns a bad parameter into a :class:`ConfigError` naming
``model.params.<key>`` instead of a MONAI traceback.

Output convention: ``out_channels`` is the number of classes in dataset.json
*including background* (2 for a binary vessel dataset); the network emits one logit per
class and predictions are ``softmax`` / ``argmax`` over the channel axis.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

import torch
from monai.networks.nets import UNETR, DynUNet, SwinUNETR, UNet

from medseg.config import ModelConfig
from medseg.errors import ConfigError

# Arguments medseg derives from the dataset and the config; a user must not set them in params.
_DERIVED = {
    "unet": ("spatial_dims", "in_channels", "out_channels"),
    "dynunet": ("spatial_dims", "in_channels", "out_channels"),
    "unetr": ("spatial_dims", "in_channels", "out_channels"),
    "swinunetr": ("spatial_dims", "in_channels", "out_channels"),
}

_CLASSES: dict[str, type[torch.nn.Module]] = {
    "unet": UNet,
    "dynunet": DynUNet,
    "unetr": UNETR,
    "swinunetr": SwinUNETR,
}


def dynunet_plan(patch_size: list[int], min_size: int = 4, max_levels: int = 6) -> tuple[list, list]:
    """Kernel sizes and strides for DynUNet from the patch size, the way nnU-Net plans them.

    Each level halves every axis whose current size is at least ``2 * min_size`` (so the
    bottleneck keeps at least ``min_size`` voxels per axis); an axis that is already small
    keeps stride 1. The first level has stride 1; at most ``max_levels`` downsamplings.
    Kernels are 3 on every axis (nnU-Net uses 1 on strongly anisotropic axes; medseg
    leaves anisotropy to ``target_spacing``).

    Returns ``(kernel_size, strides)`` as lists with one entry per level.
    """
    sizes = list(patch_size)
    kernels: list[list[int]] = [[3] * len(sizes)]
    strides: list[list[int]] = [[1] * len(sizes)]
    for _ in range(max_levels):
        stride = [2 if s >= 2 * min_size and s % 2 == 0 else 1 for s in sizes]
        if all(s == 1 for s in stride):
            break
        strides.append(stride)
        kernels.append([3] * len(sizes))
        sizes = [s // st for s, st in zip(sizes, stride)]
    return kernels, strides


def _unet_defaults(spatial_dims: int, patch_size: list[int]) -> dict[str, Any]:
    return {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2, "norm": "INSTANCE"}


def _dynunet_defaults(spatial_dims: int, patch_size: list[int]) -> dict[str, Any]:
    kernels, strides = dynunet_plan(patch_size)
    return {
        "kernel_size": kernels,
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "norm_name": "instance",
        "deep_supervision": False,
        "res_block": False,
    }


def _unetr_defaults(spatial_dims: int, patch_size: list[int]) -> dict[str, Any]:
    return {"img_size": tuple(patch_size), "feature_size": 16}


def _swinunetr_defaults(spatial_dims: int, patch_size: list[int]) -> dict[str, Any]:
    return {"feature_size": 24}


_DEFAULTS: dict[str, Callable[[int, list[int]], dict[str, Any]]] = {
    "unet": _unet_defaults,
    "dynunet": _dynunet_defaults,
    "unetr": _unetr_defaults,
    "swinunetr": _swinunetr_defaults,
}


def model_defaults(name: str, spatial_dims: int, patch_size: list[int]) -> dict[str, Any]:
    """The parameters medseg passes to the MONAI constructor for ``name`` when ``params`` is empty."""
    return _DEFAULTS[name](spatial_dims, list(patch_size))


def _per_axis(value: Any, dims: int) -> list[int]:
    if isinstance(value, (int, float)):
        return [int(value)] * dims
    return [int(v) for v in value]


def downsampling_factors(name: str, params: dict[str, Any], spatial_dims: int) -> list[int]:
    """The factor each patch axis must be divisible by for the network ``name``."""
    if name in ("unet", "dynunet"):
        factor = [1] * spatial_dims
        for s in params["strides"]:
            factor = [f * s for f, s in zip(factor, _per_axis(s, spatial_dims))]
        return factor
    if name == "unetr":
        return [16] * spatial_dims  # UNETR's fixed 16-voxel patch embedding
    if name == "swinunetr":
        return [int(params.get("patch_size", 2)) ** 5] * spatial_dims
    raise AssertionError(name)


def _check_params(name: str, params: dict[str, Any]) -> None:
    cls = _CLASSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    for key in params:
        if key in _DERIVED[name]:
            raise ConfigError(
                f"model.params.{key}: set by medseg (from dataset.json and data.patch_size), remove it from the config"
            )
        if key not in accepted:
            allowed = ", ".join(sorted(accepted - set(_DERIVED[name])))
            raise ConfigError(f"model.params.{key}: not a parameter of MONAI {cls.__name__} (accepted: {allowed})")
    for key in _LISTS.get(name, ()):
        if key in params and params[key] is not None and not isinstance(params[key], (list, tuple)):
            raise ConfigError(f"model.params.{key}: MONAI {cls.__name__} takes a list here (one value per level), "
                              f"got {params[key]!r}")
    if name == "unet" and "channels" in params and "strides" in params:
        if len(params["strides"]) != len(params["channels"]) - 1:
            raise ConfigError(
                f"model.params.strides: {len(params['strides'])} values given, UNet needs len(channels) - 1 = "
                f"{len(params['channels']) - 1}"
            )


# Parameters MONAI takes as one value per level (a bare integer failed inside MONAI or medseg
# with a TypeError traceback)
_LISTS = {
    "unet": ("channels", "strides"),
    "dynunet": ("kernel_size", "strides", "upsample_kernel_size", "filters"),
    "swinunetr": ("depths", "num_heads"),
}


def build_model(
    model_cfg: ModelConfig,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: list[int],
) -> torch.nn.Module:
    """Build the MONAI network named by ``model_cfg`` for a dataset and patch size.

    Parameters
    ----------
    model_cfg : ModelConfig
        ``name`` and ``params``; ``params`` override the defaults documented in
        :class:`medseg.config.ModelConfig` and go to the MONAI constructor unchanged.
    spatial_dims : int
        2 or 3.
    in_channels : int
        Number of image channels (``len(channel_names)`` in dataset.json).
    out_channels : int
        Number of classes including background (``len(labels)`` in dataset.json); the
        network outputs logits for softmax.
    patch_size : list of int
        Training patch (and sliding-window ROI) size; used for ``img_size`` and for the
        divisibility check.

    Returns
    -------
    torch.nn.Module
        The network, in training mode, on the CPU.

    Raises
    ------
    ConfigError
        A parameter that the MONAI class does not accept or rejects (named as
        ``model.params.<key>``), or a patch size that the network's downsampling does not
        divide.
    """
    name = model_cfg.name
    if spatial_dims not in (2, 3):
        raise ConfigError(f"data.patch_size: {spatial_dims} values given, expected 2 (2D) or 3 (3D)")
    if len(patch_size) != spatial_dims:
        raise ConfigError(f"data.patch_size: {list(patch_size)} does not have {spatial_dims} values")
    user = dict(model_cfg.params)
    params = {**model_defaults(name, spatial_dims, patch_size), **user}
    _check_params(name, user)
    if name == "unet" and "channels" in user and "strides" not in user:
        params["strides"] = [2] * (len(user["channels"]) - 1)
    _check_params(name, params)
    if name == "dynunet" and "strides" in user and "upsample_kernel_size" not in user:
        params["upsample_kernel_size"] = list(user["strides"])[1:]
    if name == "dynunet" and "strides" in user and "kernel_size" not in user:
        params["kernel_size"] = [[3] * spatial_dims for _ in user["strides"]]
    if name == "dynunet":  # per-axis entries of another dimension: MONAI's error blamed the kernels, not the patch
        for key in ("kernel_size", "strides", "upsample_kernel_size"):
            entries = params.get(key)
            odd = [e for e in entries if isinstance(e, (list, tuple)) and len(e) != spatial_dims] if isinstance(
                entries, (list, tuple)) else []
            if odd:
                raise ConfigError(
                    f"model.params.{key}: entries of {len(odd[0])} values (one per axis), but data.patch_size "
                    f"{list(patch_size)} has {spatial_dims}; give both for the same dimension (medseg plan writes "
                    "them for the dataset's)"
                )
    if name == "unetr" and "img_size" in user and list(_per_axis(user["img_size"], spatial_dims)) != list(patch_size):
        raise ConfigError(f"model.params.img_size: {user['img_size']} must equal data.patch_size {list(patch_size)}")

    try:
        factors = downsampling_factors(name, params, spatial_dims)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.params.strides: {err}") from None
    bad = [(p, f) for p, f in zip(patch_size, factors) if p % f]
    if bad:
        hint = [int(math.ceil(p / f) * f) for p, f in zip(patch_size, factors)]
        raise ConfigError(
            f"data.patch_size: {list(patch_size)} is not divisible by the {name} downsampling factors {factors} "
            f"per axis; use e.g. {hint}"
        )

    norm = str(params.get("norm_name", "instance")).lower()
    if name == "swinunetr" and "instance" in norm and min(patch_size) < 2 * factors[0]:
        raise ConfigError(
            f"data.patch_size: {list(patch_size)} is too small for SwinUNETR with instance norm: its bottleneck is "
            f"patch/{factors[0]} and needs at least 2 voxels per axis (use >= {2 * factors[0]})"
        )

    cls = _CLASSES[name]
    try:
        net = cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **params)
    except ImportError as err:  # MONAI's OptionalImportError, e.g. einops for the transformers
        missing = getattr(err, "name", None) or str(err).split("(")[-1].split(")")[0]
        raise ConfigError(
            f"model.name: MONAI {cls.__name__} needs an optional package that is not installed ({missing}); "
            "pip install einops"
        ) from None
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError) as err:
        key = _guess_key(str(err), params) or _blamed_key(cls, spatial_dims, in_channels, out_channels, params, user,
                                                           model_defaults(name, spatial_dims, patch_size))
        message = str(err).split("\n")[0]
        raise ConfigError(f"model.params{'.' + key if key else ''}: MONAI {cls.__name__} rejected it ({message})") from None
    return net


def build_on_meta(
    name: str, params: dict[str, Any], spatial_dims: int, in_channels: int, out_channels: int, patch: list[int]
) -> torch.nn.Module:
    """:func:`build_model` on PyTorch's ``meta`` device: shapes without storage or compute."""
    from medseg.config import ModelConfig

    cfg = ModelConfig(name=name, params=params)
    try:
        with torch.device("meta"):
            return build_model(cfg, spatial_dims, in_channels, out_channels, patch)
    except ConfigError as err:
        if "meta" not in str(err):  # a real configuration error
            raise
    # SwinUNETR's constructor reads tensor values (.item()): build it for real, then drop the storage
    return build_model(cfg, spatial_dims, in_channels, out_channels, patch).to("meta")


def check_forward(
    model_cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int, patch_size: list[int],
    batch_size: int = 2, batch_key: str = "train.batch_size",
) -> None:
    """Run the network once on a batch of two ``patch_size`` patches on the ``meta`` device
    (in training mode), and once more on ``batch_size`` patches when that is 1.

    MONAI builds some networks it cannot run (UNet with ragged ``strides``, SwinUNETR
    with fewer ``depths`` than ``num_heads``): without this, such a config failed with a
    traceback from the first training step, after the run folder was written. A batch of
    one patch fails in training mode where a BatchNorm layer sees a single value per
    channel (a 1-voxel bottleneck): that is blamed on ``batch_key``.

    Raises
    ------
    ConfigError
        ``model.params: MONAI UNet cannot run on a batch of shape [2, C, *patch] (...)``,
        a network whose output is not ``out_channels`` maps of the patch, or
        ``BATCH_KEY: 1 patch a step ...``.
    """
    batch = (2, in_channels, *patch_size)
    # a network built for real (SwinUNETR) draws its weights: the run's random stream stays as it was
    with torch.random.fork_rng(devices=[]):
        net = build_on_meta(model_cfg.name, dict(model_cfg.params), spatial_dims, in_channels, out_channels,
                            list(patch_size))
    net.train()
    try:
        with torch.no_grad():
            out = net(torch.zeros(batch, device="meta"))
    except Exception as err:  # noqa: BLE001 - whatever MONAI's forward raises is the config's fault
        message = str(err).strip().split("\n")[0]
        raise ConfigError(
            f"model.params: MONAI {_CLASSES[model_cfg.name].__name__} cannot run on a batch of shape "
            f"{list(batch)} ({type(err).__name__}: {message})"
        ) from None
    if tuple(out.shape[-spatial_dims:]) != tuple(patch_size) or out.shape[-spatial_dims - 1] != out_channels:
        raise ConfigError(
            f"model.params: MONAI {_CLASSES[model_cfg.name].__name__} maps a batch of shape {list(batch)} to "
            f"{list(out.shape)}, not to {out_channels} classes on the patch {list(patch_size)}"
        )
    if batch_size == 1:
        try:
            with torch.no_grad():
                net(torch.zeros((1, *batch[1:]), device="meta"))
        except Exception as err:  # noqa: BLE001 - batch 2 ran: the single sample is the cause
            message = str(err).strip().split("\n")[0]
            raise ConfigError(
                f"{batch_key}: 1 patch a step is too few for this network in training ({type(err).__name__}: "
                f"{message}): a BatchNorm layer would see one value per channel; use 2 or more, a larger patch, "
                "or instance norm"
            ) from None


def _blamed_key(cls, spatial_dims: int, in_channels: int, out_channels: int, params: dict[str, Any],
                user: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """The one parameter the user set whose default (or absence) makes MONAI build the
    network, when its message names none (``act: relux`` gives "did you mean 'RELU'?")."""
    blamed = []
    for key in user:
        trial = dict(params)
        if key in defaults:
            trial[key] = defaults[key]
        else:
            trial.pop(key)
        for device in ("meta", "cpu"):  # SwinUNETR reads tensor values while it is built: not on meta
            try:
                with torch.device(device), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a trial's mix of defaults may be odd; only its success counts
                    cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **trial)
            except Exception as err:  # noqa: BLE001 - still refused without it: not this key alone
                if device == "meta" and "meta" in str(err):
                    continue
                break
            blamed.append(key)
            break
    return blamed[0] if len(blamed) == 1 else None


def _guess_key(message: str, params: dict[str, Any]) -> str | None:
    """The parameter a MONAI error message is about (they name it), so the error can too."""
    for key in sorted(params, key=len, reverse=True):
        if key in message:
            return key
    return None

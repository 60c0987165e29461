"""The source run an adaptation starts from: its checkpoint, config, prior — only ever read."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.config import RunConfig, validate_config
from medseg.errors import CheckpointError, ConfigError, MedsegError
from medseg.runfolder import CHECKPOINT_DIR, find_checkpoint, load_checkpoint

LABEL_STATS = "label_stats.json"


@dataclass
class SourceRun:
    """A loaded source checkpoint; ``payload`` is never written back."""

    run_dir: Path | None  # None when a checkpoint file was given
    checkpoint_path: Path
    sha256: str
    payload: dict[str, Any]
    config: RunConfig

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.payload["model"]

    @property
    def folder(self) -> Path | None:
        """The source's run folder: the one given, or that of a checkpoint file in its
        ``checkpoints/``; None for a checkpoint file elsewhere (``models/x.pt``), whose
        ``../..`` is no run folder: its ``label_stats.json`` gave SFDA an unrelated prior."""
        if self.run_dir is not None:
            return self.run_dir
        if self.checkpoint_path.parent.name == CHECKPOINT_DIR:
            return self.checkpoint_path.parent.parent
        return None

    def label_stats(self) -> dict[str, Any] | None:
        """``label_stats.json`` of the run folder (next to ``checkpoints/``), if there."""
        folder = self.folder
        if folder is None:
            return None
        path = folder / LABEL_STATS
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{path}: unreadable ({err}); rewrite it with medseg train {folder / 'config.yaml'} --resume "
                "(it comes from the preprocessing cache), or set the class prior in the adapt config"
            ) from None


def load_source(path: str | Path) -> SourceRun:
    """Find (``latest`` before ``best``: the end of training) and load the source checkpoint.

    ``latest`` is preferred because ``best`` was chosen on *source* validation Dice,
    which says nothing about the target domain; either is accepted.

    Raises
    ------
    CheckpointError
        No run folder, no checkpoint in it, an unreadable checkpoint or stored config.
    """
    path = Path(path)
    checkpoint_path = find_checkpoint(path, prefer=("latest", "best"))
    payload, sha256 = load_checkpoint(checkpoint_path, map_location="cpu", with_sha256=True)
    for key in ("dataset", "preprocessing"):
        if key not in payload:
            raise CheckpointError(f"{checkpoint_path}: not a medseg checkpoint (missing '{key}')")
    try:
        config = validate_config(payload["config"], source=f"{checkpoint_path} (stored config)")
    except MedsegError as err:
        raise CheckpointError(str(err)) from None
    return SourceRun(
        run_dir=path if path.is_dir() else None,
        checkpoint_path=checkpoint_path,
        sha256=sha256,  # of the bytes loaded: a train replacing the file meanwhile cannot mix the two
        payload=payload,
        config=config,
    )


def class_prior(stats: dict[str, Any], labels: dict[str, int], num_classes: int, where: str) -> list[float]:
    """Class ratios ``tau_k`` (background included, by label value) from ``label_stats.json``.

    Raises
    ------
    ConfigError
        The statistics miss a class or do not describe a distribution.
    """
    classes = stats.get("classes") if isinstance(stats, dict) else None
    if not isinstance(classes, dict):
        raise ConfigError(f"{where}: no 'classes' entry; set adapt.sfda.prior instead")
    prior = [0.0] * num_classes
    for name, value in labels.items():
        if name == "ignore":
            continue
        entry = classes.get(name)
        if not isinstance(entry, dict) or "ratio_mean" not in entry:
            raise ConfigError(f"{where}: no ratio_mean for class '{name}'; set adapt.sfda.prior instead")
        prior[int(value)] = float(entry["ratio_mean"])
    total = sum(prior)
    if total <= 0:
        raise ConfigError(f"{where}: class ratios sum to 0; set adapt.sfda.prior instead")
    return [p / total for p in prior]


# --------------------------------------------------------------------------- norm layers

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm,
              torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def _has_affine(module: torch.nn.Module) -> bool:
    return getattr(module, "affine", getattr(module, "elementwise_affine", False))


def affine_model_config(model_json: dict[str, Any]) -> dict[str, Any]:
    """The stored model config with ``affine: True`` added to its normalisation argument.

    MONAI takes a norm as a name or ``(name, {args})``; UNet calls the argument ``norm``,
    DynUNet / UNETR / SwinUNETR ``norm_name``.
    """
    from medseg.models.factory import model_defaults

    out = copy.deepcopy(model_json)
    params = out.setdefault("params", {})
    key = "norm" if out.get("name", "unet") == "unet" else "norm_name"
    if key in params:
        norm = params[key]
    else:
        norm = model_defaults(out.get("name", "unet"), 3, [64, 64, 64]).get(key, "instance")
    if isinstance(norm, str):
        name, args = norm, {}
    else:
        name, args = norm[0], dict(norm[1]) if len(norm) > 1 else {}
    if str(name).lower() not in ("instance", "batch", "group", "layer", "instance_nvfuser"):
        raise ConfigError(f"tent: cannot add affine parameters to norm {name!r} of the source model")
    args["affine"] = True
    params[key] = [name, args]
    return out


def ensure_affine_norms(
    model: torch.nn.Module, model_json: dict[str, Any], enable: bool, build
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model whose normalisation layers all have affine parameters, and its model config.

    ``build(model_json)`` builds a network from a model config. With affine-less norms
    and ``enable``, the network is rebuilt from :func:`affine_model_config`, the source
    weights are loaded (the new weights stay 1 and biases 0: the same function), and the
    new config is returned so that the saved run rebuilds the same layers.

    Raises
    ------
    ConfigError
        No normalisation layer at all, or affine-less ones and ``enable`` false.
    """
    layers = norm_layers(model)
    if not layers:
        raise ConfigError("tent: the source model has no normalisation layers (BatchNorm/InstanceNorm) to adapt")
    if all(_has_affine(m) for _, m in layers):
        return model, model_json
    if not enable:
        names = ", ".join(n for n, m in layers if not _has_affine(m))[:200]
        raise ConfigError(
            f"tent: the source model's normalisation layers have no affine parameters ({names}); "
            "set adapt.tent.enable_affine: true to add them with identity initialisation"
        )
    new_json = affine_model_config(model_json)
    rebuilt = build(new_json)
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    # every name a norm is registered under: DynUNet registers its blocks a second time
    # under skip_layers.*, and load_state_dict lists a missing key under both names
    new_params = {f"{n}.{p}" for n, m in rebuilt.named_modules(remove_duplicate=False) if isinstance(m, NORM_TYPES)
                  for p in ("weight", "bias")}
    if unexpected or set(missing) - new_params:
        raise ConfigError(f"tent: enabling affine norms changed the network beyond the norms ({(unexpected or missing)[:3]})")
    if not all(_has_affine(m) for _, m in norm_layers(rebuilt)):
        raise ConfigError("tent: could not enable affine parameters in every normalisation layer of this network")
    return rebuilt, new_json

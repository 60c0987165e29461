"""Tent changes nothing but the affine parameters of the normalisation layers."""

from __future__ import annotations

import pytest
import torch

from medseg.adaptation import run_adaptation, validate_adapt_config
from medseg.adaptation.source import norm_layers
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor
from medseg.runfolder.checkpoint import load_checkpoint

from adapt_helpers import TINY_UNET, adapt_raw, train_source


def _norm_param_names(model) -> set[str]:
    return {f"{n}.{p}" for n, m in norm_layers(model) for p in ("weight", "bias") if getattr(m, p, None) is not None}


def test_tent_enables_identity_affine_norms_and_changes_only_them(source_run, target_dataset, tmp_path):
    run = run_adaptation(validate_adapt_config(adapt_raw(source_run, target_dataset, tmp_path / "tent", "tent",
                                                         iterations=3, lr=1e-2)))
    source = load_checkpoint(source_run / "checkpoints" / "latest.pt")["model"]
    adapted = load_checkpoint(run / "checkpoints" / "latest.pt")
    model = Predictor.from_path(run, "cpu").model  # rebuilds from the stored config: affine norms
    norm_names = _norm_param_names(model)
    assert norm_names and all(isinstance(m.weight, torch.nn.Parameter) for _, m in norm_layers(model))
    assert norm_names.isdisjoint(source)  # MONAI's InstanceNorm had no affine parameters
    weights = adapted["model"]
    assert set(weights) == set(source) | norm_names
    for key in source:
        assert torch.equal(weights[key], source[key]), f"{key} changed"
    assert any(not torch.equal(weights[k], torch.ones_like(weights[k]) if k.endswith("weight") else torch.zeros_like(weights[k]))
               for k in norm_names)
    norm = adapted["config"]["model"]["params"]["norm"]
    assert norm[0].upper() == "INSTANCE" and norm[1]["affine"] is True


def test_tent_on_batchnorm_updates_only_affine_parameters(source_dataset, target_dataset, tmp_path):
    bn_unet = {"name": "unet", "params": {**TINY_UNET["params"], "norm": "BATCH"}}
    src = train_source(source_dataset, tmp_path / "bn_source", iterations=4, model=bn_unet)
    run = run_adaptation(validate_adapt_config(adapt_raw(src, target_dataset, tmp_path / "tent", "tent",
                                                         iterations=3, lr=1e-2)))
    source = load_checkpoint(src / "checkpoints" / "latest.pt")
    adapted = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert adapted["config"]["model"] == source["config"]["model"]  # BatchNorm is affine already
    model = Predictor.from_path(run, "cpu").model
    params = {n for n, _ in model.named_parameters()}
    norm_names = _norm_param_names(model)
    changed = {k for k in params if not torch.equal(adapted["model"][k], source["model"][k])}
    assert changed and changed <= norm_names


def test_tent_without_affine_norms_and_enable_off_is_refused(source_run, target_dataset, tmp_path):
    raw = adapt_raw(source_run, target_dataset, tmp_path / "tent", "tent", tent={"enable_affine": False})
    with pytest.raises(ConfigError, match="no affine parameters.*enable_affine: true"):
        run_adaptation(validate_adapt_config(raw))


def test_tent_on_dynunet_which_registers_its_norms_twice(source_dataset, target_dataset, tmp_path):
    """DynUNet lists its blocks again under skip_layers.*: enabling affine norms was refused
    as a change 'beyond the norms', naming norm parameters, so Tent could not adapt it."""
    dynunet = {"name": "dynunet", "params": {"filters": [4, 8, 16], "deep_supervision": False}}
    src = train_source(source_dataset, tmp_path / "dyn_source", iterations=2, model=dynunet)
    run = run_adaptation(validate_adapt_config(adapt_raw(src, target_dataset, tmp_path / "tent", "tent",
                                                         iterations=2, lr=1e-2)))
    model = Predictor.from_path(run, "cpu").model
    assert all(m.affine for _, m in norm_layers(model))
    source = load_checkpoint(src / "checkpoints" / "latest.pt")["model"]
    adapted = load_checkpoint(run / "checkpoints" / "latest.pt")["model"]
    assert all(torch.equal(adapted[k], source[k]) for k in source)  # only the new affine parameters moved

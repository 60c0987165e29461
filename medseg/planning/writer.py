"""What ``medseg plan`` writes: ``fingerprint.json`` (+ samples), ``plans.json`` and the
commented run config, each atomically (a hidden temporary file renamed over the target)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from medseg.atomic import write_atomic
from medseg.planning.fingerprint import SAMPLES_FILE
from medseg.planning.planner import MIN_TRANSFORMER_PATCH

__all__ = ["FINGERPRINT_FILE", "PLANS_FILE", "write_fingerprint", "read_fingerprint", "write_plans", "render_config", "write_text_atomic"]

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
PLANNED_CONFIG_HEADER = "# Run config planned by `medseg plan`"
"""How every config ``medseg plan`` writes begins: a plan replaces no other file."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`medseg.atomic.write_atomic`)."""
    return write_atomic(path, text)


def write_fingerprint(folder: str | Path, fingerprint: Mapping[str, Any], samples: Mapping[str, np.ndarray]) -> Path:
    """``folder/fingerprint.json`` and ``folder/fingerprint_samples.npz``; returns the JSON path."""
    folder = Path(folder)

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in samples.items()})
    write_atomic(folder / SAMPLES_FILE, buffer.getvalue())
    return write_text_atomic(folder / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1) + "\n")


def read_fingerprint(path: str | Path) -> dict[str, Any]:
    """A ``fingerprint.json`` (or the folder holding it)."""
    from medseg.errors import DataError

    path = Path(path)
    if path.is_dir():
        path = path / FINGERPRINT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: fingerprint not found; run medseg plan") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable fingerprint ({err})") from None


def write_plans(folder: str | Path, plans: Mapping[str, Any]) -> Path:
    return write_text_atomic(Path(folder) / PLANS_FILE, json.dumps(plans, indent=1) + "\n")


# --------------------------------------------------------------------------- the config

def _y(value: Any) -> str:
    """One value in YAML flow style (floats as YAML 1.1 reads them back: 3.0e-05, not 3e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _fmt(values: Any, digits: int = 3) -> str:
    return "[" + ", ".join(f"{float(v):.{digits}g}" for v in values) + "]"


def _size(gib: float) -> str:
    return f"{gib:.3g} GiB" if gib >= 1 else f"{gib * 1024:.3g} MiB"


def _comment(text: str, indent: int = 0, width: int = 100) -> list[str]:
    """``text`` as ``# `` lines wrapped at ``width``."""
    import textwrap

    prefix = " " * indent + "# "
    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=prefix) or [prefix.rstrip()]


_TRAIN = {
    "sgd": ({"name": "sgd", "lr": 0.01, "momentum": 0.99, "weight_decay": 3.0e-5}, {"name": "poly", "poly_power": 0.9},
            "SGD with Nesterov momentum and the poly schedule, as nnU-Net trains"),
    "adamw": ({"name": "adamw", "lr": 1.0e-4, "weight_decay": 1.0e-5}, {"name": "cosine", "warmup_iterations": 500},
              "AdamW with a cosine schedule, as transformer encoders are trained (configs/unetr.yaml)"),
}
ITERATIONS = 250_000  # nnU-Net: 1000 epochs x 250 iterations
VAL_INTERVAL = 2_500
CHECKPOINT_INTERVAL = 250


def render_config(plan: Mapping[str, Any], config_path: str | Path | None = None) -> str:
    """The run config of ``plan`` as YAML text, each planned choice explained in a comment.

    The text validates with :func:`medseg.config.load_config`.
    """
    ds = plan["dataset"]
    mem = plan["memory"]
    lines: list[str] = []
    add = lines.append
    labels = ", ".join(f"{k}={v}" for k, v in ds["labels"].items())
    channels = ", ".join(f"{k}: {v}" for k, v in ds["channel_names"].items())
    add(f"{PLANNED_CONFIG_HEADER} (medseg.planning; nnU-Net v2's planning rules).")
    add(f"# Dataset {ds['name']}: {ds['num_cases']} training cases, {plan['spatial_dims']}D, channels {{{channels}}}, labels {labels}.")
    add("# Every number below comes from fingerprint.json (the data) and plans.json (the decisions), next to this file.")
    target = f"medseg train {config_path}" if config_path else "medseg train CONFIG.yaml"
    add(f"# Train:  {target}     (a short run: --set train.iterations=5000)")
    for message in plan["warnings"]:
        lines += _comment(f"WARNING: {message}")
    add("data:")
    add(f"  dataset: {_y(str(ds['root']))}")
    if (Path(ds["root"]) / "splits_final.json").is_file():
        # the dataset's own split (a published train/val, nnU-Net's file): a seeded split
        # of val_fraction mixed TopoMortar's validation images into training
        lines += _comment("the dataset's own train/val split (nnU-Net's splits_final.json; its first fold)", 2)
        add("  split_file: splits_final.json")
    lines += _comment(
        f"patch: from equal millimetres per axis, clipped to the median image at the target spacing "
        f"{_fmt(plan['median_shape_at_target'], 4)} voxels and shrunk until the memory estimate fits; "
        f"divisible by {plan['divisible_by']} (the network's downsampling)"
        + (f" and at least {MIN_TRANSFORMER_PATCH[plan['model']]} per axis (the smallest {plan['model']} medseg plans)"
           if plan["model"] in MIN_TRANSFORMER_PATCH else ""), 2)
    add(f"  patch_size: {_y(plan['patch_size'])}")
    lines += _comment(
        f"target spacing (mm): {plan['target_spacing_rule']} (the cases' median: {_fmt(plan['median_spacing'])})", 2)
    add(f"  target_spacing: {_y([round(s, 5) for s in plan['target_spacing']])}")
    orientation_why = "medseg reorients every case to RAS; spacings and patch are in this axis order" if plan["orientation"] \
        else "natural images carry no anatomical orientation"
    add(f"  orientation: {_y(plan['orientation'])}   # {orientation_why}")
    norm = []
    for c in plan["normalization"]:
        if c["scheme"] == "ct" and "clip" in c:
            norm.append(f"{c['name']}: ct (clip to the foreground [0.5, 99.5] percentiles {_fmt(c['clip'], 4)}, "
                        f"then z-score with mean {c['mean']:.4g}, std {c['std']:.4g})")
        elif c["scheme"] in ("zscore", "rescale_to_0_1"):
            norm.append(f"{c['name']}: {c['scheme']} (per image)")
        else:
            norm.append(f"{c['name']}: {c['scheme']}")
    lines += _comment("normalisation per channel, by channel name as nnU-Net chooses it: " + "; ".join(norm), 2)
    add("  normalization: {scheme: auto}")
    if config_path is not None:
        lines += _comment("the normalisation statistics are read from the fingerprint, not fitted again", 2)
        add(f"  fingerprint: {_y(str((Path(config_path).parent / FINGERPRINT_FILE).resolve()))}")
    lines += _comment(f"patches centred on foreground: {plan['foreground_oversample_rule']}", 2)
    add(f"  foreground_oversample: {plan['foreground_oversample']}")
    lines += _comment(
        f"data.cache_rate and data.num_workers keep their defaults; the dataset at the target spacing is "
        f"about {_size(plan['preprocessed_gib'])} (float32 images, uint8 labels)", 2)

    net = plan["network"]
    add("model:")
    add(f"  name: {net['name']}")
    if net["name"] in ("dynunet", "unet"):
        lines += _comment(
            "levels planned from the patch and the target spacing as nnU-Net does: an axis is halved while it "
            "keeps at least 4 voxels and its spacing is within 2x of the finest; kernels are 1 along an axis "
            "much coarser than the finest; 32 features doubling per level up to "
            f"{320 if plan['spatial_dims'] == 3 else 512}", 2)
    else:
        lines += _comment(f"every patch axis a multiple of {plan['divisible_by'][0]} (the transformer's tokens)", 2)
    add("  params:")
    for key, value in net["params"].items():
        if key == "deep_supervision":
            why = ("the loss on the final output and the next-coarser heads (nnU-Net's weights)" if value
                   else "off: the topology loss is costly per head" if any(t["name"] == "betti_matching" for t in plan["losses"])
                   else "off: too few levels")
            add(f"    {key}: {_y(value)}   # {why}")
        else:
            add(f"    {key}: {_y(value)}")

    add("losses:")
    for term, why in zip(plan["losses"], plan["loss_reasons"]):
        lines += _comment(why, 2)
        add(f"  - {_y(term)}")

    optimizer, scheduler, train_why = _TRAIN[mem["optimizer"]]
    add("train:")
    add(f"  iterations: {ITERATIONS}        # nnU-Net's 1000 epochs of 250 steps")
    lines += _comment(
        f"batch: {plan['batch_size_rule']}; estimated peak {mem['estimate_gib']:.2f} GiB of the "
        f"{plan['gpu_memory_gb']:g} GiB GPU (--gpu-memory-gb), with mixed precision (medseg.planning.memory)", 2)
    add(f"  batch_size: {plan['batch_size']}")
    add(f"  val_interval: {VAL_INTERVAL}       # sliding-window validation on whole cases: every 10 'epochs'")
    add(f"  checkpoint_interval: {CHECKPOINT_INTERVAL}")
    lines += _comment(train_why, 2)
    add(f"  optimizer: {_y(optimizer)}")
    add(f"  scheduler: {_y(scheduler)}")
    add("  amp: true                 # mixed precision on CUDA (the memory estimate assumes it)")
    add("inference:")
    add("  overlap: 0.5")
    add(f"  sw_batch_size: {plan['batch_size']}")
    add(f"output_dir: {_y(str(plan['output_dir']))}")
    add("seed: 0")
    return "\n".join(lines) + "\n"

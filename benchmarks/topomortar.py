"""Cost per training step of every 2D loss of medseg on TopoMortar batches, against the network.

What a topology loss adds to a training step depends on the data: TopoMortar's mortar is
a dense network of thin lines over the whole 512x512 photograph, so a noisy prediction
has tens of thousands of persistence pairs (an untrained UNet: about 23,000 on a 256²
crop, 93,000 on a whole image), and skeletons and distance maps cover the whole image. This benchmark measures it on real TopoMortar batches, for the network of a
run config, as ``medseg train`` runs a step.

Settings: a batch of ``--crop-batch`` (8) random ``--crop-size`` (256²) crops, and a batch
of ``--full-batch`` (2) whole images (512²), from ``--images`` (8) training cases of
``--data`` drawn by seed (an nnU-Net-layout folder made by
``data_scripts/prepare_topomortar.py``; the train list of its ``splits_final.json`` when
present). Images are z-scored per image and channel by medseg's own ``NormalizeChannelsd``
(the ``zscore`` scheme of RGB channels), or with the checkpoint's stored preprocessing for
its logits.

Two states of the prediction:

- ``noisy``: the logits of the untrained network (seeded);
- ``partly trained``: the logits of ``--checkpoint`` (a run folder or ``checkpoints/best.pt``
  / ``latest.pt``, loaded as ``medseg predict`` loads it, network in eval mode), or without
  one a stand-in made from the label: foreground logit ``f = G_2 * (4 (2 y - 1)) + N(0, 1)``
  (Gaussian smoothing of sigma 2, seeded noise), logits ``(-f/2, f/2)``, so that
  ``softmax = sigmoid(f)``.

Per setting and state, medians over ``--repeats`` rounds after one warm-up, all functions
interleaved round by round so that machine noise hits all alike:

- the *network step*: forward + backward of the network with ``dice_ce`` alone (over every
  head with DynUNet's deep supervision, as the trainer does); in the partly-trained state
  the checkpoint's network (in training mode), else the untrained one again;
- per loss NAME of ``medseg.losses.LOSS_NAMES`` that applies to a 2D, 2-class softmax head:
  ``build_loss([dice_ce, NAME], out_channels=2)`` as a run config builds it, forward +
  ``.backward()`` on ``logits.detach().requires_grad_()``, timed two ways: *alone*, the
  NAME term by itself, and *in step*, what it adds to a step: ``dice_ce + NAME`` minus
  ``dice_ce`` alone on the same logits, paired round by round (inside the composite the
  terms share one softmax and one encoded target, as in training); each against the
  network step. The targets
  the data pipeline precomputes (``CompositeLoss.target_transforms()``: Skeleton Recall's
  ``skeleton``, SAUNA's ``sauna``, cbDice/clCE's ``skeleton_distance``) are computed once,
  per sample as the pipeline does, before timing, and passed as the trainer passes them
  (``loss_fn(logits, label, batch=batch)``). With deep supervision (DynUNet) every term
  has a second row, ``NAME (all K heads)``: the term over the network's K output heads as
  the trainer computes it with ``heads: all`` (``deep_supervision_loss``, one full-size
  term per head), where the first row has the final head alone (``heads: final``); the
  stand-in logits of the partly-trained state are given to every head. Betti matching is built with
  ``target_cache_bytes=0``: every step a new target, as with random crops (its cache of
  target barcodes only helps when a target recurs). ``mip`` (projections of 3D volumes) is
  skipped with the reason.

``--loss-scale`` also prints each term's value on the noisy and partly-trained logits next
to ``dice_ce``'s, and Betti matching's with ``normalize`` = ``none`` (the papers' sum over
pairs), ``pairs`` and ``voxels``: how the scale of the Betti matching term depends on the
patch (256² against 512²). ``--repeats 0`` gives the values alone, without timing.

Threads: ``torch.set_num_threads(--threads)``, default all cores; the Betti matching engine
runs ``--betti-threads`` (the loss's ``threads``, default all cores) as a parallel region
of torch's OpenMP runtime. ``--betti-backends cuda,cpu`` times the Betti matching term once
per engine backend (rows ``betti_matching[cuda]``, ``betti_matching[cpu]``): on a GPU, the
CUDA backend against the CPU engine fed from the device (probabilities copied to the host,
indices back). OpenMP waits as ``medseg train`` lets it (libgomp's default: spinning a
while after each parallel region) unless ``OMP_WAIT_POLICY`` is set; ``PASSIVE`` makes
the network step about 4 % slower here and so flatters the ratios.

Usage::

    python benchmarks/topomortar.py                            # 8 x 256², 2 x 512²; 5 repeats (minutes)
    python benchmarks/topomortar.py --loss-scale --json topomortar.json
    python benchmarks/topomortar.py --checkpoint runs/topomortar/cedice/seed_0 --loss-scale
    python benchmarks/topomortar.py --model-config my_dynunet2d.yaml --losses cldice,betti_matching
    python benchmarks/topomortar.py --device cuda --model-config benchmarks/topomortar_study.yaml \\
        --crop-batch 10 --crop-size 512 --full-batch 10 --losses betti_matching \\
        --betti-backends cuda,cpu                                 # the paper's protocol step, both engines
    python benchmarks/topomortar.py --loss-scale --repeats 0   # values only
    python benchmarks/topomortar.py --quick --data DIR         # 2 images, 1 repeat, 2 x 128² crops
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from scipy import ndimage  # noqa: E402

from medseg.config import LossTerm, ModelConfig  # noqa: E402
from medseg.losses import LOSS_NAMES, CompositeLoss, build_loss  # noqa: E402
from medseg.losses.deep_supervision import deep_supervision_loss, is_deep_supervision_output  # noqa: E402

CLASSES = 2  # background, mortar
CHANNELS = 3  # R, G, B
SKIP = {"mip": "MIP loss compares maximum-intensity projections of a 3D volume along its axes; not a 2D loss"}
BETTI_NORMALIZE = ("none", "pairs", "voxels")
STAND_IN = "stand-in from the label: f = G_sigma2 * 4(2y-1) + N(0,1), logits (-f/2, f/2)"


# ----------------------------------------------------------------------------- data


class Setting(NamedTuple):
    name: str  # "crop" or "full"
    batch: int
    size: tuple[int, int] | None  # None: whole images

    def label(self, shape: tuple[int, ...]) -> str:
        return f"{self.name} {self.batch}x{shape[0]}x{shape[1]}"


def training_images(root: Path, count: int, seed: int) -> list[dict]:
    """``count`` training cases of the dataset (seeded pick): name, raw image (3, H, W), label (H, W) int64."""
    from medseg.data.dataset import list_cases, load_case, read_dataset_json, split_cases
    from medseg.errors import MedsegError

    try:
        info = read_dataset_json(root)
    except MedsegError as err:  # every benchmark that reads TopoMortar through here: one line
        raise SystemExit(f"--data: {err}") from None
    if info.num_channels != CHANNELS or info.num_classes != CLASSES:
        raise SystemExit(f"{root}: expected {CHANNELS} channels and {CLASSES} classes (TopoMortar), "
                         f"dataset.json declares {info.num_channels} and {info.num_classes}")
    cases = list_cases(root, info)
    if (root / "splits_final.json").is_file():
        cases, _ = split_cases(cases, 0.0, seed, split_file="splits_final.json", root=root)
    order = np.random.default_rng(seed).permutation(len(cases))[:count]
    images = []
    for i in sorted(order):
        case = load_case(cases[i], info)
        images.append({"name": case["name"], "image": case["image"], "label": case["label"][0].astype(np.int64)})
    return images


def zscore_preprocessing() -> dict:
    """medseg's preprocessing dict for RGB channels (scheme ``zscore``: per image and channel)."""
    return {"version": 1, "channels": [{"name": n, "scheme": "zscore"} for n in "RGB"]}


def normalised(images: list[dict], preprocessing: dict) -> list[torch.Tensor]:
    """Each whole image normalised by medseg's ``NormalizeChannelsd`` (before cropping, as medseg does)."""
    from medseg.data.transforms import NormalizeChannelsd

    norm = NormalizeChannelsd(keys=["image"], preprocessing=preprocessing)
    return [torch.as_tensor(norm({"image": torch.from_numpy(im["image"])})["image"]).float() for im in images]


def picks(images: list[dict], setting: Setting, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(image index, row, column) of each sample: random crops, or whole images in turn."""
    out = []
    for b in range(setting.batch):
        if setting.size is None:
            out.append((b % len(images), 0, 0))
            continue
        i = int(rng.integers(len(images)))
        h, w = images[i]["label"].shape
        ch, cw = setting.size
        if h < ch or w < cw:
            raise SystemExit(f"{images[i]['name']}: image {h}x{w} smaller than the {ch}x{cw} crop")
        out.append((i, int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))))
    return out


def gather(arrays: list, where: list[tuple[int, int, int]], size: tuple[int, int] | None) -> torch.Tensor:
    """The batch of crops (or whole images) of ``arrays`` (each (..., H, W)) at ``where``."""
    crops = []
    for i, r, c in where:
        a = torch.as_tensor(arrays[i])
        h, w = size or a.shape[-2:]
        crops.append(a[..., r:r + h, c:c + w])
    shapes = {tuple(x.shape) for x in crops}
    if len(shapes) > 1:
        raise SystemExit(f"whole images of different sizes cannot share a batch: {sorted(shapes)}")
    return torch.stack(crops).contiguous()


def pipeline_targets(composite: CompositeLoss, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch keys the loss's data transforms write, per sample and stacked, as training does."""
    from monai.transforms import Compose

    transforms = composite.target_transforms()
    if not transforms:
        return {}
    pipeline = Compose(transforms)
    samples = [pipeline({"label": label[b]}) for b in range(label.shape[0])]
    keys = sorted(set(samples[0]) - {"label"})
    return {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in keys}


def stand_in_logits(label: torch.Tensor, seed: int) -> torch.Tensor:
    """A partly trained network's logits made from the label (B, 1, H, W): right in the large, noisy."""
    rng = np.random.default_rng(seed)
    out = []
    for y in label[:, 0].cpu().numpy():
        f = ndimage.gaussian_filter(4.0 * (2.0 * y - 1.0), 2.0) + rng.standard_normal(y.shape)
        out.append(np.stack([-f / 2, f / 2]))
    return torch.from_numpy(np.stack(out).astype(np.float32))


# -------------------------------------------------------------------------- network


def model_config(path: Path) -> ModelConfig:
    """The ``model`` section of a run config, or of a STUDY.yaml's runs (its ``base`` config's
    model with the study's ``model.*`` overrides, e.g. ``benchmarks/topomortar_study.yaml``:
    TopoMortar's protocol network)."""
    raw = yaml.safe_load(path.read_text()) or {}
    if "base" in raw and "model" not in raw:
        base = Path(raw["base"])
        base = base if base.is_file() else REPO / base  # relative to the working folder, or this checkout
        model = (yaml.safe_load(base.read_text()) or {}).get("model", {})
        for key, value in (raw.get("set") or {}).items():
            if key == "model":
                model.update(value)
            elif key.startswith("model."):
                *parents, leaf = key.split(".")[1:]
                section = model
                for name in parents:
                    section = section.setdefault(name, {})
                section[leaf] = value
        raw = {"model": model}
    if "model" not in raw:
        raise SystemExit(f"{path}: no 'model' section")
    return ModelConfig.model_validate(raw["model"])


def untrained_network(cfg: ModelConfig, shape: tuple[int, int], seed: int, device: str) -> torch.nn.Module:
    from medseg.models import build_model

    torch.manual_seed(seed)
    return build_model(cfg, 2, CHANNELS, CLASSES, list(shape)).to(device).train()


def checkpoint_network(path: Path, device: str):
    """(network, preprocessing, description) of a medseg checkpoint, loaded as ``medseg predict`` loads it."""
    from medseg.inference.predictor import Predictor
    from medseg.runfolder.checkpoint import find_checkpoint, load_checkpoint

    file = find_checkpoint(path)
    checkpoint = load_checkpoint(file, map_location="cpu")
    predictor = Predictor(checkpoint, torch.device(device), source=str(file))
    if predictor.spatial_dims != 2 or predictor.info.num_channels != CHANNELS or predictor.num_classes != CLASSES:
        raise SystemExit(f"{file}: a {predictor.spatial_dims}D model of {predictor.info.num_channels} channels and "
                         f"{predictor.num_classes} classes; TopoMortar needs 2D, {CHANNELS} and {CLASSES}")
    if predictor.output_activation != "softmax":
        raise SystemExit(f"{file}: the model's output is read with {predictor.output_activation}, not softmax logits")
    what = (f"checkpoint {file} ({predictor.config.model.name}, {parameters(predictor.model)}, iteration "
            f"{checkpoint.get('iteration', '?')}, losses {', '.join(t.name for t in predictor.config.losses)}); "
            "its network is the partly-trained state's network step")
    return predictor.model, checkpoint["preprocessing"], what


def final_output(out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return out[:, 0] if is_deep_supervision_output(out, image) else out


@torch.no_grad()
def network_logits(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The network's output: (B, C, H, W), or DynUNet's stacked heads (B, 1 + H, C, H, W)."""
    return net(image).float()


def parameters(net: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in net.parameters()):,} parameters"


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def network_step(net: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, dice_ce: CompositeLoss) -> Callable:
    """Forward + backward of the network with dice_ce alone (over every head with deep supervision)."""

    def run() -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        out = net(image)
        if is_deep_supervision_output(out, image):
            loss, _ = deep_supervision_loss(dice_ce, out, label)
        else:
            loss, _ = dice_ce(out, label)
        loss.backward()
        return loss.detach()

    return run


def term_step(term: CompositeLoss, logits: torch.Tensor, label: torch.Tensor, batch: dict) -> Callable:
    """Forward + backward of one loss term on the logits, as the trainer calls the loss;
    on stacked deep-supervision heads (B, 1 + H, C, ...) over all of them, as the trainer
    does for a term with ``heads: all``."""

    def run() -> torch.Tensor:
        x = logits.detach().requires_grad_()
        if x.dim() == label.dim() + 1:
            loss, _ = deep_supervision_loss(term, x, label, batch=batch)
        else:
            loss, _ = term(x, label, batch=batch)
        loss.backward()
        return loss.detach()

    return run


def rounds(fns: dict[str, Callable], repeats: int, device: str) -> tuple[dict[str, list[float]], dict, dict]:
    """Per-round times of each function, interleaved, after one warm-up that gives each value.

    Returns ``(times, values, failures)``; a function that fails at warm-up is dropped.
    """
    values, failures = {}, {}
    for key, fn in list(fns.items()):
        try:
            values[key] = float(fn())
            sync(device)
        except Exception as err:  # a loss that cannot run on these batches: reported, the others go on
            failures[key] = f"{type(err).__name__}: {err}".split("\n")[0]
    fns = {k: f for k, f in fns.items() if k not in failures}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return times, values, failures


# ---------------------------------------------------------------------------- losses


def loss_params(name: str, args, **extra) -> dict:
    if name != "betti_matching":
        return {}
    params = {"target_cache_bytes": 0, **extra}
    if args.betti_threads is not None:
        params["threads"] = args.betti_threads
    return params


def composite(name: str, args, **extra) -> CompositeLoss:
    """``dice_ce`` + NAME, as a run config builds it."""
    return build_loss([LossTerm(name="dice_ce"), LossTerm(name=name, **loss_params(name, args, **extra))], CLASSES)


def second_term(loss: CompositeLoss) -> CompositeLoss:
    """The NAME term of ``dice_ce`` + NAME alone (same module), called like the whole loss."""
    return CompositeLoss([(loss.names[1], loss.weights[1], loss.terms[1])], loss.out_channels)


def build_terms(args) -> tuple[dict[str, CompositeLoss], dict[str, CompositeLoss], dict[str, str]]:
    """(timed terms, their whole composites, skipped names -> reason)."""
    terms, composites, skipped = {}, {}, {}
    for name in args.names:
        if name in SKIP:
            skipped[name] = SKIP[name]
            continue
        backends = args.betti_backends if name == "betti_matching" else [None]
        for backend in backends:  # Betti matching: one row per engine backend asked for
            key = name if len(backends) == 1 else f"{name}[{backend}]"
            extra = {} if backend in (None, "auto") else {"backend": backend}
            try:
                composites[key] = composite(name, args, **extra)
            except Exception as err:  # a loss being written, a missing optional module
                skipped[key] = f"does not build: {err}"
                continue
            terms[key] = second_term(composites[key])
    return terms, composites, skipped


# ----------------------------------------------------------------------------- output


class Table:
    """Plain-text rows, aligned, printed as they come: ``left`` text columns, then numbers, then a note."""

    def __init__(self, columns: list[tuple[str, int]], left: int, note: bool = False) -> None:
        self.widths = [w for _, w in columns]
        self.left, self.note = left, note
        self.row(*(c for c, _ in columns), *([""] if note else []))

    def row(self, *cells) -> None:
        text = [f"{c:<{w}}" if i < self.left else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, self.widths))]
        if self.note:
            text.append(cells[len(self.widths)])
        print("  ".join(text).rstrip(), flush=True)


def fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if spec == "g":
        return f"{value:.4g}"
    return format(value, spec)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "Dataset201_TopoMortar",
                    help="nnU-Net-layout TopoMortar folder (default data/Dataset201_TopoMortar)")
    ap.add_argument("--model-config", type=Path, default=REPO / "configs" / "unet2d.yaml",
                    help="run config whose 'model' section gives the network (default configs/unet2d.yaml)")
    ap.add_argument("--checkpoint", type=Path,
                    help="run folder or checkpoint file for the partly-trained logits (default: a stand-in)")
    ap.add_argument("--images", type=int, help="training images to draw from (default 8, --quick 2)")
    ap.add_argument("--crop-batch", type=int, help="crops per batch (default 8, --quick 2)")
    ap.add_argument("--crop-size", type=int, help="crop side (default 256, --quick 128)")
    ap.add_argument("--full-batch", type=int, default=2, help="whole images per batch (default 2)")
    ap.add_argument("--repeats", type=counting(0), help="timed rounds after 1 warm-up (default 5, --quick 1; 0: values only)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--betti-threads", type=int, help="Betti matching engine threads (default: all cores)")
    ap.add_argument("--betti-backends", default="auto",
                    help="comma-separated engine backends of the Betti matching term, one row each "
                         "(default auto; e.g. cuda,cpu on a GPU: the CUDA backend against the CPU engine)")
    ap.add_argument("--losses", help="comma-separated subset of the registry's names (default: all)")
    ap.add_argument("--loss-scale", action="store_true",
                    help="also print each term's value, and Betti matching's per normalize")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 images, 1 repeat, 2 x 128² crops (a smoke test)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    quick = args.quick
    args.images = args.images or (2 if quick else 8)
    args.crop_batch = args.crop_batch or (2 if quick else 8)
    args.crop_size = args.crop_size or (128 if quick else 256)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 5)
    wanted = args.losses.split(",") if args.losses else list(LOSS_NAMES)
    unknown = sorted(set(wanted) - set(LOSS_NAMES))
    if unknown:
        ap.error(f"unknown loss {', '.join(unknown)}; the registry has {', '.join(LOSS_NAMES)}")
    args.names = [n for n in LOSS_NAMES if n in wanted]
    from medseg.topology._inputs import BACKENDS

    args.betti_backends = list(dict.fromkeys(b.strip() for b in args.betti_backends.split(",")))
    bad = [b for b in args.betti_backends if b not in BACKENDS]
    if bad:
        ap.error(f"--betti-backends: unknown backend {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("CUDA is not available")
    return args


def header(args, images: list[dict], net_desc: str, partly: str, skipped: dict, betti_threads: int) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = {
        "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "betti_threads": betti_threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__, "device": args.device, "load_average": load,
    }
    print("medseg losses on TopoMortar: the cost of each loss term per training step, against the network step")
    print(f"data: {args.data}, {len(images)} training images ({', '.join(im['name'] for im in images)})")
    print(f"network: {net_desc}")
    print(f"partly trained logits: {partly}")
    print(f"machine: {machine['cores']} cores, torch {torch.__version__} on {args.device}, "
          f"torch threads: {machine['torch_threads']} (OMP_WAIT_POLICY={machine['omp_wait_policy'] or 'unset: libgomp spins a while'}), "
          f"Betti matching engine threads: {betti_threads}, load average {load:.1f}")
    if args.repeats:
        print(f"times: median of {args.repeats} round{'s' if args.repeats > 1 else ''} after 1 warm-up, seconds per "
              "step; alone: the term by itself; in step: what it adds to dice_ce on the same logits (dice_ce + "
              "NAME minus dice_ce, paired by round: the terms share the softmax and the encoded target); "
              "x network: over the network step's time")
    for name, reason in skipped.items():
        print(f"skipped: {name}: {reason}")
    return machine


NETWORK = "(network step)"


def prediction_states(untrained, trained, pixels: dict, where: list, setting: Setting, image, label, args) -> dict:
    """``{state: (network of its step, that network's input, logits)}`` of one batch."""
    states = {"noisy": (untrained, image, network_logits(untrained, image))}
    if trained is not None:
        net = trained[0].eval()
        net_image = gather(pixels["checkpoint"], where, setting.size).to(args.device)
        states["partly trained"] = (net, net_image, network_logits(net, net_image))
    else:
        logits = stand_in_logits(label, args.seed).to(args.device)
        heads = states["noisy"][2]
        if is_deep_supervision_output(heads, image):  # the stand-in on every head
            logits = logits[:, None].expand(-1, heads.shape[1], *logits.shape[1:]).contiguous()
        states["partly trained"] = (untrained, image, logits)
    return states


DICE_CE = "(dice_ce on the logits)"


def in_step(times: dict[str, list[float]], key: str, base_key: str) -> float | None:
    """Median over rounds of ``times[key][r] - times[base_key][r]`` (paired by round)."""
    if key not in times or base_key not in times:
        return None
    return statistics.median(t - b for t, b in zip(times[key], times[base_key]))


def time_state(args, what: dict, net, net_image, logits, label, terms: dict, composites: dict, targets: dict,
               dice_ce, table: Table, result: dict) -> None:
    """The network step and every term on one batch and state: table rows and JSON rows.

    Each term is timed alone and inside ``dice_ce + NAME`` (paired round by round with
    ``dice_ce`` alone on the same logits): inside, it shares the activation and the encoded
    target with ``dice_ce``, as in a training step.
    """
    net.train()
    final = final_output(logits, net_image)
    fns = {NETWORK: network_step(net, net_image, label, dice_ce), DICE_CE: term_step(dice_ce, final, label, {})}
    heads = logits.shape[1] if is_deep_supervision_output(logits, net_image) else 0
    if heads:
        fns[f"{DICE_CE} (all {heads} heads)"] = term_step(dice_ce, logits, label, {})
    loss_of = {}  # row key -> (loss name, heads it covers: "final" or "all")
    for n, t in terms.items():
        fns[n], loss_of[n] = term_step(t, final, label, targets[n]), (n, "final")
        fns[f"{n} + dice_ce"] = term_step(composites[n], final, label, targets[n])
        if heads:
            key = f"{n} (all {heads} heads)"
            fns[key], loss_of[key] = term_step(t, logits, label, targets[n]), (n, "all")
            fns[f"{key} + dice_ce"] = term_step(composites[n], logits, label, targets[n])
    times, values, failures = rounds(fns, args.repeats, args.device)
    net.zero_grad(set_to_none=True)
    base = statistics.median(times[NETWORK]) if NETWORK in times else None
    result["network"].append({**what, "seconds": base, "times": times.get(NETWORK), "dice_ce": values.get(NETWORK)})
    first = True
    for key in [NETWORK, *loss_of]:
        if key in failures:
            print(f"  {key}: fails on {what['label']}, {what['state']}: {failures[key]}")
            result["failures"].append({**what, "loss": key, "error": failures[key]})
            continue
        seconds = statistics.median(times[key])
        ratio = seconds / base if base else None
        lead = (what["label"], what["state"]) if first else ("", "")
        first = False
        if key == NETWORK:  # its value is dice_ce of the network's own output, not of the logits
            table.row(*lead, key, fmt(seconds), fmt(ratio, ".3f"), "", "", "", "")
            continue
        name, covered = loss_of[key]
        extra = in_step(times, f"{key} + dice_ce", DICE_CE if covered == "final" else f"{DICE_CE} (all {heads} heads)")
        extra_ratio = extra / base if base and extra is not None else None
        note = "precomputed: " + ", ".join(targets[name]) if targets.get(name) else ""
        table.row(*lead, key, fmt(seconds), fmt(ratio, ".3f"), fmt(extra), fmt(extra_ratio, ".3f"),
                  fmt(values[key], "g"), note)
        result["rows"].append({**what, "loss": key, "heads": covered, "seconds": seconds, "times": times[key],
                               "network_seconds": base, "ratio": ratio, "in_step_seconds": extra,
                               "in_step_ratio": extra_ratio, "value": values[key],
                               "precomputed": sorted(targets[name])})


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv``: the command line's arguments); returns what ``--json`` writes."""
    from medseg.topology._inputs import default_threads

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = training_images(args.data, args.images, args.seed)
    net_cfg = model_config(args.model_config)
    crop = Setting("crop", args.crop_batch, (args.crop_size, args.crop_size))
    settings = [crop, Setting("full", args.full_batch, None)]
    dice_ce = build_loss([LossTerm(name="dice_ce")], CLASSES)
    terms, composites, skipped = build_terms(args)
    trained = checkpoint_network(args.checkpoint, args.device) if args.checkpoint is not None else None
    partly = trained[2] if trained is not None else f"{STAND_IN}, seed {args.seed}"
    untrained = untrained_network(net_cfg, crop.size, args.seed, args.device)
    net_desc = f"{net_cfg.name} of {args.model_config} ({parameters(untrained)}), untrained, seed {args.seed}"
    if net_cfg.params.get("deep_supervision"):
        net_desc += ("; deep supervision: the network step sums dice_ce over every head; each term is timed on "
                     "the final head (heads: final) and over every head (rows 'all K heads', heads: all)")
    machine = header(args, images, net_desc, partly, skipped, default_threads(args.betti_threads))

    pixels = {"zscore": normalised(images, zscore_preprocessing())}
    if trained is not None:
        pixels["checkpoint"] = normalised(images, trained[1])
    labels = [torch.from_numpy(im["label"])[None] for im in images]
    rng = np.random.default_rng(args.seed)
    result = {"machine": machine, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "partly_trained": partly, "network_model": net_desc, "skipped": skipped,
              "settings": [], "network": [], "rows": [], "failures": [], "loss_scale": []}
    table = None
    if args.repeats:
        print()
        table = Table([("setting", 16), ("state", 14), ("loss", 44), ("alone", 9), ("x network", 9),
                       ("in step", 9), ("x network", 9), ("value", 10)], left=3, note=True)
    scale_inputs = []
    for setting in settings:
        where = picks(images, setting, rng)
        image = gather(pixels["zscore"], where, setting.size).to(args.device)
        label = gather(labels, where, setting.size).to(args.device)
        shape = tuple(label.shape[-2:])
        name = setting.label(shape)
        result["settings"].append({"setting": setting.name, "label": name, "batch": setting.batch,
                                   "shape": list(shape), "samples": [images[i]["name"] for i, _, _ in where]})
        targets = {n: {k: v.to(args.device) for k, v in pipeline_targets(composites[n], label.cpu()).items()}
                   for n in terms}
        if shape != crop.size:  # DynUNet's default plan depends on the patch
            untrained = untrained_network(net_cfg, shape, args.seed, args.device)
        states = prediction_states(untrained, trained, pixels, where, setting, image, label, args)
        for state, (net, net_image, logits) in states.items():
            scale_inputs.append((name, state, final_output(logits, net_image), label, targets))
            what = {"setting": setting.name, "label": name, "shape": list(shape), "batch": setting.batch,
                    "state": state}
            if args.repeats:
                time_state(args, what, net, net_image, logits, label, terms, composites, targets, dice_ce, table,
                           result)
    if args.loss_scale:
        loss_scale(args, terms, scale_inputs, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    return result


@torch.no_grad()
def loss_scale(args, terms: dict[str, CompositeLoss], inputs: list, result: dict) -> None:
    """Each term's value on the two states' logits, next to dice_ce's; Betti matching per normalize."""
    reference_loss = build_loss([LossTerm(name="dice_ce")], CLASSES)
    variants = {n: t for n, t in terms.items() if n != "betti_matching"}
    if any(n.startswith("betti_matching") for n in terms):
        for how in BETTI_NORMALIZE:
            variants[f"betti_matching ({how})"] = second_term(composite("betti_matching", args, normalize=how))
    values: dict[tuple[str, str], dict[str, float]] = {}
    reference: dict[str, dict[str, float]] = {}
    for name, state, logits, label, targets in inputs:
        reference.setdefault(name, {})[state] = float(reference_loss(logits, label)[0])
        for key, term in variants.items():
            batch = targets.get(key.split(" ")[0], {})
            try:
                values.setdefault((name, key), {})[state] = float(term(logits, label, batch=batch)[0])
            except Exception as err:  # a failure of one term does not hide the others' values
                values.setdefault((name, key), {})[state] = None
                print(f"  {key}: fails on {name}, {state}: {type(err).__name__}: {err}".split("\n")[0])
    states = list(dict.fromkeys(s for _, s, *_ in inputs))
    print("\nloss scale: value of each term (unweighted, mean over the batch), and its ratio to dice_ce's")
    columns = [("setting", 16), ("loss", 24)]
    for state in states:
        columns += [(state, 14), ("/ dice_ce", 10)]
    table = Table(columns, left=2)
    for name in dict.fromkeys(n for n, *_ in inputs):
        for i, key in enumerate(variants):
            cells = [name if i == 0 else "", key]
            row = {"setting": name.split(" ")[0], "label": name, "loss": key}
            for state in states:
                v = values[(name, key)].get(state)
                ref = reference[name].get(state)
                ratio = v / ref if ref and v is not None else None
                cells += [fmt(v, "g"), fmt(ratio, "g")]
                row[state] = v
                row[f"{state} / dice_ce"] = ratio
            table.row(*cells)
            result["loss_scale"].append(row)


if __name__ == "__main__":
    from medseg.errors import MedsegError

    try:
        main()
    except MedsegError as err:  # a bad config, dataset or checkpoint: one line, as the CLI gives it
        sys.exit(f"topomortar.py: error: {err}")

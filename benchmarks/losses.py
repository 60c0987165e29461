"""Forward + backward time of every medseg loss, against dice_ce and against the competitors.

Every name in ``medseg.losses.LOSS_NAMES`` is read at run time (a loss added to the
registry is picked up) and built as a run config builds it: ``build_loss([{name}],
out_channels)``, i.e. a softmax head with a one-hot target. A loss that fails to build or
to run is skipped with the reason. Targets the data pipeline precomputes for a loss
(Skeleton Recall's tubed skeleton, SAUNA's signed target, cbDice/clCE skeleton distances)
are computed beforehand by that loss's own target transforms, as in training, and passed
in the batch. One step is ``loss(logits, label, batch).backward()`` on fresh logits.

Per loss: the median time of ``--repeat`` steps, the ratio to ``dice_ce`` (timed in the same
rounds) and, where there is one, the ratio to the competitor. Everything in a row runs in this process, interleaved
round by round so that machine noise hits all alike; a ratio is the median of the
per-round ratios. Competitors:

- ``cldice``: MONAI's ``SoftDiceclDiceLoss`` with the same settings (``iter_``, ``alpha``,
  smoothing, softmax, one-hot target, background excluded), which gives the same value
  (checked, printed); and MONAI's defaults (background included: twice the channels).
- ``skeleton_recall``: the cost of its target over the batch (CPU): medseg's
  ``skeleton_tube`` (``medseg.topology.skeletonize`` + dilation, per class) against the
  reference implementation's transform (``skimage.morphology.skeletonize`` of the
  foreground, two ``skimage.morphology.dilation`` with the cross, times the label).

Data: one synthetic vessel tree per sample (``medseg.data.synthetic.make_case``); the
logits are a scaled, clipped signed distance to the vessels plus smooth noise: a network
that is right in the large. ``betti_matching`` takes seconds per step at 96^3, so it runs
at ``--betti-shape`` (default 48^3) and is compared with ``dice_ce`` timed there.

Threads: ``torch.set_num_threads(--threads)``, default 2. OpenMP waits as ``medseg
train`` lets it (libgomp's default: spinning a while after each parallel region), which is
the fastest on a quiet machine. On a machine shared with other jobs, set
``OMP_WAIT_POLICY=PASSIVE``: there the spin-wait makes every parallel region wait for a
descheduled sibling thread, which inflates a step of many short kernels 5-10 times (600
``torch.minimum`` calls on 96^3 at load 4: 0.5 s with 1 thread, 4.7 s with 2 spinning
threads, 0.7 s with 2 passive ones); on a quiet one PASSIVE makes them slower instead.
The policy is printed with the results. CUDA rows are added when
``torch.cuda.is_available()``.

Usage::

    python benchmarks/losses.py                    # 2 x 2 x 96^3 (one to two minutes)
    python benchmarks/losses.py --quick            # 2 x 2 x 48^3, 3 rounds
    python benchmarks/losses.py --losses cldice --threads 1
    python benchmarks/losses.py --shape 128,128 --batch 8 --json losses.json
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from medseg.losses import LOSS_NAMES, build_loss


# ----------------------------------------------------------------------------- data


def vessel_batch(batch: int, channels: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C, *shape) float32 and labels (B, 1, *shape) int64 of synthetic vessel trees.

    With more than 2 channels the tree is cut into ``channels - 1`` classes along the first axis.
    """
    from medseg.data.synthetic import make_case

    labels, logits = [], []
    rng = np.random.default_rng(seed)
    for b in range(batch):
        vessel = make_case(b, seed=seed, size=shape, dims=len(shape), loops=3)["label"] > 0
        band = (np.arange(shape[0]) * (channels - 1) // shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        label = np.where(vessel, 1 + band, 0).astype(np.int64)
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        noise /= noise.std()
        sample = np.zeros((channels,) + shape, np.float32)
        for c in range(1, channels):
            mask = label == c
            signed = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
            sample[c] = 2.0 * np.clip(signed + noise, -3.0, 3.0)
        labels.append(label[None])
        logits.append(sample)
    return torch.from_numpy(np.stack(logits)), torch.from_numpy(np.stack(labels))


def pipeline_targets(composite, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch keys the loss's own data transforms write (as training precomputes them)."""
    transforms = composite.pre_crop_transforms() + composite.target_transforms()
    if not transforms:
        return {}
    samples = []
    for b in range(label.shape[0]):
        data = {"label": label[b]}
        for transform in transforms:
            data = transform(data)
        samples.append(data)
    keys = sorted(set(samples[0]) - {"label"})
    return {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in keys}


def reference_skeleton_target(label: np.ndarray) -> np.ndarray:
    """The Skeleton Recall reference's target of one label map (its nnU-Net transform)."""
    from skimage.morphology import dilation, skeletonize

    foreground = label > 0
    if not foreground.any():
        return np.zeros(label.shape, np.int16)
    skel = (skeletonize(foreground) > 0).astype(np.int16)
    return dilation(dilation(skel)) * label.astype(np.int16)


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(loss: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``loss`` on fresh logits."""

    def run() -> None:
        x = logits.detach().clone().requires_grad_(True)
        loss(x).backward()

    return run


def interleaved(fns: dict[str, Callable[[], None]], repeat: int, device: str) -> dict[str, list[float]]:
    """Per-round times of each function, the functions alternating within each round."""
    for fn in fns.values():  # warm-up
        fn()
        sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t)
    return times


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------- main


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    if len(shape) == 1:
        shape = shape * 3
    if len(shape) not in (2, 3):
        raise argparse.ArgumentTypeError(f"shape must have 2 or 3 sizes, got {text!r}")
    return shape


def fmt_shape(batch: int, channels: int, shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in (batch, channels, *shape))


class Table:
    """Rows printed as they come, then again as a markdown table."""

    columns = ("device", "loss", "size", "seconds", "x dice_ce", "competitor", "competitor s", "ratio", "note")

    def __init__(self) -> None:
        self.rows: list[dict] = []
        print(f"{'device':<6} {'loss':<24} {'size':<16} {'seconds':>9} {'x dice_ce':>9}  "
              f"{'competitor':<28} {'comp. s':>9} {'ratio':>7}  note")

    def add(self, device, loss, size, seconds=None, x_dice_ce=None, competitor="", competitor_s=None, ratio=None,
            note=""):
        row = dict(zip(self.columns, (device, loss, size, seconds, x_dice_ce, competitor, competitor_s, ratio, note)))
        self.rows.append(row)
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{device:<6} {loss:<24} {size:<16} {f(seconds, '9.4f')} {f(x_dice_ce, '9.2f')}  "
              f"{competitor:<28} {f(competitor_s, '9.4f')} {f(ratio, '7.3f')}  {note}", flush=True)

    def markdown(self) -> str:
        f = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(f(r[c]) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)


def monai_cldice(term, channels: int, device: str) -> dict[str, torch.nn.Module]:
    """MONAI's clDice + Dice set up as medseg's ``term`` (called with a float label map)."""
    from monai.losses import SoftDiceclDiceLoss

    head = dict(sigmoid=True) if channels == 1 else dict(softmax=True, to_onehot_y=True)
    same = dict(iter_=term.iterations, alpha=term.alpha, smooth=max(term.smooth, 1e-12), smooth_nr=term.smooth_nr,
                smooth_dr=term.smooth_dr, **head)
    if channels == 1:  # the only channel is scored, whatever include_background says
        return {"MONAI SoftDiceclDiceLoss": SoftDiceclDiceLoss(include_background=True, **same).to(device)}
    return {
        "MONAI SoftDiceclDiceLoss": SoftDiceclDiceLoss(include_background=term.include_background, **same).to(device),
        "MONAI, its defaults (bg in)": SoftDiceclDiceLoss(include_background=True, **same).to(device),
    }


def cldice_competitors(composite, logits, label, channels: int, device: str) -> tuple[dict, str]:
    """Steps of MONAI's clDice, and a note saying whether its value is medseg's."""
    term = composite.terms[0]
    competitors = monai_cldice(term, channels, device)
    steps = {key: step(lambda x, m=m: m(x, label.float()), logits) for key, m in competitors.items()}
    scored = channels - (0 if term.include_background or channels == 1 else 1)
    if scored > 1:  # MONAI sums all classes into one skeleton; medseg averages them
        return steps, f"{scored} classes: values differ by design (medseg scores classes separately)"
    with torch.no_grad():
        ours = float(composite(logits, label)[0])
        theirs = float(next(iter(competitors.values()))(logits, label.float()))
    same = abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs))
    return steps, f"value {ours:.6f} vs MONAI {theirs:.6f}: " + ("same" if same else "DIFFERENT")


def rounds(args, what: str) -> int:
    """Timed rounds: fewer for the slow ones unless --repeat says otherwise."""
    if args.repeat:
        return args.repeat
    full = 3 if args.quick else 7
    return max(3, full // 2) if what in ("betti_matching", "skeleton_target") else full


def bench_loss(name: str, device: str, args, table: Table, case, dice_ce) -> None:
    """One registry loss on one device: a row, or a printed reason to skip it."""
    shape, note = args.shape, ""
    if name == "betti_matching" and args.betti_shape != args.shape:
        shape = args.betti_shape
        note = f"run at {fmt_shape(args.batch, args.channels, shape)} (the main size takes seconds per step)"
    size = fmt_shape(args.batch, args.channels, shape)
    try:
        composite = build_loss([{"name": name}], args.channels)
    except Exception as err:  # a loss being written, a missing optional module
        print(f"{device:<6} {name:<24} skipped: does not build: {err}")
        return
    logits, label = case(shape)
    try:
        batch = {k: v.to(device) for k, v in pipeline_targets(composite, label.cpu()).items()}
    except Exception as err:
        print(f"{device:<6} {name:<24} skipped: its target transforms fail: {type(err).__name__}: {err}")
        return
    if batch:
        note = (note + "; " if note else "") + f"pipeline targets precomputed: {', '.join(batch)}"
    steps = {
        "loss": step(lambda x: composite(x, label, batch)[0], logits),
        "dice_ce": step(lambda x: dice_ce(x, label)[0], logits),
    }
    competitors: dict = {}
    if name == "cldice":
        competitors, note = cldice_competitors(composite, logits, label, args.channels, device)
    try:
        times = interleaved({**steps, **competitors}, rounds(args, name), device)
    except Exception as err:
        print(f"{device:<6} {name:<24} skipped: fails to run: {type(err).__name__}: {err}")
        return
    seconds, x_dice_ce = statistics.median(times["loss"]), ratio(times["loss"], times["dice_ce"])
    if not competitors:
        table.add(device, name, size, seconds, x_dice_ce, note=note)
    for i, key in enumerate(competitors):
        first = i == 0
        table.add(device, name if first else "", size, seconds if first else None, x_dice_ce if first else None,
                  key, statistics.median(times[key]), ratio(times["loss"], times[key]), note if first else "")
    if name == "skeleton_recall" and device == "cpu":
        bench_skeleton_target(composite.terms[0], label, args, table, size)


def bench_skeleton_target(term, label: torch.Tensor, args, table: Table, size: str) -> None:
    """medseg's Skeleton Recall target transform against the reference's, over the batch."""
    from medseg.data.topology_targets import skeleton_tube

    labels = label[:, 0].numpy()
    times = interleaved(
        {
            "medseg": lambda: [skeleton_tube(lab, term.tube_radius, term.footprint) for lab in labels],
            "reference": lambda: [reference_skeleton_target(lab) for lab in labels],
        },
        rounds(args, "skeleton_target"),
        "cpu",
    )
    table.add("cpu", "skeleton_recall target", size, statistics.median(times["medseg"]), None,
              "skimage skeletonize+dilation", statistics.median(times["reference"]),
              ratio(times["medseg"], times["reference"]),
              f"medseg skeleton_tube(tube_radius={term.tube_radius}, footprint={term.footprint!r}), per batch")


def bench_device(device: str, args, table: Table, cases: dict) -> None:
    def case(shape):  # the same data on every device
        key = (args.batch, args.channels, shape, args.seed)
        if key not in cases:
            cases[key] = vessel_batch(args.batch, args.channels, shape, args.seed)
        logits, label = cases[key]
        return logits.to(device), label.to(device)

    dice_ce = build_loss([{"name": "dice_ce"}], args.channels)
    for name in args.names:
        bench_loss(name, device, args, table, case, dice_ce)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shape, help="spatial size: 96, 96,96,96 or 256,256 (default 96^3)")
    ap.add_argument("--betti-shape", type=parse_shape,
                    help="spatial size for betti_matching (default 48^3, --quick 32^3; a 2D --shape itself)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=2, help="output channels, background included (default 2)")
    ap.add_argument("--repeat", type=counting(1), default=None,
                    help="timed rounds per loss (default 7, --quick 3; betti_matching and the skeleton targets half)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="default: CPU, and CUDA when available")
    ap.add_argument("--quick", action="store_true", help="2 x 2 x 48^3 (betti_matching 32^3), 3 rounds")
    ap.add_argument("--losses", help="comma-separated subset of the registry's names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    args = ap.parse_args()
    args.shape = args.shape or ((48, 48, 48) if args.quick else (96, 96, 96))
    if args.betti_shape is None:  # 2D is fast enough at the main size
        args.betti_shape = args.shape if len(args.shape) == 2 else ((32, 32, 32) if args.quick else (48, 48, 48))
    repeat = rounds(args, "")
    wanted = args.losses.split(",") if args.losses else list(LOSS_NAMES)
    if set(wanted) - set(LOSS_NAMES):
        unknown = ", ".join(sorted(set(wanted) - set(LOSS_NAMES)))
        ap.error(f"unknown loss {unknown}; the registry has {', '.join(LOSS_NAMES)}")
    args.names = [n for n in LOSS_NAMES if n in wanted]
    torch.set_num_threads(args.threads)
    devices = [] if args.device == "cuda" else ["cpu"]
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    elif args.device == "cuda":
        ap.error("CUDA is not available")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"medseg losses, forward + backward, {fmt_shape(args.batch, args.channels, args.shape)} (B x C x size); "
        f"torch {torch.__version__}, {args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset: libgomp spins a while'}), "
        f"{len(os.sched_getaffinity(0))} cores, load average {load:.1f}; "
        f"median of {repeat} rounds; losses: {', '.join(args.names)}\n"
    )
    table, cases = Table(), {}
    for device in devices:
        bench_device(device, args, table, cases)
    print()
    print(table.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "shape": args.shape, "betti_shape": args.betti_shape, "batch": args.batch,
                    "channels": args.channels, "threads": args.threads, "repeat": repeat,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
                    "rows": table.rows,
                },
                f,
                indent=2,
            )
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()

"""A topology loss over every deep-supervision head: one call per head against all heads at once.

With deep supervision (DynUNet, ``heads: all``) the trainer computes each loss term on
every output head (:func:`medseg.losses.deep_supervision_loss`). A loss function without
``forward_heads`` takes one call per head; :class:`medseg.losses.CompositeLoss` hands a
term with a ``forward_heads`` of its own all heads at once, which for Betti matching means
one engine call for the K x B matchings, each target's barcode prepared once for its K
heads. This script times the two side by side in one process on TopoMortar batches, with
the heads of the protocol's untrained DynUNet (``benchmarks/topomortar_study.yaml``) as
the logits, forward + backward, interleaved round by round, and checks that both give
the same value.

Usage::

    python benchmarks/deep_supervision_heads.py                       # 8 x 256² crops, 2 x 512² images
    python benchmarks/deep_supervision_heads.py --repeats 3 --crop-batch 2 --crop-size 128   # a quick look
"""

from __future__ import annotations

import argparse
from _args import counting  # noqa: E402  (benchmarks/_args.py, beside this script)

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import topomortar as tm  # noqa: E402  (the TopoMortar batches and the protocol's network)

from medseg.config import LossTerm  # noqa: E402
from medseg.losses import build_loss, deep_supervision_loss  # noqa: E402


class OneCallPerHead(torch.nn.Module):
    """The composite without ``forward_heads``: deep_supervision_loss calls it head by head."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input, target, batch=None, head=0):
        return self.loss(input, target, batch=batch, head=head)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=tm.REPO / "data" / "Dataset201_TopoMortar",
                    help="nnU-Net-layout TopoMortar folder (default data/Dataset201_TopoMortar)")
    ap.add_argument("--model-config", type=Path, default=tm.REPO / "benchmarks" / "topomortar_study.yaml",
                    help="config whose 'model' gives the network with deep supervision (default: the protocol's)")
    ap.add_argument("--images", type=int, default=8, help="training images to draw from (default 8)")
    ap.add_argument("--crop-batch", type=int, default=8)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--full-batch", type=int, default=2, help="whole images per batch (default 2)")
    ap.add_argument("--repeats", type=counting(1), default=9, help="timed rounds after one warm-up (default 9)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = tm.model_config(args.model_config)
    if not cfg.params.get("deep_supervision"):
        raise SystemExit(f"{args.model_config}: the model has no deep supervision")
    images = tm.training_images(args.data, args.images, args.seed)
    pixels = tm.normalised(images, tm.zscore_preprocessing())
    labels = [torch.from_numpy(im["label"])[None] for im in images]
    term = LossTerm(name="betti_matching", weight=1000.0, normalize="voxels", target_cache_bytes=0)
    loss = build_loss([term], tm.CLASSES)  # the study's setting; no cache: a new target every step
    ways = {"one call per head": OneCallPerHead(loss), "all heads in one call": loss}
    rng = np.random.default_rng(args.seed)
    print(f"betti_matching over the deep-supervision heads of {cfg.name} ({args.model_config.name}); "
          f"{torch.get_num_threads()} torch threads; medians of {args.repeats} rounds, forward + backward")
    result = {}
    for setting in (tm.Setting("crop", args.crop_batch, (args.crop_size, args.crop_size)),
                    tm.Setting("full", args.full_batch, None)):
        where = tm.picks(images, setting, rng)
        image, label = tm.gather(pixels, where, setting.size), tm.gather(labels, where, setting.size)
        net = tm.untrained_network(cfg, tuple(label.shape[-2:]), args.seed, "cpu")
        outputs = tm.network_logits(net, image)  # (B, K, C, H, W)
        times = {k: [] for k in ways}
        values = {}
        for r in range(args.repeats + 1):
            for name in (list(ways) if r % 2 else list(ways)[::-1]):
                x = outputs.clone().requires_grad_(True)
                start = time.perf_counter()
                total, _ = deep_supervision_loss(ways[name], x, label)
                total.backward()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                values[name] = float(total.detach())
        per_head, at_once = (statistics.median(times[k]) for k in ways)
        what = setting.label(tuple(label.shape[-2:])) + f", {outputs.shape[1]} heads"
        same = values["one call per head"] == values["all heads in one call"]
        print(f"  {what:32s} one call per head {per_head * 1e3:7.1f} ms   all heads in one call "
              f"{at_once * 1e3:7.1f} ms   ratio {at_once / per_head:.3f}   same value: {same}")
        result[setting.name] = {"per_head": per_head, "at_once": at_once, "same_value": same}
    return result


if __name__ == "__main__":
    main()

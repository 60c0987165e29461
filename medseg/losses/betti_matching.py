"""Betti matching loss (Stucki et al., ICML 2023; 3D: Stucki et al., 2024).

Compares the persistence barcodes of the predicted likelihood map and of the target
mask through the induced matching of :func:`medseg.topology.betti_matching`: features
of the prediction that sit where a feature of the target sits are matched and pulled
onto it, the others are pushed onto the diagonal (they disappear).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from medseg.losses._prepare import (
    activation_and_target,
    check_activation_flags,
    check_flag,
    check_input,
    check_reduction,
    encodes_labels,
)
from medseg.topology import _backends, _inputs
from medseg.topology.matching import _matching_indices, _prepare_targets

__all__ = ["BettiMatchingLoss"]

_FILTRATIONS = ("superlevel", "sublevel", "both")
_NORMALIZE = ("none", "pairs", "voxels")


class _FusedPairTerms(torch.autograd.Function):
    """The per-instance sums of the loss's pair terms for CPU tensors, one native pass per
    filtration (``_engine.betti_loss_terms``, medseg/topology/csrc/loss_terms.hpp), with
    the derivative at every index kept for backward (``_engine.betti_loss_grad``): one
    scatter instead of autograd through a gather and a dozen elementwise ops.

    forward(activated (B, C, *spatial), first: the first channel used, values: the used
    channels as B * (C - first) numpy arrays, values_t: the target's (empty for a 0/1
    target), matchings: [(superlevel, engine indices)], options, threads: forward's and
    backward's instances are spread over them) -> (per-instance sums
    (B * (C - first),) float64, pair counts (numpy int64)). The gradient is written into
    the used channels of a gradient of ``activated``'s shape: no slice to backpropagate.

    The native gradient has no derivative of its own. Under ``create_graph=True`` (a
    gradient penalty, Hessian-vector products) backward takes the gradient through
    ``torch_terms(activated)`` instead, the same sums as a torch graph
    (:meth:`BettiMatchingLoss._torch_terms`), which backpropagates again: the fused pass
    gave a wrong second derivative in silence.
    """

    @staticmethod
    def forward(ctx, activated, first, values, values_t, matchings, options, threads, torch_terms):  # noqa: D102
        engine = _inputs.engine()
        instances = len(values)
        per_instance = np.zeros(instances, dtype=np.float64)
        counted = np.zeros(instances, dtype=np.int64)
        saved = []
        for superlevel, (index_p, sizes_p, index_t, sizes_t) in matchings:
            coef = np.empty(index_p.shape[0], dtype=values[0].dtype)
            engine.betti_loss_terms(
                values, values_t, index_p, sizes_p, index_t, sizes_t, superlevel, *options, per_instance, counted, coef,
                threads,
            )
            saved.append((coef, index_p, sizes_p))
        ctx.saved, ctx.first, ctx.threads = saved, first, threads
        ctx.shape, ctx.dtype = activated.shape, activated.dtype
        ctx.torch_terms = torch_terms
        ctx.save_for_backward(activated)
        return torch.from_numpy(per_instance), counted

    @staticmethod
    def backward(ctx, grad_per_instance, _counted):  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable again
            (activated,) = ctx.saved_tensors
            per_instance = ctx.torch_terms(activated)
            (grad,) = torch.autograd.grad(per_instance, activated, grad_per_instance.to(per_instance.dtype),
                                          create_graph=True)
            return grad, None, None, None, None, None, None, None
        engine = _inputs.engine()
        upstream = np.ascontiguousarray(grad_per_instance.detach().to(torch.float64).numpy())
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype)
        channels = [grad[b, c].numpy() for b in range(ctx.shape[0]) for c in range(ctx.first, ctx.shape[1])]
        for coef, index_p, sizes_p in ctx.saved:
            # the threads are a parallel region of torch's OpenMP runtime (run_team in
            # csrc/host_passes.hpp): its workers, still spinning after the ops before,
            # take the work instead of competing for the cores (0.5 ms less a batch)
            engine.betti_loss_grad(coef, index_p, sizes_p, upstream, channels, ctx.threads)
        return grad, None, None, None, None, None, None, None


class BettiMatchingLoss(torch.nn.Module):
    r"""Betti matching loss between a predicted likelihood map and a target mask.

    For each image and channel, the prediction's probabilities P and the target G are
    Betti-matched (:func:`medseg.topology.betti_matching`) and

    .. math::

        L = \sum_{d} w_d \Big[ \lambda_m \sum_{(p, g)\ \text{matched}}
            2\big((b_p - b_g)^2 + (d_p - d_g)^2\big)
          + \lambda_u \sum_{p\ \text{unmatched}} (b_p - d_p)^2
          + \sum_{g\ \text{unmatched}} (b_g - d_g)^2 \Big]

    where (b, d) are the values of P (or G) at the birth and death voxels of a
    persistence pair of dimension d.

    Scale. Every term of the sum is at most 4, and there is one per persistence pair, so
    with ``normalize="none"`` (the papers' formula) the loss grows with the number of
    features: about with the patch's area or volume for a noisy prediction. Measured on
    TopoMortar (``benchmarks/topomortar.py --loss-scale``, 2D UNet of
    ``configs/unet2d.yaml``): an untrained network's loss is about 1,200 on a 256² crop
    and 5,000 on a 512² image, against 1.5 for Dice + CE; a network trained for 200
    iterations gives about 5 on 256² crops, against 0.2. The papers' weight 0.5, chosen
    on 48² patches, therefore swamps Dice + CE at these sizes.
    ``normalize="voxels"`` divides each image's loss by its number of voxels, which
    removes the growth with the patch: 7e-5 per pixel in that partly trained state, so
    weights in the thousands put the term on Dice + CE's scale. Recommended (and what
    ``medseg plan --topology-loss betti_matching`` writes):
    ``{name: betti_matching, weight: 1000, normalize: voxels, start: 0.25, ramp: 0.1}``
    next to ``dice_ce``, chosen between 1000 and 10000 on TopoMortar's validation images
    (``benchmarks/topomortar_cpu.yaml``; 10000 overshoots: more Betti errors and 0.01
    less Dice). On its test images (seed 0) this kept Dice at 0.911 and lowered the
    Betti 0 / 1 errors from 6.4 / 3.9 to 1.9 / 1.9.
    ``normalize="pairs"`` divides by the image's number of pairs (all three sums, all
    dimensions), which bounds it by 4; most pairs of a noisy prediction are short, so
    this mean is small (0.05 untrained, 0.006 partly trained). The schedule of the term
    (``start``, ``ramp`` of the loss term in the run config) is the other half of using
    it on large patches: on an untrained network the matching is mostly noise. Gradients flow to those voxels of P; only the
    coordinates come back from the engine (which runs on the CPU), so CPU and CUDA
    tensors are both accepted. With ``push_unmatched_to_1_0`` every unmatched pair, the
    prediction's and the target's alike (as the reference implementation does), is
    pulled to the point (1, 0) of the reference's sublevel convention,
    2((b - b*)^2 + (d - d*)^2) with (b*, d*) = (0, 1) for a superlevel filtration on
    probabilities, instead of onto the diagonal.

    ``input`` is the raw network output (B, C, H, W[, D]); ``target`` an integer label
    map (B, 1, ...) or a one-hot target (B, C, ...). Channels are treated one by one
    (multi-class outputs: one foreground-vs-rest matching per class).

    References:
        Stucki, Paetzold, Shit, Menze, Bauer. "Topologically faithful image segmentation
        via induced matching of persistence barcodes", ICML 2023.
        Stucki, Bürgin, Paetzold, Bauer, Menze, Bauer. "Efficient Betti Matching Enables
        Topology-Aware 3D Segmentation via Persistent Homology", 2024.
    """

    #: CPU tensors: the pair terms in one native pass (_FusedPairTerms); False takes the
    #: torch form that device tensors take (tests compare the two)
    fused_terms = True

    def __init__(
        self,
        include_background: bool = False,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        reduction: str = "mean",
        filtration: str = "superlevel",
        construction: str = "V",
        comparison: str = "union",
        relative: bool = False,
        dimension_weights: Sequence[float] | None = None,
        matched_weight: float = 1.0,
        unmatched_weight: float = 1.0,
        barcode_length_threshold: float = 0.0,
        push_unmatched_to_1_0: bool = False,
        normalize: str = "none",
        threads: int | None = None,
        target_cache_bytes: int = 64 << 20,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            include_background: if False, channel 0 of a multi-channel output is left out
                (a 1-channel output is always the foreground).
            to_onehot_y: one-hot encode a (B, 1, ...) label map; None = when C > 1.
            sigmoid: apply a sigmoid to the input; None = for a 1-channel output.
            softmax: apply a softmax over channels; None = for a C > 1 output.
            reduction: "mean" or "sum" over images and channels, or "none" for a (B, C')
                tensor of per-image, per-channel losses.
            filtration: "superlevel" (foreground = high likelihood), "sublevel", or
                "both" (the sum of the two losses).
            construction: "V" (values on voxels, 4/6-connected foreground) or "T"
                (values on top cells, 8/26-connected foreground).
            comparison: "union" (the paper's comparison image) or "intersection" (see
                :func:`medseg.topology.betti_matching`).
            relative: persistence relative to the image border (see
                :func:`medseg.topology.betti_matching`).
            dimension_weights: weight w_d of each homology dimension (length = number
                of spatial dimensions); default all 1.
            matched_weight: weight λ_m of the matched pairs.
            unmatched_weight: weight λ_u of the prediction's unmatched pairs.
            barcode_length_threshold: unmatched pairs of the prediction with
                |b - d| <= this value are ignored (treated as noise).
            push_unmatched_to_1_0: pull the unmatched pairs of both the prediction and the
                target to (1, 0) in the reference's convention instead of onto the diagonal.
            normalize: "none" (the sum over pairs, the papers' formula), "pairs" (that sum
                divided by the number of pairs of the image) or "voxels" (divided by the
                number of voxels); see Scale above.
            threads: engine threads for a batch; default all available cores. At most
                ``torch.get_num_threads()`` of them run as a parallel region of torch's
                OpenMP runtime, whose workers would otherwise spin on the cores they
                need (8-10 % of the term on 2 cores; never in forked children, see
                ``run_team`` in medseg/topology/csrc/host_passes.hpp).
            target_cache_bytes: memory budget of the cache of targets' barcodes (keyed by
                a hash of the target's bytes); 0 disables the cache. A cached target
                takes about 70 bytes per pixel in 2D, 90 per voxel in 3D (4.3 MiB for
                256², 17 MiB for 512², 77 MiB for 96³), and only helps when the same
                target comes back (whole images, fixed patches): random crops give a
                new target every step, so a large budget only fills up (1 GiB doubled
                a TopoMortar training run's peak memory) while never hitting. The
                default, 64 MiB, holds a batch or two of 2D crops; the targets of the
                current call are kept even over budget. A target that never recurs
                costs its hash and preparing its barcode apart from the matching: with
                random crops that made the term 20 % slower (48 -> 58 ms on 8 x 256²
                TopoMortar crops); a hit saves 10-15 % of the engine's time. So the
                cache turns itself off (``cache_enabled`` becomes False, the cache is
                emptied) when it evicts a target that was never hit while fewer than
                half of all lookups have hit: the targets then recur, if at all,
                farther apart than the budget holds (a least-recently-used cache
                cannot hit them), and a miss costs more than a hit saves. Raise the
                budget when whole images or fixed patches recur (50 TopoMortar images
                of 512²: about 850 MiB).
            backend: engine backend, "auto", "cpu", "cuda" or "cpu-parallel" (see
                :func:`medseg.topology.betti_matching`; identical results on every
                backend). On "cuda" a CUDA input stays on its device (only coordinates
                come back) and the B x C pairs run on several CUDA streams; the target
                cache serves the "cpu" backend only.

        Raises:
            ValueError: for an unknown reduction, filtration, construction or comparison, both
                sigmoid and softmax, negative weights or threshold.
        """
        super().__init__()
        check_activation_flags(sigmoid, softmax)
        self.reduction = check_reduction(reduction)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        if filtration not in _FILTRATIONS:
            raise ValueError(f"filtration must be one of {_FILTRATIONS}, got {filtration!r}")
        _inputs.check_construction(construction)
        _inputs.check_comparison(comparison)

        def non_negative(value) -> bool:  # and finite: NaN would make every loss NaN
            return math.isfinite(float(value)) and float(value) >= 0

        if not non_negative(barcode_length_threshold):
            raise ValueError(f"barcode_length_threshold must be a finite number >= 0, got {barcode_length_threshold}")
        if not (non_negative(matched_weight) and non_negative(unmatched_weight)):
            raise ValueError(
                f"matched_weight and unmatched_weight must be finite numbers >= 0, got {matched_weight}, {unmatched_weight}"
            )
        # 'no' would have turned them on (the torch path's push_unmatched_to_1_0 did)
        for flag, value in (("relative", relative), ("include_background", include_background),
                            ("push_unmatched_to_1_0", push_unmatched_to_1_0)):
            check_flag(flag, value)
        check_flag("to_onehot_y", to_onehot_y, optional=True)
        if isinstance(target_cache_bytes, bool) or not isinstance(target_cache_bytes, (int, np.integer)) \
                or target_cache_bytes < 0:
            raise ValueError(f"target_cache_bytes must be a whole number of bytes >= 0, got {target_cache_bytes!r}")
        if dimension_weights is not None and (isinstance(dimension_weights, (str, bytes))
                                              or not isinstance(dimension_weights, (Sequence, np.ndarray))):
            raise ValueError(f"dimension_weights must be a list of numbers, one per homology dimension, "
                             f"got {dimension_weights!r}")
        if dimension_weights is not None and not all(non_negative(w) for w in dimension_weights):
            raise ValueError(f"dimension_weights must be finite numbers >= 0, got {list(dimension_weights)}")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.filtration = filtration
        self.construction = construction
        self.comparison = comparison
        self.relative = relative
        self.dimension_weights = None if dimension_weights is None else [float(w) for w in dimension_weights]
        self.matched_weight = float(matched_weight)
        self.unmatched_weight = float(unmatched_weight)
        self.barcode_length_threshold = float(barcode_length_threshold)
        self.push_unmatched_to_1_0 = push_unmatched_to_1_0
        if backend not in _inputs.BACKENDS:
            raise ValueError(f"backend must be one of {_inputs.BACKENDS}, got {backend!r}")
        self.backend = backend
        if threads is not None:
            _inputs.default_threads(threads)  # checked here, not at the first step of a training
        self.threads = threads
        self.target_cache_bytes = int(target_cache_bytes)
        self._cache: OrderedDict[tuple, list] = OrderedDict()  # key -> [prepared target, its hits]
        self._cache_nbytes = 0
        # one loss called from several threads (a loop of the user's own): the cache's
        # bookkeeping is one thread's at a time, the engine runs outside it
        self._cache_lock = threading.Lock()
        self.cache_enabled = self.target_cache_bytes > 0
        self.cache_hits = 0
        self.cache_misses = 0

    def __getstate__(self) -> dict:
        """The module without its cache of target barcodes (engine objects that do not
        pickle): ``copy.deepcopy``, ``pickle`` and ``torch.save`` of a loss that has run,
        or of a composite holding it, failed; a copy starts with an empty cache."""
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_cache_nbytes"] = 0
        del state["_cache_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ target cache

    def _prepared(self, targets: list[np.ndarray], superlevel: bool, shared: list[int] | None = None) -> list:
        """The targets' prepared barcodes (None where there is none): from the cache, and
        for targets that recur within the call (``shared[i]``: the index of the target
        that target i repeats, i itself for a first one) prepared once even without it."""
        if self.relative:
            return [None] * len(targets)
        if shared is not None:
            firsts = sorted(set(shared))
            if self.cache_enabled:
                once = self._prepared([targets[i] for i in firsts], superlevel)
            else:
                once = _prepare_targets([targets[i] for i in firsts], superlevel, self.construction, self.threads)
            position = {i: n for n, i in enumerate(firsts)}
            return [once[position[j]] for j in shared]
        if not self.cache_enabled:
            return [None] * len(targets)
        keys = [
            (
                hashlib.blake2b(np.ascontiguousarray(t), digest_size=16).hexdigest(),  # no copy
                t.shape,
                t.dtype.str,
                superlevel,
                self.construction,
            )
            for t in targets
        ]
        with self._cache_lock:  # the prepared targets found are held here: an eviction meanwhile loses none
            found = {k: self._cache[k][0] for k in set(keys) if k in self._cache}
            missing, seen = [], set()
            for i, k in enumerate(keys):  # each new target once, even if it recurs in the batch
                if k not in found and k not in seen:
                    missing.append(i)
                    seen.add(k)
            self.cache_hits += len(keys) - len(missing)
            self.cache_misses += len(missing)
        fresh = []
        if missing:  # prepared outside the lock: the engine runs without the GIL, other threads go on
            fresh = _prepare_targets([targets[i] for i in missing], superlevel, self.construction, self.threads)
        with self._cache_lock:
            for i, p in zip(missing, fresh):
                found[keys[i]] = p
                if self.cache_enabled and keys[i] not in self._cache:  # another thread may have switched it off
                    self._cache[keys[i]] = [p, -1]  # counted as a hit below, with the batch's others
                    self._cache_nbytes += p.nbytes
            for k in keys:
                entry = self._cache.get(k)
                if entry is not None:
                    self._cache.move_to_end(k)
                    entry[1] += 1
            while self._cache_nbytes > self.target_cache_bytes and len(self._cache) > len(set(keys)):
                _, (p, hits) = self._cache.popitem(last=False)
                self._cache_nbytes -= p.nbytes
                if hits == 0 and self.cache_hits < self.cache_misses:  # see target_cache_bytes
                    self.cache_enabled = False
                    self._cache.clear()
                    self._cache_nbytes = 0
        return [found[k] for k in keys]

    # ----------------------------------------------------------------------- forward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: raw network output (B, C, H, W[, D]).
            target: integer label map (B, 1, ...) or one-hot target (B, C, ...).

        Returns:
            The loss (a scalar for "mean"/"sum", (B, C') for "none").
        """
        return self._reduced(self._losses(input, target))

    def check_spatial_dims(self, spatial_dims: int) -> None:
        """Raise ValueError if ``dimension_weights`` does not give one weight per homology
        dimension of ``spatial_dims``-D inputs."""
        if self.dimension_weights is not None and len(self.dimension_weights) != spatial_dims:
            raise ValueError(
                f"dimension_weights has {len(self.dimension_weights)} entries but the input has {spatial_dims} "
                "spatial dimensions"
            )

    def forward_heads(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of every deep-supervision head at once.

        ``outputs`` (B, K, C, *spatial): K heads of one batch (DynUNet's stacked training
        output), ``target`` as in :meth:`forward`. Returns (K,): head k's value exactly as
        ``forward(outputs[:, k], target)`` gives it ("mean" or "sum"), but the K x B
        matchings run in one engine call, spread over its threads together, and each
        target's barcode is prepared once for its K heads (the heads share the target),
        where K calls would prepare it K times and leave threads idle whenever B is below
        their number.
        """
        if self.reduction == "none":
            raise ValueError("forward_heads needs reduction 'mean' or 'sum'")
        if outputs.dim() < 5:
            raise ValueError(f"outputs must be (B, K, C, *spatial), got shape {tuple(outputs.shape)}")
        batch, heads = outputs.shape[:2]
        check_input(outputs[:, 0], target, "BettiMatchingLoss.forward_heads")  # named by the shapes given
        stacked = outputs.reshape(batch * heads, *outputs.shape[2:])  # instance b * K + k: head k of sample b
        losses = self._losses(stacked, target.repeat_interleave(heads, dim=0), repeats=heads)
        per_head = losses.reshape(batch, heads, *losses.shape[1:])
        return torch.stack([self._reduced(per_head[:, k].contiguous()) for k in range(heads)])

    def _reduced(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses

    def _losses(self, input: torch.Tensor, target: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Per-image, per-channel losses (B, C'). ``repeats``: images come in groups of that
        many that share one target (b * repeats + k), whose barcode is then prepared once."""
        check_input(input, target, "BettiMatchingLoss")
        activated, first, tgt = activation_and_target(
            input,
            target,
            sigmoid=self.sigmoid,
            softmax=self.softmax,
            to_onehot_y=self.to_onehot_y,
            include_background=self.include_background,
        )
        probs = activated[:, first:]
        batch, channels = probs.shape[:2]
        ndim = probs.dim() - 2
        self.check_spatial_dims(ndim)
        flat_probs = probs.reshape(batch * channels, *probs.shape[2:])
        flat_tgt = tgt.reshape(batch * channels, *probs.shape[2:]).to(probs.dtype)
        backend = _backends.resolve_backend(self.backend, probs)
        if backend.on_device(probs):  # the images stay on the device
            preds_list = [p.detach().to(torch.float32).contiguous() for p in flat_probs]
            tgt_list = [t.detach().to(torch.float32).contiguous() for t in flat_tgt]
        else:  # float64 matched in float64: in float32, 1 - 1e-12 and 1 tie and the pairs differ
            wide = {torch.float64: torch.float64}
            preds_np = probs.detach().to("cpu", wide.get(probs.dtype, torch.float32)).numpy().reshape(
                batch * channels, *probs.shape[2:])
            tgt_np = tgt.detach().to("cpu", wide.get(tgt.dtype, torch.float32)).numpy().reshape(
                batch * channels, *probs.shape[2:])
            preds_list = [np.ascontiguousarray(p) for p in preds_np]
            tgt_list = [np.ascontiguousarray(t) for t in tgt_np]

        # instance (b * repeats + k) * channels + c repeats the target of k = 0
        shared = None
        if repeats > 1:
            shared = [((i // channels) // repeats * repeats) * channels + i % channels for i in range(batch * channels)]
        filtrations = ["superlevel", "sublevel"] if self.filtration == "both" else [self.filtration]
        # a 0/1 target (a label map's one-hot) needs no coordinates: each of its pairs
        # runs from one value to the other (relative: the values are read from the padded
        # frames of _relative_frames, by the torch path)
        binary = not self.relative and (
            encodes_labels(target, input.shape[1], self.to_onehot_y)
            or bool(((flat_tgt == 0) | (flat_tgt == 1)).all())
        )
        matchings = []  # (superlevel, the engine's flat indices) per filtration
        for filtration in filtrations:
            superlevel = filtration == "superlevel"
            prepared = self._prepared(tgt_list, superlevel, shared) if backend.takes_prepared_targets else None
            indices = _matching_indices(
                preds_list,
                tgt_list,
                superlevel,
                self.construction,
                self.relative,
                threads=self.threads,
                prepared=prepared,
                comparison=self.comparison,
                backend=backend,
                report_target=not binary,
            )
            matchings.append((superlevel, indices))
        fused = (
            self.fused_terms
            and not self.relative
            and flat_probs.device.type == "cpu"
            and flat_probs.dtype in (torch.float32, torch.float64)
            and not flat_tgt.requires_grad
        )
        if fused:
            per_instance, pairs = self._fused_terms(
                activated, first, flat_probs, preds_list, None if binary else flat_tgt, matchings
            )
        else:
            per_instance, pairs = self._torch_terms(flat_probs, None if binary else flat_tgt, matchings)
        per_instance = per_instance.to(probs.dtype)
        if self.normalize == "pairs":
            per_instance = per_instance / torch.from_numpy(np.maximum(pairs, 1)).to(per_instance)
        elif self.normalize == "voxels":
            per_instance = per_instance / float(flat_probs[0].numel())
        return per_instance.reshape(batch, channels)

    def _term_options(self) -> tuple:
        """The formula's options as _engine.betti_loss_terms takes them."""
        weights = None if self.dimension_weights is None else np.asarray(self.dimension_weights, dtype=np.float64)
        return (
            self.matched_weight,
            self.unmatched_weight,
            self.push_unmatched_to_1_0,
            self.barcode_length_threshold,
            weights,
        )

    def _fused_terms(
        self,
        activated: torch.Tensor,
        first: int,
        flat_probs: torch.Tensor,
        preds_list: list,
        flat_tgt: torch.Tensor | None,
        matchings: list,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Per-instance sums (float64) and pair counts of CPU tensors in one native pass
        per filtration (:class:`_FusedPairTerms`); the same formula as :meth:`_torch_terms`.
        ``flat_probs``: ``activated``'s channels from ``first`` on, one instance each."""
        as_numpy = lambda t: [np.ascontiguousarray(x) for x in t.detach().numpy()]  # noqa: E731
        values = preds_list if flat_probs.dtype == torch.float32 else as_numpy(flat_probs)
        values_t = [] if flat_tgt is None else as_numpy(flat_tgt)
        threads = _inputs.default_threads(self.threads)

        def torch_terms(act: torch.Tensor) -> torch.Tensor:  # for a second derivative (see _FusedPairTerms)
            return self._torch_terms(act[:, first:].reshape(flat_probs.shape), flat_tgt, matchings)[0]

        return _FusedPairTerms.apply(activated, first, values, values_t, matchings, self._term_options(), threads,
                                     torch_terms)

    def _torch_terms(
        self, flat_probs: torch.Tensor, flat_tgt: torch.Tensor | None, matchings: list
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Per-instance sums (float64) and pair counts as a torch graph (any device)."""
        instances = flat_probs.shape[0]
        # one flat view of all instances: a pair's value is read by its flat index
        # instance * voxels + (ravelled coordinates), all pairs of the batch at once
        values_p = flat_probs.reshape(-1)
        values_t = None if flat_tgt is None else flat_tgt.reshape(-1)
        contributions: list[torch.Tensor] = []
        owners: list[np.ndarray] = []
        pairs = np.zeros(instances, dtype=np.int64)
        for superlevel, indices in matchings:
            if self.relative:
                values_p, values_t = self._relative_frames(flat_probs, flat_tgt, superlevel)
            self._batch_terms(values_p, values_t, indices, superlevel, contributions, owners, pairs)
        owner = torch.from_numpy(np.concatenate(owners)).to(flat_probs.device)
        # per-instance sums in float64: summing tens of thousands of terms one after the
        # other adds no float32 rounding of its own
        per_instance = torch.zeros(instances, dtype=torch.float64, device=flat_probs.device)
        per_instance = per_instance.index_add(0, owner, torch.cat(contributions).to(torch.float64))
        return per_instance, pairs

    @staticmethod
    def _relative_frames(
        flat_probs: torch.Tensor, flat_tgt: torch.Tensor, superlevel: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction and target (N, *spatial) as a relative matching sees them, flattened:
        padded by one voxel holding each pair's padding value
        (:func:`medseg.topology._inputs.relative_padding_value`), where the engine's indices
        point (a pair born on the padding has that value). The value is a constant of the
        frame: no gradient reaches it."""
        ndim = flat_probs.dim() - 1
        pad = (1, 1) * ndim
        border = torch.nn.functional.pad(torch.zeros_like(flat_probs[:1].detach()), pad, value=1.0)
        axes = tuple(range(1, ndim + 1))
        probs, tgt = flat_probs.detach(), flat_tgt.to(flat_probs.dtype)
        if superlevel:
            value = torch.maximum(probs.amax(axes), tgt.amax(axes))
        else:
            value = torch.minimum(probs.amin(axes), tgt.amin(axes))
        value = value.view(-1, *([1] * ndim)) * border  # exactly the value on the padding, 0 inside
        framed_p = torch.nn.functional.pad(flat_probs, pad) + value
        framed_t = torch.nn.functional.pad(tgt, pad) + value
        return framed_p.reshape(-1), framed_t.reshape(-1)

    def _batch_terms(
        self,
        values_p: torch.Tensor,
        values_t: torch.Tensor | None,
        indices: tuple,
        superlevel: bool,
        contributions: list[torch.Tensor],
        owners: list[np.ndarray],
        pairs: np.ndarray,
    ) -> None:
        """The terms of every pair of one filtration, vectorised over the whole batch.

        Appends to ``contributions`` the per-pair terms (weights applied) and to
        ``owners`` the instance of each; adds each instance's number of pairs to
        ``pairs`` (for ``normalize="pairs"``). ``values_p``/``values_t``: the batch's
        prediction / target flattened (instances first), ``values_t`` None for a 0/1
        target; ``indices``: the engine's ``(index_p, sizes_p, index_t, sizes_t)``
        (:meth:`medseg.topology._backends.Backend.matching_batch_indices`).
        """
        index_p, sizes_p, index_t, sizes_t = indices
        n = sizes_p.shape[1]
        m, ua, ub = sizes_p[0], sizes_p[2], sizes_t[2]  # (n, ndim) pairs per instance and dimension
        n_m, n_ua, n_ub = int(m.sum()), int(ua.sum()), int(ub.sum())
        device = values_p.device
        # the prediction's values at the births and deaths of its matched and unmatched
        # pairs, and the target's at those of its own: one gather each for the batch
        gather_p = values_p.index_select(0, torch.from_numpy(index_p).to(device))
        pm_b, pm_d, pu_b, pu_d = gather_p.split([n_m, n_m, n_ua, n_ua])
        if values_t is None:  # 0/1 target: born at 1 and dying at 0 (superlevel), or the reverse
            born, dies = (1.0, 0.0) if superlevel else (0.0, 1.0)
            tm_b, tm_d, tu_b, tu_d = (
                torch.full((k,), v, dtype=values_p.dtype, device=device)
                for k, v in ((n_m, born), (n_m, dies), (n_ub, born), (n_ub, dies))
            )
        else:
            gather_t = values_t.index_select(0, torch.from_numpy(index_t).to(device))
            tm_b, tm_d, tu_b, tu_d = gather_t.split([n_m, n_m, n_ub, n_ub])

        target_point = (0.0, 1.0) if superlevel else (1.0, 0.0)
        matched = (pm_b - tm_b) ** 2 + (pm_d - tm_d) ** 2
        if self.push_unmatched_to_1_0:
            unmatched_p = (pu_b - target_point[0]) ** 2 + (pu_d - target_point[1]) ** 2
            unmatched_t = (tu_b - target_point[0]) ** 2 + (tu_d - target_point[1]) ** 2
            factor_u = 2.0
        else:
            unmatched_p = (pu_b - pu_d) ** 2
            unmatched_t = (tu_b - tu_d) ** 2
            factor_u = 1.0
        instance = np.arange(n)
        owner_m, owner_ua, owner_ub = (np.repeat(instance, s.sum(1)) for s in (m, ua, ub))
        counted_ua = owner_ua
        if self.barcode_length_threshold > 0:  # short unmatched pairs of the prediction: no term, not counted
            keep = (pu_b - pu_d).abs() > self.barcode_length_threshold
            unmatched_p = torch.where(keep, unmatched_p, torch.zeros_like(unmatched_p))
            if self.normalize == "pairs":
                counted_ua = owner_ua[keep.cpu().numpy()]
        if self.normalize == "pairs":
            for counted in (owner_m, counted_ua, owner_ub):
                pairs += np.bincount(counted, minlength=n)

        def weighted(terms: torch.Tensor, factor: float, sizes: np.ndarray) -> torch.Tensor:
            if self.dimension_weights is None:
                return factor * terms
            w = np.repeat(factor * np.tile(np.asarray(self.dimension_weights, dtype=np.float64), n), sizes.ravel())
            return torch.from_numpy(w).to(device=device, dtype=terms.dtype) * terms

        contributions += [
            weighted(matched, 2.0 * self.matched_weight, m),
            weighted(unmatched_p, factor_u * self.unmatched_weight, ua),
            weighted(unmatched_t, factor_u, ub),
        ]
        owners += [owner_m, owner_ua, owner_ub]

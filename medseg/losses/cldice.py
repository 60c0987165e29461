"""Soft clDice (Shit et al., CVPR 2021), combined with soft Dice.

The soft skeleton (:func:`soft_skeleton`) gives the values *and the gradients* of MONAI's
:func:`monai.losses.cldice.soft_skel` (iterated min-pool erosion and max-pool dilation,
honouring ``iter_``) at a fraction of its cost; see "The soft skeleton, fast" below. The
loss around it is our own because MONAI's clDice losses have faults that matter for training:

- a 1-channel sigmoid head must give a real loss. MONAI's original implementation (PR
  6763) summed the skeletons over ``[:, 1:]`` unconditionally, dropping the only channel
  of a binary head as "background": ``Tprec = Tsens = smooth/smooth = 1`` and a loss of
  exactly 0 (MONAI issue 8239). MONAI 1.6 scores channel 0 again; here the single channel
  is the foreground whatever ``include_background`` says;
- every denominator has a floor (:data:`medseg.losses._prepare.EPS`): MONAI gives NaN for
  ``smooth_nr = smooth_dr = 0`` on an empty target (0/0) and refuses ``smooth = 0``;
- classes are scored separately and averaged (as Dice does) instead of pooling all
  channels into one skeleton sum, so a thin class is not drowned by a thick one.

The soft skeleton, fast
-----------------------
MONAI erodes with three 1D min-pools written as ``-max_pool(-x)`` and dilates with a 3^n
max-pool; on the CPU a pooling call costs 10-45 ms on a 96^3 volume where an element-wise
``torch.minimum`` of two shifted views costs 0.3 ms, and MONAI erodes each image twice
per iteration. Here (``benchmarks/losses.py`` measures it):

- erosion and dilation are minima/maxima of views shifted by one voxel (the dilation
  separably, axis by axis), so the values are bit-identical to MONAI's;
- each iteration erodes once: ``open(I) = dilate(erode(I))`` and ``erode(I)`` is the next
  ``I`` (1 + iterations erosions instead of 1 + 2·iterations);
- :class:`_SoftSkeleton` keeps what its backward needs and walks the recurrence back by
  hand, reproducing the gradient that autograd gives MONAI's graph, ties included: a pool
  sends a voxel's gradient to the *first* voxel of its window holding the extremum, and
  ``torch.min(a, b)`` splits it in halves where ``a == b``. The separable dilation, routed
  back from the last stage to the first (the last axis was reduced first), reaches the
  first maximum of the 3^n window in memory order: the voxel max_pool picks. Ties are the
  rule, not the exception (an eroded map repeats each local minimum over its neighbours;
  confident probabilities are exactly 0 or 1), so they must be routed as MONAI routes them;
- without gradient (the target, evaluation) nothing is kept, and a binary map (a one-hot
  target) is skeletonised with logical operations on bool tensors, a quarter of the bytes;
- every element-wise step writes into a buffer it owns (``out=``, in place), allocated
  once per call or kept for the backward, and masks are float tensors (``torch.eq(...,
  out=float)``): on the CPU a fresh 7 MB tensor is page-faulted in on first touch, and
  multiplying by a bool mask costs several times more than by a float one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from medseg.losses._prepare import (
    EPS,
    check_activation_flags,
    check_iterations,
    check_input,
    check_reduction,
    probabilities_and_target,
    reduce,
)


# ---------------------------------------------------------------------------- soft skeleton
# Every helper writes into buffers its caller owns (see "The soft skeleton, fast" above).


def _lo(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The voxels that have a next neighbour along ``dim``: ``t[..., :-1, ...]``."""
    return t.narrow(dim, 0, t.shape[dim] - 1)


def _hi(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The voxels that have a previous neighbour along ``dim``: ``t[..., 1:, ...]``."""
    return t.narrow(dim, 1, t.shape[dim] - 1)


def _pool(op, x: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """1D pool along ``dim``: ``out[v] = op(x[v-1], x[v], x[v+1])``, clipped at the borders."""
    out.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    op(_lo(x, dim), _hi(x, dim), out=_hi(out, dim))
    op(_lo(out, dim), _hi(x, dim), out=_lo(out, dim))
    return out


def _erode(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """MONAI's ``soft_erode``: the minimum over the 3-voxel cross."""
    _pool(torch.minimum, x, 2, out)
    for dim in range(3, x.dim()):
        torch.minimum(_hi(out, dim), _lo(x, dim), out=_hi(out, dim))
        torch.minimum(_lo(out, dim), _hi(x, dim), out=_lo(out, dim))
    return out


def _dilation_axes(ndim: int) -> list[int]:
    # Last axis first: then the first maximum of each 1D stage, followed back through the
    # stages, is the first maximum of the 3^n window in memory order - the voxel that
    # max_pool picks (its scan keeps the first of equal values).
    return list(range(ndim - 1, 1, -1))


def _dilate(x: torch.Tensor, out: torch.Tensor, partial: list[torch.Tensor]) -> torch.Tensor:
    """MONAI's ``soft_dilate``, the 3^n max-pool, as n 1D max-pools.

    ``partial``: n - 1 buffers, left holding the stages before the last (the maximum over
    W, then over H and W) for the backward.
    """
    current = x
    for dim, buf in zip(_dilation_axes(x.dim()), partial + [out]):
        current = _pool(torch.maximum, current, dim, buf)
    return out


def _route(
    grad: torch.Tensor,
    x: torch.Tensor,
    pooled: torch.Tensor,
    dim: int,
    into: torch.Tensor,
    mask: torch.Tensor,
    write: bool,
) -> None:
    """Writes to ``into`` (``write``), or subtracts from it, the gradient w.r.t. ``x`` of the
    1D pool ``pooled`` of ``x`` along ``dim``.

    ``grad[v]`` goes to the first of ``v-1, v, v+1`` that holds ``pooled[v]``, as max_pool's
    backward does. ``grad`` is used up.
    """
    sign = 1.0 if write else -1.0
    left = torch.eq(_lo(x, dim), _hi(pooled, dim), out=_lo(mask, dim))
    if write:
        torch.mul(_hi(grad, dim), left, out=_lo(into, dim))
        into.narrow(dim, into.shape[dim] - 1, 1).zero_()
    else:
        _lo(into, dim).addcmul_(_hi(grad, dim), left, value=sign)
    _hi(grad, dim).addcmul_(_hi(grad, dim), left, value=-1.0)  # exactly 0 where the left took it
    centre = torch.eq(x, pooled, out=mask)
    into.addcmul_(grad, centre, value=sign)
    grad.addcmul_(grad, centre, value=-1.0)  # what remains goes right (never past the border)
    _hi(into, dim).add_(_lo(grad, dim), alpha=sign)


def _split_min(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, to_a: torch.Tensor, mask: torch.Tensor) -> None:
    """Autograd's gradients of ``torch.min(a, b)``: all to the smaller, halves on a tie.

    Writes ``a``'s share to ``to_a``; ``grad`` becomes ``b``'s share (1, 1/2 or 0 of it, exactly).
    """
    torch.mul(grad, torch.lt(a, b, out=mask), out=to_a)
    to_a.addcmul_(grad, torch.eq(a, b, out=mask), value=0.5)
    grad.sub_(to_a)


def _erode_backward(
    grad: torch.Tensor, x: torch.Tensor, eroded: torch.Tensor, into: torch.Tensor, work: list[torch.Tensor]
) -> None:
    """Adds to ``into`` the gradient of :func:`_erode` at ``x`` (value ``eroded``), as
    autograd gives it for MONAI's graph.

    MONAI takes ``min(min(p_0, p_1), p_2)`` (3D) or ``min(p_0, p_1)`` (2D) of 1D min-pools
    ``p_i`` along each axis: the gradient is split through those minima, then each share
    is routed through its pool. A share is nonzero only where its pool holds the minimum,
    so the routing compares ``x`` with ``eroded`` and the test of the centre voxel serves
    every axis. ``grad`` is used up; ``work``: n + 3 buffers.
    """
    dims = list(range(2, x.dim()))
    pools = [_pool(torch.minimum, x, dim, buf) for dim, buf in zip(dims, work)]
    first, second, mask = work[len(dims) : len(dims) + 3]
    if len(dims) == 3:
        inner = torch.minimum(pools[0], pools[1], out=first)
        _split_min(grad, inner, pools[2], second, mask)
        _split_min(second, pools[0], pools[1], first, mask)
        shares = [first, second, grad]
    else:
        _split_min(grad, pools[0], pools[1], first, mask)
        shares = [first, grad]
    # The pools are spent: their buffers hold the centre tests.
    centre = torch.eq(x, eroded, out=work[0])
    off_centre = torch.ne(x, eroded, out=work[1])
    for dim, share in zip(dims, shares):  # as _route, to the first voxel holding the minimum
        left = torch.eq(_lo(x, dim), _hi(eroded, dim), out=_lo(mask, dim))
        _lo(into, dim).addcmul_(_hi(share, dim), left)
        _hi(share, dim).addcmul_(_hi(share, dim), left, value=-1.0)
        into.addcmul_(share, centre)
        _hi(into, dim).addcmul_(_lo(share, dim), _lo(off_centre, dim))


def _dilate_backward(
    grad: torch.Tensor, stages: list[torch.Tensor], into: torch.Tensor, spare: torch.Tensor, mask: torch.Tensor
) -> None:
    """Subtracts from ``into`` the gradient of :func:`_dilate` (whose input, partial maxima
    and output are ``stages``), routed back stage by stage: it reaches the voxel max_pool
    picks. ``grad`` is used up; ``spare`` is a work buffer."""
    axes = _dilation_axes(stages[0].dim())
    for s in reversed(range(len(axes))):
        below = into if s == 0 else spare
        _route(grad, stages[s], stages[s + 1], axes[s], below, mask, write=s > 0)
        grad, spare = below, grad


def _skeleton(image: torch.Tensor, iterations: int, keep: bool):
    """MONAI's ``soft_skel`` with bit-identical values, eroding each image once.

    Returns the skeleton; with ``keep``, also what the backward needs (else buffers are
    reused): for k = 0..K the opening's stages ``[E_k, E_{k+1} = erode(E_k), partial
    maxima..., O_k = dilate(E_{k+1})]`` (``E_0`` is ``image``) and ``delta_k = relu(E_k - O_k)``,
    and the skeletons ``skel_0 = delta_0, ..., skel_{K-1}``.
    """
    new = torch.empty_like
    partial = [new(image) for _ in range(image.dim() - 3)]
    opened, delta, change = new(image), new(image), new(image)
    stages, deltas, skels = [], [], []
    current, recycled = image, None
    for k in range(iterations + 1):
        if keep and k > 0:
            partial, opened, delta = [new(image) for _ in partial], new(image), new(image)
        eroded = recycled if recycled is not None and not keep else new(image)
        _dilate(_erode(current, eroded), opened, partial)
        torch.sub(current, opened, out=delta).relu_()  # delta = relu(img - open(img))
        if keep:
            stages.append([current, eroded, *partial, opened])
            deltas.append(delta)
        if k == 0:  # skel = delta
            skel = delta
            delta = delta if keep else new(image)
        else:  # skel = skel + relu(delta - skel * delta)
            torch.mul(skel, delta, out=change)
            torch.sub(delta, change, out=change).relu_()
            if keep:
                skels.append(skel)
                skel = torch.add(skel, change, out=new(image))
            else:
                skel.add_(change)
        recycled = current if current is not image else None
        current = eroded
    if keep:
        return skel, stages, deltas, skels
    return skel


def _binary_skeleton(image: torch.Tensor, iterations: int) -> torch.Tensor:
    """:func:`_skeleton` of a bool image: with values in {0, 1} every step is a logical one
    (``relu(I - open(I))`` is ``I & ~open(I)``, ``s + relu(δ - s·δ)`` is ``s | δ``), on a
    quarter of the bytes."""
    new = torch.empty_like
    partial = [new(image) for _ in range(image.dim() - 3)]
    eroded, opened, delta = new(image), new(image), new(image)
    skel = torch.zeros_like(image)
    current = image
    for _ in range(iterations + 1):
        _dilate(_erode(current, eroded), opened, partial)
        skel.logical_or_(torch.logical_and(current, opened.logical_not_(), out=delta))
        # the next image is the eroded one; the current one's buffer takes the next erosion
        current, eroded = eroded, (new(image) if current is image else current)
    return skel


class _SoftSkeleton(torch.autograd.Function):
    """:func:`soft_skeleton` with the gradient of MONAI's ``soft_skel`` (ties included)."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, iterations: int) -> torch.Tensor:
        skel, stages, deltas, skels = _skeleton(image, iterations, keep=True)
        ctx.iterations = iterations
        ctx.save_for_backward(*(t for opening in stages for t in opening), *deltas, *skels)
        return skel

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        k_max = ctx.iterations
        saved = list(ctx.saved_tensors)
        per = saved[0].dim()  # tensors per opening: E_k, E_{k+1}, n - 1 partial maxima, O_k
        stages = [saved[k * per : (k + 1) * per] for k in range(k_max + 1)]
        deltas = saved[(k_max + 1) * per : (k_max + 1) * (per + 1)]
        skels = saved[(k_max + 1) * (per + 1) :]
        image = saved[0]
        work = [torch.empty_like(image) for _ in range(image.dim() + 1)]
        mask, spare, grad_here = work[0], torch.empty_like(image), torch.empty_like(image)
        grad_skel = grad_output.contiguous().clone()  # d loss / d skel_k, walked down to k = 0
        grad_below = torch.zeros_like(image)  # d loss / d E_{k+1}
        for k in range(k_max, -1, -1):
            delta = deltas[k]
            if k > 0:  # skel_k = skel_{k-1} + relu(r), r = delta - skel_{k-1} * delta
                prev = skels[k - 1]
                r = torch.sub(delta, torch.mul(prev, delta, out=mask), out=mask)
                grad_r = torch.mul(grad_skel, torch.gt(r, 0, out=mask), out=mask)
                grad_delta = torch.addcmul(grad_r, grad_r, prev, value=-1.0, out=spare)
                grad_skel.addcmul_(grad_r, delta, value=-1.0)
                # r > 0 only where delta > 0: relu's mask on delta would change nothing
            else:  # skel_0 = delta = relu(E_0 - O_0)
                grad_delta = grad_skel.mul_(torch.gt(delta, 0, out=mask))
            # delta = relu(E_k - O_k) with O_k = dilate(E_{k+1}) and E_{k+1} = erode(E_k)
            grad_here.copy_(grad_delta)  # d loss / d E_k, completed by the erosion below
            _dilate_backward(grad_delta, stages[k][1:], grad_below, work[1], mask)
            _erode_backward(grad_below, stages[k][0], stages[k][1], grad_here, work)
            grad_below, grad_here = grad_here, grad_below
        return grad_below, None


def soft_skeleton(image: torch.Tensor, iterations: int) -> torch.Tensor:
    """Soft skeleton of a (B, C, H, W[, D]) map in [0, 1] after ``iterations`` erosions.

    ``skel_0 = relu(I - open(I))``; for k = 1..iterations: ``I <- erode(I)``,
    ``δ = relu(I - open(I))``, ``skel <- skel + relu(δ - skel·δ)``. Erosion is a min-pool
    over the 3-voxel cross (per axis), dilation a 3^n max-pool. Values and gradients are
    those of :func:`monai.losses.cldice.soft_skel` (see the module docstring for how it is
    faster); differentiable once.
    """
    if image.dim() not in (4, 5):
        raise ValueError(f"soft_skeleton needs a 4D or 5D tensor, got shape {tuple(image.shape)}")
    image = image.contiguous()
    if image.requires_grad and torch.is_grad_enabled():
        return _SoftSkeleton.apply(image, iterations)
    with torch.no_grad():
        binary = image > 0.5
        if torch.equal(binary.to(image.dtype), image):  # one-hot targets
            return _binary_skeleton(binary, iterations).to(image.dtype)
        return _skeleton(image, iterations, keep=False)


class SoftclDiceLoss(nn.Module):
    """Soft Dice and soft clDice, ``L = (1 - alpha)·L_Dice + alpha·L_clDice``.

    With ``S_P = soft_skeleton(P)`` and ``S_G = soft_skeleton(G)`` computed per sample ``b`` and
    class ``c`` of the prediction ``P`` (probabilities) and the target ``G`` (one-hot):

    - topology precision ``Tprec = (Σ S_P·G + smooth_nr) / max(Σ S_P + smooth_dr, ε)``,
    - topology sensitivity ``Tsens = (Σ S_G·P + smooth_nr) / max(Σ S_G + smooth_dr, ε)``,
    - ``L_clDice = 1 - 2·Tprec·Tsens / max(Tprec + Tsens + smooth, ε)``,

    averaged over classes, then reduced over the batch; ``L_Dice`` is the soft Dice of
    :class:`medseg.losses.dice.DiceLoss` with the same smoothing. ``alpha = 1`` gives plain
    clDice, which the paper advises always to combine with a volumetric loss.

    Reference: S. Shit, J. C. Paetzold et al., "clDice - a Novel Topology-Preserving Loss
    Function for Tubular Structure Segmentation", CVPR 2021, arXiv:2003.07311.

    Args:
        iterations: erosion steps of the soft skeleton (>= 0); should reach the largest
            expected radius of the structures, in voxels.
        alpha: weight of clDice against soft Dice, in [0, 1].
        smooth: added to the harmonic-mean denominator; may be 0.
        smooth_nr: added to the Tprec/Tsens numerators (and Dice's).
        smooth_dr: added to the Tprec/Tsens denominators (and Dice's).
        include_background: score channel 0 too. Default False (the skeleton of the
            background is rarely meaningful; unlike MONAI's default); ignored for one channel.
        to_onehot_y, sigmoid, softmax: see :mod:`medseg.losses._prepare` (``None``: from the
            number of channels).
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (a (B,) tensor).

    Raises:
        ValueError: negative ``iterations``, ``alpha`` outside [0, 1], negative smoothing,
            incompatible activation flags, unknown ``reduction``.
    """

    def __init__(
        self,
        iterations: int = 3,
        alpha: float = 0.5,
        smooth: float = 1e-4,
        smooth_nr: float = 1.0,
        smooth_dr: float = 1.0,
        include_background: bool = False,
        to_onehot_y: bool | None = None,
        sigmoid: bool | None = None,
        softmax: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_iterations(iterations)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        for key, value in (("smooth", smooth), ("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        check_activation_flags(sigmoid, softmax)
        self.iterations = iterations
        self.alpha = float(alpha)
        self.smooth = float(smooth)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.reduction = check_reduction(reduction)

    def cldice(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample clDice loss (B,) of probabilities and a one-hot target of equal shape."""
        axes = tuple(range(2, probs.dim()))
        skel_pred = soft_skeleton(probs, self.iterations)
        skel_true = soft_skeleton(target, self.iterations)
        tprec = (torch.sum(skel_pred * target, axes) + self.smooth_nr) / (
            torch.sum(skel_pred, axes) + self.smooth_dr
        ).clamp_min(EPS)
        tsens = (torch.sum(skel_true * probs, axes) + self.smooth_nr) / (
            torch.sum(skel_true, axes) + self.smooth_dr
        ).clamp_min(EPS)
        per_class = 1.0 - 2.0 * tprec * tsens / (tprec + tsens + self.smooth).clamp_min(EPS)
        return per_class.mean(dim=1)

    def soft_dice(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample soft Dice loss (B,) with the same smoothing as clDice."""
        axes = tuple(range(2, probs.dim()))
        inter = torch.sum(probs * target, axes)
        denom = torch.sum(probs, axes) + torch.sum(target, axes)
        dice = (2.0 * inter + self.smooth_nr) / (denom + self.smooth_dr).clamp_min(EPS)
        return (1.0 - dice).mean(dim=1)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_input(input, target, "SoftclDiceLoss")
        probs, tgt = probabilities_and_target(
            input,
            target,
            sigmoid=self.sigmoid,
            softmax=self.softmax,
            to_onehot_y=self.to_onehot_y,
            include_background=self.include_background,
        )
        loss = self.alpha * self.cldice(probs, tgt)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * self.soft_dice(probs, tgt)
        return reduce(loss, self.reduction)

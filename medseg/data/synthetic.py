"""Synthetic vessel datasets: branching tubular trees with realistic imaging artefacts.

Each case is a random vessel tree grown in millimetres inside the field of view:

* **Anatomy.** A root vessel enters through one face and bifurcates recursively
  (5 generations in 3D, 4 in 2D). Radii taper along each branch and split by Murray's law
  (``r^3 = r_1^3 + r_2^3``) with random asymmetry; branches meander (random-walk
  direction) and are kept inside the field of view and apart from each other (a
  clearance of 2.5 coarsest voxels), so the label is a tree: one connected component
  without cycles or cavities. ``loops`` extra vessels each join two branches (a handle
  in 3D, a hole in 2D), so topology-aware losses have cycles to get right: the label's
  Betti numbers are then (1, loops[, 0]) with 8/26 connectivity, up to rare
  digitisation artefacts of the thinnest vessels. Loops need room: from about 48^3
  voxels in 3D (64^2 in 2D); ``tree.num_loops`` says how many were placed. The
  smallest radius is the coarsest voxel of either domain, so no branch breaks apart.
* **Rendering.** For every voxel centre, ``field = min over segments (distance to the
  segment's axis - local radius)``, computed only in each segment's bounding box
  (vectorised numpy). The label is ``field <= 0``, closed with the face-neighbour
  cross to fill sub-voxel crotch gaps at bifurcations; the image sees a partial-volume
  occupancy ``clip(0.5 - field / voxel, 0, 1)`` blurred by a Gaussian point-spread
  function.
* **Imaging.** ``image = (background + contrast * occupancy**gamma + texture) * bias +
  noise``: smooth background texture, a smooth multiplicative bias field (exp of a
  random quadratic), Gaussian noise. Values are CT-like (HU), vessels brighter.

The **shifted domain** (``shifted=True``) draws the *same trees* (the anatomy's random
stream depends only on ``seed`` and the case index) and images them differently: lower
contrast, twice the noise, a stronger bias field, a gamma change, wider blur and a
different resolution (in-plane voxels 1.25x larger, slices 0.8x thinner), over the same
field of view and world position. It is the target domain for adaptation experiments.

The **faint domain** (``params=FAINT_DOMAIN``, ``make_synthetic.py --faint``) keeps the
source grid and images the trees the way thin vessels look in real angiography: half the
contrast, more noise and texture, and a point-spread function as wide as the thinnest
vessels, so their partial-volume peak sinks towards the noise. A Dice+CE model then
leaves specks in the noise and breaks thin branches into pieces (Betti 0 errors of 10-20
per 64^3 case) while its Dice stays near 0.8: the demo's data, where a topology loss has
something to repair.

Everything is deterministic given ``seed``; a 64^3 case takes about 0.2 s.

Example
-------
>>> from medseg.data.synthetic import make_case
>>> case = make_case(0, seed=1, size=32)
>>> case["image"].shape == case["label"].shape == (32, 32, 32)
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from medseg.data.dataset import write_dataset_json
from medseg.data.io import NATURAL_IMAGE_ENDINGS, SUPPORTED_ENDINGS, ImageGeometry, write_image

__all__ = [
    "ImagingParams",
    "SOURCE_DOMAIN",
    "SHIFTED_DOMAIN",
    "FAINT_DOMAIN",
    "Tree",
    "grow_tree",
    "render_field",
    "make_case",
    "make_dataset",
    "default_spacing",
    "AFFINE_KINDS",
]

AFFINE_KINDS = ("identity", "flipped", "oblique")
LABELS = {"background": 0, "vessel": 1}
# in-plane voxels get coarser, slices finer, in the shifted domain
SHIFTED_SPACING_FACTOR = {2: (1.25, 1.25), 3: (1.25, 1.25, 0.8)}
# PNG holds uint8: this fixed HU window maps to 0..255 in both domains, so the shift survives
PNG_WINDOW = (-150.0, 450.0)


@dataclass(frozen=True)
class ImagingParams:
    """How a domain images the anatomy (intensities in HU-like units)."""

    background: float = 40.0
    vessel: float = 300.0
    noise_std: float = 18.0
    texture_std: float = 12.0
    bias_strength: float = 0.12  # max |log bias|
    blur_mm: float = 0.5  # PSF sigma
    gamma: float = 1.0
    jitter: float = 0.08  # per-case relative jitter of background/vessel intensity


SOURCE_DOMAIN = ImagingParams()
SHIFTED_DOMAIN = ImagingParams(
    background=90.0,
    vessel=230.0,
    noise_std=30.0,
    texture_std=20.0,
    bias_strength=0.3,
    blur_mm=0.9,
    gamma=0.6,
)

FAINT_DOMAIN = ImagingParams(
    background=60.0,
    vessel=200.0,
    noise_std=30.0,
    texture_std=20.0,
    blur_mm=1.0,
)


def default_spacing(dims: int) -> tuple[float, ...]:
    """Anisotropic in 3D (thicker slices, as in most CT/MR), unit pixels in 2D."""
    return (0.8, 0.8, 1.2) if dims == 3 else (1.0, 1.0)


# --------------------------------------------------------------------------- anatomy

@dataclass
class Tree:
    """Tubular segments: axis from ``p0[n]`` to ``p1[n]`` (mm), radius ``r0[n]`` -> ``r1[n]``."""

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    num_loops: int = 0

    @property
    def num_segments(self) -> int:
        return len(self.r0)


@dataclass
class _Branch:
    points: list[np.ndarray]
    radii: list[float]
    depth: int
    parent: int


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _perpendicular(rng: np.random.Generator, direction: np.ndarray) -> np.ndarray:
    perp = rng.normal(size=direction.shape)
    return _unit(perp - perp.dot(direction) * direction)


def _turn(rng: np.random.Generator, direction: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` rotated by ``angle`` radians towards a random perpendicular."""
    perp = _perpendicular(rng, direction)
    return _unit(math.cos(angle) * direction + math.sin(angle) * perp)


class _Occupied:
    """Tube sample points grown so far, for keeping branches apart."""

    def __init__(self, dims: int) -> None:
        self.points = np.zeros((0, dims))
        self.radii = np.zeros(0)
        self.branch = np.zeros(0, dtype=int)

    def add(self, point: np.ndarray, radius: float, branch: int) -> None:
        self.points = np.vstack([self.points, point])
        self.radii = np.append(self.radii, radius)
        self.branch = np.append(self.branch, branch)

    def free(
        self, point: np.ndarray, radius: float, clearance: float, ignore: np.ndarray | None = None
    ) -> bool:
        """No tube point closer than the two radii plus ``clearance`` (except ``ignore``)."""
        if not len(self.radii):
            return True
        dist = np.linalg.norm(self.points - point, axis=1)
        hit = dist < self.radii + radius + clearance
        if ignore is not None:
            hit &= ~ignore
        return not hit.any()

    def near(self, point: np.ndarray, distance: float) -> np.ndarray:
        return np.linalg.norm(self.points - point, axis=1) < distance


def grow_tree(
    rng: np.random.Generator,
    extent: Sequence[float],
    min_radius: float,
    max_depth: int | None = None,
    loops: int = 1,
    step: float | None = None,
    clearance: float | None = None,
) -> Tree:
    """Grow a random branching tree inside the box ``[0, extent]`` (mm).

    Branches keep ``clearance`` mm of background between their surfaces (a step that
    would come closer is re-steered a few times, else the branch ends there), so the
    rendered label is a tree: one component, no cycles or cavities other than the
    ``loops`` added on purpose.

    Parameters
    ----------
    rng : numpy Generator, the only source of randomness.
    extent : box size per axis (2 or 3 entries).
    min_radius : no segment is thinner (keeps the rendered label connected).
    max_depth : bifurcation generations below the root (default 5 in 3D, 4 in 2D).
    loops : number of extra vessels joining two distant branches (each makes one cycle).
    step : length of one polyline segment (default: 1/28 of the smallest extent).
    clearance : gap kept between branches (default: 2 * min_radius).
    """
    extent = np.asarray(extent, dtype=np.float64)
    dims = len(extent)
    size = float(extent.min())
    step = step or size / 28.0
    clearance = 2.0 * min_radius if clearance is None else clearance
    clearance += step / 2  # points are sampled every `step`: the gap between samples
    max_depth = (5 if dims == 3 else 4) if max_depth is None else max_depth
    relative = (0.05, 0.065) if dims == 3 else (0.03, 0.04)
    root_radius = max(size * rng.uniform(*relative), 2.5 * min_radius)
    margin = np.full(dims, root_radius + min_radius)
    lo, hi = margin, extent - margin

    # the root enters through the low face of a random axis, near that face's centre
    axis = int(rng.integers(dims))
    start = extent * (0.5 + rng.uniform(-0.15, 0.15, dims))
    start[axis] = 0.0
    direction = np.zeros(dims)
    direction[axis] = 1.0
    direction = _turn(rng, direction, rng.uniform(0.0, 0.3))

    occupied = _Occupied(dims)
    branches: list[_Branch] = []
    children: dict[int, list[int]] = {}
    pending = [(start, direction, root_radius, 0, -1)]
    loop_segments: list[tuple] = []
    loop_attempts = {2, 3}  # join branches while there is room, before small ones fill the box
    while pending:
        pos, direction, radius, depth, parent = pending.pop(0)
        if depth in loop_attempts:
            loop_attempts.discard(depth)
            missing = loops - len(loop_segments) // 2
            loop_segments += _add_loops(rng, branches, occupied, missing, size, min_radius, step, clearance, len(loop_segments) // 2)
        index = len(branches)
        length = size * rng.uniform(0.35, 0.5) * (0.78**depth)
        n_steps = max(2, int(round(length / step)))
        end_radius = max(min_radius, radius * rng.uniform(0.75, 0.9))
        junction = pos.copy()
        # near its bifurcation a branch touches its parent and sibling: not a collision
        family = np.isin(occupied.branch, [parent, *children.get(parent, [])])
        junction_zone = family & occupied.near(junction, 3.0 * radius + clearance)
        points, radii = [pos.copy()], [radius]
        for s in range(1, n_steps + 1):
            r = radius + (end_radius - radius) * s / n_steps
            own_recent = occupied.branch == index
            own_recent[: max(0, len(own_recent) - int(math.ceil((2 * r + clearance) / step)) - 1)] = False
            ignore = own_recent
            if np.linalg.norm(pos - junction) < 3.0 * radius + clearance:
                ignore[: len(junction_zone)] |= junction_zone
            nxt = None
            for attempt in range(8):
                turn = abs(rng.normal(0.0, 0.18)) if attempt == 0 else rng.uniform(0.3, 1.3)
                trial_dir = _turn(rng, direction, turn)
                trial = pos + step * trial_dir
                # reflect off the walls of the box so the tree stays inside the field of
                # view (only when heading outwards: the root starts on the wall)
                for d in range(dims):
                    if (trial[d] < lo[d] and trial_dir[d] < 0) or (trial[d] > hi[d] and trial_dir[d] > 0):
                        trial_dir[d] = -trial_dir[d]
                        trial[d] = pos[d] + step * trial_dir[d]
                if occupied.free(trial, r, clearance, ignore):
                    nxt, direction = trial, trial_dir
                    break
            if nxt is None:
                break  # boxed in: the branch ends here
            if s == 1:
                occupied.add(pos, radius, index)
            pos = nxt
            occupied.add(pos, r, index)
            points.append(pos.copy())
            radii.append(r)
        if len(points) < 2:
            continue
        branches.append(_Branch(points, radii, depth, parent))
        children.setdefault(parent, []).append(index)
        if depth < max_depth and len(points) == n_steps + 1:
            asym = rng.uniform(0.55, 1.0)
            r1 = end_radius * (1.0 / (1.0 + asym**3)) ** (1.0 / 3.0)
            r2 = asym * r1
            angle1, angle2 = rng.uniform(0.4, 0.8), rng.uniform(0.5, 0.95)
            # the children leave on opposite sides of the parent direction, in one plane
            # (slightly twisted out of it in 3D)
            perp = _perpendicular(rng, direction)
            d1 = _unit(math.cos(angle1) * direction + math.sin(angle1) * perp)
            d2 = _unit(math.cos(angle2) * direction - math.sin(angle2) * perp)
            if dims == 3:
                d2 = _turn(rng, d2, rng.uniform(0.0, 0.25))
            pending.append((pos.copy(), d1, max(min_radius, r1), depth + 1, index))
            pending.append((pos.copy(), d2, max(min_radius, r2), depth + 1, index))

    p0, p1, r0, r1 = [], [], [], []
    for b in branches:
        for a in range(len(b.points) - 1):
            p0.append(b.points[a])
            p1.append(b.points[a + 1])
            r0.append(b.radii[a])
            r1.append(b.radii[a + 1])

    missing = loops - len(loop_segments) // 2
    loop_segments += _add_loops(rng, branches, occupied, missing, size, min_radius, step, clearance, len(loop_segments) // 2)
    for segment in loop_segments:
        for store, value in zip((p0, p1, r0, r1), segment):
            store.append(value)
    return Tree(np.array(p0), np.array(p1), np.array(r0), np.array(r1), len(loop_segments) // 2)


def _ancestors(branches: list[_Branch], i: int) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = branches[i].parent
    return out


def _add_loops(rng, branches, occupied, loops, size, min_radius, step, clearance, made=0) -> list[tuple]:
    """Join pairs of branches that are not in one ancestor line by a new,
    gently bent vessel that keeps clear of every other branch: one cycle each.

    Returns the loop vessels' segments ``(p0, p1, r0, r1)``; their sample points are
    added to ``occupied`` so that later branches avoid them.
    """
    if loops <= 0 or len(branches) < 3:
        return []
    candidates = []  # (branch, point, radius) at a few places along each branch
    for i, b in enumerate(branches):
        if b.depth >= 1:
            for frac in (0.35, 0.5, 0.65):  # away from the ends, where children start
                k = min(len(b.points) - 1, int(round(frac * (len(b.points) - 1))))
                candidates.append((i, b.points[k], b.radii[k]))
    pairs = []
    for a in range(len(candidates)):
        for c in range(a + 1, len(candidates)):
            i, pa, _ = candidates[a]
            j, pc, _ = candidates[c]
            if i == j or i in _ancestors(branches, j) or j in _ancestors(branches, i):
                continue
            dist = float(np.linalg.norm(pa - pc))
            if 0.12 * size < dist < 0.5 * size:
                pairs.append((a, c))
    segments: list[tuple] = []
    used: set[int] = set()
    for o in rng.permutation(len(pairs)):
        a, c = pairs[o]
        (i, pa, ra), (j, pc, rc) = candidates[a], candidates[c]
        if i in used or j in used:
            continue
        radius = max(min_radius, 0.8 * min(ra, rc))
        ends = ((occupied.branch == i) & occupied.near(pa, 2 * ra + radius + clearance + step)) | (
            (occupied.branch == j) & occupied.near(pc, 2 * rc + radius + clearance + step)
        )
        # bulge away from the bifurcations behind the two points, so the loop does not
        # cut through the crotch between them
        centre = (pa + pc) / 2
        outward = _unit(centre - (branches[i].points[0] + branches[j].points[0]) / 2)
        for _ in range(4):  # a few bends of the path
            mid = centre + outward * rng.uniform(0.05, 0.15) * size + rng.normal(0, 0.04 * size, pa.shape)
            # sample the path; only the two ends may touch the tree
            n = max(2, int(np.linalg.norm(pa - mid) // step) + 1)
            m = max(2, int(np.linalg.norm(mid - pc) // step) + 1)
            path = [pa + (mid - pa) * t for t in np.linspace(0, 1, n)]
            path += [mid + (pc - mid) * t for t in np.linspace(0, 1, m)[1:]]
            if all(occupied.free(q, radius, clearance, ends) for q in path):
                break
        else:
            continue
        for q in path:
            occupied.add(q, radius, -1 - made - len(segments) // 2)
        for s0, s1 in ((pa, mid), (mid, pc)):
            segments.append((s0, s1, radius, radius))
        used.update((i, j))
        if len(segments) // 2 == loops:
            break
    return segments


# --------------------------------------------------------------------------- rendering

def render_field(tree: Tree, shape: Sequence[int], spacing: Sequence[float], pad_mm: float) -> np.ndarray:
    """Signed distance (mm) of each voxel centre to the tube surface; ``inf`` far away.

    Voxel ``(i, j, k)`` sits at ``(i, j, k) * spacing`` mm in the tree's frame. Only
    voxels within ``radius + pad_mm`` of a segment get a finite value.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    dims = len(shape)
    field_ = np.full(shape, np.inf, dtype=np.float32)
    for p0, p1, r0, r1 in zip(tree.p0, tree.p1, tree.r0, tree.r1):
        reach = max(r0, r1) + pad_mm
        lo = np.maximum(np.floor((np.minimum(p0, p1) - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(p0, p1) + reach) / spacing).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        v = p1 - p0
        vv = float(v.dot(v)) or 1e-12
        # coordinates relative to p0, one broadcastable axis per dimension
        rel = []
        for d in range(dims):
            ax = np.arange(lo[d], hi[d]) * spacing[d] - p0[d]
            rel.append(ax.reshape([-1 if e == d else 1 for e in range(dims)]))
        t = sum(rel[d] * v[d] for d in range(dims)) / vv
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((rel[d] - t * v[d]) ** 2 for d in range(dims))
        f = np.sqrt(dist2) - (r0 + t * (r1 - r0))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.minimum(field_[sl], f.astype(np.float32), out=field_[sl])
    return field_


def _close_crotches(mask: np.ndarray) -> np.ndarray:
    """Fill the sub-voxel gaps in the crotch of each bifurcation (binary closing with
    the face-neighbour cross). Digitised, a V-shaped crotch leaves background voxels
    enclosed by diagonal contacts: spurious holes and tunnels with full (8/26)
    connectivity. Branches are kept farther apart than the element reaches."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    padded = np.pad(mask, 1, mode="edge")  # the root enters through a face: don't erode it
    closed = ndimage.binary_closing(padded, structure=structure)
    return closed[(slice(1, -1),) * mask.ndim].astype(np.uint8)


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """exp of a random quadratic over the normalised grid, |log bias| <= strength."""
    dims = len(shape)
    coords = [np.linspace(-1, 1, n).reshape([-1 if e == d else 1 for e in range(dims)]) for d, n in enumerate(shape)]
    poly = np.zeros([1] * dims)
    for d in range(dims):
        poly = poly + rng.normal() * coords[d] + 0.5 * rng.normal() * coords[d] ** 2
        for e in range(d + 1, dims):
            poly = poly + 0.5 * rng.normal() * coords[d] * coords[e]
    poly = np.broadcast_to(poly, tuple(shape))
    peak = float(np.abs(poly).max()) or 1.0
    return np.exp(strength * poly / peak)


def _image_from_field(
    rng: np.random.Generator, field_: np.ndarray, spacing: Sequence[float], params: ImagingParams
) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64)
    voxel = float(np.exp(np.mean(np.log(spacing))))
    occupancy = np.clip(0.5 - field_ / voxel, 0.0, 1.0)  # partial volume across one voxel
    occupancy = ndimage.gaussian_filter(occupancy, sigma=params.blur_mm / spacing, mode="nearest")
    if params.gamma != 1.0:
        occupancy = np.clip(occupancy, 0.0, 1.0) ** params.gamma
    jitter = 1.0 + params.jitter * rng.uniform(-1, 1, 2)
    background, vessel = params.background * jitter[0], params.vessel * jitter[1]
    texture = ndimage.gaussian_filter(rng.normal(size=field_.shape), sigma=3.0 / spacing * spacing.min(), mode="wrap")
    texture *= params.texture_std / (texture.std() or 1.0)
    image = (background + (vessel - background) * occupancy + texture) * _bias_field(rng, field_.shape, params.bias_strength)
    image += rng.normal(0.0, params.noise_std, field_.shape)
    return image.astype(np.float32)


# --------------------------------------------------------------------------- geometry

def _direction(kind: str, dims: int) -> np.ndarray:
    if kind == "identity":
        return np.eye(3)
    flip = np.diag([-1.0, -1.0, 1.0])  # how DICOM-derived scans usually come out (LPS-like axes)
    if kind == "flipped":
        return flip
    if kind == "oblique":
        a, b = math.radians(12.0), math.radians(7.0 if dims == 3 else 0.0)
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        return rz @ rx @ flip
    raise ValueError(f"affine must be one of {AFFINE_KINDS}, got {kind!r}")


def _geometry(shape: Sequence[int], spacing: Sequence[float], extent: np.ndarray, kind: str) -> ImageGeometry:
    dims = len(shape)
    direction = _direction(kind, dims)
    centre = np.zeros(3)
    centre[:dims] = extent / 2.0
    origin = -(direction @ centre)  # field of view centred on world 0
    return ImageGeometry.from_spacing(tuple(shape), tuple(spacing), origin=tuple(origin), direction=direction)


# --------------------------------------------------------------------------- cases

def _as_shape(size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)):
        return (int(size),) * dims
    shape = tuple(int(s) for s in size)
    if len(shape) != dims:
        raise ValueError(f"size {size} does not have {dims} entries")
    return shape


def make_case(
    index: int,
    seed: int = 0,
    size: int | Sequence[int] = 64,
    dims: int = 3,
    spacing: Sequence[float] | None = None,
    affine: str = "flipped",
    shifted: bool = False,
    loops: int = 1,
    params: ImagingParams | None = None,
    shifted_spacing_factor: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One synthetic case: ``{"name", "image" float32, "label" uint8, "geometry", "tree"}``.

    ``size``/``spacing`` describe the source domain; the shifted domain covers the same
    field of view with :data:`SHIFTED_SPACING_FACTOR` times the spacing (so its shape
    differs) and images the same tree with :data:`SHIFTED_DOMAIN` (or ``params``).
    ``shifted_spacing_factor`` overrides that factor (``(1, 1, 1)``: same grid, so the
    label is identical and only the imaging differs); the tree does not depend on it.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    shape = _as_shape(size, dims)
    spacing = tuple(float(s) for s in (spacing or default_spacing(dims)))
    if len(spacing) != dims:
        raise ValueError(f"spacing {spacing} does not have {dims} entries")
    extent = (np.asarray(shape) - 1) * np.asarray(spacing)
    factor = np.asarray(SHIFTED_SPACING_FACTOR[dims])  # fixed: the tree must not depend on options
    coarsest = float(max(np.max(spacing), np.max(np.asarray(spacing) * factor)))

    tree_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    # 0.8 voxel: thick enough that no branch breaks apart when rendered in either domain
    tree = grow_tree(tree_rng, extent, min_radius=1.0 * coarsest, loops=loops, clearance=2.5 * coarsest)

    if shifted:
        out_factor = factor if shifted_spacing_factor is None else np.asarray(shifted_spacing_factor, dtype=float)
        spacing_out = tuple(float(s) for s in np.asarray(spacing) * out_factor)
        shape_out = tuple(int(round(e / s)) + 1 for e, s in zip(extent, spacing_out))
        params = params or SHIFTED_DOMAIN
    else:
        spacing_out, shape_out = spacing, shape
        params = params or SOURCE_DOMAIN

    pad = 3.0 * max(spacing_out) + 3.0 * params.blur_mm
    field_ = render_field(tree, shape_out, spacing_out, pad_mm=pad)
    image_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 3 if shifted else 2]))
    image = _image_from_field(image_rng, field_, spacing_out, params)
    label = _close_crotches(field_ <= 0)
    return {
        "name": f"vessel_{index:03d}",
        "image": image,
        "label": label,
        "geometry": _geometry(shape_out, spacing_out, extent, affine),
        "tree": tree,
    }


def _png_image(image: np.ndarray) -> np.ndarray:
    lo, hi = PNG_WINDOW
    return np.clip(np.round((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def make_dataset(
    out: str | Path,
    cases: int = 8,
    size: int | Sequence[int] = 64,
    dims: int = 3,
    shifted: bool = False,
    seed: int = 0,
    test_cases: int = 2,
    file_ending: str = ".nii.gz",
    loops: int = 1,
    spacing: Sequence[float] | None = None,
    affine: str = "flipped",
    name: str | None = None,
    params: ImagingParams | None = None,
) -> dict[str, Any]:
    """Write a synthetic dataset in the nnU-Net v2 layout and return what was written.

    ``params`` images the cases in another domain (an :class:`ImagingParams`; default the
    source domain, or the shifted one with ``shifted``).

    ``out/dataset.json``, ``imagesTr/vessel_000_0000<ending>``, ``labelsTr/vessel_000<ending>``
    and, when ``test_cases > 0``, ``imagesTs/`` and ``labelsTs/`` (test cases have
    their own trees: indices ``cases .. cases + test_cases - 1``). Files are written
    atomically and ``dataset.json`` last, so an interrupted run leaves no dataset that
    looks complete. The same arguments give byte-identical arrays.

    For ``.png`` (2D only) images are windowed to uint8 with :data:`PNG_WINDOW`. PNG and
    TIFF store no geometry: those datasets use unit spacing and identity axes (the
    shifted domain's resolution change then shows only in the shape).
    """
    out = Path(out)
    file_ending = file_ending if file_ending.startswith(".") else "." + file_ending
    if file_ending not in SUPPORTED_ENDINGS:
        raise ValueError(f"file ending must be one of {SUPPORTED_ENDINGS}, got {file_ending!r}")
    natural = file_ending in NATURAL_IMAGE_ENDINGS
    if file_ending == ".png" and dims != 2:
        raise ValueError("PNG datasets are 2D: use dims=2")
    if natural:  # no geometry in the file: unit spacing, identity axes
        spacing = spacing or (1.0,) * dims
        affine = "identity"
    if cases < 1:
        raise ValueError("need at least one training case")
    written = {"Tr": [], "Ts": []}
    shapes = set()
    spacings = set()
    for subset, indices in (("Tr", range(cases)), ("Ts", range(cases, cases + test_cases))):
        for i in indices:
            case = make_case(i, seed=seed, size=size, dims=dims, spacing=spacing, affine=affine, shifted=shifted, loops=loops,
                             params=params)
            geometry = case["geometry"]
            image = _png_image(case["image"]) if file_ending == ".png" else case["image"]
            if natural:
                geometry = ImageGeometry.identity(geometry.shape)
            write_image(out / f"images{subset}" / f"{case['name']}_0000{file_ending}", image, geometry)
            write_image(out / f"labels{subset}" / f"{case['name']}{file_ending}", case["label"], geometry)
            written[subset].append(case["name"])
            shapes.add(geometry.shape)
            spacings.add(tuple(round(s, 4) for s in geometry.spacing))
    domain = "shifted" if shifted else "faint" if params == FAINT_DOMAIN else "custom" if params else "source"
    name = name or f"SyntheticVessels{dims}D" + ("Shifted" if shifted else "")
    settings = {
        "seed": seed,
        "cases": cases,
        "test_cases": test_cases,
        "size": list(_as_shape(size, dims)),
        "dims": dims,
        "spacing": list(spacing or default_spacing(dims)),
        "affine": affine,
        "loops": loops,
        "domain": domain,
        "imaging": asdict(params or (SHIFTED_DOMAIN if shifted else SOURCE_DOMAIN)),
    }
    write_dataset_json(
        out,
        channel_names={0: "CT"},
        labels=LABELS,
        num_training=cases,
        file_ending=file_ending,
        name=name,
        description=f"medseg synthetic vessel trees ({dims}D, {domain} domain)",
        numTest=test_cases,
        medseg_synthetic=settings,
    )
    return {
        "root": out,
        "training": written["Tr"],
        "test": written["Ts"],
        "shapes": sorted(shapes),
        "spacings": sorted(spacings),
        "file_ending": file_ending,
        "domain": domain,
    }

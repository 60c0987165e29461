"""Figures of the evaluation report, drawn with matplotlib's Agg backend and returned as PNG bytes.

* :func:`distribution_figure`: one box plot with the cases as jittered points per
  metric (metrics have their own scales, so each gets its own axes).
* :func:`case_figure`: reference and prediction side by side (a maximum-intensity
  projection for 3D masks, the image itself for 2D), the scan underneath when there is
  one, and the unmatched topological features marked at their birth and death voxels;
  :func:`masks_figure` draws any number of such panels (reference and two predictions,
  for a comparison).
* :func:`paired_difference_figure`: per-case differences between two evaluations.

Nothing here reads files or knows about summaries; :mod:`medseg.evaluation.report`
and :mod:`medseg.evaluation.compare` prepare the arrays.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Marks", "Panel", "FEATURE_MARKERS", "REFERENCE_COLOUR", "PREDICTION_COLOUR", "distribution_figure",
           "masks_figure", "case_figure", "paired_difference_figure", "png_bytes"]

FEATURE_MARKERS = {0: "o", 1: "s", 2: "^"}
"""Marker per homology dimension: components, loops, cavities."""

REFERENCE_COLOUR = "#e03131"  # reference features the prediction misses
PREDICTION_COLOUR = "#1c7ed6"  # prediction features the reference does not have


def _pyplot():
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # A case or label name in a script the plotting font lacks (Chinese, Japanese: not in
    # DejaVu Sans, and servers seldom have a CJK font) is drawn as boxes in the picture's
    # title, and matplotlib warned once per character on stderr, dozens of lines per
    # page. The page names every pictured case in its HTML caption, which the browser
    # draws with its own fonts.
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from (current )?font", category=UserWarning)
    return plt


def literal(text: str) -> str:
    """``text`` drawn as written: matplotlib reads ``$...$`` as math, so a case named
    ``price $\\q$`` failed the whole page (a 100-line ParseFatalException) and ``a_$x^2$_b``
    was drawn as "a_x²_b"."""
    return text.replace("$", r"\$")


def png_bytes(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def distribution_figure(values: dict[str, Sequence[float]], title: str = "", columns: int = 4) -> bytes:
    """Box plot and strip plot of each metric's per-case values (PNG bytes).

    ``values`` maps a metric name to its per-case values; NaN values are left out and
    counted in the axes title ("n=12, 2 undefined").
    """
    plt = _pyplot()
    names = list(values)
    columns = max(1, min(columns, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.7 * columns, 2.5 * rows), squeeze=False)
    rng = np.random.default_rng(0)  # the same jitter every time: reports are reproducible
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        raw = np.asarray([np.nan if v is None else float(v) for v in values[name]], dtype=float)
        finite = raw[np.isfinite(raw)]
        undefined = raw.size - finite.size
        if finite.size:
            ax.boxplot(finite, widths=0.5, showfliers=False, medianprops={"color": "#c92a2a"})
            jitter = rng.uniform(-0.12, 0.12, finite.size)
            ax.scatter(1 + jitter, finite, s=12, alpha=0.7, color="#1864ab", zorder=3, linewidths=0)
        else:
            ax.text(0.5, 0.5, "no defined value", ha="center", va="center", transform=ax.transAxes, color="#868e96")
        label = f"n={finite.size}" + (f", {undefined} undefined" if undefined else "")
        ax.set_title(literal(f"{name}\n{label}"), fontsize=9)
        ax.set_xticks([])
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(literal(title), fontsize=11)
    fig.tight_layout()
    return png_bytes(fig)


@dataclass
class Marks:
    """Unmatched features of one mask to draw: per dimension, (N, 2) births and deaths in panel coordinates."""

    births: dict[int, np.ndarray] = field(default_factory=dict)
    deaths: dict[int, np.ndarray] = field(default_factory=dict)


def _panel(ax, mask_proj, image_proj, colour, aspect):
    if image_proj is not None:
        lo, hi = np.percentile(image_proj, [1, 99.5])
        ax.imshow(image_proj, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        overlay = np.zeros(mask_proj.shape + (4,), dtype=float)
        overlay[mask_proj > 0] = (*_rgb(colour), 0.45)
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
    else:
        ax.imshow(mask_proj > 0, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _rgb(colour: str) -> tuple[float, float, float]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


#: Up to this many features a panel's marks are drawn at full size with their birth-death
#: lines; above it they shrink with the count (area ~ 1/count) and lose the lines: a poor
#: model's 2,000 unmatched features in a TopoMortar image buried the masks under them.
FULL_SIZE_MARKS = 40


def _draw_marks(ax, marks: Marks, colour: str, names: dict[int, str], side: str) -> list:
    handles = []
    count = sum(len(v) for v in marks.births.values())
    scale = min(1.0, FULL_SIZE_MARKS / max(count, 1))
    for dim in sorted(set(marks.births) | set(marks.deaths)):
        births = marks.births.get(dim, np.zeros((0, 2)))
        deaths = marks.deaths.get(dim, np.zeros((0, 2)))
        if len(births) == 0 and len(deaths) == 0:
            continue
        marker = FEATURE_MARKERS.get(dim, "D")
        if count <= FULL_SIZE_MARKS:
            for b, d in zip(births, deaths):
                ax.plot([b[1], d[1]], [b[0], d[0]], color=colour, lw=0.8, ls=":", alpha=0.9)
        if len(births):
            h = ax.scatter(births[:, 1], births[:, 0], s=max(70 * scale, 6), marker=marker, facecolors="none",
                           edgecolors=colour, linewidths=max(1.8 * scale ** 0.5, 0.5), zorder=4,
                           label=f"{side} {names.get(dim, f'dim {dim}')}")
            handles.append(h)
        if len(deaths):
            ax.scatter(deaths[:, 1], deaths[:, 0], s=max(30 * scale, 3), marker="x", color=colour,
                       linewidths=max(1.4 * scale ** 0.5, 0.4), zorder=4)
    return handles


@dataclass
class Panel:
    """One panel of :func:`masks_figure`: a 2D mask and the marks drawn on it.

    ``marks`` lists (marks, colour, side) triples; ``side`` names them in the legend
    ("missing", "extra").
    """

    mask: np.ndarray
    title: str
    marks: list[tuple[Marks, str, str]] = field(default_factory=list)


def masks_figure(
    panels: Sequence[Panel],
    feature_names: dict[int, str],
    image: np.ndarray | None = None,
    aspect: float = 1.0,
    legend: Sequence[str] = (),
    suptitle: str = "",
) -> bytes:
    """Masks (2D arrays of one shape: projections or slices) side by side, features marked (PNG bytes).

    A hollow marker is a feature's birth voxel (circle: component, square: loop,
    triangle: cavity), an ``x`` its death voxel, a dotted line joins the two. ``image``
    (the scan, same shape) is drawn under every mask. ``legend`` lines are written above
    the panels.
    """
    plt = _pyplot()
    height, width = panels[0].mask.shape
    panel_w = 4.2
    panel_h = float(np.clip(panel_w * height * aspect / max(width, 1), 2.0, 6.0))
    lines = ([suptitle] if suptitle else []) + list(legend)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * panel_w, panel_h + 0.25 * len(lines) + 0.8),
                             layout="constrained", squeeze=False)
    handles, seen = [], set()
    for ax, panel in zip(axes[0], panels):
        _panel(ax, panel.mask, image, "#2f9e44" if image is not None else "#ffffff", aspect)
        for marks, colour, side in panel.marks:
            drawn = _draw_marks(ax, marks, colour, feature_names, side)
            handles += [h for h in drawn if h.get_label() not in seen]  # one legend entry per kind
            seen.update(h.get_label() for h in drawn)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(literal(panel.title), fontsize=10)
    if handles:
        death = plt.Line2D([], [], marker="x", ls="", color="#495057", label="death voxel (hollow marker: birth)")
        fig.legend(handles=handles + [death], loc="outside lower center", ncol=min(len(handles) + 1, 5), fontsize=8,
                   frameon=False)
    if lines:
        fig.suptitle(literal("\n".join(lines)), fontsize=9)
    return png_bytes(fig)


def case_figure(
    reference: np.ndarray,
    prediction: np.ndarray,
    reference_marks: Marks,
    prediction_marks: Marks,
    feature_names: dict[int, str],
    image: np.ndarray | None = None,
    aspect: float = 1.0,
    titles: tuple[str, str] = ("reference", "prediction"),
    legend: Sequence[str] = (),
    suptitle: str = "",
) -> bytes:
    """Reference and prediction side by side, features marked (PNG bytes; see :func:`masks_figure`).

    Reference marks are the reference's features that the prediction does not match
    (red, "missing"), prediction marks the prediction's features that the reference
    does not (blue, "extra").
    """
    return masks_figure(
        [Panel(reference, titles[0], [(reference_marks, REFERENCE_COLOUR, "missing")]),
         Panel(prediction, titles[1], [(prediction_marks, PREDICTION_COLOUR, "extra")])],
        feature_names, image=image, aspect=aspect, legend=legend, suptitle=suptitle,
    )


def paired_difference_figure(differences: dict[str, Sequence[float]], title: str = "") -> bytes:
    """Per-case differences (B - A) of each metric as strip plots around zero (PNG bytes).

    Each metric is turned so that up is B better (HD95 and the errors, lower is better,
    are drawn as A - B) and scaled to its own largest difference, which its label gives:
    a Dice gain of 0.02 and an HD95 loss of 16 mm looked the same, and up meant better
    for one and worse for the other. Metrics without a better direction stay B - A.
    """
    from medseg.evaluation.aggregate import better_direction

    plt = _pyplot()
    names = list(differences)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.4))
    rng = np.random.default_rng(0)
    labels = []
    for i, name in enumerate(names):
        d = np.asarray(differences[name], dtype=float)
        d = d[np.isfinite(d)] * (-1.0 if better_direction(name) < 0 else 1.0)
        spread = float(np.max(np.abs(d))) if d.size else 0.0
        labels.append(literal(f"{name}\n±{spread:.3g}" if d.size else name))
        if d.size == 0:
            continue
        spread = spread or 1.0
        ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d / spread, s=14, alpha=0.75, color="#1864ab", linewidths=0)
        ax.plot([i - 0.3, i + 0.3], [np.mean(d) / spread] * 2, color="#c92a2a", lw=2)
    ax.axhline(0, color="#495057", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("B better \u2191   A better \u2193\n(scaled to each metric's max |diff|)", fontsize=8)
    ax.set_ylim(-1.1, 1.1)
    if title:
        ax.set_title(literal(title), fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)

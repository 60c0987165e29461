"""``report.html``: an evaluation as one self-contained page.

The page (written by :func:`write_report` from a ``summary.json``) holds

* the run: folders, cases evaluated, missing and failed (with reasons), conventions;
* per label, the aggregate table (mean, std, median, percentiles, undefined cases of
  every metric; :mod:`medseg.evaluation.aggregate`) and the metrics' distributions
  (box and strip plots);
* the per-case table (one row per reference case, missing and failed ones included),
  sortable by clicking a header;
* the worst cases by Betti matching error (by Betti number error when the matching was
  not computed): reference and prediction side by side, maximum-intensity projections
  of 3D masks along their thinnest axis or the 2D masks themselves, over the scan when
  one is found, with the features that the Betti matching leaves unmatched marked at
  their birth and death voxels, and a legend such as "reference: 2 components and 1
  loop not matched in the prediction".

Images are embedded as base64 PNG and style and script are inline, so the file can be
mailed or archived on its own and opens without network access.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.errors import DataError, MedsegError
from medseg.evaluation import _page
from medseg.evaluation.aggregate import STATISTICS, describe, is_number
from medseg.evaluation.summary import (
    DEFAULT_WORST_CASES,
    PRIMARY_METRICS,
    find_summary,
    ordered_metrics,
    read_summary,
)

__all__ = [
    "write_report",
    "render_report",
    "default_images_dir",
    "UnmatchedFeatures",
    "unmatched_features",
    "describe_features",
    "legend_lines",
    "comparison_picture",
    "FEATURE_NAMES",
]

FEATURE_NAMES = {0: ("component", "components"), 1: ("loop", "loops"), 2: ("cavity", "cavities")}
"""What a homology class of each dimension is called in legends (singular, plural)."""

_PICTURE_MARGIN = 3  # voxels around the union of both masks in the worst-case pictures
MARKERS_EXPLAINED = (
    "Hollow marker at the birth voxel (circle: component, square: loop, triangle: cavity), x at the death voxel. "
    "The counts are exact; which of two features is marked as the unmatched one follows the Betti matching's "
    "tie-break on binary masks (voxel order, not overlap), so a marker can sit on a component that overlaps the "
    "reference while an extra one elsewhere is matched in its place."
)


# --------------------------------------------------------------------------- features

@dataclass(frozen=True)
class UnmatchedFeatures:
    """Features of a reference and a prediction that the Betti matching leaves unmatched.

    ``reference_births[d]`` / ``reference_deaths[d]`` are (N, ndim) voxel coordinates of
    the reference's unmatched features of dimension d (missing from the prediction);
    ``prediction_*`` the same for the prediction (not in the reference).
    """

    reference_births: tuple[np.ndarray, ...]
    reference_deaths: tuple[np.ndarray, ...]
    prediction_births: tuple[np.ndarray, ...]
    prediction_deaths: tuple[np.ndarray, ...]

    @property
    def reference_counts(self) -> list[int]:
        return [len(x) for x in self.reference_births]

    @property
    def prediction_counts(self) -> list[int]:
        return [len(x) for x in self.prediction_births]


def unmatched_features(pred_mask: np.ndarray, ref_mask: np.ndarray, connectivity: int | None = None) -> UnmatchedFeatures:
    """Unmatched features of two binary masks, with the conventions of ``medseg evaluate``.

    Superlevel filtration of the masks (the foreground enters first), construction T
    for full connectivity (8/26, the default) and V for face connectivity (4/6), the
    same as the ``betti_matching_error`` metric, whose per-dimension values are the
    counts of the two sides added.

    Raises
    ------
    ImportError
        When medseg's topology engine is not built.
    MemoryError
        When the masks' Betti matching would not fit in this machine's memory
        (:func:`medseg.evaluation.metrics.matching_fits`): the report runs it in the
        command's own process, after every case has been evaluated.
    """
    from medseg.evaluation.metrics import matching_bytes, matching_construction, matching_fits
    from medseg.topology import betti_matching

    if not matching_fits(np.shape(pred_mask)):
        raise MemoryError(f"their Betti matching needs about {matching_bytes(np.shape(pred_mask)) / 2**30:.1f} GB, "
                          "more than the memory here allows")

    m = betti_matching(
        np.asarray(pred_mask, dtype=bool).astype(np.float32),
        np.asarray(ref_mask, dtype=bool).astype(np.float32),
        filtration="superlevel",
        construction=matching_construction(connectivity),
        threads=None,  # all cores: the report draws its pictures after the workers are done
    )
    return UnmatchedFeatures(
        reference_births=tuple(m.unmatched_target_birth_coordinates),
        reference_deaths=tuple(m.unmatched_target_death_coordinates),
        prediction_births=tuple(m.unmatched_prediction_birth_coordinates),
        prediction_deaths=tuple(m.unmatched_prediction_death_coordinates),
    )


def describe_features(counts: Sequence[int]) -> str:
    """Counts per dimension in words: ``[2, 1]`` -> "2 components and 1 loop"; all zero -> "no feature".

    Examples
    --------
    >>> describe_features([2, 1, 0])
    '2 components and 1 loop'
    >>> describe_features([1, 0, 3])
    '1 component and 3 cavities'
    """
    parts = []
    for dim, n in enumerate(counts):
        if n:
            singular, plural = FEATURE_NAMES.get(dim, (f"{dim}-dimensional feature", f"{dim}-dimensional features"))
            parts.append(f"{n} {singular if n == 1 else plural}")
    if not parts:
        return "no feature"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def legend_lines(features: UnmatchedFeatures, note: str | None = None) -> list[str]:
    """The legend of a worst-case picture: what each side has that the other does not match,
    and ``note`` (:func:`presence_note`) where the counts cannot tell."""
    def line(side: str, counts: list[int], other: str) -> str:
        if not any(counts):
            return f"{side}: every feature matched in the {other}"
        return f"{side}: {describe_features(counts)} not matched in the {other}"

    lines = [
        line("reference", features.reference_counts, "prediction"),
        line("prediction", features.prediction_counts, "reference"),
    ]
    return lines + ([note] if note else [])


def presence_note(pred_mask: np.ndarray, ref_mask: np.ndarray) -> str | None:
    """What the unmatched features cannot show, or None.

    The Betti matching error leaves out each non-empty mask's eldest component (the one
    that never dies, matched with the other mask's wherever it is), so a structure missed or
    invented whole, or predicted in another place, shows no unmatched feature: the legends
    said "every feature matched" of a prediction that missed the reference's only vessel.

    Examples
    --------
    >>> ref = np.zeros((4, 6), bool); ref[1, :3] = True
    >>> presence_note(np.zeros_like(ref), ref)
    "the prediction is empty: it misses the reference's structure whole (the Betti matching error leaves out each mask's eldest component)"
    >>> presence_note(np.roll(ref, 3, axis=1), ref)
    "the masks do not overlap: Betti matching pairs each mask's eldest component with the other's wherever it is"
    """
    pred_any, ref_any = bool(np.any(pred_mask)), bool(np.any(ref_mask))
    why = "the Betti matching error leaves out each mask's eldest component"
    if ref_any and not pred_any:
        return f"the prediction is empty: it misses the reference's structure whole ({why})"
    if pred_any and not ref_any:
        return f"the reference is empty: the prediction is extra whole ({why})"
    if pred_any and not np.any(np.logical_and(pred_mask, ref_mask)):
        return "the masks do not overlap: Betti matching pairs each mask's eldest component with the other's wherever it is"
    return None


# --------------------------------------------------------------------------- helpers

def check_report_options(images_dir: str | Path | None, worst_cases: int) -> None:
    """The report's own arguments, checked before any work: ``images_dir`` given must be a
    folder (a report without its scans would otherwise pass silently), ``worst_cases`` >= 0.

    Raises
    ------
    ArgumentError
        Naming ``images`` or ``worst_cases``.
    """
    from medseg.errors import ArgumentError

    if isinstance(worst_cases, bool) or not isinstance(worst_cases, int) or worst_cases < 0:
        raise ArgumentError("worst_cases", "must be a whole number, 0 or more", worst_cases)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ArgumentError("images", "folder not found" if not Path(images_dir).exists() else "is not a folder",
                            images_dir)


def default_images_dir(ref_dir: str | Path) -> Path | None:
    """``imagesTs`` next to a ``labelsTs`` folder (``imagesXx`` for ``labelsXx``) if it exists, else None."""
    ref_dir = Path(ref_dir)
    if not ref_dir.name.startswith("labels"):
        return None
    candidate = ref_dir.parent / ("images" + ref_dir.name[len("labels"):])
    return candidate if candidate.is_dir() else None


def _plotted(names: Sequence[str]) -> list[str]:
    keep = [n for n in ordered_metrics(names) if n in PRIMARY_METRICS and n not in ("components_pred", "components_ref", "volume_difference_mm3")]
    keep += [n for n in ordered_metrics(names) if n.startswith("betti_matching_") and n[len("betti_matching_"):-len("_error")].isdigit()]
    return keep


def _connectivity_from(summary: dict) -> int | None:
    value = summary.get("conventions", {}).get("connectivity")
    return value if isinstance(value, int) else None


def _entries(summary: dict) -> list[dict]:
    entries = summary.get("metric_per_case")
    if not isinstance(entries, list):
        raise DataError("summary has no 'metric_per_case' list")
    return entries


def _case_name(entry: dict) -> str:
    if "case" in entry:
        return str(entry["case"])
    from medseg.data.io import strip_ending

    return strip_ending(Path(entry.get("reference_file", "?")))


def _status(entry: dict) -> str:
    return "ok" if "metrics" in entry else str(entry.get("status", "failed"))


# --------------------------------------------------------------------------- sections

def _run_section(summary: dict) -> str:
    entries = _entries(summary)
    failed = summary.get("failed_cases", {})
    missing = summary.get("missing_predictions", [])
    items = [
        ("prediction folder", summary.get("prediction_folder", "")),
        ("reference folder", summary.get("reference_folder", "")),
        ("cases", f"{summary.get('num_evaluated', sum('metrics' in e for e in entries))} of "
                  f"{summary.get('num_cases', len(entries))} evaluated, {len(missing)} missing, {len(failed)} failed"),
        ("labels", ", ".join(f"{v} = {n}" for v, n in summary.get("labels", {}).items()) + f" ({summary.get('label_source', '')})"),
        ("metrics computed", ", ".join(summary.get("metrics_computed", [])) or "all"),
    ]
    skipped = summary.get("metrics_skipped") or {}
    if skipped:
        items.append(("metrics skipped", "; ".join(f"{name}: {reason}" for name, reason in skipped.items())))
    rows = "".join(f"<tr><td>{_page.esc(k)}</td><td class=\"text\">{_page.esc(v)}</td></tr>" for k, v in items)
    html = f"<div class=\"wide\"><table>{rows}</table></div>"
    if missing or failed:
        problem_rows = [[_page.cell(c), _page.cell("missing"), _page.cell("no prediction file")] for c in missing]
        problem_rows += [[_page.cell(c), _page.cell("failed"), _page.cell(reason)] for c, reason in failed.items()]
        html += "<h3>Cases not evaluated</h3>" + _page.table(["case", "status", "reason"], problem_rows, table_id="problems")
    conventions = summary.get("conventions", {})
    if conventions:
        conv = "".join(
            f"<tr><td>{_page.esc(k)}</td><td class=\"text\">{_page.esc(v)}</td></tr>"
            for k, v in conventions.items()
        )
        html += f"<details><summary>Conventions</summary><div class=\"wide\"><table>{conv}</table></div></details>"
    return "<h2>Run</h2>" + html


def _aggregate_section(summary: dict, label: str, name: str, rows_by_case: dict[str, dict]) -> str:
    stats = summary.get("statistics", {}).get(label)
    values = [m for m in rows_by_case.values()]
    names = ordered_metrics({k for m in values for k in m})
    if stats is None:  # an older or foreign summary: compute them here
        stats = {k: describe(m.get(k, math.nan) for m in values) for k in names}
    headers = ["metric", *STATISTICS]
    main = [n for n in names if n in stats and (n in PRIMARY_METRICS or n.endswith("_error"))]
    rest = [n for n in names if n in stats and n not in main]

    def rows(metric_names):
        return [[_page.cell(n), *(_page.cell(stats[n].get(s, math.nan)) for s in STATISTICS)] for n in metric_names]

    html = f"<h3>{_page.esc(name)} (label {_page.esc(label)})</h3>"
    html += _page.table(headers, rows(main), table_id=f"aggregate-{label}")
    if rest:
        html += "<details><summary>All other metrics</summary>" + _page.table(headers, rows(rest)) + "</details>"
    return html


def _distribution_section(label: str, name: str, rows_by_case: dict[str, dict]) -> str:
    from medseg.evaluation.plots import distribution_figure

    names = _plotted({k for m in rows_by_case.values() for k in m})
    if not names or not rows_by_case:
        return ""
    values = {n: [m.get(n, math.nan) for m in rows_by_case.values()] for n in names}
    png = distribution_figure(values, title=f"{name}: {len(rows_by_case)} cases")
    return f"<figure>{_page.img(png, f'distributions of the metrics of {name}')}</figure>"


def _case_table(summary: dict, labels: dict[str, str]) -> str:
    entries = _entries(summary)
    present = {label: set() for label in labels}
    for entry in entries:
        for label, metrics in entry.get("metrics", {}).items():
            if label in present:
                present[label].update(k for k, v in metrics.items() if is_number(v))
    single = len(labels) == 1
    columns: list[tuple[str, str, str]] = []  # (label, metric, header)
    for label, name in labels.items():
        shown = [n for n in ordered_metrics(present[label]) if n in PRIMARY_METRICS or n.endswith("_error")]
        columns += [(label, n, n if single else f"{n} [{name}]") for n in shown]
    headers = ["case", "status", *(h for _, _, h in columns)]
    keys = ["case", "status", *(n if single else f"{n}@{label}" for label, n, _ in columns)]
    rows, classes = [], []
    for entry in entries:
        status = _status(entry)
        cells = [_page.cell(_case_name(entry)), _page.cell(status)]
        metrics = entry.get("metrics", {})
        for label, n, _ in columns:
            value = metrics.get(label, {}).get(n)
            cells.append(_page.cell(value if is_number(value) else None))
        rows.append(cells)
        classes.append("" if status == "ok" else "bad")
    note = "<p class=\"meta\">One row per reference case; click a header to sort (undefined values stay last).</p>"
    return "<h2>Cases</h2>" + note + _page.table(
        headers, rows, table_id="cases", sortable=True, keys=keys, row_classes=classes, scroll=True
    )


def _worst(summary: dict, count: int) -> tuple[list[str], list[tuple[tuple[float, ...], str, str, dict]]]:
    """The topology metrics computed (``betti_matching_error`` and/or ``betti_error``), and
    the ``count`` (case, label) pairs with the largest values of them, in that order: a
    structure missed or invented whole has Betti matching error 0 (each mask's eldest
    component is left out of it) but a Betti number error, and was never pictured."""
    entries = [e for e in _entries(summary) if "metrics" in e]
    metrics_used = [m for m in ("betti_matching_error", "betti_error")
                    if any(m in v for e in entries for v in e["metrics"].values())]
    ranked = []
    for entry in entries:
        for label, metrics in entry["metrics"].items():
            values = tuple(float(v) if is_number(v) and math.isfinite(v) else 0.0
                           for v in (metrics.get(m) for m in metrics_used))
            if any(v > 0 for v in values):
                ranked.append((values, _case_name(entry), label, entry))
    ranked.sort(key=lambda t: (tuple(-v for v in t[0]), t[1], t[2]))
    return metrics_used, ranked[: max(count, 0)]


def _union_box(masks: Sequence[np.ndarray], margin: int) -> tuple[slice, ...]:
    either = np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])
    box = []
    for axis in range(either.ndim):
        hit = np.flatnonzero(either.any(axis=tuple(x for x in range(either.ndim) if x != axis)))
        if hit.size == 0:
            return tuple(slice(None) for _ in range(either.ndim))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1, either.shape[axis])))
    return tuple(box)


def _read_scan(images_dir: Path | None, case: str, ending: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """The scan under the masks, in grey: an RGB(A) photograph (TopoMortar's) by its
    luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B; it was left out, "holds 3
    channels", so no TopoMortar picture showed its image), another image of several
    channels (MRI sequences) by its first."""
    if images_dir is None:
        return None, "no scan folder: masks only"
    from medseg.data.io import read_image_channels

    # nnU-Net's CASE_0000 first, then the MSD layout's CASE (one file, 3D or 4D)
    path = next((p for p in (images_dir / f"{case}_0000{ending}", images_dir / f"{case}{ending}") if p.is_file()), None)
    if path is None:
        return None, f"no scan {case}_0000{ending} or {case}{ending} in {images_dir}: masks only"
    try:
        channels, _ = read_image_channels(path)
    except MedsegError as err:
        return None, f"scan unreadable ({err}): masks only"
    channels = np.asarray(channels, dtype=np.float32)
    colour = len(shape) == 2 and channels.shape[0] in (3, 4)
    image = np.tensordot(np.asarray([0.299, 0.587, 0.114], np.float32), channels[:3], axes=1) if colour else channels[0]
    if image.shape != shape:
        return None, f"scan {path.name} has shape {image.shape}, the masks {shape}: masks only"
    how = " (its colours as grey)" if colour else f" (channel 0 of {channels.shape[0]})" if channels.shape[0] > 1 else ""
    return image, f"scan {path.name}{how} underneath"


def _project(coords: np.ndarray, axis: int | None) -> np.ndarray:
    coords = np.asarray(coords, dtype=float)
    if coords.size == 0:
        return np.zeros((0, 2))
    return np.delete(coords, axis, axis=1) if axis is not None else coords


@dataclass
class _CaseView:
    """How a case's masks are drawn: cropped to ``box``, 3D ones projected along ``axis``."""

    box: tuple[slice, ...]
    axis: int | None
    aspect: float
    image: np.ndarray | None  # the cropped scan, projected like the masks
    note: str

    def project(self, mask: np.ndarray) -> np.ndarray:
        return mask.max(axis=self.axis) if self.axis is not None else mask

    def marks(self, births: Sequence[np.ndarray], deaths: Sequence[np.ndarray]):
        from medseg.evaluation.plots import Marks

        return Marks(births={d: _project(b, self.axis) for d, b in enumerate(births)},
                     deaths={d: _project(x, self.axis) for d, x in enumerate(deaths)})


def _case_view(masks: Sequence[np.ndarray], geometry, case: str, images_dir: Path | None, ending: str) -> _CaseView:
    """The crop around every mask's foreground, the thinnest axis of a 3D crop (in mm), the scan under it."""
    box = _union_box(masks, _PICTURE_MARGIN)
    shape = masks[0][box].shape
    image, scan_note = _read_scan(images_dir, case, ending, masks[0].shape)
    if image is not None:
        image = image[box]
    spacing = np.asarray(geometry.spacing, dtype=float)
    if len(shape) == 3:
        axis = int(np.argmin(np.asarray(shape) * spacing))
        kept = [a for a in range(3) if a != axis]
        view_note = f"maximum-intensity projection along axis {axis}"
        image = image.max(axis=axis) if image is not None else None
    else:
        axis, kept, view_note = None, [0, 1], "2D masks"
    origin = ", ".join(str(s.start or 0) for s in box)
    return _CaseView(box, axis, float(spacing[kept[0]] / spacing[kept[1]]), image,
                     f"{view_note}; crop origin ({origin}); {scan_note}")


def _feature_names() -> dict[int, str]:
    return {d: FEATURE_NAMES[d][0] for d in FEATURE_NAMES}


def _picture(entry: dict, label: str, label_name: str, summary: dict, images_dir: Path | None,
             ending: str | None, connectivity: int | None) -> tuple[bytes | None, list[str], str]:
    """(PNG, legend lines, note) for one worst case; PNG None with the reason in note when it cannot be drawn."""
    from medseg.data.io import ending_of
    from medseg.evaluation.pair import label_masks, read_case_pair
    from medseg.evaluation.plots import Marks, case_figure

    ref_file, pred_file = Path(entry["reference_file"]), Path(entry["prediction_file"])
    try:
        pred, ref, geometry = read_case_pair(pred_file, ref_file, connectivity)
    except MedsegError as err:
        return None, [], f"picture unavailable: {err}"
    pred_mask, ref_mask = label_masks(pred, ref, int(label), summary.get("ignore_label"))
    view = _case_view([pred_mask, ref_mask], geometry, _case_name(entry), images_dir, ending or ending_of(ref_file))
    p, r = pred_mask[view.box], ref_mask[view.box]
    try:
        features = unmatched_features(p, r, connectivity)
        legend = legend_lines(features, presence_note(p, r))
        ref_marks = view.marks(features.reference_births, features.reference_deaths)
        pred_marks = view.marks(features.prediction_births, features.prediction_deaths)
    except ImportError:
        legend = ["topology engine not built: unmatched features not marked"]
        ref_marks = pred_marks = Marks()
    except MemoryError as err:
        legend = [f"unmatched features not marked: {err}"]
        ref_marks = pred_marks = Marks()
    png = case_figure(
        view.project(r), view.project(p), ref_marks, pred_marks, _feature_names(), image=view.image, aspect=view.aspect,
        titles=("reference", "prediction"), legend=legend, suptitle=f"{_case_name(entry)} - {label_name}",
    )
    return png, legend, view.note


def comparison_picture(entry_a: dict, entry_b: dict, label: str, label_name: str, summary: dict,
                       images_dir: Path | None, connectivity: int | None) -> tuple[bytes | None, list[str], str]:
    """(PNG, legend lines, note): the reference and two runs' predictions of one case, each with its own errors.

    On each prediction, red marks the reference features it does not match (missing),
    blue its own features the reference does not have (extra); ``summary`` is A's (its
    ignore label). PNG None with the reason in note when the case cannot be drawn.
    """
    from medseg.data.io import ending_of
    from medseg.evaluation.pair import label_masks, read_case_pair
    from medseg.evaluation.plots import PREDICTION_COLOUR, REFERENCE_COLOUR, Panel, masks_figure

    ref_file = Path(entry_a["reference_file"])
    masks = []
    try:
        for entry in (entry_a, entry_b):
            pred, ref, geometry = read_case_pair(Path(entry["prediction_file"]), ref_file, connectivity)
            masks.append(label_masks(pred, ref, int(label), summary.get("ignore_label")))
    except MedsegError as err:
        return None, [], f"picture unavailable: {err}"
    (pred_a, ref_mask), (pred_b, _) = masks
    if pred_a.shape != pred_b.shape:
        return None, [], f"picture unavailable: the predictions have shapes {pred_a.shape} and {pred_b.shape}"
    case = _case_name(entry_a)
    view = _case_view([pred_a, pred_b, ref_mask], geometry, case, images_dir, ending_of(ref_file))
    r = ref_mask[view.box]
    panels, legend = [Panel(view.project(r), "reference")], []
    for run, pred_mask in (("A", pred_a), ("B", pred_b)):
        p = pred_mask[view.box]
        marks = []
        try:
            features = unmatched_features(p, r, connectivity)
            missing, extra = features.reference_counts, features.prediction_counts
            note = presence_note(p, r)
            legend.append(f"{run}: misses {describe_features(missing) if any(missing) else 'nothing'} of the reference, "
                          f"adds {describe_features(extra) if any(extra) else 'nothing'}" + (f"; {note}" if note else ""))
            marks = [(view.marks(features.reference_births, features.reference_deaths), REFERENCE_COLOUR, "missing"),
                     (view.marks(features.prediction_births, features.prediction_deaths), PREDICTION_COLOUR, "extra")]
        except ImportError:
            legend = ["topology engine not built: unmatched features not marked"]
        except MemoryError as err:
            legend.append(f"{run}: unmatched features not marked: {err}")
        panels.append(Panel(view.project(p), f"prediction {run}", marks))
    png = masks_figure(panels, _feature_names(), image=view.image, aspect=view.aspect, legend=legend,
                       suptitle=f"{case} - {label_name}")
    return png, legend, view.note


def _worst_section(summary: dict, labels: dict[str, str], images_dir: Path | None, ending: str | None,
                   connectivity: int | None, count: int) -> str:
    used, worst = _worst(summary, count)
    html = "<h2>Worst cases</h2>"
    if not any("metrics" in e for e in _entries(summary)):
        return html + "<p class=\"meta\">No case was evaluated.</p>"
    if not used:
        return html + "<p class=\"meta\">No topology metric was computed (see --metrics), so no case is pictured.</p>"
    named = " and ".join(used)
    if not worst:
        return html + f"<p class=\"meta\">Every case has {_page.esc(named)} 0: nothing to picture.</p>"
    metric = used[0]
    order = f"{used[0]}, then {used[1]}" if len(used) > 1 else metric
    html += (
        f"<p class=\"meta\">The {len(worst)} (case, label) pairs with the largest {_page.esc(order)}. Red: reference features "
        f"the prediction does not match (missing); blue: prediction features the reference does not match (extra). "
        f"{MARKERS_EXPLAINED}</p>"
    )
    for values, case, label, entry in worst:
        name = labels.get(label, f"label {label}")
        png, legend, note = _picture(entry, label, name, summary, images_dir, ending, connectivity)
        metrics = entry["metrics"][label]
        stem = metric[: -len("_error")]
        per_dim = [metrics[f"{stem}_{d}_error"] for d in range(3) if f"{stem}_{d}_error" in metrics]
        head = f"{case} \u00b7 {name} \u00b7 {metric} {_page.fmt(values[0])}"
        if per_dim:
            head += " (" + ", ".join(f"dim {d}: {_page.fmt(v)}" for d, v in enumerate(per_dim)) + ")"
        if len(used) > 1:
            head += f" \u00b7 {used[1]} {_page.fmt(values[1])}"
        html += picture_figure(png, f"{case} {name}: reference and prediction", case, label, head, legend, note)
    return html


def picture_figure(png: bytes | None, alt: str, case: str, label: str, head: str, legend: Sequence[str], note: str) -> str:
    """One pictured case as an HTML ``<figure>``: the picture (when there is one), its heading, legend lines and note."""
    picture = _page.img(png, alt) if png is not None else ""
    legend_html = "".join(f"<div class=\"legend\">{_page.esc(line)}</div>" for line in legend)
    return (
        f"<figure class=\"worst\" data-case=\"{_page.esc(case)}\" data-label=\"{_page.esc(label)}\">{picture}"
        f"<figcaption><div>{_page.esc(head)}</div>{legend_html}<div class=\"meta\">{_page.esc(note)}</div></figcaption></figure>"
    )


# --------------------------------------------------------------------------- entry points

def render_report(
    summary: dict,
    images_dir: str | Path | None = None,
    image_ending: str | None = None,
    connectivity: int | None = None,
    worst_cases: int = DEFAULT_WORST_CASES,
    title: str = "medseg evaluation",
) -> str:
    """The HTML text of the report of ``summary`` (a ``summary.json`` as a dict); see the module docstring."""
    images_dir = Path(images_dir) if images_dir is not None else None
    connectivity = connectivity if connectivity is not None else _connectivity_from(summary)
    labels = {str(k): str(v) for k, v in summary.get("labels", {}).items()}
    entries = _entries(summary)
    if not labels:
        labels = {k: f"label {k}" for e in entries for k in e.get("metrics", {})}
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{_page.esc(title)}</h1><p class=\"meta\">written {created} by medseg evaluate</p>", _run_section(summary)]
    body.append("<h2>Aggregates</h2>")
    for label, name in labels.items():
        rows_by_case = {_case_name(e): e["metrics"][label] for e in entries if label in e.get("metrics", {})}
        body.append(_aggregate_section(summary, label, name, rows_by_case))
        body.append(_distribution_section(label, name, rows_by_case))
    body.append(_case_table(summary, labels))
    body.append(_worst_section(summary, labels, images_dir, image_ending, connectivity, worst_cases))
    return _page.page(title, "\n".join(body))


def write_report(
    summary: dict | str | Path,
    path: str | Path,
    images_dir: str | Path | None = None,
    image_ending: str | None = None,
    connectivity: int | None = None,
    worst_cases: int = DEFAULT_WORST_CASES,
) -> Path:
    """Write ``report.html`` for an evaluation (atomically); returns its path.

    Parameters
    ----------
    summary : dict or path
        The evaluation: a ``summary.json`` written by ``medseg evaluate`` (or its dict).
    path : path
        The HTML file to write.
    images_dir : path, optional
        Folder of scans (``CASE_0000<ending>``) shown under the worst cases' masks.
    image_ending : str, optional
        File ending of the scans; default that of the reference files.
    connectivity : int, optional
        Connectivity of the evaluation (default: the one recorded in the summary).
    worst_cases : int
        How many (case, label) pairs are pictured.

    Raises
    ------
    DataError
        When ``summary`` is a file that cannot be read as a summary.
    """
    from medseg.atomic import write_atomic

    if not isinstance(summary, dict):
        summary = read_summary(summary)
    path = Path(path)
    write_atomic(path, render_report(summary, images_dir, image_ending, connectivity, worst_cases))
    return path


def rewrite_report(
    evaluation: str | Path,
    output: str | Path | None = None,
    images_dir: str | Path | None = None,
    worst_cases: int = DEFAULT_WORST_CASES,
) -> Path:
    """``medseg report html``: (re)write ``report.html`` from an evaluation folder or summary.json.

    Scans default to ``imagesTs`` next to the summary's reference folder, as in
    ``medseg evaluate``; the page goes next to ``summary.json`` unless ``output`` says otherwise.
    """
    from medseg.errors import ArgumentError

    check_report_options(images_dir, worst_cases)
    summary_path = find_summary(evaluation)
    if output is not None:  # the page replaces an HTML page, never the summary or another file
        output = Path(output)
        if output.is_dir():
            raise ArgumentError("output", "is a folder; name the .html file to write", output)
        if output.resolve() == summary_path.resolve():
            raise ArgumentError("output", "is the summary.json the report is made from", output)
        if output.is_file() and output.suffix.lower() not in (".html", ".htm"):
            raise ArgumentError("output", "exists and is not an HTML page; name a .html file", output)
    if images_dir is None:
        try:
            reference_folder = json.loads(summary_path.read_text()).get("reference_folder")
        except (OSError, ValueError, AttributeError):
            reference_folder = None
        if isinstance(reference_folder, str):
            images_dir = default_images_dir(reference_folder)
    return write_report(summary_path, output or summary_path.parent / "report.html",
                        images_dir=images_dir, worst_cases=worst_cases)

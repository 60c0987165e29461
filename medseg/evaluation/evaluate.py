"""``medseg evaluate``: predictions against references, per case and per label.

Cases are matched by name: ``REF_DIR/CASE<ending>`` is compared with
``PRED_DIR/CASE<ending>``. The registered per-label metrics
(:data:`medseg.evaluation.metrics.LABEL_METRICS`: Dice, IoU, HD95 and surface Dice in
mm, clDice, Betti number errors, Betti matching error, components, volumes; all, or
those chosen with ``metrics``) are computed for every foreground label. Results go to

* ``summary.json`` in nnU-Net's shape: ``metric_per_case`` (``reference_file``,
  ``prediction_file``, ``metrics: {label: {metric: value}}``), ``mean`` (per label,
  NaN-skipping mean over cases) and ``foreground_mean`` (mean of the per-label means),
  extended with ``statistics`` (per label and metric: mean, std, median, percentiles,
  number of undefined cases; :mod:`medseg.evaluation.aggregate`), ``conventions``
  (connectivity, filtration, units, tolerances, empty-mask rules), ``metrics_computed``,
  ``metrics_skipped`` (default metrics that cannot be computed here, with the reason,
  also printed), ``missing_predictions``, ``failed_cases``, ``empty_cases`` and
  ``provenance`` (:func:`medseg.provenance.provenance`: medseg, engine build, libraries,
  command line, host and time of the evaluation);
* ``metrics.csv``: one row per case and label, missing and failed cases included;
* ``report.html`` (:mod:`medseg.evaluation.report`): the same as one self-contained page
  with plots, a sortable per-case table and pictures of the worst cases.

A missing prediction is listed, never dropped; a case that cannot be evaluated
(unreadable file, shape or affine mismatch, not a label map) is reported with its
reason and the others are still evaluated. The run returns False if any case is
missing or failed, which the CLI turns into a non-zero exit code. An interrupted run
resumes: its finished cases are kept in ``OUTPUT/.evaluate_cases.jsonl``
(:class:`CaseJournal`) until the results are written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import check_output_folder, no_follow, remove_dead_temporaries, write_atomic_group
from medseg.errors import ArgumentError, DataError, MedsegError
from medseg.evaluation.pair import (
    AFFINE_TOLERANCE_MM,
    CONNECTIVITIES,
    label_masks,
    read_case_pair,
    read_label_map,
    undeclared_values,
)
from medseg.evaluation.summary import DEFAULT_TOLERANCE_MM, DEFAULT_WORST_CASES, SUMMARY_FILE, json_default
from medseg.provenance import provenance
from medseg.runfolder.lock import RunFolderLock

__all__ = ["run_evaluation", "evaluate_case", "find_cases", "AFFINE_TOLERANCE_MM"]



# --------------------------------------------------------------------------- labels

def _labels_from_json(path: Path) -> tuple[dict[int, str], int | None, str | None]:
    """Foreground labels ``{value: name}``, the ignore label and the file ending of a dataset.json."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: dataset.json not found") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable dataset.json ({type(err).__name__}: {err})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: no 'labels' mapping (expected e.g. {{\"background\": 0, \"vessel\": 1}})")
    if all(isinstance(v, str) for v in labels.values()) and all(str(k).strip().isdigit() for k in labels):
        labels = {name: int(value) for value, name in labels.items()}  # MSD form: {"0": "background", ...}
    foreground: dict[int, str] = {}
    ignore: int | None = None
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{path}: label '{name}' is a region {value}; medseg evaluate needs one value per label")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{path}: label '{name}' has value {value!r}, expected a non-negative integer")
        if name == "ignore":
            ignore = value
        elif value != 0:
            foreground[value] = name
    from medseg.data.io import SUPPORTED_ENDINGS

    ending = data.get("file_ending")
    if ending is not None and (not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS):
        raise DataError(f"{path}: key 'file_ending': {ending!r} is not one of {', '.join(SUPPORTED_ENDINGS)}")
    return dict(sorted(foreground.items())), ignore, ending


# --------------------------------------------------------------------------- cases

def find_cases(ref_dir: Path, ending: str | None = None) -> tuple[dict[str, Path], str]:
    """Reference files by case name, and the file ending used to match predictions."""
    from medseg.data.io import SUPPORTED_ENDINGS, ending_of, strip_ending

    if not ref_dir.is_dir():
        raise DataError(f"{ref_dir}: reference folder not found")
    files = [p for p in sorted(ref_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if ending is None:
        endings = sorted({ending_of(p) for p in files} & set(SUPPORTED_ENDINGS))
        if len(endings) > 1:
            raise DataError(
                f"{ref_dir}: reference files with several endings ({', '.join(endings)}); "
                "pass --dataset-json with 'file_ending'"
            )
        ending = endings[0] if endings else ".nii.gz"
    cases = {strip_ending(p, ending): p for p in files if p.name.lower().endswith(ending.lower())}
    if not cases:
        raise DataError(f"{ref_dir}: no reference files ending in {ending}")
    return cases, ending


def _label_values(path: Path) -> list[int]:
    array, _ = read_label_map(path)
    return [int(v) for v in np.unique(array) if v != 0]


def evaluate_case(
    pred_file: Path,
    ref_file: Path,
    labels: list[int],
    connectivity: int | None = None,
    ignore_label: int | None = None,
    metrics: list[str] | None = None,
    tolerance_mm: float | None = None,
) -> dict[str, dict[str, float]]:
    """The chosen metrics (default all) for every label of one case: ``{str(label): {metric: value}}``.

    ``metrics`` names registry entries (:func:`medseg.evaluation.metrics.resolve_metrics`);
    ``tolerance_mm`` is the surface Dice tolerance (default
    :data:`medseg.evaluation.summary.DEFAULT_TOLERANCE_MM`).

    Raises
    ------
    DataError
        A file is unreadable, the two differ in shape or affine (beyond
        :data:`AFFINE_TOLERANCE_MM`), or a file is not a label map.
    """
    return _evaluate_case(pred_file, ref_file, labels, connectivity, ignore_label, metrics, tolerance_mm)[0]


def _evaluate_case(pred_file, ref_file, labels, connectivity, ignore_label, metrics, tolerance_mm, declared=None):
    """:func:`evaluate_case` and the case's ``{"shape", "spacing"}``; ``declared``: the label
    values dataset.json declares (background and the ignore label included), checked in
    both files, or None when the labels were read from the files themselves."""
    from medseg.evaluation.metrics import MetricContext, compute_label_metrics

    pred, ref, ref_geometry = read_case_pair(pred_file, ref_file, connectivity)
    if declared is not None:
        for path, array in ((pred_file, pred), (ref_file, ref)):
            extra = undeclared_values(array, declared)
            if extra:
                raise DataError(f"{path}: label values {extra[:5]} are not declared in dataset.json")
    context = MetricContext(
        spacing=ref_geometry.spacing,
        connectivity=connectivity,
        tolerance_mm=DEFAULT_TOLERANCE_MM if tolerance_mm is None else float(tolerance_mm),
        ignored=int(np.count_nonzero(ref == ignore_label)) if ignore_label is not None else 0,
        voxel_size=ref_geometry.voxel_size,
    )
    result = {}
    for label in labels:
        pred_mask, ref_mask = label_masks(pred, ref, label, ignore_label)
        result[str(label)] = compute_label_metrics(pred_mask, ref_mask, context, metrics)
    info = {"shape": [int(n) for n in ref.shape], "spacing": [float(s) for s in ref_geometry.spacing]}
    return result, info


def _evaluate_job(case: str, pred_file: Path, ref_file: Path, labels, connectivity, ignore_label, metrics=None,
                  tolerance_mm=None, declared=None):
    """Worker entry point: never raises for bad input, returns ``(case, {"metrics", "shape", "spacing"}, error)``."""
    try:
        result, info = _evaluate_case(pred_file, ref_file, labels, connectivity, ignore_label, metrics, tolerance_mm,
                                      declared)
        return case, {"metrics": result, **info}, None
    except MedsegError as err:
        return case, None, str(err)
    except MemoryError:
        return case, None, f"{ref_file.name}: out of memory"
    except Exception as err:  # keep the batch going; the reason names the type
        return case, None, f"{ref_file.name}: {type(err).__name__}: {err}".split("\n")[0]


# --------------------------------------------------------------------------- running

def _worker_context():
    """Workers fork from a clean server process that imported the metrics once
    (:func:`medseg.process_pool.forkserver_context`)."""
    from medseg.process_pool import forkserver_context

    return forkserver_context(["medseg.evaluation.evaluate", "medseg.evaluation.metrics", "monai.metrics"])


def _map_cases(fn, jobs: list[tuple], workers: int, desc: str):
    """Yield ``fn(*job)`` for every job, in parallel processes when ``workers > 1``.

    ``fn`` returns ``(case, payload, error)`` and never raises; a job whose worker died
    alone (out of memory: medseg.process_pool) gives ``(job[0], None, reason)``, and the
    other jobs go on.
    """
    from medseg.process_pool import map_in_processes
    from medseg.progress import case_progress

    bar = case_progress(len(jobs), desc)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(*job)
                bar.update()
            return
        for index, value, error in map_in_processes(fn, jobs, workers, _worker_context(), what="cases"):
            yield value if error is None else (jobs[index][0], None, _died_reason(jobs[index], error))
            bar.update()
    finally:
        bar.close()


def _died_reason(job: tuple, error: BaseException) -> str:
    """Why a case's worker died: the error, and when the Betti matching error was asked
    for, its memory for the case's masks (read again here: the box of their foreground,
    as the metric sees it; metrics.matching_bytes)."""
    from medseg.evaluation.metrics import _union_box, matching_bytes

    reason = f"{error}".split("\n")[0]
    if len(job) < 7 or "betti_matching" not in job[6]:  # a label-values job, or no Betti matching
        return reason
    try:
        pred, ref = (np.asarray(read_label_map(Path(p))[0]) != 0 for p in (job[1], job[2]))
        shape = tuple(s.stop - s.start for s in _union_box(pred, ref))
    except Exception:  # the hint is a courtesy: the reason stands without it
        return reason
    return reason + (f"; its Betti matching error needs about {matching_bytes(shape) / 2**30:.1f} GB (the masks' "
                     f"bounding box of {'x'.join(map(str, shape))} voxels): leave it out with --metrics, or "
                     "evaluate on a machine with more memory")


def _values_of(path: Path) -> tuple[str, list[int] | None, str | None]:
    try:
        return str(path), _label_values(path), None
    except MedsegError as err:
        return str(path), None, str(err)
    except Exception as err:  # as _evaluate_job: report, do not stop
        return str(path), None, f"{path.name}: {type(err).__name__}: {err}".split("\n")[0]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _resolve_labels(dataset_json: Path | None, ref_dir: Path):
    """Labels, ignore label, ending and where they came from (dataset.json or the data)."""
    if dataset_json is not None:
        return (*_labels_from_json(Path(dataset_json)), str(dataset_json))
    candidate = ref_dir.parent / "dataset.json"
    if candidate.is_file():
        return (*_labels_from_json(candidate), str(candidate))
    return None, None, None, None


def run_evaluation(
    pred_dir: str | Path,
    ref_dir: str | Path,
    output: str | Path,
    dataset_json: str | Path | None = None,
    connectivity: int | None = None,
    workers: int = 2,
    metrics: str | list[str] | None = None,
    tolerance_mm: float | None = None,
    report: bool = True,
    images_dir: str | Path | None = None,
    worst_cases: int = DEFAULT_WORST_CASES,
) -> bool:
    """Evaluate every reference case; write ``summary.json``, ``metrics.csv`` and ``report.html`` to ``output``.

    Parameters
    ----------
    pred_dir, ref_dir : path
        Folders of predicted and reference label maps, matched by case name.
    output : path
        Folder for ``summary.json`` and ``metrics.csv`` (created; files replaced atomically).
    dataset_json : path, optional
        dataset.json whose ``labels`` are evaluated (``ignore`` excluded and masked
        out). Default: ``dataset.json`` in ``ref_dir``'s parent, else every label value
        present in the references or predictions.
    connectivity : int, optional
        Foreground connectivity for Betti numbers: 8 or 4 (2D), 26 or 6 (3D).
        Default full (8/26), as :func:`medseg.topology.betti_numbers`.
    workers : int
        Parallel processes (1 evaluates in this process).
    metrics : str or list of str, optional
        Metrics to compute, e.g. ``"dice,hd95,betti"`` (names of
        :data:`medseg.evaluation.metrics.LABEL_METRICS` or their aliases). Default all;
        HD95, surface Dice, clDice and the Betti matching error are the costly ones.
    tolerance_mm : float, optional
        Tolerance of the normalised surface Dice in mm (default
        :data:`~medseg.evaluation.summary.DEFAULT_TOLERANCE_MM`).
    report : bool
        Also write ``report.html`` (:func:`medseg.evaluation.report.write_report`).
    images_dir : path, optional
        Scans shown under the worst cases' masks (``CASE_0000<ending>``). Default:
        ``imagesTs`` next to a ``labelsTs`` reference folder (``imagesXx`` for
        ``labelsXx``) when it exists; else the pictures show the masks only.
    worst_cases : int
        How many (case, label) pairs with the largest Betti matching error are pictured.

    Returns
    -------
    bool
        True if every reference case had a prediction and was evaluated.

    Raises
    ------
    DataError
        A folder is missing or empty, dataset.json is unusable, ``output`` (or a
        folder above it) is a file, no case could be evaluated (every prediction
        missing or every case failed: nothing is written, an earlier evaluation in
        ``output`` stays), or without dataset.json no file holds a foreground value.
    MedsegError
        A connectivity that is not 4, 6, 8 or 26, or one that fits no reference's
        dimension (26 for 2D masks; refused before any case is evaluated), an unknown
        metric name, a metric named in
        ``metrics`` that cannot be computed here (e.g. ``betti_matching`` without the
        topology engine; by default such a metric is skipped, and the summary says
        why), a tolerance that is not positive.
    """
    from medseg.evaluation.aggregate import STATISTICS_CONVENTION
    from medseg.evaluation.metrics import (
        CONVENTIONS,
        matching_construction,
        resolve_metrics,
        unavailable_metrics,
    )

    from medseg.evaluation.report import check_report_options

    pred_dir, ref_dir, output = Path(pred_dir), Path(ref_dir), Path(output)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ArgumentError("workers", "must be at least 1", workers)
    check_report_options(images_dir, worst_cases)
    if connectivity is not None and connectivity not in (4, 6, 8, 26):
        raise ArgumentError("connectivity", "use 8 or 4 for 2D images, 26 or 6 for 3D", connectivity)
    check_output_folder(output, "output", argument=True)  # before the cases are evaluated, not after
    chosen = resolve_metrics(metrics, "metrics", argument=True)  # a metric named here that cannot be computed is an error
    skipped = unavailable_metrics(chosen)  # so only defaults are left to skip, with the reason
    chosen = [name for name in chosen if name not in skipped]
    tolerance_mm = DEFAULT_TOLERANCE_MM if tolerance_mm is None else float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm > 0):
        raise ArgumentError("tolerance_mm", "the surface Dice tolerance must be a positive number of mm", tolerance_mm)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    label_names, ignore_label, ending, label_source = _resolve_labels(
        Path(dataset_json) if dataset_json is not None else None, ref_dir
    )
    references, ending = find_cases(ref_dir, ending)
    _check_output_outside_references(output, ref_dir)
    if connectivity is not None:
        _check_connectivity_fits(connectivity, references)

    # one evaluation at a time per output folder: two at once mixed their files (one's
    # summary.json beside the other's metrics.csv); taken once the arguments are checked
    lock = RunFolderLock(output, "--output")
    lock.take()
    try:
        missing = {case: pred_dir / f"{case}{ending}" for case in references if not (pred_dir / f"{case}{ending}").is_file()}
        present = [case for case in references if case not in missing]
        from medseg.inference.predict import PROBABILITY_SUFFIX

        unmatched = sorted(
            f.name for f in pred_dir.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.name.endswith(ending) and f.name[: -len(ending)] not in references
            and not f.name.endswith(PROBABILITY_SUFFIX)  # medseg predict --save-probabilities writes them beside
        )
        if unmatched:  # a typo in a name shows up here, not just as a missing prediction
            shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
            print(f"medseg: {len(unmatched)} prediction(s) without a reference, not evaluated: {shown}", file=sys.stderr)
        failed: dict[str, str] = {}

        declared = None  # with dataset.json's labels, a value it does not declare fails the case
        if label_names is not None:
            declared = {0, *(int(v) for v in label_names), *([int(ignore_label)] if ignore_label is not None else [])}
        if label_names is None:  # no dataset.json: every label value found in the files
            values: set[int] = set()
            files = [references[c] for c in present] + [pred_dir / f"{c}{ending}" for c in present]
            bad: dict[str, str] = {}
            for path, found, error in _map_cases(_values_of, [(p,) for p in files], workers, "labels"):
                if error is None:
                    values.update(found)
                else:
                    bad[path] = error
            for case in present:
                for path in (str(references[case]), str(pred_dir / f"{case}{ending}")):
                    if path in bad and case not in failed:
                        failed[case] = bad[path]
            if not values and len(failed) < len(present):
                # nothing to score: a summary of no label would read as a successful evaluation
                raise DataError(f"{ref_dir}: no foreground label value in the references or predictions, and no "
                                f"dataset.json beside them; name the labels with --dataset-json")
            label_names = {v: f"label_{v}" for v in sorted(values)}
            label_source = "label values present in the files"
        labels = list(label_names)

        jobs = [
            (case, pred_dir / f"{case}{ending}", references[case], labels, connectivity, ignore_label, chosen, tolerance_mm,
             declared)
            for case in present
            if case not in failed
        ]
        per_case: dict[str, dict] = {}
        case_info: dict[str, dict] = {}
        journal = CaseJournal(output)
        keys = {job[0]: journal.key(*job[1:]) for job in jobs}
        for case, key in keys.items():
            payload = journal.finished.get((case, key))
            if payload is not None:
                per_case[case] = payload["metrics"]
                case_info[case] = {"shape": payload["shape"], "spacing": payload["spacing"]}
        if per_case:
            print(f"medseg: resuming: {len(per_case)} of {len(jobs)} case(s) already evaluated by an interrupted run "
                  f"({journal.path.name} in {output})", file=sys.stderr)
        todo = [job for job in jobs if job[0] not in per_case]
        for case, payload, error in _map_cases(_evaluate_job, todo, workers, "evaluate"):
            if error is None:
                per_case[case] = payload["metrics"]
                case_info[case] = {"shape": payload["shape"], "spacing": payload["spacing"]}
                journal.add(case, keys[case], payload)
            else:
                failed[case] = error
        per_case = {job[0]: per_case[job[0]] for job in jobs if job[0] in per_case}  # the references' order
        problems = [f"missing prediction for case {case} ({path})" for case, path in missing.items()]
        problems += [f"case {case} failed: {error}" for case, error in sorted(failed.items())]
        if per_case:  # else the error below counts them and names the first
            for problem in problems[:MAX_LISTED_PROBLEMS]:
                print(f"medseg: {problem}", file=sys.stderr)
            if len(problems) > MAX_LISTED_PROBLEMS:
                print(f"medseg: ... and {len(problems) - MAX_LISTED_PROBLEMS} more (summary.json lists every "
                      "missing and failed case)", file=sys.stderr)
        if not per_case:
            # a summary of no case would replace a good evaluation in this folder with nothing
            raise DataError(f"{pred_dir}: no case could be evaluated ({len(missing)} missing, {len(failed)} failed; "
                            f"first: {problems[0]}); nothing written to {output}")
        if label_source == "label values present in the files":
            # said, since an ignore label is then scored as a class (vessel Dice 0.55 for 0.86)
            full_range = (" (255 or 65535: masks saved at full range, 0/255, are read as class 255, not 1; "
                          "data_scripts/convert_2d.py maps PNG/TIFF ones to 0/1, and a --dataset-json naming the "
                          "foreground 255 scores them as one class)") if {255, 65535} & set(labels) else ""
            print(f"medseg: warning: no dataset.json beside {ref_dir} (looked for {ref_dir.parent / 'dataset.json'}): "
                  f"every label value found ({', '.join(map(str, labels))}) is scored as a class{full_range}; "
                  "--dataset-json names the labels and the ignore label", file=sys.stderr)

        dims = {len(info["shape"]) for info in case_info.values()}
        if connectivity is None:
            conn_desc: Any = "full (8 in 2D, 26 in 3D)" if len(dims) != 1 else {2: 8, 3: 26}[next(iter(dims))]
        else:
            conn_desc = connectivity
        # 2D cases' volumes are areas (the columns keep their *_mm3 names: one schema for both)
        volume_units = {frozenset({2}): "mm^2 (areas of 2D images, in the *_mm3 columns)",
                        frozenset({3}): "mm^3"}.get(frozenset(dims), "mm^3 for 3D cases, mm^2 for 2D cases")
        hd95_units = "mm"
        from medseg.data.io import NATURAL_IMAGE_ENDINGS

        if ending in NATURAL_IMAGE_ENDINGS:  # no spacing in the files: distances are in pixels, not mm
            hd95_units = (f"pixels ({ending} files store no spacing: a pixel is 1; the surface Dice tolerance "
                          "is in pixels too)")
            volume_units = "pixels (areas of 2D images without spacing, in the *_mm3 columns)"
        conventions = {
            "connectivity": conn_desc,
            "filtration": "superlevel of the binary masks (foreground enters first), cubical construction "
            f"{matching_construction(connectivity)} ({'closed voxel cubes' if matching_construction(connectivity) == 'T' else 'voxels as vertices'})",
            "hd95_units": hd95_units,
            "nsd_tolerance_mm": tolerance_mm,
            "volume_units": volume_units,
            "statistics": STATISTICS_CONVENTION,
            **CONVENTIONS,
        }
        summary = _summary(
            references, pred_dir, ending, per_case, missing, failed, label_names, ignore_label, label_source,
            conventions=conventions, case_info=case_info,
        )
        summary["metrics_computed"] = chosen
        summary["metrics_skipped"] = skipped
        # absolute: the pages are drawn again (report html, report compare) from other folders
        summary["reference_folder"] = _absolute(ref_dir)
        summary["prediction_folder"] = _absolute(pred_dir)
        summary["provenance"] = provenance("cpu")  # what computed it (medseg.runfolder.provenance)
        output.mkdir(parents=True, exist_ok=True)
        # what a killed evaluation left (.summary.json.HOST-PID.tmp, ...); a live writer's is kept
        remove_dead_temporaries(output, names=(SUMMARY_FILE, "metrics.csv", "report.html"))
        results = {
            output / SUMMARY_FILE: json.dumps(summary, indent=2, default=json_default) + "\n",
            output / "metrics.csv": _csv(references, pred_dir, ending, per_case, missing, failed, label_names),
        }
        # The results are written before the page is drawn, so that a page that cannot be
        # drawn or written (its pictures run out of memory, the disk fills, the command is
        # killed meanwhile) loses no evaluation: it used to be drawn first and written with
        # them, all or none. An earlier evaluation's page goes first, so that it never
        # stands beside these results. The summary and the table are one group: a full
        # disk replaces neither.
        page = output / "report.html"
        page.unlink(missing_ok=True)
        write_atomic_group(results)
        journal.remove()  # the results hold every case now
        written = [path.name for path in results]
        page_error = None
        if report:
            try:
                _write_page(summary, page, ref_dir, images_dir, ending, connectivity, worst_cases)
                written.append(page.name)
            except MedsegError as err:  # said after the results' line
                page_error = err

        fg = summary["foreground_mean"]
        headline = ", ".join(f"{k} {fg[k]:.4f}" for k in ("Dice", "betti_matching_error", "betti_error") if k in fg)
        print(
            f"medseg: evaluated {len(per_case)}/{len(references)} cases"
            + (f", foreground mean {headline}" if headline else "")
            + f"; {len(missing)} missing, {len(failed)} failed; results in {output} ({', '.join(written)})"
        )
        reasons: dict[str, list[str]] = {}
        for name, reason in skipped.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            print(f"medseg: skipped metric(s) {', '.join(names)}: {reason}")
        if page_error is not None:
            raise page_error
        return not missing and not failed
    finally:
        lock.release()


def _absolute(path: Path) -> str:
    """A path as summary.json and metrics.csv store it: absolute (not resolved: links kept),
    so that a page drawn again from another folder finds the masks and scans (relative
    paths, stored as typed, left every picture "unavailable")."""
    import os

    return os.path.abspath(path)


#: Missing or failed cases listed one per line; the rest are counted (summary.json names all).
MAX_LISTED_PROBLEMS = 10


class CaseJournal:
    """The cases an evaluation has finished, one JSON line each in ``OUTPUT/.evaluate_cases.jsonl``,
    so that a rerun after an interruption (Ctrl-C, a kill, a reboot) evaluates only the
    cases left: a 3D case's HD95 and Betti matching take seconds to minutes, and an
    interrupted evaluation of a hundred of them used to start again from the first.

    A line is reused only for the same case, the same two files (path, size and
    modification time: ``medseg predict`` replaces a file by renaming a new one over it)
    and the same options and medseg version (:meth:`key`). Only the process holding the
    output folder's lock writes it, a line at a time; a line cut short by a kill is
    skipped. Failed cases are not recorded (they are tried again). The file is removed
    once ``summary.json`` and ``metrics.csv`` hold every case.
    """

    NAME = ".evaluate_cases.jsonl"

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / self.NAME
        self.finished: dict[tuple[str, str], dict] = {}
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            text = ""
        except (OSError, UnicodeDecodeError) as err:  # unreadable: start afresh, say why
            print(f"medseg: warning: {self.path}: {err}; every case is evaluated again", file=sys.stderr)
            text = ""
        self._cut_short = bool(text) and not text.endswith("\n")  # the next line must not join that one
        lines = text.splitlines()
        for line in lines:
            try:
                entry = json.loads(line)
                self.finished[(entry["case"], entry["key"])] = {k: entry[k] for k in ("metrics", "shape", "spacing")}
            except (ValueError, KeyError, TypeError):  # the line a kill cut short
                continue

    @staticmethod
    def key(pred_file: Path, ref_file: Path, *options) -> str:
        """SHA-256 of the two files' identity and every option of :func:`_evaluate_case`."""
        import hashlib

        from medseg import __version__

        def identity(path: Path):
            try:
                stat = Path(path).stat()
            except OSError:
                return [str(path), None, None]
            return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]

        options = [sorted(o) if isinstance(o, (set, frozenset)) else o for o in options]
        text = json.dumps([__version__, identity(pred_file), identity(ref_file), options], default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, case: str, key: str, payload: dict) -> None:
        """Append one finished case (flushed, so that a kill after it keeps it)."""
        entry = {"case": case, "key": key, **{k: payload[k] for k in ("metrics", "shape", "spacing")}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", opener=no_follow) as handle:
                handle.write(("\n" if self._cut_short else "") + json.dumps(entry, default=json_default) + "\n")
            self._cut_short = False
        except OSError:  # the journal only saves time: a full disk must not fail the evaluation
            pass

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _check_connectivity_fits(connectivity: int, references: dict) -> None:
    """Refuse a ``--connectivity`` that fits no reference's dimension (26 for 2D masks),
    from the files' headers, before any case is evaluated: every case failed with the
    same line."""
    from medseg.data.io import read_geometry

    first = None
    for path in references.values():
        try:
            ndim = read_geometry(path)[1].ndim
        except DataError:
            continue  # reported with its case
        if connectivity in CONNECTIVITIES.get(ndim, ()):
            return
        first = first or (path, ndim)
    if first is not None:
        path, ndim = first
        raise ArgumentError("connectivity", f"does not fit the {ndim}D references (first: {path}); use "
                            f"{' or '.join(map(str, CONNECTIVITIES[ndim]))}", connectivity)


def _check_output_outside_references(output: Path, ref_dir: Path) -> None:
    """Refuse an ``--output`` in the reference folder or in a dataset's ``images*`` /
    ``labels*`` folder (``ref_dir``'s dataset: its parent when it holds a dataset.json): a
    dataset is only ever read, and the results would lie among its cases. (The
    prediction folder is allowed: nnU-Net writes its summary.json there.)

    Raises
    ------
    ArgumentError
        Naming ``--output`` and the folder it lies in.
    """
    from medseg.data.dataset import dataset_data_folder

    place, ref = output.resolve(), ref_dir.resolve()
    if place == ref or place.is_relative_to(ref):
        raise ArgumentError("output", f"lies in the reference folder {ref_dir}; choose a folder outside it", output)
    if (ref.parent / "dataset.json").is_file() and (inner := dataset_data_folder(place, ref.parent)) is not None:
        raise ArgumentError("output", f"lies in the dataset's {inner} folder ({ref.parent / inner}); a dataset is "
                            "only read: choose a folder outside it", output)


def _write_page(summary: dict, page: Path, ref_dir: Path, images_dir, ending: str, connectivity, worst_cases: int):
    """Draw and write ``report.html`` of an evaluation whose results are written already.

    Raises
    ------
    MedsegError
        The page could not be drawn (out of memory) or written (a full or read-only
        disk): one line that says the results are kept and how to draw the page again.
    """
    from medseg.atomic import storage_error, write_atomic
    from medseg.evaluation.report import default_images_dir, render_report

    images = Path(images_dir) if images_dir is not None else default_images_dir(ref_dir)
    again = f"the results are in {page.parent / SUMMARY_FILE} and metrics.csv; `medseg report html {page.parent}` draws the page"
    try:
        write_atomic(page, render_report(summary, images, ending, connectivity, worst_cases))
    except MemoryError as err:
        raise MedsegError(f"{page}: not drawn, out of memory ({err or 'MemoryError'}); {again} "
                          "(--worst-cases 0 draws no pictures)") from None
    except OSError as err:
        cause = storage_error(err, page)
        if cause is None:
            raise
        raise MedsegError(f"{page}: not written ({cause.strerror}); {again} once there is room") from None


def _summary(
    references, pred_dir, ending, per_case, missing, failed, label_names, ignore_label, label_source, conventions,
    case_info=None,
):
    from medseg.evaluation.aggregate import describe

    # the cases in the references' order, not the workers' completion order: a float sum
    # depends on its order, and the same evaluation must give the same bytes every time
    per_case = {case: per_case[case] for case in references if case in per_case}
    metric_per_case = []
    for case, ref_file in references.items():
        entry = {
            "reference_file": _absolute(ref_file),
            "prediction_file": _absolute(pred_dir / f"{case}{ending}"),
            "case": case,
        }
        if case in per_case:
            entry["metrics"] = {label: {k: json_default(v) for k, v in m.items()} for label, m in per_case[case].items()}
            entry.update((case_info or {}).get(case, {}))
        else:
            entry["status"] = "missing" if case in missing else "failed"
            if case in failed:
                entry["error"] = failed[case]
        metric_per_case.append(entry)

    mean: dict[str, dict[str, float]] = {}
    statistics: dict[str, dict[str, dict[str, float]]] = {}
    empty: dict[str, dict[str, list[str]]] = {}
    for label in label_names:
        key = str(label)
        rows = [per_case[c][key] for c in per_case if key in per_case[c]]
        names = sorted({k for r in rows for k in r})
        mean[key] = {k: _nanmean([r.get(k, math.nan) for r in rows]) for k in names}
        statistics[key] = {k: describe(r.get(k, math.nan) for r in rows) for k in names}
        empty[key] = {
            "reference_and_prediction_empty": sorted(c for c in per_case if per_case[c][key]["n_ref"] == 0 and per_case[c][key]["n_pred"] == 0),
            "reference_empty": sorted(c for c in per_case if per_case[c][key]["n_ref"] == 0),
        }
    metric_names = sorted({k for m in mean.values() for k in m})
    foreground_mean = {k: _nanmean([mean[l].get(k, math.nan) for l in mean]) for k in metric_names}
    return {
        "metric_per_case": metric_per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "statistics": statistics,
        "labels": {str(v): name for v, name in label_names.items()},
        "label_source": label_source,
        "ignore_label": ignore_label,
        "conventions": conventions,
        "num_cases": len(references),
        "num_evaluated": len(per_case),
        "missing_predictions": sorted(missing),
        "failed_cases": dict(sorted(failed.items())),
        "empty_cases": empty,
    }


def _csv(references, pred_dir, ending, per_case, missing, failed, label_names) -> str:
    metric_names: list[str] = []
    for metrics in per_case.values():
        for m in metrics.values():
            metric_names.extend(k for k in m if k not in metric_names)
    fields = ["case", "label", "label_name", "status", "reference_file", "prediction_file", *metric_names, "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for case, ref_file in references.items():
        status = "ok" if case in per_case else "missing" if case in missing else "failed"
        for label, name in label_names.items():
            row = {
                "case": case, "label": label, "label_name": name, "status": status,
                "reference_file": _absolute(ref_file), "prediction_file": _absolute(pred_dir / f"{case}{ending}"),
                "error": failed.get(case, ""),
            }
            if status == "ok":
                row.update(per_case[case][str(label)])
            writer.writerow(row)
        if not label_names:
            writer.writerow({"case": case, "status": status, "reference_file": _absolute(ref_file),
                             "prediction_file": _absolute(pred_dir / f"{case}{ending}"), "error": failed.get(case, "")})
    return buffer.getvalue()

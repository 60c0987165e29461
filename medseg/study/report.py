"""The study's outputs: ``study.json``, ``study.csv``, ``study.html`` and a table in the terminal.

* ``study.json``: :func:`medseg.study.summary.summarize` as it is (per-case values included).
* ``study.csv``: one row per test folder, label and variant; per metric four columns:
  ``METRIC`` (mean), ``METRIC_std`` (over seeds), ``METRIC_p`` (permutation test against
  the baseline) and ``METRIC_mark`` (``*`` when better than the baseline with p < alpha);
  then the training time per step and the peak memory of the variant.
* ``study.html``: self-contained (:mod:`medseg.evaluation._page`): per test folder a
  table (mean ± std over seeds; ★ and bold for TopoMortar's mark, the p-value under each
  cell) and box/strip plots of the per-case values of every variant; the training
  resources per variant; every run with its status.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from medseg.evaluation import _page
from medseg.study.config import Study

__all__ = ["write_outputs", "format_table", "render_csv", "render_html", "variant_figure", "MARK"]

MARK = "*"  # better than the baseline and p < alpha, in the CSV and the terminal (★ in HTML)
_STAR = "\u2605"


def _fmt(value: Any, digits: int = 3) -> str:
    """``digits`` significant digits (:func:`medseg.evaluation._page.fmt`)."""
    return _page.fmt(value, digits)


def _mean_std(cell: dict[str, Any]) -> str:
    text = _fmt(cell["mean"])
    return text if not math.isfinite(cell["std_seeds"]) else f"{text} ± {_fmt(cell['std_seeds'], 2)}"


def _tables(summary: dict[str, Any]):
    """``(test, label, label_name, {variant: {metric: cell}})`` for every table."""
    for test, labels in summary["results"].items():
        for label, entry in labels.items():
            yield test, label, entry["name"], entry["variants"]


def _marked(cell: dict[str, Any]) -> bool:
    return bool(cell.get("vs_baseline") and cell["vs_baseline"]["significant"])


# --------------------------------------------------------------------------- terminal and CSV

def format_table(summary: dict[str, Any]) -> str:
    """Mean ± std over seeds per test folder, label and variant; ``*`` marks TopoMortar's "better, p < alpha"."""
    metrics = summary["metrics"]
    lines = [f"{len(summary['seeds'])} seed(s) planned; baseline {summary['baseline']}; {MARK}: better than the baseline "
             f"with permutation p < {summary['alpha']}"]
    for test, label, name, rows in _tables(summary):
        lines += ["", f"{test} ({name})"]
        table = [["variant", "seeds", *metrics]]
        for variant, cells in rows.items():
            seeds = max((cells[m].get("n_seeds", 0) for m in metrics), default=0)  # finished so far
            table.append([variant, str(seeds)] + [_mean_std(cells[m]) + (MARK if _marked(cells[m]) else "") for m in metrics])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for i, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_csv(summary: dict[str, Any]) -> str:
    """One row per test folder, label and variant (see the module docstring)."""
    metrics = summary["metrics"]
    fields = ["test", "label", "label_name", "variant", "seeds"]
    for m in metrics:
        fields += [m, f"{m}_std", f"{m}_p", f"{m}_mark"]
    fields += ["seconds_per_step", "peak_rss_mib", "peak_cuda_mib"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for test, label, name, rows in _tables(summary):
        for variant, cells in rows.items():
            resources = summary["resources"][variant]
            row: dict[str, Any] = {
                "test": test, "label": label, "label_name": name, "variant": variant,
                "seeds": max((cells[m]["n_seeds"] for m in metrics), default=0),
                "seconds_per_step": resources["seconds_per_step"], "peak_rss_mib": resources["peak_rss_mib"],
                "peak_cuda_mib": resources["peak_cuda_mib"],
            }
            for m in metrics:
                cell = cells[m]
                test_result = cell.get("vs_baseline") or {}
                row.update({m: cell["mean"], f"{m}_std": cell["std_seeds"], f"{m}_p": test_result.get("permutation_p", ""),
                            f"{m}_mark": MARK if _marked(cell) else ""})
            writer.writerow(row)
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTML

def variant_figure(values: dict[str, dict[str, Sequence[float]]], title: str = "", columns: int = 3) -> bytes:
    """Per metric, a box plot and the per-case values (jittered) of every variant (PNG bytes).

    ``values[metric][variant]`` are the (case, seed) values; NaN values are left out.
    """
    from medseg.evaluation.plots import _pyplot, literal, png_bytes

    plt = _pyplot()
    names = list(values)
    columns = max(1, min(columns, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    variants = list(dict.fromkeys(v for m in values.values() for v in m))
    fig, axes = plt.subplots(rows, columns, figsize=(max(3.2, 0.9 * len(variants) + 1.2) * columns, 2.9 * rows), squeeze=False)
    rng = np.random.default_rng(0)  # the same jitter every time
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, metric in zip(axes.ravel(), names):
        for i, variant in enumerate(variants, start=1):
            data = np.asarray(values[metric].get(variant, []), dtype=float)
            data = data[np.isfinite(data)]
            if not data.size:
                continue
            ax.boxplot(data, positions=[i], widths=0.55, showfliers=False, medianprops={"color": "#c92a2a"})
            ax.scatter(i + rng.uniform(-0.15, 0.15, data.size), data, s=9, alpha=0.6, color="#1864ab", linewidths=0, zorder=3)
        ax.set_xticks(range(1, len(variants) + 1))
        ax.set_xticklabels([literal(v) for v in variants], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(0.4, len(variants) + 0.6)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(literal(title), fontsize=11)
    fig.tight_layout()
    return png_bytes(fig)


def _html_cell(cell: dict[str, Any], std_digits: int = 2) -> str:
    text = _page.esc(_mean_std(cell))
    result = cell.get("vs_baseline")
    tip = f"std over (case, seed) values {_fmt(cell['std_cases'])}; {cell['n']} values from {cell['n_seeds']} seed(s)"
    if result:
        tip += (f"; vs baseline: mean difference {_fmt(result['mean_difference'])}, permutation p "
                f"{_fmt(result['permutation_p'])}, Wilcoxon p {_fmt(result['wilcoxon_p'])}, n {result['n']}")
    if _marked(cell):
        text = f"<b>{text} {_STAR}</b>"
    below = f"<br><span style=\"color:#868e96;font-size:11px\">p {_page.esc(_fmt(result['permutation_p']))}</span>" if result else ""
    return _page.cell(cell["mean"], raw=f"<span title=\"{_page.esc(tip)}\">{text}</span>{below}")


def render_html(summary: dict[str, Any]) -> str:
    """``study.html`` (see the module docstring)."""
    metrics = summary["metrics"]
    body = [
        "<h1>medseg study</h1>",
        "<p class=\"meta\">"
        f"study <code>{_page.esc(summary['study'])}</code>, base config <code>{_page.esc(summary['base'])}</code>, "
        f"written {_page.esc(summary['written'])}<br>"
        f"variants: {_page.esc(', '.join(summary['variants']))} (baseline <b>{_page.esc(summary['baseline'])}</b>); "
        f"seeds: {_page.esc(', '.join(map(str, summary['seeds'])))}"
        + (f"; --set {_page.esc(' '.join(summary['command_line_set']))}" if summary["command_line_set"] else "")
        + f"<br>{_STAR} (bold): better than the baseline with permutation p &lt; {_page.esc(summary['alpha'])}. "
        "Cells: mean ± std over seeds; the p-value of the test against the baseline under it; hover for more.<br>"
        f"{_page.esc(summary['statistics'])}</p>",
    ]
    for test, label, name, rows in _tables(summary):
        spec = summary["tests"][test]
        body.append(f"<h2>{_page.esc(test)}: {_page.esc(name)}</h2>")
        body.append(f"<p class=\"meta\">images <code>{_page.esc(spec['images'])}</code>, labels "
                    f"<code>{_page.esc(spec['labels'])}</code></p>")
        table_rows = []
        for variant, cells in rows.items():
            seeds = max((cells[m]["n_seeds"] for m in metrics), default=0)
            table_rows.append([_page.cell(variant), _page.cell(seeds)] + [_html_cell(cells[m]) for m in metrics])
        body.append(_page.table(["variant", "seeds", *metrics], table_rows, table_id=f"study-{test}-{label}", sortable=True))
        values = {m: {v: [x[2] for x in cells[m]["values"]] for v, cells in rows.items()} for m in metrics}
        if any(values[m][v] for m in metrics for v in values[m]):
            png = variant_figure(values, title=f"{test}: per-case values (all seeds)")
            body.append(f"<figure>{_page.img(png, f'per-case metric distributions on {test}')}"
                        "<figcaption>Box: quartiles and median of the (case, seed) values; points: the values.</figcaption></figure>")
    body.append("<h2>Training resources</h2>")
    resource_rows = []
    for variant, r in summary["resources"].items():
        per_step = _fmt(r["seconds_per_step"]) + (f" ± {_fmt(r['seconds_per_step_std'], 2)}" if math.isfinite(r["seconds_per_step_std"]) else "")
        resource_rows.append([_page.cell(variant), _page.cell(r["runs"]), _page.cell(r["seconds_per_step"], raw=_page.esc(per_step)),
                              _page.cell(r["peak_rss_mib"]), _page.cell(r["peak_cuda_mib"])])
    body.append(_page.table(["variant", "runs", "seconds per step (mean ± std over seeds)", "peak RSS (MiB)",
                             "peak CUDA memory (MiB)"], resource_rows))
    body.append("<p class=\"meta\">Seconds per step: wall time of each training call divided by the iterations it "
                "trained (data preparation and validation included). Peak RSS: the training process (data loader "
                "workers not included); CUDA: peak memory allocated by torch. Peaks are the largest over the seeds.</p>")
    body.append("<h2>Runs</h2>")
    run_rows = [
        [_page.cell(r["run"]), _page.cell(r["status"]), _page.cell(r["seconds_per_step"]), _page.cell(r["peak_rss_mib"]),
         _page.cell(r["peak_cuda_mib"]), _page.cell(r["run_dir"], cls="text"), _page.cell(r["error"] or "", cls="text")]
        for r in summary["runs"]
    ]
    body.append(_page.table(["run", "status", "s/step", "peak RSS (MiB)", "peak CUDA (MiB)", "folder", "error"], run_rows,
                            row_classes=["" if r["status"] == "finished" else "bad" for r in summary["runs"]]))
    return _page.page("medseg study", "\n".join(body))


@contextmanager
def _summary_lock(folder: Path) -> Iterator[None]:
    """One summary at a time in a study folder (``.study_summary.lock``, flock: waits its
    turn). A ``--summary`` that read the runs before the study's last one finished, and
    wrote after the study's own summary, left the finished study reported as unfinished;
    and the three files of two writers could come from different moments."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".study_summary.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_outputs(study: Study) -> dict[str, Any]:
    """Summarise the study, write ``study.json``, ``study.csv`` and ``study.html``, print the table."""
    from medseg.atomic import write_atomic_group
    from medseg.evaluation.summary import strict_json
    from medseg.study.summary import summarize

    out = study.output_dir
    with _summary_lock(out):  # the runs read and the three files written as one
        summary = summarize(study)
        write_atomic_group({out / "study.json": strict_json(summary), out / "study.csv": render_csv(summary),
                            out / "study.html": render_html(summary)})
    print(format_table(summary))
    print(f"medseg study: wrote {out / 'study.json'}, {out / 'study.csv'} and {out / 'study.html'}", file=sys.stderr)
    return summary

"""report.html: one row per case, embedded pictures, legends that say what is unmatched."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from medseg.data.io import ImageGeometry, write_image
from medseg.evaluation.evaluate import run_evaluation
from medseg.evaluation.report import describe_features, legend_lines, presence_note, unmatched_features, write_report


class _Tables(HTMLParser):
    """Rows of each table's tbody by table id, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.figures: list[dict] = []
        self._table = None
        self._in_body = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", "")
            self.rows.setdefault(self._table, [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "figure" and "data-case" in attrs:
            self.figures.append(attrs)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[self._table][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def _ring_case():
    """A reference with 3 components and 1 loop; the prediction keeps only the first square."""
    ref = np.zeros((20, 20), np.uint8)
    ref[2:6, 2:6] = 1  # kept
    ref[2:6, 12:16] = 1  # missed component
    ref[11:17, 4:10] = 1
    ref[13:15, 6:8] = 0  # missed ring: a component and a loop
    pred = np.zeros_like(ref)
    pred[2:6, 2:6] = 1
    return pred, ref


def test_describe_features():
    assert describe_features([2, 1]) == "2 components and 1 loop"
    assert describe_features([0, 0, 1]) == "1 cavity"
    assert describe_features([1, 2, 3]) == "1 component, 2 loops and 3 cavities"
    assert describe_features([0, 0]) == "no feature"


def test_unmatched_features_of_a_constructed_case():
    pred, ref = _ring_case()
    features = unmatched_features(pred, ref)
    assert features.reference_counts == [2, 1] and features.prediction_counts == [0, 0]
    assert legend_lines(features) == [
        "reference: 2 components and 1 loop not matched in the prediction",
        "prediction: every feature matched in the reference",
    ]
    births = features.reference_births
    assert all(ref[tuple(c)] == 1 for c in births[0])  # components are born on the reference's foreground
    assert {int(c[1]) >= 12 or int(c[0]) >= 11 for c in births[0]} == {True}  # in the missed parts, not the kept square
    loop_death = features.reference_deaths[1][0]
    assert (13 <= loop_death[0] < 15 and 6 <= loop_death[1] < 8)  # the loop dies in its hole


def _evaluate_2d(tmp_path, cases: dict, missing=()):
    ref_dir, pred_dir, out = tmp_path / "labelsTs", tmp_path / "pred", tmp_path / "eval"
    for name, (pred, ref) in cases.items():
        geometry = ImageGeometry.identity(ref.shape)
        write_image(ref_dir / f"{name}.nii.gz", ref, geometry)
        if name not in missing:
            write_image(pred_dir / f"{name}.nii.gz", pred, geometry)
    ok = run_evaluation(pred_dir, ref_dir, out, workers=1)
    return ok, out


def test_report_rows_pictures_and_legend(tmp_path):
    pred, ref = _ring_case()
    cases = {"ring": (pred, ref), "same": (ref, ref), "shifted": (np.roll(ref, 1, axis=0), ref), "gone": (pred, ref)}
    ok, out = _evaluate_2d(tmp_path, cases, missing=("gone",))
    assert ok is False  # one prediction missing
    report = out / "report.html"
    parsed = _parse(report)
    rows = parsed.rows["cases"]
    assert [r[0] for r in rows] == ["gone", "ring", "same", "shifted"]  # one row per reference case
    assert dict((r[0], r[1]) for r in rows)["gone"] == "missing"

    pngs = [src for src in parsed.images if src.startswith("data:image/png;base64,")]
    assert pngs and len(pngs) == len(parsed.images)
    assert base64.b64decode(pngs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing to fetch

    # worst case first: the ring case has Betti matching error 3
    assert parsed.figures[0]["data-case"] == "ring"
    assert "reference: 2 components and 1 loop not matched in the prediction" in text
    summary = json.loads((out / "summary.json").read_text())
    ring = next(c for c in summary["metric_per_case"] if c["case"] == "ring")["metrics"]["1"]
    assert (ring["betti_matching_0_error"], ring["betti_matching_1_error"]) == (2, 1)
    assert summary["statistics"]["1"]["Dice"]["n"] == 3


def test_a_structure_missed_or_predicted_elsewhere_whole_is_pictured_and_said(tmp_path):
    """The Betti matching error leaves out each mask's eldest component: a prediction that
    missed the only vessel (or put it elsewhere) scored 0, the section said "nothing to
    picture", and the legends said "every feature matched"."""
    ref = np.zeros((16, 16), np.uint8)
    ref[4, 2:14] = 1
    elsewhere = np.zeros_like(ref)
    elsewhere[12, 2:14] = 1
    cases = {"empty": (np.zeros_like(ref), ref), "elsewhere": (elsewhere, ref), "same": (ref, ref)}
    _, out = _evaluate_2d(tmp_path, cases)
    summary = json.loads((out / "summary.json").read_text())
    per_case = {c["case"]: c["metrics"]["1"] for c in summary["metric_per_case"]}
    assert per_case["empty"]["betti_matching_error"] == 0 and per_case["empty"]["betti_error"] == 1
    parsed = _parse(out / "report.html")
    assert [f["data-case"] for f in parsed.figures] == ["empty"]  # ranked by betti_error after it
    text = (out / "report.html").read_text()
    assert "the prediction is empty: it misses the reference&#x27;s structure whole" in text or \
        "the prediction is empty: it misses the reference's structure whole" in text
    assert "largest betti_matching_error, then betti_error" in text
    features = unmatched_features(elsewhere, ref)
    assert legend_lines(features, presence_note(elsewhere, ref))[-1].startswith("the masks do not overlap")


def test_a_picture_whose_matching_would_not_fit_is_drawn_without_marks(tmp_path, monkeypatch):
    """The report's pictures run the Betti matching again in the command's own process,
    after every case was evaluated: a box too large for the memory got the command killed
    and nothing was written. Such a picture now shows the masks alone and says why."""
    from medseg.evaluation import metrics

    pred, ref = _ring_case()
    monkeypatch.setattr(metrics, "check_matching_memory", lambda shape: None)  # the metric's matching fits,
    monkeypatch.setattr(metrics, "matching_fits", lambda shape: False)  # the pictures' does not
    ok, out = _evaluate_2d(tmp_path, {"ring": (pred, ref)})
    assert ok
    text = (out / "report.html").read_text()
    assert "unmatched features not marked: their Betti matching needs about 0.0 GB, more than the memory here allows" in text
    assert _parse(out / "report.html").figures[0]["data-case"] == "ring"  # the picture is there, without marks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_per_case"][0]["metrics"]["1"]["betti_matching_error"] == 3


def test_report_without_topology_metrics_says_so(tmp_path):
    pred, ref = _ring_case()
    ref_dir, pred_dir, out = tmp_path / "labelsTs", tmp_path / "pred", tmp_path / "eval"
    for name in ("a", "b", "c"):
        write_image(ref_dir / f"{name}.nii.gz", ref, ImageGeometry.identity(ref.shape))
        write_image(pred_dir / f"{name}.nii.gz", pred, ImageGeometry.identity(ref.shape))
    assert run_evaluation(pred_dir, ref_dir, out, workers=1, metrics="dice,hd95")
    parsed = _parse(out / "report.html")
    assert len(parsed.rows["cases"]) == 3
    assert "No topology metric was computed" in (out / "report.html").read_text()
    assert [r[0] for r in parsed.rows["aggregate-1"]] == ["Dice", "HD95"]


def test_report_3d_projections_over_the_scan(tmp_path, make_synthetic_dataset):
    dataset = make_synthetic_dataset(cases=1, test_cases=3, size=24, dims=3, seed=1)
    from medseg.data.io import read_image

    pred_dir = tmp_path / "pred"
    for i, f in enumerate(sorted((dataset / "labelsTs").iterdir())):
        label, geometry = read_image(f)
        label = label.copy()
        if i == 0:  # cut the tree through the middle: components not matched
            label[:, label.shape[1] // 2 - 1 : label.shape[1] // 2 + 1] = 0
        write_image(pred_dir / f.name, label, geometry)
    out = tmp_path / "eval"
    assert run_evaluation(pred_dir, dataset / "labelsTs", out, workers=1, metrics="dice,betti_matching")
    text = (out / "report.html").read_text()
    parsed = _parse(out / "report.html")
    assert len(parsed.rows["cases"]) == 3
    assert parsed.figures and parsed.figures[0]["data-case"] == "vessel_001"
    assert "maximum-intensity projection along axis" in text
    assert "scan vessel_001_0000.nii.gz underneath" in text  # imagesTs found next to labelsTs

    # rewriting from summary.json alone gives the same tables
    again = write_report(out / "summary.json", tmp_path / "again.html")
    assert _parse(again).rows["cases"] == parsed.rows["cases"]


def test_report_html_command_rewrites_the_page(tmp_path):
    from medseg.cli import main

    pred, ref = _ring_case()
    _, out = _evaluate_2d(tmp_path, {"a": (pred, ref), "b": (ref, ref)})
    (out / "report.html").unlink()
    assert main(["report", "html", str(out), "--output", str(tmp_path / "again.html")]) == 0
    assert len(_parse(tmp_path / "again.html").rows["cases"]) == 2
    assert not (out / "report.html").exists()  # --output was honoured
    assert main(["report", "html", str(tmp_path / "nowhere")]) != 0
    # the page never replaces the summary it is made from, nor a file that is not a page
    summary = (out / "summary.json").read_bytes()
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"scan")
    assert main(["report", "html", str(out), "--output", str(out / "summary.json")]) == 2
    assert main(["report", "html", str(out), "--output", str(scan)]) == 2
    assert main(["report", "html", str(out), "--output", str(tmp_path)]) == 2  # a folder
    assert main(["report", "html", str(out), "--worst-cases", "-1"]) == 2
    assert (out / "summary.json").read_bytes() == summary and scan.read_bytes() == b"scan"
    assert main(["report", "html", str(out), "--output", str(tmp_path / "again.html")]) == 0  # a page is replaced


def test_case_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib reads $...$ as math: a case named 'price $\\q$' failed the whole page (a
    100-line ParseFatalException, no report.html) and 'a_$x^2$_b' was drawn as a_x²_b."""
    from medseg.evaluation.plots import literal

    pred, ref = _ring_case()
    ok, out = _evaluate_2d(tmp_path, {"price $\\q$ case": (pred, ref), "a_$x^2$_b": (pred, ref)})
    assert ok is True
    parsed = _parse(out / "report.html")
    assert {f["data-case"] for f in parsed.figures} == {"price $\\q$ case", "a_$x^2$_b"}
    assert literal("a_$x^2$_b") == "a_\\$x^2\\$_b" and literal("plain") == "plain"


def test_a_colour_photograph_is_drawn_under_the_masks_in_grey(tmp_path):
    """TopoMortar's RGB photographs were left out of every picture ("scan unreadable
    (... holds 3 channels): masks only")."""
    from PIL import Image

    from medseg.evaluation.report import _read_scan

    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "wall_0000.png")
    image, note = _read_scan(tmp_path, "wall", ".png", (6, 8))
    assert image.shape == (6, 8) and np.allclose(image, 0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert note == "scan wall_0000.png (its colours as grey) underneath"
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey_0000.png")
    image, note = _read_scan(tmp_path, "grey", ".png", (6, 8))
    assert np.all(image == 200) and note == "scan grey_0000.png underneath"
    assert _read_scan(tmp_path, "wall", ".png", (8, 6))[0] is None  # another shape than the masks


def test_a_page_drawn_again_from_another_folder_finds_the_masks(tmp_path, monkeypatch):
    """summary.json stored the paths as typed: evaluated with relative paths and drawn
    again from another folder, every picture was "unavailable" (exit code 0)."""
    from medseg.cli import main

    pred, ref = _ring_case()
    work = tmp_path / "work"
    for folder, array in (("labelsTs", ref), ("pred", pred)):
        write_image(work / folder / "ring.nii.gz", array, ImageGeometry.identity(ref.shape))
    monkeypatch.chdir(work)
    assert run_evaluation("pred", "labelsTs", "eval", workers=1)
    summary = json.loads((work / "eval" / "summary.json").read_text())
    case = summary["metric_per_case"][0]
    assert Path(case["reference_file"]).is_absolute() and Path(summary["prediction_folder"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert main(["report", "html", str(work / "eval"), "--output", str(tmp_path / "again.html")]) == 0
    page = (tmp_path / "again.html").read_text()
    assert "picture unavailable" not in page and len(_parse(tmp_path / "again.html").figures) == 1


def test_many_unmatched_features_are_drawn_smaller_and_without_their_lines():
    """A poor model's thousands of unmatched features buried the masks under full-size marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.evaluation.plots import FULL_SIZE_MARKS, Marks, _draw_marks

    rng = np.random.default_rng(0)
    for count in (5, 20 * FULL_SIZE_MARKS):
        fig, ax = plt.subplots()
        points = rng.random((count, 2)) * 100
        _draw_marks(ax, Marks(births={0: points}, deaths={0: points + 1}), "#ff0000", {0: "component"}, "missing")
        births = ax.collections[0]
        assert len(births.get_offsets()) == count
        if count <= FULL_SIZE_MARKS:
            assert len(ax.lines) == count and births.get_sizes()[0] == 70
        else:
            assert len(ax.lines) == 0 and births.get_sizes()[0] < 70 / 10
        plt.close(fig)


def test_names_the_plotting_font_lacks_print_no_warning_per_character(tmp_path, capsys, recwarn):
    """A Chinese case name printed "Glyph ... missing from font(s) DejaVu Sans" for every
    character; the page names the case in its HTML caption."""
    pred, ref = _ring_case()
    ok, out = _evaluate_2d(tmp_path, {"中文_名前": (pred, ref)})
    assert ok
    err = capsys.readouterr().err
    assert "Glyph" not in err and not [w for w in recwarn if "Glyph" in str(w.message)]
    assert "中文_名前" in (out / "report.html").read_text()


def test_the_differences_plot_turns_every_metric_so_that_up_is_b_better():
    """Up meant better for Dice and worse for HD95 in one plot; each metric now gives its scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import medseg.evaluation.plots as plots

    drawn = {}
    real_png = plots.png_bytes

    def keep(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn["means"] = [line.get_ydata()[0] for line in ax.lines[:-1] if len(line.get_xdata()) == 2]
        drawn["labels"] = [t.get_text() for t in ax.get_xticklabels()]
        return real_png(fig, *args, **kwargs)

    plots.png_bytes = keep
    try:
        # B is better on both: higher Dice, lower HD95
        plots.paired_difference_figure({"Dice": [0.02, 0.01], "HD95": [-16.0, -8.0]})
    finally:
        plots.png_bytes = real_png
    assert all(mean > 0 for mean in drawn["means"]) and len(drawn["means"]) == 2
    assert drawn["labels"] == ["Dice\n±0.02", "HD95\n±16"]
    plt.close("all")


def test_the_scan_under_the_masks_is_found_in_the_msd_layout(tmp_path):
    """MSD datasets store CASE.nii.gz (3D, or 4D with the sequences last); the pictures
    looked for CASE_0000.nii.gz alone and drew the masks without their scan."""
    from medseg.evaluation.report import _read_scan

    scan = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    write_image(tmp_path / "hv_004.nii.gz", scan, ImageGeometry.identity(scan.shape))
    image, note = _read_scan(tmp_path, "hv_004", ".nii.gz", (4, 5, 3))
    assert image is not None and np.allclose(image, scan) and "hv_004.nii.gz" in note
    image, note = _read_scan(tmp_path, "other", ".nii.gz", (4, 5, 3))
    assert image is None and "no scan other_0000.nii.gz or other.nii.gz" in note

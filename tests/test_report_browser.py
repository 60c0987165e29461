"""report.html in a real browser: headless Chromium renders it, runs its script, draws something.

Skipped (with the reason) where no Chromium is installed; CI installs the Debian
package ``chromium``. The browser runs with a fresh profile and no network features,
and as root needs ``--no-sandbox``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.data.io import read_image, write_image
from medseg.evaluation.evaluate import run_evaluation

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium)")

WINDOW = (1280, 2400)


def _chromium(profile: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False)


class _CaseRows(HTMLParser):
    """The first cell's text of every row of ``table#cases``, and that table's attributes, from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.attrs: dict | None = None
        self.cases: list[str] = []
        self._in_body = self._want_first = self._collect = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "cases":
            self.attrs = attrs
        elif tag == "tbody" and self.attrs is not None and not self.cases:
            self._in_body = True
        elif self._in_body and tag == "tr":
            self._want_first = True
        elif self._in_body and tag == "td" and self._want_first:
            self._want_first, self._collect = False, True
            self.cases.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._collect = False
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._collect:
            self.cases[-1] += data


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, make_synthetic_dataset):
    """Five 3D cases (one perfect, one eroded, one cut, one with a blob, one missing) evaluated."""
    from scipy import ndimage

    dataset = make_synthetic_dataset(cases=1, test_cases=5, size=24, dims=3, seed=2)
    root = tmp_path_factory.mktemp("browser")
    pred_dir = root / "pred"
    files = sorted((dataset / "labelsTs").iterdir())
    for i, f in enumerate(files[:-1]):  # the last case has no prediction
        label, geometry = read_image(f)
        label = label.astype(bool)
        if i == 1:
            label = ndimage.binary_erosion(label)
        elif i == 2:
            label[:, 10:12] = False
        elif i == 3:
            label[2:5, 2:5, 2:5] = True
        write_image(pred_dir / f.name, label.astype(np.uint8), geometry)
    out = root / "eval"
    assert run_evaluation(pred_dir, dataset / "labelsTs", out, workers=1) is False  # one missing
    return out, [f.name.replace(".nii.gz", "") for f in files]


def test_table_has_one_row_per_case_after_the_script_ran(evaluation, tmp_path):
    out, cases = evaluation
    report = out / "report.html"
    proc = _chromium(tmp_path / "profile", "--dump-dom", report.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _CaseRows()
    rows.feed(proc.stdout)
    assert rows.attrs is not None, "no table#cases in the rendered page"
    assert rows.attrs.get("data-sortable") == "ready"  # the inline script ran
    assert sorted(rows.cases) == sorted(cases) and len(rows.cases) == 5

    # #sort=Dice:asc sorts on load: the order of the rows is that of the cases' Dice (missing last)
    summary = json.loads((out / "summary.json").read_text())
    dice = {c["case"]: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"] if "metrics" in c}
    expected = sorted(dice, key=lambda c: dice[c]) + [c for c in cases if c not in dice]
    proc = _chromium(tmp_path / "profile2", "--dump-dom", report.resolve().as_uri() + "#sort=Dice:asc")
    sorted_rows = _CaseRows()
    sorted_rows.feed(proc.stdout)
    assert sorted_rows.cases == expected


def test_screenshot_is_not_blank(evaluation, tmp_path):
    from PIL import Image

    out, _ = evaluation
    shot = tmp_path / "report.png"
    proc = _chromium(
        tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        (out / "report.html").resolve().as_uri(),
    )
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (WINDOW[1], WINDOW[0])
    non_white = np.mean(pixels < 240)
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"
    assert pixels.std() > 20
    # the plots are there: some rows of the page hold long runs of dark (plotted) pixels
    assert np.mean(pixels[WINDOW[1] // 3 :] < 100) > 0.005
    keep = os.environ.get("MEDSEG_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_page_loads_nothing_from_the_network(evaluation):
    out, _ = evaluation
    text = (out / "report.html").read_text()
    assert not re.search(r"""<(link|script)[^>]+(src|href)=""", text)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)


def test_a_narrow_window_scrolls_the_tables_not_the_page(evaluation, tmp_path):
    """On a phone the run and aggregate tables kept the page 900 px wide: the whole page
    scrolled sideways. Each table now scrolls in its own box; a long case name wraps."""
    out, _ = evaluation
    page = (out / "report.html").read_text()
    probe = ("<script>window.addEventListener('load',function(){var b=document.body;"
             "b.setAttribute('data-scroll-width',document.documentElement.scrollWidth);"
             "b.setAttribute('data-inner-width',window.innerWidth);});</script></body>")
    narrow = tmp_path / "narrow.html"
    narrow.write_text(page.replace("</body>", probe))
    proc = _chromium(tmp_path / "profile", "--window-size=400,900", "--dump-dom", narrow.resolve().as_uri())
    found = re.search(r'data-scroll-width="(\d+)" data-inner-width="(\d+)"', proc.stdout)
    assert found, proc.stderr[-2000:]
    scroll_width, inner_width = map(int, found.groups())
    assert inner_width <= 600 and scroll_width <= inner_width, (scroll_width, inner_width)

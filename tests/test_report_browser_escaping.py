"""Case names that are HTML stay text in a real browser: headless Chromium loads report.html
and compare.html, and the DOM it builds has no injected element.

Skipped (with the reason) where no Chromium is installed, as ``test_report_browser.py``,
whose helper starts the browser. An injected ``onerror=alert(1)`` would also hold the
headless browser at the dialog until the helper's timeout, which fails the test as well.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.data.io import ImageGeometry, write_image
from medseg.evaluation.compare import run_compare
from medseg.evaluation.evaluate import run_evaluation

sys.path.insert(0, str(Path(__file__).parent))
from test_report_browser import CHROMIUM, _chromium  # noqa: E402

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium)")

HOSTILE = "<img src=x onerror=alert(1)>"  # a legal Linux file name


class _Dom(HTMLParser):
    """Counts ``img`` elements with an ``onerror`` attribute, and collects the text, of a dumped DOM."""

    def __init__(self, text: str):
        super().__init__()
        self.img_onerror = 0
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img" and any(name == "onerror" for name, _ in attrs):
            self.img_onerror += 1

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """report.html of an evaluation whose worst case is named ``HOSTILE``, and compare.html of two of them."""
    root = tmp_path_factory.mktemp("hostile")
    geometry = ImageGeometry.from_spacing((10, 10, 10), (1.0, 1.0, 1.0))
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    cut = ref.copy()
    cut[2:8, 4:5, 2:8] = 0  # two components: the worst case, pictured with its name
    for name, pred in (("good", ref), (HOSTILE, cut)):
        write_image(root / "ref" / f"{name}.nii.gz", ref, geometry)
        write_image(root / "pred" / f"{name}.nii.gz", pred, geometry)
    for out in ("eval_a", "eval_b"):
        assert run_evaluation(root / "pred", root / "ref", root / out, workers=1)
    run_compare(root / "eval_a", root / "eval_b", output=root / "compare")
    return {"report": root / "eval_a" / "report.html", "compare": root / "compare" / "compare.html"}


@pytest.mark.parametrize("page", ["report", "compare"])
def test_hostile_case_name_is_text_in_the_browser(pages, page, tmp_path):
    proc = _chromium(tmp_path / "profile", "--dump-dom", pages[page].resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom(proc.stdout)
    assert "</body>" in proc.stdout  # the whole page was rendered and dumped
    assert dom.img_onerror == 0
    assert HOSTILE in "".join(dom.text)

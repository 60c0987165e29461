"""study.html shows names from the evaluations (label names) as text, never as markup.

Runs are faked as in ``test_study_summary.py``; variant and test names cannot hold markup
(the study refuses them), label names come from each evaluation's ``summary.json``.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

from medseg.study.config import load_study
from medseg.study.report import write_outputs
from medseg.study.state import evaluation_dir
from test_study_summary import BASE_BETTI_1, _fake_runs

HOSTILE = "<img src=x onerror=alert(1)>"


class _Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_label_names_are_text_in_study_html(write_study, capsys):
    path = write_study()
    study = load_study(path)
    dice = {k: 0.8 for k in BASE_BETTI_1}
    values = {v: {"betti_1_error": BASE_BETTI_1, "Dice": dice, "HD95": dict(BASE_BETTI_1)} for v in ("cedice", "cldice")}
    _fake_runs(study, values)
    for run in study.runs:
        summary_path = evaluation_dir(run.run_dir, "synth") / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary["labels"] = {"1": HOSTILE}
        summary_path.write_text(json.dumps(summary))

    write_outputs(load_study(path))
    page = _Page((study.output_dir / "study.html").read_text())
    assert not [(t, a) for t, a in page.tags if any(name.startswith("on") for name in a)]
    assert HOSTILE in "".join(page.text)

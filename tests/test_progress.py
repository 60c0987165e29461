"""medseg.progress: a bar on a terminal, a line a minute in a log file (a Slurm job's
output file showed nothing of predict, evaluate, plan's fingerprint or preprocess until
their last line)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np

from medseg import progress
from medseg.progress import LineProgress, case_progress, duration

sys.path.insert(0, str(Path(__file__).parent / "inference"))
sys.path.insert(0, str(Path(__file__).parent / "evaluation"))


def test_durations_read_as_a_person_would_write_them():
    assert [duration(s) for s in (0.4, 45, 60, 200, 3600, 8100, 7201)] == [
        "0 s", "45 s", "1 min", "3 min 20 s", "1 h", "2 h 15 min", "2 h"]


def test_a_line_at_most_every_interval_with_the_time_left():
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(10, "predict", "case", out, interval=60, clock=lambda: now[0])
    for t in (10, 30, 70, 80, 100, 140):  # lines at 70 s (3 done) and 140 s (6 done)
        now[0] = t
        bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d predict: 3/10 cases \(30 %\), 1 min 10 s, about 2 min 43 s left", lines[0])
    assert lines[1].endswith("6/10 cases (60 %), 2 min 20 s, about 1 min 33 s left")
    for t in (200, 210, 300, 400):  # lines at 200 and 300 s; the last case says nothing (the command's own line follows)
        now[0] = t
        bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].endswith("9/10 cases (90 %), 5 min, about 33 s left"), lines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_lines_elsewhere_nothing_when_hidden():
    from tqdm import tqdm

    assert isinstance(case_progress(3, "evaluate", file=_Terminal()), tqdm)
    assert isinstance(case_progress(3, "evaluate", file=io.StringIO()), LineProgress)
    hidden = case_progress(3, "evaluate", show=False, file=io.StringIO())
    assert isinstance(hidden, tqdm) and hidden.disable


def test_predict_and_evaluate_say_how_far_they_are_in_a_log_file(tmp_path, capsys, monkeypatch):
    from predict_helpers import blob_image, make_run, oblique_geometry

    from medseg.data.io import write_image
    from medseg.evaluation.evaluate import run_evaluation
    from medseg.inference.predict import run_prediction

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line after every case but the last
    scans = tmp_path / "imagesTs"
    for i in range(3):
        write_image(scans / f"case_{i}_0000.nii.gz", blob_image() + i, oblique_geometry())
    out = tmp_path / "pred"
    assert run_prediction(model=make_run(tmp_path / "run"), inputs=[scans], output=out, overwrite=False, tta=None,
                          overlap=None, sw_batch_size=None, save_probabilities=False, device="cpu")
    err = capsys.readouterr().err
    assert re.search(r"predict: 1/3 cases \(33 %\), .*left\n.*predict: 2/3 cases", err), err
    assert "predict: 3/3" not in err
    labels = tmp_path / "labelsTs"
    for i in range(3):
        write_image(labels / f"case_{i}.nii.gz", (blob_image() > 0.5).astype(np.uint8), oblique_geometry())
    assert run_evaluation(out, labels, tmp_path / "eval", workers=1)
    err = capsys.readouterr().err
    assert re.search(r"evaluate: 2/3 cases \(66 %\)", err), err

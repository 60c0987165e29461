"""Sharded ``medseg predict`` and ``predict_provenance.json``: every rank checks the record
before any case, so a rerun with other options is refused on all ranks, and only rank 0
writes the new record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.data.io import write_image
from medseg.inference.predict import PROVENANCE, run_prediction

from test_distributed import _exit_codes, _torchrun  # the torchrun launcher of the distributed tests
from predict_helpers import blob_image, make_run, oblique_geometry  # noqa: E402  (on sys.path via test_distributed)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def test_sharded_rerun_with_other_options_is_refused_on_every_rank(tmp_path):
    model = make_run(tmp_path / "run")
    scans = tmp_path / "imagesTs"
    for i, name in enumerate(("case_a", "case_b", "case_c")):
        write_image(scans / f"{name}_0000.nii.gz", blob_image() + i, oblique_geometry())
    out = tmp_path / "pred"
    assert run_prediction(model, [scans], out, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = ["predict", "--model", str(model), "--input", str(scans), "--output", str(out), "--device", "cpu",
               "--tta"]

    proc = _torchrun(command, tmp_path / "refused")
    assert _exit_codes(tmp_path / "refused") == [1, 1]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error:")]
    assert len(lines) == 2 and all("tta false -> true" in ln and "--overwrite" in ln for ln in lines), proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    proc = _torchrun([*command, "--overwrite"], tmp_path / "overwrite")
    assert _exit_codes(tmp_path / "overwrite") == [0, 0], proc.stderr
    assert proc.stdout.count("medseg: predicted 3 case(s), skipped 0, failed 0") == 1, proc.stdout
    record = json.loads((out / PROVENANCE).read_text())
    assert record["tta"] is True and record["checkpoint"] == str(Path(model) / "checkpoints" / "best.pt")
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporaries left by either rank

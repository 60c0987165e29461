"""``medseg predict`` and ``medseg evaluate`` killed with SIGKILL at each of their file
writes and at random times, then run again with the same command: the output folder
ends byte for byte as an uninterrupted run leaves it, with no temporary file left."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fault_helpers import (
    ALL,
    Run,
    Sweep,
    changing_writes,
    diff_trees,
    kill_points,
    random_times,
    read_trace,
    report,
    tree_bytes,
)

SAMPLE = 60  # every write of these short runs; MEDSEG_FAULTS=all changes nothing here
RANDOM = 10 if ALL else 3


def _outputs(folder: Path) -> dict[str, str]:
    """Digests of the files under ``folder``, with the times of day masked: the "written
    ... UTC" minute of ``report.html`` and the ``"time"`` of the build records in
    ``summary.json`` and ``predict_provenance.json`` (when the outputs were made), the
    only bytes a rerun may change."""
    digests = tree_bytes(folder)
    for rel in digests:
        path = folder / rel
        if path.name == "report.html":
            text = re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", "written (time) UTC", path.read_text())
        elif path.suffix == ".json":
            text = re.sub(r'"time": "[^"]*"', '"time": "(time)"', path.read_text())
        else:
            continue
        digests[rel] = hashlib.sha256(text.encode()).hexdigest()
    return digests


def _sweep(killer, name: str, tmp: Path, argv, output, seed: int = 0) -> Sweep:
    """Kill ``argv(tag)`` at every write and at random times, rerun it, compare ``output(tag)``."""
    sweep = Sweep(name)
    logs = tmp / "logs"
    [reference] = killer.run([Run(argv("ref"), logs, trace=True).spec("ref")])
    assert reference["code"] == 0, (logs / "ref.err").read_text()[-3000:]
    expected = _outputs(output("ref"))
    [again] = killer.run([Run(argv("ref"), logs).spec("ref.again")])  # a finished run is left as it is
    assert again["code"] == 0 and _outputs(output("ref")) == expected

    writes = changing_writes(read_trace(logs / "ref.trace"))
    sweep.writes = len(writes)
    # after write k the folders are as before write k + 1: only the last write needs an "after"
    points = [(f"before write {k}", {"before": k}) for k in kill_points(writes, SAMPLE, seed)]
    points.append((f"after write {writes[-1]}", {"after": writes[-1]}))
    points += [(f"at {t:.2f} s", {"at_s": t}) for t in random_times(reference["seconds"], RANDOM, seed)]
    tags = [f"k{i}" for i in range(len(points))]
    runs = []
    for tag, (_, kill) in zip(tags, points):
        runs += [Run(argv(tag), logs, kill=kill).spec(f"{tag}.kill"), Run(argv(tag), logs).spec(f"{tag}.rerun")]
    results = killer.run(runs)
    for tag, (point, kill), killed, rerun in zip(tags, points, results[0::2], results[1::2]):
        sweep.judge(point, kill, killed, rerun, "rerun", (logs / f"{tag}.rerun.err").read_text(),
                    lambda tag=tag: diff_trees(expected, _outputs(output(tag))))
    return sweep


def test_predict_survives_sigkill_at_every_write(killer, tiny_run, tiny_dataset, tmp_path, record_property):
    def argv(tag: str) -> list:
        return ["predict", "--model", tiny_run, "--input", tiny_dataset / "imagesTs", "--output", tmp_path / tag,
                "--save-probabilities", "--device", "cpu"]

    sweep = _sweep(killer, "predict", tmp_path, argv, lambda tag: tmp_path / tag)
    report(record_property, sweep)
    assert not sweep.failed, "\n".join(sweep.failed)


def _predictions(labels: Path, out: Path) -> Path:
    """The reference labels with a slab cleared and a voxel added: a few topological
    errors (the untrained tiny model's hundreds make report.html slow to draw)."""
    import nibabel as nib
    import numpy as np

    out.mkdir()
    for path in sorted(labels.glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj).copy()
        data[:, :, 7:9] = 0
        data[0, 0, 0] = 1
        nib.save(nib.Nifti1Image(data, img.affine, img.header), out / path.name)
    return out


def test_evaluate_survives_sigkill_at_every_write(killer, tiny_dataset, tmp_path, record_property):
    predictions = _predictions(tiny_dataset / "labelsTs", tmp_path / "pred")

    def argv(tag: str) -> list:
        return ["evaluate", "--pred", predictions, "--ref", tiny_dataset / "labelsTs", "--output", tmp_path / tag,
                "--workers", "1"]

    sweep = _sweep(killer, "evaluate", tmp_path, argv, lambda tag: tmp_path / tag)
    report(record_property, sweep)
    assert not sweep.failed, "\n".join(sweep.failed)

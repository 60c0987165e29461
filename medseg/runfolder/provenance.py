"""``provenance.json``: what made a run folder, written into it atomically.

The record is :func:`medseg.provenance.provenance`: medseg's version, the topology
engine's build, Python, torch (and its CUDA), MONAI, numpy, the platform, the device
(and the GPU's name), the command line, the host and the time (UTC). Where it goes:

* a training run (:mod:`medseg.training.trainer`): ``provenance.json``, written when
  the run starts. An accepted ``--resume`` keeps it and appends the resuming process's
  record, with ``from_iteration``, to its ``resumes`` list, so the top-level keys keep
  describing the process that started the run; a refused resume writes nothing;
* an adapted run (:mod:`medseg.adaptation.runner`): the same file, the adaptation's own
  keys (source checkpoint and its SHA-256, method, target cases, config) merged with the
  record (:func:`write_provenance`'s ``extra``), and ``resumes`` as for training;
* an evaluation folder: ``summary.json``'s ``provenance`` key;
* a prediction folder: the ``made_by`` key of ``predict_provenance.json``, which is
  recorded but not compared (:mod:`medseg.inference.predict`).

Example (a training run resumed once)::

    {"medseg": "0.1.0", "engine": {"cpu": true, "cuda": false}, "python": "3.11.7",
     "torch": "2.13.0+cpu", "torch_cuda": null, "monai": "1.6.1", "numpy": "2.4.6",
     "platform": "Linux-...", "device": "cpu",
     "command": "medseg train cfg.yaml", "host": "node3", "time": "2025-05-02T09:14:03+00:00",
     "resumes": [{"medseg": "0.1.0", ..., "command": "medseg train cfg.yaml --resume",
                  "time": "2025-05-02T11:40:51+00:00", "from_iteration": 400}]}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medseg.atomic import write_atomic
from medseg.provenance import provenance

__all__ = ["PROVENANCE_FILE", "read_provenance", "write_provenance"]

PROVENANCE_FILE = "provenance.json"

log = logging.getLogger("medseg.runfolder")


def read_provenance(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's record, or None when it is missing or not a readable JSON object."""
    try:
        record = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) else None


def write_provenance(
    run_dir: str | Path,
    device: Any,
    extra: dict[str, Any] | None = None,
    resumed_at: int | None = None,
) -> dict[str, Any]:
    """Write ``run_dir/provenance.json`` (atomically) for a run that starts or resumes now; returns the record.

    Parameters
    ----------
    run_dir : path
        The run folder.
    device : torch.device or str
        Where this process runs.
    extra : dict, optional
        The command's own keys, put before the build record's (which win on a clash).
        On a resume, the record to extend when the file is missing or unreadable (a run
        folder written before medseg recorded it); a warning says so.
    resumed_at : int, optional
        The iteration a resume continues from; None for a run that starts now.
    """
    run_dir = Path(run_dir)
    if resumed_at is None:
        record = {**(extra or {}), **provenance(device)}
    else:
        record = read_provenance(run_dir)
        if record is None:
            log.warning("%s: missing or unreadable, recording this resume in a new one",
                        run_dir / PROVENANCE_FILE)
            record = dict(extra or {})
        resumes = record.get("resumes") if isinstance(record.get("resumes"), list) else []
        record["resumes"] = [*resumes, {**provenance(device), "from_iteration": int(resumed_at)}]
    write_atomic(run_dir / PROVENANCE_FILE, json.dumps(record, indent=2) + "\n")
    return record

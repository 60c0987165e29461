"""The run folder: what ``medseg train`` and ``medseg adapt`` write and ``medseg predict`` reads.

One package owns the run folder's conventions, so that training, adaptation and
inference share them instead of keeping copies (and inference never imports
:mod:`medseg.training`):

* :mod:`~medseg.runfolder.checkpoint`: the checkpoint format, its atomic save and its
  ``weights_only`` load, finding ``checkpoints/best.pt`` / ``latest.pt``, RNG states;
* :mod:`~medseg.runfolder.resume`: whether a run starts or resumes, and what a
  ``--resume`` may change in the config;
* :mod:`~medseg.runfolder.device`: ``auto`` / ``cpu`` / ``cuda`` to a torch device;
* :mod:`~medseg.runfolder.log_handlers`: the terminal and ``train.log`` / ``adapt.log``;
* :mod:`~medseg.runfolder.loss_average`: the loss means of each ``metrics.csv`` row;
* :mod:`~medseg.runfolder.provenance`: ``provenance.json``, what made the folder;
* :mod:`~medseg.runfolder.lock`: one process at a time in a run folder (``.medseg.lock``).
"""

from medseg.runfolder.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    CHECKPOINT_NAMES,
    FORMAT_VERSION,
    LATEST,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_all,
)
from medseg.runfolder.device import resolve_device
from medseg.runfolder.log_handlers import attach_console_handler, attach_file_handler, detach, log_the_end
from medseg.runfolder.lock import LOCK_FILE, RunFolderLock
from medseg.runfolder.loss_average import LossAverage
from medseg.runfolder.provenance import PROVENANCE_FILE, read_provenance, write_provenance
from medseg.runfolder.resume import check_unchanged, may_change, remove_dead_writes, resume_point, unfinished_start

__all__ = [
    "BEST",
    "CHECKPOINT_DIR",
    "CHECKPOINT_NAMES",
    "FORMAT_VERSION",
    "LATEST",
    "LOCK_FILE",
    "PROVENANCE_FILE",
    "LossAverage",
    "RunFolderLock",
    "attach_console_handler",
    "attach_file_handler",
    "capture_rng_state",
    "check_unchanged",
    "detach",
    "find_checkpoint",
    "load_checkpoint",
    "log_the_end",
    "may_change",
    "read_provenance",
    "remove_dead_writes",
    "resolve_device",
    "restore_rng_state",
    "resume_point",
    "save_checkpoint",
    "seed_all",
    "unfinished_start",
    "write_provenance",
]

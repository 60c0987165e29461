"""One torchrun worker for the distributed tests: the ``medseg`` CLI, plus what the tests compare.

Runs ``medseg.cli.main`` exactly as ``python -m medseg`` does, then writes to
``$MEDSEG_TEST_DUMP``: ``exit_rank<R>.txt`` (the exit code) and, after training,
``params_rank<R>.pt`` (this rank's model parameters when the loop ended).
"""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # bitwise comparisons with the single-process reference

from medseg.cli import main  # noqa: E402
from medseg.training import trainer  # noqa: E402

dump = Path(os.environ["MEDSEG_TEST_DUMP"])
rank = os.environ["RANK"]
states = []
_train_loop = trainer._train_loop


def _recording_train_loop(parts, progress, run_dir):
    _train_loop(parts, progress, run_dir)
    states.append({k: v.detach().cpu().clone() for k, v in parts.model.state_dict().items()})


trainer._train_loop = _recording_train_loop
code = main(sys.argv[1:])
if states:
    torch.save(states[-1], dump / f"params_rank{rank}.pt")
(dump / f"exit_rank{rank}.txt").write_text(str(code))
sys.exit(code)

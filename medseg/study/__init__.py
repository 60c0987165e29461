"""``medseg study``: a comparison of configs (e.g. losses) over seeds, as one resumable command.

- :mod:`~medseg.study.config`: the ``STUDY.yaml`` schema, its runs resolved and checked;
- :mod:`~medseg.study.state`: a run's ``study_run.json`` and what is left to do;
- :mod:`~medseg.study.worker`: one run in its own process (train, predict, evaluate);
- :mod:`~medseg.study.runner`: the runs spread over processes (``--parallel``, torchrun);
- :mod:`~medseg.study.summary`: statistics over seeds and cases, tests against the baseline;
- :mod:`~medseg.study.report`: ``study.json``, ``study.csv``, ``study.html``.
"""

from medseg.study.config import Study, StudyConfig, StudyRun, load_study
from medseg.study.runner import run_study

__all__ = ["Study", "StudyConfig", "StudyRun", "load_study", "run_study"]

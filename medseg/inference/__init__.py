"""Inference: sliding-window prediction with a trained run, geometry restored exactly.

:func:`run_prediction` is ``medseg predict``; :class:`Predictor` segments one loaded case.
"""

from medseg.inference.predict import run_prediction
from medseg.inference.predictor import Predictor
from medseg.runfolder import resolve_device  # re-exported: the one device resolution

__all__ = ["run_prediction", "Predictor", "resolve_device"]

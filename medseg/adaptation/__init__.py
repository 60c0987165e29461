"""Adaptation of a trained run to an unlabelled target domain: ``medseg adapt CONFIG.yaml``.

:func:`run_adaptation` (:mod:`medseg.adaptation.runner`) reads a source run, never
writing to it, and writes a new run folder usable by ``medseg predict`` and
``medseg evaluate``. Methods (``adapt.method`` in :class:`AdaptConfig`), one module each:

=================  ==============================================================
``pseudo_label``   self-training, confidence threshold and percentile curriculum
                   (Cascante-Bonilla et al. 2021), student re-initialised per round
``mean_teacher``   EMA teacher and augmentation consistency (Tarvainen & Valpola 2017)
``sfda``           entropy + class-ratio prior KL (Bateson et al., MedIA 2022)
``tent``           entropy on normalisation affine parameters only (Wang et al. 2021)
=================  ==============================================================
"""

from medseg.adaptation.config import AdaptConfig, load_adapt_config, validate_adapt_config
from medseg.adaptation.runner import run_adaptation

__all__ = ["AdaptConfig", "load_adapt_config", "validate_adapt_config", "run_adaptation"]

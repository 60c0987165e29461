"""medseg: topology-aware segmentation of 3D and 2D medical scans.

Stages (one sub-package each): ``data`` (reading nnU-Net/MSD datasets, transforms),
``models`` (MONAI networks), ``losses`` (overlap and topology losses),
``training``, ``inference``, ``evaluation``, ``adaptation`` and ``topology``
(the persistent-homology engine). ``medseg.cli`` is the command line.
"""

__version__ = "0.1.0"

"""One error hierarchy for medseg.

Every error a user can cause by their input (a file, a config key, an argument) is a
:class:`MedsegError`. The CLI turns it into one line ``error: <message>`` and a non-zero
exit code, without a traceback. Messages name the file, key or argument and say what is
wrong, e.g. ``labelsTr/case_003.nii.gz: label values [3, 7] are not declared in
dataset.json (declared: 0, 1)``.
"""


class MedsegError(Exception):
    """Base class of every error medseg raises for bad user input."""

    exit_code = 1


class ConfigError(MedsegError, ValueError):
    """A config file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(MedsegError, ValueError):
    """A dataset, image or label file is missing, unreadable or inconsistent."""

    exit_code = 3


class CheckpointError(MedsegError):
    """A run folder or checkpoint is missing, unreadable or incompatible."""

    exit_code = 4

"""One error hierarchy for medseg.

Every error a user can cause by their input (a file, a config key, an argument) is a
:class:`MedsegError`. The CLI turns it into one line ``error: <message>`` and a non-zero
exit code, without a traceback. Messages name the file, key or argument and say what is
wrong, e.g. ``labelsTr/case_003.nii.gz: label values [3, 7] are not declared in
dataset.json (declared: 0, 1)``.
"""


_NO_VALUE = object()


class MedsegError(Exception):
    """Base class of every error medseg raises for bad user input."""

    exit_code = 1


class ConfigError(MedsegError, ValueError):
    """A config file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class DataError(MedsegError, ValueError):
    """A dataset, image or label file is missing, unreadable or inconsistent."""

    exit_code = 3


class ArgumentError(ConfigError):
    """A function argument has a bad value.

    Library code names the argument as Python spells it (``connectivity=5: use 8 or 4 for
    2D images, ...``); the command line, which owns its flags, shows the same error under
    the flag (``--connectivity 5: ...``, :meth:`for_cli`), so neither speaks the other's
    language. ``value`` is left out of the message when not given; ``flag`` is the
    command line's name where it is not ``--ARGUMENT`` (underscores as dashes).
    """

    def __init__(self, argument: str, problem: str, value: object = _NO_VALUE, flag: str | None = None) -> None:
        self.argument, self.problem, self.value = argument, problem, value
        self.flag = flag or "--" + argument.replace("_", "-")
        shown = argument if value is _NO_VALUE else f"{argument}={value}"
        super().__init__(f"{shown}: {problem}")

    def for_cli(self) -> str:
        """The message under the command line's flag."""
        shown = self.flag if self.value is _NO_VALUE else f"{self.flag} {self.value}"
        return f"{shown}: {self.problem}"


class CheckpointError(MedsegError):
    """A run folder or checkpoint is missing, unreadable or incompatible."""

    exit_code = 4


class RunStopped(MedsegError):
    """A run stopped for a reason outside its inputs (a worker process died, shared memory
    ran out) and can be resumed; the CLI adds how (``--resume``) to the line."""

    exit_code = 1

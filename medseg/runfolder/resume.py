"""The resume check: what a resumed run's config may change from the one its checkpoint stores.

A run (trained or adapted) is resumed from ``checkpoints/latest.pt``, which stores the
config it was started with. :func:`check_unchanged` compares the two leaf by leaf
(dotted keys; lists of mappings by index, ``losses[1].weight``) and refuses, in one
line naming the first changed key and both values, any change outside the keys the
caller allows: :data:`medseg.config.RESUME_MAY_CHANGE` for training, the adaptation
runner's own list for ``medseg adapt``. A key allowed to change frees everything under
it (``inference`` frees ``inference.overlap``).

A run killed before its first checkpoint has nothing to resume from, but a folder that
``--resume`` refused and a new start refused too (it is not empty): :func:`unfinished_start`
tells such a folder from one that holds no run, so that the resume starts it again, and
:func:`remove_dead_writes` removes what killed writers left in it. :func:`resume_point`
makes that decision for ``medseg train`` and ``medseg adapt`` alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from medseg.config import RESUME_MAY_CHANGE
from medseg.errors import CheckpointError, ConfigError

__all__ = [
    "config_leaves", "may_change", "changed_keys", "check_unchanged", "unfinished_start", "remove_dead_writes",
    "resume_point",
]

log = logging.getLogger("medseg.runfolder")

_UNSET = object()


def config_leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config dump by dotted key; lists of mappings by index (``losses[1].weight``)."""
    if isinstance(tree, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(config_leaves(value, key))
    return out


def may_change(key: str, free: Iterable[str] = RESUME_MAY_CHANGE) -> bool:
    """Whether dotted ``key`` is one of ``free`` or lies under one of them."""
    return any(key == f or key.startswith(f + ".") or key.startswith(f + "[") for f in free)


def changed_keys(then: dict[str, Any], now: dict[str, Any], free: Iterable[str] = RESUME_MAY_CHANGE) -> list[str]:
    """Dotted keys outside ``free`` whose values differ (a key on one side only counts), in ``now``'s order."""
    free = tuple(free)
    old, new = config_leaves(then), config_leaves(now)
    return [k for k in dict.fromkeys([*new, *old])
            if not may_change(k, free) and old.get(k, _UNSET) != new.get(k, _UNSET)]


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "nothing"
    return value if isinstance(value, str) else json.dumps(value)


def check_unchanged(
    then: dict[str, Any], now: dict[str, Any], free: Iterable[str], config_file: str | Path
) -> None:
    """Refuse a resume whose config ``now`` changes a key outside ``free`` from ``then``.

    Parameters
    ----------
    then, now : dict
        The config the checkpoint stores and the one given now, as JSON data
        (``model_dump(mode="json")``; validate ``then`` first so keys added to the schema
        since have their defaults).
    free : iterable of str
        Dotted keys a resume may change (and everything under them).
    config_file : path
        The run folder's config, named in the message as the one to resume with.

    Raises
    ------
    ConfigError
        ``KEY: the run used OLD, the config says NEW; a resume cannot change it``, naming
        up to three more changed keys.
    """
    changed = changed_keys(then, now, free)
    if not changed:
        return
    old, new = config_leaves(then), config_leaves(now)
    key, others = changed[0], changed[1:]
    also = f" (also changed: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
    advice = f"resume with {config_file} or start a new output_dir"
    if _says(config_file, key, new.get(key, _UNSET)):  # the run's own config.yaml was edited
        advice = (f"{config_file} itself was edited since the run started: set {key} back to "
                  f"{_shown(old.get(key, _UNSET))} there, or start a new output_dir")
    raise ConfigError(
        f"{key}: the run used {_shown(old.get(key, _UNSET))}, the config says {_shown(new.get(key, _UNSET))}; "
        f"a resume cannot change it{also} ({advice})"
    )


def _says(config_file: str | Path, key: str, value: Any) -> bool:
    """Whether the YAML file ``config_file`` holds ``value`` at dotted ``key`` (False when unreadable)."""
    import yaml

    try:
        leaves = config_leaves(yaml.safe_load(Path(config_file).read_text(encoding="utf-8")))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return value is not _UNSET and leaves.get(key, _UNSET) == value


def unfinished_start(run_dir: str | Path, log_file: str, config_file: str = "config.yaml") -> dict[str, Any] | None:
    """What a resume finds in a run folder without ``checkpoints/latest.pt``.

    Returns
    -------
    dict or None
        The stored config (``config_file`` as data; ``{}`` when the run was killed before
        writing it) of a run killed before its first checkpoint: nothing was trained, the
        resume starts it again. None when ``run_dir`` holds no started run (nothing to
        resume). ``log_file`` (``train.log``, ``adapt.log``) is the first file a run
        writes, so it marks a started run.

    Raises
    ------
    CheckpointError
        ``config_file`` exists but is not a readable mapping.
    """
    import yaml

    run_dir = Path(run_dir)
    path = run_dir / config_file
    if not path.is_file():
        return {} if (run_dir / log_file).is_file() else None
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:  # written atomically: whole or absent
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}); start a new output_dir") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: not a config; start a new output_dir")
    return stored


def resume_point(
    run_dir: str | Path,
    resume: bool,
    log_file: str,
    check: Callable[[dict[str, Any], int, Path], None],
    config_of: Callable[[dict[str, Any], Path], dict[str, Any]] = lambda checkpoint, path: checkpoint["config"],
    config_file: str = "config.yaml",
) -> dict[str, Any] | None:
    """The checkpoint a run continues from; None to start at step 0. Nothing is written.

    * ``resume`` and ``checkpoints/latest.pt`` exists: the loaded checkpoint, after
      ``check(config_of(checkpoint, path), iteration, path)`` accepted its stored config;
    * ``resume`` in a run killed before its first checkpoint (:func:`unfinished_start`):
      None, after ``check`` accepted its ``config_file`` (when it was written);
    * no ``resume``: None, provided ``run_dir`` holds nothing yet.

    ``check`` raises :class:`ConfigError` naming a key the resume may not change.

    Raises
    ------
    CheckpointError
        ``resume`` but ``run_dir`` holds no started run; an unreadable checkpoint or config.
    ConfigError
        Not ``resume`` and ``run_dir`` is not empty; from ``check``.
    """
    from medseg.runfolder.checkpoint import CHECKPOINT_DIR, LATEST, load_checkpoint
    from medseg.runfolder.lock import holds_nothing

    run_dir = Path(run_dir)
    latest = run_dir / CHECKPOINT_DIR / LATEST
    if resume and latest.is_file():
        checkpoint = load_checkpoint(latest)
        check(config_of(checkpoint, latest), int(checkpoint["iteration"]), latest)
        return checkpoint
    if resume and latest.exists():
        raise CheckpointError(f"{latest}: not a file; move it away, or put the run's checkpoint file there")
    if resume:
        kept = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.pt")) if (run_dir / CHECKPOINT_DIR).is_dir() else []
        if kept:  # latest.pt was deleted or lost: starting over would replace what the run has
            raise CheckpointError(
                f"{latest}: missing, but {CHECKPOINT_DIR}/ holds {', '.join(kept)}: the run trained past its first "
                f"checkpoint and a resume would start it over; restore {LATEST}, or delete {run_dir / CHECKPOINT_DIR} "
                "to train the run again from the start (nothing was changed)"
            )
        stored = unfinished_start(run_dir, log_file, config_file)
        if stored is None:
            raise CheckpointError(f"{run_dir}: nothing to resume, {CHECKPOINT_DIR}/{LATEST} not found (start without --resume)")
        if stored:  # killed before its first checkpoint: nothing was done, the run starts again
            check(stored, 0, run_dir / config_file)
        log.warning("%s: stopped before its first checkpoint; starting it again", run_dir)
        return None
    if not holds_nothing(run_dir):
        raise ConfigError(
            f"output_dir {run_dir} already exists and is not empty; pass --resume to continue that run "
            "or choose a new output_dir"
        )
    return None


def remove_dead_writes(run_dir: str | Path) -> None:
    """Remove the temporaries (``.NAME.HOST-PID.tmp``) that killed writers left in the run
    folder and its ``checkpoints/`` (a checkpoint's is as large as the checkpoint)."""
    from medseg.atomic import remove_dead_temporaries
    from medseg.runfolder.checkpoint import CHECKPOINT_DIR

    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if folder.is_dir():
            remove_dead_temporaries(folder)

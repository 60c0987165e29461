"""The resume check: what a resumed run's config may change from the one its checkpoint stores.

A run (trained or adapted) is resumed from ``checkpoints/latest.pt``, which stores the
config it was started with. :func:`check_unchanged` compares the two leaf by leaf
(dotted keys; lists of mappings by index, ``losses[1].weight``) and refuses, in one
line naming the first changed key and both values, any change outside the keys the
caller allows: :data:`medseg.config.RESUME_MAY_CHANGE` for training, the adaptation
runner's own list for ``medseg adapt``. A key allowed to change frees everything under
it (``inference`` frees ``inference.overlap``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medseg.config import RESUME_MAY_CHANGE
from medseg.errors import ConfigError

__all__ = ["config_leaves", "may_change", "changed_keys", "check_unchanged"]

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
    raise ConfigError(
        f"{key}: the run used {_shown(old.get(key, _UNSET))}, the config says {_shown(new.get(key, _UNSET))}; "
        f"a resume cannot change it{also} (resume with {config_file} or start a new output_dir)"
    )

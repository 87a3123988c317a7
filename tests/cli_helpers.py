"""Helpers for tests that run ``metapl train`` with shared settings."""

from __future__ import annotations

from metapl.errors import MetaplError
from metapl.train.presets import load_preset


def for_preset(preset: str, args: list[str] | tuple[str, ...]) -> list[str]:
    """``args`` without the ``--set key=value`` pairs that ``preset``'s method does not read (an
    error since keys are checked): the shared tiny settings hold UDA and unlabeled-batch keys."""
    try:
        cfg = load_preset(preset)
    except MetaplError:  # the command reports it
        return list(args)
    out, rest = [], list(args)
    while rest:
        item = rest.pop(0)
        if item == "--set" and rest and cfg.ignored_key(rest[0].split("=", 1)[0]) is not None:
            rest.pop(0)
            continue
        out.append(item)
    return out

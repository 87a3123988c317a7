"""Writing results: JSON files that are never half-written, and the accuracy table a command prints."""

from __future__ import annotations

import os
from pathlib import Path

from metapl.atomic import write_json_atomically
from metapl.errors import ConfigError


def output_folder(path: Path | str, option: str = "--out") -> Path:
    """``path`` as a folder a command can create or reuse, checked before any work starts (a file
    in its place would otherwise surface as a traceback when the first result is written, after
    the work is done)."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ConfigError(f"{option} {path} {where}, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable; choose another {option}")
    return path


def write_json_atomic(path: Path, payload: dict) -> None:
    """``payload`` as JSON with sorted keys, whole or not at all (:mod:`metapl.atomic`): a reader
    (or a crash) never sees half a file, and an earlier result survives until the new one is
    complete."""
    write_json_atomically(Path(path), payload, sort_keys=True)


def print_accuracy_table(title: str, summary: dict[str, dict]) -> None:
    """``summary``: name -> {"mean", "std", "n"} with accuracies in [0, 1]."""
    print(title)
    width = max((len(name) for name in summary), default=0)
    for name, s in summary.items():
        print(f"  {name:<{width}}  {100 * s['mean']:6.2f} +- {100 * s['std']:5.2f} %  (n={s['n']})")

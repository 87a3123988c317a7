"""Writing results: JSON files that are never half-written, and the accuracy table a command prints."""

from __future__ import annotations

from pathlib import Path

from metapl.atomic import write_json_atomically


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

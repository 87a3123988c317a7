"""Writing results: JSON files that are never half-written, and the accuracy table a command prints."""

from __future__ import annotations

import json
from pathlib import Path


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file beside ``path``, then rename it: a reader (or a crash) never sees
    half a file, and an earlier result survives until the new one is complete."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)


def print_accuracy_table(title: str, summary: dict[str, dict]) -> None:
    """``summary``: name -> {"mean", "std", "n"} with accuracies in [0, 1]."""
    print(title)
    width = max((len(name) for name in summary), default=0)
    for name, s in summary.items():
        print(f"  {name:<{width}}  {100 * s['mean']:6.2f} +- {100 * s['std']:5.2f} %  (n={s['n']})")

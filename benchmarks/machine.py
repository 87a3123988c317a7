"""Who measured, and where it is saved: the machine description saved with every benchmark result,
and the command line and JSON writing the result-writing scripts share."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from metapl.atomic import write_json_atomically
from metapl.bench import cpu_description, source_digest

REPO = Path(__file__).resolve().parent.parent


def describe() -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # the code measured, also where git_commit is not it (uncommitted changes)
        "metapl_source_sha256": source_digest(),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # changes to the code not in that commit: then only the source digest names it
        info["git_uncommitted_changes"] = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "benchmarks"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = info["git_uncommitted_changes"] = None
    return info


def device_or_exit(name: str, script: str) -> torch.device:
    """The device ``name`` (a ``--device`` value) as `metapl train` resolves it, or exit 2 with its
    one line: torch's own "Torch not compiled with CUDA enabled" came as a traceback from the
    script's first tensor (or model) on the device."""
    from metapl.errors import MetaplError
    from metapl.train.engine import resolve_device

    try:
        return resolve_device(name)
    except MetaplError as e:
        fail(script, str(e))
        raise  # (fail exits)


def positive_int(text: str) -> int:
    """argparse type of a count of timed runs: 0 or fewer was a ``statistics.median`` error on an
    empty list after the whole setup."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fail(script: str, message: str) -> None:
    """``script: message`` on stderr and exit 2, the command line's code for a mistake in the input."""
    print(f"{Path(script).name}: {message}", file=sys.stderr)
    raise SystemExit(2)


def parser_with_json(doc: str) -> argparse.ArgumentParser:
    """A command line described by the first paragraph of ``doc`` (a script's docstring), with the
    required ``--json PATH``: where to write the results."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    return parser


def save(path: Path | str, payload: dict, **dumps_options) -> None:
    """``{"machine": describe(), **payload}`` as JSON at ``path`` (its folder made first), whole or
    not at all (`metapl.atomic`); ``dumps_options`` go to ``json.dumps`` (``indent=1`` unless
    told otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, {"machine": describe(), **payload}, **dumps_options)


def spread(values: list[float]) -> dict:
    """The smallest and largest of ``values`` and how many there are: a summary of differences."""
    return {"min": min(values), "max": max(values), "n": len(values)}

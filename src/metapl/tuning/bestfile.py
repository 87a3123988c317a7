"""``best.toml``: the tuned configuration as a preset file that ``metapl train --preset`` reads.

The file is flat ``key = value`` lines (the format of :func:`metapl.train.presets.load_preset`),
written here rather than with a TOML library because that is all it needs. It lists every config
key, not only the tuned ones, so that it means the same thing if a default changes later. It leaves
out what belongs to a machine or to the tuning runs: the device, the data folder (``--data-dir``),
the shortened trial budget (``--steps``) and ``tuning`` itself; a folder given with ``--set`` (e.g.
``unlabeled_dir``) is kept, as every ``--set`` is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from metapl.atomic import write_text_atomically
from metapl.train.config import TrainConfig

LEFT_OUT = ("preset", "tuning", "device", "data_dir")


def toml_value(value: Any) -> str:
    """A TOML literal for a config value (bool, int, float, str, or a list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)  # '0.1', '1e-05': both valid TOML floats, and exact
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are a subset of TOML basic strings'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render(cfg: TrainConfig, header: list[str], tuned: dict[str, str]) -> str:
    """The file's text: ``header`` comment lines, the tuned keys (commented with ``tuned[key]``),
    then every other key of ``cfg`` that has a value."""
    lines = [f"# {line}" if line else "#" for line in header]
    values = {k: v for k, v in cfg.to_dict().items() if k not in LEFT_OUT and v is not None}
    if tuned:  # (none: `metapl presets NAME`, a built-in preset as a file)
        lines += ["", "# -- tuned"]
        lines += [f"{key} = {toml_value(values[key])}  # {note}" for key, note in tuned.items()]
    lines += ["", "# -- the preset's values (and --set)"]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if k not in tuned]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename: processes sharing OUT never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)  # flushed to disk, and no stray temporary file on errors

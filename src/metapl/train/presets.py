"""Presets: a dataset file (Table 3's column) times a method (Table 1's rows).

``cifar10-4k-uda-mpl`` = ``presets/cifar10-4k.toml`` + method ``uda_mpl``. A path to a TOML file of
config keys also works as a preset (``metapl tune`` writes its best configuration that way).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from metapl.errors import ConfigError
from metapl.train.config import TrainConfig, apply_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Table 1's rows. Baselines use the student's column of Table 3 (the paper tunes incrementally: the
# supervised hyper-parameters are the MPL student's). Label smoothing uses 0.1 where the dataset's
# column says 0 (the paper does not list the baseline's value).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "supervised": {"method": "supervised"},
    "label-smoothing": {"method": "label_smoothing"},
    "supervised-mpl": {"method": "supervised_mpl"},
    "randaugment": {"method": "randaugment"},
    "randaugment-mpl": {"method": "randaugment_mpl"},
    "uda": {"method": "uda"},
    "uda-mpl": {"method": "uda_mpl"},
}
DIGITS_METHODS = ("supervised", "uda", "uda-mpl")


def _dataset_files() -> dict[str, dict[str, Any]]:
    folder = resources.files("metapl") / "presets"
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = tomllib.loads(entry.read_text())
    return out


def preset_table() -> dict[str, dict[str, Any]]:
    """name -> overrides, for every built-in preset."""
    table = {}
    for dataset, base in _dataset_files().items():
        methods = DIGITS_METHODS if dataset == "digits" else METHOD_PRESETS
        for method in methods:
            overrides = {**base, **METHOD_PRESETS[method]}
            if method == "label-smoothing" and not overrides.get("label_smoothing"):
                overrides["label_smoothing"] = 0.1
            table[f"{dataset}-{method}"] = overrides
    return table


def load_preset(name: str) -> TrainConfig:
    """A built-in preset by name, or a TOML file of config keys by path."""
    table = preset_table()
    if name in table:
        overrides = table[name]
    elif name.endswith(".toml") or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"preset file {name} does not exist")
        try:
            overrides = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"preset file {name} is not valid TOML: {err}") from None
    else:
        raise ConfigError(f"unknown preset {name!r}; `metapl presets` lists them")
    cfg = apply_overrides(TrainConfig(), overrides)
    return apply_overrides(cfg, {"preset": name})


def describe(overrides: dict[str, Any]) -> str:
    keys = ("method", "model", "steps", "batch_size", "student_lr", "teacher_lr")
    return ", ".join(f"{k}={overrides[k]}" for k in keys if k in overrides)

"""Presets: a dataset file (Table 3's column) times a method (Table 1's rows).

``cifar10-4k-uda-mpl`` = ``presets/cifar10-4k.toml`` + method ``uda_mpl``. Figure 7's
``imagenet-{20,40,80}pct`` have no file of their own: they are ``imagenet-10pct.toml`` with another
split (:data:`FIGURE7_SPLITS`). A path to a TOML file of config keys also works as a preset
(``metapl tune`` writes its best configuration that way).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from metapl.errors import ConfigError, did_you_mean
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
    # Table 2 (Section 4.2): the large teacher, then three students
    "large-teacher": {"method": "supervised"},
    "noisy-student": {"method": "noisy_student"},
    "reduced-mpl": {"method": "reduced_mpl"},
}
TABLE1 = (
    "supervised",
    "label-smoothing",
    "supervised-mpl",
    "randaugment",
    "randaugment-mpl",
    "uda",
    "uda-mpl",
)
TABLE2 = ("large-teacher", "supervised", "noisy-student", "reduced-mpl")
# Figure 7: supervised, RandAugment and UDA+MPL on ImageNet with 20%, 40% and 80% of the labels (10%
# is imagenet-10pct's Table 1 rows). The paper gives Table 3's 10% column only, so these splits take
# imagenet-10pct.toml with just `dataset` changed. Derived here (see _dataset_files) rather than as
# three copies of that file, so the column has one source and cannot drift between fractions.
FIGURE7 = ("supervised", "randaugment", "uda-mpl")
FIGURE7_BASE = "imagenet-10pct"
FIGURE7_SPLITS = ("imagenet-20pct", "imagenet-40pct", "imagenet-80pct")
# Which rows each dataset file offers.
FAMILIES = {
    "cifar10-4k": TABLE1,
    "svhn-1k": TABLE1,
    "imagenet-10pct": TABLE1,
    **dict.fromkeys(FIGURE7_SPLITS, FIGURE7),
    "digits": TABLE1,
    "cifar10-full": TABLE2,
    "svhn-full": TABLE2,
    "imagenet-full": TABLE2,
    "digits-reduced": TABLE2,
    "folder": ("supervised", "uda", "uda-mpl"),  # your own images: UDA+MPL and its two baselines
}


def _dataset_files() -> dict[str, dict[str, Any]]:
    folder = resources.files("metapl") / "presets"
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = tomllib.loads(entry.read_text())
    for split in FIGURE7_SPLITS:
        out[split] = {**out[FIGURE7_BASE], "dataset": split}
    return dict(sorted(out.items()))


def preset_table() -> dict[str, dict[str, Any]]:
    """name -> overrides, for every built-in preset.

    A dataset file's ``[methods.NAME]`` tables override its top-level keys for that row only
    (e.g. the large teacher's model, the reduced teacher's optimizer).
    """
    table = {}
    for dataset, content in _dataset_files().items():
        per_method = content.get("methods", {})
        base = {k: v for k, v in content.items() if k != "methods"}
        for method in FAMILIES.get(dataset, TABLE1):
            overrides = {**base, **METHOD_PRESETS[method], **per_method.get(method, {})}
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
        if not path.is_file():  # a folder of that name was one that "does not exist"
            what = "is a folder, not a .toml file" if path.is_dir() else "does not exist"
            raise ConfigError(f"preset file {name} {what}")
        try:
            overrides = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"preset file {name} is not valid TOML: {err}") from None
        if isinstance(overrides.get("methods"), dict):  # a copy of a built-in dataset file
            raise ConfigError(
                f"preset file {name}: [methods.*] tables belong to metapl's own dataset files, "
                "which hold a preset per method; a preset file holds one run's keys: "
                f"`metapl presets NAME > {name}` writes the built-in preset NAME as one"
            )
        # A bad key or value (a hand-edited best.toml, say) names the file: without it,
        # "student_lr expects a number" read like a mistake in --set.
        try:
            cfg = apply_overrides(TrainConfig(), overrides)
        except ConfigError as err:
            raise ConfigError(f"preset file {name}: {err}") from None
        return apply_overrides(cfg, {"preset": name})
    else:
        hint = did_you_mean(name, table)
        raise ConfigError(f"unknown preset {name!r}{hint}; `metapl presets` lists them")
    cfg = apply_overrides(TrainConfig(), overrides)
    return apply_overrides(cfg, {"preset": name})


def describe(overrides: dict[str, Any]) -> str:
    """A preset's main keys for `metapl presets`. A key its method does not read is left out: a
    dataset's preset files share Table 3's column (teacher_lr in a supervised preset), and
    `--set` refuses such a key, so listing it would suggest a knob that is not there."""
    cfg = apply_overrides(TrainConfig(), overrides)
    keys = ("method", "model", "steps", "batch_size", "student_lr", "teacher_lr")
    shown = [k for k in keys if k in overrides and cfg.ignored_key(k) is None]
    return ", ".join(f"{k}={overrides[k]}" for k in shown)

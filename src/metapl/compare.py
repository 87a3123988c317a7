"""`metapl compare`: finished runs side by side, as mean ± std over seeds and paired differences.

A result on a handful of seeds is a mean and a spread, and whether one method is above another is a
paired difference over the seeds both ran (their spread over seeds is larger than the difference):
this is how docs/results.md reports every number. `metapl twomoons`, `digits` and `reduced` print it
for their own methods; `metapl compare` does it for any finished runs, such as `metapl train` runs
of a Table 1 row and its baseline over five seeds each::

    metapl compare runs/cifar10-uda-seed*/ runs/cifar10-uda-mpl-seed*/

Each RUN is a run folder (its results.json) or a results.json itself. Its records are grouped: the
records of one method under one configuration are a group whatever folder they come from, where the
configuration leaves out the seed and :data:`NOT_RESULTS` (where the data lies, unless it is
your own, the device, how often a run logs). A group is named by its preset (`metapl train` runs) or its method, followed by
the settings that tell it apart from the other groups of that name. The first group (or the one
``--baseline`` names) is the baseline: every other group is paired with it, seed by seed, when both
ran on the same data (:data:`DATA_KEYS`) and share two seeds or more.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import reprlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HELP = "mean ± std over seeds of finished runs, and paired differences against the first"
DESCRIPTION = (
    "Compare finished runs: the folders (or results.json files) of `metapl train`, twomoons, digits "
    "or reduced. Records of one method under one configuration (the seed, where the data lies, the "
    "device and how often a run logs left aside) form a group, whatever folder they come from; "
    "each group gets its accuracy's mean +- std over its seeds (ddof=0, as results.json stores it). "
    "The first group is the baseline (or the one --baseline names): every other group minus it, "
    "seed by seed on the seeds both ran and the same data, as a mean with its standard error and "
    "wins/ties/losses."
)

# Settings that do not change what a run measures: runs that differ only in these (and the seed)
# are one group. An experiment's list of methods is left aside too: each record names its own
# (`metapl reduced` calls its list students).
NOT_RESULTS = frozenset(
    {
        "seed",
        "seeds",
        "methods",
        "students",
        "data_dir",
        "device",
        "workers",
        "threads",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "eval_batch_size",
    }
)
# What makes two groups' seeds the same examples, so that their accuracies pair seed by seed
# (from the file's config, else the record).
DATA_KEYS = (
    "dataset",
    "labels_per_class",
    "tune_per_class",
    "tuning",
    "unlabeled_dir",
    "unlabeled_per_class",
    "noise",
)
# A data key neither the file's config nor the record holds (`metapl digits` records no dataset):
# not the same as a recorded None, and not known to differ either.
UNRECORDED = "unrecorded"
# Your own data (`metapl train --preset folder-*`): where its images lie is which images they are,
# so its data_dir counts, as a setting and as data.
OWN_DATA = frozenset({"folder", "npz"})


@dataclass
class Group:
    """One method under one configuration: its metric by seed, and the files each came from."""

    command: str
    settings: dict  # the configuration that defines the group (method included)
    data: dict  # DATA_KEYS -> value: what a paired difference needs to be equal
    name: str = ""
    values: dict[int, float] = field(default_factory=dict)
    sources: dict[int, Path] = field(default_factory=dict)

    @property
    def base_name(self) -> str:
        return str(self.settings.get("preset") or self.settings["method"])

    def summary(self) -> dict:
        import numpy as np

        seeds = sorted(self.values)
        v = np.array([self.values[s] for s in seeds])
        return {
            "name": self.name,
            "mean": float(v.mean()),
            "std": float(v.std()),
            "n": len(v),
            "seeds": seeds,
            "values": [float(x) for x in v],
            "runs": sorted(dict.fromkeys(str(p) for p in self.sources.values())),
            "settings": self.settings,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl compare`."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a finished run's folder (its --out) or its results.json",
    )
    parser.add_argument(
        "--metric",
        default="accuracy",
        help="the records' accuracy to compare (default: accuracy, on the test set; others: "
        "tune_accuracy, accuracy_before_finetune, teacher_test_accuracy, ... where the runs "
        "recorded them)",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="keep only these methods or presets, comma-separated (e.g. uda,uda_mpl)",
    )
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        help="the group the others are paired with, by its name as printed (default: the first)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the comparison here")
    parser.add_argument(
        "--plot", metavar="FILE", help="also plot each group's seeds, mean and std (PNG)"
    )


def results_file(run: str) -> Path:
    """RUN's results.json: RUN itself, or the file in the folder RUN; a DataError if there is none."""
    from metapl.errors import DataError

    path = Path(run)
    if not path.exists():
        raise DataError(f"{run} does not exist: give a finished run's folder or its results.json")
    if path.is_dir():
        if not (path / "results.json").is_file():
            if (path / "checkpoint.pt").is_file():
                hint = ": the run has not finished (its command, run again, resumes it)"
            elif (path / "trials").is_dir() or (path / "best.toml").is_file():
                hint = f": a `metapl tune` study's folder; its trials are run folders: {path}/trials/*/*"
            else:
                hint = " (a finished metapl run writes it into its --out)"
            raise DataError(f"{run} holds no results.json{hint}")
        path = path / "results.json"
    return path


def read_results(path: Path) -> tuple[str, dict, list[dict]]:
    """(command, config, records) of a results.json; a DataError naming the file if it holds no
    records of a method and a seed (a `metapl bench` file, a damaged or foreign file)."""
    from metapl.errors import DataError

    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise DataError(
            f"{path}: cannot read it ({reason}); a metapl results.json is JSON: run the command "
            "that wrote it again"
        ) from None
    if isinstance(payload, list):  # early TwoMoons files: the records alone
        payload = {"results": payload}
    records = payload.get("results") if isinstance(payload, dict) else None
    if not (
        isinstance(records, list)
        and records
        and all(
            isinstance(r, dict)
            and isinstance(r.get("method"), str)
            and isinstance(r.get("seed"), int)
            and not isinstance(r.get("seed"), bool)
            for r in records
        )
    ):
        raise DataError(
            f"{path} holds no records of a method and a seed: compare reads the results.json of "
            "metapl train, twomoons, digits or reduced"
        )
    config = payload.get("config")
    command = payload.get("command")
    return (
        command if isinstance(command, str) else "",
        config if isinstance(config, dict) else {},
        records,
    )


def _metric(record: dict, metric: str, path: Path, records: list[dict]) -> float:
    from metapl.errors import DataError

    value = record.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        have = sorted(
            {k for r in records for k, v in r.items() if "accuracy" in k and _is_number(v)}
        )
        why = (
            "no test set: "
            if metric == "accuracy" and value is None and "accuracy" in record
            else ""
        )
        choices = ", ".join(have) if have else "none"
        if value is not None:  # there, but a string or a list (a hand-edited file)
            raise DataError(
                f"{path}: {metric} of {record['method']} seed {record['seed']} is "
                f"{reprlib.repr(value)}, not a number (an accuracy in [0, 1])"
            )
        raise DataError(
            f"{path}: the {record['method']} record of seed {record['seed']} has no {metric} "
            f"({why}its accuracies: {choices}); choose one with --metric"
        )
    if not 0.0 <= value <= 1.0:
        raise DataError(
            f"{path}: {metric} {value} of {record['method']} seed {record['seed']} is not an "
            "accuracy in [0, 1]"
        )
    return float(value)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def collect(
    runs: Iterable[str], metric: str, only: Collection[str] | None = None
) -> tuple[list[Group], dict[str, list[int]]]:
    """The runs' records grouped (in the order of their first appearance) and named; and the
    records left out as they do not record ``metric`` (preset or method -> seeds): `metapl digits`
    and `reduced` record accuracy_before_finetune for their fine-tuned methods only. A DataError
    if no record has it. ``only``: the methods or presets to keep (``--only``), None for all; a
    name none of the runs has is a ConfigError."""
    from metapl.errors import ConfigError, DataError

    groups: dict[tuple, Group] = {}
    left_out: dict[str, list[int]] = {}
    first_left_out = None
    seen: set[str] = set()
    for run in runs:
        path = results_file(run)
        command, config, records = read_results(path)
        if command == "train":
            # An option added since the run was written counts as its default, the behaviour the
            # run had (as when it resumes): a key the file lacks does not split its group.
            config = {**_train_defaults(), **config}
        for record in records:
            names = {record["method"], *([str(config["preset"])] if config.get("preset") else [])}
            seen |= names
            if only is not None and not names & set(only):
                continue
            if metric not in record:
                name = str(config.get("preset") or record["method"])
                left_out[name] = sorted({*left_out.get(name, []), record["seed"]})
                first_left_out = first_left_out or (record, metric, path, records)
                continue
            settings, data = _settings_and_data(_as_run(command, config, record), record)
            data.update(_experiment_data(command, config, record, data))
            key = (command, json.dumps([settings, data], sort_keys=True, default=str))
            group = groups.setdefault(key, Group(command, settings, data))
            seed = record["seed"]
            if seed in group.sources:
                raise DataError(
                    f"{group.sources[seed]} and {path} both hold seed {seed} of {group.base_name} "
                    "under the same configuration (one run given twice, or a rerun): a group "
                    "takes one result per seed; give each run once, and compare a rerun on its own"
                )
            group.values[seed] = _metric(record, metric, path, records)
            group.sources[seed] = path
    missing = sorted(set(only or ()) - seen)
    if missing:
        have = ", ".join(sorted(seen))
        raise ConfigError(f"--only {missing[0]}: none of the runs has it; they have: {have}")
    if not groups and first_left_out is not None:
        _metric(*first_left_out)  # raises: no record has it
    named = list(groups.values())
    _name(named)
    return named, left_out


# Experiment commands whose options left to the presets are recorded as null in the file's config,
# and resolved, run by run, in its records.
EXPERIMENTS = frozenset({"digits", "reduced"})


def _as_run(command: str, config: dict, record: dict) -> dict:
    """``config`` as ``record``'s run had it: for :data:`EXPERIMENTS`, an option left to the
    presets (null) is the value the run resolved, which its record holds (`--labels-per-class 30`
    is `metapl reduced`'s default, and a run that says so is in the same group); and ``steps`` is
    each run's own, none for LabelSpreading, which trains no network. Files written before the
    records held them keep their nulls."""
    if command not in EXPERIMENTS:
        return config
    resolved = {k: record.get(k, v) if v is None else v for k, v in config.items()}
    if "steps" in record:
        resolved["steps"] = record["steps"]
    elif record.get("method") == "label_spreading":
        resolved.pop("steps", None)
    return resolved


def _experiment_data(command: str, config: dict, record: dict, data: dict) -> dict:
    """The data keys ``data`` has unrecorded for a run of `metapl digits` or `reduced`, as the
    run's own training config had them (resolved from the file's config, the presets and its
    --set): their files record the label budget only, so a digits run was "not paired: data not
    recorded alike (dataset digits, not unrecorded)" with a `metapl train` run on the same split.
    Nothing when it cannot be resolved (a file of another metapl with other options)."""
    unrecorded = [k for k, v in data.items() if v == UNRECORDED]
    if not unrecorded:
        return {}
    from metapl.errors import MetaplError
    from metapl.experiments import digits, reduced

    if not command:  # a file of a metapl from before the files named their command
        # (results/digits/k5): known by its options, so that it still pairs with newer runs
        shapes = (
            ("digits", digits.DigitsConfig, "methods"),
            ("reduced", reduced.ReducedConfig, "students"),
        )
        for name, options, its_own in shapes:
            if its_own in config and config.keys() <= options.__dataclass_fields__.keys():
                command = name
                break
    if command not in EXPERIMENTS:
        return {}
    run_config_of = digits.run_config_of if command == "digits" else reduced.run_config_of
    try:
        run = run_config_of(record["method"], record["seed"], config).to_dict()
    except (MetaplError, TypeError, ValueError, KeyError):
        return {}
    return {k: run[k] for k in unrecorded if k in run}


@functools.cache
def _train_defaults() -> dict:
    from metapl.train.config import TrainConfig

    return TrainConfig().to_dict()


def _settings_and_data(config: dict, record: dict) -> tuple[dict, dict]:
    """What defines a record's group (its file's config but :data:`NOT_RESULTS`, and its method),
    and what its seeds' examples are (:data:`DATA_KEYS`)."""
    settings = {k: v for k, v in config.items() if k not in NOT_RESULTS}
    if isinstance(config.get("overrides"), dict):  # digits' and reduced's --set, method by method
        settings["overrides"] = _results_overrides(config["overrides"], record["method"])
    settings["method"] = record["method"]
    # the config's first: a train record's dataset is its split's name, seed included
    data = {k: config[k] if k in config else record.get(k, UNRECORDED) for k in DATA_KEYS}
    if config.get("dataset") in OWN_DATA:
        settings["data_dir"] = data["data_dir"] = config.get("data_dir")
    return settings, data


def _results_overrides(overrides: dict, method: str) -> dict:
    """What of an experiment's ``--set`` (``{"*" or a method: {key: value}}``) reached the runs of
    ``method``, but :data:`NOT_RESULTS`: `metapl digits --set checkpoint_every=100` measures what
    the same command without it does, and `--set uda_mpl:mpl_weight=2` leaves its supervised runs
    as they were."""
    reached = {}
    for target in ("*", method):
        keys = overrides.get(target, {})
        if not isinstance(keys, dict):  # (a file of another shape: kept whole, as before)
            return overrides
        reached.update({k: v for k, v in keys.items() if k not in NOT_RESULTS})
    return reached


def _name(groups: list[Group]) -> None:
    """Each group's name: its preset or method, and where others share that, the settings in which
    they differ (then the command, for files of two commands that still read the same)."""
    for base in dict.fromkeys(g.base_name for g in groups):
        same = [g for g in groups if g.base_name == base]
        shown = [{**g.settings, **g.data} for g in same]
        keys = sorted({k for s in shown for k in s})  # a preset's method changed by --set too
        # a key a file lacks (an experiment command's, by an older metapl) differs from a null one
        differ = [
            k
            for k in keys
            if len({json.dumps(s[k], default=str) if k in s else "" for s in shown}) > 1
        ]
        for g, s in zip(same, shown):
            told = ", ".join(f"{k}={_shown(s[k]) if k in s else 'unset'}" for k in differ)
            g.name = f"{base} ({told})" if told else base
    names = [g.name for g in groups]
    for g in groups:
        if names.count(g.name) > 1:
            g.name = f"{g.name} [{g.command or 'no command'}]"
    # names that still read the same (the string "1" and the number 1, say): numbered, since the
    # table and the paired differences go by name
    names = [g.name for g in groups]
    for i, g in enumerate(groups):
        if names.count(g.name) > 1:
            g.name = f"{g.name} #{names[: i + 1].count(g.name)}"


def _shown(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def baseline(groups: list[Group], name: str | None) -> Group:
    """The group named ``name`` (``--baseline``), or the first; a ConfigError naming the groups."""
    from metapl.errors import ConfigError

    if name is None:
        return groups[0]
    found = [g for g in groups if g.name == name]
    if not found:
        names = "; ".join(g.name for g in groups)
        raise ConfigError(f"--baseline {name!r} is none of the groups: {names}")
    return found[0]


def paired(groups: list[Group], base: Group) -> tuple[dict[str, dict], dict[str, str]]:
    """Every other group minus ``base``, seed by seed; and why a group is not paired."""
    from metapl.report import paired_differences

    out, not_paired = {}, {}
    for g in groups:
        if g is base:
            continue
        other_data = [k for k in (*DATA_KEYS, "data_dir") if g.data.get(k) != base.data.get(k)]
        if other_data:
            told = ", ".join(
                f"{k} {_shown(g.data.get(k))}, not {_shown(base.data.get(k))}" for k in other_data
            )
            unknown = any(UNRECORDED in (g.data.get(k), base.data.get(k)) for k in other_data)
            what = "data not recorded alike" if unknown else "other data"
            not_paired[g.name] = f"{what} ({told})"
            continue
        common = sorted(set(g.values) & set(base.values))
        if len(common) < 2:
            shared = "no seed" if not common else "only one seed"
            not_paired[g.name] = f"{shared} in common with {base.name}; 2 are needed"
            continue
        records = [
            {"method": name, "seed": s, "accuracy": values[s]}
            for name, values in ((g.name, g.values), (base.name, base.values))
            for s in common
        ]
        out.update(paired_differences(records, [(g.name, base.name)]))
    return out, not_paired


def _plot(groups: list[dict], metric: str, path: Path) -> None:
    """Each group's seeds as dots, its mean and std as a bar (PNG, written whole or not at all)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from metapl.atomic import replace_atomically

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(groups), 3.8))
    try:
        for i, g in enumerate(groups):
            ax.scatter([i] * g["n"], [100 * v for v in g["values"]], s=14, alpha=0.6, c="#1f77b4")
            ax.errorbar(
                i + 0.18, 100 * g["mean"], yerr=100 * g["std"], fmt="o", c="k", capsize=4, ms=4
            )
        ax.set_xticks(range(len(groups)), [g["name"] for g in groups], rotation=20, ha="right")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title("per seed (dots), mean ± std (black)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _check_not_an_input(output: str, option: str, inputs: list[Path]) -> None:
    """A ConfigError when ``output`` is one of the compared results files, or a run file beside
    one in its run's folder: check_not_a_result knows a run's folder by the command its
    results.json names, which files written before metapl recorded it (results/digits/k5) and
    results.json files copied under another name do not."""
    from metapl.errors import ConfigError
    from metapl.report import RUN_FILES

    target = Path(output).resolve()
    for path in inputs:
        path = path.resolve()
        if target == path:
            raise ConfigError(
                f"{option} {output} would replace {path}, one of the runs compared; give another "
                "file name"
            )
        if (
            path.name == "results.json"
            and target.parent == path.parent
            and target.name in RUN_FILES
        ):
            raise ConfigError(
                f"{option} {output} would replace a file of the run in {path.parent}, one of the "
                "runs compared; give another file name"
            )


def run(args: argparse.Namespace) -> None:
    from metapl.errors import ConfigError
    from metapl.report import (
        check_not_a_result,
        check_output_file,
        format_seeds,
        print_accuracy_table,
        print_paired_differences,
        write_json_atomic,
    )

    if "accuracy" not in args.metric:
        raise ConfigError(
            f"--metric {args.metric}: compare reads accuracies (a record's key with 'accuracy' in "
            "its name, such as accuracy or tune_accuracy)"
        )
    outputs = [(args.json, "--json"), (args.plot, "--plot")]
    for output, option in outputs:  # checked before reading: a typo costs nothing
        if output is not None:
            check_output_file(output, option)
            check_not_a_result(output, option)
    if args.json and args.plot and Path(args.json).resolve() == Path(args.plot).resolve():
        raise ConfigError(f"--json and --plot are both {args.json}; give two file names")
    inputs = [results_file(run) for run in args.runs]  # the files, none read yet
    for output, option in outputs:
        if output is not None:
            _check_not_an_input(output, option, inputs)
    only = [n for n in args.only.split(",") if n] if args.only is not None else None
    if only is not None and not only:
        raise ConfigError("--only is empty; give methods or presets, comma-separated")
    groups, left_out = collect(args.runs, args.metric, only)
    summaries = [g.summary() for g in groups]
    base = baseline(groups, args.baseline)
    differences, not_paired = paired(groups, base)

    print_accuracy_table(
        f"{args.metric}, mean +- std over seeds:",
        {s["name"]: s for s in summaries},
    )
    if len(groups) > 1:
        print(f"paired differences against {base.name}, seed by seed:")
        print_paired_differences(differences)
        for name, why in not_paired.items():
            print(f"  {name}: not paired: {why}")
    if left_out:
        told = "; ".join(
            f"{name} (seeds {format_seeds(seeds)})" for name, seeds in left_out.items()
        )
        print(f"left out (no {args.metric}): {told}")
    if args.json:
        payload = {
            "command": "compare",
            "metric": args.metric,
            "baseline": base.name,
            "groups": summaries,
            "paired": differences,
            "not_paired": not_paired,
            "left_out": left_out,
        }
        write_json_atomic(Path(args.json), payload)
    if args.plot:
        _plot(summaries, args.metric, Path(args.plot))

"""Real images on a CPU: scikit-learn's digits with K labels per class (issue: "metapl digits").

Supervised, UDA and UDA+MPL run through the same training engine as CIFAR-10 (presets
``digits-*``), one run folder per method and seed; LabelSpreading (scikit-learn) on the same split
is the reference row. Runs are spread over worker processes (one torch thread each): small conv
nets on 8x8 images use a core better as separate processes than as intra-op threads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from metapl import report
from metapl.errors import ConfigError, did_you_mean
from metapl.experiments.workers import map_runs, run_record, worker_pool
from metapl.report import print_accuracy_table, write_json_atomic

# Table 1's rows, each through the engine with its digits-* preset; every "+MPL" row next to the
# baseline it adds the MPL teacher to (the pairs compared seed by seed).
ENGINE_METHODS = (
    "supervised",
    "label_smoothing",
    "supervised_mpl",
    "randaugment",
    "randaugment_mpl",
    "uda",
    "uda_mpl",
)
METHODS = (*ENGINE_METHODS, "label_spreading")
MPL_PAIRS = {"supervised_mpl": "supervised", "randaugment_mpl": "randaugment", "uda_mpl": "uda"}
# The comparison, and what fits in 10 minutes on 2 cores; --methods adds the other rows.
DEFAULT_METHODS = ("supervised", "uda", "uda_mpl", "label_spreading")


@dataclass
class DigitsConfig:
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    labels_per_class: int = 5
    steps: int | None = None  # None: the presets' value
    device: str = "cpu"
    methods: tuple[str, ...] = DEFAULT_METHODS
    workers: int = 0  # 0: one per CPU core
    # Config overrides per engine method ("*" = every engine method), e.g. from
    # `--set uda_mpl:teacher_lr=0.1`; the preset keys of `metapl train --set`.
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)

    def validate(self) -> DigitsConfig:
        if not self.methods:
            raise ConfigError(f"--methods: name at least one of {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(
                f"unknown digits method {unknown[0]!r}; choose from {', '.join(METHODS)}"
                + did_you_mean(unknown[0], METHODS)
            )
        if not 1 <= self.labels_per_class <= 100:
            raise ConfigError(
                f"--labels-per-class must be between 1 and 100, got {self.labels_per_class}"
            )
        for target, keys in self.overrides.items():
            if target != "*" and target not in ENGINE_METHODS:
                raise ConfigError(
                    f"--set {target}:...: {target!r} is not a trained digits method; "
                    f"choose from {', '.join(ENGINE_METHODS)}{did_you_mean(target, ENGINE_METHODS)}"
                )
            # would be ignored without a word (as `metapl reduced` refuses a stage it skips)
            if target != "*" and target not in self.methods:
                raise ConfigError(
                    f"--set {target}:...: method {target} does not train here (--methods "
                    f"{','.join(self.methods)})"
                )
            if target == "*" and not set(self.methods) & set(ENGINE_METHODS):
                raise ConfigError(
                    f"--set {next(iter(keys))}=...: no method of --methods "
                    f"{','.join(self.methods)} trains a model; --set applies to the trained ones"
                )
            check_command_keys(keys, COMMAND_KEYS)
            if target == "*":
                check_not_both(keys, {"steps": ("--steps", self.steps)})
            # Every run, LabelSpreading and the report are on scikit-learn's digits: another
            # dataset was trained and reported as digits (or failed with a model's channel error).
            if "dataset" in {key.strip() for key in keys}:
                raise ConfigError(
                    "--set dataset=...: `metapl digits` trains on scikit-learn's digits only; for "
                    "other data use `metapl train --preset NAME --data-dir D`"
                )
        # Resolve every engine method's config now, so that an unknown key or a bad value stops
        # the command before any worker starts.
        configs = {m: _method_config(m, 0, self) for m in self.methods if m in ENGINE_METHODS}
        # A key for one method that it does not read, or for every method that none of them
        # reads, would be ignored without a word.
        for target, keys in self.overrides.items():
            if target in configs:
                configs[target].check_keys_apply(keys)
            elif target == "*" and configs:
                for key in keys:
                    reasons = [c.ignored_key(key) for c in configs.values()]
                    if all(reasons):
                        raise ConfigError(f"--set {key}: {reasons[0]}")
        from metapl.train.model_checks import check_config_models

        for method, method_cfg in configs.items():  # a model that cannot take digits' images
            check_config_models(method_cfg, 10, f"--set {method}:model=NAME")
        return self

    def notes(self) -> list[str]:
        """What `metapl train` would note of the trained methods' configs (the first-order
        estimator at a weight the user did not set), once each."""
        from metapl.train.config import first_order_note

        notes = []
        for method in self.methods:
            if method in ENGINE_METHODS:
                explicit = {*self.overrides.get(method, {}), *self.overrides.get("*", {})}
                note = first_order_note(_method_config(method, 0, self), "digits", explicit)
                if note is not None and note not in notes:
                    notes.append(note)
        return notes


# Keys that a command's own options set for every run: a --set would change the trained runs but
# not what the command reports them as (run folders, seed-by-seed pairs, LabelSpreading's split).
# `--set method=uda` trained UDA in every method's folder and reported it as each method.
COMMAND_KEYS = {
    "seed": "--seeds",
    "labels_per_class": "--labels-per-class",
    "method": "--methods",
}


def check_command_keys(keys, command_keys: dict[str, str]) -> None:
    """A ConfigError for a ``--set`` of a key that the command's own option ``command_keys[key]``
    sets."""
    for key in keys:
        if key.strip() in command_keys:
            option = command_keys[key.strip()]
            raise ConfigError(
                f"--set {key.strip()}=...: {option} sets {key.strip()} for every run; use {option}"
            )


def check_not_both(keys, options: Mapping[str, tuple[str, object]]) -> None:
    """A ConfigError for a ``--set`` (for every run) of a key whose command option
    ``options[key] = (option, value)`` was given too: `--steps 2 --set steps=3` trained 3 steps
    with the warm-up cut to fit 2, and results.json's config said 2. (``--set uda_mpl:steps=2``
    is one method's own length, which its records say.)"""
    for key in keys:
        option, value = options.get(key.strip(), (None, None))
        if value is not None:
            raise ConfigError(
                f"{option} and --set {key.strip()}=... both set {key.strip()}; give one of them"
            )


def parse_method_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["steps=3000", "uda_mpl:teacher_lr=0.1"]`` -> ``{"*": {"steps": "3000"},
    "uda_mpl": {"teacher_lr": "0.1"}}``."""
    from metapl.train.config import parse_set_options

    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, sep, _ = item.partition("=")
        target, colon, key = head.rpartition(":")
        if not sep or (colon and not target):
            raise ConfigError(f"--set {item!r}: expected key=value or METHOD:key=value")
        value = item.split("=", 1)[1]
        out.setdefault(target or "*", {}).update(parse_set_options([f"{key}={value}"]))
    return out


def _method_config(method: str, seed: int, cfg: DigitsConfig):
    """The training config of one (method, seed) run: the digits-* preset, the split, then the
    user's --set overrides (every method's first, then this method's)."""
    from metapl.train.config import apply_overrides
    from metapl.train.presets import load_preset

    preset = load_preset(f"digits-{method.replace('_', '-')}")
    overrides: dict = {"seed": seed, "labels_per_class": cfg.labels_per_class, "device": cfg.device}
    if cfg.steps is not None:
        # A short run keeps the preset's warm-up only as far as it fits (the LR schedule needs
        # warmup_steps <= steps).
        overrides["steps"] = cfg.steps
        overrides["warmup_steps"] = min(preset.warmup_steps, cfg.steps)
        # ... and fine-tunes for the preset's share of the run (300 of 1,500 steps = 1/5).
        if preset.finetune_steps:
            overrides["finetune_steps"] = max(1, cfg.steps // 5)
    overrides.update(cfg.overrides.get("*", {}))
    overrides.update(cfg.overrides.get(method, {}))
    return apply_overrides(preset, overrides).validate()


def run_config_of(method: str, seed: int, saved: dict):
    """The training config of the (method, seed) run of a results.json whose config is ``saved``
    (`metapl compare` reads what data the run had); LabelSpreading's is the digits preset's on the
    same split, which it reads. Options ``saved`` lacks (an older metapl's file) are the
    defaults."""
    from metapl.train.config import apply_overrides
    from metapl.train.presets import load_preset

    known = {k: v for k, v in saved.items() if k in DigitsConfig.__dataclass_fields__}
    cfg = DigitsConfig(**known)
    if method == "label_spreading":
        split = {"seed": seed, "labels_per_class": cfg.labels_per_class}
        return apply_overrides(load_preset("digits-supervised"), split)
    return _method_config(method, seed, cfg)


def label_spreading_accuracy(seed: int, labels_per_class: int) -> float:
    """scikit-learn's LabelSpreading (kNN kernel) on the same split, pixels scaled to [0, 1]."""
    from sklearn.semi_supervised import LabelSpreading

    from metapl.data.digits import digits_split

    split = digits_split(seed, labels_per_class)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0  # noqa: E731
    x = np.concatenate([flat(split.x_labeled), flat(split.x_unlabeled)])
    y = np.concatenate([split.y_labeled, -np.ones(len(split.x_unlabeled), dtype=np.int64)])
    model = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=200).fit(x, y)
    return float((model.predict(flat(split.x_test)) == split.y_test).mean())


def _train_one(job: tuple[str, int, DigitsConfig, str]) -> dict:
    """One (method, seed) run in a worker process; returns its results record."""
    method, seed, cfg, out = job
    import torch

    torch.set_num_threads(1)
    if method == "label_spreading":
        acc = label_spreading_accuracy(seed, cfg.labels_per_class)
        return {"method": method, "seed": seed, "accuracy": acc}
    from metapl.train.engine import train

    run_cfg = _method_config(method, seed, cfg)
    summary = train(run_cfg, Path(out) / method / f"seed{seed}", show_progress=False)
    record = summary["results"][0]
    result = run_record(record, method, seed)
    result["labels_per_class"] = cfg.labels_per_class
    if "teacher_test_accuracy" in record:  # to understand MPL; the student is what is reported
        result["teacher_accuracy"] = record["teacher_test_accuracy"]
    return result


def summarize(records: list[dict]) -> dict[str, dict]:
    """method -> mean/std/n of accuracy; a method that was fine-tuned after MPL also gets a
    "<method>_before_finetune" row (the paper's later versions report the fine-tuned student)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        for key, name in (
            ("accuracy_before_finetune", f"{method}_before_finetune"),
            ("accuracy", method),
        ):
            acc = np.array([r[key] for r in rows if key in r])
            if len(acc):
                out[name] = {"mean": float(acc.mean()), "std": float(acc.std()), "n": len(acc)}
    return out


def paired_differences(records: list[dict]) -> dict[str, dict]:
    """Each "+MPL" row minus its own baseline, and UDA+MPL minus every other method, seed by seed
    (:func:`metapl.report.paired_differences`)."""
    pairs = list(MPL_PAIRS.items())
    pairs += [("uda_mpl", m) for m in METHODS if m not in ("uda_mpl", MPL_PAIRS["uda_mpl"])]
    return report.paired_differences(records, pairs)


def run_digits(cfg: DigitsConfig, out: Path, show_progress: bool = True) -> dict:
    cfg.validate()
    # A rerun with other seeds (or steps, methods...) would replace the earlier results.json.
    report.check_replaceable(
        out, "digits", asdict(cfg), ignore=("workers",), defaults=asdict(DigitsConfig())
    )
    # every run's folder checked (and held) now, not after other runs trained (LabelSpreading
    # writes none)
    runs = [out / m / f"seed{s}" for m in cfg.methods if m in ENGINE_METHODS for s in cfg.seeds]
    with report.holding_run_folders(runs):
        for note in cfg.notes():  # after the checks: a mistake found in them is one line
            print(note, file=sys.stderr)
        resuming = report.resuming_note("digits", out, runs)
        if resuming is not None and show_progress:
            print(resuming, file=sys.stderr)
        return _train_and_report(cfg, out, show_progress)


def _train_and_report(cfg: DigitsConfig, out: Path, show_progress: bool) -> dict:
    from metapl.experiments.figure9 import plot_figure9

    out.mkdir(parents=True, exist_ok=True)
    # Slowest first, so the workers finish together.
    order = ("uda_mpl", "randaugment_mpl", "supervised_mpl", "uda", "randaugment")
    jobs = sorted(
        ((m, s, cfg, str(out)) for s in cfg.seeds for m in cfg.methods),
        key=lambda j: (order.index(j[0]) if j[0] in order else len(order), j[1]),
    )
    workers = cfg.workers or os.cpu_count() or 1
    with worker_pool(min(workers, len(jobs))) as pool:
        records = map_runs(pool, _train_one, jobs, "digits runs", show_progress)
    records.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    summary = summarize(records)
    paired = paired_differences(records)
    payload = {
        "command": "digits",
        "config": asdict(cfg),
        "results": records,
        "summary": summary,
        "paired": paired,
    }
    write_json_atomic(out / "results.json", payload)
    if {"supervised", "uda_mpl"} <= set(cfg.methods):
        plot_figure9(out, cfg.seeds[0], out / "figure9.png")
    print_accuracy_table(
        f"digits, {cfg.labels_per_class} labels per class, seeds {cfg.seeds}: test accuracy "
        "(497 images)",
        summary,
    )
    report.print_paired_differences(paired)
    figure = ", figure9.png, figure9.json" if {"supervised", "uda_mpl"} <= set(cfg.methods) else ""
    # LabelSpreading alone trains no run: pointing at run folders would send the user looking
    trained = any(m in ENGINE_METHODS for m in cfg.methods)
    folders = f"; each run's folder in {out}/METHOD/seedN" if trained else ""
    print(f"wrote {out}/results.json{figure}{folders}")
    return payload

"""Section 4.2 on a CPU: ReducedMPL vs NoisyStudent vs supervised on scikit-learn's digits.

Per seed, through the same engine and presets as the full datasets (``digits-reduced-*``):

1. the large teacher (a 3x wider CNN with RandAugment) trains on the labeled digits;
2. the students train: supervised (labeled only, no large teacher), NoisyStudent (labeled + the
   large teacher's distributions under noise), ReducedMPL (the reduced MLP teacher calibrates those
   distributions by MPL + the supervised signal). The NoisyStudent and ReducedMPL runs each first
   precompute the large teacher's distributions, keep the top-K unlabeled images per class and
   drop the large teacher.

Writes ``results.json`` (records with "method", "seed", "accuracy") and ``figure10.png``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metapl.errors import ConfigError, did_you_mean
from metapl.experiments.digits import check_command_keys, check_not_both, summarize
from metapl.experiments.workers import map_runs, run_record, worker_pool
from metapl.report import (
    check_replaceable,
    holding_run_folders,
    paired_differences,
    print_accuracy_table,
    print_paired_differences,
    resuming_note,
    write_json_atomic,
)

STUDENTS = ("supervised", "noisy_student", "reduced_mpl")
STAGES = ("large_teacher", *STUDENTS)


@dataclass
class ReducedConfig:
    dataset: str = "digits"
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    steps: int | None = None
    labels_per_class: int | None = None
    device: str = "cpu"
    workers: int = 0
    # Which students to train (the large teachers always train: every student needs one).
    students: tuple[str, ...] = STUDENTS
    # Config overrides per stage ("*" = every stage), e.g. from `--set
    # reduced_mpl:teacher_lr=0.001`; the preset keys of `metapl train --set`.
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)

    def validate(self) -> ReducedConfig:
        if self.dataset != "digits":
            typo = did_you_mean(self.dataset, ["digits"])  # `--dataset digit`
            if typo:
                raise ConfigError(f"unknown --dataset {self.dataset!r}{typo}")
            raise ConfigError(
                f"`metapl reduced --dataset {self.dataset}`: only digits runs end to end here; for "
                "CIFAR-10/SVHN/ImageNet use `metapl train --preset <dataset>-full-large-teacher`, "
                "then the -supervised/-noisy-student/-reduced-mpl presets with "
                "--set large_teacher=RUN_DIR"
            )
        if self.labels_per_class is not None and not 1 <= self.labels_per_class <= 100:
            # as `metapl digits` says it, by the option's name (the split named its config key)
            raise ConfigError(
                f"--labels-per-class must be between 1 and 100, got {self.labels_per_class}"
            )
        unknown = [m for m in self.students if m not in STUDENTS]
        if unknown or not self.students:
            raise ConfigError(
                f"--methods: unknown student {unknown[0]!r}; choose from {', '.join(STUDENTS)}"
                + did_you_mean(unknown[0], STUDENTS)
                if unknown
                else f"--methods: name at least one of {', '.join(STUDENTS)}"
            )
        stages = ("large_teacher", *self.students)
        for target, keys in self.overrides.items():
            # (`--set method=uda` trained UDA as each stage and reported it under the stage's name)
            check_command_keys(
                keys, {"seed": "--seeds", "method": "--methods", "dataset": "--dataset"}
            )
            if target == "*":
                both = {
                    "steps": ("--steps", self.steps),
                    "labels_per_class": ("--labels-per-class", self.labels_per_class),
                }
                check_not_both(keys, both)
            # Each seed's students read the large teacher this command trains for that seed; a
            # --set large_teacher went into every stage's config (the large teacher's too, which
            # then refused the next correct command into --out) and failed only after training.
            if "large_teacher" in {key.strip() for key in keys}:
                raise ConfigError(
                    "--set large_teacher=...: `metapl reduced` trains each seed's large teacher "
                    "and gives it to that seed's students; to use a large teacher of your own, "
                    "train a student with `metapl train --preset digits-reduced-reduced-mpl "
                    "--set large_teacher=RUN_DIR` (or -noisy-student)"
                )
            if target != "*" and target not in STAGES:
                raise ConfigError(
                    f"--set {target}:...: {target!r} is not a stage of `metapl reduced`; "
                    f"choose from {', '.join(STAGES)}{did_you_mean(target, STAGES)}"
                )
            if target != "*" and target not in stages:  # would be ignored without a word
                raise ConfigError(
                    f"--set {target}:...: stage {target} does not train here (--methods "
                    f"{','.join(self.students)})"
                )
        # Resolve every stage's config now, so that an unknown key or a bad value stops the
        # command before any worker starts; the error names the stage.
        configs = {}
        for method in stages:
            try:
                configs[method] = _stage_config(method, 0, self, Path("."))
                configs[method].check_keys_apply(self.overrides.get(method, {}))
            except ConfigError as err:
                raise ConfigError(f"stage {method}: {err}") from None
        # A key for every stage that none of them reads would be ignored without a word.
        for key in self.overrides.get("*", {}):
            reasons = [c.ignored_key(key) for c in configs.values()]
            if all(reasons):
                raise ConfigError(f"--set {key}: {reasons[0]}")
        from metapl.train.model_checks import check_config_models

        for method, stage_cfg in configs.items():  # a model that cannot take digits' images
            try:
                check_config_models(stage_cfg, 10, f"--set {method}:model=NAME")
            except ConfigError as err:
                raise ConfigError(f"stage {method}: {err}") from None
        return self

    def notes(self) -> list[str]:
        """What `metapl train` would note of the ReducedMPL student's config (the first-order
        estimator at a weight the user did not set); the other stages take no MPL step."""
        from metapl.train.config import first_order_note

        if "reduced_mpl" not in self.students:
            return []
        explicit = {*self.overrides.get("reduced_mpl", {}), *self.overrides.get("*", {})}
        stage = _stage_config("reduced_mpl", 0, self, Path("."))
        note = first_order_note(stage, "reduced", explicit)
        return [] if note is None else [note]


def _stage_config(method: str, seed: int, cfg: ReducedConfig, out: Path):
    """One (stage, seed) run's training config: the digits-reduced-* preset, the seed and the
    command's options, then the user's --set overrides (every stage's first, then this one's)."""
    from metapl.train.config import apply_overrides
    from metapl.train.presets import load_preset

    preset = load_preset(f"digits-reduced-{method.replace('_', '-')}")
    overrides: dict = {"seed": seed, "device": cfg.device}
    if cfg.steps is not None:
        overrides["steps"] = cfg.steps
        overrides["warmup_steps"] = min(preset.warmup_steps, cfg.steps)
        if preset.finetune_steps:  # the preset's share of the run (300 of 1,500 steps = 1/5)
            overrides["finetune_steps"] = max(1, preset.finetune_steps * cfg.steps // preset.steps)
    if cfg.labels_per_class is not None:
        overrides["labels_per_class"] = cfg.labels_per_class
    if method != "large_teacher":
        # as --out was given: relative, a moved or copied --out still resumes (and the same one
        # by another name, $PWD/rd or sub/rd from the folder above: report.same_file)
        overrides["large_teacher"] = str(out / "large_teacher" / f"seed{seed}")
    overrides.update(cfg.overrides.get("*", {}))
    overrides.update(cfg.overrides.get(method, {}))
    return apply_overrides(preset, overrides).validate()


def run_config_of(method: str, seed: int, saved: dict):
    """The training config of the (stage, seed) run of a results.json whose config is ``saved``
    (`metapl compare` reads what data the run had). Options ``saved`` lacks are the defaults."""
    known = {k: v for k, v in saved.items() if k in ReducedConfig.__dataclass_fields__}
    return _stage_config(method, seed, ReducedConfig(**known), Path("."))


def _run(job: tuple[str, int, ReducedConfig, str]) -> dict:
    method, seed, cfg, out = job
    import torch

    torch.set_num_threads(1)
    from metapl.train.engine import train

    run_cfg = _stage_config(method, seed, cfg, Path(out))
    summary = train(run_cfg, Path(out) / method / f"seed{seed}", show_progress=False)
    # the label budget the run had, --labels-per-class or the preset's (the file's config holds
    # null for the latter), so that `metapl compare` sees that both are one setting
    return {
        **run_record(summary["results"][0], method, seed),
        "labels_per_class": run_cfg.labels_per_class,
    }


def run_reduced(cfg: ReducedConfig, out: Path, show_progress: bool = True) -> dict:
    cfg.validate()
    # A rerun with other seeds (or steps, students...) would replace the earlier results.json.
    check_replaceable(
        out, "reduced", asdict(cfg), ignore=("workers",), defaults=asdict(ReducedConfig())
    )
    # every run's folder checked (and held) now, not after others ran
    runs = [
        out / name / f"seed{seed}"
        for name in ("large_teacher", *cfg.students)
        for seed in cfg.seeds
    ]
    with holding_run_folders(runs):
        for note in cfg.notes():  # after the checks: a mistake found in them is one line
            print(note, file=sys.stderr)
        resuming = resuming_note("reduced", out, runs)
        if resuming is not None and show_progress:
            print(resuming, file=sys.stderr)
        return _train_and_report(cfg, out, show_progress)


def _train_and_report(cfg: ReducedConfig, out: Path, show_progress: bool) -> dict:
    import os

    from metapl.experiments.figure10 import plot_figure10

    out.mkdir(parents=True, exist_ok=True)
    workers = min(cfg.workers or os.cpu_count() or 1, len(cfg.seeds) * len(cfg.students))
    with worker_pool(workers) as pool:
        stage = [("large_teacher", s, cfg, str(out)) for s in cfg.seeds]
        records = map_runs(pool, _run, stage, "large teachers", show_progress)
        slowest_first = [m for m in reversed(STUDENTS) if m in cfg.students]
        jobs = [(m, s, cfg, str(out)) for m in slowest_first for s in cfg.seeds]
        records += map_runs(pool, _run, jobs, "students", show_progress)
    records.sort(key=lambda r: (STAGES.index(r["method"]), r["seed"]))
    summary = summarize(records)
    # Table 2's question, seed by seed: is ReducedMPL above NoisyStudent (its only difference is
    # a teacher that adapts) and above the supervised student?
    paired = paired_differences(
        records, [("reduced_mpl", "noisy_student"), ("reduced_mpl", "supervised")]
    )
    payload = {
        "command": "reduced",
        "config": asdict(cfg),
        "results": records,
        "summary": summary,
        "paired": paired,
    }
    write_json_atomic(out / "results.json", payload)
    if "reduced_mpl" in cfg.students:
        plot_figure10(
            out / "reduced_mpl" / f"seed{cfg.seeds[0]}" / "figure10.json", out / "figure10.png"
        )
    print_accuracy_table(
        f"digits ReducedMPL (Section 4.2), seeds {cfg.seeds}: test accuracy (497 images)", summary
    )
    print_paired_differences(paired)
    figure = ", figure10.png" if "reduced_mpl" in cfg.students else ""
    print(f"wrote {out}/results.json{figure}; each run's folder in {out}/METHOD/seedN")
    return payload

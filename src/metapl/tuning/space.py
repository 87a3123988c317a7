"""The two search spaces of the incremental tuning (Appendix C.1) and how a trial's config is built.

The paper first tunes a supervised model, then tunes MPL's teacher with the student's values fixed
to the supervised ones. So:

- stage ``student`` trains method ``supervised`` (no fine-tuning phase) and samples ``STUDENT``;
- stage ``teacher`` trains the preset's own MPL method with stage 1's best values fixed and samples
  ``TEACHER``.

Learning rates are searched a decade either side of the preset's value (the presets carry Table 3's
values, so the range follows the dataset and the optimizer); the other ranges are absolute and cover
Table 3's three columns. Weight decay and label smoothing are Table 3's "common" rows: stage 1 fixes
them for both models. A key given with ``--set`` is fixed for every trial, so it is not searched.

Nothing here imports Optuna: a trial is anything with ``suggest_float(name, low, high, log=...)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from metapl.errors import ConfigError
from metapl.train.config import TrainConfig

STAGES = ("student", "teacher")


@dataclass(frozen=True)
class Range:
    """One searched config key. ``relative``: the bounds are factors of the base config's value."""

    key: str
    low: float
    high: float
    log: bool = False
    relative: bool = False
    methods: tuple[str, ...] | None = None  # searched only for these methods (None: all)

    def bounds(self, base: TrainConfig) -> tuple[float, float]:
        if not self.relative:
            return self.low, self.high
        anchor = float(getattr(base, self.key))
        if anchor <= 0:
            raise ConfigError(f"{self.key} must be > 0 to search around it, got {anchor}")
        return self.low * anchor, self.high * anchor

    def describe(self) -> str:
        scale = "log-uniform" if self.log else "uniform"
        where = f" (only {', '.join(self.methods)})" if self.methods else ""
        if self.relative:
            return f"{self.key}: {scale}, {self.low:g}x to {self.high:g}x the preset's value{where}"
        return f"{self.key}: {scale} in [{self.low:g}, {self.high:g}]{where}"


# Table 3 for reference: student lr 0.3 / 0.15 / 0.8, dropout 0.35 / 0.45 / 0.1, weight decay
# 5e-4 / 5e-4 / 2e-4, label smoothing 0 / 0 / 0.1; teacher lr 0.125 / 0.05 / 0.5, dropout
# 0.5 / 0.65 / 0.1; UDA factor 1 / 2.5 / 16, UDA temperature 0.8 / 1.25 / 0.75.
STUDENT = (
    Range("student_lr", 0.1, 10.0, log=True, relative=True),
    Range("weight_decay", 1e-5, 1e-2, log=True),
    Range("student_dropout", 0.0, 0.7),
    Range("label_smoothing", 0.0, 0.2),
)
TEACHER = (
    Range("teacher_lr", 0.1, 10.0, log=True, relative=True),
    Range("teacher_dropout", 0.0, 0.7),
    Range("mpl_temperature", 0.5, 2.0, log=True),
    Range("uda_factor", 0.25, 16.0, log=True, methods=("uda_mpl",)),
    Range("uda_temperature", 0.5, 1.5, methods=("uda_mpl",)),
)
SPACES = {"student": STUDENT, "teacher": TEACHER}


def stage_base(base: TrainConfig, stage: str, student_values: dict[str, Any]) -> TrainConfig:
    """The config every trial of ``stage`` starts from (before its sampled values)."""
    if stage == "student":
        return dataclasses.replace(base, method="supervised", finetune_steps=0)
    if not base.uses_mpl:
        raise ConfigError(
            f"stage teacher tunes an MPL teacher, but the preset's method is {base.method}: "
            "use an *-mpl preset, or --stage student"
        )
    return dataclasses.replace(base, **student_values)


def searched(stage: str, cfg: TrainConfig, fixed: set[str]) -> list[Range]:
    """The ranges of ``stage`` that apply to ``cfg``'s method and are not fixed by ``--set``."""
    return [
        r
        for r in SPACES[stage]
        if r.key not in fixed and (r.methods is None or cfg.method in r.methods)
    ]


def sample(trial, stage: str, cfg: TrainConfig, fixed: set[str]) -> dict[str, float]:
    """Ask ``trial`` for one value of each searched key; returns key -> value."""
    values = {}
    for r in searched(stage, cfg, fixed):
        low, high = r.bounds(cfg)
        values[r.key] = trial.suggest_float(r.key, low, high, log=r.log)
    return values


def trial_config(
    base: TrainConfig, stage: str, student_values: dict[str, Any], sampled: dict[str, Any]
) -> TrainConfig:
    """The validated config of one trial: stage base + sampled values, on the tuning split."""
    cfg = dataclasses.replace(stage_base(base, stage, student_values), **sampled, tuning=True)
    return cfg.validate()

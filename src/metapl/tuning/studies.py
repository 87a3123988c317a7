"""Joining a study that other processes share, and handing stage 1's result to stage 2.

Exactly one process creates a study (Optuna's ``create_study`` is atomic in the database), and it
records in the study's user attributes what the study is: the trial config every process must use
and, for a teacher study, the student's values it fixed. Every other process adopts those records,
so all trials of one study share one student, and a process started with other options (another
``--steps``, another ``--set``) is refused instead of silently mixing incomparable trials.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from metapl.errors import ConfigError
from metapl.train.config import TrainConfig
from metapl.tuning.retry import fail_stopped_trials

POLL_S = 1.0
ATTRS_WAIT_S = 60.0
# Options that may differ between the machines of one study: they do not change what a trial means.
MACHINE_KEYS = ("device", "data_dir", "preset", "unlabeled_dir", "large_teacher")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(config.items()) if k not in MACHINE_KEYS}


# What a creator records in a new study (Stage.attrs), "config" last.
RECORDS = frozenset(
    ("config", "searched", "student_values", "student_trial", "student_accuracy", "student_study")
)


def join_study(optuna, storage, name: str, make_attrs: Callable[[], dict], sampler, pruner):
    """Load study ``name``, or create it with the user attributes ``make_attrs()`` (only called
    when this process may be the creator). Returns the study once its attributes are visible.

    A study left without its records by a creator that died between creating it and recording
    them (``kill -9``; no trial can have run in it) is deleted and created again: otherwise every
    later run waited for them and then refused the study's name for good."""
    while True:
        try:
            study = optuna.load_study(
                study_name=name, storage=storage, sampler=sampler, pruner=pruner
            )
        except KeyError:
            attrs = make_attrs()
            try:
                study = optuna.create_study(
                    study_name=name,
                    storage=storage,
                    direction="maximize",
                    sampler=sampler,
                    pruner=pruner,
                )
            except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
                continue  # join it
            for key, value in sorted(attrs.items(), key=lambda kv: kv[0] == "config"):
                study.set_user_attr(key, value)  # "config" last: the others wait for it
            return study
        try:
            if _records_written(study):
                return study
            _delete_abandoned(storage, study)
        except KeyError:  # deleted meanwhile, by a process that found it abandoned too: join again
            continue


def _records_written(study) -> bool:
    """Whether the study's creator recorded "config" (waiting up to ``ATTRS_WAIT_S`` for it)."""
    deadline = time.monotonic() + ATTRS_WAIT_S
    while "config" not in study.user_attrs:  # its creator is writing them
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S / 4)
    return True


def _delete_abandoned(storage, study) -> None:
    """Delete a study without "config" that a dead creator left (no trial, at most some of the
    records); one with trials or other attributes is someone else's: a ConfigError."""
    if study.get_trials(deepcopy=False) or not set(study.user_attrs) <= RECORDS:
        raise ConfigError(
            f"study {study.study_name} has no metapl records (created by something else): use "
            "another --study name"
        )
    print(
        f"study {study.study_name}: its creator stopped before recording its settings (no trial "
        "ran in it); creating it again",
        flush=True,
    )
    # By the id this process saw: never a study another process has created again since.
    storage.delete_study(study._study_id)


def check_same_config(study, config: dict[str, Any], searched: list[str]) -> None:
    """Refuse to add trials of another configuration or search space to ``study``."""
    have, want = study.user_attrs["config"], comparable(config)
    default = TrainConfig().to_dict()  # a key added to metapl since the study began: its default
    differ = sorted(
        k
        for k in set(have) | set(want)
        if have.get(k, default.get(k)) != want.get(k, default.get(k))
    )
    if study.user_attrs.get("searched") != searched:
        differ.append("the searched keys (--set fixes a key)")
    if differ:
        raise ConfigError(
            f"study {study.study_name} was created with other settings ({', '.join(differ)}): give "
            "every process the same --preset, --steps and --set, or use another --study name"
        )


def wait_for_running(optuna, study) -> None:
    """Wait until no trial of ``study`` runs (other processes still in stage 1). Trials of dead
    processes stop counting after the heartbeat grace period (on this host, at once)."""
    told = False
    while True:
        fail_stopped_trials(optuna, study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not told:
            print(
                f"waiting for {len(running)} running trial(s) of {study.study_name} "
                "before fixing the student's values",
                flush=True,
            )
            told = True
        time.sleep(POLL_S)


def missing_student_study(name: str, why: str) -> ConfigError:
    """Stage teacher without stage 1's study: ``why`` says how it is missing."""
    return ConfigError(
        f"stage teacher fixes the student's values to the best trial of study {name}, which "
        f"{why}: run --stage student first, or --stage both"
    )


def student_result(optuna, storage, name: str) -> dict[str, Any]:
    """Stage 1's best trial: the student values that stage 2 fixes, and where they came from."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise missing_student_study(name, "this storage does not have") from None
    wait_for_running(optuna, study)
    best = best_trial(study)
    return {
        "student_values": dict(best.params),
        "student_trial": best.number,
        "student_accuracy": best.value,
        "student_study": name,
    }


def best_trial(study):
    """The best complete trial; a ConfigError when none finished, or when the best diverged (a
    diverged trial scores 0, so then they all did)."""
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is None:
        what = "no trial finished (all were pruned or failed)"
    elif "diverged" in best.user_attrs:
        what = "every finished trial diverged"
    else:
        return best
    raise ConfigError(f"study {study.study_name}: {what}; run more trials")

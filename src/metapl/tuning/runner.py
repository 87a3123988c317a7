"""The tuning run: stage 1 (student), stage 2 (teacher), then ``OUT/best.toml``.

Each trial is an ordinary ``metapl train`` run folder, ``OUT/trials/<study>/<number>/``, trained
with ``tuning=true``: on the labeled data minus the tuning split, evaluated on the tuning split. The
test set never enters a trial (:meth:`SSLSplit.tuning_view` puts the tuning examples where the
engine evaluates). Its score is the last model's tuning accuracy, as a final run reports the last
model. Each evaluation on the way is reported to a median pruner through ``train``'s ``on_eval``
hook, so a trial that trails the earlier ones at the same step stops early.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metapl.errors import ConfigError, NonFiniteLossError, WriteError
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.presets import load_preset
from metapl.train.stopping import Stopped, TrainingStopped
from metapl.tuning import bestfile, retry, space, studies
from metapl.tuning.storage import GRACE_S, import_optuna, new_sqlite_file, open_storage

STARTUP_TRIALS = 5  # the pruner and TPE's model both start after this many trials


@dataclass
class TuneOptions:
    preset: str
    trials: int
    storage: str
    out: Path
    study: str | None = None
    stage: str = "both"  # student | teacher | both
    # --set: every trial, and best.toml
    overrides: dict[str, Any] = field(default_factory=dict)
    # --steps / --device / --data-dir: the trials only
    runtime: dict[str, Any] = field(default_factory=dict)
    prune: bool = True
    show_progress: bool = True
    # printed on stderr once the options are checked (the --steps warm-up cut): printed before,
    # it made a mistake in --set two lines
    note: str | None = None


def train_command(opts: TuneOptions) -> str:
    """The command that trains ``OUT/best.toml``, with the trials' ``--data-dir``: best.toml leaves
    it out (another machine's data may be elsewhere), and without it the hint failed. The paths are
    quoted as a shell needs them: `--out "runs/my tune"` printed a command that, pasted, split the
    path in two."""
    data_dir = opts.runtime.get("data_dir")
    data = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    return f"metapl train --preset {shlex.quote(str(opts.out / 'best.toml'))}{data} --out RUN"


def label_budget_note(cfg: TrainConfig) -> str | None:
    """On digits, best.toml keeps ``tune_per_class``, so its run trains on the K labels per class
    and the T tuning ones (as the paper's CIFAR-10 runs train on the 400 tuning labels too). Said
    next to the command, since a comparison at the budget K would otherwise silently get K + T."""
    if cfg.dataset != "digits" or not cfg.tune_per_class:
        return None
    k, t = cfg.labels_per_class, cfg.tune_per_class
    return (
        f"digits: it trains on {k} + {t} = {k + t} labels per class (tune_per_class={t}); "
        f"add --set tune_per_class=0 to train on the {k} alone"
    )


def study_name(opts: TuneOptions) -> str:
    name = opts.study or Path(opts.preset).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def _short(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


class Stage:
    """One stage's study and objective."""

    def __init__(self, tuner: Tuner, stage: str):
        self.tuner, self.stage = tuner, stage
        self.name = f"{tuner.name}-{stage}"
        # teacher stage: stage 1's result, as the study records it
        self.student: dict[str, Any] = {}
        self.base = space.stage_base(tuner.trial_base, stage, {})
        self.searched = [r.key for r in space.searched(stage, self.base, tuner.fixed)]
        # trials this process started in the current optimize, and the one it gave up (objective)
        self.started: int = 0
        self.lost: int | None = None
        if not self.searched:
            raise ConfigError(f"stage {stage}: --set fixes every searched key; nothing to tune")

    @property
    def student_values(self) -> dict[str, Any]:
        return self.student.get("student_values", {})

    def _adopt(self, student: dict[str, Any]) -> None:
        self.student = {k: v for k, v in student.items() if k.startswith("student_")}
        self.base = space.stage_base(self.tuner.trial_base, self.stage, self.student_values)

    def attrs(self) -> dict[str, Any]:
        """The records of a new study; only its creator calls this (and, in stage 2, looks up
        stage 1's best trial, waiting for stage 1's running trials first)."""
        if self.stage == "teacher":
            t = self.tuner
            self._adopt(studies.student_result(t.optuna, t.storage, f"{t.name}-student"))
        config = studies.comparable(self.base.to_dict())
        return {"config": config, "searched": self.searched, **self.student}

    def objective(self, trial) -> float:
        optuna = self.tuner.optuna
        self.started += 1
        try:
            return self._trial(trial)
        except WriteError:
            # A full disk, say: the command stops with the one line that names the file and says
            # to run it again, which resumes the trial only if a copy of it waits in the study
            # (Optuna marks the trial failed); and Optuna logged the error with a traceback.
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            try:
                retry.queue_interrupted(optuna, trial)
                then = "the same command resumes it from its last checkpoint"
            except Exception:  # noqa: BLE001 - the storage on the same full disk: the write's error says it
                then = "no copy of it could be queued in the study"
            print(
                f"{self.name} trial {trial.number}: stopped by a failed write; {then}", flush=True
            )
            raise
        except Exception as err:
            if isinstance(err, optuna.TrialPruned) or not retry.taken_over(optuna, trial):
                raise
            # Another process marked this trial failed while this one was paused or cut off (its
            # heartbeat went stale) and queued a copy, which resumes the trial's folder: this
            # process lets go of the trial (Optuna, unable to record it, raises from optimize; see
            # run) and goes on with its next one.
            self.lost = trial.number
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # not Optuna's traceback of it
            copy_number = retry.copy_of(optuna, trial)
            if copy_number is None:
                then = (
                    f"no copy of it was queued (a trial killed {retry.MAX_RETRIES + 1} times is "
                    "not tried again)"
                )
            else:
                then = f"this process leaves the trial to its copy, trial {copy_number}"
            print(
                f"{self.name} trial {trial.number}: taken over by another process (no heartbeat "
                f"from this process for over {GRACE_S} s: it was paused, suspended or cut off from "
                f"the storage); {then}",
                flush=True,
            )
            raise
        except KeyboardInterrupt as stop:
            # Ctrl-C, wherever it lands in the trial, or a SIGTERM that stopped its training at a
            # checkpoint (metapl.train.stopping): Optuna records the trial as failed and logs it
            # with a traceback; the command line says "interrupted" in one line instead. A copy of
            # the trial waits in the study, to resume from the trial's last checkpoint.
            retry.queue_interrupted(optuna, trial)  # first: it ignores a second Ctrl-C
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            if isinstance(stop, TrainingStopped):
                how = f"stopped by {signal.Signals(stop.signum).name} at step {stop.step}"
            elif isinstance(stop, Stopped):  # before or after its steps: nothing to save
                how = f"stopped by {signal.Signals(stop.signum).name}"
            else:
                how = "interrupted"
            print(
                f"{self.name} trial {trial.number}: {how}; the same command resumes it from its "
                "last checkpoint",
                flush=True,
            )
            raise

    def _trial(self, trial) -> float:
        optuna, opts = self.tuner.optuna, self.tuner.opts
        # first: from here on, a rerun on this host finds at once that this trial's process is gone
        retry.record_process(trial)
        record = retry.frozen(trial)  # before sampling: a copy's values are set, a new trial's not
        values = space.sample(trial, self.stage, self.base, self.tuner.fixed)
        cfg = space.trial_config(self.tuner.trial_base, self.stage, self.student_values, values)
        run_dir = opts.out / "trials" / self.name / str(trial.number)
        chain = retry.stopped_trials(optuna, record)  # this trial continues these, stopped
        resumed = retry.take_over_folder(chain, run_dir)
        retry.remove_stopped_folders(chain, run_dir)
        if not resumed and run_dir.exists():  # numbers never repeat in a storage: an earlier one's
            shutil.rmtree(run_dir)
        if chain and not record.params:  # stopped before it chose its values: nothing to resume
            print(
                f"{self.name} trial {trial.number}: replaces trial {chain[-1]}, stopped before it "
                "chose its values (new values)",
                flush=True,
            )
        elif chain:
            how = "from its checkpoint" if resumed else "from the start (no checkpoint of it here)"
            print(f"{self.name} trial {trial.number}: resumes trial {chain[-1]} {how}", flush=True)
        # where to find the run folder when several machines share the study
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        reported = set(record.intermediate_values)  # the stopped trial's, carried over

        def on_eval(step: int, accuracies: dict[str, float]) -> None:
            accuracy = accuracies["test_accuracy"]  # the tuning split, in a tuning run
            if step not in reported:  # a resumed run evaluates again after its checkpoint
                # raises UpdateFinishedTrialError for a trial taken over (see objective)
                trial.report(accuracy, step)
            if trial.should_prune():
                print(
                    f"{self.name} trial {trial.number}: pruned at step {step} "
                    f"(tuning accuracy {100 * accuracy:.2f}%)",
                    flush=True,
                )
                raise optuna.TrialPruned()

        try:
            summary = self.tuner.train(cfg, run_dir, opts.show_progress, on_eval=on_eval)
        except NonFiniteLossError as err:  # a diverging setting is a bad one, not a crash
            trial.set_user_attr("diverged", str(err))
            print(f"{self.name} trial {trial.number}: diverged ({_short(values)})", flush=True)
            return 0.0
        retry.check_still_ours(optuna, trial)  # Optuna cannot record a trial taken over
        record = summary["results"][0]
        if not record["dataset"].endswith("-tune"):
            raise RuntimeError(f"trial {trial.number} did not run on the tuning split")
        accuracy = record["accuracy"]
        print(
            f"{self.name} trial {trial.number}: tuning accuracy {100 * accuracy:.2f}% "
            f"({_short(values)})",
            flush=True,
        )
        return accuracy

    def run(self):
        optuna = self.tuner.optuna
        sampler = optuna.samplers.TPESampler(n_startup_trials=STARTUP_TRIALS, constant_liar=True)
        if self.tuner.opts.prune:
            warmup = max(1, self.base.steps // 4)
            pruner = optuna.pruners.MedianPruner(
                n_startup_trials=STARTUP_TRIALS, n_warmup_steps=warmup
            )
        else:
            pruner = optuna.pruners.NopPruner()
        study = studies.join_study(
            optuna, self.tuner.storage, self.name, self.attrs, sampler, pruner
        )
        if self.stage == "teacher":  # the creator's student values, whoever created the study
            self._adopt(study.user_attrs)
        studies.check_same_config(study, self.base.to_dict(), self.searched)
        retry.fail_stopped_trials(optuna, study)  # copies of them run first, resumed
        remaining = self.tuner.opts.trials
        while remaining > 0:
            self.started, self.lost = 0, None
            try:
                study.optimize(self.objective, n_trials=remaining)
                return study
            except Exception:
                if self.lost is None:
                    raise
                # Optuna's "Cannot tell a FAIL trial" for the trial given up (objective): go on
                optuna.logging.set_verbosity(optuna.logging.WARNING)
            remaining -= self.started
        return study


class Tuner:
    """Resolves the options once (every mistake fails here, before any trial), then runs the
    stages and writes best.toml."""

    def __init__(self, opts: TuneOptions):
        from metapl.train.engine import load_data, resolve_device, train

        self.opts, self.train = opts, train
        if opts.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {opts.trials}")
        if opts.stage not in ("student", "teacher", "both"):
            raise ConfigError(f"--stage must be student, teacher or both, got {opts.stage!r}")
        self.name = study_name(opts)
        if "tuning" in opts.overrides:  # it was ignored by every trial and left out of best.toml
            raise ConfigError(
                "--set tuning=...: every trial trains with tuning=true (scored on the tuning "
                "split), and best.toml leaves it out (its run trains on all labeled data); do not "
                "set it"
            )
        # best.toml's base: the preset and --set, without the trials' runtime options
        self.final_base = apply_overrides(load_preset(opts.preset), opts.overrides)
        self.trial_base = apply_overrides(self.final_base, opts.runtime).validate()
        self.final_base.check_keys_apply(opts.overrides)  # a --set the preset's method ignores
        # and a --data-dir it ignores (digits): best.toml's printed command passed it on, and
        # `metapl train` refused it
        self.trial_base.check_keys_apply(key for key in opts.runtime if key == "data_dir")
        # best.toml must be a valid preset too: `--set steps=N` with the trials' --steps
        # (whose warm-up cut best.toml leaves out) failed only when it was written, after
        # every trial had run
        try:
            self.final_base.validate()
        except ConfigError as err:
            raise ConfigError(
                f"best.toml would hold the preset and --set, without --steps (the trials' "
                f"alone): {err}"
            ) from None
        best = Path(opts.out) / "best.toml"
        # (its write failed after every trial had run: "could not write ...: Is a directory")
        if best.is_dir():
            raise ConfigError(
                f"--out {opts.out}: {best} is a folder, where metapl tune writes its result; move "
                "it or choose another --out"
            )
        self.fixed = set(opts.overrides)
        # A dataset without a tuning split, or a missing or malformed one, fails here, as one
        # line, not inside a trial (where Optuna would log it with a traceback and keep a failed
        # trial in the study).
        load_data(dataclasses.replace(self.trial_base, tuning=True))
        resolve_device(self.trial_base.device)  # --device cuda without one failed in trial 0 too
        self.stages = ["student", "teacher"] if opts.stage == "both" else [opts.stage]
        for stage in self.stages:  # a non-MPL preset for stage teacher fails here
            space.trial_config(self.trial_base, stage, {}, {})
        self.optuna = import_optuna()
        new_database = new_sqlite_file(opts.storage)
        if self.stages == ["teacher"] and new_database is not None:
            # refused before opening it, which would leave a new database with empty tables
            raise studies.missing_student_study(
                f"{self.name}-student", f"is not in {new_database} (no such file)"
            )
        self.storage = open_storage(opts.storage)
        if opts.note is not None:
            print(opts.note, file=sys.stderr)

    def run(self) -> Path | None:
        done = {stage: Stage(self, stage).run() for stage in self.stages}
        return self.write_best(done)

    def write_best(self, done: dict) -> Path | None:
        """best.toml from the last stage run: stage 2's best trial plus the student values its
        study fixed, or stage 1's best trial alone. None, with a line saying why, when no trial
        has finished yet but others run in other processes (each writes best.toml as it ends):
        this process's trials were pruned, or taken over by a copy that still runs."""
        stage = "teacher" if "teacher" in done else "student"
        last = done[stage]
        State = self.optuna.trial.TrialState
        retry.fail_stopped_trials(self.optuna, last)  # a dead process's trial is not "running"
        running = last.get_trials(deepcopy=False, states=(State.RUNNING,))
        if running and not last.get_trials(deepcopy=False, states=(State.COMPLETE,)):
            print(
                f"best.toml not written yet: no trial of {last.study_name} has finished, and "
                f"{len(running)} still run in other processes (each process writes best.toml to "
                "its --out when its trials end)",
                flush=True,
            )
            return None
        picks = []  # (stage, study, trial, accuracy, values)
        if stage == "teacher":
            a = last.user_attrs
            keys = ("student_study", "student_trial", "student_accuracy", "student_values")
            picks.append(("student", *(a[k] for k in keys)))
        best = studies.best_trial(last)
        picks.append((stage, last.study_name, best.number, best.value, best.params))
        # completed or pruned: a stopped trial (failed) and the copy that resumed it count once
        counted = (State.COMPLETE, State.PRUNED)
        finished = len(last.get_trials(deepcopy=False, states=counted))
        header = [
            f"metapl tune: the best configuration found for preset {self.opts.preset}",
            "(Appendix C.1, incremental: the student's values first, then the teacher's)",
        ]
        values: dict[str, Any] = {}
        tuned: dict[str, str] = {}
        for stage, name, number, accuracy, params in picks:
            header.append(
                f"stage {stage}: study {name}, trial {number}, tuning accuracy {100 * accuracy:.2f}%"
            )
            for key, value in params.items():
                values[key], tuned[key] = value, f"stage {stage}: {name} trial {number}"
        header += [
            f"({finished} trial{'s' * (finished != 1)} of {last.study_name} finished when this "
            "was written)",
            f"trials ran {self.trial_base.steps} steps on the tuning split; this file keeps the "
            f"preset's {self.final_base.steps} steps and trains on all labeled data",
            f"trial run folders: {self.opts.out / 'trials'}",
            f"train it: {train_command(self.opts)}",
        ]
        note = label_budget_note(self.final_base)
        if note is not None:
            header.append(note)
        cfg = dataclasses.replace(self.final_base, **values).validate()
        path = self.opts.out / "best.toml"
        bestfile.write_atomic(path, bestfile.render(cfg, header, tuned))
        return path


def tune(opts: TuneOptions) -> Path | None:
    """Run ``opts``; returns the path of best.toml (None: not written, see Tuner.write_best)."""
    return Tuner(opts).run()

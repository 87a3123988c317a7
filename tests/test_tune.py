"""`metapl tune`: search spaces, the two stages, best.toml, the tuning split, pruning, errors, and
two processes sharing one SQLite study.

Real trials are a few steps of the digits CNN with a tuning split of 3 images per class; the stage
logic runs with a fake ``train`` so that it costs nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from postgres_server import postgres_url

import metapl.data.digits as digits_module
import metapl.train.engine as engine
from metapl.cli import main
from metapl.data.digits import digits_split
from metapl.errors import ConfigError, NonFiniteLossError
from metapl.models import create_model
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import apply_overrides
from metapl.train.data import evaluate, evaluate_models
from metapl.train.presets import load_preset
from metapl.tuning import TuneOptions, bestfile, space
from metapl.tuning.runner import Tuner
from metapl.tuning.storage import open_storage

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY = {
    "tune_per_class": "3",
    "warmup_steps": "2",
    "uda_warmup_steps": "2",
    "uda_threshold": "0",
    "batch_size": "10",
    "unlabeled_ratio": "2",
    "eval_every": "3",
    "log_every": "3",
    "checkpoint_every": "6",
    "finetune_steps": "0",
}


def options(tmp_path: Path, **changes) -> TuneOptions:
    values = {
        "preset": "digits-uda-mpl",
        "trials": 1,
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "out": tmp_path / "out",
        "study": "t",
        "stage": "student",
        "overrides": dict(TINY),
        "runtime": {"steps": 6, "device": "cpu"},
        "show_progress": False,
    }
    return TuneOptions(**{**values, **changes})


def tiny_args(tmp_path: Path, storage: str | None = None) -> list[str]:
    storage = storage or f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--storage", storage, "--out", str(tmp_path / "out")]
    args += ["--steps", "6", "--device", "cpu", "--quiet", "--study", "t"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return args


class RecordingTrial:
    def __init__(self):
        self.asked = {}

    def suggest_float(self, name, low, high, log=False):
        self.asked[name] = (low, high, log)
        return low


# --- the digits tuning split -----------------------------------------------------------------


def test_digits_tune_per_class_appends_a_balanced_tuning_split():
    plain, tuned = digits_split(4, 5), digits_split(4, 5, tune_per_class=3)
    assert len(plain.y_tune) == 0 and len(tuned.y_tune) == 30
    assert np.bincount(tuned.y_tune).tolist() == [3] * 10
    np.testing.assert_array_equal(tuned.x_labeled[:50], plain.x_labeled)  # K unchanged by T
    np.testing.assert_array_equal(tuned.x_labeled[50:], tuned.x_tune)  # the last entries
    np.testing.assert_array_equal(tuned.x_test, plain.x_test)
    assert len(tuned.x_unlabeled) == len(plain.x_unlabeled) - 30  # never unlabeled data
    rows = {row.tobytes() for row in tuned.x_unlabeled}
    assert not rows & {row.tobytes() for row in tuned.x_tune}  # the 1,797 images are distinct
    view = tuned.tuning_view()
    assert len(view.y_labeled) == 50 and view.y_test is tuned.y_tune
    with pytest.raises(ConfigError, match="tune_per_class must be between 0 and"):
        digits_split(4, 5, tune_per_class=500)


# --- search spaces and stages (unit) ---------------------------------------------------------


def test_student_space_is_supervised_and_anchored_on_the_preset():
    base = load_preset("digits-uda-mpl")  # student_lr 0.2
    cfg = space.stage_base(base, "student", {})
    assert (cfg.method, cfg.finetune_steps) == ("supervised", 0)
    trial = RecordingTrial()
    values = space.sample(trial, "student", cfg, fixed=set())
    assert list(values) == ["student_lr", "weight_decay", "student_dropout", "label_smoothing"]
    assert trial.asked["student_lr"] == (pytest.approx(0.02), pytest.approx(2.0), True)
    assert trial.asked["student_dropout"] == (0.0, 0.7, False)
    # a key fixed with --set is not searched
    fixed = space.sample(RecordingTrial(), "student", cfg, fixed={"weight_decay"})
    assert "weight_decay" not in fixed


def test_teacher_space_depends_on_the_mpl_method_and_fixes_the_student():
    uda_mpl = load_preset("digits-uda-mpl")
    student = {"student_lr": 0.07, "weight_decay": 1e-4, "label_smoothing": 0.05}
    cfg = space.stage_base(uda_mpl, "teacher", student)
    assert (cfg.method, cfg.student_lr, cfg.weight_decay) == ("uda_mpl", 0.07, 1e-4)
    keys = [r.key for r in space.searched("teacher", cfg, set())]
    assert keys == [
        "teacher_lr",
        "teacher_dropout",
        "mpl_temperature",
        "uda_factor",
        "uda_temperature",
    ]
    supervised_mpl = load_preset("cifar10-4k-supervised-mpl")
    keys = [r.key for r in space.searched("teacher", supervised_mpl, set())]
    assert "uda_factor" not in keys and "teacher_lr" in keys
    with pytest.raises(ConfigError, match="MPL teacher"):
        space.stage_base(load_preset("digits-uda"), "teacher", {})


def test_sampled_values_stay_in_bounds_and_make_valid_tuning_configs():
    base = apply_overrides(load_preset("digits-uda-mpl"), {"tune_per_class": 3})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for stage in space.STAGES:
        cfg = space.stage_base(base, stage, {})
        ranges = {r.key: r.bounds(cfg) for r in space.searched(stage, cfg, set())}
        for _ in range(20):
            values = space.sample(study.ask(), stage, cfg, set())
            assert all(ranges[k][0] <= v <= ranges[k][1] for k, v in values.items())
            trial_cfg = space.trial_config(base, stage, {}, values)
            assert trial_cfg.tuning and all(getattr(trial_cfg, k) == v for k, v in values.items())


def fake_train(calls: list):
    """A stand-in for engine.train: accuracy peaks at student_lr 0.1 and teacher_lr 0.3."""

    def train(cfg, out_dir, show_progress=True, on_eval=None):
        calls.append(cfg)
        accuracy = (
            1 - abs(np.log(cfg.student_lr / 0.1)) / 10 - abs(np.log(cfg.teacher_lr / 0.3)) / 10
        )
        on_eval(cfg.steps, {"test_accuracy": accuracy})
        record = {"accuracy": accuracy, "dataset": "digits-5pc-3tune-seed0-tune"}
        return {"results": [record]}

    return train


def test_stage_both_fixes_stage_one_best_in_every_teacher_trial(tmp_path):
    calls = []
    tuner = Tuner(options(tmp_path, stage="both", trials=3))
    tuner.train = fake_train(calls)
    path = tuner.run()
    assert [c.method for c in calls] == ["supervised"] * 3 + ["uda_mpl"] * 3
    assert all(c.tuning and c.steps == 6 and c.finetune_steps == 0 for c in calls[:3])
    student = optuna.load_study(study_name="t-student", storage=tuner.opts.storage)
    teacher = optuna.load_study(study_name="t-teacher", storage=tuner.opts.storage)
    best = student.best_trial
    assert teacher.user_attrs["student_values"] == best.params
    assert teacher.user_attrs["student_trial"] == best.number
    for cfg in calls[3:]:
        assert all(getattr(cfg, k) == v for k, v in best.params.items())
        assert cfg.teacher_lr != load_preset("digits-uda-mpl").teacher_lr
    cfg = load_preset(str(path))
    assert cfg.method == "uda_mpl" and cfg.steps == 1500 and not cfg.tuning  # the preset's budget
    assert cfg.student_lr == best.params["student_lr"]
    assert cfg.teacher_lr == teacher.best_trial.params["teacher_lr"]
    assert cfg.tune_per_class == 3 and cfg.batch_size == 10  # --set values stay
    # ...so the final run trains on K + T labels per class, and best.toml says so (the hint alone
    # gave a run at another label budget than the one tuned for).
    assert (
        "# digits: it trains on 5 + 3 = 8 labels per class (tune_per_class=3); add --set "
        "tune_per_class=0 to train on the 5 alone\n"
    ) in path.read_text()


def test_diverged_trial_scores_zero(tmp_path):
    tuner = Tuner(options(tmp_path))

    def diverging(*args, **kwargs):
        raise NonFiniteLossError("student_loss is nan at step 3")

    tuner.train = diverging
    with pytest.raises(ConfigError, match="every finished trial diverged"):
        tuner.run()
    (trial,) = optuna.load_study(study_name="t-student", storage=tuner.opts.storage).trials
    assert trial.value == 0.0 and "nan" in trial.user_attrs["diverged"]


# --- best.toml --------------------------------------------------------------------------------


def test_best_toml_round_trips_through_load_preset(tmp_path):
    base = apply_overrides(
        load_preset("digits-uda-mpl"),
        {"large_teacher": 'runs/"big" teacher\\x', "data_dir": "/data", "device": "cpu"},
    )
    tuned = {"student_lr": 1.2345678901234567e-05, "teacher_dropout": 0.0, "uda_factor": 16.0}
    cfg = apply_overrides(base, tuned)
    notes = {k: "stage x: s trial 1" for k in tuned}
    path = tmp_path / "best.toml"
    bestfile.write_atomic(path, bestfile.render(cfg, ["header line", ""], notes))
    text = path.read_text()
    assert text.startswith("# header line\n#\n") and "# stage x: s trial 1" in text
    loaded = load_preset(str(path))
    assert {k: getattr(loaded, k) for k in tuned} == tuned
    expected = {**cfg.to_dict(), "preset": str(path), "data_dir": None, "device": "auto"}
    assert loaded.to_dict() == expected


# --- the objective reads the tuning split, never the test split ----------------------------------


def test_trials_evaluate_on_the_tuning_split_only(tmp_path, monkeypatch):
    splits, evaluated = [], []

    def spy_split(*args):
        splits.append(digits_split(*args))
        return splits[-1]

    def spy_evaluate(models, images, *args, **kwargs):
        evaluated.append(images)
        return evaluate_models(models, images, *args, **kwargs)

    monkeypatch.setattr(digits_module, "digits_split", spy_split)
    monkeypatch.setattr(engine, "evaluate_models", spy_evaluate)
    opts = options(tmp_path, trials=1)
    Tuner(opts).run()
    first_check, split = splits  # read once before any trial (to fail early), then by the trial
    assert len(split.y_tune) == 30 and evaluated
    assert any(x is split.x_tune for x in evaluated)
    assert not any(x is split.x_test for x in evaluated)

    (trial,) = optuna.load_study(study_name="t-student", storage=opts.storage).trials
    run_dir = Path(trial.user_attrs["run_dir"])
    assert run_dir == opts.out / "trials" / "t-student" / "0"
    model = create_model("digits_cnn", 10)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["student"])
    cfg = load_preset("digits-uda-mpl")
    tune_accuracy = evaluate(model, split.x_tune, split.y_tune, cfg, torch.device("cpu"))
    assert trial.value == tune_accuracy
    assert sorted(trial.intermediate_values) == [3, 6]  # each evaluation, reported to the pruner
    assert trial.intermediate_values[6] == tune_accuracy
    results = json.loads((run_dir / "results.json").read_text())
    assert results["results"][0]["dataset"] == "digits-5pc-3tune-seed0-tune"
    assert results["config"]["tuning"] is True


def test_pruned_trial_stops_at_the_evaluation_that_pruned_it(tmp_path, monkeypatch):
    class PruneSecondTrial(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: PruneSecondTrial())
    opts = options(tmp_path, trials=2)
    Tuner(opts).run()
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert list(study.trials[1].intermediate_values) == [3]  # stopped at its first evaluation
    assert not (opts.out / "trials" / "t-student" / "1" / "results.json").exists()


# --- errors: one line, exit code 2, nothing written --------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--storage", "study.db"], "is not a database URL: use sqlite:///"),
        (
            ["--storage", "sqlite:////no/such/folder/s.db"],
            "folder /no/such/folder does not exist; create it first (mkdir -p /no/such/folder)",
        ),
        (["--set", "student_rl=1"], "unknown config key 'student_rl'"),
        (["--set", "tune_per_class=0"], "digits has no tuning split by default: reserve one with"),
        (["--preset", "svhn-1k-uda-mpl", "--set", "tune_per_class=0"], "svhn-1k has no tuning"),
        (["--preset", "digits-uda", "--stage", "both"], "use an *-mpl preset, or --stage student"),
        (["--stage", "teacher"], "run --stage student first, or --stage both"),
        # a fixed key the preset's method does not read would be ignored by every trial
        (
            ["--preset", "digits-uda", "--stage", "student", "--set", "teacher_lr=0.1"],
            "teacher_lr applies to the +MPL methods only",
        ),
        # ignored by every trial (tuning=true) and left out of best.toml, without a word
        (["--set", "tuning=false"], "every trial trains with tuning=true"),
        # digits reads no --data-dir: the printed `metapl train` command refused it
        (["--data-dir", "elsewhere"], "data_dir does not apply to dataset digits"),
        # the dataset is read before any trial (Optuna logged it with a traceback inside trial 0)
        (
            ["--preset", "cifar10-4k-uda", "--data-dir", "nowhere", "--set", "tune_per_class=0"],
            "--data-dir nowhere does not exist",
        ),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, extra, message):
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metapl tune: error: ") and message in err, err
    assert not (tmp_path / "out").exists()
    # --stage teacher left a new database with empty tables (and its .lock) behind
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["garbage", "foreign", "garbage, lock there"])
def test_a_study_file_that_is_not_one_is_one_line_and_left_as_it_was(tmp_path, capsys, content):
    """Garbage bytes failed in one line but left study.db.lock behind; another program's SQLite
    database got Optuna's tables added to it, then failed with Optuna's traceback."""
    db = tmp_path / "study.db"
    if content == "foreign":
        connection = sqlite3.connect(db)
        connection.execute("CREATE TABLE studies (name TEXT)")  # one of Optuna's table names
        connection.commit()
        connection.close()
    else:
        db.write_bytes(bytes(range(256)) * 8)
    if content.endswith("lock there"):  # another process's lock file is not ours to remove
        (tmp_path / "study.db.lock").touch()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metapl tune: error: --storage "), err
    reason = (
        "holds tables of another program (studies)" if content == "foreign" else "not a database"
    )
    assert reason in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_study_of_another_schema_version_is_a_config_error(tmp_path):
    """Optuna's RuntimeError ("no longer compatible with the table schema") came through raw."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_storage(url).engine.dispose()
    connection = sqlite3.connect(tmp_path / "study.db")
    connection.execute("UPDATE alembic_version SET version_num = 'v99.from.the.future'")
    connection.commit()
    connection.close()
    with pytest.raises(ConfigError, match="cannot open the database .*table schema"):
        open_storage(url)


def test_stage_teacher_in_a_database_without_stage_one_names_it(tmp_path, capsys):
    """The database exists (another study in it) but holds no student study of this name."""
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path)]
    open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert main([*args, "--stage", "teacher"]) == 2
    assert capsys.readouterr().err == (
        "metapl tune: error: stage teacher fixes the student's values to the best trial of study "
        "t-student, which this storage does not have: run --stage student first, or --stage both\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_best_toml_that_could_not_train_fails_before_any_trial(tmp_path, capsys):
    """`--set steps=6 --steps 6`: the trials' warm-up is cut to fit their --steps, best.toml keeps
    the preset's 100 warm-up steps and the 6 of --set; that failed when best.toml was written,
    after every trial had run."""
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--stage", "student"]
    args += ["--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out", str(tmp_path / "out")]
    args += ["--steps", "6", "--set", "steps=6", "--set", "tune_per_class=3", "--quiet"]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "metapl tune: error: best.toml would hold the preset and --set, without --steps (the "
        "trials' alone): warmup_steps (100) must not exceed steps (6); lower it with --set "
        "warmup_steps=N"
    )
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_one_fails_before_any_trial(tmp_path, capsys, monkeypatch):
    """It failed inside trial 0: Optuna's traceback, a failed trial kept in the study, then the
    line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path)]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "metapl tune: error: --device cuda was asked for, but PyTorch sees no CUDA device here\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "study.db").exists()


def test_missing_optuna_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert main(["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "metapl tune: error: metapl tune needs Optuna: pip install optuna\n"
    )


def test_a_study_refuses_trials_of_other_settings(tmp_path):
    tuner = Tuner(options(tmp_path))
    tuner.train = fake_train([])
    tuner.run()
    other = Tuner(options(tmp_path, runtime={"steps": 9, "device": "cpu"}))
    with pytest.raises(ConfigError, match=r"other settings \(steps\)"):
        other.run()


# --- two processes, one SQLite study --------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """One machine's storage, and the one machines share (a throwaway local server)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    else:
        with postgres_url() as url:
            yield url


def test_two_processes_share_one_study(tmp_path, storage_url):
    """Both start at once on a new database: they race to create its tables and the studies."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--stage", "both"]
    args += tiny_args(tmp_path, storage_url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metapl.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    student = optuna.load_study(study_name="t-student", storage=storage_url)
    teacher = optuna.load_study(study_name="t-teacher", storage=storage_url)
    for study in (student, teacher):  # the sum of both processes' trials, all finished
        assert sorted(t.number for t in study.trials) == [0, 1]
        assert all(t.state.is_finished() for t in study.trials)
    fixed = teacher.user_attrs["student_values"]
    assert fixed in [t.params for t in student.trials]
    out = tmp_path / "out"
    for number in range(2):
        config = json.loads(
            (out / "trials" / "t-teacher" / str(number) / "config.json").read_text()
        )
        assert config["tuning"] and all(config[k] == v for k, v in fixed.items())
    assert sum("t-student trial" in text for text in outputs for text in text.splitlines()) == 2
    best = load_preset(str(out / "best.toml"))
    assert best.method == "uda_mpl" and best.student_lr == fixed["student_lr"]


def test_tune_steps_below_the_warmup_cut_it_like_train(tmp_path, capsys):
    """`metapl tune --steps N` (N below the preset's 100 warm-up steps, none set): the trials'
    warm-up is cut to N with a note, as `metapl train --steps` does; best.toml keeps the preset's."""
    args = ["tune", "--preset", "digits-uda", "--stage", "student", "--trials", "1"]
    args += ["--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "out")]
    args += ["--steps", "4", "--device", "cpu", "--quiet", "--set", "tune_per_class=2"]
    args += ["--set", "eval_every=2", "--set", "batch_size=10"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warmup_steps lowered from 100 to 4 to fit --steps 4" in err
    assert "tune: note: uda_warmup_steps 200 is longer than the run's 4 steps" in err
    (trial,) = (tmp_path / "out" / "trials" / "digits-uda-student").iterdir()
    assert json.loads((trial / "config.json").read_text())["warmup_steps"] == 4
    assert "warmup_steps = 100" in (tmp_path / "out" / "best.toml").read_text()


def test_tune_notes_the_first_order_estimator_at_a_weight_not_set(tmp_path, monkeypatch):
    """As `metapl train` does: every trial would take the first-order estimator at the preset's
    mpl_weight of 1, which wrecked the teacher of digits UDA+MPL; a weight set silences it."""
    import metapl.tuning

    notes = []
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: notes.append(opts.note))
    args = ["tune", "--preset", "digits-uda-mpl", "--stage", "teacher", "--trials", "1"]
    args += tiny_args(tmp_path)
    args += ["--set", "mpl_estimator=first_order"]
    assert main(args) == 0
    assert main([*args, "--set", "mpl_weight=0.05"]) == 0
    first_order_line = "metapl tune: note: mpl_estimator=first_order sums its REINFORCE term"
    assert first_order_line in notes[0] and notes[1] is None


def test_a_folder_where_best_toml_goes_is_refused_before_any_trial(tmp_path, capsys):
    """Its write failed after every trial had run ("could not write ...: Is a directory")."""
    (tmp_path / "out" / "best.toml").mkdir(parents=True)
    args = ["tune", "--preset", "digits-uda-mpl", "--stage", "student", "--trials", "1"]
    assert main([*args, *tiny_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.toml is a folder, where metapl tune writes" in err, err
    assert not (tmp_path / "out" / "trials").exists()

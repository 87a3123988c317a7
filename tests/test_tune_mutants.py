"""`metapl tune` where a wrong change still passed test_tune.py: the search ranges, keys fixed with
--set, the study name, stale trial folders, the tuning-split guard, pruning on and off, what a
study may differ in between machines, best.toml's header and values, and the command's options.

Trials run with test_tune's fake ``train`` (no training), so the whole file takes seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from test_tune import TINY, RecordingTrial, fake_train, options

import metapl.tuning
from metapl.cli import main
from metapl.errors import ConfigError
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.presets import load_preset
from metapl.tuning import bestfile, space, studies
from metapl.tuning.runner import Tuner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Appendix C.1's ranges: learning rates a decade either side of the preset's, the others absolute.
STUDENT_RANGES = {
    "student_lr": ("x", 0.1, 10.0, True),
    "weight_decay": ("", 1e-5, 1e-2, True),
    "student_dropout": ("", 0.0, 0.7, False),
    "label_smoothing": ("", 0.0, 0.2, False),
}
TEACHER_RANGES = {
    "teacher_lr": ("x", 0.1, 10.0, True),
    "teacher_dropout": ("", 0.0, 0.7, False),
    "mpl_temperature": ("", 0.5, 2.0, True),
    "uda_factor": ("", 0.25, 16.0, True),
    "uda_temperature": ("", 0.5, 1.5, False),
}
# Table 3's three columns (CIFAR-10, SVHN, ImageNet): every value lies inside its range.
TABLE3 = {
    "weight_decay": (5e-4, 5e-4, 2e-4),
    "student_dropout": (0.35, 0.45, 0.1),
    "label_smoothing": (0.0, 0.0, 0.1),
    "teacher_dropout": (0.5, 0.65, 0.1),
    "uda_factor": (1.0, 2.5, 16.0),
    "uda_temperature": (0.8, 1.25, 0.75),
}


@pytest.mark.parametrize(
    "stage, ranges", [("student", STUDENT_RANGES), ("teacher", TEACHER_RANGES)]
)
def test_each_stage_searches_appendix_c1s_ranges(stage, ranges):
    base = load_preset("digits-uda-mpl")
    cfg = space.stage_base(base, stage, {})
    trial = RecordingTrial()
    space.sample(trial, stage, cfg, fixed=set())
    want = {}
    for key, (relative, low, high, log) in ranges.items():
        anchor = getattr(base, key) if relative else 1.0
        want[key] = (pytest.approx(low * anchor), pytest.approx(high * anchor), log)
    assert trial.asked == want
    for key, values in TABLE3.items():
        if key in ranges:
            assert all(ranges[key][1] <= v <= ranges[key][2] for v in values), key


def test_a_learning_rate_of_zero_cannot_anchor_a_search():
    cfg = apply_overrides(load_preset("digits-uda-mpl"), {"student_lr": 0.0})
    with pytest.raises(ConfigError, match="student_lr must be > 0 to search around it, got 0.0"):
        space.sample(RecordingTrial(), "student", cfg, fixed=set())


# --- the stages with a fake train ------------------------------------------------------------


def test_a_key_fixed_with_set_is_never_searched_and_stays_in_best_toml(tmp_path):
    calls = []
    tuner = Tuner(options(tmp_path, trials=2, overrides={**TINY, "student_lr": "0.05"}))
    tuner.train = fake_train(calls)
    path = tuner.run()
    assert [c.student_lr for c in calls] == [0.05, 0.05]
    study = optuna.load_study(study_name="t-student", storage=tuner.opts.storage)
    assert all("student_lr" not in t.params for t in study.trials)
    assert load_preset(str(path)).student_lr == 0.05
    every = {k: "0" for k in STUDENT_RANGES} | {"student_lr": "0.1"}
    with pytest.raises(ConfigError, match="stage student: --set fixes every searched key"):
        Tuner(options(tmp_path, overrides={**TINY, **every})).run()


@pytest.mark.parametrize("name", ["a/b", "-lead", "sp ace", ""])
def test_a_study_name_is_letters_digits_dots_underscores_dashes(tmp_path, name):
    with pytest.raises(ConfigError, match="use letters, digits"):
        Tuner(options(tmp_path, study=name or "!"))


def test_a_trial_starts_in_an_empty_folder(tmp_path):
    """A folder left under the trial's number (another storage used OUT before) is removed."""
    stale = tmp_path / "out" / "trials" / "t-student" / "0"
    stale.mkdir(parents=True)
    (stale / "checkpoint.pt").write_text("someone else's run")
    seen = []
    tuner = Tuner(options(tmp_path))
    train = fake_train([])

    def spy(cfg, out_dir, *args, **kwargs):
        seen.append(sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else [])
        return train(cfg, out_dir, *args, **kwargs)

    tuner.train = spy
    tuner.run()
    assert seen == [[]]


def test_a_trial_that_did_not_run_on_the_tuning_split_is_an_error(tmp_path):
    tuner = Tuner(options(tmp_path))

    def on_the_test_set(cfg, out_dir, show_progress=True, on_eval=None):
        return {"results": [{"accuracy": 0.9, "dataset": "digits-5pc-3tune-seed0"}]}

    tuner.train = on_the_test_set
    with pytest.raises(RuntimeError, match="trial 0 did not run on the tuning split"):
        tuner.run()


def test_pruning_starts_after_a_quarter_of_the_steps_and_no_prune_turns_it_off(
    tmp_path, monkeypatch
):
    made = []

    def median(**kwargs):
        made.append(kwargs)
        return optuna.pruners.NopPruner()

    monkeypatch.setattr(optuna.pruners, "MedianPruner", median)
    for prune in (True, False):
        tuner = Tuner(options(tmp_path, prune=prune, runtime={"steps": 12, "device": "cpu"}))
        tuner.train = fake_train([])
        tuner.run()
    assert made == [{"n_startup_trials": 5, "n_warmup_steps": 3}]  # only with pruning on


def test_processes_on_other_devices_share_a_study(tmp_path):
    """The device is a machine's, not the trial's: it may differ between the processes."""
    for device in ("cpu", "auto"):
        tuner = Tuner(options(tmp_path, runtime={"steps": 6, "device": device}))
        tuner.train = fake_train([])
        tuner.run()
    study = optuna.load_study(study_name="t-student", storage=options(tmp_path).storage)
    assert len(study.trials) == 2


def test_a_key_added_since_the_study_began_counts_as_its_default():
    config = TrainConfig().to_dict()
    older = {k: v for k, v in studies.comparable(config).items() if k != "memory_format"}
    study = SimpleNamespace(
        study_name="s", user_attrs={"config": older, "searched": ["student_lr"]}
    )
    studies.check_same_config(study, config, ["student_lr"])
    with pytest.raises(ConfigError, match=r"other settings \(memory_format\)"):
        studies.check_same_config(
            study, {**config, "memory_format": "channels_last"}, ["student_lr"]
        )
    with pytest.raises(ConfigError, match=r"other settings \(the searched keys"):
        studies.check_same_config(study, config, ["student_lr", "weight_decay"])


def test_a_new_studys_config_is_recorded_last():
    """Joining processes wait for "config": every other record must be there before it."""
    order = []

    class Study:
        def set_user_attr(self, key, value):
            order.append(key)

    def load_study(**kwargs):
        raise KeyError(kwargs["study_name"])

    fake = SimpleNamespace(
        load_study=load_study,
        create_study=lambda **kwargs: Study(),
        exceptions=optuna.exceptions,
    )
    attrs = {"config": {}, "searched": [], "student_values": {}, "student_trial": 0}
    studies.join_study(fake, None, "s", lambda: attrs, None, None)
    assert order[-1] == "config" and sorted(order) == sorted(attrs)


def test_a_study_whose_creator_died_before_its_records_is_created_again(
    tmp_path, monkeypatch, capsys
):
    """`metapl tune` killed between creating a study and recording its settings left a study
    without "config": every rerun waited, then refused the study's name for good ("use another
    --study name", which loses stage 1's trials too)."""
    monkeypatch.setattr(studies, "ATTRS_WAIT_S", 0.1)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    dead = optuna.create_study(study_name="s", storage=storage)  # the killed creator's
    dead.set_user_attr("searched", ["student_lr"])  # "config" never came
    attrs = {"config": {"steps": 6}, "searched": ["student_lr", "weight_decay"]}
    study = studies.join_study(optuna, storage, "s", lambda: attrs, None, None)
    assert study.user_attrs == attrs
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]
    assert "creating it again" in capsys.readouterr().out

    # A study without metapl's records but with trials (or other attributes) is not one a
    # creator of ours left: refused, and kept.
    other = optuna.create_study(study_name="o", storage=storage)
    other.add_trial(optuna.trial.create_trial(value=0.5))
    with pytest.raises(ConfigError, match="study o has no metapl records"):
        studies.join_study(optuna, storage, "o", lambda: attrs, None, None)
    assert len(optuna.load_study(study_name="o", storage=storage).trials) == 1


def test_best_toml_header_names_each_stages_best_trial_and_accuracy(tmp_path):
    tuner = Tuner(options(tmp_path, stage="both", trials=2))
    tuner.train = fake_train([])
    text = tuner.run().read_text()
    storage = tuner.opts.storage
    for stage in ("student", "teacher"):
        best = optuna.load_study(study_name=f"t-{stage}", storage=storage).best_trial
        line = f"# stage {stage}: study t-{stage}, trial {best.number}, tuning accuracy "
        assert f"{line}{100 * best.value:.2f}%\n" in text
    assert "# (2 trials of t-teacher finished when this was written)\n" in text


def test_best_toml_header_counts_one_trial_in_the_singular(tmp_path):
    """It read "(1 trials of t-student ...)"."""
    tuner = Tuner(options(tmp_path))
    tuner.train = fake_train([])
    assert "# (1 trial of t-student finished when this was written)\n" in tuner.run().read_text()


def test_an_in_memory_database_is_refused(tmp_path):
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="in-memory database is not shared between"):
            Tuner(options(tmp_path, storage=url))


def test_a_storage_error_shows_the_url_as_typed(tmp_path):
    """SQLAlchemy's rendering of the URL percent-encodes its path: the message named
    `sqlite:///%3Amemory%3A` and a folder `%C3%BCbung` the user never typed. A password stays
    hidden."""
    from metapl.tuning import storage

    for url in ("sqlite:///:memory:", f"sqlite:///{tmp_path}/übung/study.db"):
        with pytest.raises(ConfigError, match=f"^--storage {re.escape(url)}: ") as info:
            storage.open_storage(url)
        assert "%" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        storage.open_storage("postgresql://user:secret@localhost:1/db")
    assert "secret" not in str(info.value) and "user:***@localhost" in str(info.value)


@pytest.mark.parametrize("denied", ["write", "search"])
def test_a_database_in_a_folder_it_cannot_write_is_refused(tmp_path, monkeypatch, denied):
    """Was an OSError traceback from the lock file beside it (a read-only file system, another
    user's folder). os.access is what tells: chmod alone does not stop root. A folder that may be
    written but not searched (mode 0o666: no x) takes no new file either."""
    from metapl.tuning import storage

    access = os.access
    bits = os.X_OK if denied == "search" else os.W_OK | os.X_OK

    def allowed(p, mode):
        return not (Path(p) == tmp_path and mode & bits) and access(p, mode)

    monkeypatch.setattr(os, "access", allowed)
    with pytest.raises(ConfigError, match=f"folder {tmp_path} is not writable"):
        storage.open_storage(f"sqlite:///{tmp_path}/study.db")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, 0.1, 1e-05, 1.2345678901234567e-05, [1, 2.5], ("a", True)]
)
def test_toml_values_read_back_as_themselves(value):
    read = tomllib.loads(f"x = {bestfile.toml_value(value)}")["x"]
    assert read == (list(value) if isinstance(value, tuple) else value)
    nan = tomllib.loads(f"x = {bestfile.toml_value(math.nan)}")["x"]
    assert math.isnan(nan)


# --- `metapl tune`'s options -------------------------------------------------------------------


def test_tune_options_reach_the_tuner(tmp_path, monkeypatch, capsys):
    got = []
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: got.append(opts) or tmp_path / "b")
    base = ["tune", "--preset", "digits-uda-mpl", "--trials", "2", "--out", str(tmp_path / "o")]
    base += ["--storage", "sqlite:///s.db", "--set", "batch_size=10"]
    extra = ["--study", "s", "--stage", "teacher", "--data-dir", "d", "--steps", "6"]
    extra += ["--device", "cpu", "--no-prune", "--quiet"]
    assert main([*base, *extra]) == 0 and main(base) == 0
    given, defaults = got
    assert (given.study, given.stage, given.prune, given.show_progress) == (
        "s",
        "teacher",
        False,
        False,
    )
    assert given.runtime == {"steps": 6, "device": "cpu", "data_dir": "d", "warmup_steps": 6}
    assert given.overrides == {"batch_size": "10"} and given.trials == 2
    assert (defaults.study, defaults.stage, defaults.prune, defaults.show_progress) == (
        None,
        "both",
        True,
        True,
    )
    assert defaults.runtime == {}
    assert f"wrote {tmp_path / 'b'}: metapl train --preset" in capsys.readouterr().out
    assert main([*base, "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_a_process_joining_a_teacher_study_takes_its_creators_student_values(tmp_path):
    """Stage 2 fixes the student's values the study recorded, not ones of the joining process."""
    first = Tuner(options(tmp_path, stage="both"))
    first.train = fake_train([])
    first.run()
    calls = []
    joining = Tuner(options(tmp_path, stage="teacher"))
    joining.train = fake_train(calls)
    joining.run()
    teacher = optuna.load_study(study_name="t-teacher", storage=joining.opts.storage)
    (cfg,) = calls
    assert all(getattr(cfg, k) == v for k, v in teacher.user_attrs["student_values"].items())
    assert len(teacher.trials) == 2


def test_an_unknown_stage_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="--stage must be student, teacher or both, got 'all'"):
        Tuner(options(tmp_path, stage="all"))


def test_opening_a_storage_while_another_process_creates_its_tables_is_retried(
    tmp_path, monkeypatch
):
    """A first start racing on table creation ("already exists") waits and tries again."""
    import sqlalchemy.exc

    from metapl.tuning import storage

    real, calls, naps = optuna.storages.RDBStorage, [], []

    def racing(*args, **kwargs):
        calls.append(args)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE", {}, "table studies already exists"
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(storage.time, "sleep", naps.append)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert isinstance(storage.open_storage(url), real) and naps == [1.0, 2.0]


# --- the audit of docs/tuning.md: claims no test above held -------------------------------------


def test_the_sampler_is_tpe_with_the_constant_liar_and_five_random_trials(tmp_path, monkeypatch):
    """docs/tuning.md: "TPE, with the constant-liar option so that parallel workers do not sample
    the same points. The first 5 trials are random." Would break: another sampler, or TPE without
    constant_liar (workers running at once sample one point), or another startup count."""
    made = []
    real = optuna.samplers.TPESampler

    def tpe(**kwargs):
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", tpe)
    tuner = Tuner(options(tmp_path, stage="both"))
    tuner.train = fake_train([])
    tuner.run()
    # one per stage (stage 2 also loads the student's study, with Optuna's default, to read it)
    assert [k for k in made if k] == [{"n_startup_trials": 5, "constant_liar": True}] * 2


def test_teacher_trials_keep_the_presets_fine_tuning_unless_set_to_zero(tmp_path):
    """The student stage trains without fine-tuning; the teacher stage's trials keep the preset's
    finetune_steps (300 in digits-uda-mpl), and so does best.toml; `--set finetune_steps=0` leaves
    them out of both. Would break: stage_base dropping fine-tuning for the teacher too."""
    overrides = {k: v for k, v in TINY.items() if k != "finetune_steps"}
    for fixed, want in ((None, 300), ("0", 0)):
        calls = []
        extra = {} if fixed is None else {"finetune_steps": fixed}
        folder = tmp_path / str(want)
        folder.mkdir()
        tuner = Tuner(options(folder, stage="both", overrides={**overrides, **extra}))
        tuner.train = fake_train(calls)
        path = tuner.run()
        assert [c.finetune_steps for c in calls] == [0, want]  # student trial, teacher trial
        assert load_preset(str(path)).finetune_steps == want


def test_the_printed_command_and_best_tomls_header_pass_the_trials_data_dir(tmp_path):
    """best.toml leaves --data-dir out; the command `metapl tune` prints (and writes into the
    header) passes the trials' one on. Would break: a hint that fails with "dataset not found"."""
    from metapl.tuning.runner import train_command

    out = tmp_path / "out"
    with_dir = options(tmp_path, runtime={"steps": 6, "data_dir": "/data/cifar"})
    assert train_command(with_dir) == (
        f"metapl train --preset {out / 'best.toml'} --data-dir /data/cifar --out RUN"
    )
    assert (
        train_command(options(tmp_path)) == f"metapl train --preset {out / 'best.toml'} --out RUN"
    )


def test_the_printed_command_quotes_paths_with_spaces(tmp_path):
    """`metapl tune --out "runs/my tune"` printed `metapl train --preset runs/my tune/best.toml`,
    which, pasted, split the path in two; it is quoted as a shell reads it."""
    import shlex

    from metapl.tuning.runner import train_command

    out = tmp_path / "my tune ü"
    opts = options(tmp_path, runtime={"data_dir": "/data/my cifar"})
    opts = dataclasses.replace(opts, out=out)
    assert shlex.split(train_command(opts)) == [
        "metapl", "train", "--preset", str(out / "best.toml"), "--data-dir", "/data/my cifar",
        "--out", "RUN",
    ]  # fmt: skip


def test_the_mkdir_hint_for_a_missing_storage_folder_quotes_it(tmp_path):
    """`--storage "sqlite:///runs/my study/s.db"` with the folder missing: the `mkdir -p` hint is
    pasteable, the path quoted as a shell reads it."""
    import shlex

    from metapl.tuning.storage import open_storage

    folder = tmp_path / "my study"
    with pytest.raises(ConfigError) as info:
        open_storage(f"sqlite:///{folder}/s.db")
    hint = str(info.value).rsplit("(", 1)[1].rstrip(")")
    assert shlex.split(hint) == ["mkdir", "-p", str(folder)]


def test_each_trial_records_its_host_and_folder(tmp_path):
    """docs/tuning.md: "The study records each trial's folder and host as trial attributes" (the
    way to find a trial's run folder when machines share a study)."""
    import socket

    tuner = Tuner(options(tmp_path, trials=2))
    tuner.train = fake_train([])
    tuner.run()
    study = optuna.load_study(study_name="t-student", storage=tuner.opts.storage)
    assert len(study.trials) == 2  # (the checks below pass on no trials)
    for trial in study.trials:
        assert trial.user_attrs["host"] == socket.gethostname()
        assert trial.user_attrs["run_dir"] == str(
            (tmp_path / "out" / "trials" / "t-student" / str(trial.number)).resolve()
        )


def test_every_process_rewrites_best_toml_from_the_studys_best_at_its_end(tmp_path):
    """Two processes in turn on one study: the second one's best.toml holds the best trial of
    both, the first one's included. Would break: best.toml from this process's trials only."""
    first = Tuner(options(tmp_path, overrides={**TINY, "weight_decay": "0.001"}))
    first.train = fake_train([])
    path = first.run()
    best_first = optuna.load_study(study_name="t-student", storage=first.opts.storage).best_trial

    def worse(cfg, out_dir, show_progress=True, on_eval=None):
        return {"results": [{"accuracy": 0.0, "dataset": "digits-5pc-3tune-seed0-tune"}]}

    second = Tuner(options(tmp_path, overrides={**TINY, "weight_decay": "0.001"}))
    second.train = worse
    path.write_text("stale")
    assert second.run() == path
    assert load_preset(str(path)).student_lr == best_first.params["student_lr"]
    assert "(2 trials of t-student finished when this was written)" in path.read_text()


def test_a_sqlite_storage_waits_for_the_lock_and_logs_ahead_and_keeps_its_lock_file(
    tmp_path, monkeypatch
):
    """docs/tuning.md's SQLite section: a 120 s lock wait (not Python's 5 s), WAL with
    synchronous=NORMAL, and PATH.db.lock left after the run on purpose."""
    from metapl.tuning import storage

    made = []
    real = optuna.storages.RDBStorage

    def recording(*args, **kwargs):
        made.append(kwargs["engine_kwargs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", recording)
    db = tmp_path / "study.db"
    opened = storage.open_storage(f"sqlite:///{db}")
    assert made == [{"connect_args": {"timeout": 120}}]
    with opened.engine.connect() as connection:
        read = lambda pragma: connection.exec_driver_sql(f"PRAGMA {pragma}").scalar()  # noqa: E731
        assert read("journal_mode") == "wal"
        assert read("synchronous") == 1  # NORMAL
    opened.engine.dispose()
    assert (tmp_path / "study.db.lock").exists()


def test_a_missing_database_driver_is_one_line_without_the_password(monkeypatch):
    """docs/tuning.md: a missing driver is one of the one-line errors, and "Passwords are never
    printed" (the message shows the URL with *** for the password)."""
    from metapl.tuning import storage

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import psycopg2 raises ImportError
    url = "postgresql+psycopg2://me:s3cret@db-host/metapl"
    with pytest.raises(ConfigError) as raised:
        storage.open_storage(url)
    message = str(raised.value)
    assert "s3cret" not in message and "me:***@db-host" in message
    assert "the database driver is not installed" in message and "pip install" in message
    assert "\n" not in message
    with pytest.raises(ConfigError) as raised:  # and a database it cannot open
        storage.open_storage("postgresql+nosuchdriver://me:s3cret@db-host/metapl")
    assert "s3cret" not in str(raised.value) and "cannot open the database" in str(raised.value)

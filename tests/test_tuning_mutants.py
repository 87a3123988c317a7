"""Gaps a hand-made mutation audit found in modules that the command tests exercise only from afar:
PyTorch's CPU threads per command (metapl.cpu_threads), resuming stopped trials
(metapl.tuning.retry), opening the shared study storage (metapl.tuning.storage), joining a study
(metapl.tuning.studies) and the multi-seed worker pool (metapl.experiments.workers).

Each test calls the function itself with fakes, no training, so the whole file takes seconds.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sqlite3
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
import torch

from metapl import cpu_threads
from metapl.errors import ConfigError
from metapl.experiments.workers import map_runs, worker_pool
from metapl.train.config import TrainConfig
from metapl.tuning import retry, storage, studies

State = optuna.trial.TrialState

# --- metapl.cpu_threads ----------------------------------------------------------------------------


def _threads_help(follows_load: bool) -> str:
    parser = argparse.ArgumentParser()
    cpu_threads.add_threads_option(parser, follows_load)
    (action,) = (a for a in parser._actions if a.dest == "threads")
    return action.help


def test_threads_help_says_which_commands_results_depend_on_the_thread_count():
    """twomoons (follows the load) says its results are the same with any count; train and tune
    say to resume with the count a run started with. Would break: the two texts swapped, so that
    `metapl train --help` promised results independent of --threads."""
    follows, fixed = _threads_help(True), _threads_help(False)
    assert "the results are the same with any" in follows and "resume" not in follows
    assert "resume a run with the number it started with" in fixed
    assert "the same with any" not in fixed


def _fake_proc_stat(monkeypatch, tmp_path, lines: list[str]) -> None:
    """/proc/stat reads as the next of ``lines`` on each open."""
    lines_left = iter(lines)
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            stat = tmp_path / "stat"
            stat.write_text(next(lines_left))
            return real_open(stat, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)


def test_busy_cores_with_no_ticks_in_between_is_not_a_division_by_zero(monkeypatch, tmp_path):
    """Two reads of /proc/stat with the same counters (a window shorter than a tick): a number, not
    a ZeroDivisionError out of every `metapl twomoons`."""
    line = "cpu 100 0 100 100 0 0 0 0 0 0\n"
    _fake_proc_stat(monkeypatch, tmp_path, [line, line])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    busy = cpu_threads.busy_cores(window_s=0.0)
    assert isinstance(busy, float) and 0.0 <= busy <= 2.0


@pytest.mark.parametrize(
    "line", ["cpu 100 0 abc 100 0 0 0 0 0 0\n", "cpu 100 0\n"], ids=["not-a-number", "too-short"]
)
def test_a_malformed_proc_stat_falls_back_to_the_load_average(monkeypatch, tmp_path, line):
    """A /proc/stat line that is not numbers, or too short to hold the idle ticks: the load average,
    not a ValueError or IndexError out of the command."""
    _fake_proc_stat(monkeypatch, tmp_path, [line, line])
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    assert cpu_threads.busy_cores(window_s=0.0) == 1.5


def test_busy_cores_waits_its_window_between_the_two_reads(monkeypatch):
    """Would break: both reads at once, so no tick in between and every core counted busy (one
    thread on an idle machine)."""
    naps = []
    monkeypatch.setattr(cpu_threads.time, "sleep", naps.append)
    cpu_threads.busy_cores(window_s=0.25)
    assert naps == [0.25]


def test_without_proc_stat_or_a_load_average_no_core_counts_as_busy(monkeypatch):
    """Neither source (Windows): 0 busy cores, so PyTorch's own default, not one core fewer."""

    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/stat")

    def no_loadavg():
        raise AttributeError("getloadavg")

    monkeypatch.setattr("builtins.open", no_file)
    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    assert cpu_threads.busy_cores(window_s=0.0) == 0.0


def test_threads_up_to_max_threads_are_accepted_and_one_more_is_not():
    cpu_threads.check_requested(cpu_threads.MAX_THREADS)
    with pytest.raises(ConfigError, match="at most 1024, got 1,025"):
        cpu_threads.check_requested(cpu_threads.MAX_THREADS + 1)


def test_the_too_many_threads_error_counts_one_core_in_the_singular(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="this machine has 1 core, and"):
        cpu_threads.check_requested(2000)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with pytest.raises(ConfigError, match="this machine has 4 cores, and"):
        cpu_threads.check_requested(2000)


def test_cpu_threads_checks_the_count_itself():
    """A caller that did not check --threads first gets the ConfigError, not PyTorch's error (or
    its segmentation fault for a huge count)."""
    with pytest.raises(ConfigError, match="must be >= 1"), cpu_threads.cpu_threads(0, False):
        pass  # pragma: no cover
    with pytest.raises(ConfigError, match="at most"), cpu_threads.cpu_threads(5000, False):
        pass  # pragma: no cover


def test_cpu_threads_yields_the_count_it_set_and_gives_back_the_old_one_after_an_error():
    """The block sees the count it asked for (twomoons reports it), and an exception in the block
    (a failing run inside a test process) still restores the process's own setting."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="the run failed"):
        with cpu_threads.cpu_threads(wanted, follows_load=False) as threads:
            assert threads == wanted == torch.get_num_threads()
            raise RuntimeError("the run failed")
    assert torch.get_num_threads() == before


# --- metapl.tuning.retry ---------------------------------------------------------------------------


def test_a_ctrl_c_copy_is_queued_from_a_thread_other_than_the_main_one():
    """A search run in a worker thread (a notebook, a library caller): queuing the interrupted
    trial's copy must not touch the SIGINT handler, which only the main thread may set. Would
    break: signal.signal raising ValueError there, so the copy was never queued."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    errors = []

    def queue() -> None:
        try:
            retry.queue_interrupted(optuna, trial)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    worker = threading.Thread(target=queue)
    worker.start()
    worker.join(timeout=30)
    assert errors == []
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.RUNNING, State.WAITING]


def test_queuing_a_ctrl_c_copy_gives_back_the_sigint_handler_it_found():
    """The handler in place before (metapl's own, or SIG_IGN in a shell's background job) is the
    one in place after. Would break: Python's default handler put back instead, so a background
    job's later Ctrl-C to its process group interrupted it."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)

    def own_handler(signum, frame):  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        retry.queue_interrupted(optuna, trial)
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_copy_named_for_a_taken_over_trial_is_its_own_not_its_chains_first():
    """Trial 0 stopped, its copy 1 stopped too, and 1's copy is 2: a process whose trial 1 was
    taken over says it leaves it to trial 2. Would break: copy_of matching the first trial of a
    copy's chain (0), so trial 1 had "no copy" and trial 0 was named for 1 and 2 alike."""
    study = optuna.create_study(direction="maximize")
    stopped = []
    for _ in range(2):
        trial = study.ask()  # the waiting copy, after the first
        trial.suggest_float("x", 0.0, 1.0)
        retry.queue_interrupted(optuna, trial)
        study.tell(trial, state=State.FAIL)
        stopped.append(trial)
    assert [retry.copy_of(optuna, t) for t in stopped] == [1, 2]
    assert retry.stopped_trials(optuna, study.trials[2]) == [0, 1]


# --- metapl.tuning.storage -------------------------------------------------------------------------


def test_a_live_trial_beats_more_than_once_per_grace_period(tmp_path):
    """The storage beats every HEARTBEAT_S and fails a trial silent for GRACE_S: a grace period of
    at least two beats, so that one late beat (a slow write, a busy database) does not fail a live
    trial and queue a copy that trains into its folder beside it. Would break: either constant
    changed past the other, or not passed to the storage."""
    assert 2 * storage.HEARTBEAT_S <= storage.GRACE_S
    opened = storage.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    try:
        assert opened.get_heartbeat_interval() == storage.HEARTBEAT_S == 30
        assert opened.grace_period == storage.GRACE_S == 120
    finally:
        opened.engine.dispose()


def test_optuna_is_quiet_below_warnings_once_imported():
    """metapl prints one line per trial: Optuna's own INFO line for every trial would double them.
    Would break: import_optuna leaving Optuna's verbosity at INFO."""
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        storage.import_optuna()
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_table_creation_lock_excludes_another_holder_until_the_block_ends(tmp_path):
    """Two workers starting together on a new SQLite file take turns creating its tables. Would
    break: _file_lock taking no lock (another open of the file could lock it meanwhile)."""
    path = tmp_path / "study.db.lock"
    with storage._file_lock(path), open(path, "a") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "a") as other:  # released after the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///:memory:", "sqlite://", "postgresql://me:pw@db-host/metapl", "not a url"],
    ids=["memory", "no-path", "postgresql", "garbage"],
)
def test_only_a_sqlite_file_counts_as_a_new_database(url):
    """`--stage teacher` on a new SQLite file is refused as "no such file"; an in-memory database,
    another backend or a bad URL is left to open_storage's own one-line error. Would break: an
    in-memory URL reported as a missing file named ":memory:"."""
    assert storage.new_sqlite_file(url) is None


def test_a_missing_sqlite_file_is_new_and_an_existing_one_is_not(tmp_path):
    db = tmp_path / "study.db"
    assert storage.new_sqlite_file(f"sqlite:///{db}") == db
    db.write_bytes(b"")
    assert storage.new_sqlite_file(f"sqlite:///{db}") is None


def test_an_empty_file_is_taken_for_a_new_study_database(tmp_path):
    """A zero-byte file (made with touch, or left by a first start that died at once) holds no
    tables: Optuna makes its own there. Would break: a file without Optuna's tables refused even
    when it holds no tables at all."""
    db = tmp_path / "study.db"
    db.write_bytes(b"")
    opened = storage.open_storage(f"sqlite:///{db}")
    try:
        optuna.create_study(study_name="s", storage=opened)
        assert optuna.get_all_study_names(opened) == ["s"]
    finally:
        opened.engine.dispose()
    assert db.stat().st_size > 0  # Optuna's tables, in the file that was empty


def test_a_file_of_another_program_names_its_first_three_tables(tmp_path):
    """The one-line error names a few of the tables, not all of another program's schema."""
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as connection:
        for name in ("e", "d", "c", "b", "a"):
            connection.execute(f"CREATE TABLE {name} (x)")
    connection.close()
    with pytest.raises(ConfigError) as info:
        storage.open_storage(f"sqlite:///{db}")
    assert "holds tables of another program (a, b, c, ...), not an Optuna study" in str(info.value)


def _storage_failing(monkeypatch, message: str, times: int) -> list:
    """RDBStorage raising ``message`` (as SQLAlchemy would) ``times`` times, then the real one."""
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception(message))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", failing)
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    return calls


def test_postgresqls_duplicate_key_race_on_table_creation_is_retried(tmp_path, monkeypatch):
    """PostgreSQL says "duplicate key value violates unique constraint" where SQLite says "already
    exists": a second machine starting with the first one is retried too. Would break: only
    SQLite's words recognised, so that machine stopped with "cannot open the database"."""
    calls = _storage_failing(monkeypatch, "DUPLICATE key value violates unique constraint", 1)
    opened = storage.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    opened.engine.dispose()
    assert len(calls) == 2


def test_a_race_that_never_ends_is_a_one_line_error_after_three_attempts(tmp_path, monkeypatch):
    """Would break: retrying past the last attempt, which ended in an AssertionError traceback."""
    calls = _storage_failing(monkeypatch, "table studies already exists", 10)
    with pytest.raises(
        ConfigError, match=r"cannot open the database \(table studies already exists\)$"
    ):
        storage.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(calls) == 3


# --- metapl.tuning.studies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("device", "cuda:1"),
        ("data_dir", "/mnt/other/data"),
        ("preset", "my-copy-of-the-preset"),
        ("unlabeled_dir", "/mnt/other/unlabeled"),
        ("large_teacher", "/mnt/other/teacher.pt"),
    ],
)
def test_processes_may_differ_in_where_their_machine_keeps_things(key, value):
    """Each machine of a study has its own device and its own paths to the same data and large
    teacher: none of them changes what a trial means. Would break: any of them left out of
    MACHINE_KEYS, so a second machine's process was refused the study."""
    config = TrainConfig().to_dict()
    study = SimpleNamespace(
        study_name="s",
        user_attrs={"config": studies.comparable(config), "searched": ["student_lr"]},
    )
    studies.check_same_config(study, {**config, key: value}, ["student_lr"])
    with pytest.raises(ConfigError, match=r"other settings \(steps\)"):
        studies.check_same_config(study, {**config, "steps": config["steps"] + 1}, ["student_lr"])


def test_a_joining_process_waits_for_a_creator_still_writing_the_records(monkeypatch):
    """The creator records the study's settings just after creating it: a process that joins in
    between waits for them (up to ATTRS_WAIT_S, 60 s) rather than taking the study for abandoned
    and deleting it under its creator. Here "config" appears 50 s later (a clock that advances 10 s
    per poll). Would break: a shorter wait."""
    attrs: dict = {}
    clock = [0.0]

    def poll(seconds):
        clock[0] += 10.0
        if clock[0] >= 50.0:
            attrs["config"] = {}

    monkeypatch.setattr(studies.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(studies.time, "sleep", poll)
    assert studies._records_written(SimpleNamespace(user_attrs=attrs))
    attrs.clear()
    clock[0] = 0.0
    monkeypatch.setattr(studies.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + 10))
    assert not studies._records_written(SimpleNamespace(user_attrs=attrs))  # never: gives up


def test_a_study_another_process_deleted_as_abandoned_meanwhile_is_joined_again(
    monkeypatch, capsys
):
    """Two processes find the same abandoned study (its creator died before its records); the
    other one deletes it first, so this one's delete finds no study: it joins (creates) the study
    again instead of failing with a KeyError traceback."""
    monkeypatch.setattr(studies, "ATTRS_WAIT_S", -1.0)  # found abandoned at once
    store = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=store)  # no records: its creator died
    real_delete = store.delete_study

    def deleted_first_by_another_process(study_id):
        real_delete(study_id)
        raise KeyError(f"no study with id {study_id}")

    monkeypatch.setattr(store, "delete_study", deleted_first_by_another_process)
    attrs = {"config": {"steps": 6}, "searched": ["student_lr"]}
    study = studies.join_study(optuna, store, "s", lambda: attrs, None, None)
    assert study.user_attrs == attrs
    assert "creating it again" in capsys.readouterr().out


def test_a_study_of_something_else_without_trials_is_refused_not_deleted(monkeypatch):
    """A study without "config" whose attributes are not metapl's is someone else's, trials or
    not: refused and kept. Would break: only a study with trials protected, so another tool's new
    study of the same name was deleted."""
    monkeypatch.setattr(studies, "ATTRS_WAIT_S", -1.0)
    store = optuna.storages.InMemoryStorage()
    other = optuna.create_study(study_name="s", storage=store)
    other.set_user_attr("owner", "another tool")
    with pytest.raises(ConfigError, match="study s has no metapl records"):
        studies.join_study(optuna, store, "s", lambda: {"config": {}}, None, None)
    kept = optuna.load_study(study_name="s", storage=store)
    assert kept.user_attrs == {"owner": "another tool"}


def test_a_setting_the_study_recorded_that_this_process_lacks_is_a_difference():
    """A key in the study's config that this metapl no longer has (another version on another
    machine): the trials may mean something else, so the process is refused. Would break: only
    this process's keys compared."""
    config = TrainConfig().to_dict()
    recorded = {**studies.comparable(config), "old_key": 1}
    study = SimpleNamespace(study_name="s", user_attrs={"config": recorded, "searched": ["x"]})
    with pytest.raises(ConfigError, match=r"other settings \(old_key\)"):
        studies.check_same_config(study, config, ["x"])


def test_stage_two_takes_the_student_values_only_after_stage_ones_running_trials(monkeypatch):
    """A trial still running in another process may become the best: student_result waits for
    them before it reads the best trial. Would break: the values fixed from the trials finished
    so far."""
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="t-student", storage=store, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5},
            distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
            value=0.5,
        )
    )
    waited = []
    monkeypatch.setattr(studies, "wait_for_running", lambda optuna, study: waited.append(study))
    result = studies.student_result(optuna, store, "t-student")
    assert [s.study_name for s in waited] == ["t-student"]
    assert result == {
        "student_values": {"x": 0.5},
        "student_trial": 0,
        "student_accuracy": 0.5,
        "student_study": "t-student",
    }


# --- metapl.experiments.workers --------------------------------------------------------------------


def _sigint_handler() -> object:
    return signal.getsignal(signal.SIGINT)


def test_workers_ignore_ctrl_c_and_leave_it_to_the_main_process():
    """Ctrl-C reaches every process of the command: a worker that raised KeyboardInterrupt inside
    the executor's queue code could hang the pool or print its traceback. Would break: the
    workers' initializer not ignoring SIGINT."""
    with worker_pool(1) as pool:
        assert pool.submit(_sigint_handler).result(timeout=60) == signal.SIG_IGN


def _slow_run(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_the_pool_ends_its_workers_when_the_block_ends():
    """Would break: the pool left without its final shutdown, its idle workers alive after the
    command's runs (until the main process exits)."""
    with worker_pool(2) as pool:
        assert pool.submit(_slow_run, 0.0).result(timeout=60) == 0.0
        processes = list(pool._processes.values())
    assert processes and not any(p.is_alive() for p in processes)


def test_the_progress_bar_counts_the_runs_it_waits_for(monkeypatch):
    """Would break: the bar without a total (no ETA, no "3/5")."""
    import metapl.progress

    made = []
    real = metapl.progress.progress_bar
    monkeypatch.setattr(
        metapl.progress, "progress_bar", lambda **kwargs: made.append(kwargs) or real(**kwargs)
    )
    with worker_pool(1) as pool:
        assert map_runs(pool, _slow_run, [0.0, 0.0, 0.0], "digits runs", False) == [0.0] * 3
    assert [(m["total"], m["desc"], m["disable"]) for m in made] == [(3, "digits runs", True)]


def _record(seed: int) -> dict:
    time.sleep(0.01 * seed)  # the later jobs finish first
    return {"seed": seed}


def _fails(job: int) -> int:
    raise RuntimeError(f"run {job} failed")


def test_map_runs_keeps_the_jobs_order_and_a_runs_own_error():
    """The records come back in the order of the jobs, whatever order they finish in; a run's
    RuntimeError (CUDA out of memory, a NaN check) is itself, not "a worker process died" (the
    broken pool's error, a RuntimeError subclass). Would break: results reordered, or every
    RuntimeError caught."""
    with worker_pool(2) as pool:
        records = map_runs(pool, _record, [5, 0, 3], "digits runs", False)
        assert records == [{"seed": 5}, {"seed": 0}, {"seed": 3}]
        with pytest.raises(RuntimeError, match="run 1 failed"):
            map_runs(pool, _fails, [1], "digits runs", False)

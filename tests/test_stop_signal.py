"""SIGTERM or SIGUSR1 during `metapl train` (a scheduler's time limit or eviction): the run finishes
its step, saves a checkpoint of it and stops; the same command resumes there and ends with exactly
the weights of an uninterrupted run (metapl.train.stopping). Ctrl-C still stops at once.

The signal is sent by the process to itself as it draws a chosen step's batch, so it lands inside
the step, where a scheduler's would land most of the time."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import signal
import threading

import optuna
import pytest
import torch

import metapl.train.engine as engine
from metapl.cli import main
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import apply_overrides
from metapl.train.presets import load_preset
from metapl.train.stopping import Stopped, StopSignals, TrainingStopped

pytestmark = pytest.mark.usefixtures("single_torch_thread")

STEPS = 9
TINY = dict(
    steps=STEPS,
    warmup_steps=2,
    batch_size=10,
    unlabeled_ratio=2,
    log_every=1,
    eval_every=4,
    checkpoint_every=4,  # the stop at step 6 falls between checkpoints
    uda_threshold=0.0,
    uda_warmup_steps=STEPS,
    finetune_steps=0,
    device="cpu",
)


def _config(**overrides):
    return apply_overrides(load_preset("digits-uda-mpl"), {**TINY, **overrides}).validate()


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """The process sends itself ``signums`` as it draws the batch of step ``step`` (0-based: the
    step that ends with the run at step ``step + 1``)."""
    real_batch = engine.BatchSource.batch

    def batch(self, at, views=None):
        if at == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real_batch(self, at, views)

    monkeypatch.setattr(engine.BatchSource, "batch", batch)


def _train_args(out) -> list[str]:
    """`metapl train` of the tiny configuration into ``out``."""
    args = ["train", "--preset", "digits-uda-mpl", "--out", str(out), "--quiet"]
    args += ["--steps", str(STEPS)]
    for key, value in TINY.items():
        if key != "steps":
            args += ["--set", f"{key}={value}"]
    return args


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _assert_same_weights(got_dir, want_dir) -> None:
    got, want = (load_checkpoint(p / "checkpoint.pt") for p in (got_dir, want_dir))
    assert got["step"] == want["step"]
    for part in ("student", "teacher"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny configuration: its folder and summary."""
    out = tmp_path_factory.mktemp("reference")
    return out, engine.train(_config(), out, show_progress=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signalled_run_saves_its_step_stops_and_resumes_exactly(
    tmp_path, monkeypatch, reference, signum
):
    ref_dir, ref_summary = reference
    out = tmp_path / "run"
    _signal_at(monkeypatch, 5, signum)
    with pytest.raises(TrainingStopped) as stopped:
        engine.train(_config(), out, show_progress=False)
    monkeypatch.undo()
    assert (stopped.value.signum, stopped.value.step, stopped.value.total_steps) == (signum, 6, 9)
    assert stopped.value.exit_code == 128 + signum
    # The step in which the signal came was finished and saved: not the last checkpoint (4).
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert max(int(r[0]) for r in _rows(out / "metrics.csv")[1:]) == 6
    assert not (out / "results.json").exists()  # the run is not over
    # The handlers are the defaults again once train() returns (here, by raising).
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    resumed = engine.train(_config(), out, show_progress=False)
    assert resumed["results"] == ref_summary["results"]
    _assert_same_weights(out, ref_dir)
    assert _rows(out / "metrics.csv") == _rows(ref_dir / "metrics.csv")


def test_the_command_line_says_so_in_one_line_and_exits_with_128_plus_the_signal(
    tmp_path, monkeypatch, capsys
):
    _signal_at(monkeypatch, 2, signal.SIGTERM)
    assert main(_train_args(tmp_path)) == 143
    assert capsys.readouterr().err == (
        "metapl train: stopped by SIGTERM at step 3 of 9, after saving a checkpoint of that step; "
        "run the same command again to resume from it\n"
    )
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_more_signals_while_stopping_neither_kill_the_run_nor_rename_its_stop(
    tmp_path, monkeypatch
):
    """torchrun's agent forwards a SIGTERM of its own after SLURM's: the checkpoint is still
    written, and the first signal is the one named."""
    real_save = engine.save_checkpoint

    def save_signalled_again(path, state):
        if state["step"] == 6:  # the stop's checkpoint, while it is being written
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(path, state)

    monkeypatch.setattr(engine, "save_checkpoint", save_signalled_again)
    _signal_at(monkeypatch, 5, signal.SIGUSR1, signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        engine.train(_config(), tmp_path, show_progress=False)
    assert stopped.value.signum == signal.SIGUSR1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, monkeypatch, reference):
    ref_dir, ref_summary = reference
    _signal_at(monkeypatch, STEPS - 1, signal.SIGTERM)
    summary = engine.train(_config(), tmp_path, show_progress=False)
    assert summary["results"] == ref_summary["results"]
    assert (tmp_path / "results.json").exists()
    _assert_same_weights(tmp_path, ref_dir)


@pytest.mark.parametrize("where", ["load_data", "Run", "check_models_fit"])
def test_a_signal_before_the_steps_stops_at_once_with_one_line(
    tmp_path, monkeypatch, capsys, where
):
    """Before the training steps (loading data and checkpoint, building the models; with a large
    teacher, precomputing its outputs) there is nothing to save: the run stopped at once, without
    a word (the default handler). Now it says so, exits with 128 + the signal, and the same
    command then runs as if nothing had happened."""
    real = getattr(engine, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop it")

    monkeypatch.setattr(engine, where, signalled)
    out = tmp_path / "run"
    args = _train_args(out)
    assert main(args) == 143
    assert capsys.readouterr().err == (
        "metapl train: stopped by SIGTERM before its training steps began, with nothing to "
        "save; run the same command again to start (or resume) the run\n"
    )
    assert not (out / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(engine, where, real)
    assert main(args) == 0


def test_a_signal_after_the_steps_stops_at_once_and_the_rerun_writes_the_results(
    tmp_path, monkeypatch, reference
):
    """After the last step's checkpoint (the final evaluation, results.json, the plots), a
    signal stopped the run at once without a word; now with what to do: the rerun, from that
    checkpoint, writes the results of an unbroken run."""
    ref_dir, ref_summary = reference
    real = engine._accuracies
    calls = []

    def signalled(run, amp, dp):
        calls.append(run.step)
        if calls.count(STEPS) == 2:  # the final evaluation, after the last step's own
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(run, amp, dp)

    monkeypatch.setattr(engine, "_accuracies", signalled)
    with pytest.raises(Stopped) as stopped:
        engine.train(_config(), tmp_path, show_progress=False)
    assert not isinstance(stopped.value, TrainingStopped) and stopped.value.signum == signal.SIGUSR1
    assert "after its last step's checkpoint, before its results were written" in str(stopped.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == STEPS
    assert not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    summary = engine.train(_config(), tmp_path, show_progress=False)
    assert summary["results"] == ref_summary["results"]
    _assert_same_weights(tmp_path, ref_dir)


def test_ctrl_c_still_stops_at_once_without_a_checkpoint_of_its_step(tmp_path, monkeypatch):
    _signal_at(monkeypatch, 5, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        engine.train(_config(), tmp_path, show_progress=False)
    assert not isinstance(interrupted.value, TrainingStopped)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4  # the last regular one


def test_a_handler_of_the_users_own_is_left_alone(tmp_path, monkeypatch, reference):
    """A program that calls train() and handles SIGTERM itself keeps its handler: it is called,
    and the run goes on to its end."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        _signal_at(monkeypatch, 5, signal.SIGTERM)
        summary = engine.train(_config(), tmp_path, show_progress=False)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still the user's
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
    assert summary["results"] == reference[1]["results"]


def test_outside_the_main_thread_no_handler_is_set():
    """Python sets handlers in the main thread only; there the block does nothing (no error)."""
    seen = {}

    def enter():
        with StopSignals() as signals:
            seen["installed"] = dict(signals._previous)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"installed": {}}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signalled_tuning_trial_waits_in_the_study_to_resume(tmp_path, monkeypatch, capfd):
    """`metapl tune` under a scheduler: the trial's training saves its step and stops; a copy of
    the trial waits in the study, as after Ctrl-C, and the command says which signal stopped it."""
    _signal_at(monkeypatch, 1, signal.SIGTERM)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--storage", storage]
    args += ["--out", str(tmp_path / "out"), "--steps", "6", "--device", "cpu", "--quiet"]
    args += ["--study", "t", "--stage", "student", "--set", "tune_per_class=3"]
    args += ["--set", "warmup_steps=2", "--set", "uda_warmup_steps=2", "--set", "log_every=1"]
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("optuna").addHandler(handler)
    try:
        assert main(args) == 143
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == (
        "t-student trial 0: stopped by SIGTERM at step 2; the same command resumes it from its "
        "last checkpoint\n"
    )
    assert err.startswith("metapl tune: stopped by SIGTERM at step 2 of ")
    assert [r.getMessage() for r in logged] == []
    trials = optuna.load_study(study_name="t-student", storage=storage).trials
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.FAIL, State.WAITING]
    trial_run = tmp_path / "out" / "trials" / "t-student" / "0"
    assert load_checkpoint(trial_run / "checkpoint.pt")["step"] == 2


def test_a_tuning_trial_signalled_before_its_steps_says_which_signal(tmp_path, monkeypatch, capfd):
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop it")

    monkeypatch.setattr(engine, "check_models_fit", signalled)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--storage", storage]
    args += ["--out", str(tmp_path / "out"), "--steps", "6", "--device", "cpu", "--quiet"]
    args += ["--study", "t", "--stage", "student", "--set", "tune_per_class=3"]
    args += ["--set", "warmup_steps=2", "--set", "uda_warmup_steps=2"]
    assert main(args) == 143
    out, err = capfd.readouterr()
    assert out == (
        "t-student trial 0: stopped by SIGTERM; the same command resumes it from its last "
        "checkpoint\n"
    )
    assert err.startswith("metapl tune: stopped by SIGTERM before its training steps began")
    trials = optuna.load_study(study_name="t-student", storage=storage).trials
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.FAIL, State.WAITING]


def test_a_stop_survives_pickling_as_a_worker_process_sends_it():
    """`metapl digits` workers send their run's stop to the main process pickled: an exception
    whose __init__ does not take its message back broke the pool's result thread (the command
    printed its line and then hung)."""
    stop = pickle.loads(pickle.dumps(TrainingStopped(signal.SIGUSR1, 3, 9)))
    assert (type(stop), stop.signum, stop.step, stop.total_steps) == (TrainingStopped, 10, 3, 9)
    assert str(stop).startswith("stopped by SIGUSR1 at step 3 of 9")
    stop = pickle.loads(pickle.dumps(Stopped(signal.SIGTERM, "; more")))
    assert (str(stop), stop.exit_code) == ("stopped by SIGTERM; more", 143)

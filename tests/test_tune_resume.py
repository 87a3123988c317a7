"""`metapl tune` resumes a trial that was stopped (Ctrl-C, kill -9) from its checkpoint.

The trials are the few digits-CNN steps of tests/test_tune.py; the kill is a real SIGKILL of a real
`metapl tune` process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from test_tune import options, tiny_args

from metapl.cli import main
from metapl.errors import WriteError
from metapl.train import engine
from metapl.train.checkpoint import load_checkpoint
from metapl.tuning import retry, space, studies
from metapl.tuning import storage as storage_module
from metapl.tuning.runner import Tuner

pytestmark = pytest.mark.usefixtures("single_torch_thread")

State = optuna.trial.TrialState


def _student(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["student"]


def _train_stopped_at_step_9(calls: list, stop):
    """Tuner.train that records (trial folder, whether it held a checkpoint) in ``calls`` and
    raises ``stop()`` at step 9's evaluation, after the checkpoint at step 6."""

    def train(cfg, run_dir, show_progress, on_eval):
        calls.append((run_dir, (run_dir / "checkpoint.pt").exists()))

        def stop_at_9(step, accuracies):
            if step == 9:  # checkpoint_every=6
                raise stop()
            on_eval(step, accuracies)

        return engine.train(cfg, run_dir, show_progress, on_eval=stop_at_9)

    return train


def test_a_trial_stopped_by_a_full_disk_resumes_from_its_checkpoint(tmp_path, capsys):
    """A failed write ends the command with one line saying to run it again, which resumes from
    the last checkpoint; Optuna marked the trial failed, so the rerun began a new trial from step
    0 instead (and Optuna logged the error with a traceback first)."""
    opts = options(tmp_path, runtime={"steps": 12, "device": "cpu"})
    calls = []
    tuner = Tuner(opts)
    tuner.train = _train_stopped_at_step_9(calls, lambda: WriteError("could not write: disk full"))
    with pytest.raises(WriteError):
        tuner.run()
    assert (
        "t-student trial 0: stopped by a failed write; the same command resumes it from its last "
        "checkpoint" in capsys.readouterr().out
    )
    tuner = Tuner(opts)  # the same command again, the disk cleared
    tuner.train = lambda cfg, run_dir, show_progress, on_eval: (
        calls.append((run_dir, (run_dir / "checkpoint.pt").exists()))
        or engine.train(cfg, run_dir, show_progress, on_eval=on_eval)
    )
    tuner.run()
    assert "t-student trial 1: resumes trial 0 from its checkpoint" in capsys.readouterr().out
    trials_dir = opts.out / "trials" / "t-student"
    assert calls == [(trials_dir / "0", False), (trials_dir / "1", True)]


def test_an_interrupted_trial_resumes_from_its_checkpoint_with_the_weights_of_an_unbroken_run(
    tmp_path, capsys
):
    opts = options(tmp_path, runtime={"steps": 12, "device": "cpu"})
    calls = []  # (trial folder, whether it held a checkpoint when train started)
    tuner = Tuner(opts)
    tuner.train = _train_stopped_at_step_9(calls, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    assert "t-student trial 0: interrupted; the same command resumes it" in capsys.readouterr().out

    configs = []

    def train(cfg, run_dir, show_progress, on_eval):
        calls.append((run_dir, (run_dir / "checkpoint.pt").exists()))
        configs.append(cfg)
        return engine.train(cfg, run_dir, show_progress, on_eval=on_eval)

    tuner = Tuner(opts)  # the same command again, --trials 1
    tuner.train = train
    tuner.run()
    assert "t-student trial 1: resumes trial 0 from its checkpoint" in capsys.readouterr().out

    trials_dir = opts.out / "trials" / "t-student"
    assert calls == [(trials_dir / "0", False), (trials_dir / "1", True)]
    assert not (trials_dir / "0").exists()  # moved: one folder per trial that finished
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    stopped, resumed = study.trials
    assert [stopped.state, resumed.state] == [State.FAIL, State.COMPLETE]
    assert resumed.params == stopped.params
    # the pruner sees steps 3 and 6 as the stopped trial reported them, then 9 and 12
    assert sorted(resumed.intermediate_values) == [3, 6, 9, 12]
    assert all(resumed.intermediate_values[s] == stopped.intermediate_values[s] for s in (3, 6))
    assert resumed.user_attrs["run_dir"] == str((trials_dir / "1").resolve())

    (cfg,) = configs
    unbroken = engine.train(cfg, tmp_path / "unbroken", False)
    assert resumed.value == unbroken["results"][0]["accuracy"]
    resumed_weights, unbroken_weights = _student(trials_dir / "1"), _student(tmp_path / "unbroken")
    assert all(torch.equal(resumed_weights[k], unbroken_weights[k]) for k in unbroken_weights)


def _take_over(trial_id: int, storage: str) -> None:
    """What another process does to a trial whose heartbeat went stale: mark it failed and queue
    its copy (the storage's callback)."""
    study = optuna.load_study(study_name="t-student", storage=storage)
    study._storage.set_trial_state_values(trial_id, state=State.FAIL)
    (record,) = (t for t in study.get_trials() if t._trial_id == trial_id)
    retry.queue_copy(optuna, study, record)


@pytest.mark.parametrize("when", ["at step 9", "after training"])
def test_a_process_whose_trial_was_taken_over_lets_go_of_it_and_goes_on(tmp_path, capsys, when):
    """A process paused past the heartbeat's grace period (or cut off from the storage) finds its
    trial marked stopped, with a copy queued, when it wakes. Would break: Optuna's "Cannot tell a
    FAIL trial" ended the command with a traceback, or the process trained the trial on (its
    folder is the copy's once the copy starts) instead of running the copy."""
    opts = options(tmp_path, trials=2, runtime={"steps": 12, "device": "cpu"})
    calls = []

    def train(cfg, run_dir, show_progress, on_eval):
        calls.append((run_dir.name, (run_dir / "checkpoint.pt").exists()))
        trial_id = optuna.load_study(study_name="t-student", storage=opts.storage).trials[-1]

        def taken_over_at_9(step, accuracies):
            if step == 9 and run_dir.name == "0" and when == "at step 9":
                _take_over(trial_id._trial_id, opts.storage)
            on_eval(step, accuracies)

        summary = engine.train(cfg, run_dir, show_progress, on_eval=taken_over_at_9)
        if run_dir.name == "0" and when == "after training":
            _take_over(trial_id._trial_id, opts.storage)
        return summary

    tuner = Tuner(opts)
    tuner.train = train
    tuner.run()
    captured = capsys.readouterr()
    assert "t-student trial 0: taken over by another process" in captured.out
    assert "leaves the trial to its copy, trial 1\n" in captured.out
    assert "t-student trial 1: resumes trial 0 from its checkpoint" in captured.out
    assert "Traceback" not in captured.err and "Cannot tell" not in captured.err
    assert calls == [("0", False), ("1", True)]
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.COMPLETE]
    reported = sorted(study.trials[1].intermediate_values)
    assert reported == [3, 6, 9, 12]  # at step 9 not reported by the trial taken over
    assert 9 not in study.trials[0].intermediate_values or when == "after training"


def test_a_process_whose_trial_was_taken_over_without_a_copy_says_so(tmp_path, capsys, monkeypatch):
    """The trial's last allowed stop: no copy is queued (MAX_RETRIES is 0 here, so its first stop
    is its last). Would break: the process said it left the trial "to its copy", which does not
    exist, and the trial's values were never trained to the end."""
    monkeypatch.setattr(retry, "MAX_RETRIES", 0)
    opts = options(tmp_path, trials=2, runtime={"steps": 6, "device": "cpu"})

    def train(cfg, run_dir, show_progress, on_eval):
        trial = optuna.load_study(study_name="t-student", storage=opts.storage).trials[-1]

        def taken_over_at_3(step, accuracies):
            if step == 3 and run_dir.name == "0":
                _take_over(trial._trial_id, opts.storage)
            on_eval(step, accuracies)

        return engine.train(cfg, run_dir, show_progress, on_eval=taken_over_at_3)

    tuner = Tuner(opts)
    tuner.train = train
    tuner.run()
    out = capsys.readouterr().out
    assert "trial 0: taken over by another process" in out
    assert "no copy of it was queued (a trial killed 1 times is not tried again)" in out
    assert "to its copy" not in out and "resumes trial 0" not in out
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.COMPLETE]
    assert retry.stopped_trial(optuna, study.trials[1]) is None  # a new trial, not a copy


def test_a_process_left_without_a_finished_trial_while_a_copy_runs_elsewhere_exits_cleanly(
    tmp_path, capsys
):
    """Its only trial was taken over, and another process now runs the copy. Would break (seen
    with a real SIGSTOP): the process ended with "no trial finished (all were pruned or failed);
    run more trials" and exit code 2, though the copy was running and would finish."""
    opts = options(tmp_path, trials=1, runtime={"steps": 6, "device": "cpu"})

    def train(cfg, run_dir, show_progress, on_eval):
        study = optuna.load_study(study_name="t-student", storage=opts.storage)

        def taken_over_at_3(step, accuracies):
            if step == 3:
                _take_over(study.trials[-1]._trial_id, opts.storage)
                copy = study.get_trials(deepcopy=False)[-1]  # the copy, waiting ...
                study._storage.set_trial_state_values(copy._trial_id, state=State.RUNNING)
            on_eval(step, accuracies)  # ... and now started by "another process"

        return engine.train(cfg, run_dir, show_progress, on_eval=taken_over_at_3)

    tuner = Tuner(opts)
    tuner.train = train
    assert tuner.run() is None
    assert capsys.readouterr().out.endswith(
        "best.toml not written yet: no trial of t-student has finished, and 1 still run in other "
        "processes (each process writes best.toml to its --out when its trials end)\n"
    )
    assert not (opts.out / "best.toml").exists()


def test_a_copy_without_its_stopped_trials_checkpoint_starts_over(tmp_path, capsys):
    """Another machine's trial (its folder is not here), or one stopped before its first
    checkpoint: the copy trains the same values from the start. Would break (the last assert):
    the stopped trial's partial folder stayed beside the copy's."""
    opts = options(tmp_path, runtime={"steps": 6, "device": "cpu"})
    tuner = Tuner(opts)

    def interrupted(cfg, run_dir, *args, **kwargs):
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text("{}")  # as train writes it before the first step
        raise KeyboardInterrupt

    tuner.train = interrupted
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    Tuner(opts).run()
    assert "t-student trial 1: resumes trial 0 from the start" in capsys.readouterr().out
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.COMPLETE]
    assert study.trials[1].params == study.trials[0].params
    assert sorted(p.name for p in (opts.out / "trials" / "t-student").iterdir()) == ["1"]


def test_a_copy_of_a_trial_stopped_before_it_chose_its_values_says_it_takes_new_ones(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C before the trial's values were sampled: its copy has none to inherit. Would break:
    the copy said it "resumes trial 0 from the start" (the same values), yet sampled new ones."""
    opts = options(tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(space, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Tuner(opts).run()
    monkeypatch.undo()
    tuner = Tuner(opts)
    tuner.train = _train_saving_a_checkpoint([])
    tuner.run()
    out = capsys.readouterr().out
    assert "t-student trial 1: replaces trial 0, stopped before it chose its values" in out
    assert "resumes trial" not in out
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert study.trials[0].params == {} and study.trials[1].params != {}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "record, failed",
    [
        (lambda n: {"host": socket.gethostname(), "pid": _dead_pid(), "trial": n}, True),
        (lambda n: {"host": socket.gethostname(), "pid": os.getppid(), "trial": n}, False),
        (lambda n: {"host": socket.gethostname(), "pid": os.getpid(), "trial": n}, False),
        (lambda n: {"host": "another-host", "pid": _dead_pid(), "trial": n}, False),
        # a copy's record, inherited from the trial it resumes: not its own process
        (lambda n: {"host": socket.gethostname(), "pid": _dead_pid(), "trial": n + 1}, False),
    ],
    ids=["dead-here", "alive", "this-process", "other-host", "inherited"],
)
def test_only_a_trial_whose_own_process_is_gone_from_this_host_is_failed_at_once(record, failed):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("process", record(trial.number))
    retry.fail_stopped_trials(optuna, study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if failed:  # and a copy of it waits, with the same values, to be resumed
        assert states == [State.FAIL, State.WAITING]
        copy = study.trials[1]
        assert copy.params == study.trials[0].params and retry.stopped_trial(optuna, copy) == 0
    else:
        assert states == [State.RUNNING]


def test_a_trial_killed_with_sigkill_resumes_when_the_command_runs_again(tmp_path, capsys):
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--stage", "student"]
    args += tiny_args(tmp_path)
    # still running at its first checkpoints (the kill comes within 10 ms of the first one)
    args[args.index("--steps") + 1] = "30"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = tmp_path / "out" / "trials" / "t-student" / "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metapl.cli", *args], env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (killed / "checkpoint.pt").exists():
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the trial ended before it was killed"
    step = int(load_checkpoint(killed / "checkpoint.pt")["step"])
    assert 0 < step < 30
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="t-student", storage=storage)
    assert [t.state for t in study.trials] == [State.RUNNING]  # its heartbeat is not stale yet

    assert main(args) == 0  # at once: its process is gone from this host
    assert "t-student trial 1: resumes trial 0 from its checkpoint" in capsys.readouterr().out
    study = optuna.load_study(study_name="t-student", storage=storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.COMPLETE]
    assert study.trials[1].params == study.trials[0].params
    resumed = tmp_path / "out" / "trials" / "t-student" / "1"
    assert int(load_checkpoint(resumed / "checkpoint.pt")["step"]) == 30
    assert not killed.exists()
    # the metrics of the steps before the kill came along with the folder
    rows = (resumed / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[0] == "3"


# --- which stops queue a copy ------------------------------------------------------------------


def _stop_next(study, how: str) -> None:
    """Start the study's next trial (its waiting copy, if any) and stop it: "int" as Ctrl-C does
    (the copy queued, then Optuna marks the trial failed), "kill" as a rerun on this host finds
    its process gone."""
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    if how == "int":
        retry.queue_interrupted(optuna, trial)
        study.tell(trial, state=State.FAIL)
    else:
        pid = _dead_pid()
        trial.set_user_attr(
            "process", {"host": socket.gethostname(), "pid": pid, "trial": trial.number}
        )
        retry.fail_stopped_trials(optuna, study)


@pytest.mark.parametrize(
    "stops, copied",
    [
        (["kill", "kill"], True),
        (["kill", "kill", "kill"], False),  # killed three times: not tried again
        (["int", "int", "int", "int"], True),
        (["int", "int", "kill"], True),
        (["kill", "int", "kill", "kill"], False),
        (["int", "kill", "int", "kill"], True),
        (["kill", "kill", "int"], True),  # killed twice: a Ctrl-C then still gets its copy
    ],
    ids=lambda stops: "-".join(stops) if isinstance(stops, list) else str(stops),
)
def test_a_trial_is_retried_until_it_was_killed_three_times_however_often_ctrl_c_stopped_it(
    stops, copied
):
    """Would break: MAX_RETRIES another number (the OOM killer's trial retried forever, or given up
    early), a Ctrl-C counted as a kill (two Ctrl-Cs and one kill -9 lost the trial, though the
    docs say an interrupt does not count), or the stopped trial's own record changed as its copy
    was queued."""
    study = optuna.create_study(direction="maximize")
    for how in stops:
        _stop_next(study, how)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials[: len(stops)]] == [State.FAIL] * len(stops)
    # each stopped trial a copy of the one before, its own record unchanged by queuing its copy
    chains = [retry.stopped_trials(optuna, t) for t in trials[: len(stops)]]
    assert chains == [list(range(n)) for n in range(len(stops))]
    waiting = trials[len(stops) :]
    assert len(waiting) == int(copied)
    if copied:
        assert waiting[0].state == State.WAITING
        assert retry.stopped_trial(optuna, waiting[0]) == len(stops) - 1


def test_a_process_killed_after_it_queued_its_ctrl_c_copy_gets_no_second_copy():
    """Ctrl-C queues the copy before Optuna marks the trial failed; a kill -9 in between (Ctrl-C,
    then kill) left a running trial whose process is gone. Would break: the rerun queued a second
    copy of it, trained the same values twice."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": _dead_pid(), "trial": trial.number}
    )
    retry.queue_interrupted(optuna, trial)  # ... and the process is killed here
    retry.fail_stopped_trials(optuna, study)  # the rerun
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.FAIL, State.WAITING]


def test_a_second_ctrl_c_while_the_first_ones_copy_is_queued_does_not_lose_the_copy(monkeypatch):
    """Would break: Ctrl-C pressed twice raised a KeyboardInterrupt inside the queuing, and the
    trial was marked failed without a copy (its checkpoint never resumed)."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    add_trial = optuna.study.Study.add_trial

    def pressed_again(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the signal is handled (or not) by now
        return add_trial(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "add_trial", pressed_again)
    # Python's own handler, as in a terminal (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        retry.queue_interrupted(optuna, trial)
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C stopped the queuing of the copy")
    finally:
        handler = signal.signal(signal.SIGINT, previous)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.RUNNING, State.WAITING]
    assert handler is signal.default_int_handler  # restored


# --- Ctrl-C and kills anywhere in a trial --------------------------------------------------------


def _train_saving_a_checkpoint(calls, stop_at_the_end=False):
    """A fake train that records (folder, whether it held a checkpoint) and writes one."""

    def train(cfg, run_dir, show_progress, on_eval):
        calls.append((run_dir.name, (run_dir / "checkpoint.pt").exists()))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoint.pt").write_bytes(b"")
        if stop_at_the_end:
            raise KeyboardInterrupt
        on_eval(cfg.steps, {"test_accuracy": 0.5})
        return {"results": [{"accuracy": 0.5, "dataset": "digits-5pc-3tune-seed0-tune"}]}

    return train


def test_ctrl_c_before_the_training_of_a_copy_starts_still_queues_the_next_copy(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C right after the copy moved the stopped trial's folder to its own number (before
    `train`). Would break: the KeyboardInterrupt passed the objective's handler, Optuna printed a
    traceback and marked the copy failed without a copy of its own: the checkpoint was lost."""
    opts = options(tmp_path)
    calls: list = []
    tuner = Tuner(opts)
    tuner.train = _train_saving_a_checkpoint(calls, stop_at_the_end=True)
    with pytest.raises(KeyboardInterrupt):
        tuner.run()

    take_over_folder = retry.take_over_folder

    def interrupted_after_the_move(*args):
        take_over_folder(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(retry, "take_over_folder", interrupted_after_the_move)
    with pytest.raises(KeyboardInterrupt):
        Tuner(opts).run()
    assert "t-student trial 1: interrupted; the same command resumes it" in capsys.readouterr().out
    monkeypatch.undo()

    tuner = Tuner(opts)
    tuner.train = _train_saving_a_checkpoint(calls)
    tuner.run()
    assert "t-student trial 2: resumes trial 1 from its checkpoint" in capsys.readouterr().out
    assert calls == [("0", False), ("2", True)]
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.FAIL, State.COMPLETE]
    assert study.trials[2].params == study.trials[0].params


def test_a_copy_records_its_own_process_before_it_takes_over_the_folder(tmp_path, monkeypatch):
    """Would break: a copy killed after it moved the folder, before it recorded its process, kept
    the record it inherited (another trial's), so a rerun on this host took it for running and it
    stayed "running" until its heartbeat was 2 minutes old."""
    opts = options(tmp_path)
    tuner = Tuner(opts)
    tuner.train = _train_saving_a_checkpoint([], stop_at_the_end=True)
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    seen = []
    take_over_folder = retry.take_over_folder

    def recorded_then(*args):
        study = optuna.load_study(study_name="t-student", storage=opts.storage)
        (running,) = study.get_trials(deepcopy=False, states=(State.RUNNING,))
        seen.append((running.number, running.user_attrs["process"]))
        return take_over_folder(*args)

    monkeypatch.setattr(retry, "take_over_folder", recorded_then)
    tuner = Tuner(opts)
    tuner.train = _train_saving_a_checkpoint([])
    tuner.run()
    ((number, process),) = seen
    assert number == 1 and process["trial"] == 1 and process["pid"] == os.getpid()


def test_a_copy_resumes_the_folder_of_an_earlier_trial_of_its_chain_when_the_last_never_took_it(
    tmp_path,
):
    """Trial 1 (a copy of 0) was killed before it moved folder 0 to its own number; its copy, 2,
    resumes folder 0 (the same configuration). Would break: copy 2 looked for folder 1 only and
    started over, leaving 0's checkpoint behind."""
    trials_dir = tmp_path / "trials"
    (trials_dir / "0").mkdir(parents=True)
    (trials_dir / "0" / "checkpoint.pt").write_bytes(b"0")
    assert retry.take_over_folder([0, 1], trials_dir / "2")
    assert (trials_dir / "2" / "checkpoint.pt").read_bytes() == b"0"
    assert not (trials_dir / "0").exists()
    # the last of the chain's folders first
    for number in (0, 1):
        (trials_dir / str(number)).mkdir()
        (trials_dir / str(number) / "checkpoint.pt").write_bytes(str(number).encode())
    assert retry.take_over_folder([0, 1], trials_dir / "3")
    assert (trials_dir / "3" / "checkpoint.pt").read_bytes() == b"1"
    assert (trials_dir / "0").exists()
    assert not retry.take_over_folder([5], trials_dir / "6")  # nothing of it here


# --- what the other tests left unchecked (each a change that passed them) ------------------------


def test_a_trial_running_in_another_users_process_is_left_to_its_heartbeat(monkeypatch):
    """Would break: a process id that exists but is not ours (signal 0 refused) was taken for
    gone, and the trial of a live process was failed and its folder taken over."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": 12345, "trial": trial.number}
    )

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    retry.fail_stopped_trials(optuna, study)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.RUNNING]


def test_only_the_process_that_marks_a_stopped_trial_failed_queues_its_copy(monkeypatch):
    """Would break: a process that lost the compare-and-set (another one marked the trial failed
    first) queued a second copy."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": _dead_pid(), "trial": trial.number}
    )
    monkeypatch.setattr(study._storage, "set_trial_state_values", lambda *a, **k: False)
    retry.fail_stopped_trials(optuna, study)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.RUNNING]


def test_a_trial_whose_heartbeat_went_stale_is_failed_and_copied_from_any_host(
    tmp_path, monkeypatch
):
    """A trial of another host (or a process that is alive but stalled) is found through its
    Optuna heartbeat. Would break: fail_stopped_trials left stale trials to Optuna's next trial
    (and stage 2 waited on them), or the storage failed them without queuing a copy."""
    monkeypatch.setattr(storage_module, "GRACE_S", 1)
    monkeypatch.setattr(storage_module, "HEARTBEAT_S", 1)
    study = optuna.create_study(
        storage=storage_module.open_storage(f"sqlite:///{tmp_path / 'stale.db'}"),
        direction="maximize",
    )
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("process", {"host": "another-host", "pid": 1, "trial": trial.number})
    study._storage.record_heartbeat(trial._trial_id)
    deadline = time.monotonic() + 10  # the database's clock counts whole seconds
    while study.get_trials(deepcopy=False)[0].state == State.RUNNING:
        assert time.monotonic() < deadline, "the stale trial was never failed"
        time.sleep(0.2)
        retry.fail_stopped_trials(optuna, study)
    stopped, *copies = study.get_trials(deepcopy=False)
    assert stopped.state == State.FAIL
    assert [c.state for c in copies] == [State.WAITING]
    assert copies[0].params == stopped.params and retry.stopped_trial(optuna, copies[0]) == 0


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_copied(tmp_path, monkeypatch):
    """A process killed between Optuna creating its trial and the trial's first heartbeat leaves
    a running trial that records nothing. Would break: Optuna never finds a trial without a
    heartbeat stale, so it stayed running forever (and stage 2 waited for it); or the heartbeat
    given to it was given again on every call, which kept it alive just the same."""
    monkeypatch.setattr(storage_module, "GRACE_S", 1)
    monkeypatch.setattr(storage_module, "HEARTBEAT_S", 1)
    study = optuna.create_study(
        storage=storage_module.open_storage(f"sqlite:///{tmp_path / 'silent.db'}"),
        direction="maximize",
    )
    for number in (0, 1):  # the trial, then its copy (which inherits the trial's attributes)
        study.ask()  # no heartbeat, no process record: its process died right here
        deadline = time.monotonic() + 10  # the database's clock counts whole seconds
        while study.get_trials(deepcopy=False)[number].state == State.RUNNING:
            assert time.monotonic() < deadline, f"the silent trial {number} was never failed"
            retry.fail_stopped_trials(optuna, study)
            time.sleep(0.2)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [State.FAIL] * (number + 1) + [State.WAITING]
        assert retry.stopped_trial(optuna, trials[-1]) == number


def test_stage_two_does_not_wait_for_a_trial_whose_process_is_gone_from_this_host(monkeypatch):
    """Would break: wait_for_running only knew Optuna's heartbeat, so `--stage teacher` right
    after a kill -9 in stage 1 waited 2 minutes for the dead trial."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": _dead_pid(), "trial": trial.number}
    )

    def no_waiting(seconds):
        raise AssertionError("waited for a trial whose process is gone")

    monkeypatch.setattr(studies.time, "sleep", no_waiting)
    studies.wait_for_running(optuna, study)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.FAIL, State.WAITING]


def test_a_resumed_run_does_not_report_again_the_steps_its_stopped_trial_reported(tmp_path, capsys):
    """Killed after the evaluation at step 6 but before a checkpoint there, the run resumes from
    step 3 and evaluates step 6 again. Would break: that step was reported again, and Optuna
    printed "UserWarning: The reported value is ignored ..." on the command line."""
    opts = options(tmp_path)

    def stopped_after_step_6(cfg, run_dir, show_progress, on_eval):
        on_eval(3, {"test_accuracy": 0.3})
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoint.pt").write_bytes(b"")  # at step 3
        on_eval(6, {"test_accuracy": 0.6})
        raise KeyboardInterrupt

    def resumed_from_step_3(cfg, run_dir, show_progress, on_eval):
        on_eval(6, {"test_accuracy": 0.6})
        on_eval(9, {"test_accuracy": 0.9})
        return {"results": [{"accuracy": 0.9, "dataset": "digits-5pc-3tune-seed0-tune"}]}

    tuner = Tuner(opts)
    tuner.train = stopped_after_step_6
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    tuner = Tuner(opts)
    tuner.train = resumed_from_step_3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner.run()
    assert not [str(w.message) for w in caught if "already reported" in str(w.message)]
    resumed = optuna.load_study(study_name="t-student", storage=opts.storage).trials[1]
    assert resumed.intermediate_values == {3: 0.3, 6: 0.6, 9: 0.9}


def test_best_toml_counts_a_stopped_trial_and_the_copy_that_resumed_it_once(tmp_path):
    """The header's "N trials ... finished" counts completed and pruned trials. Would break:
    counting the stopped (failed) trial too, or leaving the pruned ones out."""
    opts = options(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    tuner = Tuner(opts)
    tuner.train = interrupted
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    outcomes = iter(["pruned", "complete"])

    def pruned_then_complete(cfg, run_dir, show_progress, on_eval):
        if next(outcomes) == "pruned":
            raise optuna.TrialPruned()
        on_eval(cfg.steps, {"test_accuracy": 0.5})
        return {"results": [{"accuracy": 0.5, "dataset": "digits-5pc-3tune-seed0-tune"}]}

    tuner = Tuner(dataclasses.replace(opts, trials=2))
    tuner.train = pruned_then_complete
    path = tuner.run()
    study = optuna.load_study(study_name="t-student", storage=opts.storage)
    assert [t.state for t in study.trials] == [State.FAIL, State.PRUNED, State.COMPLETE]
    assert "(2 trials of t-student finished when this was written)" in path.read_text()


def test_a_copy_takes_over_only_a_folder_with_a_checkpoint_and_replaces_what_is_in_its_own(
    tmp_path,
):
    """Would break: a stopped trial's folder without a checkpoint (stopped before its first one)
    was moved and reported as resumed "from its checkpoint"; or a leftover folder at the copy's
    own number made the move fail."""
    trials_dir = tmp_path / "trials"
    (trials_dir / "0").mkdir(parents=True)
    (trials_dir / "0" / "metrics.csv").write_text("step,name,value\n")
    assert not retry.take_over_folder([0], trials_dir / "1")
    assert (trials_dir / "0").exists() and not (trials_dir / "1").exists()
    (trials_dir / "0" / "checkpoint.pt").write_bytes(b"0")
    (trials_dir / "1").mkdir()
    (trials_dir / "1" / "leftover").write_text("from an earlier study of this name")
    assert retry.take_over_folder([0], trials_dir / "1")
    assert sorted(p.name for p in (trials_dir / "1").iterdir()) == ["checkpoint.pt", "metrics.csv"]


def test_stage_two_waits_for_a_running_trial_of_a_live_process(monkeypatch, capsys):
    """docs/tuning.md: the process that creates NAME-teacher "first waits until no trial of
    NAME-student is running". Would break: stage 2 fixing the student's values while another
    worker's stage-1 trial (perhaps the best) still runs."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": os.getpid(), "trial": trial.number}
    )
    naps = []

    def the_other_worker_finishes(seconds):
        naps.append(seconds)
        study.tell(trial, 0.5)

    monkeypatch.setattr(studies.time, "sleep", the_other_worker_finishes)
    studies.wait_for_running(optuna, study)
    assert len(naps) == 1 and [t.state for t in study.trials] == [State.COMPLETE]
    assert "waiting for 1 running trial(s) of" in capsys.readouterr().out

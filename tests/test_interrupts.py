"""Interruptions outside `metapl train`: Ctrl-C ends every command in one line, and a crash while
a result is written leaves the earlier result whole (figures, best.toml, benchmark JSON)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.figure
import optuna
import pytest
from conftest import held_bar_locks

import metapl.train.engine as engine
from metapl.cli import main
from metapl.experiments.figure9 import plot_figure9
from metapl.experiments.figure10 import plot_figure10
from metapl.experiments.twomoons_plots import plot_gradient_cosine
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import TrainConfig
from metapl.tuning import bestfile

ROOT = Path(__file__).parent.parent
OLD_PNG = b"\x89PNG an earlier, complete figure"


def _crash_while_saving(monkeypatch):
    """Figure.savefig writes half a file where it is told to, then dies (a kill, a full disk)."""

    def half(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)


def _figure9(tmp_path: Path, path: Path) -> None:
    for method in ("supervised", "uda_mpl"):
        run = tmp_path / method / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("step,name,value\n5,student_labeled_accuracy,0.5\n")
    plot_figure9(tmp_path, 0, path)


def _figure10(tmp_path: Path, path: Path) -> None:
    series = {"large_teacher": [[0.5, 0.5]], "reduced_teacher_by_quarter": {"1": [[0.2, 0.8]]}}
    (tmp_path / "figure10.json").write_text(json.dumps(series))
    plot_figure10(tmp_path / "figure10.json", path)


def _grad_cosine(tmp_path: Path, path: Path) -> None:
    plot_gradient_cosine({"mpl": {"steps": [0, 1], "per_seed": [[0.1, 0.2]]}}, path)


@pytest.mark.parametrize("plot", [_figure9, _figure10, _grad_cosine])
def test_a_figure_killed_while_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch, plot):
    path = tmp_path / "figure.png"
    path.write_bytes(OLD_PNG)
    _crash_while_saving(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        plot(tmp_path, path)
    assert path.read_bytes() == OLD_PNG
    assert not list(tmp_path.glob(".figure.png.*"))  # no temporary file left behind


def test_best_toml_that_fails_midway_leaves_the_earlier_one_and_no_temporary_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "best.toml"
    path.write_text("student_lr = 0.1\n")

    def half(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:5])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError):
        bestfile.write_atomic(path, bestfile.render(TrainConfig(), ["header"], {}))
    monkeypatch.undo()
    assert path.read_text() == "student_lr = 0.1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.toml"]


def test_result_files_are_written_through_metapl_atomic():
    """A result written straight to its path is half a file after a kill, and the earlier result is
    gone: metapl's modules and the benchmark scripts write through metapl.atomic."""
    offenders = []
    for path in [*(ROOT / "src" / "metapl").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if path.name == "atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            direct = re.search(r"\.write_text\(|\.write_bytes\(", line)
            plot = ".savefig(" in line and "replace_atomically" not in line
            if direct or plot:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_ctrl_c_in_tune_is_one_line_and_queues_the_trial_to_resume(tmp_path, monkeypatch, capfd):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--storage", storage]
    args += ["--out", str(tmp_path / "out"), "--steps", "6", "--device", "cpu", "--quiet"]
    args += ["--study", "t", "--stage", "student", "--set", "tune_per_class=3"]
    args += ["--set", "warmup_steps=2", "--set", "uda_warmup_steps=2"]  # no notes on stderr
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append  # what Optuna prints, whatever stream its own handler holds
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(handler)
    try:
        assert main(args) == 130
    finally:
        optuna_logger.removeHandler(handler)
    out, err = capfd.readouterr()
    assert err == "metapl tune: interrupted\n"
    assert out == (
        "t-student trial 0: interrupted; the same command resumes it from its last checkpoint\n"
    )
    assert [r.getMessage() for r in logged] == []  # no "Trial 0 failed ..." and its traceback
    trials = optuna.load_study(study_name="t-student", storage=storage).trials
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.FAIL, State.WAITING]  # its copy, to resume


def _digits_with_two_running_workers(out: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """`metapl digits` (with ``extra`` options) in its own process group, returned once both of
    its runs are training, with its worker processes' ids."""
    cmd = [sys.executable, "-m", "metapl", "digits", "--seeds", "0-1", "--methods", "supervised"]
    cmd += ["--steps", "100000", "--set", "eval_every=100000", "--out", str(out), "--quiet"]
    cmd += extra
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, ended by the caller whatever happens
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    started = [out / "supervised" / f"seed{s}" / "config.json" for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in started):  # both runs are training
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the runs did not start: " + proc.stderr.read().decode())
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return proc, workers.stdout.split()


def _running(pid: str) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _signal_and_wait(proc: subprocess.Popen, signum: int, timeout: float) -> str:
    """Send ``signum`` to the command's main process alone and wait for it to exit; its stderr.
    Its process group is killed if it has not exited within ``timeout`` seconds."""
    try:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return err.decode()


def test_ctrl_c_ends_metapl_digits_and_its_workers_at_once(tmp_path):
    """SIGINT to the command (Ctrl-C, or `kill -INT` of the main process alone): the running runs
    stop now, without waiting for them to finish, and the command exits with one line. Before, the
    command waited for every running run to finish, or (signalled with its workers) could wait
    forever on workers that waited for work."""
    out = tmp_path / "out"
    proc, workers = _digits_with_two_running_workers(out)
    assert len(workers) == 2
    err = _signal_and_wait(proc, signal.SIGINT, timeout=30)
    assert proc.returncode == 130
    assert err == "metapl digits: interrupted\n"
    time.sleep(0.5)
    assert [w for w in workers if _running(w)] == []
    assert not (out / "results.json").exists()


def test_sigterm_to_metapl_digits_lets_each_running_run_save_its_step_first(tmp_path):
    """SIGTERM to the main process alone (`kill PID`, a scheduler): it passes the signal on to its
    workers, whose runs each save a checkpoint of the step in progress (metapl.train.stopping),
    waits for them, and exits with one line and code 143. Before, the main process died at once
    and its orphaned workers a second later, each losing every step since its last checkpoint."""
    out = tmp_path / "out"
    # no regular checkpoint before step 100000: any checkpoint is the stop's
    extra = ("--set", "checkpoint_every=100000", "--set", "log_every=1")
    proc, workers = _digits_with_two_running_workers(out, *extra)
    assert len(workers) == 2
    # both in their training loops (before it, a signal ends a run that has nothing to save)
    logs = [out / "supervised" / f"seed{s}" / "metrics.csv" for s in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text().count("\n") > 1 for p in logs):
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the runs did not log a step")
        time.sleep(0.1)
    err = _signal_and_wait(proc, signal.SIGTERM, timeout=60)
    assert err == (
        "metapl digits: stopped by SIGTERM; each run in progress saved a checkpoint of its step "
        "first: run the same command again to resume every run\n"
    )
    assert proc.returncode == 143
    assert [w for w in workers if _running(w)] == []
    for seed in (0, 1):
        saved = load_checkpoint(out / "supervised" / f"seed{seed}" / "checkpoint.pt")
        assert 0 < saved["step"] < 100000
    assert not (out / "results.json").exists()


def _stopped_slowly(folder: Path) -> dict:
    """A run that signals the main process, as a scheduler would, and once the main process passes
    the signal on takes a while to save its step."""
    from metapl.train.stopping import Stopped, StopSignals

    with StopSignals() as signals:
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while signals.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(1)
    (folder / "saved").touch()
    raise Stopped(signals.signum or signal.SIGTERM, "")


def test_a_stopped_pool_returns_once_its_runs_are_saved(tmp_path):
    """Before, the main process's Stopped left the pool at once: `metapl digits` printed that each
    run had saved its step while the runs were still saving (the interpreter's exit then waited for
    them), and a program calling the pool went on before them."""
    from metapl.experiments.workers import map_runs, worker_pool
    from metapl.train.stopping import Stopped

    with pytest.raises(Stopped), worker_pool(1) as pool:
        map_runs(pool, _stopped_slowly, [tmp_path], "digits runs", False)
    assert (tmp_path / "saved").exists()


def _started_then_stopped(job: tuple[Path, int]) -> dict:
    """A run that notes that it started; the first signals the main process, as a scheduler
    would, and stops once the main process passes the signal on."""
    from metapl.train.stopping import Stopped, StopSignals

    folder, number = job
    (folder / f"started{number}").touch()
    if number == 0:
        time.sleep(1)  # the pool's manager thread fills its queue meanwhile
        with StopSignals() as signals:
            os.kill(os.getppid(), signal.SIGTERM)
            deadline = time.monotonic() + 30
            while signals.signum is None and time.monotonic() < deadline:
                time.sleep(0.01)
        raise Stopped(signals.signum or signal.SIGTERM, "")
    return {}


def test_no_queued_run_starts_once_the_pool_is_stopped(tmp_path):
    """The pool hands one run more than it has workers to its queue, where cancelling does not
    reach it: the worker whose run stopped started that run, which no signal stopped, and the
    command waited for it to finish (a scheduler's grace period is 30 s)."""
    from metapl.experiments.workers import map_runs, worker_pool
    from metapl.train.stopping import Stopped

    jobs = [(tmp_path, number) for number in range(3)]
    with pytest.raises(Stopped) as stopped, worker_pool(1) as pool:
        map_runs(pool, _started_then_stopped, jobs, "digits runs", False)
    assert stopped.value.signum == signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started0"]


def test_workers_of_a_killed_metapl_digits_exit_too(tmp_path):
    """`kill -9` of the main process alone (or the OOM killer): its workers must not train on
    unseen, writing into the run folders that a rerun of the command then uses too."""
    proc, workers = _digits_with_two_running_workers(tmp_path / "out")
    try:
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [w for w in workers if _running(w)] == []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, should they still run


def _killed(job: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return job


def test_a_worker_killed_mid_run_is_one_line_saying_that_a_rerun_resumes():
    """`kill -9` of a worker (or the OOM killer) was the executor's BrokenProcessPool traceback."""
    from metapl.errors import MetaplError
    from metapl.experiments.workers import map_runs, worker_pool

    with pytest.raises(MetaplError) as info, worker_pool(1) as pool:
        map_runs(pool, _killed, [0], "digits runs", False)
    message = str(info.value)
    assert "\n" not in message and "worker process died during the digits runs" in message
    assert "run the same command again to resume" in message


def test_the_command_line_starts_without_torch_and_the_library_still_has_it():
    """Importing torch takes seconds: while it loads, a Ctrl-C was a traceback (it happened in
    `import metapl`, before main's handler), and `metapl --help` waited for it."""
    code = (
        "import sys, metapl.cli; assert 'torch' not in sys.modules, 'torch at start';"
        "import metapl; from metapl import *; assert MetaPseudoLabels is metapl.MetaPseudoLabels;"
        "assert 'torch' in sys.modules and TeacherLogits.__module__ == 'metapl.mpl.step'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        import metapl

        metapl.nope  # noqa: B018


@pytest.mark.parametrize(
    "argv",
    [
        ["twomoons", "--seeds", "x"],
        ["twomoons", "--noise", "2"],
        ["digits", "--seeds", "9-3"],
        ["reduced", "--seeds", "1,1"],
        ["train", "--preset", "nope"],
        ["train", "--preset", "digits-uda", "--set", "nope=1"],
    ],
    ids=["twomoons-seeds", "twomoons-noise", "digits", "reduced", "train-preset", "train-key"],
)
def test_a_mistyped_option_is_reported_before_torch_loads(tmp_path, argv):
    """A typo's one-line error came after torch's import (4-6 s on a CI machine): the options are
    checked first. Would break: a command that imports its experiment or the training engine
    before it reads its options."""
    out = tmp_path / "out"
    code = (
        "import sys; from metapl.cli import main; code = main(sys.argv[1:]);"
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", code, *argv, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"metapl {argv[0]}: error:" in done.stderr
    assert not out.exists()


def test_ctrl_c_while_the_options_are_read_is_one_line(monkeypatch, capsys):
    import metapl.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(metapl.cli, "build_parser", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "metapl: interrupted\n"


def _parent_pid() -> int:
    return os.getppid()


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_workers_are_the_main_processs_children_whatever_pythons_default_start_method():
    """Python 3.14 made a fork server Linux's default (simulated here): the workers were then the
    server's children, and the server outlives a killed main process, so the workers went on
    training (the test above, run on 3.14)."""
    from metapl.experiments.workers import worker_pool

    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        with worker_pool(1) as pool:
            assert pool.submit(_parent_pid).result(timeout=60) == os.getpid()
    finally:
        multiprocessing.set_start_method(before, force=True)


def _hold_the_bar_lock_and_die(_: object) -> dict:
    """A worker killed while it writes a progress bar (holding tqdm's write lock)."""
    from tqdm import tqdm

    tqdm.get_lock().acquire()
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_worker_killed_while_writing_a_bar_leaves_the_main_processs_bars_working():
    """tqdm's default write lock holds a multiprocessing lock that a fork shares: a worker killed
    holding it (Ctrl-C kills the running workers) kept it locked, and the main process's next
    progress bar waited forever (a CI run of the tests hung in a later test's bar)."""
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from metapl.experiments.workers import worker_pool

    tqdm.get_lock()  # made before the fork, as in a command that shows a bar
    with pytest.raises(BrokenProcessPool), worker_pool(1) as pool:
        pool.submit(_hold_the_bar_lock_and_die, None).result(timeout=60)
    # (held locks are replaced after the test by conftest, so that later tests can show bars)
    assert held_bar_locks(wait=5) == [], "the main process's bar locks are held by a dead worker"

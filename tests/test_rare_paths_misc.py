"""Library behaviour that a coverage run of the whole suite found unexercised: models' guards and
initialisation, autocast in a method's step, the repr of StrongAugment, best.toml's values, locks
renewed in a forked child, a full disk's message, GlobalBatchNorm's edge cases, single-process
data parallelism, `metapl tune`'s failed writes and races in its storage, and the worker processes
of `metapl digits` and `reduced`.

Code that runs in a forked child (the after-fork hooks, a pool worker's start) is called here in
the test's process, its process-wide effects patched or restored, so that coverage sees it. Each
test says what would break it."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import socket
import threading
from concurrent.futures.process import BrokenProcessPool

import optuna
import pytest
import torch
from test_sync_batchnorm_mutants import OtherRank
from test_tune import options
from test_tune_resume import _dead_pid
from torch import nn

from metapl import sync_batchnorm, warning_filters
from metapl.atomic import write_error
from metapl.augment.randaugment import StrongAugment
from metapl.distributed import DataParallel, GradientAverager
from metapl.errors import WriteError
from metapl.experiments import workers
from metapl.methods.base import Batch, autocast
from metapl.methods.supervised import SupervisedMethod
from metapl.models.layers import init_conv_net
from metapl.models.wrn import WideResNet
from metapl.sync_batchnorm import GlobalBatchNorm, convert_global_batchnorm
from metapl.train.stopping import STOP_SIGNALS, Stopped
from metapl.tuning import retry
from metapl.tuning.bestfile import toml_value
from metapl.tuning.runner import Tuner

State = optuna.trial.TrialState


# --- models, methods, augmentation ---------------------------------------------------------------


def test_a_wide_resnet_depth_must_be_6n_plus_4():
    """WRN-depth-k has (depth - 4) / 6 blocks per group: another depth is a ValueError naming it
    (`WideResNet.__init__`). Would break: WRN-27-2 built silently as WRN-22-2 (the division rounded
    down)."""
    with pytest.raises(ValueError, match=r"^WideResNet depth must be 6n \+ 4, got 27$"):
        WideResNet(10, depth=27)
    model = WideResNet(10, depth=10, widen_factor=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 2  # the stem, then 1 block of 2 convolutions per group


def test_conv_net_initialisation_zeroes_a_convolutions_bias():
    """init_conv_net: He fan-out kernels and, for a convolution that has one, a zero bias
    (`layers.init_conv_net`). Would break: a bias left at PyTorch's random uniform init."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, bias=True)
    nn.init.ones_(conv.bias)
    model = nn.Sequential(conv, nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32, 10))
    init_conv_net(model)
    assert torch.equal(conv.bias, torch.zeros(32))
    std = (2.0 / (32 * 3 * 3)) ** 0.5  # fan-out: out_channels * kernel area
    assert conv.weight.std().item() == pytest.approx(std, rel=0.05)


def test_a_methods_forward_runs_in_the_autocast_dtype_and_its_loss_in_float32():
    """With autocast_dtype=bf16 the model's forward runs under torch.autocast
    (`methods.base.autocast`): its logits are bf16 (CPU autocast), the loss upcast to float32.
    Without it, float32 throughout. Would break: `--set precision=bf16` training in float32 without
    a word."""
    seen = []
    for dtype in (torch.bfloat16, None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        method = SupervisedMethod(
            model, torch.optim.SGD(model.parameters(), lr=0.1), autocast_dtype=dtype
        )
        batch = Batch(x_labeled=torch.randn(4, 3, 2, 2), y_labeled=torch.tensor([0, 1, 2, 0]))
        loss = method.step(batch)["student_loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert seen == [torch.bfloat16, torch.float32]
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_strong_augment_repr_names_every_setting_and_rebuilds_it():
    """repr(StrongAugment(...)) lists every setting (`StrongAugment.__repr__`), so that a logged
    policy can be rebuilt from it. Would break: a default repr with a memory address."""
    policy = StrongAugment(num_ops=3, max_magnitude=7, cutout=0.25, op_prob=0.8, ops=["Rotate"])
    text = repr(policy)
    assert text == (
        "StrongAugment(num_ops=3, max_magnitude=7.0, cutout=0.25, op_prob=0.8, ops=('Rotate',))"
    )
    assert repr(eval(text, {"StrongAugment": StrongAugment})) == text


def test_a_value_without_a_toml_form_is_a_type_error():
    """best.toml holds bools, numbers, strings and lists of them; any other value is a TypeError
    naming it (`bestfile.toml_value`), a bug to fix, not a file that `--preset` cannot read. Would
    break: None or a dict written as Python's repr."""
    assert toml_value([1, "a", True, 0.5]) == '[1, "a", true, 0.5]'
    for value in (None, {"a": 1}):
        with pytest.raises(TypeError, match=rf"^no TOML form for {value!r}$"):
            toml_value(value)


# --- after a fork; a full disk -------------------------------------------------------------------


def test_a_forked_child_gets_a_new_warning_filter_lock(monkeypatch):
    """A thread of the parent may hold the lock at the fork: the child takes a fresh one
    (`warning_filters._new_lock_in_child`, an after-fork hook; called directly here). Would break:
    the child's first `ignoring` block waiting forever."""
    held = threading.Lock()
    held.acquire()
    monkeypatch.setattr(warning_filters, "_LOCK", held)
    warning_filters._new_lock_in_child()
    assert warning_filters._LOCK is not held
    with warning_filters.ignoring(message="x"):  # would block on the held lock
        assert warning_filters._LOCK.locked()


def test_a_full_disk_whose_folder_is_gone_is_named_without_the_free_space(tmp_path):
    """A full disk's message adds the free space of the file's folder; when that cannot be read (the
    folder is gone) the message goes without it (`atomic.write_error`). Would break: the
    FileNotFoundError of disk_usage in place of the write's one line."""
    full = OSError(errno.ENOSPC, "No space left on device")
    gone = tmp_path / "gone" / "results.json"
    error = write_error(gone, full)
    assert isinstance(error, WriteError) and error.errno == errno.ENOSPC
    assert str(error) == (
        f"could not write {gone}: No space left on device; nothing half-written is left"
    )
    there = write_error(tmp_path / "results.json", full)
    assert "MiB free there); nothing half-written is left" in str(there)


# --- GlobalBatchNorm and single-process data parallelism -----------------------------------------


def test_global_batchnorm_wants_a_batch_dimension():
    """An input of one dimension has no channel axis: a ValueError naming its dimensions
    (`GlobalBatchNorm._check_input_dim`), as BatchNorm raises. Would break: a 1-D input normalised
    as a batch of scalars."""
    layer = GlobalBatchNorm(3)
    with pytest.raises(ValueError, match=r"^expected an input of at least 2 dimensions, got 1$"):
        layer(torch.randn(3))


def test_momentum_none_without_a_counter_leaves_running_statistics_as_batchnorm_does(
    monkeypatch,
):
    """momentum=None averages over the counted batches; without a counter (num_batches_tracked
    removed) there is nothing to average with, and BatchNorm leaves the running statistics as they
    are: so does GlobalBatchNorm over two processes (`GlobalBatchNorm._update_running_stats`; the
    second process simulated as in test_sync_batchnorm_mutants). Would break: a TypeError (lerp by
    None), or statistics replaced by the last batch's."""
    ref = nn.BatchNorm1d(3, momentum=None).double()
    twin = convert_global_batchnorm(nn.Sequential(nn.BatchNorm1d(3, momentum=None).double()))[0]
    ref.num_batches_tracked = None
    twin.num_batches_tracked = None
    monkeypatch.setattr(sync_batchnorm, "_world_size", lambda group: 2)
    g = torch.Generator().manual_seed(0)
    mine = 2.0 + torch.randn(4, 3, generator=g, dtype=torch.float64)
    other = -1.0 + torch.randn(4, 3, generator=g, dtype=torch.float64)
    monkeypatch.setattr(sync_batchnorm.dist, "all_reduce", OtherRank(other))
    with torch.no_grad():
        got = twin(mine)
        want = ref(torch.cat([mine, other]))[:4]
    torch.testing.assert_close(got, want)
    assert torch.equal(twin.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(twin.running_var, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(twin.running_mean, ref.running_mean)


def test_gradient_averaging_in_one_process_or_of_no_gradients_communicates_nothing(monkeypatch):
    """A world of one, or a call with only absent gradients, returns at once without an all-reduce
    (`GradientAverager.mean_`). Would break: a collective call in a single process (torch.cat of an
    empty list raises, too)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    sizes = iter([1, 2])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: next(sizes))

    def no_collective(*args, **kwargs):
        raise AssertionError("all_reduce called")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    grads = [torch.tensor([1.0, 2.0]), None]
    GradientAverager().mean_(grads)  # world of 1
    assert grads[0].tolist() == [1.0, 2.0]
    GradientAverager().mean_([None, None])  # world of 2, nothing to average


def test_a_single_process_answers_its_own_flag():
    """Without a process group, "is it true on any rank" and "on all ranks" are this process's flag
    (`DataParallel.any_rank`, when not enabled). Would break: a collective call outside a process
    group."""
    dp = DataParallel()
    assert not dp.enabled
    assert dp.any_rank(True) is True and dp.any_rank(False) is False
    assert dp.all_ranks(True) is True and dp.all_ranks(False) is False


# --- `metapl tune`: a failed write, races in the storage -----------------------------------------


def test_a_failed_write_whose_copy_cannot_be_queued_says_so(tmp_path, capsys, monkeypatch):
    """A failed write (full disk) stops the trial; when the study's storage, on the same full disk,
    cannot take the trial's copy either, the line says no copy was queued (`Stage.objective`, when
    queue_interrupted fails) instead of promising a resume, and the write's error propagates. Would
    break: the storage's error in place of the write's, or "the same command resumes it"."""

    def disk_full(*args, **kwargs):
        raise WriteError("could not write metrics.csv: No space left on device")

    def storage_full(optuna_module, trial):
        raise OSError(errno.ENOSPC, "database or disk is full")

    monkeypatch.setattr(retry, "queue_interrupted", storage_full)
    tuner = Tuner(options(tmp_path))
    tuner.train = disk_full
    with pytest.raises(WriteError, match="No space left on device"):
        tuner.run()
    out = capsys.readouterr().out
    assert (
        "t-student trial 0: stopped by a failed write; no copy of it could be queued in the "
        in (out)
    )
    assert "resumes it" not in out


def test_a_heartbeat_for_a_trial_that_finished_meanwhile_is_no_error():
    """The trial given a heartbeat finishes before its mark is recorded: Optuna refuses the update,
    and that is no error (`retry._give_heartbeat`). Would break: fail_stopped_trials raising
    UpdateFinishedTrialError, and `metapl tune` stopping on another process's finished trial."""
    study = optuna.create_study(direction="maximize")
    study.ask()
    (trial,) = study.get_trials(deepcopy=False)

    class Storage:
        beats: list[int] = []

        def get_heartbeat_interval(self):
            return 60

        def record_heartbeat(self, trial_id):
            self.beats.append(trial_id)

        def set_trial_system_attr(self, trial_id, key, value):
            raise optuna.exceptions.UpdateFinishedTrialError("finished")

    storage = Storage()
    assert retry._give_heartbeat(optuna, storage, trial) is None
    assert storage.beats == [trial._trial_id]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_stopped_trial_another_process_marked_first_is_left_to_it(monkeypatch):
    """Two processes find the same dead trial; the one whose update Optuna refuses (the trial
    already finished) queues no copy and goes on (`retry.fail_stopped_trials`). Would break:
    UpdateFinishedTrialError stopping `metapl tune`, or a second copy of the trial."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(
        "process", {"host": socket.gethostname(), "pid": _dead_pid(), "trial": trial.number}
    )

    calls = []

    def first(*args, **kwargs):
        calls.append(args)
        raise optuna.exceptions.UpdateFinishedTrialError("another process was first")

    monkeypatch.setattr(study._storage, "set_trial_state_values", first)
    retry.fail_stopped_trials(optuna, study)
    assert len(calls) == 1  # the dead trial was found and its update tried (and refused)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [State.RUNNING]


# --- the worker processes of `metapl digits` and `reduced` ---------------------------------------


def test_a_worker_runs_its_job_unless_the_pool_was_stopped(monkeypatch):
    """A worker takes a queued run only while the pool is not stopped; once it is, the run is not
    started and the stop is raised with its signal (`workers._unless_stopped`). Would break: a
    queued run started after SIGTERM, which no signal then stops."""
    stopped_by = multiprocessing.Value("i", 0)
    monkeypatch.setattr(workers, "_stopped_by", stopped_by)
    ran = []
    assert workers._unless_stopped(lambda job: ran.append(job) or {"job": job}, 3) == {"job": 3}
    stopped_by.value = signal.SIGTERM
    with pytest.raises(Stopped) as info:
        workers._unless_stopped(lambda job: ran.append(job) or {}, 4)
    assert info.value.signum == signal.SIGTERM and ran == [3]


def test_an_orphaned_worker_exits(monkeypatch):
    """A worker polls its parent's id; when the parent dies (the id changes) it exits with code 1 at
    once (`workers._exit_when_orphaned`). Would break: workers of a killed `metapl digits` training
    on."""
    parents = iter([100, 100, 1])
    sleeps = []

    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(os, "getppid", lambda: next(parents))
    monkeypatch.setattr(workers.time, "sleep", sleeps.append)
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(Exited) as info:
        workers._exit_when_orphaned(100)
    assert info.value.args == (1,)
    assert sleeps == [workers.ORPHAN_CHECK_SECONDS] * 2


def test_a_worker_starts_ignoring_ctrl_c_with_default_stop_signals_and_its_own_bar_lock(
    monkeypatch,
):
    """A pool worker's start (`workers._start_worker`, run in each forked worker; called here, the
    signal handlers restored after): Ctrl-C ignored (the main process alone handles it), SIGTERM and
    SIGUSR1 back to their defaults (a run's own handler takes them), an orphan watch on the parent's
    id, and a progress-bar lock of its own. Would break: each of these, as its docstring says (a
    hung pool, workers outliving the main process, a bar lock held by a killed worker)."""
    signums = (signal.SIGINT, *STOP_SIGNALS)
    before = {s: signal.getsignal(s) for s in signums}
    threads, locks = [], []

    class Thread:
        def __init__(self, target, args, daemon):
            threads.append((target, args, daemon))

        def start(self):
            threads.append("started")

    monkeypatch.setattr(workers.threading, "Thread", Thread)
    monkeypatch.setattr(workers.tqdm, "set_lock", locks.append)
    monkeypatch.setattr(workers, "_stopped_by", None)
    stopped_by = multiprocessing.Value("i", 0)
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda *a: None)  # the main process's handler, forked along
        workers._start_worker(stopped_by)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert all(signal.getsignal(s) is signal.SIG_DFL for s in STOP_SIGNALS)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert workers._stopped_by is stopped_by
    assert threads == [(workers._exit_when_orphaned, (os.getppid(),), True), "started"]
    assert len(locks) == 1 and type(locks[0]) is type(threading.RLock())


def _die(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_stop_skips_a_worker_that_is_already_gone():
    """SIGTERM reaches the pool after a worker died (the OOM killer): the signal is passed on to the
    live workers only (`workers.worker_pool` skips the dead ones), and the Stopped propagates. Would
    break: os.kill of a reaped process id, a ProcessLookupError in place of the stop (or a signal to
    whatever process reuses the id)."""
    with pytest.raises(Stopped) as info, workers.worker_pool(1) as pool:
        with pytest.raises(BrokenProcessPool):
            pool.submit(_die, None).result(timeout=60)
        pool._executor_manager_thread.join(timeout=60)  # the dead worker reaped
        processes = list(pool._processes.values())
        assert len(processes) == 1 and not processes[0].is_alive()
        raise Stopped(signal.SIGTERM, "")
    assert info.value.signum == signal.SIGTERM

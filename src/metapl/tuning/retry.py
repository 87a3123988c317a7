"""Resuming a trial whose process stopped: ``kill -9``, the OOM killer, a lost machine, Ctrl-C.

Each trial is an ordinary, resumable ``metapl train`` run folder, so a stopped trial need not start
over. Such a trial is marked failed and a copy of it (the same values, queued by Optuna's
``RetryHeartbeatStaleTrialCallback``) waits in the study; the next ``optimize`` of any process
takes waiting trials first. The process that runs the copy moves the stopped trial's folder to its
own number when the folder is in its ``--out`` with a checkpoint, and ``train`` resumes from there;
otherwise the copy starts over (another machine's folder is not here). Either way the copy carries
what the stopped trial reported to the pruner.

A trial is found stopped in three ways:

- **Ctrl-C**: the process itself queues the copy as it stops (it knows).
- **Its heartbeat is stale** (``GRACE_S`` in :mod:`~metapl.tuning.storage`): Optuna marks it failed
  and calls :func:`retry_callback`, from any process.
- **It ran on this host and its process is gone** (a rerun right after ``kill -9``): marked failed at
  once by :func:`fail_stopped_trials` instead of after the grace period. Process ids are compared on
  the same host name only; a reused id only delays this until the heartbeat goes stale.
- **It never recorded anything** (killed in the moment between Optuna creating it and its first
  heartbeat): Optuna never finds a trial without a heartbeat stale, so it would stay "running"
  forever (and stage 2 would wait for it). :func:`fail_stopped_trials` records one heartbeat for
  such a trial, once; from then on the heartbeat finds it like any other.

A process that was only paused (or cut off from the storage) past the grace period finds its trial
taken over when it wakes (:func:`taken_over`), lets go of it and goes on with its next trial.

Marking a trial failed is a compare-and-set in the storage, so exactly one process queues its copy.
A Ctrl-C queues the copy before Optuna marks the trial failed, so a process killed in between leaves
a running trial with a copy already: no second copy is queued for it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

# Copies of one trial after it was killed (not interrupted) this many times: a trial the OOM killer
# stops every time is not tried forever.
MAX_RETRIES = 2
# A system attribute of a copy: the numbers of the trials of its chain that Ctrl-C stopped (they do
# not count against MAX_RETRIES; Optuna's retry history counts every stop).
INTERRUPTED = "metapl:interrupted"
# A system attribute: the number of the trial for which fail_stopped_trials recorded a heartbeat
# (a number, not a flag: a copy inherits its stopped trial's system attributes).
HEARTBEAT_GIVEN = "metapl:heartbeat_given"


def retry_callback(optuna):
    """The copy-queuing callback for the trials Optuna finds stale."""
    return lambda study, trial: queue_copy(optuna, study, trial)


def queue_copy(optuna, study, trial, interrupted: bool = False) -> None:
    """Queue a waiting copy of the stopped ``trial`` (a FrozenTrial of its own: this changes it),
    with its pruner reports; none when it has one already, or when ``trial`` is a kill (not
    ``interrupted``) past ``MAX_RETRIES`` kills of its chain."""
    if any(stopped_trial(optuna, t) == trial.number for t in study.get_trials(deepcopy=False)):
        return
    stops = trial.system_attrs.get(INTERRUPTED, [])
    if interrupted:
        trial.system_attrs[INTERRUPTED] = [*stops, trial.number]
    optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=None if interrupted else MAX_RETRIES + len(stops),
        inherit_intermediate_values=True,
    )(study, trial)


def record_process(trial) -> None:
    """Where this trial's process runs: its host for people, and for :func:`fail_stopped_trials`
    the process, tagged with the trial's number (a copy inherits the stopped trial's attributes,
    and must not be taken for stopped itself before it records its own)."""
    host = socket.gethostname()
    trial.set_user_attr("host", host)
    trial.set_user_attr("process", {"host": host, "pid": os.getpid(), "trial": trial.number})


def taken_over(optuna, trial) -> bool:
    """Whether another process marked this process's running ``trial`` finished: its heartbeat went
    stale while this process was paused (SIGSTOP, a suspended machine) or cut off from the storage,
    and a copy of it was queued, to resume its folder."""
    return frozen(trial).state != optuna.trial.TrialState.RUNNING


def check_still_ours(optuna, trial) -> None:
    """Raise if ``trial`` was :func:`taken_over`: its training must stop (its folder may be the
    copy's by now), and Optuna could record nothing of it anyway."""
    if taken_over(optuna, trial):
        raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was taken over")


def frozen(trial):
    """The storage's record of the running ``trial``: its system attributes and reports, which a
    running trial does not show."""
    (record,) = (t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return record


@contextlib.contextmanager
def _interrupts_ignored():
    """Ctrl-C ignored in the block (a second press while the first one's copy is queued: the
    command stops anyway, and the copy is not lost). Signal handlers are the main thread's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def queue_interrupted(optuna, trial) -> None:
    """Ctrl-C in ``trial``: queue its copy now (Optuna marks the trial failed as the interrupt
    passes). A user's interrupt does not count against ``MAX_RETRIES``."""
    with _interrupts_ignored():
        queue_copy(optuna, trial.study, copy.deepcopy(frozen(trial)), interrupted=True)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _give_heartbeat(optuna, storage, trial) -> None:
    """One heartbeat for a running ``trial`` that has recorded no process of its own, so that
    Optuna finds it stale if it never records one itself. Once per trial: recorded again on every
    call, it would keep a dead trial alive. Harmless for a live trial, whose own heartbeat thread
    overwrites it within ``HEARTBEAT_S``."""
    # a study's storage is Optuna's cache around the RDBStorage, which passes heartbeats through
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return  # no heartbeats in this storage (in-memory studies of the tests)
    if trial.system_attrs.get(HEARTBEAT_GIVEN) == trial.number:
        return
    storage.record_heartbeat(trial._trial_id)
    try:
        storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_GIVEN, trial.number)
    except optuna.exceptions.UpdateFinishedTrialError:  # it finished meanwhile
        pass


def fail_stopped_trials(optuna, study) -> None:
    """Mark failed (and queue copies of) the running trials of ``study`` whose heartbeat is stale,
    and those that ran on this host in a process that is gone."""
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    storage = study._storage  # Optuna has no public way to fail another process's trial
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        process = trial.user_attrs.get("process")
        if not isinstance(process, dict) or process.get("trial") != trial.number:
            # not recorded yet (or a copy's inherited record): left to the heartbeat, which a
            # trial killed before its first one lacks
            _give_heartbeat(optuna, storage, trial)
            continue
        pid = process.get("pid")
        if process.get("host") != host or not isinstance(pid, int) or pid == os.getpid():
            continue
        if not _process_gone(pid):
            continue
        try:
            won = storage.set_trial_state_values(
                trial._trial_id, state=optuna.trial.TrialState.FAIL
            )
        except optuna.exceptions.UpdateFinishedTrialError:  # another process was first
            continue
        if won:
            queue_copy(optuna, study, copy.deepcopy(trial))


def stopped_trials(optuna, record) -> list[int]:
    """The numbers of the stopped trials that the trial of ``record`` (a FrozenTrial) continues,
    first to last: the trial it is a copy of is the last; [] when it is no copy."""
    return list(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(record))


def stopped_trial(optuna, record) -> int | None:
    """The number of the stopped trial that the trial of ``record`` (a FrozenTrial) is a copy of,
    or None. (``retried_trial_number`` names the first of a chain of copies; we want the last.)"""
    history = stopped_trials(optuna, record)
    return history[-1] if history else None


def copy_of(optuna, trial) -> int | None:
    """The number of the copy queued for the stopped ``trial``, or None: a trial killed more than
    ``MAX_RETRIES`` times gets none."""
    for other in trial.study.get_trials(deepcopy=False):
        if stopped_trial(optuna, other) == trial.number:
            return other.number
    return None


def remove_stopped_folders(stopped: list[int], run_dir: Path) -> None:
    """Remove the folders (siblings of ``run_dir``) of the ``stopped`` trials still here after
    :func:`take_over_folder`: a trial stopped before its first checkpoint left nothing to resume,
    and an earlier checkpoint of the chain is behind the one taken over; either is clutter."""
    for number in stopped:
        shutil.rmtree(run_dir.parent / str(number), ignore_errors=True)


def take_over_folder(stopped: list[int], run_dir: Path) -> bool:
    """Move the folder (a sibling of ``run_dir``) of the last of the ``stopped`` trials that holds
    a checkpoint to ``run_dir``, so that ``train`` resumes it. Returns whether it did.

    Usually the last trial's: an earlier one's when the last was stopped before it took the
    folder over (all trained the same configuration, so any checkpoint of theirs resumes it)."""
    for number in reversed(stopped):
        old = run_dir.parent / str(number)
        if (old / "checkpoint.pt").is_file():
            if run_dir.exists():  # numbers never repeat within a storage: left by an earlier one
                shutil.rmtree(run_dir)
            os.replace(old, run_dir)
            return True
    return False

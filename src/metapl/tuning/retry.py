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

Marking a trial failed is a compare-and-set in the storage, so exactly one process queues its copy.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
from pathlib import Path

# Copies of one trial after it was killed (not interrupted) this many times: a trial the OOM killer
# stops every time is not tried forever.
MAX_RETRIES = 2


def retry_callback(optuna, max_retry: int | None = MAX_RETRIES):
    """The copy-queuing callback, with the stopped trial's pruner reports carried over."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=max_retry, inherit_intermediate_values=True
    )


def record_process(trial) -> None:
    """Where this trial's process runs: its host for people, and for :func:`fail_stopped_trials`
    the process, tagged with the trial's number (a copy inherits the stopped trial's attributes,
    and must not be taken for stopped itself before it records its own)."""
    host = socket.gethostname()
    trial.set_user_attr("host", host)
    trial.set_user_attr("process", {"host": host, "pid": os.getpid(), "trial": trial.number})


def frozen(trial):
    """The storage's record of the running ``trial``: its system attributes and reports, which a
    running trial does not show."""
    (record,) = (t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return record


def queue_interrupted(optuna, trial) -> None:
    """Ctrl-C in ``trial``: queue its copy now (Optuna marks the trial failed as the interrupt
    passes). A user's interrupt does not count against ``MAX_RETRIES``."""
    retry_callback(optuna, max_retry=None)(trial.study, copy.deepcopy(frozen(trial)))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def fail_stopped_trials(optuna, study) -> None:
    """Mark failed (and queue copies of) the running trials of ``study`` whose heartbeat is stale,
    and those that ran on this host in a process that is gone."""
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    storage = study._storage  # Optuna has no public way to fail another process's trial
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        process = trial.user_attrs.get("process")
        if not isinstance(process, dict) or process.get("trial") != trial.number:
            continue  # not recorded yet (or a copy's inherited record): left to the heartbeat
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
            retry_callback(optuna)(study, copy.deepcopy(trial))


def stopped_trial(optuna, record) -> int | None:
    """The number of the stopped trial that the trial of ``record`` (a FrozenTrial) is a copy of,
    or None. (``retried_trial_number`` names the first of a chain of copies; we want the last.)"""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(record)
    return history[-1] if history else None


def take_over_folder(stopped: int, run_dir: Path) -> bool:
    """Move the stopped trial's folder (a sibling of ``run_dir``) to ``run_dir`` if it holds a
    checkpoint, so that ``train`` resumes it. Returns whether it did."""
    old = run_dir.parent / str(stopped)
    if not (old / "checkpoint.pt").is_file():
        return False
    if run_dir.exists():  # numbers never repeat within a storage: left by an earlier one
        shutil.rmtree(run_dir)
    os.replace(old, run_dir)
    return True

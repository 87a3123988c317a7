"""The worker processes of the multi-seed experiments (`metapl digits`, `metapl reduced`), and
what the two share about their runs: the progress of the pool, each run's results record.

Ctrl-C in a terminal sends SIGINT to every process of the command. Left to themselves, workers
would each raise KeyboardInterrupt wherever they are, sometimes inside the executor's own queue
code, and the pool can then wait forever for workers that wait for work, or print their tracebacks.
So workers ignore SIGINT: the main process alone gets the KeyboardInterrupt, and ends the workers
instead of waiting for their runs to finish. Nothing is lost that a rerun needs: every run resumes
from its last checkpoint, and every file is written whole or not at all (:mod:`metapl.atomic`).

SIGTERM (a scheduler's time limit) is gentler: the main process passes it on to the workers, whose
runs each save a checkpoint of the step in progress (:mod:`metapl.train.stopping`), and waits for
them to exit.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

from metapl.errors import MetaplError
from metapl.train.stopping import STOP_SIGNALS, Stopped, StopSignals

ORPHAN_CHECK_SECONDS = 1.0

# In a worker: the number of the signal that stopped the pool (0 until then), shared with the main
# process (worker_pool)
_stopped_by: Any = None


def _exit_when_orphaned(parent: int) -> None:
    """A dead parent's children are adopted by another process: the parent id changes."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_SECONDS)
    os._exit(1)  # no cleanup to do: every file is written whole or not at all


def _start_worker(stopped_by: Any) -> None:
    global _stopped_by
    _stopped_by = stopped_by
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # not the main process's handler (forked with it): a run's own takes SIGTERM (stopping.py)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    # the main process (see _worker_context), read once at start
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # A lock of its own for the worker's progress bars. tqdm's default one holds a multiprocessing
    # lock that the fork shares with the main process: a worker killed while it wrote (Ctrl-C
    # kills the running ones) kept it locked, and the main process's next bar waited forever (a
    # test run hung in session 36's CI check).
    tqdm.set_lock(threading.RLock())


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """Workers forked from the main process on Linux, whatever Python's default. Python 3.14
    made a fork server Linux's default: workers would then be the server's children, and the
    server outlives a killed main process, so the workers would not notice its death and would go
    on training into the folders a rerun uses. Elsewhere, the platform's default (spawn), whose
    workers are the main process's children too."""
    return multiprocessing.get_context("fork") if sys.platform == "linux" else None


def _unless_stopped(run: Callable[[Any], dict], job: Any) -> dict:
    """``run(job)``, unless the pool was stopped: runs already handed to the pool's queue (one more
    than there are workers) are not cancelled, and a worker whose run stopped would start the next
    one, which no signal stops: the main process would wait for it to finish."""
    if _stopped_by is not None and _stopped_by.value:
        raise Stopped(_stopped_by.value, "")
    return run(job)


def _runs_stopped(signum: int) -> Stopped:
    return Stopped(
        signum,
        "; each run in progress saved a checkpoint of its step first: run the same command again "
        "to resume every run",
    )


@contextlib.contextmanager
def worker_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers ignore Ctrl-C and exit when the main process dies.

    In the block, a KeyboardInterrupt (Ctrl-C) cancels the queued runs and kills the running ones,
    then propagates. SIGTERM or SIGUSR1 to the main process (a scheduler's time limit) cancels the
    queued runs too, but passes the signal on to the workers: each running run finishes its step
    and saves a checkpoint of it (metapl.train.stopping); once the workers have exited, a
    :class:`Stopped` propagates."""
    context = _worker_context() or multiprocessing.get_context()
    stopped_by = context.Value("i", 0)
    with StopSignals(raising=_runs_stopped):
        pool = ProcessPoolExecutor(
            max_workers=max_workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(stopped_by,),
        )
        try:
            yield pool
        except KeyboardInterrupt as stop:
            if isinstance(stop, Stopped):  # before the workers' runs stop (_unless_stopped)
                stopped_by.value = stop.signum
            processes = list((pool._processes or {}).values())  # 3.14: pool.terminate_workers()
            # shutdown(wait=False) forgets the thread that waits for the workers: the finally's
            # shutdown(wait=True) then returns at once, before the stopped runs are saved (typeshed
            # has the thread's type wrong)
            manager: threading.Thread | None = pool._executor_manager_thread  # type: ignore
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if not process.is_alive() or process.pid is None:
                    continue
                if isinstance(stop, Stopped):
                    os.kill(process.pid, stop.signum)  # pool.shutdown below waits for them
                else:
                    # SIGKILL, not SIGTERM: a run that gets SIGTERM would first finish its step
                    # and save a checkpoint; Ctrl-C stops at once
                    process.kill()
            if isinstance(stop, Stopped) and manager is not None:
                manager.join()
            raise
        finally:
            pool.shutdown(wait=True)


def map_runs(
    pool: ProcessPoolExecutor,
    run: Callable[[Any], dict],
    jobs: Sequence,
    desc: str,
    show_progress: bool,
) -> list[dict]:
    """``run`` over ``jobs`` in the workers of ``pool``, with a progress bar counting the finished
    runs; their records, in the order of ``jobs``.

    A worker that dies (``kill -9``, the OOM killer) breaks the pool, which ends the other
    workers: a one-line :class:`MetaplError`, not the executor's traceback, since the runs resume
    from their checkpoints when the command runs again."""
    from metapl.progress import progress_bar

    bar = progress_bar(
        iterable=pool.map(functools.partial(_unless_stopped, run), jobs),
        total=len(jobs),
        disable=not show_progress,
        desc=desc,
        unit="run",
    )
    try:
        return list(bar)
    except BrokenProcessPool:
        raise MetaplError(
            f"a worker process died during the {desc} (killed, or out of memory?); run the same "
            "command again to resume every run from its last checkpoint"
        ) from None


def run_record(record: dict, method: str, seed: int) -> dict:
    """The results record of one (method, seed) run from the engine's (its results.json row): the
    student's test accuracy and steps, and the accuracy before fine-tuning for a run fine-tuned
    after MPL (the paper's later versions report the fine-tuned student)."""
    result = {
        "method": method,
        "seed": seed,
        "accuracy": record["accuracy"],
        "steps": record["steps"],
    }
    if "accuracy_before_finetune" in record:
        result["accuracy_before_finetune"] = record["accuracy_before_finetune"]
        result["finetune_steps"] = record["finetune_steps"]
    return result

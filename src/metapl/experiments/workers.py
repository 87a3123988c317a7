"""The worker processes of the multi-seed experiments (`metapl digits`, `metapl reduced`).

Ctrl-C in a terminal sends SIGINT to every process of the command. Left to themselves, workers
would each raise KeyboardInterrupt wherever they are, sometimes inside the executor's own queue
code, and the pool can then wait forever for workers that wait for work, or print their tracebacks.
So workers ignore SIGINT: the main process alone gets the KeyboardInterrupt, and ends the workers
instead of waiting for their runs to finish. Nothing is lost that a rerun needs: every run resumes
from its last checkpoint, and every file is written whole or not at all (:mod:`metapl.atomic`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers ignore Ctrl-C; a KeyboardInterrupt in the block cancels the
    queued runs and terminates the running ones, then propagates."""
    pool = ProcessPoolExecutor(max_workers=max_workers, initializer=_ignore_sigint)
    try:
        yield pool
    except KeyboardInterrupt:
        processes = list((pool._processes or {}).values())  # Python 3.14: pool.terminate_workers()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=True)

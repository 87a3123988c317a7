"""Decoding batches of image files on a pool of threads, in order, now or ahead of time.

Why threads: Pillow releases the GIL while it decodes and resizes, so the threads decode in
parallel (2 threads on this project's 2-core machine: 1.8x; ``benchmarks/decode_cpu.py``). One
thread alone made the lazily decoded datasets (ImageNet, large folders of your own) crawl: the
ImageNet-10% preset's step reads 2,048 + 14,336 JPEGs, about 40 s on one thread at 2.4 ms each.

Why ahead of time: :class:`metapl.train.data.BatchSource` starts decoding step s+1's images while
step s trains (:func:`submit`), so on a GPU the decoding hides behind the step. Each image is
decoded by the same function wherever it runs, so a batch has the same bytes either way.

The pool is one per process (``threads()`` threads, default one per usable core, or a share of them
under torchrun), shared by every batch: a thread count is a property of the machine, not of a
dataset.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from metapl.data.imagenet import LazyImages

# The most threads `data_threads` takes (as cpu_threads.MAX_THREADS: a thread per core is the most
# that helps, and thousands of threads only cost memory).
MAX_THREADS = 1024
# Images per task: enough that the pool's per-task cost (about 20 us) is small against a decode
# (2.4 ms for an ImageNet JPEG), few enough that the tasks spread over all the threads.
_MOST_PER_TASK = 32

_lock = threading.Lock()
_requested = 0  # 0: one thread per usable core
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def _forget_pool_in_child() -> None:
    """A forked child (`metapl digits`' workers) inherits the pool object but none of its threads:
    work given to it would wait forever. The child makes its own pool when it first decodes, and
    a fresh lock, in case another thread held this one at the fork."""
    global _pool, _pool_threads, _lock
    _pool, _pool_threads, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(count: int) -> None:
    """Decode with ``count`` threads from now on (0: one per usable core, the default)."""
    global _requested
    if not 0 <= count <= MAX_THREADS:
        from metapl.errors import ConfigError

        raise ConfigError(
            f"data_threads must be in 0..{MAX_THREADS} (0: one per core), got {count}"
        )
    _requested = count


def threads() -> int:
    """How many threads decode: the count set by :func:`set_threads`, or else one per usable core,
    shared among torchrun's processes on this machine (each of them decodes its own batches)."""
    if _requested:
        return _requested
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return max(1, usable_cores() // processes)


def _executor() -> ThreadPoolExecutor:
    """The process's pool, made again when the thread count changed (the old one finishes what
    it was given and then ends)."""
    global _pool, _pool_threads
    with _lock:
        wanted = threads()
        if _pool is None or _pool_threads != wanted:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(wanted, thread_name_prefix="metapl-decode")
            _pool_threads = wanted
        return _pool


class PendingImages:
    """``images[indices]`` being decoded on the pool; :meth:`result` waits for it.

    The rows are split into tasks of consecutive rows, each written into one shared array. A file
    that cannot be read raises its error from :meth:`result`, the first such file in row order
    (as a loop over the rows would), and the tasks not yet started are dropped.
    """

    def __init__(self, images: LazyImages, indices: Sequence[int] | np.ndarray):
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._images = images
        self._out = np.empty((len(self.indices), *images.shape[1:]), np.uint8)
        pool = _executor()
        per_task = min(_MOST_PER_TASK, max(1, math.ceil(len(self.indices) / (4 * threads()))))
        self._tasks: list[Future] = [
            pool.submit(self._decode, start, min(start + per_task, len(self.indices)))
            for start in range(0, len(self.indices), per_task)
        ]

    def _decode(self, start: int, stop: int) -> None:
        for row in range(start, stop):
            self._out[row] = self._images[int(self.indices[row])]  # the one-image branch

    def result(self) -> np.ndarray:
        """The uint8 ``[len(indices), H, W, C]`` images, once all are decoded."""
        try:
            for task in self._tasks:
                task.result()  # in row order: the first unreadable file raises first
        finally:
            self.cancel()  # after an error (or Ctrl-C here): the rest is not needed
        return self._out

    def cancel(self, wait_for_running: bool = True) -> None:
        """Drop the tasks not yet started and wait for the running ones (a few images each), so
        that nothing of this batch still runs when it returns (unless ``wait_for_running`` is
        False: cancel several first, then wait for each)."""
        for task in self._tasks:
            task.cancel()
        if wait_for_running:
            wait(self._tasks)


def decode(images: LazyImages, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``images[indices]`` decoded on the pool, in order; the calling thread waits (no rows: an
    empty ``[0, H, W, C]`` array, from no tasks)."""
    return PendingImages(images, indices).result()


def submit(images: LazyImages, indices: Sequence[int] | np.ndarray) -> PendingImages:
    """Start decoding ``images[indices]`` on the pool and return at once."""
    return PendingImages(images, indices)

"""conftest's check that a test left tqdm's write locks free (its fixture replaces held ones, so
that a later test's progress bar drawn from another thread does not wait forever)."""

from __future__ import annotations

import threading

from conftest import held_bar_locks
from tqdm.std import TqdmDefaultWriteLock, tqdm


def test_free_locks_are_not_reported():
    tqdm.get_lock()  # makes the multiprocessing lock, as the first bar does
    assert held_bar_locks(wait=0.1) == []


def test_a_lock_held_by_the_tests_thread_is_reported():
    lock = tqdm.get_lock()
    lock.acquire()
    try:
        held = held_bar_locks(wait=0.1)
    finally:
        lock.release()
    assert held == [
        "its thread lock, by the tests' thread",
        "its multiprocessing lock, by the tests' thread",
    ]
    assert held_bar_locks(wait=0.1) == []


def test_a_lock_held_by_another_thread_is_reported_after_the_wait():
    taken, done = threading.Event(), threading.Event()

    def hold():
        with TqdmDefaultWriteLock.th_lock:
            taken.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(10)
    try:
        held = held_bar_locks(wait=0.1)
    finally:
        done.set()
        holder.join()
    assert held == ["its thread lock, by another thread or process"]

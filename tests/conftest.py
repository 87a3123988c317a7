"""pytest configuration shared by the metapl test suite."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import pytest
import torch
from tqdm.std import TqdmDefaultWriteLock, TRLock, tqdm


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n N runs N worker processes side by side: one intra-op thread each, so that
        # they share the cores instead of oversubscribing them.
        torch.set_num_threads(1)
    # torch's forward-mode AD loads its JVP decompositions through torch.jit.script once, which
    # warns in recent torch; nothing to act on from here.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for modules of tiny models: on a small shared CI machine, torch's
    default thread pool spends more time synchronising than computing (measured 3x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def held_bar_locks(wait: float = 2.0) -> list[str]:
    """Which of tqdm's process-wide write locks a test left held: by the thread that runs the
    tests, or by another (waited for 2 s: the monitor thread takes them for a moment)."""
    held = []
    locks = [("thread", TqdmDefaultWriteLock.th_lock, TqdmDefaultWriteLock.th_lock._is_owned)]
    mp_lock = getattr(TqdmDefaultWriteLock, "mp_lock", None)
    if mp_lock is not None:
        locks.append(("multiprocessing", mp_lock, mp_lock._semlock._is_mine))
    for kind, lock, is_mine in locks:
        if is_mine():
            held.append(f"its {kind} lock, by the tests' thread")
        elif lock.acquire(timeout=wait):
            lock.release()
        else:
            held.append(f"its {kind} lock, by another thread or process")
    return held


@pytest.fixture(autouse=True)
def bar_locks_released(request):
    """After each test, tqdm's write locks are free, or replaced by new ones with a warning that
    names the test. A signal handler that raises (Ctrl-C, a stop) between tqdm's acquiring its two
    locks and its ``with`` block leaves them held for good; a later test's bar drawn from another
    thread then waited forever (a coverage run of the suite hung in test_precompute's rank
    threads, session 39, both locks held). The bars of the test's own thread still work (the
    locks are reentrant), so nothing else shows it."""
    yield
    held = held_bar_locks()
    if held:
        TqdmDefaultWriteLock.th_lock = TRLock()
        TqdmDefaultWriteLock.mp_lock = multiprocessing.RLock()
        tqdm.set_lock(TqdmDefaultWriteLock())
        warnings.warn(
            f"{request.node.nodeid} left tqdm's write locks held ({'; '.join(held)}): "
            "replaced by new ones, so that later tests' progress bars do not wait forever",
            stacklevel=1,
        )

"""How many PyTorch threads a command runs with on a CPU.

PyTorch starts one thread per core. When other processes share the cores, those threads lose their
turns and wait for each other at every operation, so a run slows down far more than its share of
the machine. Measured on 2 cores beside 2 busy processes: `metapl twomoons` took 181 s with 2
threads and 69 s with 1, and 200 steps of `metapl train --preset digits-uda-mpl` 75 s and 33 s
(idle: 30-34 s and 39 s, 17 s and 21 s; not saved for train).

- `metapl twomoons` takes :func:`idle_cores_threads` by default: its results are the same to the
  bit with 1 and 2 threads (tested), so only its speed follows the machine's load.
- `metapl train` and `metapl tune` keep PyTorch's default unless ``--threads N`` is given: their
  convolutions round differently with another number of threads (30 digits steps with 1 and 2
  threads end 0.05 apart in some weight), and a run resumed with as many threads as it started
  with ends with the weights of an unbroken run; a default that followed the load would not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator


def add_threads_option(p: argparse.ArgumentParser, follows_load: bool) -> None:
    """``--threads`` of a command that trains in one process; ``follows_load``: its default is
    :func:`idle_cores_threads` (a command whose results do not depend on the thread count)."""
    if follows_load:
        default = (
            "default: PyTorch's, but no more than the cores other work leaves idle; the results "
            "are the same with any"
        )
    else:
        default = (
            "default: PyTorch's, one per core; another number rounds differently, so resume a run "
            "with the number it started with. Fewer run faster when other work shares the cores"
        )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=(
            f"PyTorch CPU threads ({default}: on 2 cores beside 2 busy processes, `metapl "
            "twomoons` took 181 s with 2 threads and 69 s with 1)"
        ),
    )


def busy_cores(window_s: float = 0.3) -> float:
    """How many of the machine's cores other work keeps busy now: from ``/proc/stat`` over
    ``window_s`` (Linux), else the 1-minute load average, which lags a minute behind (a command
    that just ended, such as the README's ``pip install``, still counts there), else 0."""

    def cpu_times() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]

    try:
        before = cpu_times()
        time.sleep(window_s)
        delta = [b - a for a, b in zip(before, cpu_times())]
        idle = delta[3] + delta[4]  # idle and iowait
        return (os.cpu_count() or 1) * (1.0 - idle / max(1, sum(delta)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def idle_cores_threads() -> int:
    """PyTorch threads for a CPU run: PyTorch's default, but no more than the cores that other work
    leaves idle (the cores this process may use minus :func:`busy_cores`), and at least 1.

    The stacked models' operations are small, so their threads wait for each other at every one,
    and a thread that loses its turn to another process holds up the rest. ``metapl twomoons
    --seeds 0-9`` (the stacked seeds' models) on 2 idle cores: 2 threads 30-34 s, 1 thread 39 s; beside 2 busy processes: 2
    threads 181 s, 1 thread 69 s; this default 30 s and 67 s (medians of 2 runs,
    ``benchmarks/results/twomoons_cpu.json``).
    The results do not depend on the number of threads (tested)."""
    import torch  # here: the command line's parsers use this module, and --help needs no torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), round(cores - busy_cores())))


# The most --threads a command takes: more threads than cores only wait for each other, and
# --threads 100000 killed the process with a segmentation fault (its thread pools could not start).
MAX_THREADS = 1024


def check_requested(requested: int | None) -> None:
    """``--threads`` must be in 1..:data:`MAX_THREADS` (commands check it before they make their
    output folder)."""
    from metapl.errors import ConfigError

    if requested is not None and requested < 1:
        raise ConfigError(f"--threads must be >= 1, got {requested}")
    if requested is not None and requested > MAX_THREADS:
        cores = os.cpu_count() or 1
        raise ConfigError(
            f"--threads must be at most {MAX_THREADS}, got {requested:,}; this machine has "
            f"{cores} core{'s' if cores > 1 else ''}, and more threads than cores only wait for "
            "each other"
        )


@contextlib.contextmanager
def cpu_threads(requested: int | None, follows_load: bool) -> Iterator[int]:
    """PyTorch's CPU threads set to ``requested`` inside the block (None: :func:`idle_cores_threads`
    if ``follows_load``, else unchanged), and given back after it (a command's ``main()`` also runs
    inside test processes)."""
    import torch

    check_requested(requested)
    threads = requested or (idle_cores_threads() if follows_load else torch.get_num_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)

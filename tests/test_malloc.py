"""glibc's malloc keeps freed memory (metapl.malloc): the command line sets it before anything
else, and with it a block freed and allocated again is not faulted in afresh."""

import subprocess
import sys

import pytest

from metapl import malloc
from metapl.cli import main

GLIBC = malloc.glibc() is not None  # (this process's thresholds are left as they are)

# Allocates three 4 MB blocks and frees them, 50 times, as a training step does its activations,
# then prints the page faults of the last 40 rounds. Before: glibc's adaptive trim threshold (twice
# the largest block freed, 8 MB) gave the 12 MB freed at the heap's top back to the kernel every
# round, and the next round faulted it in again: 2,000 faults a round.
FAULTS = """
import resource, sys
from metapl import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
def rounds(n):
    for _ in range(n):
        blocks = [bytearray(4 << 20) for _ in range(3)]
        del blocks
rounds(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(40)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_a_freed_block_is_reused_not_faulted_in_again():
    """Would break: thresholds not set (or set below the block): about 80,000 faults."""
    assert _faults("keep") < 100
    assert _faults("default") > 10_000  # the test measures what it claims to


def test_the_command_line_keeps_freed_memory_before_its_work(monkeypatch):
    """Every command, and the workers `metapl digits` forks, get the fixed thresholds."""
    calls = []
    monkeypatch.setattr("metapl.cli.keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["presets"]) == 0
    assert calls == [1]


def test_nothing_is_done_outside_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.keep_freed_memory() is False


class _FakeLibc:
    """A C library with glibc's names (or some of them), recording its mallopt calls."""

    def __init__(self, names=("gnu_get_libc_version", "mallopt"), results=(1, 1)):
        self.calls: list[tuple[int, int]] = []
        self._results = list(results)
        for name in names:
            if name == "gnu_get_libc_version":
                self.gnu_get_libc_version = lambda: b"2.39"
            elif name == "mallopt":
                self.mallopt = self._mallopt

    def _mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self._results[len(self.calls) - 1]


def _with_libc(monkeypatch, libc: _FakeLibc) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: libc)


def test_the_thresholds_set_are_glibcs_parameters_and_values(monkeypatch):
    """M_MMAP_THRESHOLD (-3) to 32 MB and M_TRIM_THRESHOLD (-1) to twice that, as malloc.h and
    glibc's adaptive rule have them."""
    libc = _FakeLibc()
    _with_libc(monkeypatch, libc)
    assert malloc.keep_freed_memory() is True
    assert sorted(libc.calls) == [(-3, 32 << 20), (-1, 64 << 20)]


def test_a_libc_without_glibcs_version_function_is_left_alone(monkeypatch):
    """musl has a mallopt that does nothing: not glibc, so nothing is set."""
    libc = _FakeLibc(names=("mallopt",))
    _with_libc(monkeypatch, libc)
    assert malloc.glibc() is None
    assert malloc.keep_freed_memory() is False and libc.calls == []


@pytest.mark.parametrize("results", [(0, 1), (1, 0)], ids=["mmap-refused", "trim-refused"])
def test_a_refused_threshold_is_reported(monkeypatch, results):
    """mallopt returns 0 when it refuses a value: keep_freed_memory says it could not."""
    _with_libc(monkeypatch, _FakeLibc(results=results))
    assert malloc.keep_freed_memory() is False


def test_a_c_library_that_cannot_be_loaded_is_left_alone(monkeypatch):
    def no_libc(name):
        raise OSError("no C library")

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(malloc.ctypes, "CDLL", no_libc)
    assert malloc.glibc() is None and malloc.keep_freed_memory() is False

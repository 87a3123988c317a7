"""metapl.rank_failure: work that rank 0 does alone under torchrun (a checkpoint, a log line, a
check of what it would write over, a library user's on_eval) stops every rank when it fails there,
each with an error that says why. Ranks are threads here (tests/test_precompute.py's ThreadRanks);
tests/test_torchrun.py runs the training loop's uses on 2 processes."""

from __future__ import annotations

import errno
import types

import pytest
from test_precompute import ThreadRanks

from metapl.errors import ConfigError, MetaplError, WriteError
from metapl.rank_failure import RankFailure, on_rank_0

WHERE = "the run at step 4"


def _data_parallel(ranks) -> types.SimpleNamespace:
    """A DataParallel stand-in for a rank of ThreadRanks (what on_rank_0 uses of it)."""
    return types.SimpleNamespace(
        rank=ranks.rank, enabled=True, is_main=ranks.rank == 0, broadcast_object=ranks.broadcast
    )


def _full_disk() -> WriteError:
    error = WriteError("could not write checkpoint.pt: No space left on device")
    error.errno = errno.ENOSPC
    return error


def _run_on_two_ranks(*works) -> tuple[list, list]:
    """Each rank calls on_rank_0 with each of ``works`` in turn; every rank's result or exception,
    and the ranks that ran any work."""
    ran = []

    def each_rank(ranks, rank):
        dp = _data_parallel(ranks)
        for work in works:
            on_rank_0(dp, lambda work=work: (ran.append(rank), work()), WHERE)
        return "finished"

    return ThreadRanks(2).run(each_rank), ran


def _raise(exc: BaseException):
    def work():
        raise exc

    return work


def test_work_that_succeeds_runs_on_rank_0_alone_and_every_rank_goes_on():
    results, ran = _run_on_two_ranks(lambda: None, lambda: None)
    assert results == ["finished", "finished"]
    assert ran == [0, 0]


@pytest.mark.parametrize(
    "raised, kind, line, errno_",
    [
        (
            ValueError("on_eval: accuracy too low"),
            RuntimeError,
            f"rank 0 stopped {WHERE} with ValueError: on_eval: accuracy too low",
            None,
        ),
        (
            ConfigError("--out D holds train results of another configuration"),
            ConfigError,
            "--out D holds train results of another configuration",
            None,
        ),
        (
            _full_disk(),
            WriteError,
            "could not write checkpoint.pt: No space left on device",
            errno.ENOSPC,
        ),
    ],
    ids=["a-bug-or-hook", "a-metapl-error", "a-full-disk"],
)
def test_an_exception_of_rank_0s_work_stops_every_rank_saying_why(raised, kind, line, errno_):
    """Rank 0 raises its own exception (its type and traceback: metapl tune's pruning, say); the
    others a metapl error as the same one line (a full disk's errno kept, so that `metapl train`
    gives its advice), anything else naming rank 0, the work and the exception. Before, the other
    ranks went on to their next step and waited in its collectives until torchrun ended them."""
    results, ran = _run_on_two_ranks(lambda: None, _raise(raised), lambda: None)
    assert results[0] is raised
    assert type(results[1]) is kind and str(results[1]) == line
    assert getattr(results[1], "errno", None) == errno_
    assert ran == [0, 0]  # the third work ran nowhere


def test_an_interrupt_in_rank_0s_work_reaches_the_others_too():
    """Ctrl-C or a signal's exception on rank 0: the others would otherwise wait in the broadcast
    (a gloo group with a week's timeout) until rank 0's process group was torn down."""
    interrupt = KeyboardInterrupt()
    results, _ = _run_on_two_ranks(_raise(interrupt))
    assert results[0] is interrupt
    assert type(results[1]) is RuntimeError
    assert str(results[1]) == f"rank 0 stopped {WHERE} with KeyboardInterrupt: "


def test_in_one_process_the_work_raises_as_it_is_without_a_collective():
    def broadcast_object(obj):
        raise AssertionError("no collective in one process")

    alone = types.SimpleNamespace(
        rank=0, enabled=False, is_main=True, broadcast_object=broadcast_object
    )
    raised = ValueError("boom")
    with pytest.raises(ValueError) as caught:
        on_rank_0(alone, _raise(raised), WHERE)
    assert caught.value is raised
    done = []
    on_rank_0(alone, lambda: done.append(1), WHERE)
    assert done == [1]


@pytest.mark.parametrize("own_error", [True, False])
def test_a_collective_that_fails_reports_rank_0s_own_error_if_it_had_one(own_error):
    """A peer gone (torchrun stopping it) fails the broadcast: rank 0 still says what stopped it."""

    def broadcast_object(obj):
        raise ConnectionResetError("peer gone")

    dp = types.SimpleNamespace(
        rank=0, enabled=True, is_main=True, broadcast_object=broadcast_object
    )
    raised = ValueError("boom")
    expected = ValueError if own_error else ConnectionResetError
    with pytest.raises(expected) as caught:
        on_rank_0(dp, _raise(raised) if own_error else lambda: None, WHERE)
    assert (caught.value is raised) == own_error


def test_a_metapl_error_with_a_constructor_of_its_own_still_reaches_the_others():
    class Special(MetaplError):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    error = RankFailure.of(0, Special("x", "y")).error(WHERE)
    assert type(error) is MetaplError and str(error) == "x and y"

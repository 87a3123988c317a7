"""What stopped one torchrun rank, sent to the others so that every rank stops with it.

Under torchrun, work that one rank does alone (rank 0 writing a checkpoint, a large teacher's
file, a library user's ``on_eval``) can fail there while the other ranks go on to their next
collective, where they wait until torchrun ends them, printing nothing of why. The rank that failed
sends a :class:`RankFailure` instead, and each other rank raises :meth:`RankFailure.error`: a
metapl error as the same one-line error (a full disk's errno kept), anything else as a
RuntimeError naming the rank and the exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from metapl.errors import MetaplError

if TYPE_CHECKING:
    from metapl.distributed import DataParallel


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """An exception of one rank, in a form every rank can unpickle."""

    rank: int
    kind: str  # the exception's class name
    message: str
    user_error: bool  # a MetaplError: the other ranks raise the same one-line error
    errno: int | None  # a WriteError's (an OSError's): the disk was full, say

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> RankFailure:
        user_error = isinstance(exc, MetaplError)
        return cls(rank, type(exc).__name__, str(exc), user_error, getattr(exc, "errno", None))

    def error(self, where: str) -> Exception:
        """The error the other ranks raise; ``where`` names the work that stopped ("the
        precompute of FILE", "the run at step 40")."""
        if not self.user_error:
            return RuntimeError(
                f"rank {self.rank} stopped {where} with {self.kind}: {self.message}"
            )
        kinds = {c.__name__: c for c in _subclasses(MetaplError)}
        try:
            error = kinds.get(self.kind, MetaplError)(self.message)
        except TypeError:  # a constructor of its own
            error = MetaplError(self.message)
        if self.errno is not None:
            error.errno = self.errno  # type: ignore[attr-defined]
        return error


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        found += _subclasses(sub)
    return found


def meet(collective: Callable[[Any], Any], obj: Any, own_error: BaseException | None) -> Any:
    """``collective(obj)``; where it fails (a peer gone), this rank's own error, if any, is what
    it reports."""
    try:
        return collective(obj)
    except Exception:
        if own_error is not None:
            raise own_error from None
        raise


def on_rank_0(dp: DataParallel, work: Callable[[], object], where: str) -> None:
    """Do ``work`` (a write, a check of what rank 0 would write over, a caller's hook) on rank 0
    alone. Under torchrun, whatever it raises there is raised on every rank: rank 0 raises its own
    exception, the others :meth:`RankFailure.error` with ``where``. Ctrl-C and signals too: the
    others would otherwise wait in this broadcast, whose gloo group has a week's timeout, until
    rank 0's process group was torn down. Every rank calls this at the same point, since it is a
    collective under torchrun."""
    if not dp.enabled:
        work()
        return
    own_error: BaseException | None = None
    failure = None
    if dp.is_main:
        try:
            work()
        except BaseException as exc:
            own_error, failure = exc, RankFailure.of(dp.rank, exc)
    stop_on(own_error, meet(dp.broadcast_object, failure, own_error), where)


def stop_on(own_error: BaseException | None, verdict: RankFailure | None, where: str) -> None:
    """After the ranks met: raise this rank's own error (with its traceback), else the failure
    the verdict tells of (another rank's), else nothing."""
    if own_error is not None:
        raise own_error
    if verdict is not None:
        raise verdict.error(where)

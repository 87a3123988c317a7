"""A training run asked to stop by SIGTERM or SIGUSR1 finishes its step, saves a checkpoint there,
and exits; the same command then resumes from that step.

Why: schedulers end jobs with SIGTERM and a grace period before SIGKILL (SLURM at a job's time
limit, 30 s by default; Kubernetes when it evicts a pod; SLURM's ``--signal=USR1@SECONDS`` warns
that many seconds ahead). Python's default for both signals is to die at once, which loses every
step since the last checkpoint (``checkpoint_every``, 5,000 steps by default: minutes on a GPU,
hours on a CPU). Ctrl-C (SIGINT) still stops at once, as a user at a terminal expects; so does
SIGKILL. Either way the run resumes from its last checkpoint.

Signals that come while the run is stopping only ask again: torchrun's agent sends its workers a
SIGTERM of its own after SLURM's, and a second signal must not kill a process writing its
checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

# getattr: SIGUSR1 is POSIX-only
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)


class Stopped(KeyboardInterrupt):
    """A command stopped on a signal, after saving what a rerun resumes from.

    A KeyboardInterrupt (not an Exception), so that what handles Ctrl-C handles it too: ``metapl
    tune`` queues the trial to resume, a ``except Exception`` in a user's code does not swallow it.
    """

    def __init__(self, signum: int, detail: str):
        self.signum, self.detail = signum, detail
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")

    def __reduce__(self):
        # A worker process's stop reaches the main process pickled; an exception is rebuilt from
        # its args (here the message), which this __init__ does not take.
        return type(self), (self.signum, self.detail)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended, so
        that a scheduler sees the job as ended by it, not as finished."""
        return 128 + self.signum


class TrainingStopped(Stopped):
    """Training stopped at a step boundary, with a checkpoint of that step saved."""

    def __init__(self, signum: int, step: int, total_steps: int):
        self.step, self.total_steps = step, total_steps
        super().__init__(
            signum,
            f" at step {step} of {total_steps}, after saving a checkpoint of that step; run the "
            "same command again to resume from it",
        )

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.total_steps)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the training steps: the run stops at once, without a checkpoint of the step in
    progress (the module's docstring says why); the message says which step the same command
    resumes from, which "interrupted" alone left to guess."""

    def __init__(self, step: int, total_steps: int, checkpointed: int | None):
        self.step, self.total_steps, self.checkpointed = step, total_steps, checkpointed
        if checkpointed is None:
            then = "before its first checkpoint; the same command starts it again"
        else:
            then = (
                f"its last checkpoint is of step {checkpointed}; the same command resumes from "
                "it (SIGTERM, unlike Ctrl-C, saves the step in progress first)"
            )
        super().__init__(f"interrupted after step {step} of {total_steps}, {then}")

    def __reduce__(self):
        return type(self), (self.step, self.total_steps, self.checkpointed)


class StopSignals:
    """While in the block, SIGTERM and SIGUSR1 set :attr:`signum` instead of ending the process.

    A signal whose handler is not the default (a user's own, in a program that calls
    :func:`metapl.train.engine.train`) is left alone, and so is every signal when the block runs
    outside the main thread, where Python cannot set handlers: the process then ends as before.
    """

    def __init__(self, raising: Callable[[int], BaseException] | None = None) -> None:
        """``raising``: for the process that waits on worker processes (metapl.experiments.workers)
        the first signal raises ``raising(signum)`` in the main thread, as Ctrl-C raises
        KeyboardInterrupt; later ones are only recorded."""
        self.signum: int | None = None
        self.raising = raising
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:  # the first names the stop
            self.signum = signum
            if self.raising is not None:
                raise self.raising(signum)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]  # a handler getsignal gave
        self._previous.clear()

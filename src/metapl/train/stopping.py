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
from types import FrameType

# getattr: SIGUSR1 is POSIX-only
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)


class Stopped(KeyboardInterrupt):
    """Training stopped at a step boundary on a signal, with a checkpoint of that step saved.

    A KeyboardInterrupt (not an Exception), so that what handles Ctrl-C handles it too: ``metapl
    tune`` queues the trial to resume, a ``except Exception`` in a user's code does not swallow it.
    """

    def __init__(self, signum: int, step: int, total_steps: int):
        self.signum, self.step, self.total_steps = signum, step, total_steps
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step} of {total_steps}, after "
            "saving a checkpoint of that step; run the same command again to resume from it"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended, so
        that a scheduler sees the job as ended by it, not as finished."""
        return 128 + self.signum


class StopSignals:
    """While in the block, SIGTERM and SIGUSR1 set :attr:`signum` instead of ending the process.

    A signal whose handler is not the default (a user's own, in a program that calls
    :func:`metapl.train.engine.train`) is left alone, and so is every signal when the block runs
    outside the main thread, where Python cannot set handlers: the process then ends as before.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
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

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]  # a handler getsignal gave
        self._previous.clear()

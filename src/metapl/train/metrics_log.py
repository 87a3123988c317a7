"""Training metrics to ``metrics.csv`` (always) and TensorBoard (when available).

The CSV is in long format, one row per value: ``step,name,value``. Metrics that appear later in a
run (evaluation every N steps, a new loss term) then need no header change, and a row is never
rewritten once written; pivoting is one line of pandas (``df.pivot(index="step", columns="name")``).
Values are written with ``repr(float)``, which reads back to the same float.

On resume, rows logged after the checkpoint (step > ``resume_step``) are dropped, so a run killed
between logging and checkpointing does not record those steps twice; TensorBoard gets the same rule
through ``purge_step``.

A run's folder can move while the run writes: ``metapl tune`` hands a trial whose process was paused
past its heartbeat to a copy, which moves the folder to its own number. TensorBoard's writer thread
opens its event file by path on every write, so it would die with a FileNotFoundError traceback
from its own thread when the paused process wakes; the logger checks the folder before each write
and stops TensorBoard logging in one warning instead.
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from metapl.atomic import failed_write_named, replace_atomically
from metapl.errors import MetaplError, MetaplWarning

HEADER = ("step", "name", "value")
CSV_NAME = "metrics.csv"
TB_DIR = "tb"

_tb_warning_given = False


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any | None:
    """A TensorBoard ``SummaryWriter``, or None (with one warning per process) if unavailable."""
    global _tb_warning_given
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as error:  # ImportError, or a broken protobuf/tensorboard install
        if not _tb_warning_given:
            _tb_warning_given = True
            warnings.warn(
                f"TensorBoard is unavailable ({error}); metrics go to {CSV_NAME} only",
                MetaplWarning,
                stacklevel=3,
            )
        return None
    _quiet_tensorboard_thread()
    # The writer writes its first event (the file version) as it opens: a full disk fails here.
    with failed_write_named(log_dir, "no TensorBoard events are written"):
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _quiet_tensorboard_thread() -> None:
    """Keep a failed write of TensorBoard's writer thread (a full disk) from printing its own
    traceback: the thread stores the error, and the writer's next call in this thread raises it
    again, which :func:`metapl.atomic.failed_write_named` makes one line. Installed once per process; every
    other thread's exception still goes to the hook there before."""
    before = threading.excepthook
    if getattr(before, "_metapl_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        writer_thread = type(args.thread).__module__.startswith("tensorboard.")
        if writer_thread and isinstance(args.exc_value, OSError):
            return
        before(args)

    hook._metapl_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _rows_up_to(csv_path: Path, last_step: int) -> list[tuple[int, str, str]]:
    """The well-formed rows of an existing CSV with ``step <= last_step``.

    Malformed rows are dropped too: a run killed while writing can leave a half line at the end.
    """
    kept = []
    with csv_path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) != 3 or tuple(row) == HEADER:
                continue
            try:
                step, value = int(row[0]), row[2]
                float(value)
            except ValueError:
                continue
            if step <= last_step:
                kept.append((step, row[1], value))
    return kept


def _write_atomic(csv_path: Path, rows: list[tuple[int, str, str]]) -> None:
    def fill(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows(rows)

    replace_atomically(csv_path, fill)


class MetricsLogger:
    """Append ``(step, name, value)`` rows to ``out_dir/metrics.csv`` and scalars to ``out_dir/tb``.

    ``resume_step=None`` starts a fresh log (an existing CSV is replaced); an int keeps the rows up
    to and including that step. Usable as a context manager; :meth:`close` flushes both outputs.
    """

    def __init__(
        self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / CSV_NAME
        kept = []
        if resume_step is not None and self.csv_path.exists():
            kept = _rows_up_to(self.csv_path, resume_step)
        _write_atomic(self.csv_path, kept)
        self._file = self.csv_path.open("a", newline="")
        self._csv = csv.writer(self._file)
        purge_step = None if resume_step is None else resume_step + 1
        self._tb_dir = self.out_dir / TB_DIR
        self._tb = _summary_writer(self._tb_dir, purge_step) if tensorboard else None

    def _tensorboard_folder_gone(self) -> bool:
        """Whether the TensorBoard folder has disappeared (moved or deleted while the run writes):
        the writer is then dropped without a close, which would write by the old path again."""
        if self._tb is None or self._tb_dir.is_dir():
            return False
        self._tb = None
        warnings.warn(
            f"{self._tb_dir} was moved or deleted while the run wrote to it; TensorBoard logging "
            "stops for the rest of this run",
            MetaplWarning,
            stacklevel=3,
        )
        return True

    def check_folder(self) -> None:
        """A :class:`~metapl.errors.MetaplError` if the run's folder was deleted or moved while
        the run wrote to it (its ``metrics.csv`` is no longer the file this logger appends to).
        Checked before each checkpoint: saving one made the folder again, and the run ended with
        a checkpoint and results.json but no metrics.csv, in the traceback of the plot that read
        it."""
        try:
            same = os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.csv_path))
        except OSError:  # gone
            same = False
        if not same:
            raise MetaplError(
                f"the run folder {self.out_dir} was moved or deleted while the run wrote to it "
                f"({CSV_NAME} is not the file the run writes); nothing more is written there"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (name -> number) at ``step``; rows are sorted by name."""
        if self._file.closed:
            raise ValueError("MetricsLogger.log after close")
        values = {name: float(value) for name, value in sorted(metrics.items())}
        with failed_write_named(self.csv_path, _CSV_KEPT):
            self._csv.writerows((step, name, repr(value)) for name, value in values.items())
            # Flushed (not fsync'ed) every call: a crash loses little, and steps stay cheap.
            self._file.flush()
        if self._tb is not None and not self._tensorboard_folder_gone():
            with failed_write_named(self._tb_dir, _TB_KEPT):
                for name, value in values.items():
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Flush and close the CSV and the TensorBoard writer; calling it twice is harmless."""
        try:
            if not self._file.closed:
                with failed_write_named(self.csv_path, _CSV_KEPT):
                    self._file.close()  # closed even when its last flush fails
        finally:  # and TensorBoard's writer thread ends even then
            if self._tb is not None and not self._tensorboard_folder_gone():
                tb, self._tb = self._tb, None  # not closed twice when this fails
                with failed_write_named(self._tb_dir, _TB_KEPT):
                    tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The run already failed (a full disk, say): that error is the one to report, not the
        # same disk's refusal of the last rows.
        with contextlib.suppress(Exception):
            self.close()


_CSV_KEPT = "the rows logged before are kept (a half row at its end is dropped on resume)"
_TB_KEPT = "the TensorBoard events logged before are kept"

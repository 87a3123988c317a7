"""Gaps a mutation audit of the run's metric outputs found (metapl.train.metrics_log and
metapl.train.curves): TensorBoard's purge on resume, malformed CSV rows left by a kill, rows readable
while the run is still going, and which panel of curves.png each series lands in, at what scale.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metapl.train import curves
from metapl.train.metrics_log import MetricsLogger


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_tensorboard_resume_replaces_steps_after_the_checkpoint_only(tmp_path: Path) -> None:
    """Resuming at step 2 purges TensorBoard's events after step 2 (the logged-then-lost step 3) and
    keeps step 2's: the scalar series reads 1, 2, then the resumed run's 3, each step once."""
    with MetricsLogger(tmp_path) as log:
        for step, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
            log.log(step, {"loss": loss})
    # TensorBoard reads event files in name order: time in whole seconds, then host, pid and a
    # per-process writer count. In the same second, writer 10 sorts before writer 9 (as text) and
    # its purge came first, which failed this test depending on the tests run before it in the
    # process. A resumed run is a later second, so the resume here starts in one too.
    time.sleep(1.001 - time.time() % 1)
    with MetricsLogger(tmp_path, resume_step=2) as log:
        log.log(3, {"loss": 0.1})
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    events = tb.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([0.5, 0.25, 0.1])


def test_resume_drops_rows_without_a_number(tmp_path: Path) -> None:
    """A kill mid-write can leave ``2,loss,`` (no value yet) or a garbled step: resume keeps only
    rows whose step is an int and whose value is a number, so the CSV stays numeric."""
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 0.5})
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("2,loss,\nx,loss,0.3\n2,acc,abc\n")
    MetricsLogger(tmp_path, tensorboard=False, resume_step=5).close()
    assert _rows(tmp_path / "metrics.csv") == [["step", "name", "value"], ["1", "loss", "0.5"]]


def test_rows_are_on_disk_before_close(tmp_path: Path) -> None:
    """Each log call is flushed: a run killed later (or a user tailing metrics.csv) sees every step
    logged so far, not only what a buffer happened to write out."""
    log = MetricsLogger(tmp_path, tensorboard=False)
    try:
        log.log(7, {"loss": 1.5})
        assert _rows(tmp_path / "metrics.csv")[1:] == [["7", "loss", "1.5"]]
    finally:
        log.close()


def test_a_moved_run_folder_stops_tensorboard_in_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``metapl tune`` moves a paused trial's folder to its copy. TensorBoard's writer thread opens
    its event file by path on each write, so logging after the move killed that thread with a
    FileNotFoundError traceback, and ``close`` raised it again. Now one warning, and the rows go on
    to the CSV's open file (which moved with the folder)."""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    log = MetricsLogger(tmp_path / "trial-3")
    log.log(1, {"loss": 0.5})
    time.sleep(0.3)  # the writer thread writes step 1 by the old path
    (tmp_path / "trial-3").rename(tmp_path / "trial-4")
    with pytest.warns(UserWarning, match=r"trial-3.tb was moved or deleted"):
        log.log(2, {"loss": 0.25})
    log.log(3, {"loss": 0.125})
    log.close()  # raised the thread's FileNotFoundError before
    time.sleep(0.3)
    assert died == []
    assert [r[0] for r in _rows(tmp_path / "trial-4" / "metrics.csv")[1:]] == ["1", "2", "3"]
    assert not (tmp_path / "trial-3").exists()  # nothing recreated at the old path


def test_curves_put_each_series_in_its_panel_with_accuracy_in_percent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Losses go to the first panel, ``*accuracy`` to the second (x100, in percent) and ``*_lr`` to
    the third, each against its own steps; the panels are labeled in that order."""
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"teacher_loss": 2.0, "student_lr": 0.1})
        log.log(2, {"teacher_loss": 1.0, "student_lr": 0.05, "test_accuracy": 0.25})
        log.log(4, {"teacher_loss": 0.5, "student_lr": 0.0, "test_accuracy": 0.5})
        log.log(4, {"tune_accuracy": 0.75})  # any *accuracy, not only the test set's
    figures = []
    real_close = plt.close
    monkeypatch.setattr(curves.plt, "close", figures.append)  # keep the figure to inspect it
    try:
        path = curves.plot_curves(tmp_path, "run")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (fig,) = figures
        axes = fig.axes
        assert [ax.get_ylabel() for ax in axes] == ["loss", "accuracy (%)", "learning rate"]
        plotted = [
            {
                line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                for line in ax.lines
            }
            for ax in axes
        ]
    finally:
        for fig in figures:
            real_close(fig)
    assert plotted == [
        {"teacher_loss": ([1, 2, 4], [2.0, 1.0, 0.5])},
        {"test_accuracy": ([2, 4], [25.0, 50.0]), "tune_accuracy": ([4], [75.0])},
        {"student_lr": ([1, 2, 4], [0.1, 0.05, 0.0])},
    ]

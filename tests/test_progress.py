"""Progress bars into a log file are redrawn every 30 s, not ten times a second."""

from __future__ import annotations

import io
import time

from metapl.cli import main
from metapl.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _redraws(stream: io.StringIO) -> int:
    return stream.getvalue().count("\r")


def test_a_bar_into_a_file_is_redrawn_at_its_start_and_end_only_within_the_log_interval():
    for stream, most in ((io.StringIO(), 3), (_Terminal(), None)):
        bar = progress_bar(total=30, file=stream, unit="step")
        for _ in range(30):
            time.sleep(0.02)
            bar.update()
        bar.close()
        if most is None:  # a terminal keeps tqdm's 0.1 s: several redraws in 0.6 s
            assert bar.mininterval == 0.1 and _redraws(stream) > 3
        else:
            assert bar.mininterval == LOG_INTERVAL_S and _redraws(stream) <= most


def test_metapl_trains_with_few_redraws_into_a_log(tmp_path, capfd):
    """The training bar (stderr captured, as in a log file): tqdm redrew it every 0.1 s."""
    args = ["train", "--preset", "digits-supervised", "--out", str(tmp_path / "run")]
    args += ["--steps", "150", "--device", "cpu", "--set", "eval_every=1000"]
    start = time.perf_counter()
    assert main(args) == 0
    took = time.perf_counter() - start
    err = capfd.readouterr().err
    assert "digits-supervised" in err and "150/150" in err
    assert err.count("\r") <= 3, (err.count("\r"), took)

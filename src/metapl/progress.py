"""Progress bars: tqdm with its ETA, refreshed less often when they go to a log file.

tqdm redraws a bar up to ten times a second. On a terminal that is what one wants; in a file or a
pipe (a job's log, CI), every redraw is kept: a day-long `metapl train` left millions of lines of
progress in its log. There, a bar is redrawn every :data:`LOG_INTERVAL_S` seconds instead.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

LOG_INTERVAL_S = 30.0

_bars: weakref.WeakSet = weakref.WeakSet()  # every bar progress_bar made (see close_bars)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_bar(**kwargs: Any):
    """``tqdm(**kwargs)``; unless ``mininterval`` is given, at most one redraw every
    :data:`LOG_INTERVAL_S` seconds when the bar's stream (stderr by default) is not a terminal."""
    from tqdm import tqdm

    if "mininterval" not in kwargs and not _is_terminal(kwargs.get("file") or sys.stderr):
        kwargs["mininterval"] = LOG_INTERVAL_S
    bar = tqdm(**kwargs)
    _bars.add(bar)
    return bar


def close_bars() -> None:
    """Close the bars a failed or interrupted command left open, before it prints its error line.
    An open bar is closed (and drawn once more) only when it is garbage-collected, after the
    message: the error was glued to the bar's line and the bar came last. Closing a closed bar
    does nothing."""
    for bar in list(_bars):
        bar.close()

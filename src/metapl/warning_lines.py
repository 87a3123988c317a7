"""metapl's own warnings as one line each on the command line, as its errors and notes are.

Python shows a warning as ``/path/to/metapl/train/large_teacher.py:76: UserWarning: ...`` and
then the source line that raised it: to a user of `metapl reduced`, two lines of metapl's insides
around the one sentence meant for them ("large_teacher_labeled.npy is unreadable (...); starting
over from row 0"). The commands show such a warning (a :class:`~metapl.errors.MetaplWarning`) as
``metapl COMMAND: warning: ...``. Warnings of other libraries keep Python's form (their file and
line say where to look), torch's too where metapl's code is the line that called it, and so does
every warning when metapl is used as a library: only :func:`one_line_warnings` changes the
format.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from metapl.errors import MetaplWarning


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """In the block (in this process and the worker processes it forks meanwhile), a
    :class:`~metapl.errors.MetaplWarning` shows as ``metapl COMMAND: warning: MESSAGE``."""
    python_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, MetaplWarning):
            text = " ".join(str(message).split())  # one line, whatever the message holds
            return f"metapl {command}: warning: {text}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = python_format

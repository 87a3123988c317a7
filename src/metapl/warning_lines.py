"""metapl's own warnings as one line each on the command line, as its errors and notes are.

Python shows a warning as ``/path/to/metapl/train/large_teacher.py:76: UserWarning: ...`` and
then the source line that raised it: to a user of `metapl reduced`, two lines of metapl's insides
around the one sentence meant for them ("large_teacher_labeled.npy is unreadable (...); starting
over from row 0"). The commands show such a warning as ``metapl COMMAND: warning: ...``. Warnings
of other libraries keep Python's form (their file and line say where to look), and so does every
warning when metapl is used as a library: only :func:`one_line_warnings` changes the format.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """In the block (in this process and the worker processes it forks meanwhile), a warning
    raised in metapl's own code shows as ``metapl COMMAND: warning: MESSAGE``."""
    python_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if os.path.abspath(filename).startswith(_PACKAGE):
            text = " ".join(str(message).split())  # one line, whatever the message holds
            return f"metapl {command}: warning: {text}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = python_format

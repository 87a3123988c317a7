"""One error family for the user's mistakes.

Anything raised as a :class:`MetaplError` is something the user can fix (a bad file, a bad option);
the command line prints its message as one line and exits with code 2. Every other exception is a bug
in metapl and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

ALIASES = {"gpu": "cuda"}
"""Words users type for a choice whose spelling is far from them (``--device gpu``)."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """' (did you mean X?)' naming the (up to ``n``) choices closest to a mistyped ``word`` in
    spelling, case aside (``TEACHER_LR`` names ``teacher_lr``), or its meaning (:data:`ALIASES`:
    ``gpu`` names ``cuda``, not the closer ``cpu``), or '' when none is close."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    meant = ALIASES.get(word.lower())
    if meant in by_lower:
        return f" (did you mean {by_lower[meant]}?)"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=n)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line, for a one-line error that quotes it: its first line,
    and the next one too when the first only announces it (load_state_dict's "Error(s) in loading
    state_dict for X:"); its class name when it has no message; cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


class MetaplWarning(UserWarning):
    """A warning metapl raises itself (the commands show it as one line: metapl.warning_lines)."""


class MetaplError(Exception):
    """A mistake in the user's input: configuration, data, checkpoint or API use."""


class ConfigError(MetaplError):
    """An unknown or invalid option."""


class DataError(MetaplError):
    """A missing, truncated or malformed dataset file, or labels out of range."""


class CheckpointError(MetaplError):
    """A checkpoint that cannot be read or does not match the run."""


class UnsupportedOptimizerError(MetaplError):
    """The student's optimizer has no exact update-rule factor (Appendix B) in metapl."""


class WriteError(MetaplError, OSError):
    """A result file could not be written: a full disk, a quota, an I/O error. Nothing half-written
    is left, and the file there before, if any, is unchanged. Also an ``OSError`` (with the
    ``errno`` of the failure), so that code which handles a failed write as one still does."""

    def advised(self, advice: str) -> WriteError:
        """This error with ``advice`` (what to do next) appended, its errno kept."""
        error = WriteError(f"{self}{advice}")
        error.errno = self.errno
        return error


class NonFiniteLossError(MetaplError):
    """A loss became NaN or Inf; training stops rather than write a poisoned checkpoint."""

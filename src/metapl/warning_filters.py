"""Warning filters that metapl sets for a moment, one thread at a time.

The warning filters are one list for the whole process, and ``warnings.catch_warnings()`` puts back
the list it found when it began (before Python 3.14). Two threads inside it at once can leave the
other's filter in place, or drop it while it is still wanted: image files decode on several threads
(metapl.data.decoding) while the training step runs in the main thread. Every filter metapl sets
while its decoding threads may run goes through :func:`ignoring`, whose lock lets one thread at a
time in; the blocks are short (an image header, a crop, loading torch's JVP rules once).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

_LOCK = threading.Lock()


def _new_lock_in_child() -> None:  # a thread of the parent may have held it at the fork
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_lock_in_child)


@contextlib.contextmanager
def ignoring(*, message: str = "", category: type[Warning] = Warning) -> Iterator[None]:
    """In the block, warnings of ``category`` whose text starts with ``message`` (a regular
    expression) are not shown; the filters are as before afterwards."""
    with _LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
        yield

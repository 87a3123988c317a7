"""Files that appear whole or not at all.

Every result file metapl writes whole (checkpoints, plots, JSON summaries, exported models, and
``metrics.csv`` when a run starts or resumes) is written to a temporary file beside its destination,
flushed to disk, and renamed onto it with ``os.replace`` (atomic on POSIX and Windows): a reader, or
a crash at any instant, sees the old file or the new one, never half of one, and an earlier result
survives until its successor is complete. ``metrics.csv`` then grows by appended rows (a half last
row is dropped on resume: :mod:`metapl.train.metrics_log`), and a precomputed distributions ``.npy``
is filled in place under its own resume rule (:mod:`metapl.reduced.precompute`).
Temporary names are ``.<name>.<random>.tmp`` in the same folder (a rename across file systems would
not be atomic). A write the file system refuses (a full disk, a quota, a file-size limit) is a
:class:`~metapl.errors.WriteError`: one line naming the file, with nothing half-written left.
The file gets the permissions of a plain ``open(path, "w")`` (``0666`` less the
umask), not the ``0600`` of ``tempfile.mkstemp``, so a run folder reads the same for everyone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from metapl.errors import WriteError

# The most bytes of a file's name that its temporary files' names repeat: with the dots, the 8
# random characters and ".tmp" they stay within the usual 255-byte limit of a name. A name of 242
# to 255 bytes (`metapl bench --json` with a long one, say) failed as "File name too long" when
# its result was written, after the work.
_NAME_IN_TEMP = 255 - len("..") - 8 - len(".tmp")


def temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporary files (a killed writer's leftovers can be found by it)."""
    name = os.fsdecode(os.fsencode(path.name)[:_NAME_IN_TEMP])
    return f".{name}."


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files that writers of ``path`` killed midway left beside it (a
    ``kill -9`` between creating one and renaming it). Only where no other process writes ``path``
    at the same time: its temporary file would go too."""
    path = _through_links(path)  # where temp_file_beside puts them
    for stale in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
        stale.unlink(missing_ok=True)


def _default_mode() -> int:
    umask = os.umask(0)  # the only portable way to read it
    os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (written through another handle, or a memory map)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is, or that the RuntimeError ``exc`` was raised while handling:
    torch.save turns a failed write of its file object into a RuntimeError of its own, raised
    during the OSError. Anything else (a Ctrl-C during an OSError, say) is not a failed write."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        if not isinstance(current, RuntimeError):
            return None
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_error(path: Path, exc: BaseException, kept: str | None = None) -> WriteError | None:
    """One line for a write of ``path`` that failed with ``exc``, or None if no OSError caused it
    (a bug, which keeps its traceback). ``kept`` says what survives; by default what holds for a
    file written whole (:func:`temp_file_beside`)."""
    os_error = _os_error_in(exc)
    if os_error is None:
        return None
    if isinstance(os_error, WriteError):
        return os_error
    reason = os_error.strerror or str(os_error) or type(os_error).__name__
    message = f"could not write {path}: {reason}"
    if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free / 2**20
            message += f" ({free:,.1f} MiB free there)"
        except OSError:
            pass
    if kept is None:
        kept = "nothing half-written is left"
        if path.exists():
            kept += f", and the {path.name} there before is unchanged"
    message += f"; {kept}"
    error = WriteError(message)
    error.errno = os_error.errno
    return error


@contextlib.contextmanager
def failed_write_named(path: Path, kept: str | None = None):
    """Inside, a failed write is re-raised as :func:`write_error`'s one line naming ``path``;
    any other exception passes unchanged."""
    try:
        yield
    except BaseException as exc:
        failure = write_error(path, exc, kept)
        if failure is None or failure is exc:
            raise
        raise failure from exc


def _through_links(path: Path) -> Path:
    """The file that writing ``path`` should replace: a symbolic link's target (a link's own
    name would otherwise be renamed over, leaving a plain file where the user's link was and the
    file it points to unchanged), or ``path`` itself."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def temp_file_beside(path: Path, fill: Callable[[Path], object]) -> Path:
    """A temporary file in ``path``'s folder (the folder of the file a link ``path`` points to),
    filled by ``fill(tmp)``, on disk, with ordinary permissions; deleted if ``fill`` (or anything
    here) fails; what ``fill`` returns is ignored. The caller renames it (:func:`move_into_place`).
    A failure of the file system (a full disk, say) is a :class:`~metapl.errors.WriteError`
    naming ``path``."""
    path = Path(path)
    target = _through_links(path)  # the temporary file must be on the target's file system
    tmp: Path | None = None
    with failed_write_named(path):
        try:
            fd, name = tempfile.mkstemp(
                dir=target.parent, prefix=temp_prefix(target), suffix=".tmp"
            )
            os.close(fd)
            tmp = Path(name)
            fill(tmp)
            fsync_file(tmp)
            os.chmod(tmp, _default_mode())
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
    assert tmp is not None
    return tmp


def replace_atomically(path: Path, fill: Callable[[Path], object]) -> None:
    """Write ``path`` through ``fill(tmp)`` on a temporary file, then rename it onto ``path``."""
    move_into_place(temp_file_beside(path, fill), path)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished temporary file ``tmp`` onto ``path`` (onto the file a link ``path``
    points to, the link kept); delete it if that fails."""
    with failed_write_named(path):
        try:
            os.replace(tmp, _through_links(path))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, obj, **dumps_options) -> None:
    """``obj`` as JSON (``indent=1`` unless told otherwise), whole or not at all."""
    dumps_options.setdefault("indent", 1)
    write_text_atomically(path, json.dumps(obj, **dumps_options))

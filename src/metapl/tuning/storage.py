"""Opening the study storage that several processes (or machines) share.

- **SQLite** (``sqlite:///PATH.db``): processes on one machine. SQLite allows one writer at a time;
  a process that finds the file locked waits up to ``SQLITE_TIMEOUT_S`` instead of Python's default
  5 s, so busy workers queue up rather than fail with "database is locked". Write-ahead logging
  keeps each write short (see :func:`_sqlite_pragmas`). Creating the tables of a new file is
  serialized with an advisory lock on ``PATH.db.lock``: two processes starting together would
  otherwise both try to create them. Not for network file systems, whose locking SQLite cannot
  trust.
- **PostgreSQL** (``postgresql://USER:PASSWORD@HOST/DB`` with the driver ``psycopg[binary]``, or
  ``postgresql+psycopg2://`` with ``psycopg2-binary``): machines that all reach one server. A first
  start that races on table creation is retried.

Heartbeats (every ``HEARTBEAT_S``) let a trial whose process died (``kill -9``, a lost machine) be
marked failed after ``GRACE_S`` instead of staying "running" forever (and resumed: see
:mod:`~metapl.tuning.retry`); that matters because stage 2 waits for stage 1's running trials
before fixing the student's values.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from metapl.errors import ConfigError
from metapl.tuning.retry import retry_callback

SQLITE_TIMEOUT_S = 120
HEARTBEAT_S = 30
GRACE_S = 120
URL_HINT = (
    "use sqlite:///PATH.db on one machine, or postgresql://USER:PASSWORD@HOST/DB across machines"
)


def import_optuna():
    """Optuna, or a one-line ConfigError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("metapl tune needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # metapl prints one line per trial
    # heartbeats and fail_stale_trials are marked experimental; metapl relies on them knowingly
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock while the block runs (POSIX; elsewhere the retry covers it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_pragmas(connection, _record) -> None:
    """Write-ahead logging: readers never block the writer, so the write lock is held briefly; with
    ``synchronous=NORMAL`` a commit needs no fsync (an OS crash or power loss may lose the last
    commits, but never corrupts the file; a killed process loses nothing)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def new_sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL when it does not exist yet (opening the storage
    would create it, with empty tables), else None (another backend, or a URL open_storage
    refuses in its own words)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - open_storage says what is wrong with it
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    path = Path(database)
    return None if path.exists() else path


def _check_study_file(path: Path, shown: str) -> None:
    """A one-line ConfigError unless SQLite file ``path`` is missing, empty or holds Optuna's
    tables: garbage bytes, or another program's database, which Optuna would add its tables to
    before failing with a traceback. Runs under the lock of the first start's table creation:
    outside it, a worker could find another's tables half made (sqlite3 commits each CREATE
    TABLE on its own) and take them for another program's."""
    import sqlite3

    if not path.is_file():
        return
    # read-write, though it only reads: a read-only connection to a WAL database leaves its -wal
    # and -shm files behind, which the last read-write connection removes as it closes
    connection = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--storage {shown}: cannot open the database ({reason})") from None
    finally:
        connection.close()
    names = sorted(row[0] for row in rows)
    if names and "version_info" not in names:
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"--storage {shown}: {path} holds tables of another program ({listed}), not an "
            "Optuna study; give another file (a new one is created)"
        )


def open_storage(url: str):
    """An Optuna ``RDBStorage`` for ``url``; every problem with the URL is a one-line ConfigError."""
    optuna = import_optuna()
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigError(f"--storage {url!r} is not a database URL: {URL_HINT}") from None
    # The URL as typed, unless it holds a password: SQLAlchemy's rendering percent-encodes the path,
    # so `sqlite:///:memory:` read `sqlite:///%3Amemory%3A` in the error, and any non-ASCII folder
    # was garbled the same way.
    shown = url if parsed.password is None else parsed.render_as_string(hide_password=True)
    engine_kwargs: dict = {}
    # a factory: each attempt enters a fresh one
    lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    made_lock: Path | None = None  # the lock file this call creates
    study_file: Path | None = None  # SQLite's, checked under the lock
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError(
                f"--storage {shown}: an in-memory database is not shared between processes; "
                "give a file, e.g. sqlite:///tune.db"
            )
        folder = Path(database).parent
        if not folder.is_dir():
            raise ConfigError(
                f"--storage {shown}: folder {folder} does not exist; create it first "
                f"(mkdir -p {shlex.quote(str(folder))})"  # quoted, to paste as it is
            )
        # SQLite writes its lock, journal and WAL files beside the database, even to read it
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--storage {shown}: folder {folder} is not writable; put the database in a "
                "folder you can write"
            )
        study_file = Path(database)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        lock_path = Path(database + ".lock")
        lock = lambda: _file_lock(lock_path)  # noqa: E731
        made_lock = None if lock_path.exists() else lock_path
    try:
        return _open_rdb(optuna, url, shown, engine_kwargs, lock, study_file)
    except ConfigError:
        # A file that is not a study (garbage bytes, another program's database, a study of
        # another Optuna schema) is left without the lock file made for it: an error leaves
        # nothing new behind. One that was there before stays (others may be locking it). A
        # worker that made it too, at the same moment, may then lock a file of its own: the
        # racing table creation is retried (_open_rdb).
        if made_lock is not None:
            made_lock.unlink(missing_ok=True)
        raise


def _open_rdb(
    optuna, url: str, shown: str, engine_kwargs: dict, lock: Callable, study_file: Path | None
):
    """open_storage's ``RDBStorage``, with SQLite's ``study_file`` checked under the lock; a first
    start that races on table creation is retried."""
    import sqlalchemy.event
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            with lock():
                if study_file is not None:
                    _check_study_file(study_file, shown)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=retry_callback(optuna),
                )
                if study_file is not None:  # SQLite
                    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
                    storage.engine.dispose()  # connections made before the listener go
                return storage
        except ImportError as err:
            raise ConfigError(
                f"--storage {shown}: the database driver is not installed ({err.__cause__ or err}); "
                "for postgresql:// URLs: pip install 'psycopg[binary]' (or psycopg2-binary with "
                "postgresql+psycopg2://)"
            ) from None
        except (
            sqlalchemy.exc.SQLAlchemyError,
            optuna.exceptions.StorageInternalError,
            RuntimeError,  # Optuna's "no longer compatible with the table schema"
        ) as err:
            racing = "already exists" in str(err) or "duplicate" in str(err).lower()
            if racing and attempt < 2:  # another process is creating the tables right now
                time.sleep(1.0 + attempt)
                continue
            reason = str(getattr(err, "orig", None) or err).splitlines()[0]
            raise ConfigError(f"--storage {shown}: cannot open the database ({reason})") from None
    raise AssertionError("unreachable")

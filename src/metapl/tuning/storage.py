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


def open_storage(url: str):
    """An Optuna ``RDBStorage`` for ``url``; every problem with the URL is a one-line ConfigError."""
    optuna = import_optuna()
    import sqlalchemy.event
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigError(f"--storage {url!r} is not a database URL: {URL_HINT}") from None
    shown = parsed.render_as_string(hide_password=True)
    engine_kwargs: dict = {}
    # a factory: each attempt enters a fresh one
    lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
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
                f"(mkdir -p {folder})"
            )
        # SQLite writes its lock, journal and WAL files beside the database, even to read it
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--storage {shown}: folder {folder} is not writable; put the database in a "
                "folder you can write"
            )
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        lock = lambda: _file_lock(Path(database + ".lock"))  # noqa: E731
    for attempt in range(3):
        try:
            with lock():
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=retry_callback(optuna),
                )
                if sqlite:
                    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
                    storage.engine.dispose()  # connections made before the listener go
                return storage
        except ImportError as err:
            raise ConfigError(
                f"--storage {shown}: the database driver is not installed ({err.__cause__ or err}); "
                "for postgresql:// URLs: pip install 'psycopg[binary]' (or psycopg2-binary with "
                "postgresql+psycopg2://)"
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            racing = "already exists" in str(err) or "duplicate" in str(err).lower()
            if racing and attempt < 2:  # another process is creating the tables right now
                time.sleep(1.0 + attempt)
                continue
            reason = str(getattr(err, "orig", None) or err).splitlines()[0]
            raise ConfigError(f"--storage {shown}: cannot open the database ({reason})") from None
    raise AssertionError("unreachable")

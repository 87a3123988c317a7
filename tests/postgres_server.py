"""A throwaway PostgreSQL server for the tests of `metapl tune --storage postgresql://...`.

It uses the server programs installed on the machine (``initdb`` and ``pg_ctl`` on PATH, or
Debian's /usr/lib/postgresql/N/bin) and the ``psycopg`` driver of the test extra; without either,
the tests that need it are skipped, saying which. PostgreSQL refuses to run as root, so as root the
server runs as the system's ``postgres`` user. It listens on a Unix socket in its own folder only
(no TCP port, so nothing else on the machine can collide with it or reach it), and is stopped and
deleted after the tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

PORT = 5432  # only names the socket file, in a folder of its own


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_server_user() -> list[str]:
    """The command prefix that runs a program as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser to start the server as 'postgres'")
    return [runuser, "-u", "postgres", "--"]


def _run_or_skip(command: list[str]) -> None:
    """Run a server program; a machine where it cannot run (a container whose runuser has no
    session, say) skips the test with the program's own words, as a machine without one does."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        words = (done.stderr or done.stdout).strip().splitlines()
        pytest.skip(f"cannot start a PostgreSQL server: {words[-1] if words else done.returncode}")


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh, empty database on a server that lives for the block."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (pip install 'psycopg[binary]')")
    initdb, pg_ctl = _program("initdb"), _program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on this machine")
    prefix = _as_server_user()
    folder = tempfile.mkdtemp(prefix="metapl-pg")
    os.chmod(folder, 0o777)  # the server's user writes its data and socket here
    data = os.path.join(folder, "data")
    try:
        _run_or_skip([*prefix, initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"])
        options = f"-k {folder} -p {PORT} -c listen_addresses= -c fsync=off"
        log = os.path.join(folder, "log")
        _run_or_skip([*prefix, pg_ctl, "-D", data, "-l", log, "-w", "-o", options, "start"])
        try:
            yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={PORT}"
        finally:
            subprocess.run(
                [*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)

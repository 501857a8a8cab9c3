"""Opening SQLite, the one way: every connection of the daemon and its commands.

- :func:`connect` sets the pragmas every user needs (WAL, ``synchronous=FULL``,
  a busy timeout, foreign keys), so a delivery cursor or a webhook state is as
  durable as the ledger, whatever the SQLite build defaults to.
- :func:`connect_readonly` is for readers (``status``, ``report``, ``audit``,
  ``orders list``, every HTTP request): a ``mode=ro`` connection that cannot
  write and never migrates.  It refuses a store whose schema is not the one this
  code knows, rather than misreading it: older means the daemon has not started
  since an upgrade, newer means an older CLI is reading a newer daemon's store.
- :func:`migrate` is run by the daemon only (``run``), once, at start.
- :func:`transaction` is the one write transaction (``BEGIN IMMEDIATE`` ...
  ``COMMIT``, rolled back on any exception); :func:`snapshot` a read
  transaction, so that several SELECTs see one committed state.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monitor.store.schema import MIGRATIONS

#: the schema version this code reads and writes
SCHEMA_VERSION = max(n for n, _sql in MIGRATIONS)
BUSY_TIMEOUT_S = 30.0


class StoreError(Exception):
    """The database cannot be opened, migrated, read or written."""


def _pragmas(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")


def connect(path: Path | str) -> sqlite3.Connection:
    """A read-write connection with the store's pragmas (creates the file)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed (and therefore acknowledged) reading survives power loss
        conn.execute("PRAGMA synchronous=FULL")
        _pragmas(conn)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open {path}: {exc}") from exc
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The highest migration applied (0 for an empty database)."""
    try:
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0] or 0)


def connect_readonly(path: Path | str) -> sqlite3.Connection:
    """A connection that cannot write, on a store at this code's schema version."""
    if not Path(path).exists():
        raise StoreError(f"no store at {path}: has the daemon run yet?")
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True,
                               timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        _pragmas(conn)
        version = schema_version(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path} for reading: {exc}") from exc
    if version != SCHEMA_VERSION:
        conn.close()
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}, this energy-monitor needs "
                f"{SCHEMA_VERSION}: start the daemon (energy-monitor run) once to migrate it")
        raise StoreError(
            f"{path} has schema version {version}, newer than this energy-monitor knows "
            f"({SCHEMA_VERSION}): use the energy-monitor that runs the daemon")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; returns the schema version now in force."""
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at REAL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        version = max(done, default=0)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store has schema version {version}, newer than this energy-monitor "
                f"knows ({SCHEMA_VERSION}); refusing to run an older daemon on it")
        for number, sql in sorted(MIGRATIONS):
            if number in done:
                continue
            # executescript commits first; wrap the script so it applies whole or not at all
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\n"
                f"INSERT INTO schema_migrations VALUES ({int(number)}, {time.time()!r});\nCOMMIT;"
            )
            version = number
    except sqlite3.Error as exc:
        raise StoreError(f"cannot migrate the store: {exc}") from exc
    return version


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any exception."""
    if conn.in_transaction:
        raise StoreError("a write transaction cannot start inside another transaction")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: every SELECT inside sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")

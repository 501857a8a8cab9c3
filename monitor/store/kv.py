"""The ``kv`` table: small named values that must survive a restart.

One writer for the table (this module); each user owns a key prefix, so two
packages never write the same key:

==========================  =========================================  ===============
key or prefix               what                                       owner
==========================  =========================================  ===============
``mqtt.filters``            filters ever subscribed (to unsubscribe)   monitor.app
``export.alert``            InfluxDB refuses our writes (alert open)   monitor.app
``store.alert``             intake commits failing (alert open)        monitor.app
``export.readings``,        InfluxDB export cursors                    monitor.outputs
``export.outbox``
``webhooks.hold.<hook>``    a failing webhook's hold-until time        monitor.outputs
``audit.head``              the audit chain's anchor                   monitor.store
``check.last``              the time of the last check (``status``)     monitor.rules
==========================  =========================================  ===============

All functions take the caller's connection and run inside the caller's
transaction (writes need one: see :func:`monitor.store.db.transaction`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping


def get(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return default if row is None else str(row[0])


def put(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def put_many(conn: sqlite3.Connection, values: Mapping[str, str]) -> None:
    conn.executemany("INSERT INTO kv (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                     list(values.items()))


def delete(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM kv WHERE key = ?", (key,))

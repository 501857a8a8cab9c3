"""Every SQL statement of the orders layer: tables ``orders`` and ``order_meters`` (owned
here, see :data:`monitor.store.schema.TABLES`) and the two it reads, ``meters`` (last
power) and ``alert_state`` (rules still in breach).

Plain functions over a connection the caller owns; none of them commits.  The
other modules of :mod:`monitor.act` call these and write no SQL themselves.
``order_meters`` holds, per meter and mode (live / dry run), the id of the order
in force for it: the latest non-refused order that names it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from monitor.act.model import NO_METER, OFF_ACTIONS, REFUSED, MeterPower, Order, dumps

_COLS = ("order_id, action, scope, meters, rule, reason, issued_at, state, resends, deadline,"
         " target_kw, actor, dry_run, updated_at, publish_due, published_at, data")
_OFF = ", ".join(f"'{a}'" for a in OFF_ACTIONS)
#: "leave this column alone" for :func:`update`'s ``publish_due`` (``None`` clears it)
UNSET: Any = object()


def _order(row: Sequence[Any]) -> Order:
    (oid, action, scope, meters, rule, reason, issued_at, state, resends, deadline, target_kw,
     actor, dry_run, updated_at, publish_due, published_at, data) = row
    try:
        names = json.loads(meters or "[]")
    except ValueError:
        names = []
    try:
        extra = json.loads(data or "{}")
    except ValueError:
        extra = {}
    return Order(
        order_id=str(oid), action=str(action), scope=str(scope),
        meters=tuple(str(m) for m in names) if isinstance(names, list) else (),
        rule=str(rule), reason=str(reason), issued_at=float(issued_at), state=str(state),
        resends=int(resends), deadline=None if deadline is None else float(deadline),
        target_kw=None if target_kw is None else float(target_kw), actor=str(actor),
        dry_run=bool(dry_run), updated_at=float(updated_at),
        publish_due=None if publish_due is None else float(publish_due),
        published_at=None if published_at is None else float(published_at),
        data=extra if isinstance(extra, dict) else {},
    )


# --------------------------------------------------------------------------- orders: reads


def get(conn: sqlite3.Connection, order_id: str) -> Order | None:
    """The order ``order_id``, or ``None``."""
    row = conn.execute(f"SELECT {_COLS} FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    return None if row is None else _order(row)


def newest(conn: sqlite3.Connection, limit: int) -> list[Order]:
    """The newest ``limit`` orders, newest first."""
    rows = conn.execute(f"SELECT {_COLS} FROM orders ORDER BY issued_at DESC, order_id DESC"
                        " LIMIT ?", (max(0, limit),)).fetchall()
    return [_order(r) for r in rows]


def recent(conn: sqlite3.Connection, scope: str, dry_run: bool,
           since: float) -> tuple[int, float | None]:
    """How many orders (refused ones aside) ``scope`` had after ``since``, and the
    issue time of the oldest of them (the rate limit's window)."""
    count, first = conn.execute(
        "SELECT count(*), min(issued_at) FROM orders WHERE scope = ? AND dry_run = ?"
        " AND issued_at > ? AND state != ?", (scope, int(dry_run), since, REFUSED)).fetchone()
    return int(count), None if first is None else float(first)


def last_refused(conn: sqlite3.Connection, scope: str, action: str, dry_run: bool,
                 since: float) -> Order | None:
    """The latest refused ``action`` order of ``scope`` issued after ``since``."""
    row = conn.execute(
        f"SELECT {_COLS} FROM orders WHERE scope = ? AND action = ? AND dry_run = ?"
        " AND state = ? AND issued_at > ? ORDER BY issued_at DESC, order_id DESC LIMIT 1",
        (scope, action, int(dry_run), REFUSED, since)).fetchone()
    return None if row is None else _order(row)


def actions_and_states(conn: sqlite3.Connection,
                       order_ids: Iterable[str]) -> list[tuple[str, str]]:
    """``(action, state)`` of each of ``order_ids`` that exists."""
    ids = tuple(order_ids)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    return [(str(a), str(s)) for a, s in conn.execute(
        f"SELECT action, state FROM orders WHERE order_id IN ({marks})", ids)]


def live(conn: sqlite3.Connection, states: Sequence[str]) -> list[Order]:
    """Live-mode orders in one of ``states`` or still in force for some meter, oldest first."""
    marks = ",".join("?" * len(states))
    rows = conn.execute(
        f"SELECT {_COLS} FROM orders WHERE dry_run = 0 AND (state IN ({marks}) OR order_id IN"
        " (SELECT order_id FROM order_meters WHERE dry_run = 0))"
        " ORDER BY issued_at, order_id", tuple(states)).fetchall()
    return [_order(r) for r in rows]


def publication_due(conn: sqlite3.Connection, now: float) -> list[Order]:
    """Live-mode orders whose ``publish_due`` is at or before ``now``, oldest first."""
    rows = conn.execute(
        f"SELECT {_COLS} FROM orders WHERE publish_due IS NOT NULL AND publish_due <= ?"
        " AND dry_run = 0 ORDER BY issued_at, order_id", (now,)).fetchall()
    return [_order(r) for r in rows]


# --------------------------------------------------------------------------- orders: writes


def insert(conn: sqlite3.Connection, o: Order) -> None:
    """Add the row of ``o``."""
    conn.execute(
        f"INSERT INTO orders ({_COLS}) VALUES ({', '.join('?' * 17)})",
        (o.order_id, o.action, o.scope, dumps(list(o.meters)), o.rule, o.reason, o.issued_at,
         o.state, o.resends, o.deadline, o.target_kw, o.actor, int(o.dry_run), o.updated_at,
         o.publish_due, o.published_at, dumps(dict(o.data))))


def update(conn: sqlite3.Connection, order_id: str, now: float, *, state: str | None = None,
           resends: int | None = None, deadline: float | None = None,
           publish_due: Any = UNSET, data: Mapping[str, Any] | None = None) -> None:
    """Change the given columns of one order (and ``updated_at`` to ``now``)."""
    sets: list[str] = ["updated_at = ?"]
    args: list[Any] = [now]
    if state is not None:
        sets.append("state = ?")
        args.append(state)
    if resends is not None:
        sets.append("resends = ?")
        args.append(resends)
    if deadline is not None:
        sets.append("deadline = ?")
        args.append(deadline)
    if publish_due is not UNSET:
        sets.append("publish_due = ?")
        args.append(publish_due)
    if data is not None:
        sets.append("data = ?")
        args.append(dumps(dict(data)))
    conn.execute(f"UPDATE orders SET {', '.join(sets)} WHERE order_id = ?", (*args, order_id))


def mark_published(conn: sqlite3.Connection, o: Order, at: float | None) -> None:
    """The publication of ``o`` is done: clear ``publish_due``; ``at`` (the broker's
    acknowledgement) becomes ``published_at`` unless ``None`` (nothing was sent).

    Compare-and-set on ``publish_due``: a re-send scheduled meanwhile keeps its own."""
    if at is not None:
        conn.execute("UPDATE orders SET publish_due = NULL, published_at = ? WHERE"
                     " order_id = ? AND publish_due = ?", (at, o.order_id, o.publish_due))
    else:
        conn.execute("UPDATE orders SET publish_due = NULL WHERE order_id = ?"
                     " AND publish_due = ?", (o.order_id, o.publish_due))


def postpone_publication(conn: sqlite3.Connection, o: Order, due: float) -> None:
    """Try the publication of ``o`` again at ``due`` (compare-and-set, as above)."""
    conn.execute("UPDATE orders SET publish_due = ? WHERE order_id = ? AND publish_due = ?",
                 (due, o.order_id, o.publish_due))


# --------------------------------------------------------------------------- order_meters


def hold(conn: sqlite3.Connection, meters: Sequence[str], dry_run: bool, order_id: str) -> None:
    """``order_id`` becomes the order in force for ``meters`` (none: :data:`NO_METER`)."""
    conn.executemany(
        "INSERT INTO order_meters (meter, dry_run, order_id) VALUES (?, ?, ?)"
        " ON CONFLICT (meter, dry_run) DO UPDATE SET order_id = excluded.order_id",
        [(m, int(dry_run), order_id) for m in (meters or (NO_METER,))])


def owners(conn: sqlite3.Connection, dry_run: bool) -> dict[str, str]:
    """meter -> the id of the order in force for it."""
    return {str(m): str(o) for m, o in conn.execute(
        "SELECT meter, order_id FROM order_meters WHERE dry_run = ?", (int(dry_run),))}


def held_off(conn: sqlite3.Connection, dry_run: bool, states: Sequence[str]) -> set[str]:
    """Meters whose order in force is an off order in one of ``states``."""
    marks = ",".join("?" * len(states))
    return {str(r[0]) for r in conn.execute(
        "SELECT om.meter FROM order_meters om JOIN orders o ON o.order_id = om.order_id"
        f" WHERE om.dry_run = ? AND o.action IN ({_OFF}) AND o.state IN ({marks})",
        (int(dry_run), *states))}


def held_by(conn: sqlite3.Connection, dry_run: bool, rule: str, scope: str,
            dead_states: Sequence[str]) -> dict[str, str]:
    """meter -> order id, for the meters that off orders of ``rule`` on ``scope`` (in no
    state of ``dead_states``) still hold; the no-meter key is left out."""
    marks = ",".join("?" * len(dead_states))
    rows = conn.execute(
        "SELECT om.meter, o.order_id FROM order_meters om JOIN orders o"
        " ON o.order_id = om.order_id WHERE om.dry_run = ? AND o.rule = ? AND o.scope = ?"
        f" AND o.action IN ({_OFF}) AND o.state NOT IN ({marks})",
        (int(dry_run), rule, scope, *dead_states)).fetchall()
    return {str(m): str(o) for m, o in rows if m != NO_METER}


# --------------------------------------------------------------------------- other tables (read)


def meter_ids(conn: sqlite3.Connection) -> tuple[str, ...]:
    """Every meter the store has seen, by id."""
    return tuple(str(r[0]) for r in conn.execute("SELECT id FROM meters ORDER BY id"))


def meter_devices(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every meter the store has seen, as (id, device)."""
    return [(str(i), str(d)) for i, d in conn.execute("SELECT id, device FROM meters")]


def power(conn: sqlite3.Connection) -> dict[str, MeterPower]:
    """Every meter's last power and time, as the intake last committed them."""
    return {
        str(mid): MeterPower(None if p is None else float(p),
                             None if seen is None else float(seen))
        for mid, p, seen in conn.execute("SELECT id, power_w, last_seen FROM meters")
    }


def breaches(conn: sqlite3.Connection, rule: str, scope: str) -> list[tuple[str, str]]:
    """``(rule, scope)`` of every alert in breach other than ``rule`` on ``scope``."""
    return [(str(r), str(s)) for r, s in conn.execute(
        "SELECT rule, scope FROM alert_state WHERE state = 'breach'"
        " AND NOT (rule = ? AND scope = ?) ORDER BY rule, scope", (rule, scope))]

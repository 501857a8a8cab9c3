"""The webhook outbox: every SQL statement on ``events`` and ``webhook_deliveries``.

:func:`enqueue` runs inside the caller's transaction (the step that raised the
event): it writes the event to ``events`` and one ``webhook_deliveries`` row per
webhook whose ``events`` filters match.  Once that transaction commits, the event
survives any crash and will be delivered.  The sender
(:mod:`monitor.outputs.webhooks.send`) reads due rows and records each attempt
with the functions below; none of them commits, the caller's transaction does.

A delivery row is keyed by ``(event_id, webhook)`` where ``webhook`` is
:func:`webhook_key`, a stable id derived from the webhook's URL, format and
chat id (not its secret, so a rotated secret keeps the backlog).  Delivery
states: ``pending`` -> ``delivered`` | ``undeliverable`` (older than the
webhook's ``max_age_s``, or its webhook was removed from the configuration).
For finished rows ``next_at`` holds the time of the final state change.  A
webhook whose endpoint failed is held as a whole until a time kept in ``kv``
(``webhooks.hold.<key>``).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import math
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from monitor.config import WebhookConfig
from monitor.core.timefmt import parse_rfc3339, rfc3339
from monitor.store import kv
from monitor.store.audit import canonical_json

PENDING = "pending"
DELIVERED = "delivered"
UNDELIVERABLE = "undeliverable"


class WebhookError(Exception):
    """Root of the webhook errors."""


class EventError(WebhookError, ValueError):
    """An event passed to :func:`enqueue` cannot be sent (no kind, bad time)."""


# --------------------------------------------------------------------------- webhooks


def webhook_key(webhook: WebhookConfig) -> str:
    """The stable id of a webhook in ``webhook_deliveries.webhook``.

    ``sha256(url + "\\n" + format + "\\n" + chat_id)[:16]`` in hex: two Telegram
    chats share a bot URL but are two webhooks; the secret is left out so that
    rotating it keeps the pending deliveries.  Changing the URL makes a new
    webhook (the old one's pending rows become undeliverable).
    """
    ident = f"{webhook.url}\n{webhook.format}\n{webhook.chat_id}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def describe(webhook: WebhookConfig) -> str:
    """How logs name a webhook: key and host, never the path (it may hold a token)."""
    return f"{webhook_key(webhook)} ({urlsplit(webhook.url).hostname or '?'})"


def matches(webhook: WebhookConfig, kind: str) -> bool:
    """Whether ``kind`` passes the webhook's ``events`` filters (fnmatch, case-sensitive)."""
    return any(fnmatch.fnmatchcase(kind, pattern) for pattern in webhook.events)


# --------------------------------------------------------------------------- enqueue


def _event_time(value: Any, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, bool):
        raise EventError(f"at: not a time: {value!r}")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise EventError("at: a datetime needs a time zone")
        ts = value.timestamp()
    elif isinstance(value, str):
        try:
            ts = parse_rfc3339(value)
        except ValueError as exc:
            raise EventError(f"at: {exc}") from exc
    else:
        raise EventError(f"at: not a time: {value!r}")
    if not math.isfinite(ts):
        raise EventError(f"at: not a time: {value!r}")
    return ts


def _plain(value: Any) -> Any:
    """Non-finite floats become ``null``: a NaN projection must not cost an alert."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def event_body(event: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The SPEC event body for ``event``: ``event_id`` filled in, ``at`` as RFC 3339 UTC.

    Keys other than those the SPEC names (``order_id``, ``meters`` ...) are kept.
    ``severity`` defaults to ``info``; non-finite floats become ``null``.
    Raises :class:`EventError`.
    """
    body: dict[str, Any] = _plain(event)
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind:
        raise EventError("kind: required, a non-empty string such as 'alert.firing'")
    body["event_id"] = str(body.get("event_id") or uuid.uuid4())
    body.setdefault("severity", "info")
    body["at"] = rfc3339(_event_time(event.get("at"), now))
    return body


def enqueue(
    conn: sqlite3.Connection,
    event: Mapping[str, Any],
    webhooks: Sequence[WebhookConfig],
    now: float,
) -> str:
    """Record ``event`` and queue it for every webhook whose filters match its kind.

    Runs in the caller's transaction and does not commit.  ``event`` holds the
    SPEC body fields (``kind``, ``severity``, ``site``, ``rule``, ``scope``,
    ``message``, ``value``, ``limit``, ``unit``, ``period``, ``projected``, ``at``
    ...); ``at`` may be Unix seconds, an aware datetime, RFC 3339 text or absent
    (``now``).  Returns the ``event_id`` (a uuid4 unless given).  An event whose
    ``event_id`` is already stored is not queued again (idempotent retry).
    Raises :class:`EventError` for an event without a kind or with a bad time.
    """
    body = event_body(event, now)
    try:
        text = canonical_json(body)
    except (TypeError, ValueError) as exc:
        raise EventError(f"event is not plain JSON: {exc}") from exc
    event_id = str(body["event_id"])
    kind = str(body["kind"])
    cur = conn.execute(
        "INSERT OR IGNORE INTO events (event_id, kind, severity, rule, scope, at, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            event_id,
            kind,
            str(body["severity"]),
            str(body.get("rule") or ""),
            str(body.get("scope") or ""),
            _event_time(event.get("at"), now),
            text,
        ),
    )
    if cur.rowcount == 0:
        return event_id
    keys = sorted({webhook_key(w) for w in webhooks if matches(w, kind)})
    conn.executemany(
        "INSERT OR IGNORE INTO webhook_deliveries (event_id, webhook, state, attempts, next_at, "
        "created_at) VALUES (?, ?, 'pending', 0, ?, ?)",
        [(event_id, key, now, now) for key in keys],
    )
    return event_id


# --------------------------------------------------------------------------- backlog, purge


@dataclass(frozen=True, slots=True)
class Backlog:
    """Pending deliveries: how many, and how long the oldest has waited (``None`` if none)."""

    pending: int
    oldest_age_s: float | None
    per_webhook: Mapping[str, int] = field(default_factory=dict)


def backlog(conn: sqlite3.Connection, now: float) -> Backlog:
    """The webhook outbox's size and age, for ``/metrics`` and ``/healthz``."""
    rows = conn.execute(
        "SELECT webhook, count(*), min(created_at) FROM webhook_deliveries "
        "WHERE state = 'pending' GROUP BY webhook"
    ).fetchall()
    per = {str(r[0]): int(r[1]) for r in rows}
    oldest = min((float(r[2]) for r in rows), default=None)
    return Backlog(sum(per.values()), None if oldest is None else max(0.0, now - oldest), per)


def purge(conn: sqlite3.Connection, before: float) -> int:
    """Delete finished delivery rows created before ``before``; events themselves are kept.

    Housekeeping; runs in the caller's transaction.  Returns the rows deleted.
    """
    cur = conn.execute(
        "DELETE FROM webhook_deliveries WHERE state != 'pending' AND created_at < ?", (before,)
    )
    return cur.rowcount


# --------------------------------------------------------------------------- delivery states


@dataclass(frozen=True, slots=True)
class Due:
    """A pending delivery whose time has come: the event and its stored body."""

    event_id: str
    attempts: int
    body: str


@dataclass(frozen=True, slots=True)
class Expired:
    """A pending delivery just given up as ``undeliverable``."""

    event_id: str
    webhook: str
    attempts: int
    last_error: str


def due(conn: sqlite3.Connection, key: str, now: float, limit: int) -> list[Due]:
    """Up to ``limit`` pending deliveries of webhook ``key`` due at ``now``, oldest event first."""
    rows = conn.execute(
        "SELECT d.event_id, d.attempts, e.body FROM webhook_deliveries d "
        "JOIN events e ON e.event_id = d.event_id "
        "WHERE d.state = 'pending' AND d.webhook = ? AND d.next_at <= ? "
        "ORDER BY e.id LIMIT ?",
        (key, now, limit),
    ).fetchall()
    return [Due(str(r[0]), int(r[1]), str(r[2])) for r in rows]


def expire_older(conn: sqlite3.Connection, key: str, before: float, now: float) -> list[Expired]:
    """Give up webhook ``key``'s pending deliveries created before ``before``."""
    return _expire(conn, "webhook = ? AND created_at < ?", (key, before), now, removed=False)


def expire_removed(conn: sqlite3.Connection, known: Sequence[str], now: float) -> list[Expired]:
    """Give up every pending delivery of a webhook not in ``known`` (no longer configured)."""
    keys = sorted(known)
    cond = f"webhook NOT IN ({', '.join('?' * len(keys))})" if keys else "1"
    return _expire(conn, cond, tuple(keys), now, removed=True)


def _expire(conn: sqlite3.Connection, cond: str, params: tuple[Any, ...], now: float,
            *, removed: bool) -> list[Expired]:
    rows = [Expired(str(r[0]), str(r[1]), int(r[2]), str(r[3] or "")) for r in conn.execute(
        f"SELECT event_id, webhook, attempts, last_error FROM webhook_deliveries "
        f"WHERE state = 'pending' AND {cond} ORDER BY created_at",
        params,
    )]
    conn.executemany(
        "UPDATE webhook_deliveries SET state = 'undeliverable', next_at = ?, "
        "last_error = ? WHERE event_id = ? AND webhook = ? AND state = 'pending'",
        [(now, _expired_reason(r.last_error, removed), r.event_id, r.webhook) for r in rows],
    )
    return rows


def _expired_reason(last_error: str, removed: bool) -> str:
    why = "webhook no longer configured" if removed else "older than max_age_s"
    return f"{why}; last error: {last_error}"[:500] if last_error else why


def delivered(conn: sqlite3.Connection, key: str, event_id: str, attempts: int,
              now: float) -> None:
    """Event ``event_id`` reached webhook ``key`` at attempt ``attempts``."""
    conn.execute(
        "UPDATE webhook_deliveries SET state = 'delivered', attempts = ?, "
        "next_at = ?, last_error = '' WHERE event_id = ? AND webhook = ?",
        (attempts, now, event_id, key),
    )


def retry_later(conn: sqlite3.Connection, key: str, event_id: str, attempts: int,
                next_at: float, error: str) -> None:
    """A failed attempt of this row alone: try it again at ``next_at``."""
    conn.execute(
        "UPDATE webhook_deliveries SET attempts = ?, next_at = ?, last_error = ? "
        "WHERE event_id = ? AND webhook = ? AND state = 'pending'",
        (attempts, next_at, error[:500], event_id, key),
    )


def hold(conn: sqlite3.Connection, key: str, event_id: str, attempts: int, until: float,
         error: str) -> None:
    """A failed attempt that holds webhook ``key``'s whole queue until ``until``: this row,
    every pending row due earlier, and (through ``kv``) rows queued during the wait."""
    retry_later(conn, key, event_id, attempts, until, error)
    conn.execute(
        "UPDATE webhook_deliveries SET next_at = ? "
        "WHERE state = 'pending' AND webhook = ? AND next_at < ?",
        (until, key, until),
    )
    kv.put(conn, _hold_key(key), repr(until))


def held_until(conn: sqlite3.Connection, key: str) -> float | None:
    """Until when webhook ``key`` is held (it failed), or ``None``."""
    value = kv.get(conn, _hold_key(key))
    return None if value is None else float(value)


def _hold_key(key: str) -> str:
    """``kv`` key of the time until which webhook ``key`` is not called (it failed)."""
    return f"webhooks.hold.{key}"

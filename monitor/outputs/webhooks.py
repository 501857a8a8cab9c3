"""Webhook events: a durable outbox in SQLite and an at-least-once sender.

Two halves, two threads:

* :func:`enqueue` runs inside the caller's transaction (the actions step): it
  writes the event to ``events`` and one ``webhook_deliveries`` row per webhook
  whose ``events`` filters match.  Once that transaction commits, the event
  survives any crash and will be delivered.
* :class:`WebhookSender` runs on a scheduler job thread: :meth:`~WebhookSender.deliver_due`
  POSTs what is due, oldest first per webhook, records the outcome of every
  attempt, and schedules retries with exponential backoff and jitter.

A delivery row is keyed by ``(event_id, webhook)`` where ``webhook`` is
:func:`webhook_key`, a stable id derived from the webhook's URL, format and
chat id (not its secret, so a rotated secret keeps the backlog).  Delivery
states: ``pending`` -> ``delivered`` | ``undeliverable`` (older than the
webhook's ``max_age_s``, or its webhook was removed from the configuration).
For finished rows ``next_at`` holds the time of the final state change.

Webhook URLs often carry credentials (Telegram bot tokens, Slack webhook
paths), so logs name a webhook by its key and host only; secrets and full URLs
are never logged.  See ``docs/webhooks.md`` for the receiver's side.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import hmac
import html
import http.client
import json
import logging
import math
import random
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from monitor.config import WebhookConfig
from monitor.core.timefmt import parse_rfc3339, rfc3339
from monitor.outputs.retry import Backoff, retry_after_s
from monitor.store import db as store_db
from monitor.store import kv
from monitor.store.audit import canonical_json

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "X-Energy-Monitor-Event-Id"
SIGNATURE_HEADER = "X-Energy-Monitor-Signature"
USER_AGENT = "energy-monitor-webhooks/1"

PENDING = "pending"
DELIVERED = "delivered"
UNDELIVERABLE = "undeliverable"

# Outcomes passed to the ``on_outcome`` callback (one call per attempt or expiry).
OUTCOME_DELIVERED = "delivered"
OUTCOME_FAILED = "failed"  # connection error, timeout, 5xx, 408, 429: the endpoint is unwell
OUTCOME_REJECTED = "rejected"  # other 4xx and 3xx: looks permanent, retried slowly
OUTCOME_UNDELIVERABLE = "undeliverable"

TELEGRAM_MAX_CHARS = 4096
SEVERITY_EMOJI = {"critical": "\U0001f6a8", "warning": "\u26a0\ufe0f", "info": "\u2139\ufe0f"}
RESOLVED_EMOJI = "\u2705"


class WebhookError(Exception):
    """Root of this module's errors."""


class EventError(WebhookError, ValueError):
    """An event passed to :func:`enqueue` cannot be sent (no kind, bad time)."""


class TransportError(WebhookError):
    """The request did not get an HTTP response (refused, reset, timeout, DNS, TLS)."""


# --------------------------------------------------------------------------- enqueue


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


# --------------------------------------------------------------------------- backlog


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


# --------------------------------------------------------------------------- bodies


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def summary(body: Mapping[str, Any]) -> tuple[str, str]:
    """A readable (headline, detail) pair for chat formats."""
    kind = str(body.get("kind", "event"))
    severity = str(body.get("severity", "info"))
    emoji = RESOLVED_EMOJI if kind.endswith((".resolved", ".recovered", ".confirmed")) else (
        SEVERITY_EMOJI.get(severity, SEVERITY_EMOJI["info"])
    )
    where = " · ".join(
        str(body[k]) for k in ("site", "rule", "scope") if body.get(k) not in (None, "")
    )
    headline = f"{emoji} {severity.upper()} {kind}" + (f" · {where}" if where else "")
    lines = [str(body["message"])] if body.get("message") else []
    unit = f" {body['unit']}" if body.get("unit") else ""
    if body.get("value") is not None and body.get("limit") is not None:
        figures = f"value {_number(body['value'])} / limit {_number(body['limit'])}{unit}"
        if body.get("projected") is not None:
            figures += f", projected {_number(body['projected'])}{unit}"
        lines.append(figures)
    lines.append(f"at {body.get('at', '?')} · event {body.get('event_id', '?')}")
    return headline, "\n".join(lines)


def slack_escape(text: str) -> str:
    """Slack's three control characters (its docs: escape &, <, > in ``text``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(webhook: WebhookConfig, body_text: str) -> bytes:
    """The request body for ``webhook``.  ``json``: the stored event body, byte for byte."""
    if webhook.format == "json":
        return body_text.encode()
    body = json.loads(body_text)
    headline, detail = summary(body)
    if webhook.format == "slack":
        payload: dict[str, Any] = {"text": slack_escape(f"{headline}\n{detail}")}
    else:  # telegram: Bot API sendMessage, HTML with every dynamic part escaped
        head = f"<b>{html.escape(headline[:200], quote=False)}</b>\n"
        text = head + html.escape(detail, quote=False)
        keep = len(detail)
        while len(text) > TELEGRAM_MAX_CHARS:  # escaping can only lengthen: shrink until it fits
            keep -= len(text) - TELEGRAM_MAX_CHARS + 1
            text = head + html.escape(detail[:keep], quote=False) + "\u2026"
        payload = {
            "chat_id": webhook.chat_id,
            "text": text,
            "parse_mode": "HTML",
            "disable_web_page_preview": True,
        }
    return canonical_json(payload).encode()


def signature(secret: str, raw_body: bytes) -> str:
    """The ``X-Energy-Monitor-Signature`` value: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def request_headers(webhook: WebhookConfig, event_id: str, raw_body: bytes) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: event_id,
    }
    if webhook.secret is not None and webhook.secret.get_secret_value():
        headers[SIGNATURE_HEADER] = signature(webhook.secret.get_secret_value(), raw_body)
    return headers


# --------------------------------------------------------------------------- transport


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


HttpPost = Callable[[str, bytes, Mapping[str, str], float], HttpResponse]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: urllib would turn a POST into a body-less GET and report 2xx."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def urllib_post(
    url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
) -> HttpResponse:
    """POST with :mod:`urllib.request`.  Any HTTP status is returned; no response raises
    :class:`TransportError` (whose message never contains the URL)."""
    req = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 -- config allows only http(s) URLs
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            data = resp.read(4096)
            return HttpResponse(int(resp.status), _lower(resp.headers), data)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            data = exc.read(4096) if exc.fp is not None else b""
        return HttpResponse(int(exc.code), _lower(exc.headers), data)
    except urllib.error.URLError as exc:
        raise TransportError(_reason(exc.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise TransportError(_reason(exc)) from None


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()} if headers is not None else {}


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return text[:200]


# --------------------------------------------------------------------------- sender


@dataclass
class DeliveryStats:
    """What one :meth:`WebhookSender.deliver_due` call did (attempts, not events)."""

    delivered: int = 0
    failed: int = 0  # endpoint-level failures: no response, 5xx, 408, 429
    rejected: int = 0  # other 4xx and 3xx
    undeliverable: int = 0
    undeliverable_events: list[tuple[str, str]] = field(default_factory=list)  # (event_id, key)

    def add(self, other: DeliveryStats) -> None:
        self.delivered += other.delivered
        self.failed += other.failed
        self.rejected += other.rejected
        self.undeliverable += other.undeliverable
        self.undeliverable_events.extend(other.undeliverable_events)


@dataclass(frozen=True, slots=True)
class _Due:
    event_id: str
    attempts: int
    body: str


Connect = Callable[[], sqlite3.Connection]


class WebhookSender:
    """Delivers the webhook outbox.  Call :meth:`deliver_due` from one scheduler job.

    ``db`` is a database path or a factory returning a *new* connection each
    call (the sender closes it); every webhook is served by its own thread and
    connection within a call, so a slow or dead endpoint delays only itself.

    Retry policy (per webhook, oldest event first):

    * 2xx: delivered.
    * no response (refused, reset, timeout), 5xx, 408, 429: the endpoint is
      unwell; the failing row and every pending row of that webhook wait until
      ``Retry-After`` (429/503, capped at ``retry_after_cap_s``) or an
      exponential backoff ``backoff_base_s * 2**(attempts-1)`` capped at
      ``backoff_cap_s``, with equal jitter (half fixed, half random).  Order is
      kept: nothing newer overtakes the failing row, not even an event queued
      during the wait (the hold is kept in ``kv`` as ``webhooks.hold.<key>``).
    * other 4xx and 3xx (redirects are not followed): the request itself looks
      unwanted, which may still be a proxy's transient 404; that row alone is
      retried on the slower schedule ``rejected_base_s`` .. ``rejected_cap_s``
      and the webhook's round stops, so newer events are not held back and the
      endpoint sees at most one such request per webhook per call.
    * a row older than the webhook's ``max_age_s`` becomes ``undeliverable``
      (logged, counted, listed in the returned stats so the daemon can alert).

    ``on_outcome(outcome)`` is called once per attempt (``delivered``,
    ``failed``, ``rejected``) and per expired row (``undeliverable``); it must be
    cheap and thread-safe.  Nothing is held between calls: a new sender on the
    same database continues where the last one stopped.
    """

    def __init__(
        self,
        webhooks: Sequence[WebhookConfig],
        db: str | Path | Connect,
        *,
        on_outcome: Callable[[str], None] | None = None,
        backoff_base_s: float = 5.0,
        backoff_cap_s: float = 600.0,
        rejected_base_s: float = 60.0,
        rejected_cap_s: float = 3600.0,
        retry_after_cap_s: float = 3600.0,
        max_workers: int = 8,
        _http_post: HttpPost = urllib_post,
        _clock: Callable[[], float] = time.time,
        _random: Callable[[], float] = random.random,
    ) -> None:
        self.webhooks = {webhook_key(w): w for w in webhooks}
        if callable(db):
            self._connect: Connect = db
        else:
            path = str(db)
            self._connect = lambda: store_db.connect(path)
        self._on_outcome = on_outcome
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.rejected_base_s = rejected_base_s
        self.rejected_cap_s = rejected_cap_s
        self.retry_after_cap_s = retry_after_cap_s
        self.max_workers = max(1, max_workers)
        self._post = _http_post
        self._clock = _clock
        self._random = _random

    # ------------------------------------------------------------------ public

    def deliver_due(self, now: float | None = None, limit: int = 100) -> DeliveryStats:
        """Expire old rows, then POST up to ``limit`` due rows per webhook.  Blocking.

        Called from the scheduler's webhook job (one call at a time); returns
        when every webhook's round is over (bounded by ``limit`` x ``timeout_s``
        for the slowest webhook).  Database errors of one webhook are logged and
        do not stop the others; an error opening the database raises
        :class:`sqlite3.Error`.
        """
        now = self._clock() if now is None else now
        stats = DeliveryStats()
        conn = self._connect()
        try:
            stats.add(self._expire(conn, now))
        finally:
            conn.close()
        if not self.webhooks:
            return stats
        workers = min(self.max_workers, len(self.webhooks))
        with ThreadPoolExecutor(workers, thread_name_prefix="webhook") as pool:
            futures = [
                pool.submit(self._round, key, hook, now, limit)
                for key, hook in self.webhooks.items()
            ]
            for future in futures:
                stats.add(future.result())
        return stats

    def backlog(self, now: float | None = None) -> Backlog:
        """:func:`backlog` over a connection of its own."""
        conn = self._connect()
        try:
            return backlog(conn, self._clock() if now is None else now)
        finally:
            conn.close()

    # ------------------------------------------------------------------ internals

    def _emit(self, outcome: str, n: int = 1) -> None:
        if self._on_outcome is None:
            return
        for _ in range(n):
            try:
                self._on_outcome(outcome)
            except Exception:
                log.exception("webhook metrics callback failed")

    def _expire(self, conn: sqlite3.Connection, now: float) -> DeliveryStats:
        stats = DeliveryStats()
        targets: list[tuple[str, str, tuple[Any, ...], bool]] = [
            (
                f"webhook {describe(hook)}",
                "webhook = ? AND created_at < ?",
                (key, now - hook.max_age_s),
                False,
            )
            for key, hook in self.webhooks.items()
        ]
        known = sorted(self.webhooks)
        targets.append((
            "webhooks no longer configured",
            f"webhook NOT IN ({', '.join('?' * len(known))})" if known else "1",
            tuple(known),
            True,
        ))
        for what, cond, params, removed in targets:
            with store_db.transaction(conn):
                rows = conn.execute(
                    f"SELECT event_id, webhook, attempts, last_error FROM webhook_deliveries "
                    f"WHERE state = 'pending' AND {cond} ORDER BY created_at",
                    params,
                ).fetchall()
                if not rows:
                    continue
                conn.executemany(
                    "UPDATE webhook_deliveries SET state = 'undeliverable', next_at = ?, "
                    "last_error = ? WHERE event_id = ? AND webhook = ? AND state = 'pending'",
                    [
                        (now, _expired_reason(str(r[3]), removed), r[0], r[1])
                        for r in rows
                    ],
                )
            stats.undeliverable += len(rows)
            stats.undeliverable_events.extend((str(r[0]), str(r[1])) for r in rows)
            log.error(
                "%s: %d deliveries given up as undeliverable (oldest event %s, "
                "%d attempts, last error: %s)",
                what, len(rows), rows[0][0], rows[0][2], rows[0][3] or "none",
            )
        self._emit(OUTCOME_UNDELIVERABLE, stats.undeliverable)
        return stats

    def _round(self, key: str, hook: WebhookConfig, now: float, limit: int) -> DeliveryStats:
        stats = DeliveryStats()
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("webhook %s: cannot open the database", describe(hook))
            return stats
        try:
            # the endpoint is unwell: its whole queue waits, including events queued
            # after the failure (they were not there when _postpone moved next_at)
            held = kv.get(conn, _hold_key(key))
            if held is not None and float(held) > now:
                return stats
            rows = conn.execute(
                "SELECT d.event_id, d.attempts, e.body FROM webhook_deliveries d "
                "JOIN events e ON e.event_id = d.event_id "
                "WHERE d.state = 'pending' AND d.webhook = ? AND d.next_at <= ? "
                "ORDER BY e.id LIMIT ?",
                (key, now, limit),
            ).fetchall()
            for event_id, attempts, body in rows:
                due = _Due(event_id, attempts, body)
                if not self._attempt(conn=conn, key=key, hook=hook, due=due, now=now,
                                     stats=stats):
                    break
        except sqlite3.Error:
            log.exception("webhook %s: database error during delivery", describe(hook))
        finally:
            conn.close()
        return stats

    def _attempt(
        self,
        *,
        conn: sqlite3.Connection,
        key: str,
        hook: WebhookConfig,
        due: _Due,
        now: float,
        stats: DeliveryStats,
    ) -> bool:
        """POST one row and record the outcome; ``False`` ends this webhook's round."""
        raw = render(hook, due.body)
        headers = request_headers(hook, due.event_id, raw)
        attempts = due.attempts + 1
        try:
            resp = self._post(hook.url, raw, headers, hook.timeout_s)
        except TransportError as exc:
            error = _scrub(str(exc), hook.url)
            self._postpone(conn=conn, key=key, event_id=due.event_id, attempts=attempts,
                           delay_s=self._backoff(attempts), now=now, error=error)
            stats.failed += 1
            self._emit(OUTCOME_FAILED)
            log.warning("webhook %s: event %s not delivered (attempt %d): %s",
                        describe(hook), due.event_id, attempts, error)
            return False
        status = resp.status
        if 200 <= status < 300:
            with store_db.transaction(conn):
                conn.execute(
                    "UPDATE webhook_deliveries SET state = 'delivered', attempts = ?, "
                    "next_at = ?, last_error = '' WHERE event_id = ? AND webhook = ?",
                    (attempts, now, due.event_id, key),
                )
            stats.delivered += 1
            self._emit(OUTCOME_DELIVERED)
            log.debug("webhook %s: event %s delivered", describe(hook), due.event_id)
            return True
        error = f"HTTP {status}"
        snippet = resp.body[:200].decode("utf-8", "replace").strip()
        if snippet:
            error += f": {_scrub(snippet, hook.url)}"
        if status >= 500 or status in (408, 429):
            delay = self._backoff(attempts)
            if status in (429, 503):
                hint = retry_after_s(resp.headers.get("retry-after"), now,
                                     self.retry_after_cap_s)
                if hint is None and hook.format == "telegram":
                    hint = _telegram_retry_after(resp.body)
                if hint is not None:
                    delay = hint
            self._postpone(conn=conn, key=key, event_id=due.event_id, attempts=attempts,
                           delay_s=delay, now=now, error=error)
            stats.failed += 1
            self._emit(OUTCOME_FAILED)
            log.warning("webhook %s: event %s not delivered (attempt %d): %s; retry in %.0f s",
                        describe(hook), due.event_id, attempts, error, delay)
            return False
        delay = Backoff(self.rejected_base_s, self.rejected_cap_s).delay(attempts,
                                                                          self._random())
        with store_db.transaction(conn):
            conn.execute(
                "UPDATE webhook_deliveries SET attempts = ?, next_at = ?, last_error = ? "
                "WHERE event_id = ? AND webhook = ? AND state = 'pending'",
                (attempts, now + delay, error[:500], due.event_id, key),
            )
        stats.rejected += 1
        self._emit(OUTCOME_REJECTED)
        log.warning("webhook %s: event %s rejected (attempt %d): %s; retry in %.0f s",
                    describe(hook), due.event_id, attempts, error, delay)
        return False

    def _backoff(self, attempts: int) -> float:
        return Backoff(self.backoff_base_s, self.backoff_cap_s).delay(attempts, self._random())

    def _postpone(
        self,
        *,
        conn: sqlite3.Connection,
        key: str,
        event_id: str,
        attempts: int,
        delay_s: float,
        now: float,
        error: str,
    ) -> None:
        """Record a failed attempt and hold the webhook's whole queue until ``now + delay_s``."""
        retry_at = now + delay_s
        with store_db.transaction(conn):
            conn.execute(
                "UPDATE webhook_deliveries SET attempts = ?, next_at = ?, last_error = ? "
                "WHERE event_id = ? AND webhook = ? AND state = 'pending'",
                (attempts, retry_at, error[:500], event_id, key),
            )
            conn.execute(
                "UPDATE webhook_deliveries SET next_at = ? "
                "WHERE state = 'pending' AND webhook = ? AND next_at < ?",
                (retry_at, key, retry_at),
            )
            kv.put(conn, _hold_key(key), repr(retry_at))


def _hold_key(key: str) -> str:
    """``kv`` key of the time until which webhook ``key`` is not called (it failed)."""
    return f"webhooks.hold.{key}"


def _scrub(text: str, url: str) -> str:
    """Remove the URL and its path (which may hold a token) from an error text."""
    parts = urlsplit(url)
    for secret in (url, parts.path, parts.query, parts.password):
        if secret and len(secret) > 1:
            text = text.replace(secret, "<redacted>")
    return text


def _telegram_retry_after(body: bytes) -> float | None:
    try:
        value = json.loads(body)["parameters"]["retry_after"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _expired_reason(last_error: str, removed: bool) -> str:
    why = "webhook no longer configured" if removed else "older than max_age_s"
    return f"{why}; last error: {last_error}"[:500] if last_error else why



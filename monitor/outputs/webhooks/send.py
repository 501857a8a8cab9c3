"""The at-least-once webhook sender: the HTTP POST, the outcome of every attempt, the retries.

:class:`WebhookSender` runs on a scheduler job thread: :meth:`~WebhookSender.deliver_due`
POSTs what is due, oldest first per webhook, records the outcome of every
attempt in the outbox (:mod:`monitor.outputs.webhooks.outbox`), and schedules
retries with the one back-off and ``Retry-After`` policy of
:mod:`monitor.outputs.retry`.

Webhook URLs often carry credentials (Telegram bot tokens, Slack webhook
paths), so logs name a webhook by its key and host only; secrets and full URLs
are never logged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from monitor.config import WebhookConfig
from monitor.outputs.retry import Backoff, retry_after_s
from monitor.outputs.webhooks import outbox
from monitor.outputs.webhooks.outbox import Backlog, Due, WebhookError, describe, webhook_key
from monitor.outputs.webhooks.render import render, request_headers
from monitor.store import db as store_db

log = logging.getLogger(__name__)

# Outcomes passed to the ``on_outcome`` callback (one call per attempt or expiry).
OUTCOME_DELIVERED = "delivered"
OUTCOME_FAILED = "failed"  # connection error, timeout, 5xx, 408, 429: the endpoint is unwell
OUTCOME_REJECTED = "rejected"  # other 4xx and 3xx: looks permanent, retried slowly
OUTCOME_UNDELIVERABLE = "undeliverable"


class TransportError(WebhookError):
    """The request did not get an HTTP response (refused, reset, timeout, DNS, TLS)."""


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
        """:func:`~monitor.outputs.webhooks.outbox.backlog` over a connection of its own."""
        conn = self._connect()
        try:
            return outbox.backlog(conn, self._clock() if now is None else now)
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
        targets: list[tuple[str, WebhookConfig | None]] = [
            (f"webhook {describe(hook)}", hook) for hook in self.webhooks.values()]
        targets.append(("webhooks no longer configured", None))
        for what, hook in targets:
            with store_db.transaction(conn):
                if hook is None:
                    rows = outbox.expire_removed(conn, list(self.webhooks), now)
                else:
                    rows = outbox.expire_older(conn, webhook_key(hook), now - hook.max_age_s,
                                               now)
            if not rows:
                continue
            stats.undeliverable += len(rows)
            stats.undeliverable_events.extend((r.event_id, r.webhook) for r in rows)
            log.error(
                "%s: %d deliveries given up as undeliverable (oldest event %s, "
                "%d attempts, last error: %s)",
                what, len(rows), rows[0].event_id, rows[0].attempts, rows[0].last_error or "none",
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
            # after the failure (they were not there when the hold moved next_at)
            held = outbox.held_until(conn, key)
            if held is not None and held > now:
                return stats
            for due in outbox.due(conn, key, now, limit):
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
        due: Due,
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
            self._hold(conn, key, due.event_id, attempts, now + self._backoff(attempts), error)
            stats.failed += 1
            self._emit(OUTCOME_FAILED)
            log.warning("webhook %s: event %s not delivered (attempt %d): %s",
                        describe(hook), due.event_id, attempts, error)
            return False
        status = resp.status
        if 200 <= status < 300:
            with store_db.transaction(conn):
                outbox.delivered(conn, key, due.event_id, attempts, now)
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
            self._hold(conn, key, due.event_id, attempts, now + delay, error)
            stats.failed += 1
            self._emit(OUTCOME_FAILED)
            log.warning("webhook %s: event %s not delivered (attempt %d): %s; retry in %.0f s",
                        describe(hook), due.event_id, attempts, error, delay)
            return False
        delay = Backoff(self.rejected_base_s, self.rejected_cap_s).delay(attempts,
                                                                          self._random())
        with store_db.transaction(conn):
            outbox.retry_later(conn, key, due.event_id, attempts, now + delay, error)
        stats.rejected += 1
        self._emit(OUTCOME_REJECTED)
        log.warning("webhook %s: event %s rejected (attempt %d): %s; retry in %.0f s",
                    describe(hook), due.event_id, attempts, error, delay)
        return False

    def _backoff(self, attempts: int) -> float:
        return Backoff(self.backoff_base_s, self.backoff_cap_s).delay(attempts, self._random())

    @staticmethod
    def _hold(conn: sqlite3.Connection, key: str, event_id: str, attempts: int, until: float,
              error: str) -> None:
        """Record a failed attempt and hold the webhook's whole queue until ``until``."""
        with store_db.transaction(conn):
            outbox.hold(conn, key, event_id, attempts, until, error)


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

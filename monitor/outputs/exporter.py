"""Export the local store to InfluxDB (or anything that speaks its v2 write API).

What goes out (SPEC "InfluxDB line protocol"):

- ``energy_reading`` -- one line per row of ``readings``, read by rowid cursor
  (``kv['export.readings']`` holds the last exported id), tags ``format, group,
  meter, site`` from the row and its ``meters`` entry;
- every line in ``export_outbox`` (``energy_rule`` and ``energy_event`` lines that
  other modules render with :func:`rule_line` and :func:`event_line`), by id cursor
  ``kv['export.outbox']``.

Delivery contract.  A batch is written with one synchronous request; both
cursors advance in SQLite only after the server accepted it, in the same
transaction that records dead letters.  A crash or an outage therefore replays
whole batches, and the replay is harmless because every point has a fixed
series and timestamp: InfluxDB overwrites a point with the same series and time,
so a sum never doubles.  (VictoriaMetrics keeps duplicates unless it runs with
``-dedup.minScrapeInterval``; see docs/fleet.md.)

Failures:

=====================  =====================================================
connection refused,    :class:`ExportUnavailableError`; retried on later flushes
timeout, 5xx           after an exponential, jittered, capped backoff
429, 503               same, but the server's ``Retry-After`` sets the delay
400, 413, 422          :class:`ExportRejectedError`; the batch is bisected until
                       the bad lines are isolated; those go to
                       ``export_dead_letters`` with the server's reason, the
                       rest is written, and one ``export.dead_letter`` event
                       line is queued so Grafana shows it
401, 403               :class:`ExportRefusedError`; ``health`` turns unhealthy and
                       ``on_auth_failure`` is called once; retried with backoff
404                    :class:`ExportRefusedError` (bucket/database missing);
                       unhealthy, retried with backoff
=====================  =====================================================

Nothing is ever dropped for being late: the local store is authoritative.  When
more than ``max_backlog_rows`` rows wait, the exporter keeps them and reports
itself unhealthy ("backlog over limit") until it has caught up.

The token is only handed to ``influxdb-client``; it is never part of a message,
a log line or an exception raised here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from monitor.config import InfluxConfig
from monitor.outputs.lineproto import event_line, reading_line
from monitor.outputs.retry import RETRY_AFTER_CAP_S, Backoff, retry_after_s
from monitor.store import db, kv

log = logging.getLogger(__name__)

READINGS_CURSOR = "export.readings"
OUTBOX_CURSOR = "export.outbox"
DEAD_LETTER_KIND = "export.dead_letter"
MAX_RETRY_AFTER_S = RETRY_AFTER_CAP_S  # a server's Retry-After beyond this is taken as this
MAX_REASON_CHARS = 1000

# --------------------------------------------------------------------------- errors


class ExportError(Exception):
    """Root of the exporter's errors.  Messages never contain the token."""


class ExportClosedError(ExportError):
    """:meth:`Exporter.flush` was called after :meth:`Exporter.close`."""


class ExportUnavailableError(ExportError):
    """The server could not take the write now (refused, timeout, 5xx, 429): retry later."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class ExportRejectedError(ExportError):
    """The server rejected the content of the batch (400, 413, 422).  ``reason`` is its text."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class ExportRefusedError(ExportError):
    """The server refuses this client or destination: 401/403 (token) or 404 (bucket)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason

    @property
    def auth(self) -> bool:
        return self.status in (401, 403)


# --------------------------------------------------------------------------- the client boundary


class WriteClient(Protocol):
    """What the exporter needs from a client: write lines (ns precision) or raise an
    :class:`ExportError`; ``close()`` releases connections."""

    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


def _reason(body: Any, fallback: str) -> str:
    """The server's explanation: InfluxDB 2.x ``{"message"}``, 1.x ``{"error"}``, or text."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body or "").strip()
    if text.startswith("{"):
        with contextlib.suppress(ValueError, TypeError):
            doc = json.loads(text)
            if isinstance(doc, dict):
                text = str(doc.get("message") or doc.get("error") or text)
    return (text or fallback)[:MAX_REASON_CHARS]


def translate_status(status: int, reason: str, retry_after: str | None) -> ExportError:
    """Map an HTTP error status of a write to one of our exception types."""
    if status in (400, 413, 422):
        return ExportRejectedError(status, reason)
    if status in (401, 403, 404):
        return ExportRefusedError(status, reason)
    hint = retry_after_s(retry_after, time.time()) if status in (429, 503) else None
    return ExportUnavailableError(f"HTTP {status}: {reason}", status, hint)


class InfluxWriteClient:
    """:class:`WriteClient` over ``influxdb-client`` (``/api/v2/write``, synchronous).

    Works with InfluxDB 2.x/3.x, 1.8+ (org ignored, token ``user:password`` or
    none) and VictoriaMetrics.  Library exceptions are translated here and do
    not leave this class.
    """

    def __init__(self, config: InfluxConfig) -> None:
        # imported here so that a daemon without [influxdb] never loads the library
        from influxdb_client.client.influxdb_client import InfluxDBClient  # noqa: PLC0415
        from influxdb_client.client.write_api import SYNCHRONOUS  # noqa: PLC0415
        from influxdb_client.domain.write_precision import WritePrecision  # noqa: PLC0415

        self._bucket = config.bucket
        self._org = config.org
        self._precision: Any = WritePrecision.NS
        # an empty token sends no Authorization header (InfluxDB 1.x without auth)
        token = config.token.get_secret_value() if config.token is not None else ""
        self._client = InfluxDBClient(url=config.url, token=token, org=config.org,
                                      timeout=max(1, int(config.timeout_s * 1000)))
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: Sequence[str]) -> None:
        import urllib3  # noqa: PLC0415
        from influxdb_client.client.exceptions import InfluxDBError  # noqa: PLC0415

        try:
            self._write_api.write(bucket=self._bucket, org=self._org, record=list(lines),
                                  write_precision=self._precision)
        except InfluxDBError as exc:
            status = getattr(exc, "status", None)
            if status is None and getattr(exc, "response", None) is not None:
                status = getattr(exc.response, "status", None)
            headers = getattr(exc, "headers", None) or {}
            body = getattr(exc, "body", None)
            if body is None and getattr(exc, "response", None) is not None:
                body = getattr(exc.response, "data", None)
            reason = _reason(body, str(getattr(exc, "reason", "") or "error"))
            if status is None:
                raise ExportUnavailableError(f"influxdb error: {reason}") from None
            raise translate_status(int(status), reason,
                                   headers.get("Retry-After")) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ExportUnavailableError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- results, health


class ExportMetrics(Protocol):
    """Hooks the daemon implements (e.g. with Prometheus counters).  Called on the
    flushing thread; must be cheap and must not raise."""

    def written(self, lines: int, seconds: float) -> None: ...

    def failed(self, kind: str) -> None: ...

    def dead_lettered(self, lines: int) -> None: ...

    def backlog(self, backlog: Backlog) -> None: ...


class _NoMetrics:
    def written(self, lines: int, seconds: float) -> None:
        pass

    def failed(self, kind: str) -> None:
        pass

    def dead_lettered(self, lines: int) -> None:
        pass

    def backlog(self, backlog: Backlog) -> None:
        pass


@dataclass(frozen=True)
class Backlog:
    """Rows not yet exported.  Counts are ids above the cursors (ids are dense)."""

    readings: int
    outbox: int
    oldest_ts: float | None  # time of the oldest unexported reading (Unix s)
    age_s: float | None  # now - oldest_ts

    @property
    def rows(self) -> int:
        return self.readings + self.outbox


@dataclass(frozen=True)
class ExportHealth:
    healthy: bool
    reasons: tuple[str, ...]
    last_error: str | None
    consecutive_failures: int
    last_success_at: float | None  # Unix s
    retry_in_s: float


@dataclass(frozen=True)
class FlushResult:
    readings: int = 0  # readings the cursor moved over (written or dead-lettered)
    outbox: int = 0  # outbox lines the cursor moved over
    dead_letters: int = 0
    batches: int = 0  # batches committed
    requests: int = 0  # write requests sent, bisection included
    skipped: bool = False  # still backing off: nothing was tried
    more: bool = False  # stopped at max_batches with rows still waiting
    error: str | None = None
    retry_in_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped


# --------------------------------------------------------------------------- exporter

_READINGS_SQL = """
    SELECT r.id, r.meter, r.ts, r.power_w, r.energy_kwh, r.delta_kwh, r.voltage_v,
           r.current_a, coalesce(m.grp, ''), coalesce(m.format, '')
    FROM readings r LEFT JOIN meters m ON m.id = r.meter
    WHERE r.id > ? ORDER BY r.id LIMIT ?
"""


@dataclass
class _Batch:
    lines: list[str]
    last_reading: int | None
    last_outbox: int | None
    readings: int
    outbox: int


class Exporter:
    """Moves readings and outbox lines from the SQLite store to InfluxDB.

    Threads: :meth:`flush` runs on the scheduler's export job (calls are
    serialised by a lock; a final flush at shutdown may come from another
    thread).  :attr:`health` may be read from any thread and never touches the
    database; :meth:`backlog` opens its own connection and may be called from
    any thread.  After :meth:`close`, :meth:`flush` raises :class:`ExportClosedError`.

    ``db`` is the store's path, or a factory returning a *new* connection each
    call (the exporter closes it when done).
    """

    def __init__(
        self,
        config: InfluxConfig,
        site_id: str,
        db: str | Path | Callable[[], sqlite3.Connection],
        *,
        metrics: ExportMetrics | None = None,
        on_auth_failure: Callable[[str], None] | None = None,
        max_backlog_age_s: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        _client_factory: Callable[[InfluxConfig], WriteClient] = InfluxWriteClient,
        _clock: Callable[[], float] = time.monotonic,
        _now: Callable[[], float] = time.time,
        _random: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.site_id = site_id
        self._db = db
        self._metrics: ExportMetrics = metrics if metrics is not None else _NoMetrics()
        self._on_auth_failure = on_auth_failure
        self._max_backlog_age_s = max_backlog_age_s
        self._backoff = Backoff(backoff_base_s, backoff_max_s)
        self._client_factory = _client_factory
        self._clock = _clock
        self._now = _now
        self._random = _random

        self._client: WriteClient | None = None
        self._flush_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False
        self._failures = 0
        self._next_attempt = 0.0  # on _clock
        self._last_error: str | None = None
        self._last_success_at: float | None = None
        self._refused: str | None = None  # 401/403/404 reason while it lasts
        self._backlog_reasons: tuple[str, ...] = ()

    # ------------------------------------------------------------------ public

    @property
    def health(self) -> ExportHealth:
        """Healthy unless the server refuses us or the backlog is over its limits."""
        with self._state_lock:
            reasons = ((self._refused,) if self._refused else ()) + self._backlog_reasons
            return ExportHealth(
                healthy=not reasons,
                reasons=reasons,
                last_error=self._last_error,
                consecutive_failures=self._failures,
                last_success_at=self._last_success_at,
                retry_in_s=max(0.0, self._next_attempt - self._clock()),
            )

    def backlog(self) -> Backlog:
        """Count what waits (and update the health reasons that depend on it)."""
        conn = self._connect()
        try:
            return self._update_backlog(conn)
        finally:
            conn.close()

    def flush(self, max_batches: int = 10, *, ignore_backoff: bool = False) -> FlushResult:
        """Send up to ``max_batches`` batches of ``batch_size`` lines.

        Returns at once (``skipped``) while a backoff is running, unless
        ``ignore_backoff`` (the last flush at shutdown).  Never raises for server
        or store trouble: that is in ``FlushResult.error`` and in :attr:`health`.
        """
        with self._flush_lock:
            if self._closed:
                raise ExportClosedError("the exporter is closed")
            wait_s = self._next_attempt - self._clock()
            if wait_s > 0 and not ignore_backoff:
                return FlushResult(skipped=True, retry_in_s=wait_s,
                                   error=self._last_error)
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                self._metrics.failed("store")
                log.error("export: cannot open the store: %s", exc)
                return FlushResult(error=f"store: {exc}")
            try:
                return self._flush(conn, max(1, max_batches))
            finally:
                conn.close()

    def close(self) -> None:
        """Release the HTTP client.  Idempotent; waits for a running flush."""
        with self._flush_lock:
            self._closed = True
            if self._client is not None:
                self._client.close()
                self._client = None

    # ------------------------------------------------------------------ internals

    def _connect(self) -> sqlite3.Connection:
        if callable(self._db):
            return self._db()
        return db.connect(self._db)

    def _client_or_new(self) -> WriteClient:
        if self._client is None:
            self._client = self._client_factory(self.config)
        return self._client

    def _flush(self, conn: sqlite3.Connection, max_batches: int) -> FlushResult:
        readings = outbox = dead = batches = 0
        counter = [0]
        error: str | None = None
        more = False
        try:
            self._repair_cursors(conn)
            for _ in range(max_batches):
                batch = self._read_batch(conn)
                if batch is None:
                    break
                started = self._clock()
                try:
                    rejected = self._send(batch.lines, counter) if batch.lines else []
                except ExportError as exc:
                    error = self._failed(exc)
                    break
                self._commit(conn, batch, rejected)
                if batch.lines:  # the server answered: whatever was wrong is over
                    self._succeeded()
                self._metrics.written(len(batch.lines) - len(rejected),
                                      self._clock() - started)
                if rejected:
                    self._metrics.dead_lettered(len(rejected))
                readings += batch.readings
                outbox += batch.outbox
                dead += len(rejected)
                batches += 1
            else:
                more = self._read_batch(conn, probe=True) is not None
            self._update_backlog(conn)
        except sqlite3.Error as exc:
            self._metrics.failed("store")
            log.error("export: store error: %s", exc)
            error = f"store: {exc}"
        with self._state_lock:
            retry_in = max(0.0, self._next_attempt - self._clock()) if error else 0.0
        return FlushResult(readings=readings, outbox=outbox, dead_letters=dead,
                           batches=batches, requests=counter[0], more=more, error=error,
                           retry_in_s=retry_in)

    def _cursor(self, conn: sqlite3.Connection, key: str) -> int:
        return int(kv.get(conn, key) or 0)

    def _repair_cursors(self, conn: sqlite3.Connection) -> None:
        # A table emptied by retention restarts its ids at 1; a cursor above the
        # highest id would then skip every new row.  Rows with ids <= max(id)
        # are then all new ones, so restarting at 0 re-sends nothing.
        for key, table in ((READINGS_CURSOR, "readings"), (OUTBOX_CURSOR, "export_outbox")):
            top = conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0]
            cursor = self._cursor(conn, key)
            if top is not None and top < cursor:
                log.warning("export: %s ids restarted below the cursor (%d < %d); "
                            "resetting the cursor", table, top, cursor)
                self._set_cursors(conn, {key: 0})

    def _set_cursors(self, conn: sqlite3.Connection, values: dict[str, int]) -> None:
        with db.transaction(conn):
            kv.put_many(conn, {key: str(value) for key, value in values.items()})

    def _read_batch(self, conn: sqlite3.Connection, probe: bool = False) -> _Batch | None:
        size = 1 if probe else self.config.batch_size
        out_cursor = self._cursor(conn, OUTBOX_CURSOR)
        rd_cursor = self._cursor(conn, READINGS_CURSOR)
        # the outbox (rule states, events) gets at most half a batch, so a flood
        # of either kind cannot starve the other
        out_rows = conn.execute(
            "SELECT id, line FROM export_outbox WHERE id > ? ORDER BY id LIMIT ?",
            (out_cursor, max(1, size // 2)),
        ).fetchall()
        rd_rows = conn.execute(_READINGS_SQL, (rd_cursor, size - len(out_rows))).fetchall()
        if not out_rows and not rd_rows:
            return None
        lines = [str(line) for _, line in out_rows]
        for row in rd_rows:
            _, meter, ts, power_w, energy_kwh, delta_kwh, voltage_v, current_a, grp, fmt = row
            line = reading_line(self.site_id, meter, grp, fmt, ts, power_w=power_w,
                                energy_kwh=energy_kwh, delta_kwh=delta_kwh,
                                voltage_v=voltage_v, current_a=current_a)
            if line is not None:
                lines.append(line)
        return _Batch(
            lines=lines,
            last_reading=int(rd_rows[-1][0]) if rd_rows else None,
            last_outbox=int(out_rows[-1][0]) if out_rows else None,
            readings=len(rd_rows),
            outbox=len(out_rows),
        )

    def _send(self, lines: list[str], counter: list[int]) -> list[tuple[str, str]]:
        """Write ``lines``; on a content rejection bisect down to the bad lines.

        Returns the rejected ``(line, reason)`` pairs.  Any other error aborts
        the whole batch (nothing is committed; the next flush repeats it, which
        is harmless because writes are idempotent).
        """
        client = self._client_or_new()
        counter[0] += 1
        try:
            client.write(lines)
        except ExportRejectedError as exc:
            if len(lines) == 1:
                log.warning("export: line rejected (HTTP %d): %s", exc.status, exc.reason)
                return [(lines[0], f"HTTP {exc.status}: {exc.reason}")]
            mid = len(lines) // 2
            return self._send(lines[:mid], counter) + self._send(lines[mid:], counter)
        return []

    def _commit(self, conn: sqlite3.Connection, batch: _Batch,
                rejected: list[tuple[str, str]]) -> None:
        now = self._now()
        with db.transaction(conn):
            if batch.last_reading is not None:
                kv.put(conn, READINGS_CURSOR, str(batch.last_reading))
            if batch.last_outbox is not None:
                kv.put(conn, OUTBOX_CURSOR, str(batch.last_outbox))
                # keep the newest exported row: its id stops SQLite from handing
                # out ids at or below the cursor again
                conn.execute("DELETE FROM export_outbox WHERE id < ?", (batch.last_outbox,))
            if rejected:
                conn.executemany(
                    "INSERT INTO export_dead_letters (line, reason, at) VALUES (?, ?, ?)",
                    [(line, reason, now) for line, reason in rejected],
                )
                own = f"kind={DEAD_LETTER_KIND}"
                others = [r for r in rejected
                          if not (r[0].startswith("energy_event,") and own in r[0])]
                if others:
                    message = (f"{len(others)} line(s) rejected by InfluxDB and kept in "
                               f"export_dead_letters; first: {others[0][1]}")
                    enqueue(conn, [event_line(self.site_id, DEAD_LETTER_KIND, "",
                                              message[:MAX_REASON_CHARS], now)])

    def _succeeded(self) -> None:
        with self._state_lock:
            if self._failures:
                log.info("export: InfluxDB accepts writes again after %d failed attempt(s)",
                         self._failures)
            self._failures = 0
            self._next_attempt = 0.0
            self._last_error = None
            self._refused = None
            self._last_success_at = self._now()

    def _failed(self, exc: ExportError) -> str:
        """Record a failed write and schedule the next attempt; returns the error text."""
        message = str(exc)
        call_auth: str | None = None
        with self._state_lock:
            self._failures += 1
            retry_after = exc.retry_after_s if isinstance(exc, ExportUnavailableError) else None
            if retry_after is not None:
                delay = min(retry_after, MAX_RETRY_AFTER_S)
            else:
                delay = self._backoff.delay(self._failures, self._random())
            self._next_attempt = self._clock() + delay
            first = self._last_error != message
            self._last_error = message
            if isinstance(exc, ExportRefusedError):
                what = "token" if exc.auth else "bucket or database"
                reason = f"influxdb refuses the writes ({what}): {message}"
                if exc.auth and self._refused is None:
                    call_auth = reason
                self._refused = reason
            kind = ("auth" if isinstance(exc, ExportRefusedError) and exc.auth
                    else "refused" if isinstance(exc, ExportRefusedError)
                    else "unavailable" if isinstance(exc, ExportUnavailableError)
                    else "error")
        self._metrics.failed(kind)
        if first:
            log.warning("export: write failed (%s), retrying in %.1f s", message, delay)
        else:
            log.debug("export: write failed again (%s), retrying in %.1f s", message, delay)
        if call_auth is not None and self._on_auth_failure is not None:
            try:
                self._on_auth_failure(call_auth)
            except Exception:
                log.exception("export: on_auth_failure callback failed")
        return message

    def _update_backlog(self, conn: sqlite3.Connection) -> Backlog:
        rd_cursor = self._cursor(conn, READINGS_CURSOR)
        out_cursor = self._cursor(conn, OUTBOX_CURSOR)
        rd_top = conn.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
        out_top = conn.execute("SELECT max(id) FROM export_outbox").fetchone()[0] or 0
        row = conn.execute("SELECT ts FROM readings WHERE id > ? ORDER BY id LIMIT 1",
                           (rd_cursor,)).fetchone()
        oldest = float(row[0]) if row else None
        backlog = Backlog(
            readings=max(0, int(rd_top) - rd_cursor),
            outbox=max(0, int(out_top) - out_cursor),
            oldest_ts=oldest,
            age_s=max(0.0, self._now() - oldest) if oldest is not None else None,
        )
        reasons: list[str] = []
        if backlog.rows > self.config.max_backlog_rows:
            reasons.append(f"backlog over limit: {backlog.rows} rows wait for export "
                           f"(max_backlog_rows = {self.config.max_backlog_rows}); "
                           "they are kept in the local store")
        if (self._max_backlog_age_s is not None and backlog.age_s is not None
                and backlog.age_s > self._max_backlog_age_s):
            reasons.append(f"backlog too old: the oldest unexported reading is "
                           f"{backlog.age_s:.0f} s old")
        with self._state_lock:
            if reasons and not self._backlog_reasons:
                log.warning("export: %s", "; ".join(reasons))
            self._backlog_reasons = tuple(reasons)
        self._metrics.backlog(backlog)
        return backlog


def enqueue(conn: sqlite3.Connection, lines: Sequence[str]) -> None:
    """Queue line-protocol ``lines`` for InfluxDB in the caller's transaction.

    The one writer of ``export_outbox`` rows besides the exporter's own clean-up:
    checks and events call this, the exporter sends and deletes them.
    """
    conn.executemany("INSERT INTO export_outbox (line) VALUES (?)", [(ln,) for ln in lines])

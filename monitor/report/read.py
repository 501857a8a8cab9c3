"""What the report reads from the store: every query of the report, in one place.

A :class:`Reader` wraps a store connection inside one read transaction
(:func:`monitor.store.db.snapshot`, opened by :func:`monitor.report.build.build_report`),
so every figure of a report comes from the same committed state even while the
daemon writes.  Only ``SELECT``: a report never writes to the store.  Rows are
returned as plain tuples in the order the report lists them.
"""

from __future__ import annotations

import datetime as dt
import importlib
import sqlite3
from collections.abc import Sequence
from typing import Any

from monitor.store.ledger import MeterRow, Store, to_kwh

BUCKET_S = 900  # the ledger's resolution (monitor.core.accounting.BUCKET_S)

DailyRow = tuple[str, str, int, float, float]  # meter, day, mWh, gap kWh, gap s
EventRow = tuple[str, str, str, str, str, float, str]  # id, kind, severity, rule, scope, at, body


class Reader:
    """The report's queries over ``store`` (read-only; the caller holds the snapshot)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn: sqlite3.Connection = store.conn

    def meters(self) -> list[MeterRow]:
        return self.store.meters()

    def first_reading(self) -> float | None:
        """When the site's first reading arrived (the earliest ``first_seen`` of any
        meter), or ``None`` when nothing was ever read."""
        row = self.conn.execute("SELECT min(first_seen) FROM meters").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def daily(self, first: dt.date, last: dt.date) -> list[DailyRow]:
        return [(str(m), str(d), int(e), float(g), float(s)) for m, d, e, g, s in
                self.conn.execute(
                    "SELECT meter, day, mwh, gap_kwh, gap_s FROM daily WHERE day BETWEEN ? AND ?"
                    " ORDER BY day, meter", (first.isoformat(), last.isoformat()))]

    def gaps(self, start_ts: float, end_ts: float) -> list[tuple[Any, ...]]:
        """Gaps overlapping ``[start_ts, end_ts)``: id, meter, start, end, upper kWh, reason."""
        return list(self.conn.execute(
            "SELECT id, meter, start_ts, end_ts, upper_kwh, reason FROM gaps"
            " WHERE start_ts < ? AND end_ts > ? ORDER BY start_ts, id", (end_ts, start_ts)))

    def anomalies(self, start_ts: float, end_ts: float) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(
            "SELECT id, meter, ts, kind, value, detail FROM anomalies WHERE ts >= ? AND ts < ?"
            " ORDER BY ts, id", (start_ts, end_ts)))

    def events(self, start_ts: float, end_ts: float) -> list[EventRow]:
        return list(self.conn.execute(
            "SELECT event_id, kind, severity, rule, scope, at, body FROM events"
            " WHERE at >= ? AND at < ? ORDER BY at, id", (start_ts, end_ts)))

    def resolved_since(self, ts: float) -> list[EventRow]:
        """``alert.resolved`` events written at or after ``ts`` (closing alerts)."""
        return list(self.conn.execute(
            "SELECT event_id, kind, severity, rule, scope, at, body FROM events"
            " WHERE kind = 'alert.resolved' AND at >= ? ORDER BY at, id", (ts,)))

    def last_alerts_before(self, ts: float) -> list[tuple[str, str, str, str, str]]:
        """Per (rule, scope), the last alert event before ``ts``: rule, scope, kind,
        severity, body."""
        return [(r, s, k, sev, b) for r, s, k, sev, b, _ in self.conn.execute(
            "SELECT rule, scope, kind, severity, body, max(at) FROM events"
            " WHERE kind IN ('alert.firing', 'alert.resolved') AND at < ? GROUP BY rule, scope",
            (ts,))]

    def alert_state(self) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(
            "SELECT rule, scope, state, level, since, period, data FROM alert_state"
            " ORDER BY rule, scope"))

    def orders(self, start_ts: float, end_ts: float) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(
            "SELECT order_id, action, scope, rule, meters, target_kw, reason, issued_at, state,"
            " resends, updated_at, actor, dry_run FROM orders"
            " WHERE issued_at >= ? AND issued_at < ? ORDER BY issued_at, order_id",
            (start_ts, end_ts)))

    def dead_letters(self, start_ts: float, end_ts: float) -> dict[str, int]:
        return {str(reason): int(n) for reason, n in self.conn.execute(
            "SELECT reason, count(*) FROM dead_letters WHERE received_at >= ? AND received_at < ?"
            " GROUP BY reason ORDER BY reason", (start_ts, end_ts))}

    def energy_between_days(self, meter_ids: Sequence[str] | None, first: dt.date,
                            last: dt.date) -> tuple[float, float]:
        """(kWh, kWh + gap bound) over local days ``first`` .. ``last`` of these meters;
        ``None``: every meter (also those that reported only before the report's month)."""
        if meter_ids is not None and not meter_ids:
            return 0.0, 0.0
        ids = list(meter_ids or ())
        where = f" AND meter IN ({','.join('?' * len(ids))})" if meter_ids is not None else ""
        mwh, gap = self.conn.execute(
            "SELECT coalesce(sum(mwh), 0), coalesce(sum(gap_kwh), 0) FROM daily"
            f" WHERE day BETWEEN ? AND ?{where}", (first.isoformat(), last.isoformat(), *ids),
        ).fetchone()
        return to_kwh(mwh), to_kwh(mwh) + float(gap)

    def peak_15min(self, meter_ids: Sequence[str], start_ts: float,
                   end_ts: float) -> tuple[float, float | None]:
        """Largest 15-minute average power (kW) of these meters in the span, and its start."""
        if not meter_ids:
            return 0.0, None
        marks = ",".join("?" * len(meter_ids))
        row = self.conn.execute(
            f"SELECT bucket, sum(mwh) AS e FROM ledger WHERE bucket >= ? AND bucket < ?"
            f" AND meter IN ({marks}) GROUP BY bucket ORDER BY e DESC, bucket LIMIT 1",
            (start_ts, end_ts, *meter_ids),
        ).fetchone()
        if row is None or row[1] <= 0:
            return 0.0, None
        return round(to_kwh(row[1]) * 3600.0 / BUCKET_S, 6), float(row[0])

    def audit(self, start_ts: float, end_ts: float) -> dict[str, Any]:
        """The audit log's size, head and the verification of its whole chain."""
        entries, in_period = self.conn.execute(
            "SELECT count(*), coalesce(sum(at >= ? AND at < ?), 0) FROM audit",
            (start_ts, end_ts)).fetchone()
        head = self.conn.execute(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        out: dict[str, Any] = {
            "entries": int(entries),
            "entries_in_period": int(in_period),
            "head_seq": int(head[0]) if head else None,
            "head_hash": str(head[1]) if head else None,
            "verified": None,
            "checked": None,
            "first_bad_seq": None,
            "reason": "audit verification is not available in this build",
        }
        try:
            verify = importlib.import_module("monitor.store.audit").verify
        except (ImportError, AttributeError):
            return out
        try:
            result = verify(self.conn)
        except Exception as exc:  # noqa: BLE001 - a log that cannot be checked is reported
            out.update(verified=False, reason=f"verification could not run: {exc}")
            return out
        out.update(verified=bool(result.ok), checked=int(result.checked),
                   first_bad_seq=result.first_bad_seq, reason=str(result.reason))
        return out

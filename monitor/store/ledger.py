"""The ledger store: SQLite in WAL mode, the daemon's source of truth.

Each thread opens its own :class:`Store` (SQLite connections are not shared
across threads); WAL lets readers (``status``, HTTP, rule checks) run while the
intake worker writes.  All writes of one intake batch are one transaction
(:meth:`Store.commit_batch`): readings, ledger, daily rollup, gaps, anomalies,
dead letters, meter state and redelivery fingerprints commit together or not at
all, which is what lets the MQTT layer acknowledge only committed messages.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from monitor.core.accounting import BUCKET_S, MWH_PER_KWH
from monitor.store import db, kv
from monitor.store.db import StoreError, migrate

# Fingerprints of the last QoS >= 1 messages committed, for recognising re-deliveries.
# A broker that keeps to Receive Maximum re-delivers at most that many; one that does
# not (mosquitto < 2.0.13 draining a backlog) may re-send, after a reconnect, many
# thousands whose PUBACK it had not read yet.  Four times the 16-bit packet-id space
# (about 13 MB), looked up by packet id.
FINGERPRINTS_KEPT = 262_144


@dataclass
class IntakeBatch:
    """Everything one intake batch writes.  Built by the intake worker, committed whole."""

    # (meter, ts, power_w, energy_kwh, delta_kwh, voltage_v, current_a, flags, since_ts,
    #  device_ts, export_kwh)
    readings: list[tuple[str, float, float | None, float | None, float, float | None,
                         float | None, str, float | None, float | None, float | None]] = field(
        default_factory=list)
    # (meter, bucket) -> whole mWh
    ledger: dict[tuple[str, int], int] = field(default_factory=dict)
    # (meter, day) -> Rollup
    daily: dict[tuple[str, str], Rollup] = field(default_factory=dict)
    # (outcome 'ignored' | 'skipped', reason, format) -> count
    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    gaps: list[tuple[str, float, float, float | None, str]] = field(default_factory=list)
    anomalies: list[tuple[str, float, str, float | None, str]] = field(default_factory=list)
    dead_letters: list[tuple[float, str, str, str, int, bytes]] = field(default_factory=list)
    # meter -> (device, group, format, first_seen, last_seen, power_w, online, acct_json)
    meters: dict[str, tuple[str, str, str, float | None, float | None, float | None, int,
                            str]] = field(
        default_factory=dict
    )
    # (packet id, fingerprint) of each QoS >= 1 message (QoS 0 is never re-delivered)
    fingerprints: list[tuple[int, bytes]] = field(default_factory=list)
    signals: list[tuple[str, float | None, float | None, float, str]] = field(default_factory=list)


@dataclass(slots=True)
class Rollup:
    """What a batch adds to one (meter, day) or (meter, month) rollup row."""

    mwh: int = 0
    export_mwh: int = 0
    gap_kwh: float = 0.0
    gap_s: float = 0.0

    def add(self, other: Rollup) -> None:
        self.mwh += other.mwh
        self.export_mwh += other.export_mwh
        self.gap_kwh += other.gap_kwh
        self.gap_s += other.gap_s


def to_kwh(mwh: int | float | None) -> float:
    """Whole mWh at rest -> kWh at the edge (one division, the same everywhere)."""
    return (mwh or 0) / MWH_PER_KWH


@dataclass(frozen=True)
class MeterRow:
    id: str
    device: str
    group: str
    format: str
    first_seen: float | None
    last_seen: float | None
    power_w: float | None
    online: bool
    acct: str


#: period -> (rollup table, its period column)
_ROLLUPS = {"day": ("daily", "day"), "month": ("monthly", "month"), "year": ("yearly", "year")}


def _add_rollup(c: sqlite3.Connection, table: str, period_col: str,
                rows: dict[tuple[str, str], Rollup]) -> None:
    """Add ``(meter, period) -> Rollup`` to the ``daily`` or ``monthly`` rollup."""
    c.executemany(
        f"INSERT INTO {table} (meter, {period_col}, mwh, export_mwh, gap_kwh, gap_s)"
        f" VALUES (?,?,?,?,?,?) ON CONFLICT ({period_col}, meter) DO UPDATE SET"
        " mwh = mwh + excluded.mwh, export_mwh = export_mwh + excluded.export_mwh,"
        " gap_kwh = gap_kwh + excluded.gap_kwh, gap_s = gap_s + excluded.gap_s",
        [(m, p, v.mwh, v.export_mwh, v.gap_kwh, v.gap_s) for (m, p), v in rows.items()],
    )


class Store:
    """One connection to the store.  Not thread-safe: one instance per thread."""

    def __init__(self, path: Path | str, *, readonly: bool = False,
                 migrate_schema: bool = True) -> None:
        """``readonly``: a reader's connection (never migrates, refuses a schema this
        code does not know).  Otherwise read-write, migrating unless told not to
        (the daemon migrates once at start; its other threads' stores do not)."""
        self.path = Path(path)
        if readonly:
            self.conn = db.connect_readonly(path)
        else:
            self.conn = db.connect(path)
            if migrate_schema:
                migrate(self.conn)
        # window sums kept between calls (:meth:`window_energy`), valid while the
        # ledger_versions counts they were read under hold
        self._ranges: dict[tuple[int, int], tuple[tuple[int | None, ...], dict[str, int]]] = {}
        self._buckets: dict[int, tuple[int, dict[str, int]]] = {}

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (:func:`monitor.store.db.snapshot`): every SELECT inside
        sees one committed state.  Inside a transaction already, it joins that one."""
        if self.conn.in_transaction:
            yield self.conn
            return
        with db.snapshot(self.conn) as c:
            yield c

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """:func:`monitor.store.db.transaction` on this store's connection."""
        with db.transaction(self.conn) as c:
            yield c

    # ------------------------------------------------------------------ intake

    def commit_batch(self, b: IntakeBatch) -> None:
        """Write one intake batch in one transaction.  Raises :class:`StoreError`."""
        now = time.time()
        try:
            with self.transaction() as c:
                if b.readings:
                    c.executemany(
                        "INSERT INTO readings (meter, ts, power_w, energy_kwh, delta_kwh,"
                        " voltage_v, current_a, flags, since_ts, device_ts, export_kwh)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        b.readings,
                    )
                if b.ledger:
                    c.executemany(
                        "INSERT INTO ledger (meter, bucket, mwh) VALUES (?,?,?)"
                        " ON CONFLICT (meter, bucket) DO UPDATE SET mwh = mwh + excluded.mwh",
                        [(m, bkt, v) for (m, bkt), v in b.ledger.items()],
                    )
                    # in the same transaction: a reader keeping a bucket's rows sees it move
                    c.executemany(
                        "INSERT INTO ledger_versions (bucket, n) VALUES (?, 1)"
                        " ON CONFLICT (bucket) DO UPDATE SET n = n + 1",
                        [(bkt,) for bkt in {bkt for _m, bkt in b.ledger}])
                if b.daily:
                    months: dict[tuple[str, str], Rollup] = {}
                    for (m, d), v in b.daily.items():
                        acc = months.get((m, d[:7]))
                        if acc is None:
                            acc = months[(m, d[:7])] = Rollup()
                        acc.add(v)
                    years: dict[tuple[str, str], Rollup] = {}
                    for (m, mo), v in months.items():
                        acc = years.get((m, mo[:4]))
                        if acc is None:
                            acc = years[(m, mo[:4])] = Rollup()
                        acc.add(v)
                    _add_rollup(c, "yearly", "year", years)
                    _add_rollup(c, "monthly", "month", months)
                    _add_rollup(c, "daily", "day", b.daily)
                if b.gaps:
                    c.executemany(
                        "INSERT INTO gaps (meter, start_ts, end_ts, upper_kwh, reason)"
                        " VALUES (?,?,?,?,?)", b.gaps)
                if b.anomalies:
                    c.executemany(
                        "INSERT INTO anomalies (meter, ts, kind, value, detail) VALUES (?,?,?,?,?)",
                        b.anomalies)
                if b.dead_letters:
                    c.executemany(
                        "INSERT INTO dead_letters (received_at, topic, reason, detail, size,"
                        " payload) VALUES (?,?,?,?,?,?)", b.dead_letters)
                if b.meters:
                    c.executemany(
                        "INSERT INTO meters (id, device, grp, format, first_seen, last_seen,"
                        " power_w, online, acct) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"
                        " ON CONFLICT (id) DO UPDATE SET device=excluded.device,"
                        " grp=excluded.grp, format=excluded.format,"
                        " first_seen=min(coalesce(first_seen, excluded.first_seen),"
                        " coalesce(excluded.first_seen, first_seen)),"
                        " last_seen=coalesce(excluded.last_seen, last_seen),"
                        " power_w=excluded.power_w, online=excluded.online, acct=excluded.acct",
                        [(k, *v) for k, v in b.meters.items()],
                    )
                if b.signals:
                    c.executemany(
                        "INSERT OR REPLACE INTO signals (topic, target_kw, until, received_at,"
                        " payload) VALUES (?,?,?,?,?)", b.signals)
                if b.outcomes:
                    c.executemany(
                        "INSERT INTO intake_outcomes (outcome, reason, format, n, last_at)"
                        " VALUES (?,?,?,?,?) ON CONFLICT (outcome, reason, format) DO UPDATE"
                        " SET n = n + excluded.n, last_at = excluded.last_at",
                        [(o, r, f, n, now) for (o, r, f), n in b.outcomes.items()])
                if b.fingerprints:
                    c.executemany("INSERT INTO msg_seen (mid, fp) VALUES (?,?)", b.fingerprints)
                    c.execute("DELETE FROM msg_seen WHERE seq <= (SELECT max(seq) FROM msg_seen)"
                              " - ?", (FINGERPRINTS_KEPT,))
        except sqlite3.Error as exc:
            raise StoreError(f"commit failed: {exc}") from exc

    def seen(self, fingerprints: Sequence[tuple[int, bytes]]) -> set[bytes]:
        """Which of these ``(packet id, fingerprint)`` were committed recently.

        Looked up by packet id (indexed): called only for batches that hold
        messages with the DUP flag, i.e. after a reconnect.  Rows written before
        migration 11 carry packet id 0 and are compared too."""
        wanted = {fp for _mid, fp in fingerprints}
        mids = json.dumps(sorted({mid for mid, _fp in fingerprints}))
        rows = self.conn.execute(
            "SELECT fp FROM msg_seen WHERE mid IN (SELECT value FROM json_each(?)) OR mid = 0",
            (mids,))
        return {r[0] for r in rows} & wanted

    def register_meters(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Make configured meters (id, device, group) known before their first reading."""
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO meters (id, device, grp) VALUES (?,?,?) ON CONFLICT (id)"
                " DO UPDATE SET grp=excluded.grp, device=excluded.device", list(rows))

    def meters(self) -> list[MeterRow]:
        return [
            MeterRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8])
            for r in self.conn.execute(
                "SELECT id, device, grp, format, first_seen, last_seen, power_w, online, acct"
                " FROM meters ORDER BY id")
        ]

    # ------------------------------------------------------------------ queries

    def meter_states(self) -> list[tuple[str, str, str, float | None, float | None,
                                         float | None, int]]:
        """``(id, device, group, first_seen, last_seen, power_w, online)`` of every meter
        by id: what a rule check needs, without the accounting state (:meth:`meters`)."""
        return self.conn.execute(
            "SELECT id, device, grp, first_seen, last_seen, power_w, online FROM meters"
            " ORDER BY id").fetchall()

    def period_totals(self, period: str, first: str, last: str
                      ) -> tuple[dict[str, float], dict[str, float]]:
        """kWh and gap upper bound (kWh) per meter over the local periods ``[first, last]``
        of ``period`` (``day``: ``YYYY-MM-DD``, ``month``: ``YYYY-MM``, ``year``:
        ``YYYY``), from the rollup of that period."""
        table, col = _ROLLUPS[period]
        if first == last:  # one period: one row per meter, read in key order, no sorting
            rows = self.conn.execute(
                f"SELECT meter, mwh, gap_kwh FROM {table} WHERE {col} = ?", (first,)).fetchall()
        else:
            rows = self.conn.execute(
                f"SELECT meter, sum(mwh), sum(gap_kwh) FROM {table}"
                f" WHERE {col} BETWEEN ? AND ? GROUP BY meter", (first, last)).fetchall()
        return ({m: mwh / MWH_PER_KWH for m, mwh, _gap in rows},
                {m: gap for m, _mwh, gap in rows})

    def _totals(self, period: str, first: str, last: str) -> dict[str, tuple[float, float]]:
        kwh, gap = self.period_totals(period, first, last)
        return {m: (v, gap[m]) for m, v in kwh.items()}

    def yearly_totals(self, year_from: str, year_to: str) -> dict[str, tuple[float, float]]:
        """kWh and gap upper bound per meter over local years ``[year_from, year_to]``
        (``YYYY``), from the yearly rollup."""
        return self._totals("year", year_from, year_to)

    def monthly_totals(self, month_from: str, month_to: str) -> dict[str, tuple[float, float]]:
        """kWh and gap upper bound per meter over local months ``[month_from, month_to]``
        (``YYYY-MM``), from the monthly rollup."""
        return self._totals("month", month_from, month_to)

    def daily_totals(self, day_from: str, day_to: str) -> dict[str, tuple[float, float]]:
        """kWh and gap upper bound per meter over local days ``[day_from, day_to]``."""
        return self._totals("day", day_from, day_to)

    def energy_between(self, start_ts: float, end_ts: float,
                       bucket_s: int = BUCKET_S) -> dict[str, float]:
        """kWh per meter accounted in ``[start_ts, end_ts]`` (``end_ts`` is "now").

        A window shorter than a ledger bucket is summed from the readings: each
        reading's ``delta_kwh`` was used evenly over ``[since_ts, ts]``, and the part
        inside the window counts.  A longer window comes from the ledger: buckets
        inside it count whole, the first one pro rata, and the bucket holding
        ``end_ts`` -- still being filled, so its energy lies in ``[bucket, end_ts]``
        -- pro rata over that part only.
        """
        if end_ts - start_ts < bucket_s:
            return self._energy_from_readings(start_ts, end_ts)
        return self.window_energy([end_ts - start_ts], end_ts, bucket_s)[end_ts - start_ts]

    def window_energy(self, windows: Iterable[float], end_ts: float,
                      bucket_s: int = BUCKET_S) -> dict[float, dict[str, float]]:
        """:meth:`energy_between` ``(end_ts - w, end_ts)`` for each window ``w``, at once.

        The buckets wholly inside a window and closed (not the one holding
        ``end_ts``) are summed in SQL as whole mWh, and the sum is kept on this
        store while every bucket of that range has the same ``ledger_versions``
        count: :meth:`commit_batch` bumps the count of each bucket it writes in the
        same transaction, so a reading committed into any bucket, however old,
        makes the next call read the range again.  A range holding a bucket without
        a count (written before migration 10) is never kept.  The first and the
        last bucket of a window are read per bucket, kept the same way.  Call it
        inside a read transaction (:meth:`reading`) so the counts and the rows are
        one committed state; a count read after its rows would be conservative
        anyway (the rows are then newer than the count they are kept under).
        """
        ws = sorted(set(windows))
        out: dict[float, dict[str, float]] = {
            w: self._energy_from_readings(end_ts - w, end_ts) for w in ws if w < bucket_s}
        long = [w for w in ws if w >= bucket_s]
        if not long:
            return out
        first = int((end_ts - long[-1]) // bucket_s) * bucket_s
        versions: dict[int, int] = dict(self.conn.execute(
            "SELECT bucket, n FROM ledger_versions WHERE bucket >= ? AND bucket < ?",
            (first, end_ts)))
        ranges: dict[tuple[int, int], tuple[tuple[int | None, ...], dict[str, int]]] = {}
        buckets: dict[int, tuple[int, dict[str, int]]] = {}
        for w in long:
            start = end_ts - w
            edges: list[tuple[int, float]] = []  # (bucket, share): read per bucket
            whole: list[int] = []  # closed buckets wholly inside the window
            bkt = int(start // bucket_s) * bucket_s
            while bkt < end_ts:
                lo, hi = max(bkt, start), min(bkt + bucket_s, end_ts)
                if hi > lo:
                    span = min(bucket_s, end_ts - bkt)
                    if hi - lo < span:
                        edges.append((bkt, (hi - lo) / span))
                    elif bkt + bucket_s > end_ts:  # still being filled: whole so far
                        edges.append((bkt, 1.0))
                    else:
                        whole.append(bkt)
                bkt += bucket_s
            mwh: dict[str, int] = {}
            if whole:
                mwh = dict(self._closed_range(whole[0], whole[-1] + bucket_s, bucket_s,
                                              versions, ranges))
            kwh: dict[str, float]
            shares: list[tuple[dict[str, int], float]] = []
            for b, share in edges:
                rows = self._bucket_rows(b, versions, buckets)
                if share == 1.0:
                    for m, v in rows.items():
                        mwh[m] = mwh.get(m, 0) + v
                else:
                    shares.append((rows, share))
            kwh = {m: v / MWH_PER_KWH for m, v in mwh.items()}
            for rows, share in shares:
                for m, v in rows.items():
                    kwh[m] = kwh.get(m, 0.0) + v / MWH_PER_KWH * share
            out[w] = kwh
        self._ranges, self._buckets = ranges, buckets  # keep only what this call used
        return out

    def _closed_range(self, lo: int, hi: int, bucket_s: int, versions: dict[int, int],
                      used: dict[tuple[int, int], tuple[tuple[int | None, ...],
                                                      dict[str, int]]]) -> dict[str, int]:
        """Whole mWh per meter in the buckets ``[lo, hi)`` (closed: nothing but a late
        reading writes them), kept while their ``ledger_versions`` counts hold."""
        key = tuple(versions.get(b) for b in range(lo, hi, bucket_s))
        kept = used.get((lo, hi)) or self._ranges.get((lo, hi))
        if kept is not None and kept[0] == key and None not in key:
            used[(lo, hi)] = kept
            return kept[1]
        sums: dict[str, int] = dict(self.conn.execute(
            "SELECT meter, sum(mwh) FROM ledger WHERE bucket >= ? AND bucket < ?"
            " GROUP BY meter", (lo, hi)))
        if None not in key:
            used[(lo, hi)] = (key, sums)
        return sums

    def _bucket_rows(self, bkt: int, versions: dict[int, int],
                     used: dict[int, tuple[int, dict[str, int]]]) -> dict[str, int]:
        """Whole mWh per meter in one bucket, kept while its ``ledger_versions`` count holds."""
        n = versions.get(bkt)
        kept = used.get(bkt) or self._buckets.get(bkt)
        if kept is not None and n is not None and kept[0] == n:
            used[bkt] = kept
            return kept[1]
        rows: dict[str, int] = dict(self.conn.execute(
            "SELECT meter, mwh FROM ledger WHERE bucket = ?", (bkt,)))
        if n is not None:
            used[bkt] = (n, rows)
        return rows

    def _energy_from_readings(self, start_ts: float, end_ts: float) -> dict[str, float]:
        # since_ts is NULL only in rows written before it existed: taken as an instant
        rows = self.conn.execute(
            "SELECT meter, sum(CASE WHEN s = ts THEN delta_kwh ELSE"
            " delta_kwh * (min(ts, :end) - max(s, :start)) / (ts - s) END)"
            " FROM (SELECT meter, ts, delta_kwh, min(coalesce(since_ts, ts), ts) AS s"
            "       FROM readings WHERE ts > :start AND delta_kwh > 0)"
            " WHERE (s < ts AND s < :end) OR (s = ts AND ts <= :end) GROUP BY meter",
            {"start": start_ts, "end": end_ts},
        )
        return {str(m): float(kwh) for m, kwh in rows}

    def outcomes(self) -> dict[str, dict[str, int]]:
        """``{'ignored': {reason: n}, 'skipped': {reason: n}}`` since the store was made."""
        out: dict[str, dict[str, int]] = {"ignored": {}, "skipped": {}}
        for outcome, reason, n in self.conn.execute(
                "SELECT outcome, reason, sum(n) FROM intake_outcomes GROUP BY outcome, reason"
                " ORDER BY outcome, reason"):
            out.setdefault(str(outcome), {})[str(reason)] = int(n)
        return out

    def anomaly_counts(self, since_ts: float = 0.0) -> dict[str, int]:
        """Anomalies recorded since ``since_ts`` by kind."""
        return {str(k): int(n) for k, n in self.conn.execute(
            "SELECT kind, count(*) FROM anomalies WHERE ts >= ? GROUP BY kind ORDER BY kind",
            (since_ts,))}

    def recent_dead_letters(self, limit: int) -> list[tuple[float, str, str]]:
        """The newest ``limit`` dead letters as (received_at, topic, reason), newest first
        (by the ``received_at`` index: cheap however many there are)."""
        return [(float(at), str(topic), str(reason)) for at, topic, reason in self.conn.execute(
            "SELECT received_at, topic, reason FROM dead_letters ORDER BY received_at DESC"
            " LIMIT ?", (max(0, limit),))]

    def kv_get(self, key: str, default: str | None = None) -> str | None:
        return kv.get(self.conn, key, default)

    def counts(self) -> dict[str, int]:
        q = {
            "readings": "SELECT coalesce(max(id), 0) FROM readings",
            "dead_letters": "SELECT count(*) FROM dead_letters",
            "gaps": "SELECT count(*) FROM gaps",
            "anomalies": "SELECT count(*) FROM anomalies",
        }
        return {k: int(self.conn.execute(sql).fetchone()[0]) for k, sql in q.items()}

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self, now: float, raw_retention_days: int,
                     keep_from_id: int | None = None) -> dict[str, int]:
        """Drop raw data past retention.  Never drops unexported
        readings (``keep_from_id``: the export cursor) or the ledger (it is the record)."""
        cutoff = now - raw_retention_days * 86400.0
        with self.transaction() as c:
            if keep_from_id is None:
                n = c.execute("DELETE FROM readings WHERE ts < ?", (cutoff,)).rowcount
            else:
                n = c.execute("DELETE FROM readings WHERE ts < ? AND id <= ?",
                              (cutoff, keep_from_id)).rowcount
            d = c.execute("DELETE FROM dead_letters WHERE received_at < ?", (cutoff,)).rowcount
        return {"readings": n, "dead_letters": d}

"""Benchmark: reading what the rules need from SQLite, for 10,000 meters in 50 groups.

The rule check of the daemon is two steps: :func:`monitor.rules.check.build_snapshot`
reads the meters, the period totals (``daily``) and the window totals
(``ledger``) from the store, then :func:`monitor.rules.evaluate.evaluate_all` decides
(``bench_rules.py`` times that second step alone).  This times the first step
on a real store in WAL mode holding:

- 10,000 meters (``meters`` rows with accounting state, as the intake leaves them);
- a month of daily rows (30 local days up to today: 300,000 ``daily`` rows);
- a day of 15-minute ledger buckets (96 per meter: 960,000 ``ledger`` rows);
- one curtailment signal.

The rules, the site and ``now`` are those of ``bench_rules.py`` (Asia/Irkutsk,
2026-11-27 02:00 local), so the two numbers add up to one check.  Each step of
the snapshot is also timed on its own, so a slow check points at its query.

    python -m bench.bench_store [METERS]
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, or imported by a harness in bench/
    sys.path.insert(0, str(ROOT))

from bench.bench_rules import GROUPS, METERS, rule_set  # noqa: E402
from monitor.config import Config  # noqa: E402
from monitor.core.accounting import MeterState  # noqa: E402
from monitor.core.periods import period_bounds  # noqa: E402
from monitor.rules import evaluate as rules  # noqa: E402
from monitor.rules.check import build_snapshot  # noqa: E402
from monitor.store.ledger import IntakeBatch, Rollup, Store  # noqa: E402

TZ = "Asia/Irkutsk"
DAYS = 30
BUCKET_S = 900
BUCKETS = 96  # one day of 15-minute buckets


def bench_now() -> float:
    """The ``now`` of ``bench_rules.snapshot``: 2026-11-27 02:00 in Irkutsk."""
    return dt.datetime(2026, 11, 27, 2, tzinfo=ZoneInfo(TZ)).timestamp()


def config(db: Path, meters: int) -> Config:
    """The site of ``bench_rules``, its rule set, and ``meters`` configured meters."""
    return Config.model_validate({
        "site": {"id": "bench", "timezone": TZ, "category": "individual", "region": "RU-IRK",
                 "subregion": "bratsk"},
        "sources": [{"topic": "bench/#", "format": "json"}],
        "storage": {"path": str(db)},
        "meters": [{"id": f"m{i:05d}", "device": f"m{i:05d}", "group": f"g{i % GROUPS:02d}",
                    "rated_kw": 3.5, "expected_interval_s": 60.0} for i in range(meters)],
        "rules": rule_set(),
    })


def fill(db: Path, meters: int, now: float, days: int = DAYS, seed: int = 1) -> dict[str, int]:
    """Write the store described in the module docstring; returns row counts."""
    rnd = random.Random(seed)
    ids = [f"m{i:05d}" for i in range(meters)]
    today = dt.datetime.fromtimestamp(now, ZoneInfo(TZ)).date()
    day_names = [(today - dt.timedelta(days=k)).isoformat() for k in range(days)]
    last_bucket = int(now // BUCKET_S) * BUCKET_S
    buckets = [last_bucket - k * BUCKET_S for k in range(BUCKETS)]

    def meter_rows() -> Iterator[tuple[Any, ...]]:
        for i, mid in enumerate(ids):
            silent = rnd.random() < 0.01
            seen = now - (2000.0 if silent else rnd.uniform(0, 60))
            power = rnd.uniform(2800, 3400)
            acct = MeterState(last_ts=seen, counter_kwh=10_000 + i, counter_ts=seen,
                              power_w=power, power_ts=seen, has_counter=True).to_json()
            yield (mid, mid, f"g{i % GROUPS:02d}", "json", now - days * 86400.0, seen,
                   None if silent else power, 1, acct)

    def daily_rows() -> Iterator[tuple[Any, ...]]:
        for day in day_names:
            for k, mid in enumerate(ids):
                gap = 3.5 if k % 97 == 0 else 0.0
                yield (mid, day, rnd.uniform(60, 80), gap, gap * 3600 / 3.5)

    def ledger_rows() -> Iterator[tuple[Any, ...]]:
        for bucket in buckets:
            for mid in ids:
                yield (mid, bucket, rnd.uniform(0.7, 0.85))

    store = Store(db)
    try:
        with store.transaction() as c:
            c.executemany(
                "INSERT INTO meters (id, device, grp, format, first_seen, last_seen, power_w,"
                " online, acct) VALUES (?,?,?,?,?,?,?,?,?)", meter_rows())
            c.executemany("INSERT INTO daily (meter, day, mwh, gap_kwh, gap_s)"
                          " VALUES (?,?,round(? * 1e6),?,?)", daily_rows())
            # the monthly and yearly rollups the intake keeps beside `daily` (migrations
            # 7 and 10)
            c.execute("INSERT INTO monthly (meter, month, mwh, gap_kwh, gap_s)"
                      " SELECT meter, substr(day, 1, 7), sum(mwh), sum(gap_kwh), sum(gap_s)"
                      " FROM daily GROUP BY meter, substr(day, 1, 7)")
            c.execute("INSERT INTO yearly (meter, year, mwh, gap_kwh, gap_s)"
                      " SELECT meter, substr(month, 1, 4), sum(mwh), sum(gap_kwh), sum(gap_s)"
                      " FROM monthly GROUP BY meter, substr(month, 1, 4)")
            c.executemany("INSERT INTO ledger (meter, bucket, mwh) VALUES (?,?,round(? * 1e6))",
                          ledger_rows())
            # each bucket's count of the batches that wrote it, as Store.commit_batch keeps it
            c.executemany("INSERT INTO ledger_versions (bucket, n) VALUES (?, 100)",
                          [(b,) for b in buckets])
            c.execute("INSERT INTO signals (topic, target_kw, until, received_at, payload)"
                      " VALUES ('grid/curtail', 0, ?, ?, '{}')", (now + 600, now - 60))
        store.conn.execute("ANALYZE")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    return {"meters": meters, "daily_rows": meters * days, "ledger_rows": meters * BUCKETS}


def _batch(ids: list[str], now: float, cfg: Config, late: bool) -> IntakeBatch:
    """What the intake commits when every meter reported once (a few Wh each): the
    bucket holding ``now``, today's rollups and the meter's row; ``late``: also every bucket of the
    longest window, as readings of the past hour arriving late write them."""
    tz = cfg.site.tz
    day = dt.datetime.fromtimestamp(now, tz).date().isoformat()
    longest = max(rules.windows_needed(cfg.rules))
    bucket = int(now // BUCKET_S) * BUCKET_S
    buckets = [bucket]
    if late:
        buckets += list(range(int((now - longest) // BUCKET_S) * BUCKET_S, bucket, BUCKET_S))
    b = IntakeBatch()
    for i, mid in enumerate(ids):
        for bkt in buckets:
            b.ledger[(mid, bkt)] = 5_000
        b.daily[(mid, day)] = Rollup(5_000 * len(buckets))
        # and its meter row: the reading's time and power, as the intake leaves them
        seen, power = now - i % 10, 3_000.0 + i % 300
        b.meters[mid] = (mid, f"g{i % GROUPS:02d}", "json", None, seen, power, 1, MeterState(
            last_ts=seen, counter_kwh=10_000 + i, counter_ts=seen, power_w=power,
            power_ts=seen, has_counter=True).to_json())
    return b


def _median_ms(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3), round(max(times), 3)


def run(workdir: Path, meters: int = METERS, days: int = DAYS,
        repeat: int = 11) -> dict[str, Any]:
    """Fill a store in ``workdir`` and time ``build_snapshot`` ``repeat`` times."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "monitor.db"
    now = bench_now()
    cfg = config(db, meters)
    t0 = time.perf_counter()
    rows = fill(db, meters, now, days)
    fill_s = time.perf_counter() - t0

    store = Store(db)
    intake = Store(db, migrate_schema=False)  # the intake's own connection, as in the daemon
    ids = [f"m{i:05d}" for i in range(meters)]
    try:
        first_t0 = time.perf_counter()
        snap = build_snapshot(store, cfg, now)  # cold: first read after opening
        first_ms = (time.perf_counter() - first_t0) * 1000
        # as the daemon after its start-up (monitor.app.service.Service.start): what is
        # built so far lives on, out of every later collection
        gc.collect()
        gc.freeze()
        snap_ms: list[float] = []
        eval_ms: list[float] = []
        for i in range(repeat):
            # between two checks of a live site every meter reports: one batch (not
            # timed) books energy into the current bucket and today's rollups and
            # updates every meter's row
            intake.commit_batch(_batch(ids, now + 10 * i, cfg, late=False))
            t1 = time.perf_counter()
            snap = build_snapshot(store, cfg, now + 10 * i)
            t2 = time.perf_counter()
            rules.evaluate_all(cfg.rules, snap)
            t3 = time.perf_counter()
            snap_ms.append((t2 - t1) * 1000)
            eval_ms.append((t3 - t2) * 1000)
        # a backlog drain: readings of the last hour arrive late, so every bucket of
        # every window was written since the last check and nothing kept is valid
        late_ms: list[float] = []
        for i in range(repeat):
            t = now + 10 * (repeat + i)
            intake.commit_batch(_batch(ids, t, cfg, late=True))
            t1 = time.perf_counter()
            snap = build_snapshot(store, cfg, t)
            rules.evaluate_all(cfg.rules, snap)
            late_ms.append((time.perf_counter() - t1) * 1000)

        # each read of build_snapshot on its own, to point at the query that costs
        tz = cfg.site.tz
        t = now + 10 * 2 * repeat
        today = dt.datetime.fromtimestamp(t, tz).date().isoformat()
        steps: dict[str, dict[str, float]] = {}
        med, mx = _median_ms(store.meter_states, repeat)
        steps["meter_states"] = {"median_ms": med, "max_ms": mx}
        for period in sorted(rules.periods_needed(cfg.rules)):
            start, _end, _label = period_bounds(period, t, tz)
            first = dt.datetime.fromtimestamp(start, tz).date().isoformat()
            # the same reads as monitor.rules.check.build_snapshot
            kind, n = {"calendar_day": ("day", 10), "calendar_year": ("year", 4)}.get(
                period, ("month", 7))
            med, mx = _median_ms(partial(store.period_totals, kind, first[:n], today[:n]),
                                 repeat)
            steps[f"period_totals.{period}"] = {"median_ms": med, "max_ms": mx}
        windows = rules.windows_needed(cfg.rules)

        def fresh_current_bucket() -> None:  # the steady state: one bucket re-read
            intake.commit_batch(_batch(ids[:1], t, cfg, late=False))
            t0 = time.perf_counter()
            store.window_energy(windows, t)
            current.append((time.perf_counter() - t0) * 1000)

        current: list[float] = []
        for _ in range(repeat):
            fresh_current_bucket()
        steps["window_energy.current_bucket_written"] = {
            "median_ms": round(statistics.median(current), 3), "max_ms": round(max(current), 3)}
        cold = Store(db, migrate_schema=False)
        try:  # nothing kept: every range and bucket read (a new connection)
            med, mx = _median_ms(lambda: Store.window_energy(cold, windows, t), 1)
            steps["window_energy.nothing_kept"] = {"median_ms": med, "max_ms": mx}
        finally:
            cold.close()
    finally:
        gc.unfreeze()
        store.close()
        intake.close()

    snap_med = statistics.median(snap_ms)
    eval_med = statistics.median(eval_ms)
    return {
        "name": "checks.build_snapshot",
        **rows,
        "groups": GROUPS,
        "days": days,
        "rules": len(cfg.rules),
        "db_mib": round(db.stat().st_size / 2**20, 1),
        "fill_s": round(fill_s, 1),
        "repeat": repeat,
        "first_ms": round(first_ms, 3),
        "median_ms": round(snap_med, 3),
        "max_ms": round(max(snap_ms), 3),
        "evaluate_median_ms": round(eval_med, 3),
        "check_median_ms": round(snap_med + eval_med, 3),
        "check_max_ms": round(max(a + b for a, b in zip(snap_ms, eval_ms, strict=True)), 3),
        "check_ms": [round(a + b, 1) for a, b in zip(snap_ms, eval_ms, strict=True)],
        "late_check_median_ms": round(statistics.median(late_ms), 3),
        "late_check_max_ms": round(max(late_ms), 3),
        "period_meters": {p: len(v) for p, v in sorted(snap.period_kwh.items())},
        "steps": steps,
    }


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else METERS
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d), meters=count), indent=2))

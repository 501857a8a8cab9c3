"""The rule check reads totals that include every committed reading.

The check's store keeps window sums between checks (``Store.window_energy``,
valid while each ledger bucket's ``ledger_versions`` count holds) and reads
year totals from the yearly rollup.  These tests commit readings through the
real intake, on its own connection as in the daemon, just before a check on a
second connection that has already checked once, and compare what that check
reads with the physics and with a check on a brand-new connection.  A cache
that missed the late readings (of a closed bucket, of the current bucket, of a
new meter) fails them.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import tomllib
from pathlib import Path

import pytest

from monitor import config
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.rules import evaluate as rules
from monitor.rules.check import build_snapshot
from monitor.store.ledger import Store

H = 3600.0
CFG = """
[site]
id = "s"
category = "individual"
[[sources]]
topic = "x/#"
format = "json"
[intake]
unrated_max_kw = 100
[[rules]]
id = "month"
kind = "energy_cap"
limit_kwh = 100000
conservative = true
[[rules]]
id = "year"
kind = "energy_cap"
period = "calendar_year"
limit_kwh = 1000000
[[rules]]
id = "day"
kind = "energy_cap"
period = "calendar_day"
limit_kwh = 10000
[[rules]]
id = "pcap"
kind = "power_cap"
limit_kw = 1000
window_s = 900
"""


def _msgs(meter: str, kw: float, start: float, end: float, received_at: float | None,
          every_s: float = 60.0, counter0: float = 100.0) -> list[Message]:
    """Counter readings of ``meter`` drawing ``kw`` over ``[start, end]``, each received
    at its own time or, late (a broker's queue drained), all at ``received_at``."""
    out, t = [], start
    while t <= end + 1e-9:
        kwh = counter0 + kw * (t - start) / H
        out.append(Message(f"x/{meter}", (f'{{"meter": "{meter}", "ts": {t}, '
                                          f'"energy_kwh": {kwh:.9f}, "power_w": {kw * 1000}}}'
                                          ).encode(), received_at or t, qos=0))
        t += every_s
    return out


def _same(a: rules.Snapshot, b: rules.Snapshot) -> None:
    """Two snapshots of one committed state read the same totals."""
    assert set(a.window_kwh) == set(b.window_kwh)
    for w, kwh in a.window_kwh.items():
        assert kwh.keys() == b.window_kwh[w].keys(), w
        for m, v in kwh.items():
            assert v == pytest.approx(b.window_kwh[w][m], rel=1e-12, abs=1e-12), (w, m)
    assert a.period_kwh == b.period_kwh
    assert a.period_gap_kwh == b.period_gap_kwh
    assert a.window_covered_s == b.window_covered_s


def _ledger_oracle(db: Path, start: float, end: float) -> dict[str, float]:
    """kWh per meter in ``[start, end]`` straight from the ledger rows, by the rule the
    check documents (``Store.energy_between``): buckets inside count whole, the first
    pro rata, the one still being filled pro rata over ``[bucket, end]``."""
    conn = sqlite3.connect(db)
    out: dict[str, float] = {}
    try:
        for meter, bucket, mwh in conn.execute(
                "SELECT meter, bucket, mwh FROM ledger WHERE bucket >= ? AND bucket < ?",
                (int(start // 900) * 900, end)):
            lo, hi = max(bucket, start), min(bucket + 900, end)
            if hi > lo:
                span = min(900, end - bucket)
                out[meter] = out.get(meter, 0.0) + mwh / 1e6 * min(1.0, (hi - lo) / span)
    finally:
        conn.close()
    return out


def _oracle(snap: rules.Snapshot, db: Path) -> None:
    for w, kwh in snap.window_kwh.items():
        want = _ledger_oracle(db, snap.now - w, snap.now)
        assert kwh.keys() == want.keys(), w
        for m, v in kwh.items():
            assert v == pytest.approx(want[m], rel=1e-12, abs=1e-12), (w, m)


def _fresh_snapshot(db: Path, c: config.Config, now: float) -> rules.Snapshot:
    st = Store(db, migrate_schema=False)
    try:
        return build_snapshot(st, c, now)
    finally:
        st.close()


@pytest.mark.parametrize("offset_s", [0.0, 7.0, 450.0])  # now on, just after, mid-bucket
def test_readings_committed_just_before_a_check_are_in_its_totals(
        tmp_path: Path, offset_s: float) -> None:
    c = config.parse(tomllib.loads(CFG))
    db = tmp_path / "m.db"
    writer = Store(db)  # the intake's connection
    checker = Store(db, migrate_schema=False)  # the check job's, kept between checks
    intake = Intake(c, writer, Metrics())
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC).timestamp() + offset_s
    # meter a: 2 kW for two hours up to a minute before the first check
    intake.handle(_msgs("a", 2.0, now - 2 * H, now - 60, None))
    first = build_snapshot(checker, c, now)
    # the physics, to the ledger's pro-rata share of a bucket the window cuts
    assert first.window_kwh[900.0]["a"] == pytest.approx(2.0 * 840 / H, abs=2e-3)
    assert first.window_kwh[H]["a"] == pytest.approx(2.0 * (H - 60) / H, abs=2e-3)
    _same(first, _fresh_snapshot(db, c, now))
    _oracle(first, db)

    # before the second check (60 s later): meter a's reading of the last minute
    # (the current bucket) and a backlog of meter b, a new meter: 3 kW from 50 to 20
    # minutes ago, received only now -- it writes buckets the first check read closed
    later = now + 60
    intake.handle(_msgs("a", 2.0, now, now, None, counter0=100.0 + 2.0 * (2 * H) / H))
    intake.handle(_msgs("b", 3.0, later - 50 * 60, later - 20 * 60, later))
    second = build_snapshot(checker, c, later)
    _same(second, _fresh_snapshot(db, c, later))
    _oracle(second, db)
    assert second.window_kwh[H]["a"] == pytest.approx(2.0 * (H - 60) / H, abs=2e-3)
    assert second.window_kwh[900.0]["a"] == pytest.approx(2.0 * 840 / H, abs=2e-3)
    # b's half hour (1.5 kWh), less the share of its first bucket the window cuts
    assert 1.45 < second.window_kwh[H]["b"] <= 1.5 + 1e-6
    for period in ("calendar_day", "calendar_month", "calendar_year"):
        assert second.period_kwh[period]["a"] == pytest.approx(4.0, abs=1e-5)
        assert second.period_kwh[period]["b"] == pytest.approx(1.5, abs=1e-5)

    # and once more, with nothing committed in between: the kept sums are still right
    third = build_snapshot(checker, c, later + 5)
    _same(third, _fresh_snapshot(db, c, later + 5))
    _oracle(third, db)
    writer.close()
    checker.close()


def test_yearly_rollup_equals_the_monthly_rows_it_sums(tmp_path: Path) -> None:
    """The year total the check reads (one yearly row per meter) is the sum of that
    meter's monthly rows, across a new year, for every meter."""
    c = config.parse(tomllib.loads(CFG))
    db = tmp_path / "m.db"
    st = Store(db)
    intake = Intake(c, st, Metrics())
    eve = dt.datetime(2026, 12, 31, 22, tzinfo=dt.UTC).timestamp()
    intake.handle(_msgs("a", 4.0, eve, eve + 4 * H, None))
    intake.handle(_msgs("b", 1.0, eve + H, eve + 3 * H, None, every_s=300.0))
    rows = st.conn.execute(
        "SELECT y.meter, y.year, y.mwh, y.gap_kwh, (SELECT sum(mwh) FROM monthly m"
        " WHERE m.meter = y.meter AND substr(m.month, 1, 4) = y.year),"
        " (SELECT sum(gap_kwh) FROM monthly m WHERE m.meter = y.meter"
        " AND substr(m.month, 1, 4) = y.year) FROM yearly y ORDER BY 1, 2").fetchall()
    assert [(m, y) for m, y, *_ in rows] == [("a", "2026"), ("a", "2027"), ("b", "2026"),
                                             ("b", "2027")]
    for _m, _y, mwh, gap, monthly_mwh, monthly_gap in rows:
        assert mwh == monthly_mwh and gap == monthly_gap
    snap = build_snapshot(st, c, eve + 4 * H)
    assert snap.period_kwh["calendar_year"]["a"] == pytest.approx(4.0 * 2, rel=1e-9)
    assert snap.period_kwh["calendar_year"]["b"] == pytest.approx(1.0, rel=1e-9)
    st.close()

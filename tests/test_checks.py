"""The check job's snapshot builder over a real SQLite store."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from monitor import config
from monitor.app.service import Service
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.rules import evaluate as rules
from monitor.rules.check import build_snapshot
from monitor.store.ledger import IntakeBatch, Rollup, Store

CFG = """
[site]
id = "s"
category = "individual"
[[sources]]
topic = "x/#"
format = "json"
[[meters]]
id = "never"
device = "never"
[[rules]]
id = "silent"
kind = "stale_data"
max_silence_s = 60
"""


def test_a_meter_that_never_reported_is_stale_only_after_max_silence_since_start(
        tmp_path: Path) -> None:
    c = config.parse(tomllib.loads(CFG))
    st = Store(tmp_path / "m.db")
    st.register_meters([("never", "never", "")])
    now = 1_790_000_000.0
    fresh = rules.evaluate_all(c.rules, build_snapshot(st, c, now, watching_since=now - 10))
    assert [v.state for v in fresh] == ["ok"]
    # silence must exceed both max_silence_s and the meter's expected interval (300 s)
    later = rules.evaluate_all(c.rules, build_snapshot(st, c, now, watching_since=now - 400))
    assert [v.state for v in later] == ["warning"]
    st.close()


def test_month_and_year_totals_come_from_the_rollup_and_match_the_days(tmp_path: Path) -> None:
    cfg = CFG.replace('''[[rules]]
id = "silent"
kind = "stale_data"
max_silence_s = 60''', '''[[rules]]
id = "month"
kind = "energy_cap"
limit_kwh = 100
[[rules]]
id = "year"
kind = "energy_cap"
period = "calendar_year"
limit_kwh = 1000
[[rules]]
id = "day"
kind = "energy_cap"
period = "calendar_day"
limit_kwh = 10''')
    c = config.parse(tomllib.loads(cfg))
    st = Store(tmp_path / "m.db")
    days = {"2025-12-31": 9.0, "2026-10-31": 1.0, "2026-11-01": 2.0, "2026-11-27": 3.0}
    for i, (day, kwh) in enumerate(days.items()):  # one batch each, and one twice
        for _ in range(2 if i == 3 else 1):
            b = IntakeBatch()
            b.daily[("never", day)] = Rollup(round(kwh * 1e6), 0, 0.5, 10.0)
            st.commit_batch(b)
    assert st.monthly_totals("2026-11", "2026-11") == {"never": (8.0, 1.5)}
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC).timestamp()
    snap = build_snapshot(st, c, now)
    assert snap.period_kwh["calendar_month"] == {"never": 8.0}
    assert snap.period_kwh["calendar_year"] == {"never": 9.0}
    assert snap.period_kwh["calendar_day"] == {"never": 6.0}
    assert snap.period_gap_kwh["calendar_year"] == {"never": 2.0}
    st.close()


def test_window_energy_of_a_fresh_meter_is_divided_by_the_time_it_covers(tmp_path: Path) -> None:
    """A Tasmota at its default 300 s TelePeriod: the last interval before `now` has no
    reading yet, so a 900 s power-cap window would read a third low without scaling."""
    cfg = CFG.replace('''[[rules]]
id = "silent"
kind = "stale_data"
max_silence_s = 60''', '''[[rules]]
id = "pcap"
kind = "power_cap"
limit_kw = 5
window_s = 900''')
    c = config.parse(tomllib.loads(cfg))
    st = Store(tmp_path / "m.db")
    intake = Intake(c, st, Metrics())
    now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC).timestamp()
    msgs = [Message("x/never", f'{{"meter": "never", "ts": {now - 1000 + i * 300}, '
                    f'"energy_kwh": {100 + i * 0.25}}}'.encode(), now, qos=0)
            for i in range(4)]  # 3 kW; the last reading is 100 s before `now`
    intake.handle(msgs)
    snap = build_snapshot(st, c, now)
    # the energy covers the window up to the last reading, and the snapshot says so
    assert snap.window_covered_s[900.0]["never"] == pytest.approx(800.0)
    avg_kw = snap.window_kwh[900.0]["never"] / snap.window_covered_s[900.0]["never"] * 3600
    assert avg_kw == pytest.approx(3.0, rel=1e-6)
    (v,) = rules.evaluate_all(c.rules, snap)
    assert v.value == pytest.approx(3.0, rel=1e-6)
    # a meter that went quiet is not carried forward
    quiet = build_snapshot(st, c, now + 1000)
    assert quiet.window_kwh[900.0].get("never", 0.0) < 0.25
    st.close()


def test_housekeeping_purges_old_finished_webhook_rows_and_keeps_pending(
        tmp_path: Path) -> None:
    c = config.parse(tomllib.loads(CFG + f'[storage]\npath = "{tmp_path / "m.db"}"\n'))
    now = 1_790_000_000.0
    svc = Service(c, clock=lambda: now)
    st = Store(c.storage.path)
    old = now - 40 * 86400
    st.conn.executemany(
        "INSERT INTO webhook_deliveries (event_id, webhook, state, next_at, created_at)"
        " VALUES (?, 'w', ?, 0, ?)",
        [("e1", "delivered", old), ("e2", "undeliverable", old), ("e3", "pending", old),
         ("e4", "delivered", now - 3600)])
    svc._housekeeping()
    left = {r[0] for r in st.conn.execute("SELECT event_id FROM webhook_deliveries")}
    assert left == {"e3", "e4"}
    st.close()

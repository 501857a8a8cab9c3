"""The check job's snapshot builder over a real SQLite store."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

from monitor import config, rules
from monitor.checks import build_snapshot
from monitor.store import IntakeBatch, Store

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
            b.daily[("never", day)] = [kwh, 0.5, 10.0]
            st.commit_batch(b)
    assert st.monthly_totals("2026-11", "2026-11") == {"never": (8.0, 1.5)}
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC).timestamp()
    snap = build_snapshot(st, c, now)
    assert snap.period_kwh["calendar_month"] == {"never": 8.0}
    assert snap.period_kwh["calendar_year"] == {"never": 9.0}
    assert snap.period_kwh["calendar_day"] == {"never": 6.0}
    assert snap.period_gap_kwh["calendar_year"] == {"never": 2.0}
    st.close()

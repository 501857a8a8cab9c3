"""A simulated month through the real intake and store: the check, ``status`` and the report
add the same whole mWh, so at ``value == limit`` they agree to the last digit; and an
unconfigured device raises ``meter.unknown`` once."""

from __future__ import annotations

import datetime as dt
import json
import random
import tomllib
from pathlib import Path

from monitor import config
from monitor.app import status as status_mod
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.report.build import build_report
from monitor.rules import evaluate as rules
from monitor.rules.check import Checker, build_snapshot
from monitor.store.ledger import Store

METERS = 4
STEP_S = 600  # a reading every 10 minutes
CFG = """
[site]
id = "exact"
category = "individual"
timezone = "Asia/Irkutsk"
[[sources]]
topic = "m/#"
format = "json"
{meters}
[[rules]]
id = "monthly-cap"
kind = "energy_cap"
period = "calendar_month"
limit_kwh = {limit}
"""


def test_check_status_and_report_agree_at_value_equal_to_limit(tmp_path: Path) -> None:
    tz = dt.timezone(dt.timedelta(hours=8))
    start = dt.datetime(2026, 11, 1, tzinfo=tz).timestamp()
    end = dt.datetime(2026, 12, 1, tzinfo=tz).timestamp()
    steps = int((end - start) // STEP_S)  # 4,320 intervals in 30 days
    rnd = random.Random(1469)
    # counters in whole Wh as a Tasmota publishes them (3 decimals of kWh), with
    # increments that are not binary fractions: float sums of them drift
    wh = [[1_000_000 + i * 7_777] for i in range(METERS)]
    for _ in range(steps):
        for series in wh:
            series.append(series[-1] + rnd.randint(1, 250))
    per_meter_kwh = [(series[-1] - series[0]) / 1000 for series in wh]
    limit = sum(series[-1] - series[0] for series in wh) / 1000
    meters = "".join(f'[[meters]]\nid = "r{i}"\ndevice = "r{i}"\n' for i in range(METERS))
    c = config.parse(tomllib.loads(CFG.format(meters=meters, limit=limit)))
    st = Store(tmp_path / "m.db")
    intake = Intake(c, st, Metrics())
    batch: list[Message] = []
    for k in range(steps + 1):
        ts = start + k * STEP_S
        for i in range(METERS):
            body = {"meter": f"r{i}", "ts": ts, "energy_kwh": wh[i][k] / 1000}
            # received at the same time: device clocks are bounded by the receipt time
            batch.append(Message(f"m/r{i}", json.dumps(body).encode(), ts + 1))
        if len(batch) >= 2000:
            intake.handle(batch)
            batch = []
    intake.handle(batch)
    now = end - 1

    snap = build_snapshot(st, c, now)
    # exact per meter, not 543.0419999999999 for 543.042 (float sums of the rollups)
    assert snap.period_kwh["calendar_month"] == {
        f"r{i}": per_meter_kwh[i] for i in range(METERS)}
    (verdict,) = rules.evaluate_all(c.rules, snap)
    assert verdict.value == limit
    assert verdict.state == "breach"  # value >= limit, not 1727.9999999 < 1728

    doc = status_mod.build(st, c, now)
    assert doc["totals"]["period_kwh"] == limit
    assert [m["period_kwh"] for m in doc["meters"]] == per_meter_kwh

    report = build_report(st, c, "2026-11", now)
    assert report["totals"]["accounted_kwh"] == limit
    assert [m["accounted_kwh"] for m in report["meters"]] == per_meter_kwh
    st.close()


def test_an_unknown_device_raises_meter_unknown_once(tmp_path: Path) -> None:
    c = config.parse(tomllib.loads(CFG.format(
        meters='[[meters]]\nid = "known"\ndevice = "known"\n', limit=100)))
    st = Store(tmp_path / "m.db")
    intake = Intake(c, st, Metrics())
    now = 1_800_000_000.0
    intake.handle([Message("m/known", b'{"meter": "known", "power_w": 5}', now),
                   Message("m/rig-new", b'{"meter": "rig-new", "power_w": 3000}', now)])
    checker = Checker(c, Metrics(), None, started_at=now - 60)
    first = checker.run(st, now + 10)
    again = checker.run(st, now + 20)
    rows = st.conn.execute("SELECT kind, scope, body FROM events").fetchall()
    unknown = [r for r in rows if r[0] == "meter.unknown"]
    assert len(unknown) == 1 and unknown[0][1] == "meter:rig-new"
    assert "[[meters]]" in json.loads(unknown[0][2])["message"]
    assert first.events >= 1 and again.events == 0
    st.close()

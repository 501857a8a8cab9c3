"""Run rates and power-cap windows that are right from the first minutes, labelled
"warming up" until their window is full, and message figures with enough digits.

The store tests feed real messages through the intake into a real SQLite store and
build the snapshot the check job builds; the old behaviour (dividing by the whole
window however little data exists) fails each of them.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from monitor import config
from monitor.config import EnergyCapRule, PowerCapRule, SiteConfig
from monitor.core.model import Message
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.rules.check import build_snapshot
from monitor.rules.evaluate import (
    RUN_RATE_WINDOW_S,
    MeterSnapshot,
    Snapshot,
    evaluate,
    evaluate_all,
    figure,
)
from monitor.store.ledger import Store

H = 3600.0
# 2026-11-01 00:00 UTC, the first second of the month
MONTH_START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()


def cfg(rules: str, meters: str = "") -> config.Config:
    return config.parse(tomllib.loads(f"""
[site]
id = "s"
category = "individual"
[[sources]]
topic = "x/#"
format = "json"
[intake]
unrated_max_kw = 100
{meters}
{rules}
"""))


def feed(st: Store, c: config.Config, meter: str, kw: float, start: float, end: float,
         every_s: float = 10.0, counter0: float = 100.0) -> None:
    """Counter readings of ``meter`` drawing ``kw`` from ``start`` to ``end`` (inclusive)."""
    intake = Intake(c, st, Metrics())
    msgs, t = [], start
    while t <= end + 1e-9:
        kwh = counter0 + kw * (t - start) / H
        msgs.append(Message(f"x/{meter}", (f'{{"meter": "{meter}", "ts": {t}, '
                                           f'"energy_kwh": {kwh:.9f}, "power_w": {kw * 1000}}}'
                                           ).encode(), t, qos=0))
        t += every_s
    intake.handle(msgs)


MONTHLY = """
[[rules]]
id = "month"
kind = "energy_cap"
period = "calendar_month"
limit_kwh = 6000
"""


def test_two_minutes_of_a_new_meter_project_its_real_power(tmp_path: Path) -> None:
    """The demo's case: 2 minutes at 24.8 kW from a new meter.  Dividing the hour's
    energy by 3,600 s projected ~578 kWh for the month; the real figure is ~17,300."""
    c = cfg(MONTHLY)
    st = Store(tmp_path / "m.db")
    now = dt.datetime(2026, 11, 1, 20, 0, tzinfo=dt.UTC).timestamp()
    feed(st, c, "rig", 24.8, now - 120, now)
    snap = build_snapshot(st, c, now)
    assert snap.window_covered_s[RUN_RATE_WINDOW_S]["rig"] == pytest.approx(120.0)
    (v,) = evaluate_all(c.rules, snap)
    left_h = (dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp() - now) / H
    assert v.value is not None and v.projected is not None
    assert v.detail["run_rate_kw"] == pytest.approx(24.8, rel=1e-3)
    assert v.projected == pytest.approx(v.value + 24.8 * left_h, rel=1e-3)
    assert 17_000 < v.projected < 17_500
    # 6,000 kWh at 24.8 kW: about ten days
    assert v.seconds_to_limit is not None
    assert v.seconds_to_limit / 86400 == pytest.approx((6000 - v.value) / 24.8 / 24, rel=1e-3)
    assert v.detail["warming_up"] is True
    assert v.detail["observed_s"] == pytest.approx(120.0)
    assert "warming up: 2 min of 1 h observed" in v.message
    st.close()


def test_a_full_hour_is_not_warming_up_and_reads_the_same_rate(tmp_path: Path) -> None:
    c = cfg(MONTHLY)
    st = Store(tmp_path / "m.db")
    now = dt.datetime(2026, 11, 10, 20, 0, tzinfo=dt.UTC).timestamp()
    feed(st, c, "rig", 12.0, now - 2 * H, now, every_s=60)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now))
    assert v.detail["run_rate_kw"] == pytest.approx(12.0, rel=1e-3)
    assert v.detail["warming_up"] is False
    assert "warming up" not in v.message
    st.close()


def test_daily_projection_with_12_kw_and_hours_left(tmp_path: Path) -> None:
    """"projected 1.0 kWh by the end of the day" with 12 kW running: wrong by 60 times."""
    c = cfg("""
[[rules]]
id = "day"
kind = "energy_cap"
period = "calendar_day"
limit_kwh = 100
""")
    st = Store(tmp_path / "m.db")
    now = dt.datetime(2026, 11, 27, 18, 30, tzinfo=dt.UTC).timestamp()  # 5.5 h left
    feed(st, c, "rig", 12.0, now - 60, now)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now))
    assert v.value is not None and v.projected is not None
    assert v.projected == pytest.approx(v.value + 12.0 * 5.5, rel=1e-3)
    assert f"projected {figure(v.projected, 100)} kWh by the end of 2026-11-27" in v.message
    st.close()


POWER = """
[[rules]]
id = "pcap"
kind = "power_cap"
limit_kw = 30
window_s = 300
"""


def test_a_power_cap_reads_the_average_over_the_time_observed(tmp_path: Path) -> None:
    """A 300 s power cap read 3 kW while the site drew 24 kW: after 60 s it reads 24."""
    c = cfg(POWER)
    st = Store(tmp_path / "m.db")
    now = 1_795_000_000.0
    feed(st, c, "a", 14.0, now - 60, now)
    feed(st, c, "b", 10.0, now - 60, now, counter0=7.0)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now))
    assert v.value == pytest.approx(24.0, rel=1e-3)
    assert v.detail["warming_up"] is True
    assert v.detail["observed_s"] == pytest.approx(60.0)
    assert v.message == ("average 24.0 kW over 5 min (warming up: 1 min of 5 min observed): "
                         "80% of the limit 30 kW")
    # once the window is full the label goes, and the average is unchanged
    feed(st, c, "a", 14.0, now + 10, now + 300, counter0=100 + 14.0 * 60 / H + 14.0 * 10 / H)
    feed(st, c, "b", 10.0, now + 10, now + 300, counter0=7 + 10.0 * 60 / H + 10.0 * 10 / H)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now + 300))
    assert v.value == pytest.approx(24.0, rel=1e-3)
    assert v.detail["warming_up"] is False
    assert v.message == "average 24.0 kW over 5 min: 80% of the limit 30 kW"
    st.close()


def test_a_warming_up_power_cap_breaches_on_what_it_has_seen(tmp_path: Path) -> None:
    c = cfg(POWER)
    st = Store(tmp_path / "m.db")
    now = 1_795_000_000.0
    feed(st, c, "a", 36.0, now - 30, now)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now))
    assert v.state == "breach"
    assert v.value == pytest.approx(36.0, rel=1e-3)
    assert "warming up: 30 s of 5 min observed" in v.message
    st.close()


def test_a_silent_meter_is_not_carried_forward(tmp_path: Path) -> None:
    """Its silence is time observed with nothing used: half an hour at 10 kW, then
    nothing, is 5 kW over the hour, not 10."""
    c = cfg(MONTHLY)
    st = Store(tmp_path / "m.db")
    now = dt.datetime(2026, 11, 10, 20, 0, tzinfo=dt.UTC).timestamp()
    feed(st, c, "rig", 10.0, now - 2 * H, now - H / 2, every_s=60)
    (v,) = evaluate_all(c.rules, build_snapshot(st, c, now))
    assert v.detail["run_rate_kw"] == pytest.approx(5.0, rel=1e-2)
    st.close()


# --------------------------------------------------------------------------- pure


def site() -> SiteConfig:
    return SiteConfig.model_validate({"id": "s", "timezone": "UTC", "category": "individual"})


def meter(mid: str, first_seen: float | None, group: str = "g") -> MeterSnapshot:
    return MeterSnapshot(id=mid, group=group, rated_kw=None, last_seen=None, online=True,
                         power_w=None, expected_interval_s=10.0, first_seen=first_seen)


def test_each_meter_is_divided_by_its_own_coverage() -> None:
    """An old meter with a full hour at 10 kW and a new one with 2 minutes at 5 kW: 15 kW,
    and the site is not warming up (it has been observed for the whole hour)."""
    now = MONTH_START + 10 * 86400
    s = Snapshot(now=now, site=site(),
                 meters={"old": meter("old", now - 86400), "new": meter("new", now - 120)},
                 period_kwh={"calendar_month": {"old": 2400.0}}, period_gap_kwh={},
                 window_kwh={RUN_RATE_WINDOW_S: {"old": 10.0, "new": 5.0 * 120 / H}},
                 window_covered_s={RUN_RATE_WINDOW_S: {"old": H, "new": 120.0}})
    rule = EnergyCapRule.model_validate({"id": "m", "kind": "energy_cap", "limit_kwh": 6000})
    (v,) = evaluate(rule, s)
    assert v.detail["run_rate_kw"] == pytest.approx(15.0)
    assert v.detail["warming_up"] is False
    group = EnergyCapRule.model_validate({"id": "g", "kind": "energy_cap", "limit_kwh": 6000,
                                          "scope": "meter:new"})
    (g,) = evaluate(group, s)
    assert g.detail["run_rate_kw"] == pytest.approx(5.0)
    assert g.detail["warming_up"] is True


def test_a_snapshot_without_data_yet_is_warming_up_with_no_data() -> None:
    now = MONTH_START + 3600
    s = Snapshot(now=now, site=site(), meters={"a": meter("a", None)},
                 period_kwh={"calendar_month": {}}, period_gap_kwh={},
                 window_kwh={300.0: {}}, window_covered_s={300.0: {}})
    rule = PowerCapRule.model_validate({"id": "p", "kind": "power_cap", "limit_kw": 25,
                                        "window_s": 300})
    (v,) = evaluate(rule, s)
    assert v.value == 0.0
    assert "warming up: no data yet" in v.message


@pytest.mark.parametrize(("value", "limit", "want"), [
    (0.27, 0.3, "0.27 of 0.30"),
    (0.299, 0.3, "0.30 of 0.30"),
    (4812.03, 6000, "4812.0 of 6000"),
    (0.95, 1, "0.95 of 1"),
    (1.35, 1.5, "1.35 of 1.50"),
    (0.045, 0.05, "0.045 of 0.050"),
    (2.44, 2.75, "2.44 of 2.75"),
    (23.96, 25, "24.0 of 25"),
    (1_234_567.8, 2_000_000, "1234567.8 of 2000000"),
])
def test_figures_have_enough_digits_for_their_limit(value: float, limit: float,
                                                    want: str) -> None:
    assert f"{figure(value, limit)} of {figure(limit, limit, exact=True)}" == want


def test_a_small_daily_cap_states_its_figures_to_the_hundredth() -> None:
    """"90% of the daily limit used: 0.3 of 0.3 kWh" said nothing."""
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC).timestamp()
    s = Snapshot(now=now, site=site(), meters={"a": meter("a", now - 86400)},
                 period_kwh={"calendar_day": {"a": 0.27}}, period_gap_kwh={},
                 window_kwh={RUN_RATE_WINDOW_S: {"a": 0.001}})
    rule = EnergyCapRule.model_validate({"id": "d", "kind": "energy_cap", "limit_kwh": 0.3,
                                         "period": "calendar_day", "warn_at": [0.9]})
    (v,) = evaluate(rule, s)
    assert v.message.startswith("90% of the daily limit used: 0.27 of 0.30 kWh; projected 0.28 kWh")

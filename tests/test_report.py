"""The monthly compliance report over a real SQLite store in ``tmp_path``.

Rows are inserted straight into the tables the daemon writes (meters, daily,
ledger, gaps, anomalies, events, orders, alert_state, dead_letters, audit),
including rows just before and just after the month, so the tests pin down
what belongs to a calendar month in the site's time zone: Asia/Irkutsk (UTC+8,
no DST) and Europe/Berlin in October 2026 (DST ends on the 25th: 745 hours).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from monitor import __version__
from monitor.config import Config, parse
from monitor.core import periods
from monitor.core.timefmt import rfc3339
from monitor.report import build as rp
from monitor.report import render as rr
from monitor.report import write as rw
from monitor.store import audit
from monitor.store.ledger import Store

IRK = ZoneInfo("Asia/Irkutsk")
BER = ZoneInfo("Europe/Berlin")
NOV_S = 30 * 86400.0  # November in Irkutsk: no DST
OCT_BERLIN_S = 745 * 3600.0


def local(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0,
          minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def t(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """Irkutsk local time."""
    return local(IRK, year, month, day, hour, minute)


# --------------------------------------------------------------------------- fixtures


def make_config(tmp_path: Path, tz: str, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "site": {"id": "irk-01", "name": "Angarsk container farm", "timezone": tz,
                 "region": "RU-IRK", "subregion": "angarsk", "category": "individual"},
        "sources": [{"topic": "tele/+/SENSOR", "format": "tasmota"}],
        "storage": {"path": str(tmp_path / "monitor.db")},
    }
    data.update(extra)
    return parse(data)


IRK_METERS = [
    {"id": "rack-07", "device": "tasmota/pow7", "group": "hall-a", "rated_kw": 3.5},
    {"id": "rack-08", "device": "tasmota/pow8", "group": "hall-a", "rated_kw": 3.5},
    {"id": "pump", "device": "shelly/pump", "group": "aux"},
    {"id": "spare", "device": "tasmota/spare", "group": "hall-a", "rated_kw": 3.5},
]
IRK_RULES = [
    {"id": "monthly-cap", "kind": "energy_cap", "categories": ["individual"],
     "limit_kwh": 3000, "warn_at": [0.8, 0.95], "source": "PP RF 01.11.2024 No.1469"},
    {"id": "hall-a-cap", "kind": "energy_cap", "scope": "group:hall-a", "limit_kwh": 2000,
     "conservative": True},
    {"id": "company-cap", "kind": "energy_cap", "categories": ["legal_entity"],
     "limit_kwh": 100},
    {"id": "siberia-winter", "kind": "ban_window", "regions": ["RU-IRK"],
     "yearly": {"start": "11-15", "end": "03-15"}, "effective_from": "2025-01-01",
     "effective_until": "2031-03-15"},
    {"id": "peak", "kind": "power_cap", "limit_kw": 20},
]


def insert_meter(st: Store, mid: str, group: str, first_seen: float | None,
                 last_seen: float | None) -> None:
    st.conn.execute(
        "INSERT INTO meters (id, device, grp, format, first_seen, last_seen) VALUES (?,?,?,?,?,?)",
        (mid, f"dev/{mid}", group, "tasmota", first_seen, last_seen))


def insert_daily(st: Store, meter: str, day: str, kwh: float, gap_kwh: float = 0.0,
                 gap_s: float = 0.0) -> None:
    st.conn.execute("INSERT INTO daily (meter, day, mwh, gap_kwh, gap_s) VALUES (?,?,?,?,?)",
                    (meter, day, round(kwh * 1e6), gap_kwh, gap_s))


def insert_event(st: Store, n: int, kind: str, severity: str, rule: str, at: float,
                 **body: Any) -> None:
    full = {"kind": kind, "severity": severity, "rule": rule, "scope": "site", **body}
    st.conn.execute(
        "INSERT INTO events (event_id, kind, severity, rule, scope, at, body)"
        " VALUES (?,?,?,?,?,?,?)",
        (f"ev-{n}", kind, severity, rule, "site", at, json.dumps(full)))


def insert_order(st: Store, oid: str, at: float, state: str) -> None:
    st.conn.execute(
        "INSERT INTO orders (order_id, action, scope, rule, meters, reason, issued_at, state,"
        " updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
        (oid, "shutdown", "group:hall-a", "hall-a-cap", '["rack-07", "rack-08"]',
         "month-to-date 2001 kWh > limit 2000 kWh", at, state, at + 60))


@pytest.fixture
def irk(tmp_path: Path) -> Iterator[tuple[Store, Config]]:
    """November 2026 at an Irkutsk site, with rows either side of the month."""
    cfg = make_config(tmp_path, "Asia/Irkutsk", meters=IRK_METERS, rules=IRK_RULES)
    st = Store(cfg.storage.path)
    insert_meter(st, "rack-07", "hall-a", t(2026, 10, 1), t(2026, 12, 5))
    insert_meter(st, "rack-08", "hall-a", t(2026, 10, 1), t(2026, 11, 20, 12))
    insert_meter(st, "pump", "aux", t(2026, 11, 16), t(2026, 12, 5))
    insert_meter(st, "late", "", t(2026, 12, 3), t(2026, 12, 5))  # appeared after November
    insert_daily(st, "rack-07", "2026-10-31", 999.0)
    insert_daily(st, "rack-07", "2026-12-01", 777.0, 5.0, 600.0)
    for day in range(1, 31):
        gap = (7.0, 7200.0) if day == 10 else (0.0, 0.0)
        insert_daily(st, "rack-07", f"2026-11-{day:02d}", 80.0, *gap)
    insert_daily(st, "rack-08", "2026-11-01", 50.0)
    insert_daily(st, "rack-08", "2026-11-15", 60.5)
    for day in range(16, 31):
        gap = (0.0, 3600.0) if day == 20 else (0.0, 0.0)
        insert_daily(st, "pump", f"2026-11-{day:02d}", 10.0, *gap)
    # gaps: one on Nov 10 (bounded), one unbounded on Nov 20, one before the month
    st.conn.executemany(
        "INSERT INTO gaps (meter, start_ts, end_ts, upper_kwh, reason) VALUES (?,?,?,?,?)",
        [("rack-07", t(2026, 11, 10, 1), t(2026, 11, 10, 3), 7.0, "silence"),
         ("pump", t(2026, 11, 20, 5), t(2026, 11, 20, 6), None, "offline"),
         ("rack-07", t(2026, 10, 20), t(2026, 10, 20, 1), 3.5, "silence")])
    st.conn.executemany(
        "INSERT INTO anomalies (meter, ts, kind, value, detail) VALUES (?,?,?,?,?)",
        [("rack-07", t(2026, 11, 3, 4), "reset", 10234.1, "counter 10234.1 -> 0.2"),
         ("rack-08", t(2026, 11, 7), "quarantine", 55.0, "55 kWh in 60 s exceeds rated"),
         ("rack-08", t(2026, 11, 8), "jitter", -0.001, "counter 5.001 -> 5.0"),
         ("rack-07", t(2026, 10, 31, 23), "reset", 1.0, "October, local time")])
    # the site's largest 15-minute bucket in November: 3 kWh -> 12 kW; a bigger one in December
    st.conn.executemany(
        "INSERT INTO ledger (meter, bucket, mwh) VALUES (?,?,?)",
        [("rack-07", int(t(2026, 11, 12, 3)), 2_000_000),
         ("rack-08", int(t(2026, 11, 12, 3)), 1_000_000),
         ("rack-07", int(t(2026, 11, 12, 4)), 500_000),
         ("rack-07", int(t(2026, 12, 2)), 9_000_000)])
    insert_event(st, 1, "alert.firing", "critical", "monthly-cap", t(2026, 10, 28),
                 period="2026-10", value=3001.0, limit=3000.0, unit="kWh",
                 message="monthly limit reached: 3001 of 3000 kWh in 2026-10")
    insert_event(st, 2, "alert.resolved", "info", "monthly-cap", t(2026, 11, 1, 0, 1),
                 period="2026-10", value=3001.0, message="period 2026-10 is over")
    insert_event(st, 3, "alert.firing", "warning", "monthly-cap", t(2026, 11, 25),
                 period="2026-11", value=2420.0, limit=3000.0, unit="kWh",
                 message="80% of the monthly limit used: 2420 of 3000 kWh")
    insert_event(st, 4, "meter.stale", "warning", "stale", t(2026, 11, 20, 13),
                 message="rack-08 silent for 1h")
    insert_event(st, 5, "alert.resolved", "info", "monthly-cap", t(2026, 12, 1, 0, 1),
                 period="2026-11", value=2660.5, message="period 2026-11 is over")
    insert_event(st, 6, "alert.firing", "warning", "monthly-cap", t(2026, 12, 20),
                 period="2026-12", message="December")
    insert_order(st, "01J-NOV", t(2026, 11, 26), "confirmed")
    insert_order(st, "01J-DEC", t(2026, 12, 2), "failed")
    st.conn.execute(
        "INSERT INTO alert_state (rule, scope, state, level, since, period, data)"
        " VALUES (?,?,?,?,?,?,?)",
        ("monthly-cap", "site", "warning", 0.8, t(2026, 12, 20), "2026-12",
         json.dumps({"value": 2500.0, "limit": 3000, "unit": "kWh"})))
    st.conn.executemany(
        "INSERT INTO dead_letters (received_at, topic, reason, size, payload) VALUES (?,?,?,?,?)",
        [(t(2026, 11, 2), "tele/x/SENSOR", "bad_json", 3, b"{{{"),
         (t(2026, 11, 3), "tele/x/SENSOR", "bad_json", 3, b"}}}"),
         (t(2026, 11, 4), "tele/y/SENSOR", "unknown_format", 1, b"x"),
         (t(2026, 10, 30), "tele/x/SENSOR", "bad_json", 1, b"{")])
    for i, at in enumerate((t(2026, 10, 30), t(2026, 11, 2), t(2026, 11, 26))):
        audit.append(st.conn, "event", {"n": i}, at)
    yield st, cfg
    st.close()


NOW_IRK = local(IRK, 2026, 12, 21)


@pytest.fixture
def irk_report(irk: tuple[Store, Config]) -> dict[str, Any]:
    st, cfg = irk
    return rp.build_report(st, cfg, "2026-11", NOW_IRK)


def meter(report: dict[str, Any], mid: str) -> dict[str, Any]:
    return next(m for m in report["meters"] if m["id"] == mid)


def rule(report: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in report["rules"] if r["id"] == rid)


# --------------------------------------------------------------------------- period


@pytest.mark.parametrize(
    ("period", "tz", "hours", "start_utc", "end_utc"),
    [
        ("2026-11", IRK, 720, "2026-10-31T16:00:00Z", "2026-11-30T16:00:00Z"),
        ("2026-10", BER, 745, "2026-09-30T22:00:00Z", "2026-10-31T23:00:00Z"),
        ("2026-03", BER, 743, "2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z"),
        ("2028-02", ZoneInfo("UTC"), 29 * 24, "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
        ("2026-12", IRK, 744, "2026-11-30T16:00:00Z", "2026-12-31T16:00:00Z"),
    ],
)
def test_period_bounds_are_local_midnights(period: str, tz: ZoneInfo, hours: int,
                                           start_utc: str, end_utc: str) -> None:
    pb = periods.month(period, tz)
    assert pb.seconds == hours * 3600
    assert rfc3339(pb.start_ts) == start_utc and rfc3339(pb.end_ts) == end_utc


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "",
                                 "2026-11-01", "november", "0999-01"])
def test_malformed_period_is_a_clear_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="period"):
        periods.parse_month(bad)


# --------------------------------------------------------------------------- content (Irkutsk)


def test_totals_exclude_neighbouring_months(irk_report: dict[str, Any]) -> None:
    r = irk_report
    assert r["period"]["label"] == "2026-11" and r["period"]["days"] == 30
    assert r["period"]["start_local"] == "2026-11-01T00:00:00+08:00"
    assert r["period"]["end_local"] == "2026-12-01T00:00:00+08:00"
    assert r["period"]["seconds"] == NOV_S and r["period"]["complete"] is True
    # 30 x 80 (rack-07) + 50 + 60.5 (rack-08) + 15 x 10 (pump); Oct 31 and Dec 1 excluded
    assert r["totals"]["accounted_kwh"] == pytest.approx(2400 + 110.5 + 150)
    assert r["totals"]["gap_upper_kwh"] == pytest.approx(7.0)
    assert r["totals"]["conservative_kwh"] == pytest.approx(2660.5 + 7.0)
    assert meter(r, "rack-07")["accounted_kwh"] == pytest.approx(2400.0)
    assert meter(r, "rack-07")["conservative_kwh"] == pytest.approx(2407.0)
    assert meter(r, "rack-08")["accounted_kwh"] == pytest.approx(110.5)


def test_site_identity_software_and_generation_time(irk_report: dict[str, Any]) -> None:
    r = irk_report
    assert r["site"] == {"id": "irk-01", "name": "Angarsk container farm", "region": "RU-IRK",
                         "subregion": "angarsk", "category": "individual",
                         "timezone": "Asia/Irkutsk", "off_grid": False, "owner": "",
                         "inn": "", "address": "", "supply_contract": "", "supply_point": ""}
    assert r["software"] == {"name": "energy-monitor", "version": __version__}
    assert r["generated_at"] == "2026-12-20T16:00:00Z"
    assert r["sha256"] == rp.content_sha256(r)


def test_per_group_and_per_day_splits(irk_report: dict[str, Any]) -> None:
    r = irk_report
    groups = {g["group"]: g for g in r["groups"]}
    assert set(groups) == {"hall-a", "aux"}
    assert groups["hall-a"]["meters"] == ["rack-07", "rack-08", "spare"]
    assert groups["hall-a"]["accounted_kwh"] == pytest.approx(2510.5)
    assert groups["aux"]["accounted_kwh"] == pytest.approx(150.0)
    days = {d["day"]: d for d in r["days"]}
    assert list(days) == [f"2026-11-{i:02d}" for i in range(1, 31)]
    assert days["2026-11-01"]["accounted_kwh"] == pytest.approx(130.0)
    assert days["2026-11-01"]["meters"] == {"pump": 0.0, "rack-07": 80.0, "rack-08": 50.0,
                                             "spare": 0.0}
    assert days["2026-11-10"]["gap_upper_kwh"] == pytest.approx(7.0)
    assert days["2026-11-15"]["accounted_kwh"] == pytest.approx(140.5)
    assert days["2026-11-16"]["accounted_kwh"] == pytest.approx(90.0)
    assert sum(d["accounted_kwh"] for d in r["days"]) == pytest.approx(
        r["totals"]["accounted_kwh"])


def test_meters_listed_are_those_of_the_month(irk_report: dict[str, Any]) -> None:
    ids = [m["id"] for m in irk_report["meters"]]
    assert ids == ["pump", "rack-07", "rack-08", "spare"]  # "late" appeared in December


def test_completeness_from_gaps_first_and_last_seen(irk_report: dict[str, Any]) -> None:
    r = irk_report
    r07 = meter(r, "rack-07")
    assert r07["gap_s"] == 7200.0 and r07["covered_s"] == NOV_S - 7200
    assert r07["completeness"] == pytest.approx(1 - 7200 / NOV_S, abs=1e-6)
    assert r07["completeness_since_first_seen"] == r07["completeness"]
    # rack-08 fell silent on Nov 20, 12:00 local: the rest of the month is not covered
    r08 = meter(r, "rack-08")
    assert r08["completeness"] == pytest.approx((19.5 * 86400) / NOV_S, abs=1e-6)
    # the pump appeared on Nov 16: 15 days observed, one hour of it a gap
    pump = meter(r, "pump")
    assert pump["first_seen"] == "2026-11-15T16:00:00Z"
    assert pump["completeness"] == pytest.approx((15 * 86400 - 3600) / NOV_S, abs=1e-6)
    assert pump["completeness_since_first_seen"] == pytest.approx(
        1 - 3600 / (15 * 86400), abs=1e-6)
    assert pump["gaps"] == 1 and pump["gaps_without_upper_bound"] == 1
    spare = meter(r, "spare")  # configured, never reported
    assert spare["completeness"] == 0.0 and spare["completeness_since_first_seen"] is None
    assert spare["accounted_kwh"] == 0.0 and spare["first_seen"] is None
    assert r["totals"]["gaps_without_upper_bound"] == 1


def test_gaps_overlapping_the_month_only(irk_report: dict[str, Any]) -> None:
    gaps = irk_report["gaps"]
    assert [(g["meter"], g["reason"]) for g in gaps] == [("rack-07", "silence"),
                                                         ("pump", "offline")]
    assert gaps[0]["seconds_in_period"] == 7200.0 and gaps[0]["upper_kwh_in_period"] == 7.0
    assert gaps[1]["upper_kwh_in_period"] is None


def test_anomalies_dead_letters_orders_events(irk_report: dict[str, Any]) -> None:
    r = irk_report
    an = r["anomalies"]
    assert an["total"] == 3 and an["by_kind"] == {"jitter": 1, "quarantine": 1, "reset": 1}
    assert [(a["meter"], a["kind"]) for a in an["items"]] == [("rack-07", "reset"),
                                                              ("rack-08", "quarantine")]
    assert meter(r, "rack-08")["anomalies"] == {"jitter": 1, "quarantine": 1}
    assert r["dead_letters"] == {"count": 3, "by_reason": {"bad_json": 2, "unknown_format": 1}}
    orders = r["orders"]
    assert orders["total"] == 1 and orders["by_outcome"] == {"confirmed": 1}
    o = orders["items"][0]
    assert o["order_id"] == "01J-NOV" and o["outcome"] == "confirmed"
    assert o["meters"] == ["rack-07", "rack-08"] and o["issued_at"] == "2026-11-25T16:00:00Z"
    assert r["events"]["by_kind"] == {"alert.firing": 1, "alert.resolved": 1, "meter.stale": 1}


def test_energy_cap_outcome_and_alerts(irk_report: dict[str, Any]) -> None:
    cap = rule(irk_report, "monthly-cap")
    assert cap["in_force"] is True and cap["source"] == "PP RF 01.11.2024 No.1469"
    assert cap["limit"] == 3000 and cap["unit"] == "kWh"
    assert cap["used"] == pytest.approx(2660.5)
    assert cap["used_share"] == pytest.approx(2660.5 / 3000, abs=1e-6)
    assert cap["measured_state"] == "warning" and cap["worst_state"] == "warning"
    # the October breach ended with October: November starts at ok
    assert cap["state_at_start"] == "ok"
    # October's closing event (written on Nov 1) belongs to October; November's
    # (written on Dec 1) to November
    alerts = [(a["kind"], a["period"], a["after_period_end"]) for a in cap["alerts"]]
    assert alerts == [("alert.firing", "2026-11", False), ("alert.resolved", "2026-11", True)]
    assert cap["alerts_firing"] == 1 and cap["alerts_resolved"] == 1
    assert cap["alerts"][0]["value"] == 2420.0 and cap["alerts"][0]["state"] == "warning"
    assert cap["state_now"][0]["period"] == "2026-12"


def test_conservative_group_cap_and_rules_not_in_force(irk_report: dict[str, Any]) -> None:
    hall = rule(irk_report, "hall-a-cap")
    assert hall["scope"] == "group:hall-a"
    assert hall["used"] == pytest.approx(2510.5 + 7.0)  # conservative: gap bound counted
    assert hall["measured"]["accounted_kwh"] == pytest.approx(2510.5)
    assert hall["measured_state"] == "breach"
    company = rule(irk_report, "company-cap")
    assert company["in_force"] is False and "outside the rule's filters" in (
        company["not_in_force_reason"])
    assert company["measured_state"] == "ok" and company["worst_state"] == "ok"


def test_ban_window_energy_on_banned_days(irk_report: dict[str, Any]) -> None:
    ban = rule(irk_report, "siberia-winter")
    m = ban["measured"]
    assert ban["in_force"] is True
    assert m["banned_days"] == 16 and m["first_banned_day"] == "2026-11-15"
    assert m["kwh_on_banned_days"] == pytest.approx(16 * 80 + 60.5 + 15 * 10)
    assert ban["worst_state"] == "breach"


def test_off_grid_site_is_exempt_from_the_ban(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "Asia/Irkutsk", rules=IRK_RULES[3:4])
    cfg = cfg.model_copy(update={"site": cfg.site.model_copy(update={"off_grid": True})})
    st = Store(cfg.storage.path)
    insert_daily(st, "m", "2026-11-20", 5.0)
    ban = rule(rp.build_report(st, cfg, "2026-11", NOW_IRK), "siberia-winter")
    st.close()
    assert ban["in_force"] is False and ban["not_in_force_reason"].startswith("exempt")
    assert ban["measured"]["kwh_on_banned_days"] == 5.0 and ban["worst_state"] == "ok"


def test_power_cap_peak_from_the_ledger(irk_report: dict[str, Any]) -> None:
    peak = rule(irk_report, "peak")
    assert peak["used"] == pytest.approx(12.0) and peak["unit"] == "kW"
    assert peak["measured"]["peak_at"] == "2026-11-11T19:00:00Z"
    assert irk_report["totals"]["peak_15min_kw"] == pytest.approx(12.0)


def test_audit_head_count_and_verification(irk: tuple[Store, Config]) -> None:
    st, cfg = irk
    r = rp.build_report(st, cfg, "2026-11", NOW_IRK)["audit"]
    last = st.conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    assert r["entries"] == 3 and r["entries_in_period"] == 2
    assert (r["head_seq"], r["head_hash"]) == (last[0], last[1])
    assert r["verified"] is True and r["checked"] == 3
    st.conn.execute("UPDATE audit SET body = '{\"n\":9}' WHERE seq = 2")
    broken = rp.build_report(st, cfg, "2026-11", NOW_IRK)["audit"]
    assert broken["verified"] is False and broken["first_bad_seq"] == 2


def test_report_is_deterministic_for_the_same_now(irk: tuple[Store, Config]) -> None:
    st, cfg = irk
    a = rp.build_report(st, cfg, "2026-11", NOW_IRK)
    b = rp.build_report(st, cfg, "2026-11", NOW_IRK)
    assert a == b and rr.to_json(a) == rr.to_json(b)


def test_month_in_progress_is_assessed_up_to_now(irk: tuple[Store, Config]) -> None:
    st, cfg = irk
    now = local(IRK, 2026, 11, 11)
    r = rp.build_report(st, cfg, "2026-11", now)
    assert r["period"]["complete"] is False and r["period"]["assessed_s"] == 10 * 86400
    r07 = meter(r, "rack-07")
    # the daily rows of later days exist in this synthetic store; coverage is up to now
    assert r07["completeness"] == pytest.approx(1 - 7200 / (10 * 86400), abs=1e-6)
    assert meter(r, "pump")["completeness_since_first_seen"] is None


# --------------------------------------------------------------------------- Berlin, DST


@pytest.fixture
def berlin(tmp_path: Path) -> Iterator[tuple[Store, Config]]:
    cfg = make_config(
        tmp_path, "Europe/Berlin",
        meters=[{"id": "m1", "device": "tasmota/m1", "group": "g", "rated_kw": 1.0}],
        rules=[{"id": "daily", "kind": "energy_cap", "period": "calendar_day",
                "limit_kwh": 24.5},
               {"id": "yearly", "kind": "energy_cap", "period": "calendar_year",
                "limit_kwh": 10000}])
    st = Store(cfg.storage.path)
    insert_meter(st, "m1", "g", local(BER, 2026, 9, 1), local(BER, 2026, 11, 5))
    insert_daily(st, "m1", "2026-09-30", 500.0)
    insert_daily(st, "m1", "2026-11-01", 600.0)
    insert_daily(st, "m1", "2025-12-31", 7.0)  # last year: not in this year's total
    insert_daily(st, "old", "2026-02-10", 30.0)  # a meter gone by October: still the site's
    for day in range(1, 32):
        # the 25th has 25 hours; an hour of it is a gap bounded by 1 kWh
        kwh, gap_kwh, gap_s = (24.0, 1.0, 3600.0) if day == 25 else (24.0, 0.0, 0.0)
        insert_daily(st, "m1", f"2026-10-{day:02d}", kwh, gap_kwh, gap_s)
    yield st, cfg
    st.close()


def test_berlin_october_has_745_hours(berlin: tuple[Store, Config]) -> None:
    st, cfg = berlin
    r = rp.build_report(st, cfg, "2026-10", local(BER, 2026, 11, 10))
    per = r["period"]
    assert per["seconds"] == OCT_BERLIN_S and per["hours"] == 745 and per["days"] == 31
    assert per["start_local"] == "2026-10-01T00:00:00+02:00"
    assert per["end_local"] == "2026-11-01T00:00:00+01:00"
    assert per["start_utc"] == "2026-09-30T22:00:00Z" and per["end_utc"] == "2026-10-31T23:00:00Z"
    assert r["totals"]["accounted_kwh"] == pytest.approx(31 * 24.0)
    assert r["totals"]["conservative_kwh"] == pytest.approx(31 * 24.0 + 1.0)
    m1 = meter(r, "m1")
    assert m1["covered_s"] == OCT_BERLIN_S - 3600
    assert m1["completeness"] == pytest.approx(1 - 3600 / OCT_BERLIN_S, abs=1e-6)
    daily = rule(r, "daily")  # conservative off: 24 kWh a day, all under 24.5
    assert daily["measured"]["days_over_limit"] == 0 and daily["used"] == 24.0
    yearly = rule(r, "yearly")
    assert yearly["used"] == pytest.approx(30 + 500 + 31 * 24.0)  # Feb, Sep 30, October
    assert [m["id"] for m in r["meters"]] == ["m1"]


# --------------------------------------------------------------------------- empty period


def test_empty_period_gives_zeros_not_a_crash(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "Asia/Irkutsk", meters=IRK_METERS[:2], rules=IRK_RULES)
    st = Store(cfg.storage.path)
    r = rp.build_report(st, cfg, "2027-02", local(IRK, 2027, 3, 2))
    st.close()
    assert r["totals"]["accounted_kwh"] == 0.0 and r["totals"]["completeness"] == 0.0
    assert all(m["completeness"] == 0.0 and m["accounted_kwh"] == 0.0 for m in r["meters"])
    assert len(r["days"]) == 28 and all(d["accounted_kwh"] == 0.0 for d in r["days"])
    assert r["audit"]["entries"] == 0 and r["audit"]["head_hash"] is None
    assert r["orders"]["total"] == 0 and r["dead_letters"]["count"] == 0
    assert rule(r, "monthly-cap")["used_share"] == 0.0
    assert rule(r, "peak")["measured"]["peak_at"] is None
    for text in (rr.to_json(r), rr.to_csv(r), rr.to_html(r)):
        assert text


def test_store_without_meters_or_config_meters(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC")
    st = Store(cfg.storage.path)
    start = local(ZoneInfo("UTC"), 2026, 1, 1)
    r = rp.build_report(st, cfg, "2026-01", start)  # generated as the month begins
    st.close()
    assert r["meters"] == [] and r["totals"]["completeness"] == 0.0
    assert r["period"]["assessed_s"] == 0.0 and r["period"]["complete"] is False
    assert rr.parse_csv(rr.to_csv(r))["energy_by_day_kwh"][-1]["day"] == "total"
    _check_html(rr.to_html(r))


# --------------------------------------------------------------------------- formats


def test_json_round_trips_and_carries_its_digest(irk_report: dict[str, Any]) -> None:
    text = rr.to_json(irk_report)
    back = json.loads(text)
    assert back == irk_report
    assert back["sha256"] == rp.content_sha256(back)
    body = {k: v for k, v in back.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert back["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    back["totals"]["accounted_kwh"] = 1.0  # an edited report no longer matches
    assert rp.content_sha256(back) != irk_report["sha256"]


def test_csv_parses_with_the_csv_module(irk_report: dict[str, Any]) -> None:
    text = rr.to_csv(irk_report)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["[report]"] and rows[1] == ["field", "value"]
    sections = rr.parse_csv(text)
    assert list(sections)[:3] == ["report", "energy_by_day_kwh", "meters"]
    meta = {row["field"]: row["value"] for row in sections["report"]}
    assert meta["site.id"] == "irk-01" and meta["period.label"] == "2026-11"
    assert float(meta["totals.accounted_kwh"]) == pytest.approx(2660.5)
    assert meta["sha256"] == irk_report["sha256"]
    days = sections["energy_by_day_kwh"]
    assert len(days) == 31 and days[-1]["day"] == "total"
    assert list(days[0]) == ["day", "pump", "rack-07", "rack-08", "spare",
                             "site_accounted_kwh", "site_gap_upper_kwh",
                             "site_conservative_kwh"]
    assert float(days[0]["rack-08"]) == 50.0 and float(days[0]["site_accounted_kwh"]) == 130.0
    assert float(days[-1]["rack-07"]) == 2400.0
    assert sum(float(d["site_accounted_kwh"]) for d in days[:-1]) == pytest.approx(2660.5)
    assert {r["id"] for r in sections["meters"]} == {"pump", "rack-07", "rack-08", "spare"}
    assert [o["order_id"] for o in sections["orders"]] == ["01J-NOV"]
    assert {r["id"]: r["in_force"] for r in sections["rules"]}["company-cap"] == "false"
    assert len(sections["anomalies"]) == 2 and len(sections["alerts"]) == 2


class _Checker(HTMLParser):
    VOID = frozenset({"meta", "br", "hr", "img", "link", "input", "col"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.extend(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_html(text: str) -> _Checker:
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.errors == [] and p.stack == []
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert not any(k in ("src", "href") for k, _ in p.attrs)  # no external assets
    return p


def test_html_is_well_formed_self_contained_and_has_the_totals(
        irk_report: dict[str, Any]) -> None:
    p = _check_html(rr.to_html(irk_report))
    text = " ".join(p.text)
    assert "2,660.500 kWh" in text and "2,667.500 kWh" in text  # accounted, conservative
    assert "irk-01" in text and "2026-11" in text and "Asia/Irkutsk" in text
    assert irk_report["sha256"] in text and __version__ in text
    assert "01J-NOV" in text and irk_report["audit"]["head_hash"] in text


def test_html_escapes_what_it_prints(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC")
    cfg = cfg.model_copy(update={"site": cfg.site.model_copy(
        update={"name": "<script>alert(1)</script> & Co"})})
    st = Store(cfg.storage.path)
    r = rp.build_report(st, cfg, "2026-01", local(ZoneInfo("UTC"), 2026, 2, 1))
    st.close()
    out = rr.to_html(r)
    assert "<script>" not in out and "&lt;script&gt;" in out
    _check_html(out)


# --------------------------------------------------------------------------- run()


def test_run_writes_each_format(irk: tuple[Store, Config], tmp_path: Path) -> None:
    st, cfg = irk
    expected = rp.build_report(st, cfg, "2026-11", NOW_IRK)
    for fmt in rr.FORMATS:
        out = tmp_path / f"r.{fmt}"
        err = io.StringIO()
        assert rw.run(cfg, "2026-11", fmt, out, now=NOW_IRK, stderr=err) == 0
        assert "written to" in err.getvalue()
        with out.open(encoding="utf-8", newline="") as fh:
            assert fh.read() == rr.RENDERERS[fmt](expected)
    buf = io.StringIO()
    assert rw.run(cfg, "2026-11", "json", None, now=NOW_IRK, stdout=buf) == 0
    assert json.loads(buf.getvalue())["totals"]["accounted_kwh"] == pytest.approx(2660.5)


def test_run_rejects_bad_period_and_format_before_opening(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC")
    with pytest.raises(ValueError, match="YYYY-MM"):
        rw.run(cfg, "2026-1", "json", None)
    with pytest.raises(ValueError, match="format"):
        rw.run(cfg, "2026-01", "pdf", None)
    assert not Path(cfg.storage.path).exists()


def test_run_without_a_store_fails_cleanly(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "UTC")
    err = io.StringIO()
    now = local(ZoneInfo("UTC"), 2026, 2, 1)
    assert rw.run(cfg, "2026-01", "json", None, now=now, stderr=err) == 1
    assert "no store" in err.getvalue()


def test_run_reports_an_unwritable_output(irk: tuple[Store, Config], tmp_path: Path) -> None:
    _, cfg = irk
    err = io.StringIO()
    target = tmp_path / "missing-dir" / "r.json"
    assert rw.run(cfg, "2026-11", "json", target, now=NOW_IRK, stderr=err) == 1
    assert "cannot write" in err.getvalue() and not target.exists()


# --------------------------------------------------------------------------- docs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "report.md"


def test_docs_name_every_key_and_csv_section(irk_report: dict[str, Any]) -> None:
    text = DOCS.read_text(encoding="utf-8")
    for key in irk_report:
        assert f"`{key}`" in text, f"docs/report.md does not describe key {key!r}"
    for key in (*irk_report["period"], *irk_report["totals"], *irk_report["audit"]):
        assert f"`{key}`" in text, f"docs/report.md does not describe {key!r}"
    for section in rr.csv_sections(irk_report):
        assert f"`[{section}]`" in text, f"docs/report.md lacks CSV section {section!r}"


def test_docs_digest_recipe_checks_a_report(irk_report: dict[str, Any]) -> None:
    doc = json.loads(rr.to_json(irk_report))
    claimed = doc.pop("sha256")
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == claimed


def test_build_reads_one_snapshot_and_leaves_no_transaction(irk: tuple[Store, Config]) -> None:
    st, cfg = irk
    rp.build_report(st, cfg, "2026-11", NOW_IRK)
    assert not st.conn.in_transaction
    st.conn.execute("BEGIN")  # a caller's own read transaction is left to the caller
    rp.build_report(st, cfg, "2026-11", NOW_IRK)
    assert st.conn.in_transaction
    st.conn.execute("ROLLBACK")
    with pytest.raises(ValueError, match="YYYY-MM"):
        rp.build_report(st, cfg, "2026-13", NOW_IRK)
    assert not st.conn.in_transaction

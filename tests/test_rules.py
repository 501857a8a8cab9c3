"""Pure rule evaluation: periods, filters, energy and power caps (now is always injected)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from monitor.config import (
    BanWindowRule,
    EnergyCapRule,
    PowerCapRule,
    ReconcileRule,
    SiteConfig,
    StaleDataRule,
)
from monitor.core.periods import period_bounds
from monitor.rules.evaluate import (
    RUN_RATE_WINDOW_S,
    AnyRule,
    MeterSnapshot,
    Snapshot,
    SnapshotError,
    applies,
    evaluate,
    evaluate_all,
    periods_needed,
    windows_needed,
)

H = 3600.0


def ts(tz: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=ZoneInfo(tz)).timestamp()


def site(**kw: Any) -> SiteConfig:
    return SiteConfig.model_validate(
        {"id": "s1", "timezone": "UTC", "category": "legal_entity", **kw})


def energy(**kw: Any) -> EnergyCapRule:
    return EnergyCapRule.model_validate(
        {"id": "cap", "kind": "energy_cap", "limit_kwh": 6000, **kw})


def power(**kw: Any) -> PowerCapRule:
    return PowerCapRule.model_validate({"id": "pcap", "kind": "power_cap", "limit_kw": 100, **kw})


def meter(mid: str, group: str = "", **kw: Any) -> MeterSnapshot:
    base: dict[str, Any] = {"rated_kw": None, "last_seen": None, "online": True,
                            "power_w": None, "expected_interval_s": 60.0}
    base.update(kw)
    return MeterSnapshot(id=mid, group=group, **base)


def snap(
    now: float,
    *,
    tz: str = "UTC",
    meters: Mapping[str, MeterSnapshot] | None = None,
    period: Mapping[str, Mapping[str, float]] | None = None,
    gaps: Mapping[str, Mapping[str, float]] | None = None,
    windows: Mapping[float, Mapping[str, float]] | None = None,
    **site_kw: Any,
) -> Snapshot:
    return Snapshot(
        now=now,
        site=site(timezone=tz, **site_kw),
        meters=meters or {},
        period_kwh=period or {},
        period_gap_kwh=gaps or {},
        window_kwh=windows or {},
    )


# --------------------------------------------------------------------------- period bounds


@pytest.mark.parametrize(
    ("tz", "last_second", "label_before", "label_after"),
    [
        ("Asia/Irkutsk", (2026, 11, 30, 23, 59, 59), "2026-11", "2026-12"),
        ("Asia/Irkutsk", (2026, 12, 31, 23, 59, 59), "2026-12", "2027-01"),
        ("Europe/Moscow", (2026, 1, 31, 23, 59, 59), "2026-01", "2026-02"),
        ("Europe/Moscow", (2028, 2, 29, 23, 59, 59), "2028-02", "2028-03"),
    ],
)
def test_month_ends_in_site_time_zone(
    tz: str, last_second: tuple[int, int, int, int, int, int], label_before: str, label_after: str
) -> None:
    before = ts(tz, *last_second)
    start, end, label = period_bounds("calendar_month", before, tz)
    assert label == label_before
    assert end == before + 1
    start2, _, label2 = period_bounds("calendar_month", before + 1, tz)
    assert (start2, label2) == (end, label_after)
    # the same instant is still the previous month in UTC+0 only when the offset says so
    assert dt.datetime.fromtimestamp(start, ZoneInfo(tz)).day == 1


def test_irkutsk_month_differs_from_utc_month() -> None:
    # 2026-11-30 20:00 UTC is already 2026-12-01 04:00 in Irkutsk (UTC+8)
    now = ts("UTC", 2026, 11, 30, 20, 0)
    assert period_bounds("calendar_month", now, "Asia/Irkutsk")[2] == "2026-12"
    assert period_bounds("calendar_month", now, "UTC")[2] == "2026-11"


@pytest.mark.parametrize(
    ("tz", "day", "hours"),
    [
        ("Europe/Berlin", (2026, 10, 25), 25),
        ("Europe/Berlin", (2026, 3, 29), 23),
        ("America/Chicago", (2026, 11, 1), 25),
        ("America/Chicago", (2026, 3, 8), 23),
        ("Europe/Moscow", (2026, 10, 25), 24),
    ],
)
def test_dst_days_have_their_real_length(tz: str, day: tuple[int, int, int], hours: int) -> None:
    for hour in (0, 1, 12, 23):
        start, end, label = period_bounds("calendar_day", ts(tz, *day, hour, 30), tz)
        assert label == dt.date(*day).isoformat()
        assert end - start == hours * H
        assert start == ts(tz, *day, 0, 0)


def test_dst_months_have_their_real_length() -> None:
    _, _, label = period_bounds("calendar_month", ts("Europe/Berlin", 2026, 10, 25, 2, 30),
                                "Europe/Berlin")
    assert label == "2026-10"
    start, end, _ = period_bounds("calendar_month", ts("Europe/Berlin", 2026, 10, 1),
                                  "Europe/Berlin")
    assert end - start == (31 * 24 + 1) * H
    start, end, _ = period_bounds("calendar_month", ts("America/Chicago", 2026, 3, 8, 12),
                                  "America/Chicago")
    assert end - start == (31 * 24 - 1) * H
    start, end, _ = period_bounds("calendar_month", ts("America/Chicago", 2026, 11, 1, 1, 30),
                                  "America/Chicago")
    assert end - start == (30 * 24 + 1) * H


def test_the_repeated_hour_belongs_to_the_same_day() -> None:
    tz = "America/Chicago"
    first_130 = ts("UTC", 2026, 11, 1, 6, 30)  # 01:30 CDT
    second_130 = first_130 + H  # 01:30 CST
    zone = ZoneInfo(tz)
    assert dt.datetime.fromtimestamp(first_130, zone).strftime("%H:%M %Z") == "01:30 CDT"
    assert dt.datetime.fromtimestamp(second_130, zone).strftime("%H:%M %Z") == "01:30 CST"
    assert period_bounds("calendar_day", first_130, tz) == period_bounds(
        "calendar_day", second_130, tz)


def test_29_february_2028() -> None:
    tz = "Asia/Irkutsk"
    now = ts(tz, 2028, 2, 29, 12)
    start, end, label = period_bounds("calendar_day", now, tz)
    assert label == "2028-02-29"
    assert end - start == 24 * H
    start, end, label = period_bounds("calendar_month", now, tz)
    assert label == "2028-02"
    assert end - start == 29 * 24 * H
    start, end, label = period_bounds("calendar_year", now, tz)
    assert label == "2028"
    assert end - start == 366 * 24 * H
    assert period_bounds("calendar_day", ts(tz, 2028, 3, 1), tz)[2] == "2028-03-01"


def test_unknown_period_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        period_bounds("rolling_days", 0.0, "UTC")


# --------------------------------------------------------------------------- applies


def test_applies_filters() -> None:
    day = dt.date(2026, 1, 10)
    irk = site(region="RU-IRK", subregion="angarsk", category="individual")
    assert applies(energy(categories=["individual"]), irk, day)
    assert not applies(energy(categories=["legal_entity"]), irk, day)
    assert applies(energy(categories=["Individual"]), irk, day)
    assert applies(energy(regions=["RU-IRK"]), irk, day)
    assert applies(energy(regions=["ru-irk"]), irk, day)
    assert applies(energy(regions=["RU"]), irk, day)  # a bare country code: every RU-*
    assert not applies(energy(regions=["RU-BU"]), irk, day)
    assert not applies(energy(regions=["RU-I"]), irk, day)
    assert applies(energy(subregions=["angarsk", "irkutsk"]), irk, day)
    assert not applies(energy(subregions=["bratsk"]), irk, day)
    assert not applies(energy(exclude_subregions=["angarsk"]), irk, day)
    assert applies(energy(exclude_subregions=["bratsk"]), irk, day)
    no_sub = site(region="RU-IRK")
    assert not applies(energy(subregions=["angarsk"]), no_sub, day)
    assert applies(energy(exclude_subregions=["angarsk"]), no_sub, day)


def test_effective_dates_are_inclusive() -> None:
    rule = energy(effective_from="2025-01-01", effective_until="2031-03-15")
    s = site()
    assert not applies(rule, s, dt.date(2024, 12, 31))
    assert applies(rule, s, dt.date(2025, 1, 1))
    assert applies(rule, s, dt.date(2031, 3, 15))
    assert not applies(rule, s, dt.date(2031, 3, 16))


def test_off_grid_exempts_ban_windows_only() -> None:
    ban = BanWindowRule.model_validate(
        {"id": "ban", "kind": "ban_window",
         "dates": [{"from": "2025-01-01", "until": "2031-03-15"}]})
    strict = ban.model_copy(update={"exempt_off_grid": False})
    day = dt.date(2026, 1, 10)
    assert not applies(ban, site(off_grid=True), day)
    assert applies(ban, site(off_grid=False), day)
    assert applies(strict, site(off_grid=True), day)
    assert applies(energy(), site(off_grid=True), day)


def test_windows_and_periods_needed() -> None:
    rules: list[AnyRule] = [
        energy(period="calendar_day"),
        power(window_s=900),
        ReconcileRule.model_validate({"id": "rec", "kind": "reconcile", "main": "meter:m",
                                      "parts": "group:g", "window_s": 1800}),
        StaleDataRule.model_validate({"id": "st", "kind": "stale_data"}),
    ]
    assert windows_needed(rules) == {900.0, 1800.0, RUN_RATE_WINDOW_S}
    assert periods_needed(rules) == {"calendar_day"}
    assert windows_needed([power(window_s=60)]) == {60.0}


# --------------------------------------------------------------------------- energy cap


def test_projection_on_a_steady_load() -> None:
    # 10 kW steady since the month began; 15 of 30 days gone in November
    now = ts("Asia/Irkutsk", 2026, 11, 16)
    s = snap(now, tz="Asia/Irkutsk", meters={"a": meter("a")},
             period={"calendar_month": {"a": 3600.0}},
             windows={RUN_RATE_WINDOW_S: {"a": 10.0}})
    (v,) = evaluate(energy(), s)
    assert v.state == "ok"
    assert v.value == pytest.approx(3600.0)
    assert v.ratio == pytest.approx(0.6)
    assert v.projected == pytest.approx(7200.0)
    assert v.seconds_to_limit == pytest.approx(240 * H)  # 2400 kWh at 10 kW
    assert v.target_kw == pytest.approx(2400.0 / 360)  # remaining budget over the time left
    assert v.period == "2026-11"
    assert v.unit == "kWh"
    assert v.meters == ("a",)
    assert v.detail["run_rate_kw"] == pytest.approx(10.0)


def test_warn_levels_and_breach() -> None:
    now = ts("UTC", 2026, 11, 27, 2)

    def at(kwh: float) -> Any:
        s = snap(now, period={"calendar_month": {"a": kwh}}, windows={RUN_RATE_WINDOW_S: {}})
        return evaluate(energy(), s)[0]

    assert (at(4700).state, at(4700).level) == ("ok", 0.0)
    v = at(4812.0)
    assert (v.state, v.level) == ("warning", 0.8)
    assert v.message.startswith("80% of the monthly limit used: 4812.0 of 6000 kWh")
    assert (at(5700).state, at(5700).level) == ("warning", 0.95)
    v = at(6000)
    assert (v.state, v.level, v.target_kw, v.seconds_to_limit) == ("breach", 1.0, 0.0, 0.0)
    assert "limit reached" in v.message
    assert at(5000).seconds_to_limit is None  # no load: never


def test_conservative_counts_gaps_at_their_upper_bound() -> None:
    now = ts("UTC", 2026, 11, 27)
    kw: dict[str, Any] = {"period": {"calendar_month": {"a": 5000.0}},
                          "gaps": {"calendar_month": {"a": 900.0}},
                          "windows": {RUN_RATE_WINDOW_S: {}}}
    plain = evaluate(energy(), snap(now, **kw))[0]
    cons = evaluate(energy(conservative=True), snap(now, **kw))[0]
    assert plain.value == 5000.0
    assert plain.detail["gap_kwh"] == 900.0
    assert cons.value == 5900.0
    assert cons.level == 0.95
    assert "data gaps" in cons.message
    with pytest.raises(SnapshotError, match="period_gap_kwh"):
        evaluate(energy(conservative=True),
                 snap(now, period={"calendar_month": {}}, windows={RUN_RATE_WINDOW_S: {}}))


def test_scopes_sum_the_right_meters() -> None:
    now = ts("UTC", 2026, 11, 27)
    meters = {"a1": meter("a1", "a"), "a2": meter("a2", "a"), "b1": meter("b1", "b")}
    s = snap(now, meters=meters,
             period={"calendar_day": {"a1": 1.0, "a2": 2.0, "b1": 4.0, "gone": 8.0}},
             windows={RUN_RATE_WINDOW_S: {"a1": 0.5, "b1": 0.25}})
    site_v = evaluate(energy(period="calendar_day", limit_kwh=100), s)[0]
    group_v = evaluate(energy(period="calendar_day", limit_kwh=100, scope="group:a"), s)[0]
    meter_v = evaluate(energy(period="calendar_day", limit_kwh=100, scope="meter:b1"), s)[0]
    assert site_v.value == 15.0  # a meter no longer configured still used energy
    assert site_v.meters == ("a1", "a2", "b1")
    assert group_v.value == 3.0
    assert group_v.meters == ("a1", "a2")
    assert group_v.detail["run_rate_kw"] == pytest.approx(0.5)
    assert meter_v.value == 4.0
    assert meter_v.meters == ("b1",)
    assert site_v.period == "2026-11-27"


def test_missing_totals_raise_snapshot_error() -> None:
    now = ts("UTC", 2026, 11, 27)
    with pytest.raises(SnapshotError, match="calendar_month"):
        evaluate(energy(), snap(now, windows={RUN_RATE_WINDOW_S: {}}))
    with pytest.raises(SnapshotError, match="3600"):
        evaluate(energy(), snap(now, period={"calendar_month": {}}))
    with pytest.raises(SnapshotError, match="900"):
        evaluate(power(), snap(now))


# --------------------------------------------------------------------------- power cap


def test_power_cap_averages_over_the_window() -> None:
    now = ts("UTC", 2026, 11, 27)
    meters = {"a": meter("a", "g"), "b": meter("b", "g")}

    def at(kwh_a: float, **kw: Any) -> Any:
        s = snap(now, meters=meters, windows={900.0: {"a": kwh_a, "b": 5.0}})
        return evaluate(power(**kw), s)[0]

    v = at(15.0)  # 20 kWh in 15 min = 80 kW
    assert (v.state, v.value, v.ratio, v.unit) == ("ok", 80.0, 0.8, "kW")
    v = at(18.0)  # 92 kW
    assert (v.state, v.level) == ("warning", 0.9)
    v = at(20.0)  # 100 kW
    assert (v.state, v.level) == ("breach", 1.0)
    assert v.target_kw == pytest.approx(95.0)  # limit x clear_below, so the breach can clear
    v = at(20.0, scope="group:g", limit_kw=200)
    assert (v.state, v.value, v.meters) == ("ok", 100.0, ("a", "b"))


# --------------------------------------------------------------------------- evaluate_all


def test_evaluate_all_skips_other_sites_and_reports_rules_not_in_effect() -> None:
    now = ts("Asia/Irkutsk", 2031, 3, 16, 12)
    rules: list[AnyRule] = [
        power(),
        energy(id="old", effective_until="2031-03-15"),
        energy(id="other-region", regions=["RU-DA"]),
        energy(id="cap"),
    ]
    s = snap(now, tz="Asia/Irkutsk", region="RU-IRK",
             period={"calendar_month": {"a": 10.0}},
             windows={RUN_RATE_WINDOW_S: {}, 900.0: {"a": 1.0}})
    out = evaluate_all(rules, s)
    assert [v.rule for v in out] == ["pcap", "old", "cap"]
    old = out[1]
    assert old.state == "ok"
    assert old.detail["in_effect"] is False
    assert "not in effect on 2031-03-16" in old.message
    assert out[2].value == 10.0

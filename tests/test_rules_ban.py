"""Ban windows: fixed ranges, yearly windows across the new year, lead time, 29 February."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from monitor.config import BanWindowRule, SiteConfig
from monitor.core.verdict import Verdict
from monitor.rules.evaluate import (
    MeterSnapshot,
    Snapshot,
    ban_spans,
    evaluate,
    evaluate_all,
)

IRK = "Asia/Irkutsk"
MIN = 60.0
H = 3600.0


def ts(tz: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz)).timestamp()


def ban(**kw: Any) -> BanWindowRule:
    return BanWindowRule.model_validate({"id": "ban", "kind": "ban_window", **kw})


SEASONAL = {
    "yearly": {"start": "11-15", "end": "03-15"},
    "effective_from": "2025-01-01",
    "effective_until": "2031-03-15",
    "lead_time_s": 172800,
}


def verdict(rule: BanWindowRule, now: float, tz: str = IRK, **site_kw: Any) -> Verdict:
    meters = {"a": MeterSnapshot(id="a", group="", rated_kw=None, last_seen=now, online=True,
                                 power_w=3250.0, expected_interval_s=60.0)}
    s = Snapshot(now=now, site=SiteConfig.model_validate(
        {"id": "s", "timezone": tz, "category": "legal_entity", **site_kw}),
                 meters=meters, period_kwh={}, period_gap_kwh={}, window_kwh={})
    (v,) = evaluate(rule, s)
    return v


def test_yearly_window_first_and_last_minute_in_site_time() -> None:
    rule = ban(**SEASONAL)
    first = ts(IRK, 2025, 11, 15, 0, 0)
    v = verdict(rule, first)
    assert v.state == "breach"
    assert v.period == "2025-11-15..2026-03-15"
    assert "until 2026-03-15 inclusive" in v.message
    assert "yearly 11-15..03-15" in v.message
    assert v.detail["ends_at"] == ts(IRK, 2026, 3, 16)
    assert (v.value, v.limit, v.target_kw, v.unit) == (3.25, 0.0, 0.0, "kW")
    assert verdict(rule, first - MIN).state == "warning"
    last = ts(IRK, 2026, 3, 15, 23, 59)
    assert verdict(rule, last).state == "breach"
    after = verdict(rule, last + MIN)
    assert after.state == "ok"
    assert "next 2026-11-15..2027-03-15" in after.message


def test_site_time_zone_decides_not_utc() -> None:
    rule = ban(**SEASONAL)
    # 2025-11-14 16:00 UTC is already 2025-11-15 00:00 in Irkutsk, still the 14th in Moscow
    now = ts("UTC", 2025, 11, 14, 16, 0)
    assert verdict(rule, now, tz=IRK).state == "breach"
    assert verdict(rule, now, tz="Europe/Moscow").state == "warning"


def test_crossing_the_new_year_stays_in_breach() -> None:
    rule = ban(**SEASONAL)
    for now in (ts(IRK, 2025, 12, 31, 23, 59), ts(IRK, 2026, 1, 1, 0, 0),
                ts(IRK, 2026, 2, 1, 12, 0)):
        v = verdict(rule, now)
        assert v.state == "breach"
        assert v.period == "2025-11-15..2026-03-15"


def test_lead_time_warning() -> None:
    rule = ban(**SEASONAL)
    start = ts(IRK, 2026, 11, 15)
    v = verdict(rule, start - 172800)
    assert v.state == "warning"
    assert v.seconds_to_limit == 172800
    assert v.period == "2026-11-15..2027-03-15"
    assert "starts 2026-11-15T00:00+08:00 Asia/Irkutsk, in 2 d" in v.message
    assert verdict(rule, start - 172800 - MIN).state == "ok"
    assert verdict(rule, start - 1).seconds_to_limit == 1
    no_lead = ban(**{**SEASONAL, "lead_time_s": 0})
    assert verdict(no_lead, start - 1).state == "ok"


def test_effective_dates_clip_the_yearly_window() -> None:
    rule = ban(**SEASONAL)
    # first window: 2025-01-01..2025-03-15 (not 2024-11-15)
    assert verdict(rule, ts(IRK, 2024, 12, 15)).state == "ok"
    v = verdict(rule, ts(IRK, 2024, 12, 31, 12))
    assert v.state == "warning"  # lead time runs before effective_from
    assert v.period == "2025-01-01..2025-03-15"
    v = verdict(rule, ts(IRK, 2025, 1, 1))
    assert (v.state, v.period) == ("breach", "2025-01-01..2025-03-15")
    assert verdict(rule, ts(IRK, 2025, 3, 16)).state == "ok"
    # last window ends 2031-03-15; none after
    assert verdict(rule, ts(IRK, 2031, 3, 15, 23, 59)).state == "breach"
    after = verdict(rule, ts(IRK, 2031, 3, 16))
    assert after.state == "ok"
    assert after.message == "no ban in force"
    assert verdict(rule, ts(IRK, 2031, 11, 15)).state == "ok"
    assert verdict(rule, ts(IRK, 2031, 11, 14)).state == "ok"


def test_fixed_date_range() -> None:
    rule = ban(dates=[{"from": "2025-01-01", "until": "2031-03-15"}])
    assert verdict(rule, ts(IRK, 2024, 12, 31, 23, 59)).state == "warning"
    v = verdict(rule, ts(IRK, 2025, 1, 1))
    assert v.state == "breach"
    assert "dates 2025-01-01..2031-03-15" in v.message
    assert verdict(rule, ts(IRK, 2031, 3, 15, 23, 59)).state == "breach"
    assert verdict(rule, ts(IRK, 2031, 3, 16)).state == "ok"


def test_adjacent_windows_merge_so_until_is_the_real_end() -> None:
    rule = ban(dates=[{"from": "2025-01-01", "until": "2025-03-15"}], **SEASONAL)
    spans = ban_spans(rule, dt.date(2025, 2, 1))
    assert [s.label for s in spans][:2] == ["2025-01-01..2025-03-15", "2025-11-15..2026-03-15"]
    rule = ban(dates=[{"from": "2026-03-16", "until": "2026-04-30"}], **SEASONAL)
    v = verdict(rule, ts(IRK, 2026, 3, 1))
    assert v.period == "2025-11-15..2026-04-30"
    assert "until 2026-04-30" in v.message


@pytest.mark.parametrize(
    ("window", "day", "state"),
    [
        ({"start": "12-01", "end": "02-29"}, (2027, 2, 28), "breach"),
        ({"start": "12-01", "end": "02-29"}, (2027, 3, 1), "ok"),
        ({"start": "12-01", "end": "02-29"}, (2028, 2, 29), "breach"),
        ({"start": "12-01", "end": "02-29"}, (2028, 3, 1), "ok"),
        ({"start": "02-29", "end": "03-10"}, (2027, 2, 28), "warning"),
        ({"start": "02-29", "end": "03-10"}, (2027, 3, 1), "breach"),
        ({"start": "02-29", "end": "03-10"}, (2028, 2, 28), "warning"),
        ({"start": "02-29", "end": "03-10"}, (2028, 2, 29), "breach"),
        ({"start": "02-29", "end": "02-29"}, (2027, 2, 28), "ok"),  # no 29th: no window
        ({"start": "02-29", "end": "02-29"}, (2027, 3, 1), "ok"),
        ({"start": "02-29", "end": "02-29"}, (2028, 2, 29), "breach"),
    ],
)
def test_29_february_in_yearly_windows(
    window: dict[str, str], day: tuple[int, int, int], state: str
) -> None:
    rule = ban(yearly=window, lead_time_s=86400)
    assert verdict(rule, ts(IRK, *day, 12, 0)).state == state


def test_dst_midnight_in_chicago() -> None:
    tz = "America/Chicago"
    rule = ban(yearly={"start": "11-01", "end": "03-07"}, lead_time_s=0)
    assert verdict(rule, ts(tz, 2026, 11, 1, 0, 0), tz=tz).state == "breach"
    assert verdict(rule, ts(tz, 2026, 10, 31, 23, 59), tz=tz).state == "ok"
    v = verdict(rule, ts(tz, 2027, 3, 7, 23, 59), tz=tz)
    assert v.state == "breach"
    assert v.detail["ends_at"] == ts(tz, 2027, 3, 8)
    assert verdict(rule, ts(tz, 2027, 3, 8, 0, 0), tz=tz).state == "ok"


def test_off_grid_sites_get_no_ban_verdict() -> None:
    rule = ban(**SEASONAL)
    now = ts(IRK, 2026, 1, 10)
    s = Snapshot(now=now, site=SiteConfig.model_validate(
        {"id": "s", "timezone": IRK, "category": "legal_entity", "off_grid": True}),
        meters={}, period_kwh={}, period_gap_kwh={}, window_kwh={})
    assert evaluate_all([rule], s) == []
    strict = ban(**SEASONAL, exempt_off_grid=False)
    assert [v.state for v in evaluate_all([strict], s)] == ["breach"]

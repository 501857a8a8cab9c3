"""Pure accounting: counters, resets, watt-minutes, gaps, duplicates, period splits."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from monitor.core import accounting
from monitor.core.accounting import MeterParams, MeterState, split_buckets
from monitor.core.model import EnergyScope, Reading, TsSource

P = MeterParams(rated_kw=None, max_gap_s=900, jitter_kwh=0.002)


def counter(ts: float, kwh: float, dev: str = "m") -> Reading:
    return Reading(dev, ts, TsSource.DEVICE, energy_kwh=kwh)


def power(ts: float, w: float, dev: str = "m") -> Reading:
    return Reading(dev, ts, TsSource.DEVICE, power_w=w)


def total(state: MeterState, readings: list[Reading], params: MeterParams = P,
          retained: bool = False) -> float:
    return sum(accounting.apply(state, r, params, retained).delta_kwh for r in readings)


def test_first_counter_is_a_baseline_then_increments_count() -> None:
    s = MeterState()
    assert total(s, [counter(0, 100.0), counter(10, 100.5), counter(20, 101.25)]) == 1.25


def test_reset_counts_new_value_from_zero_not_negative_delta() -> None:
    s = MeterState()
    out = [accounting.apply(s, r, P) for r in
           [counter(0, 50.0), counter(10, 51.0), counter(20, 0.4), counter(30, 1.4)]]
    assert [o.delta_kwh for o in out] == pytest.approx([0, 1.0, 0.4, 1.0])
    assert out[2].anomalies[0].kind == "reset"


def test_small_decrease_is_jitter_and_keeps_the_higher_baseline() -> None:
    s = MeterState()
    deltas = [accounting.apply(s, r, P).delta_kwh
              for r in [counter(0, 10.0), counter(10, 9.999), counter(20, 10.5)]]
    assert deltas == pytest.approx([0, 0, 0.5])


def test_shelly_gen1_watt_minutes_reboot_then_continue() -> None:
    # relay/0/energy is watt-minutes since boot; parser converts Wmin/60000 -> kWh
    wmin = [0, 6000, 12000, 300, 6300]  # reboot between 3rd and 4th message
    s = MeterState()
    readings = [Reading("shelly/x:0", i * 60.0, energy_kwh=w / 60000,
                        energy_scope=EnergyScope.SINCE_BOOT) for i, w in enumerate(wmin)]
    assert total(s, readings) == pytest.approx((12000 + 300 + 6000) / 60000)


def test_implausible_increment_is_quarantined_not_counted() -> None:
    params = MeterParams(rated_kw=3.5, max_gap_s=900)
    s = MeterState()
    out = [accounting.apply(s, r, params)
           for r in [counter(0, 10.0), counter(60, 10.05), counter(120, 510.0),
                     counter(180, 510.05)]]
    assert [o.delta_kwh for o in out] == pytest.approx([0, 0.05, 0, 0.05])
    assert out[2].anomalies[0].kind == "quarantine"


def test_power_only_trapezoid_and_long_gap_is_recorded_with_upper_bound() -> None:
    params = MeterParams(rated_kw=4.0, max_gap_s=600)
    s = MeterState()
    out = [accounting.apply(s, r, params) for r in
           [power(0, 1000), power(60, 2000), power(60 + 3600, 2000), power(60 + 3660, 2000)]]
    assert out[1].delta_kwh == pytest.approx((1000 + 2000) / 2 * 60 / 3.6e6)
    assert out[2].delta_kwh == 0
    assert out[2].gaps[0].upper_kwh == pytest.approx(4.0)
    assert out[3].delta_kwh == pytest.approx(2000 * 60 / 3.6e6)


def test_duplicates_and_out_of_order_add_nothing() -> None:
    s = MeterState()
    r = [power(0, 1000), power(60, 1000), power(60, 1000), power(30, 5000), power(120, 1000)]
    assert total(s, r) == pytest.approx(1000 * 120 / 3.6e6)
    s2 = MeterState()
    c = [counter(0, 1.0), counter(60, 2.0), counter(60, 2.0), counter(120, 3.0)]
    assert total(s2, c) == pytest.approx(2.0)


def test_offline_last_will_stops_integration_across_the_gap() -> None:
    s = MeterState()
    accounting.apply(s, power(0, 3000), P)
    accounting.apply(s, power(60, 3000), P)
    accounting.mark_offline(s, 61)
    out = accounting.apply(s, power(120, 3000), P)
    assert out.delta_kwh == 0 and out.gaps[0].reason == "offline"


def test_retained_replay_does_not_integrate_or_reset() -> None:
    s = MeterState()
    accounting.apply(s, power(0, 3000), P)
    out = accounting.apply(s, power(100, 3000), P, retained=True)
    assert out.delta_kwh == 0
    s2 = MeterState()
    total(s2, [counter(0, 5.0), counter(10, 6.0)])
    out = accounting.apply(s2, counter(20, 5.5), P, retained=True)
    assert out.delta_kwh == 0 and s2.counter_kwh == 6.0


def test_state_round_trips_through_json() -> None:
    s = MeterState()
    total(s, [counter(0, 5.0), counter(10, 6.0)])
    s2 = MeterState.from_json(s.to_json())
    assert s2 == s


def test_split_buckets_is_exact_and_proportional() -> None:
    parts = list(split_buckets(850, 1850, 1.0))
    assert [b for b, _ in parts] == [0, 900, 1800]
    assert [k for _, k in parts] == pytest.approx([0.05, 0.9, 0.05])
    assert sum(k for _, k in parts) == 1.0
    assert list(split_buckets(900, 1800, 2.0)) == [(900, 2.0)]


def _days(tzname: str, start: dt.datetime, end: dt.datetime, kwh: float) -> dict[str, float]:
    cache = accounting.LocalDays(ZoneInfo(tzname))
    out: dict[str, float] = {}
    for b, k in split_buckets(start.timestamp(), end.timestamp(), kwh):
        out[cache.day(b)] = out.get(cache.day(b), 0.0) + k
    return out


def test_month_boundary_in_irkutsk_splits_at_local_midnight() -> None:
    irk = ZoneInfo("Asia/Irkutsk")  # UTC+8, no DST
    start = dt.datetime(2026, 11, 30, 23, 0, tzinfo=irk)
    end = dt.datetime(2026, 12, 1, 1, 0, tzinfo=irk)
    days = _days("Asia/Irkutsk", start, end, 2.0)
    assert days == pytest.approx({"2026-11-30": 1.0, "2026-12-01": 1.0})


def test_dst_day_in_berlin_has_25_hours() -> None:
    ber = ZoneInfo("Europe/Berlin")  # 2026-10-25: clocks go back 03:00 -> 02:00
    start = dt.datetime(2026, 10, 25, 0, 0, tzinfo=ber)
    end = dt.datetime(2026, 10, 26, 0, 0, tzinfo=ber)
    assert end.timestamp() - start.timestamp() == 25 * 3600
    # a steady 1 kW from 23:00 on the 24th to 01:00 on the 26th (local)
    s = dt.datetime(2026, 10, 24, 23, 0, tzinfo=ber)
    e = dt.datetime(2026, 10, 26, 1, 0, tzinfo=ber)
    hours = (e.timestamp() - s.timestamp()) / 3600
    days = _days("Europe/Berlin", s, e, hours)
    assert days == pytest.approx({"2026-10-24": 1.0, "2026-10-25": 25.0, "2026-10-26": 1.0})


def test_readings_queued_during_an_outage_arrive_in_a_burst_and_still_count() -> None:
    # A Tasmota (stamped on receipt) reports every 300 s at 3 kW.  The daemon is down
    # for an hour; the broker delivers the 12 queued readings within milliseconds.
    params = MeterParams(rated_kw=3.5, max_gap_s=900)
    s = MeterState()
    t, kwh, counted = 0.0, 100.0, 0.0
    for _ in range(4):  # normal operation
        counted += accounting.apply(s, Reading("m", t, energy_kwh=kwh), params).delta_kwh
        t += 300
        kwh += 0.25
    back = t + 3600
    for i in range(12):  # the burst: 12 x 0.25 kWh, 1 ms apart
        counted += accounting.apply(
            s, Reading("m", back + i * 0.001, energy_kwh=kwh), params).delta_kwh
        kwh += 0.25
    assert counted == pytest.approx(0.75 + 12 * 0.25)


def test_a_jump_inside_a_burst_is_still_quarantined() -> None:
    params = MeterParams(rated_kw=3.5, max_gap_s=900)
    s = MeterState()
    accounting.apply(s, Reading("m", 0.0, energy_kwh=10.0), params)
    accounting.apply(s, Reading("m", 300.0, energy_kwh=10.25), params)
    out = accounting.apply(s, Reading("m", 300.001, energy_kwh=60.0), params)
    assert out.delta_kwh == 0 and out.anomalies[0].kind == "quarantine"
    out = accounting.apply(s, Reading("m", 600.0, energy_kwh=60.25), params)
    assert out.delta_kwh == pytest.approx(0.25)

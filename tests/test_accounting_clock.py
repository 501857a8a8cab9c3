"""Clock steps: the daemon's wall clock (receipt-stamped readings) or a device clock
stepped back or forward.  A counter delta is real energy whatever the timestamps say:
it is counted once, booked at the reading's time but never before the last booked
time, and the step is recorded (``clock_step`` / ``clock_backwards``, value = the step
in seconds).  See the module docstring of :mod:`monitor.core.accounting`.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor import config
from monitor.core import accounting
from monitor.core.accounting import MeterParams, MeterState
from monitor.core.model import Message, Reading, TsSource
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.store.ledger import Store

RATED = MeterParams(rated_kw=3.5, max_gap_s=900, jitter_kwh=0.002, unrated_max_kw=1000.0)


def received(ts: float, kwh: float | None = None, power_w: float | None = None) -> Reading:
    return Reading("m", ts, TsSource.RECEIVED, energy_kwh=kwh, power_w=power_w)


def feed(readings: list[Reading], params: MeterParams = RATED,
         ) -> tuple[float, list[accounting.Outcome], MeterState]:
    s = MeterState()
    outs = [accounting.apply(s, r, params) for r in readings]
    return sum(o.delta_kwh for o in outs), outs, s


def stepped(n: int, at: int, step_s: float, interval_s: float = 10.0,
            t0: float = 1_790_000_000.0) -> list[float]:
    """Receipt times of ``n`` readings every ``interval_s``; the clock steps by
    ``step_s`` just before reading ``at``."""
    return [t0 + i * interval_s + (step_s if i >= at else 0.0) for i in range(n)]


# --------------------------------------------------------------------------- pure accounting


def test_a_counter_near_its_rating_is_not_quarantined_after_the_clock_steps_back() -> None:
    # 3 kW on a 3.5 kW meter: the cumulative plausibility bound must see the real time
    # between readings, not the held booking instant (that would quarantine the hour)
    times = stepped(720, 200, -3600.0)
    kwh_per = 3.0 * 10 / 3600
    total, outs, _ = feed([received(t, 100.0 + i * kwh_per) for i, t in enumerate(times)])
    kinds = [a.kind for o in outs for a in o.anomalies]
    assert kinds == ["clock_step"], kinds
    assert math.isclose(total, 719 * kwh_per, rel_tol=1e-9)
    step = next(a for o in outs for a in o.anomalies)
    assert step.value == -3600.0 + 10.0  # this reading is 3590 s before the last one


def test_a_power_only_meter_keeps_integrating_across_a_step_back() -> None:
    times = stepped(400, 100, -3600.0)
    total, outs, _ = feed([received(t, power_w=1800.0) for t in times])
    # every interval but the one across the step (its length is unknown) is integrated
    assert math.isclose(total, 398 * 1800.0 * 10 / 3_600_000, rel_tol=1e-9)
    assert not [g for o in outs for g in o.gaps]
    assert [a.kind for o in outs for a in o.anomalies] == ["clock_step"]


def test_energy_is_booked_never_before_the_last_booked_time_and_released_later() -> None:
    times = stepped(800, 100, -3600.0)  # 700 readings after the step: 7000 s > 3600 s
    _, outs, state = feed([received(t, 10.0 + i * 0.001) for i, t in enumerate(times)])
    held = times[99]  # the last booked time before the step
    booked = [(inc.start_ts, inc.end_ts) for o in outs for inc in o.increments]
    ends = [e for _, e in booked]
    assert ends == sorted(ends), "a booking went back in time"
    assert all(s <= e for s, e in booked)
    during = [o for o, t in zip(outs[100:], times[100:], strict=True) if t < held]
    assert during and all(o.book_ts == held for o in during)
    after = [(o, t) for o, t in zip(outs[100:], times[100:], strict=True) if t >= held]
    assert after and all(o.book_ts == t for o, t in after)
    assert state.hold_ts is None  # released once the clock passed it


def test_a_forward_step_counts_each_delta_once() -> None:
    times = stepped(300, 100, +3600.0)
    total, outs, _ = feed([received(t, 5.0 + i * 0.002) for i, t in enumerate(times)])
    assert math.isclose(total, 299 * 0.002, rel_tol=1e-9)
    assert not [a for o in outs for a in o.anomalies]


def test_a_device_clock_stepped_back_still_counts_and_is_recorded() -> None:
    t0 = 1_790_000_000.0
    rs = [Reading("m", t0 + i * 10 - (3600 if i >= 5 else 0), TsSource.DEVICE,
                  energy_kwh=1.0 + i * 0.005) for i in range(20)]
    total, outs, _ = feed(rs)
    assert math.isclose(total, 19 * 0.005, rel_tol=1e-9)
    assert [a.kind for o in outs for a in o.anomalies] == ["clock_backwards"]
    # a device reading older than the last, whose counter did not move up, is a replay
    s = MeterState()
    accounting.apply(s, Reading("m", t0, TsSource.DEVICE, energy_kwh=2.0), RATED)
    out = accounting.apply(s, Reading("m", t0 - 60, TsSource.DEVICE, energy_kwh=2.0), RATED)
    assert out.flags == ["out_of_order"] and out.delta_kwh == 0


def test_a_step_back_beyond_the_hold_limit_restarts_the_clock_and_keeps_the_counter() -> None:
    t0 = 1_790_000_000.0
    big = accounting.CLOCK_HOLD_MAX_S + 3600
    rs = [received(t0, 1.0), received(t0 + 10, 1.01), received(t0 + 20 - big, 1.02),
          received(t0 + 30 - big, 1.03)]
    total, outs, state = feed(rs, MeterParams(rated_kw=None))
    assert math.isclose(total, 0.03, rel_tol=1e-9)
    assert [a.kind for o in outs for a in o.anomalies] == ["clock_reset"]
    assert outs[-1].book_ts == t0 + 30 - big and state.hold_ts is None


clock_steps = st.lists(
    st.tuples(st.floats(1.0, 120.0),  # seconds to the next reading
              st.floats(0.0, 0.05),  # kWh since the previous reading
              st.sampled_from([0.0, 0.0, 0.0, 0.0, -3600.0, 3600.0, -600.0, -7200.0,
                               -30.0, 1800.0])),  # the clock's step before it
    min_size=2, max_size=120)


@settings(max_examples=300, deadline=None)
@given(clock_steps, st.sampled_from([TsSource.RECEIVED, TsSource.DEVICE]))
def test_no_energy_is_lost_or_doubled_whatever_the_clock_does(
        steps: list[tuple[float, float, float]], source: TsSource) -> None:
    t, clock_off, kwh = 1_790_000_000.0, 0.0, 100.0
    s = MeterState()
    params = MeterParams(rated_kw=None, unrated_max_kw=1e6)
    counted, last_end, mwh = 0.0, -math.inf, 0
    first: float | None = None
    latest = -math.inf  # the latest time any reading said
    for dt_s, add, step in steps:
        t += dt_s
        clock_off += step
        kwh += add
        first = kwh if first is None else first
        out = accounting.apply(s, Reading("m", t + clock_off, source, energy_kwh=kwh), params)
        counted += out.delta_kwh
        if "clock_reset" in out.flags:  # a step back beyond CLOCK_HOLD_MAX_S: not held
            last_end = latest = -math.inf
        latest = max(latest, t + clock_off)
        # booked at the reading's own time, or held at a time an earlier reading said
        assert t + clock_off <= out.book_ts <= latest
        for inc in out.increments:
            assert inc.start_ts <= inc.end_ts == out.book_ts
            assert inc.end_ts >= last_end, "booked before the last booked time"
            last_end = inc.end_ts
            booked = accounting.book_mwh(s, inc.kwh)
            mwh += sum(p for _, p in accounting.split_mwh(inc.start_ts, inc.end_ts, booked))
    assert first is not None
    assert math.isclose(counted, kwh - first, abs_tol=1e-9)
    assert abs(mwh - round((kwh - first) * 1e6)) <= 1


# --------------------------------------------------------------------------- the worker

CFG = """
[site]
id = "s"
category = "individual"
timezone = "UTC"
[[sources]]
topic = "meters/#"
format = "json"
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
"""


def _ledger(st_: Store) -> dict[str, int]:
    return {m: int(v) for m, v in st_.conn.execute(
        "SELECT meter, sum(mwh) FROM ledger GROUP BY meter")}


def _run_worker(tmp_path: Path, step_s: float) -> tuple[Store, list[tuple[str, float]]]:
    """Two meters, one with a true device clock (native json ``ts``), one stamped on
    receipt (Tasmota without ``Time``); the daemon's clock steps by ``step_s`` after
    reading 30 of 90 and back again after reading 60."""
    c = config.parse(tomllib.loads(CFG))
    st_ = Store(tmp_path / "m.db")
    intake = Intake(c, st_, Metrics())
    t0 = time.time() - 900
    for i in range(90):
        true = t0 + i * 10
        off = step_s if 30 <= i < 60 else 0.0
        kwh = 50.0 + i * 0.01
        intake.handle([
            Message("meters/a", json.dumps({"meter": "a", "ts": true,
                                            "energy_kwh": kwh}).encode(), true + off, qos=1),
            Message("tele/b/SENSOR", json.dumps({"ENERGY": {"Total": kwh}}).encode(),
                    true + off, qos=1)])
    kinds = st_.conn.execute("SELECT meter, kind, value FROM anomalies").fetchall()
    return st_, [(f"{m}:{k}", v) for m, k, v in kinds]


def test_the_worker_loses_nothing_when_the_daemon_clock_steps_back_an_hour(
        tmp_path: Path) -> None:
    st_, kinds = _run_worker(tmp_path, -3600.0)
    ledger = _ledger(st_)
    assert ledger == {"a": 890_000, "tasmota/b": 890_000}, (ledger, kinds)
    assert "tasmota/b:clock_step" in {k for k, _ in kinds}
    steps = [v for k, v in kinds if k == "tasmota/b:clock_step"]
    assert steps == [-3590.0]
    assert not [k for k, _ in kinds if k.endswith("clock_reset")]
    st_.close()


def test_the_worker_loses_nothing_when_the_daemon_clock_steps_forward_an_hour(
        tmp_path: Path) -> None:
    st_, kinds = _run_worker(tmp_path, +3600.0)
    ledger = _ledger(st_)
    assert ledger == {"a": 890_000, "tasmota/b": 890_000}, (ledger, kinds)
    # the correction back after the forward hour is a held step, never a reset
    assert [v for k, v in kinds if k == "tasmota/b:clock_step"] == [-3590.0]
    assert not [k for k, _ in kinds if k.endswith("clock_reset")]
    st_.close()


# --------------------------------------------------------------------------- power bound


@pytest.mark.parametrize("bad", [1.7e308, float("inf"), 5_000_000.0, -5_000_000.0])
def test_a_power_the_meter_cannot_draw_is_an_anomaly_not_energy(bad: float) -> None:
    """Two 1.7e308 W readings once made the trapezoid infinite and killed the worker;
    a power beyond the meter's bound is now an anomaly, never energy or its power."""
    params = accounting.MeterParams(rated_kw=None)
    state = accounting.MeterState()
    t0 = 1_795_000_000.0
    accounting.apply(state, Reading(device="d", ts=t0, power_w=1000.0), params)
    out = accounting.apply(state, Reading(device="d", ts=t0 + 10, power_w=bad), params)
    assert [a.kind for a in out.anomalies] == ["implausible_power"]
    assert out.delta_kwh == 0 and not out.increments
    assert state.power_w == 1000.0
    nxt = accounting.apply(state, Reading(device="d", ts=t0 + 20, power_w=1000.0), params)
    assert nxt.delta_kwh == pytest.approx(1000.0 * 20 / 3_600_000)  # bridges the bad one

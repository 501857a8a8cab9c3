"""The daemon's wall clock stepped back an hour, then forward two (a bad NTP sync and its
correction), through libfaketime's control file, while readings stream in.

The meters keep true time (the simulator runs on the real clock).  Afterwards:
no energy lost or counted twice (the ledger equals the ground truth), no false
breach of a cap far above the energy used, and no ban window applied whose dates
do not include today (one ended yesterday, one starts tomorrow, in the site's zone).
"""

from __future__ import annotations

import datetime as dt
import glob
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from sim import simulate
from tests.faults.harness import SimRun, Site, assert_ledger_matches, fleet_body, options
from tests.servers import Mosquitto

FORMATS = ("json", "tasmota", "shelly_gen2", "zigbee2mqtt", "emonhub", "mbmd")


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: run scripts/install-deps")
    return found[0]


def _midday_zone() -> str:
    """An Etc/GMT zone where it is about noon now: an hour either way stays today."""
    utc_hour = dt.datetime.now(dt.UTC).hour
    offset = 12 - utc_hour  # hours east of UTC, -12..12
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


def _clock_steps(broker: Mosquitto, tmp_path: Path, meters: int, per_meter: int,
                 speed: float, hold_s: float) -> None:
    tz = _midday_zone()
    today = dt.datetime.now(ZoneInfo(tz)).date()
    fleet = simulate.Fleet.build(meters, FORMATS, site="flt", seed=51, interval_s=10)
    opts = options(per_meter, 10, seed=51, speed=speed)
    control = tmp_path / "faketime"
    control.write_text("+0\n")
    body = fleet_body(fleet, f"""
[schedule]
check_interval_s = 1

[[rules]]
id = "day-cap"
kind = "energy_cap"
period = "calendar_day"
scope = "site"
limit_kwh = 1000000
warn_at = [0.5]

[[rules]]
id = "ban-ended"
kind = "ban_window"
dates = [{{from = {today - dt.timedelta(days=30)}, until = {today - dt.timedelta(days=1)}}}]

[[rules]]
id = "ban-tomorrow"
kind = "ban_window"
dates = [{{from = {today + dt.timedelta(days=1)}, until = {today + dt.timedelta(days=30)}}}]
lead_time_s = 0  # no warning ahead of it: any state but ok is misapplied
""")
    env = {"LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(control),
           "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}
    site = Site(tmp_path, broker.port, body, tz=tz, env=env).start()
    sim = SimRun(fleet, opts, broker.port).start()
    for offset in ("-3600", "+3600", "+0"):
        time.sleep(hold_s)
        control.write_text(offset + "\n")
    truth = sim.join()
    time.sleep(5)  # a few checks after the last reading
    states = dict(site.q("SELECT rule, state FROM alert_state"))
    assert states.get("day-cap", "ok") == "ok", states
    assert states.get("ban-ended", "ok") == "ok", states
    assert states.get("ban-tomorrow", "ok") == "ok", states
    fired = site.q("SELECT kind, rule FROM events WHERE kind LIKE 'alert.%' "
                   "OR kind LIKE 'order.%'")
    assert not fired, f"false alerts or orders: {fired}"
    assert_ledger_matches(site, truth, timeout_s=60)
    assert site.stop() == 0


def test_clock_stepped_back_and_forward_an_hour_ci(broker: Mosquitto, tmp_path: Path) -> None:
    _clock_steps(broker, tmp_path, meters=12, per_meter=300, speed=100, hold_s=7)


@pytest.mark.faults_full
def test_clock_stepped_back_and_forward_an_hour_full(broker: Mosquitto,
                                                     tmp_path: Path) -> None:
    _clock_steps(broker, tmp_path, meters=30, per_meter=3000, speed=100, hold_s=60)

"""The broker (with persistence) restarted twice mid-stream: nothing lost, nothing doubled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sim import simulate
from tests.daemon import wait_for
from tests.faults.harness import SimRun, Site, assert_ledger_matches, fleet_body, options
from tests.servers import Mosquitto


def _broker_restarts(broker: Mosquitto, tmp_path: Path, meters: int, per_meter: int,
                     down_s: float, speed: float) -> None:
    fleet = simulate.Fleet.build(meters, simulate.FORMATS, site="flt", seed=21, interval_s=10)
    opts = options(per_meter, 10, seed=21, speed=speed, dup_prob=0.01, garbage_prob=0.005,
                   reboot_prob=0.002)
    site = Site(tmp_path, broker.port, fleet_body(fleet)).start()
    sim = SimRun(fleet, opts, broker.port).start()
    expected = meters * per_meter
    for fraction in (0.25, 0.6):
        wait_for(lambda f=fraction: site.count("readings") >= f * expected, 300,
                 interval_s=0.05, what=f"{fraction:.0%} of the readings committed")
        broker.stop()  # SIGTERM: mosquitto writes its persistence file and exits
        wait_for(lambda: site.health()[0] == 503 and any(
            r.startswith("mqtt: not connected") for r in site.health()[1]), 30,
                 what="/healthz 503 while the broker is down")
        time.sleep(down_s)
        broker.start()
        wait_for(lambda: site.health()[0] == 200, 60, what="/healthz 200 after the broker")
    truth = sim.join()
    assert_ledger_matches(site, truth)
    assert site.count("dead_letters") == truth.totals()["garbage"]
    connects = site.metric("energy_monitor_mqtt_connects_total")
    assert connects is not None and connects >= 3
    assert site.stop() == 0


def test_broker_restarted_mid_stream_ci(broker: Mosquitto, tmp_path: Path) -> None:
    _broker_restarts(broker, tmp_path, meters=16, per_meter=400, down_s=3, speed=200)


@pytest.mark.faults_full
def test_broker_restarted_mid_stream_full(broker: Mosquitto, tmp_path: Path) -> None:
    _broker_restarts(broker, tmp_path, meters=50, per_meter=1000, down_s=30, speed=0)

"""SIGKILL of the real daemon at random moments while QoS 1 readings stream in.

The kill moments are drawn from the daemon's own progress (committed readings),
so every kill lands mid-stream whatever the speed of the machine: during a
commit, between commit and acknowledgement, during start-up or migration.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from sim import simulate
from tests.daemon import wait_for
from tests.faults.harness import SimRun, Site, assert_ledger_matches, fleet_body, options
from tests.servers import Mosquitto


def _sigkill_run(broker: Mosquitto, tmp_path: Path, meters: int, per_meter: int,
                 kills: int, seed: int) -> None:
    fleet = simulate.Fleet.build(meters, simulate.FORMATS, site="flt", seed=seed, interval_s=10)
    opts = options(per_meter, 10, seed=seed, reboot_prob=0.002, dup_prob=0.01,
                   garbage_prob=0.005)
    planned = simulate.Simulator(fleet, opts, simulate.MemorySink()).run()
    site = Site(tmp_path, broker.port, fleet_body(fleet, "batch_size = 500\n"
                                                      "batch_wait_ms = 20\n")).start()
    rng = random.Random(seed)
    total = planned.totals()["readings"]
    at = sorted(rng.uniform(0.03, 0.9) * total for _ in range(kills))
    sim = SimRun(fleet, opts, broker.port).start()
    done = 0
    deadline = time.monotonic() + 900
    while done < kills and time.monotonic() < deadline:
        if site.count("readings") >= at[done]:
            time.sleep(rng.uniform(0.0, 0.3))  # not always right after a commit
            site.kill()
            done += 1
            site.start(wait=rng.random() < 0.5)  # sometimes killed again during start-up
        else:
            time.sleep(0.02)
    truth = sim.join()
    assert done == kills, f"only {done} of {kills} kills happened mid-stream"
    assert truth.totals()["readings"] == total
    wait_for(lambda: site.http("/healthz")[0] in (200, 503), 60, what="daemon up")
    assert_ledger_matches(site, truth)
    t = truth.totals()
    assert site.count("dead_letters") == t["garbage"], "every garbage payload once"
    resets = site.q("SELECT count(*) FROM anomalies WHERE kind = 'reset'")[0][0]
    assert resets >= 1 if t["resets"] else True
    assert site.stop() == 0


def test_sigkill_mid_stream_ci(broker: Mosquitto, tmp_path: Path) -> None:
    _sigkill_run(broker, tmp_path, meters=16, per_meter=500, kills=4, seed=11)


@pytest.mark.faults_full
def test_sigkill_ten_times_during_50000_readings(broker: Mosquitto, tmp_path: Path) -> None:
    _sigkill_run(broker, tmp_path, meters=50, per_meter=1000, kills=10, seed=12)

"""End to end: simulator -> real mosquitto -> daemon subprocess -> SQLite ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sim import simulate
from tests.daemon import (
    Daemon,
    publisher,
    query,
    status_json,
    wait_for,
    wait_up,
    write_config,
)
from tests.servers import Mosquitto

MARK = "sim/e2e/json/zz-marker"


def _fleet_config(fleet: simulate.Fleet) -> str:
    # compressed time: counters advance an hour in seconds, so the plausibility bound
    # (energy <= maximum power x elapsed time) must be off here, rated or not
    return simulate.config_snippet(fleet, rated_kw=False) + "\n[intake]\nunrated_max_kw = 1e12\n"


def _settle(cfg: Path, port: int) -> None:
    """Publish a marker after everything else and wait until the daemon committed it."""
    pub = publisher(port)
    n0 = (query(cfg, "SELECT count(*) FROM readings WHERE meter = 'zz-marker'") or [(0,)])[0][0]
    info = pub.publish(MARK, json.dumps({"meter": "zz-marker", "power_w": 1.0}), qos=1)
    info.wait_for_publish(10)
    wait_for(lambda: (query(cfg, "SELECT count(*) FROM readings WHERE meter='zz-marker'")
                      or [(0,)])[0][0] > n0, 60, what="marker committed")
    pub.disconnect()
    pub.loop_stop()


@pytest.mark.slow
def test_an_hour_of_every_format_matches_ground_truth(broker: Mosquitto, tmp_path: Path) -> None:
    fleet = simulate.Fleet.build(16, simulate.FORMATS, site="e2e", seed=7, interval_s=10)
    cfg = write_config(tmp_path / "d.toml", broker.port, _fleet_config(fleet), site="e2e",
                       tz="Asia/Irkutsk")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: query(cfg, "SELECT count(*) FROM meters"), 30, what="daemon up")
        time.sleep(1.0)
        opts = simulate.SimOptions(duration_s=3600, speed=0, start=time.time() - 3600,
                                   reboot_prob=0.01, dup_prob=0.03, garbage_prob=0.02,
                                   gap_prob=0.01, seed=7, obey_commands=False)
        truth = simulate.simulate(fleet, opts, port=broker.port)
        assert truth.unacked == 0
        _settle(cfg, broker.port)
        got = dict(query(cfg, "SELECT meter, sum(mwh) / 1e6 FROM ledger GROUP BY meter"))
        t = truth.totals()
        assert t["resets"] > 0 and t["duplicates"] > 0 and t["garbage"] > 0 and t["gaps"] > 0
        for mid, mt in truth.meters.items():
            assert mt.observable_kwh > 0.5, mid
            assert got.get(mid, 0.0) == pytest.approx(mt.observable_kwh, rel=1e-3), (
                mid, mt.format)
        dead = query(cfg, "SELECT count(*) FROM dead_letters")[0][0]
        assert dead == t["garbage"]
        resets = query(cfg, "SELECT count(*) FROM anomalies WHERE kind = 'reset'")[0][0]
        assert resets >= 1
        # status reads the store while the daemon runs
        st = status_json(cfg)
        ids = {m["id"] for m in st["meters"]}
        assert set(truth.meters) <= ids
    finally:
        daemon.kill()


@pytest.mark.slow
def test_sigkill_during_20000_qos1_readings_loses_and_doubles_nothing(
    broker: Mosquitto, tmp_path: Path
) -> None:
    meters, per_meter = 20, 1000
    cfg = write_config(tmp_path / "d.toml", broker.port,
                       '[[sources]]\ntopic = "crash/#"\nformat = "json"\n'
                       '[intake]\nbatch_size = 500\nbatch_wait_ms = 50\n')
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    wait_up(cfg, 30)
    time.sleep(1.0)  # persistent session exists on the broker from now on
    pub = publisher(broker.port, "crash-pub")
    kills = 0
    infos = []
    t0 = time.time() - per_meter * 10  # recent: device clocks older than a week are refused
    for k in range(per_meter):
        for m in range(meters):
            payload = json.dumps({"meter": f"c{m:02d}", "ts": t0 + k * 10,
                                  "power_w": 3600.0, "energy_kwh": round(k * 0.01, 6),
                                  "seq": k})
            infos.append(pub.publish(f"crash/c{m:02d}", payload, qos=1))
        if k % 100 == 50:
            for i in infos:
                i.wait_for_publish(30)
            infos.clear()
            daemon.kill()  # SIGKILL: no drain, no goodbye
            kills += 1
            daemon.start()
    for i in infos:
        i.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()
    total = meters * per_meter
    wait_for(lambda: (query(cfg, "SELECT count(*) FROM readings") or [(0,)])[0][0] >= total,
             180, what="all readings committed")
    time.sleep(1.0)
    rows = query(cfg, "SELECT count(*), count(DISTINCT meter || ':' || ts) FROM readings")[0]
    assert kills >= 9
    assert rows == (total, total), "every reading exactly once"
    kwh = dict(query(cfg, "SELECT meter, sum(mwh) / 1e6 FROM ledger GROUP BY meter"))
    for m in range(meters):
        assert kwh[f"c{m:02d}"] == pytest.approx((per_meter - 1) * 0.01, rel=1e-9)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_readings_queued_while_the_daemon_was_down_all_count(broker: Mosquitto,
                                                            tmp_path: Path) -> None:
    """Receipt-stamped counters queued by the broker arrive in a burst; the rated_kw
    plausibility bound must judge their sum over the real outage, not each 1 ms apart."""
    cfg = write_config(tmp_path / "d.toml", broker.port, """
[[sources]]
topic = "tele/+/SENSOR"
format = "tasmota"
[[meters]]
id = "rig"
device = "tasmota/rig"
rated_kw = 3.6
""")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port)
    try:
        wait_up(cfg, 30)
        time.sleep(1.0)
        total = 5.0

        def send() -> None:
            nonlocal total
            body = {"Time": "2026-11-27T10:00:00", "ENERGY": {"Total": round(total, 3),
                                                              "Power": 3600}}
            pub.publish("tele/rig/SENSOR", json.dumps(body), qos=1).wait_for_publish(10)
            total += 0.003  # 3.6 kW for 3 s

        send()
        wait_for(lambda: query(cfg, "SELECT count(*) FROM readings")[0][0] == 1, 30)
        assert daemon.stop() == 0
        for _ in range(10):  # 30 s of readings the broker keeps for the stopped daemon
            time.sleep(3.0)
            send()
        daemon.start()
        wait_for(lambda: query(cfg, "SELECT count(*) FROM readings")[0][0] == 11, 60,
                 what="queued readings drained")
        kwh = query(cfg, "SELECT sum(mwh) / 1e6 FROM ledger")[0][0]
        assert kwh == pytest.approx(0.03, abs=1e-9)
        assert query(cfg, "SELECT count(*) FROM anomalies WHERE kind='quarantine'")[0][0] == 0
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.kill()

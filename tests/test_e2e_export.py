"""End to end: MQTT readings -> the daemon -> InfluxDB line protocol in a real VictoriaMetrics.

The daemon (``python -m monitor run``) exports to a private VictoriaMetrics
(:mod:`tests.tsdb`), which keeps duplicate samples: counting the samples of
every series by time is what makes "exactly once" checkable.  Faults are real
too: VictoriaMetrics is stopped and restarted, or a :class:`tests.tsdb.FaultProxy`
answers 401.  What is compared is the store (SQLite, the source of truth)
against what VictoriaMetrics holds, never how fast anything was.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.daemon import (
    Daemon,
    publisher,
    query,
    wait_for,
    wait_up,
    write_config,
)
from tests.servers import Mosquitto
from tests.tsdb import VM, FaultProxy, Series, victoria_metrics

SITE = "exp-01"
TOKEN = "e2e-token-7f3a9c"
FIELDS = ("power_w", "energy_kwh", "energy_delta_kwh", "voltage_v", "current_a")


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    with victoria_metrics(tmp_path / "vm") as server:
        yield server


def daemon_config(tmp: Path, port: int, url: str, rules: str = "", *,
                  http: bool = False) -> Path:
    token = tmp / "influx.token"
    token.write_text(TOKEN + "\n")
    return write_config(tmp / "d.toml", port, f"""
[[sources]]
topic = "exp/+"
format = "json"

[[meters]]
id = "m-a"
device = "m-a"
group = "hall-a"

[[meters]]
id = "m-b"
device = "m-b"
group = "hall-b"

[influxdb]
url = "{url}"
org = "mining"
bucket = "energy"
token_file = "{token}"
flush_interval_s = 1
timeout_s = 30      # a write that times out is re-sent, and VictoriaMetrics keeps both copies

[schedule]
check_interval_s = 1

{rules}
""", site=SITE, http=http)


def reading(meter: str, ts: float, i: int) -> dict[str, Any]:
    return {"meter": meter, "ts": ts, "power_w": 1000.0 + i, "energy_kwh": 100.0 + i / 100,
            "voltage_v": 230.0 + i % 7 / 10, "current_a": round(4.35 + i / 1000, 3)}


def publish(pub: paho.Client, docs: list[dict[str, Any]]) -> None:
    infos = [pub.publish(f"exp/{d['meter']}", json.dumps(d), qos=1) for d in docs]
    for info in infos:
        info.wait_for_publish(30)


def stored(cfg: Path) -> dict[str, list[tuple[Any, ...]]]:
    """meter -> its readings in the store, ``(ts, power_w, energy_kwh, delta_kwh, voltage_v,
    current_a)`` in time order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for meter, *row in query(cfg, "SELECT meter, ts, power_w, energy_kwh, delta_kwh, voltage_v,"
                                  " current_a FROM readings ORDER BY meter, ts"):
        out.setdefault(meter, []).append(tuple(row))
    return out


def series(vm: VM, name: str) -> dict[str, Series]:
    got: dict[str, Series] = {}
    for s in vm.export(f'{{__name__="{name}"}}'):
        assert s.labels["meter"] not in got, f"{name}: two series for {s.labels}"
        got[s.labels["meter"]] = s
    return got


def exported_count(vm: VM) -> int:
    return sum(len(s.timestamps_ms) for s in series(vm, "energy_reading_energy_delta_kwh").values())


def assert_store_exported_exactly_once(vm: VM, cfg: Path) -> None:
    """Every reading of the store is in VictoriaMetrics once per field it has (NULL fields
    are left out), at its time, with its values; nothing else is."""
    rows = stored(cfg)
    assert rows
    for col, field in enumerate(FIELDS, start=1):
        got = series(vm, f"energy_reading_{field}")
        assert sorted(got) == sorted(rows), field
        for meter, readings in rows.items():
            s = got[meter]
            times = Counter(s.timestamps_ms)
            twice = sorted(t for t, n in times.items() if n > 1)
            assert twice == [], f"{meter} {field}: {len(twice)} samples written twice"
            want = [(round(r[0] * 1000), float(r[col])) for r in readings if r[col] is not None]
            assert s.timestamps_ms == [t for t, _ in want], (meter, field)
            assert s.values == pytest.approx([v for _, v in want]), (meter, field)


def show_log(log: Path) -> None:
    if log.exists():
        print(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-6000:]}")


# --------------------------------------------------------------------------- the schema


def test_readings_rules_and_events_land_with_their_tags_fields_and_times(
        broker: Mosquitto, vm: VM, tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, broker.port, vm.url, """
[[rules]]
id = "month-cap"
kind = "energy_cap"
period = "calendar_month"
scope = "site"
limit_kwh = 0.3
warn_at = [0.5]
""")
    log = tmp_path / "daemon.log"
    daemon = Daemon(cfg, log).start()
    pub = publisher(broker.port)
    try:
        wait_up(cfg, 30)
        time.sleep(1.0)
        base = round(time.time() - 60, 3)
        docs = [reading(m, round(base + i * 2.5 + k * 0.125, 3), i)
                for i in range(20) for k, m in enumerate(("m-a", "m-b", "loose"))]
        del docs[-1]["power_w"]  # a reading without power: the field is left out, not 0
        publish(pub, docs)
        wait_for(lambda: exported_count(vm) >= len(docs), 60, what="every reading exported")
        assert_store_exported_exactly_once(vm, cfg)

        power = series(vm, "energy_reading_power_w")
        assert power["m-a"].labels == {"site": SITE, "meter": "m-a", "group": "hall-a",
                                       "format": "json"}
        assert power["m-b"].labels["group"] == "hall-b"
        assert power["loose"].labels == {"site": SITE, "meter": "loose", "format": "json"}
        assert len(power["loose"].values) == 19  # the one without power_w
        assert power["m-a"].timestamps_ms == [round(d["ts"] * 1000) for d in docs
                                              if d["meter"] == "m-a"]
        assert power["m-a"].values == [d["power_w"] for d in docs if d["meter"] == "m-a"]
        kwh = series(vm, "energy_reading_energy_kwh")["m-b"].values
        assert kwh == pytest.approx([100.0 + i / 100 for i in range(20)])
        delta = series(vm, "energy_reading_energy_delta_kwh")["m-a"].values
        assert delta[0] == 0.0 and sum(delta) == pytest.approx(0.19)  # what was accounted

        # the rule's verdicts and its events (0.57 kWh > 0.3: warning, then breach)
        def rule_series() -> list[Series]:
            return [s for s in vm.export('{__name__=~"energy_rule_.*"}')
                    if s.labels.get("rule") == "month-cap"]

        wait_for(lambda: any(s.name == "energy_rule_state" and 2.0 in s.values
                             for s in rule_series()), 60, what="energy_rule in breach")
        by_name = {s.name: s for s in rule_series()}
        assert set(by_name) == {f"energy_rule_{f}" for f in
                                ("value", "limit", "ratio", "projected", "state")}
        assert all(s.labels == {"site": SITE, "rule": "month-cap", "scope": "site"}
                   for s in by_name.values())
        assert set(by_name["energy_rule_limit"].values) == {0.3}
        assert max(by_name["energy_rule_value"].values) == pytest.approx(0.57)
        assert set(by_name["energy_rule_state"].values) <= {0.0, 1.0, 2.0}

        firing = query(cfg, "SELECT count(*) FROM events WHERE kind = 'alert.firing'")[0][0]
        assert firing >= 1

        def event_series() -> list[Series]:
            return [s for s in vm.export('{__name__="energy_event_message"}')
                    if s.labels.get("kind") == "alert.firing"]

        wait_for(lambda: sum(len(s.timestamps_ms) for s in event_series()) >= firing, 30,
                 what="the alert events as annotations")
        assert all(s.labels == {"site": SITE, "kind": "alert.firing", "rule": "month-cap"}
                   for s in event_series())
        assert daemon.stop() == 0
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.kill()
        show_log(log)


# --------------------------------------------------------------------------- outage


def test_an_outage_of_victoria_metrics_loses_and_doubles_no_reading(
        broker: Mosquitto, vm: VM, tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, broker.port, vm.url)
    log = tmp_path / "daemon.log"
    daemon = Daemon(cfg, log).start()
    pub = publisher(broker.port)
    meters = ("m-a", "m-b", "loose")
    base = round(time.time() - 1000, 3)
    i = 0

    def burst(n: int) -> None:
        nonlocal i
        publish(pub, [reading(m, base + (i + j) * 1.5 + k * 0.25, i + j)
                      for j in range(n) for k, m in enumerate(meters)])
        i += n

    def readings_stored() -> int:
        return int(query(cfg, "SELECT count(*) FROM readings")[0][0])

    try:
        wait_up(cfg, 30)
        time.sleep(1.0)
        burst(50)
        wait_for(lambda: exported_count(vm) >= 150, 60, what="the first readings exported")

        vm.stop()
        for _ in range(10):  # readings keep coming while VictoriaMetrics is down
            burst(10)
            time.sleep(0.3)
        wait_for(lambda: readings_stored() == 450, 60, what="readings stored during the outage")
        wait_for(lambda: "export: write failed" in log.read_text(errors="replace"), 30,
                 what="the exporter noticing the outage")
        backlog = int(query(cfg, "SELECT count(*) FROM readings WHERE id >"
                                 " (SELECT CAST(value AS INTEGER) FROM kv"
                                 "  WHERE key = 'export.readings')")[0][0])
        assert backlog >= 250  # held in the store, not dropped

        vm.start()
        burst(50)
        wait_for(lambda: readings_stored() == 600, 60, what="readings stored after the outage")
        wait_for(lambda: exported_count(vm) >= 600, 120, what="the backlog exported")
        assert_store_exported_exactly_once(vm, cfg)
        assert daemon.stop() == 0
    finally:
        pub.disconnect()
        pub.loop_stop()
        daemon.kill()
        show_log(log)


# --------------------------------------------------------------------------- refused token


def healthz(port: int) -> tuple[int, list[str]]:
    """Status and the JSON list of reasons (SPEC: empty when healthy)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return int(r.status), list(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return int(exc.code), list(json.loads(exc.read()))


def http_port(log: Path) -> int:
    found: list[int] = []

    def listening() -> bool:
        m = re.search(r"HTTP on [^\s]+:(\d+)", log.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_for(listening, 30, what="the daemon's HTTP port in its log")
    return found[0]


def test_a_refused_token_makes_healthz_fail_and_raises_an_alert(
        broker: Mosquitto, vm: VM, tmp_path: Path) -> None:
    with FaultProxy(vm.url) as proxy:
        proxy.fail(401, '{"code":"unauthorized","message":"unauthorized access"}')
        cfg = daemon_config(tmp_path, broker.port, proxy.url, http=True)
        log = tmp_path / "daemon.log"
        daemon = Daemon(cfg, log).start()
        pub = publisher(broker.port)
        try:
            port = http_port(log)
            wait_for(lambda: healthz(port)[0] == 200, 30, what="healthy before any write")
            base = round(time.time() - 100, 3)
            publish(pub, [reading("m-a", base + j, j) for j in range(10)])
            wait_for(lambda: healthz(port)[0] == 503, 30, what="/healthz failing")
            status, doc = healthz(port)
            influx = [r for r in doc if r.startswith("influxdb:")]
            assert influx and "401" in influx[0], doc
            assert status == 503

            def alerts() -> list[dict[str, Any]]:
                return [json.loads(b) for (b,) in query(
                    cfg, "SELECT body FROM events WHERE kind = 'alert.firing'"
                         " AND rule = 'influxdb-export'")]

            wait_for(alerts, 30, what="the alert event")
            alert = alerts()[0]
            assert alert["severity"] == "critical" and "401" in alert["message"]
            assert alert["site"] == SITE
            assert {r.status for r in proxy.requests} == {401}
            assert all(r.authorization == f"Token {TOKEN}" for r in proxy.requests)

            # the token is fixed: writes go through, healthz recovers, nothing is lost
            proxy.forward()
            wait_for(lambda: healthz(port)[0] == 200, 60, what="/healthz recovering")
            wait_for(lambda: exported_count(vm) >= 10, 60, what="the held readings exported")
            assert_store_exported_exactly_once(vm, cfg)
            assert len(alerts()) == 1  # one alert per cause, not one per retry
            resolved = query(cfg, "SELECT count(*) FROM events WHERE kind = 'alert.resolved'"
                                  " AND rule = 'influxdb-export'")
            assert resolved == [(1,)]  # and the operator hears that it is over
            assert daemon.stop() == 0
            assert TOKEN not in log.read_text(errors="replace")
        finally:
            pub.disconnect()
            pub.loop_stop()
            daemon.kill()
            show_log(log)

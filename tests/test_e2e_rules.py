"""End to end: readings over a real mosquitto -> daemon subprocess -> rule checks -> events.

The daemon's clock is real, so every reading carries a timestamp close to now and
the counters advance fast (tens of kW) to cross a 1 kWh cap within seconds.  What
the daemon decided is read from its SQLite store (``events``, ``alert_state``) and
from what a real local HTTP server received as webhooks.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as paho
import pytest

from monitor import config
from monitor.core.model import Message
from monitor.core.timefmt import parse_rfc3339
from monitor.intake.worker import Intake
from monitor.metrics import Metrics
from monitor.rules.check import Checker
from monitor.store.ledger import Store
from tests.daemon import Daemon, publisher, query, status_json, wait_for, write_config
from tests.servers import Mosquitto, free_port

CHECKS = "[schedule]\ncheck_interval_s = 1\n"


# --------------------------------------------------------------------------- helpers


class Receiver:
    """A webhook endpoint: a real HTTP server on a free loopback port that answers 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.posts: list[tuple[str, dict[str, Any]]] = []  # (event id header, body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.posts.append((self.headers.get("X-Energy-Monitor-Event-Id", ""),
                                        json.loads(raw)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def received(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return list(self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def midday_zone(now: float | None = None) -> str:
    """A fixed-offset zone in which it is about noon now.

    Calendar-day caps and the status period are counted in the site's zone; a test
    that ran across its midnight would see the period roll over.  Etc/GMT-N is UTC+N.
    """
    hour = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC).hour
    offset = (12 - hour) % 24
    if offset > 12:
        offset -= 24
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


class Meter:
    """A native-json meter with a cumulative counter; each reading is stamped now."""

    def __init__(self, pub: paho.Client, meter: str, topic: str, counter_kwh: float = 100.0,
                 power_w: float = 3000.0) -> None:
        self.pub = pub
        self.meter = meter
        self.topic = topic
        self.counter_kwh = counter_kwh
        self.power_w = power_w
        self.last_ts = 0.0
        self.sent = 0

    def send(self, add_kwh: float = 0.0, power_w: float | None = None) -> float:
        """Advance the counter by ``add_kwh`` and publish (QoS 1, waits for PUBACK)."""
        self.counter_kwh = round(self.counter_kwh + add_kwh, 6)
        if power_w is not None:
            self.power_w = power_w
        ts = max(time.time(), self.last_ts + 0.001)
        self.last_ts = ts
        body = {"meter": self.meter, "ts": round(ts, 3), "energy_kwh": self.counter_kwh,
                "power_w": self.power_w, "seq": self.sent}
        self.pub.publish(self.topic, json.dumps(body), qos=1).wait_for_publish(10)
        self.sent += 1
        return ts


class Presence:
    """Watches the daemon's retained ``online``/``offline`` status topic.

    The daemon subscribes before it says ``online``, so once ``online`` is seen a
    reading published now reaches it (and its persistent session holds what comes
    while it is down).
    """

    def __init__(self, port: int, site: str = "test-site") -> None:
        self.onlines = 0
        self.latest = ""
        self.cond = threading.Condition()
        self.client = publisher(port)
        self.client.on_message = self._on_message
        self.client.subscribe(f"energy-monitor/{site}/status", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.latest = msg.payload.decode()
            self.onlines += self.latest == "online"
            self.cond.notify_all()

    def wait_online(self, after: int = 0, timeout_s: float = 30) -> int:
        """Wait until more than ``after`` ``online`` messages were seen and the latest is one."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.onlines > after and self.latest == "online",
                                    timeout_s)
            assert ok, f"daemon not online after {timeout_s}s (latest {self.latest!r})"
            return self.onlines

    def close(self) -> None:
        stop_client(self.client)


def count(cfg: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    rows = query(cfg, sql, params)
    return int(rows[0][0]) if rows else 0


def events(cfg: Path, rule: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(event_id, kind, severity, body) of a rule's events, in order."""
    return [(r[0], r[1], r[2], json.loads(r[3])) for r in query(
        cfg, "SELECT event_id, kind, severity, body FROM events WHERE rule = ? ORDER BY id",
        (rule,))]


def checks_done(cfg: Path) -> int:
    """How many rule verdicts the check job has recorded (one export line per rule and check)."""
    return count(cfg, "SELECT count(*) FROM export_outbox WHERE line LIKE 'energy_rule,%'")


def wait_checks(cfg: Path, n: int, timeout_s: float = 30) -> None:
    """Wait until at least ``n`` more verdicts were recorded than now."""
    start = checks_done(cfg)
    wait_for(lambda: checks_done(cfg) >= start + n, timeout_s, what=f"{n} more rule checks")


def committed(cfg: Path, meter: str) -> int:
    return count(cfg, "SELECT count(*) FROM readings WHERE meter = ?", (meter,))


def stop_client(c: paho.Client) -> None:
    c.disconnect()
    c.loop_stop()


# --------------------------------------------------------------------------- energy cap


@pytest.mark.slow
def test_energy_cap_fires_once_per_transition_and_a_restart_repeats_nothing(
    broker: Mosquitto, tmp_path: Path, receiver: Receiver
) -> None:
    body = f"""
{CHECKS}
[[sources]]
topic = "site/+/reading"
format = "json"

[[meters]]
id = "m1"
device = "m1"
group = "hall-a"

[[rules]]
id = "day-cap"
kind = "energy_cap"
period = "calendar_day"
scope = "site"
limit_kwh = 1.0
warn_at = [0.8, 0.95]

[[webhooks]]
url = "{receiver.url}"
"""
    cfg = write_config(tmp_path / "d.toml", broker.port, body, tz=midday_zone(),
                       unrated_max_kw=1e12)
    log = tmp_path / "daemon.log"
    presence = Presence(broker.port)
    daemon = Daemon(cfg, log).start()
    pub = publisher(broker.port, "rules-pub")
    try:
        presence.wait_online()
        meter = Meter(pub, "m1", "site/m1/reading")
        meter.send()  # the baseline: not counted
        wait_for(lambda: committed(cfg, "m1") == 1, 30, what="baseline committed")
        wait_checks(cfg, 1)
        assert events(cfg, "day-cap") == [], "nothing at 0 kWh"

        # 0.84 kWh in 14 readings: the 80 % level, and only it
        for _ in range(14):
            meter.send(0.06)
        wait_for(lambda: len(events(cfg, "day-cap")) >= 1, 30, what="the 80% warning")
        wait_checks(cfg, 3)

        # a clean restart while the broker queues the next readings for us: 0.96 kWh
        assert daemon.stop() == 0
        for _ in range(2):
            meter.send(0.06)
        daemon.start()
        wait_for(lambda: committed(cfg, "m1") == 17, 30, what="queued readings committed")
        wait_for(lambda: len(events(cfg, "day-cap")) >= 2, 30, what="the 95% warning")
        wait_checks(cfg, 3)

        # over the limit: 1.08 kWh
        for _ in range(2):
            meter.send(0.06)
        wait_for(lambda: len(events(cfg, "day-cap")) >= 3, 30, what="the breach")

        # still over the limit after another restart and a few more readings
        assert daemon.stop() == 0
        daemon.start()
        for _ in range(3):
            meter.send(0.06)
        wait_for(lambda: committed(cfg, "m1") == 22, 30, what="all readings committed")
        wait_checks(cfg, 3)

        got = events(cfg, "day-cap")
        assert [(k, s) for _, k, s, _ in got] == [
            ("alert.firing", "warning"), ("alert.firing", "warning"),
            ("alert.firing", "critical")], got
        values = [b["value"] for *_, b in got]
        assert values[0] == pytest.approx(0.84)  # 0.78 is below the level, 0.84 the first above
        assert 0.95 <= values[1] < 1.0 and values[1] == pytest.approx(0.96)
        assert values[2] in (pytest.approx(1.02), pytest.approx(1.08))  # 1 or 2 readings in
        assert all(b["limit"] == 1.0 and b["unit"] == "kWh" and b["scope"] == "site"
                   for *_, b in got)
        period = dt.datetime.now(ZoneInfo(midday_zone())).date().isoformat()
        assert {b["period"] for *_, b in got} == {period}
        kwh = query(cfg, "SELECT sum(mwh) / 1e6 FROM ledger")[0][0]
        assert kwh == pytest.approx(21 * 0.06)

        state = query(cfg, "SELECT state, level FROM alert_state WHERE rule = 'day-cap'")
        assert state == [("breach", 1.0)]

        # the webhook receiver got exactly those events, each exactly once
        ids = [eid for eid, *_ in got]
        wait_for(lambda: {e for e, _ in receiver.received()} >= set(ids), 30,
                 what="webhooks delivered")
        posts = receiver.received()
        assert sorted(e for e, _ in posts) == sorted(ids), posts
        assert all(b["event_id"] == e and b["rule"] == "day-cap" for e, b in posts)
        assert [b["kind"] for _, b in posts] == ["alert.firing"] * 3
    finally:
        stop_client(pub)
        presence.close()
        daemon.kill()


# --------------------------------------------------------------------------- power cap


def verdicts(cfg: Path, rule: str, after_id: int = 0) -> list[tuple[float, int]]:
    """(ratio, raw verdict state) of every check of ``rule`` recorded after export row
    ``after_id``: the verdict *before* the alert state machine's hysteresis."""
    out = []
    for (line,) in query(cfg, "SELECT line FROM export_outbox WHERE id > ? AND line LIKE ?"
                              " ORDER BY id", (after_id, f"energy_rule,%rule={rule},%")):
        fields = dict(kv.split("=", 1) for kv in line.split(" ")[1].split(","))
        out.append((float(fields["ratio"]), int(fields["state"].rstrip("i"))))
    return out


def outbox_top(cfg: Path) -> int:
    return count(cfg, "SELECT coalesce(max(id), 0) FROM export_outbox")


@pytest.mark.slow
def test_power_cap_flapping_around_its_limit_fires_once_and_resolves_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    limit_kw = 36.0
    body = f"""
{CHECKS}
[[sources]]
topic = "site/+/reading"
format = "json"

[[rules]]
id = "power"
kind = "power_cap"
scope = "site"
limit_kw = {limit_kw}
window_s = 6
warn_at = [0.9]
clear_below = 0.8
hold_s = 3
"""
    cfg = write_config(tmp_path / "d.toml", broker.port, body, unrated_max_kw=1e12)
    presence = Presence(broker.port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port, "power-pub")
    step_s = 0.25

    def run(seconds: float, ratio_of: Any) -> None:
        """Publish every ``step_s`` for ``seconds``; power = limit x ratio_of(t)."""
        t0 = time.monotonic()
        while (t := time.monotonic() - t0) < seconds:
            kw = limit_kw * ratio_of(t)
            meter.send(kw * step_s / 3600.0, power_w=kw * 1000.0)
            time.sleep(max(0.0, t0 + t + step_s - time.monotonic()))

    try:
        presence.wait_online()
        meter = Meter(pub, "p1", "site/p1/reading")
        meter.send()  # baseline
        wait_for(lambda: committed(cfg, "p1") == 1, 30, what="baseline committed")

        # 1.7 x the limit until the breach fires
        deadline = time.monotonic() + 20
        while not any(s == "critical" for _, _, s, _ in events(cfg, "power")):
            assert time.monotonic() < deadline, "no breach after 20 s at 1.7 x the limit"
            run(0.5, lambda t: 1.7)
        fired = events(cfg, "power")

        # flapping: 2 s at 1.7 x, 2 s at 0.2 x (mean 0.95 x); the 6 s average swings
        # between ~0.7 and ~1.2 of the limit, so the raw verdict flaps
        mark = outbox_top(cfg)
        run(12.0, lambda t: 1.7 if int(t / 2) % 2 else 0.2)
        flap = verdicts(cfg, "power", mark)
        assert events(cfg, "power") == fired, "no event while flapping"
        states = {s for _, s in flap}
        assert 2 in states and states & {0, 1}, f"the raw verdict did not flap: {flap}"
        assert min(r for r, _ in flap) < 0.9 and max(r for r, _ in flap) >= 1.0, flap
        assert query(cfg, "SELECT state FROM alert_state WHERE rule = 'power'") == [("breach",)]

        # clearly below: resolved once the ratio stayed under 0.8 for hold_s
        deadline = time.monotonic() + 20
        while events(cfg, "power")[-1][1] != "alert.resolved":
            assert time.monotonic() < deadline, "not resolved after 20 s at 0.2 x the limit"
            run(0.5, lambda t: 0.2)
        run(2.0, lambda t: 0.2)
        wait_checks(cfg, 2)
        kinds = [(k, s) for _, k, s, _ in events(cfg, "power")]
        # the way up may pass the 0.9 warning level at one check
        assert kinds in (
            [("alert.firing", "critical"), ("alert.resolved", "info")],
            [("alert.firing", "warning"), ("alert.firing", "critical"),
             ("alert.resolved", "info")],
        ), kinds
        assert query(cfg, "SELECT state FROM alert_state WHERE rule = 'power'") == [("ok",)]
    finally:
        stop_client(pub)
        presence.close()
        daemon.kill()


@pytest.mark.parametrize("into_bucket_s", [5.0, 450.0, 895.0])
def test_power_cap_average_of_a_steady_load_is_its_power_anywhere_in_the_quarter_hour(
    tmp_path: Path, into_bucket_s: float
) -> None:
    """Intake -> store -> check, in process, at a fixed ``now``: a steady 100 kW meter
    averages 100 kW over 60 s, 900 s and 1800 s windows wherever ``now`` falls in the
    store's 15-min ledger bucket (the bucket in progress is only partly filled)."""
    cfg = config.parse({
        "site": {"id": "w", "category": "legal_entity"},
        "storage": {"path": str(tmp_path / "w.db")},
        "sources": [{"topic": "w/+", "format": "json"}],
        "rules": [{"id": f"p{w}", "kind": "power_cap", "limit_kw": 200.0, "window_s": w}
                  for w in (60, 900, 1800)],
    })
    store = Store(cfg.storage.path)
    intake = Intake(cfg, store, Metrics())
    now = 1_790_000_000 // 900 * 900 + into_bucket_s
    t, counter, step_s = now - 3600.0, 500.0, 10.0
    while t <= now:
        msg = json.dumps({"meter": "m", "ts": t, "energy_kwh": round(counter, 9),
                          "power_w": 100_000.0})
        intake.handle([Message("w/m", msg.encode(), t)])
        t, counter = t + step_s, counter + 100.0 * step_s / 3600.0
    got = {v.rule: v.value for v in Checker(cfg, Metrics(), None).run(store, now).verdicts}
    store.close()
    assert got == {"p60": pytest.approx(100.0), "p900": pytest.approx(100.0),
                   "p1800": pytest.approx(100.0)}


# --------------------------------------------------------------------------- stale data


class Ticker:
    """Calls ``fn`` every ``every_s`` on a thread while ``on`` is set."""

    def __init__(self, fn: Any, every_s: float = 0.4) -> None:
        self.fn = fn
        self.every_s = every_s
        self.on = threading.Event()
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.on.is_set():
                try:
                    self.fn()
                except Exception as exc:
                    self.errors.append(exc)
            self.done.wait(self.every_s)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        assert not self.errors, self.errors


def tasmota_sensor(pub: paho.Client, topic: str, total_kwh: float, power_w: float) -> None:
    body = {"Time": dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
            "ENERGY": {"Total": round(total_kwh, 3), "Power": power_w, "Voltage": 230}}
    pub.publish(f"tele/{topic}/SENSOR", json.dumps(body), qos=1).wait_for_publish(10)


def meter_state(cfg: Path, meter: str) -> str:
    return str(next(m["state"] for m in status_json(cfg)["meters"] if m["id"] == meter))


def scoped(cfg: Path, rule: str) -> list[tuple[str, str]]:
    return [(k, b["scope"]) for _, k, _, b in events(cfg, rule)]


@pytest.mark.slow
def test_stale_meter_is_announced_once_and_recovers_and_a_last_will_marks_it_offline(
    broker: Mosquitto, tmp_path: Path
) -> None:
    body = f"""
{CHECKS}
[intake]
expected_interval_s = 1

[[sources]]
topic = "site/+/reading"
format = "json"

[[sources]]
topic = "tele/#"
format = "tasmota"

[[rules]]
id = "silence"
kind = "stale_data"
scope = "site"
max_silence_s = 2
"""
    cfg = write_config(tmp_path / "d.toml", broker.port, body, unrated_max_kw=1e12)
    presence = Presence(broker.port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port, "stale-pub")
    json_meter = Meter(pub, "s1", "site/s1/reading")
    total = [10.0]

    def pow9() -> None:
        total[0] += 0.001
        tasmota_sensor(pub, "pow9", total[0], 120.0)

    s1 = Ticker(lambda: json_meter.send(0.001))
    p9 = Ticker(pow9)
    try:
        presence.wait_online()
        s1.on.set()
        p9.on.set()
        wait_for(lambda: committed(cfg, "s1") >= 3 and committed(cfg, "tasmota/pow9") >= 3, 30,
                 what="both meters reporting")
        wait_checks(cfg, 3)
        assert events(cfg, "silence") == [], "nobody is silent yet"

        # s1 goes quiet: announced once, however many checks see it silent
        s1.on.clear()
        wait_for(lambda: scoped(cfg, "silence") == [("meter.stale", "meter:s1")], 20,
                 what="s1 stale")
        wait_checks(cfg, 3)
        assert scoped(cfg, "silence") == [("meter.stale", "meter:s1")]
        stale_body = events(cfg, "silence")[0][3]
        assert stale_body["unit"] == "s" and stale_body["value"] > 2.0
        assert "s1 silent for" in stale_body["message"]
        assert meter_state(cfg, "s1") == "stale"
        assert query(cfg, "SELECT state FROM alert_state WHERE rule = 'silence'") == [
            ("warning",)]

        # s1 reports again: recovered once, and the rule is back to ok
        s1.on.set()
        wait_for(lambda: len(scoped(cfg, "silence")) >= 3, 20, what="s1 recovered")
        wait_checks(cfg, 3)
        assert scoped(cfg, "silence") == [
            ("meter.stale", "meter:s1"), ("meter.recovered", "meter:s1"),
            ("alert.resolved", "site")]
        assert meter_state(cfg, "s1") == "ok"

        # the Tasmota device's last will: offline in status, announced as such
        p9.on.clear()
        pub.publish("tele/pow9/LWT", "Offline", qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: meter_state(cfg, "tasmota/pow9") == "offline", 20,
                 what="pow9 offline in status --json")
        wait_for(lambda: len(scoped(cfg, "silence")) >= 4, 20, what="pow9 announced")
        _, kind, _, offline = events(cfg, "silence")[3]
        assert (kind, offline["scope"]) == ("meter.stale", "meter:tasmota/pow9")
        assert "offline" in offline["message"]
        power = {m["id"]: m["power_w"] for m in status_json(cfg)["meters"]}
        assert power["tasmota/pow9"] is None, "an offline meter's last power is not carried"

        # back online and reporting
        pub.publish("tele/pow9/LWT", "Online", qos=1, retain=True).wait_for_publish(10)
        p9.on.set()
        wait_for(lambda: meter_state(cfg, "tasmota/pow9") == "ok", 20, what="pow9 ok again")
        wait_for(lambda: len(scoped(cfg, "silence")) >= 6, 20, what="pow9 recovered")
        wait_checks(cfg, 2)
        assert scoped(cfg, "silence")[3:] == [
            ("meter.stale", "meter:tasmota/pow9"), ("meter.recovered", "meter:tasmota/pow9"),
            ("alert.resolved", "site")]
    finally:
        s1.close()
        p9.close()
        stop_client(pub)
        presence.close()
        daemon.kill()


# --------------------------------------------------------------------------- status --json

METER_KEYS = {"id", "group", "format", "last_seen", "power_w", "period_kwh", "state"}
RULE_KEYS = {"id", "scope", "state", "value", "limit", "unit", "projected"}


def check_status_shape(st: dict[str, Any], site: str, tz: str) -> None:
    """The SPEC ``status --json`` shape (extra keys are allowed: the page's additions)."""
    assert {"site", "period", "now", "totals", "meters", "rules"} <= set(st)
    assert st["site"] == site
    now = dt.datetime.fromisoformat(st["now"].replace("Z", "+00:00"))
    assert st["now"].endswith("Z") and abs(now.timestamp() - time.time()) < 60
    assert st["period"] == now.astimezone(ZoneInfo(tz)).strftime("%Y-%m")
    assert set(st["totals"]) == {"period_kwh", "power_w"}
    for m in st["meters"]:
        assert set(m) >= METER_KEYS, m
        assert m["state"] in ("ok", "stale", "offline")
    for r in st["rules"]:
        assert set(r) >= RULE_KEYS, r
        assert r["state"] in ("ok", "warning", "breach")
    assert st["totals"]["period_kwh"] == pytest.approx(sum(m["period_kwh"]
                                                           for m in st["meters"]))
    assert st["totals"]["power_w"] == pytest.approx(sum(m["power_w"] or 0.0
                                                        for m in st["meters"]))


def test_status_json_while_running_and_after_stop(broker: Mosquitto, tmp_path: Path) -> None:
    tz = midday_zone()
    body = f"""
{CHECKS}
[[sources]]
topic = "site/+/reading"
format = "json"

[[sources]]
topic = "tele/#"
format = "tasmota"

[[meters]]
id = "rack-07"
device = "rack-07"
group = "hall-a"

[[meters]]
id = "rack-09"
device = "tasmota/pow9"
group = "hall-b"

[[rules]]
id = "month-cap"
kind = "energy_cap"
period = "calendar_month"
limit_kwh = 1000

[[rules]]
id = "hall-a-day"
kind = "energy_cap"
period = "calendar_day"
scope = "group:hall-a"
limit_kwh = 0.35
warn_at = [0.8]

[[rules]]
id = "silence"
kind = "stale_data"
max_silence_s = 600
"""
    cfg = write_config(tmp_path / "d.toml", broker.port, body, site="st-01", tz=tz,
                       unrated_max_kw=1e12)
    presence = Presence(broker.port, "st-01")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    pub = publisher(broker.port, "status-pub")
    try:
        presence.wait_online()
        rack7 = Meter(pub, "rack-07", "site/rack-07/reading", power_w=3250.0)
        for _ in range(4):  # baseline + 0.3 kWh
            last7 = rack7.send(0.0 if rack7.sent == 0 else 0.1)
        t9 = time.time()
        tasmota_sensor(pub, "pow9", 5.0, 150.0)
        tasmota_sensor(pub, "pow9", 5.2, 150.0)
        wait_for(lambda: committed(cfg, "rack-07") == 4 and committed(cfg, "rack-09") == 2, 30,
                 what="readings committed")
        wait_for(lambda: {r["id"]: r["state"] for r in status_json(cfg)["rules"]}.get(
            "hall-a-day") == "warning", 20, what="hall-a-day warning")
        wait_checks(cfg, 3)

        running = status_json(cfg)
        check_status_shape(running, "st-01", tz)
        meters = {m["id"]: m for m in running["meters"]}
        assert set(meters) == {"rack-07", "rack-09"}
        assert {k: meters["rack-07"][k] for k in METER_KEYS - {"last_seen"}} == {
            "id": "rack-07", "group": "hall-a", "format": "json",
            "power_w": 3250.0, "period_kwh": pytest.approx(0.3), "state": "ok"}
        # the reading's own time, to the millisecond it was sent with
        assert parse_rfc3339(meters["rack-07"]["last_seen"]) == pytest.approx(last7, abs=2e-3)
        r9 = meters["rack-09"]
        assert (r9["group"], r9["format"], r9["power_w"], r9["state"]) == (
            "hall-b", "tasmota", 150.0, "ok")
        assert r9["period_kwh"] == pytest.approx(0.2)
        seen9 = dt.datetime.fromisoformat(r9["last_seen"].replace("Z", "+00:00")).timestamp()
        assert t9 - 1 <= seen9 <= time.time()  # Tasmota readings are stamped on receipt
        assert running["totals"] == {"period_kwh": pytest.approx(0.5), "power_w": 3400.0}
        rules = {r["id"]: r for r in running["rules"]}
        assert set(rules) == {"month-cap", "hall-a-day", "silence"}
        assert rules["month-cap"]["scope"] == "site" and rules["month-cap"]["state"] == "ok"
        assert rules["month-cap"]["value"] == pytest.approx(0.5)
        assert (rules["month-cap"]["limit"], rules["month-cap"]["unit"]) == (1000, "kWh")
        assert rules["month-cap"]["projected"] >= 0.5
        day = rules["hall-a-day"]
        assert (day["scope"], day["state"], day["limit"], day["unit"]) == (
            "group:hall-a", "warning", 0.35, "kWh")
        assert day["value"] == pytest.approx(0.3)
        silence = rules["silence"]
        assert (silence["scope"], silence["state"], silence["unit"], silence["limit"]) == (
            "site", "ok", "s", 600)
        assert silence["projected"] is None

        assert daemon.stop() == 0
        stopped = status_json(cfg)
        check_status_shape(stopped, "st-01", tz)
        assert stopped["meters"] == running["meters"], "nothing changed since"
        assert stopped["totals"] == running["totals"]
        assert [(r["id"], r["state"], r["value"]) for r in stopped["rules"]] == [
            (r["id"], r["state"], r["value"]) for r in running["rules"]]
    finally:
        stop_client(pub)
        presence.close()
        daemon.kill()

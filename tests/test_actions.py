"""Orders end to end against a real mosquitto and a real SQLite store.

The daemon's side is a real :class:`monitor.intake.mqtt.MqttLink` publishing for
:class:`monitor.act.orders.Actions`; an observer subscribed to ``#`` sees what
went over the wire, and a small device simulator obeys (or ignores) the
commands by writing the meters' power into table ``meters``, as the intake
would after the devices' next reports.  Time is an injected clock: waits for
messages are bounded real-time waits, never assertions about wall-clock time.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from monitor.act.orders import Actions
from monitor.config import Config, parse
from monitor.core.verdict import Verdict
from monitor.intake.flow import IntakeQueue
from monitor.intake.mqtt import MqttLink
from monitor.metrics import Metrics
from monitor.outputs import webhooks
from monitor.store import audit
from monitor.store.db import transaction
from monitor.store.ledger import Store
from tests.servers import Mosquitto

SITE = "irk-01"
ORDERS = f"energy-monitor/{SITE}/orders"
T0 = 1_795_000_000.0  # 2026-11-18, any fixed instant will do

RATED_W = {"rack-01": 3000.0, "rack-02": 2500.0, "rack-03": 1000.0, "rack-04": 500.0,
           "rack-05": 800.0, "rack-06": 200.0}

# device-native command topics of the meters that have a `control`
COMMAND_TOPICS = {
    "cmnd/pow1/POWER": "rack-01",
    "shellies/sh2/relay/0/command": "rack-02",
    "pro3/rpc": "rack-03",
    "zigbee2mqtt/plug4/set": "rack-04",
    "devices/rack-05/cmd": "rack-05",
}


def make_config(tmp_path: Path, port: int = 1883, **actions: Any) -> Config:
    return parse({
        "site": {"id": SITE, "timezone": "Asia/Irkutsk", "category": "individual"},
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": f"test-actions-{port}"},
        "sources": [{"topic": "tele/+/SENSOR", "format": "tasmota"}],
        "meters": [
            {"id": "rack-01", "device": "tasmota/pow1", "group": "hall-a", "rated_kw": 3.5,
             "control": {"kind": "tasmota", "topic": "cmnd/pow1/POWER"}},
            {"id": "rack-02", "device": "shelly/sh2:0", "group": "hall-a",
             "control": {"kind": "shelly_gen1", "topic": "shellies/sh2/relay/0/command"}},
            {"id": "rack-03", "device": "shelly/pro3:0", "group": "hall-b",
             "control": {"kind": "shelly_gen2", "topic": "pro3", "channel": 0}},
            {"id": "rack-04", "device": "zigbee2mqtt/plug4", "group": "hall-b",
             "control": {"kind": "zigbee2mqtt", "topic": "zigbee2mqtt/plug4"}},
            {"id": "rack-05", "device": "rack-05", "group": "hall-c",
             "control": {"kind": "json", "topic": "devices/rack-05/cmd"}},
            {"id": "rack-06", "device": "esphome/node6/power", "group": "hall-c"},
        ],
        "rules": [
            {"id": "monthly-cap", "kind": "energy_cap", "limit_kwh": 6000,
             "scope": "group:hall-a", "on_breach": ["alert", "shutdown"]},
            {"id": "rack-01-cap", "kind": "power_cap", "limit_kw": 3, "scope": "meter:rack-01",
             "on_breach": ["alert", "shutdown"]},
            {"id": "curtail", "kind": "curtailment", "topic": "grid/curtail", "scope": "site"},
        ],
        "storage": {"path": str(tmp_path / "monitor.db")},
        "actions": actions,
    })


class Clock:
    """The injected clock: tests move it by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def seed_meters(conn: sqlite3.Connection, at: float = T0 - 30,
                power: Mapping[str, float] = RATED_W) -> None:
    """Meters as the intake leaves them: every one drawing, last seen before T0."""
    with transaction(conn):
        conn.executemany(
            "INSERT INTO meters (id, device, grp, last_seen, power_w) VALUES (?, ?, '', ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen,"
            " power_w = excluded.power_w", [(m, m, at, w) for m, w in power.items()])


def set_power(db: Path, meter: str, power_w: float, at: float) -> None:
    conn = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    try:
        conn.execute("UPDATE meters SET power_w = ?, last_seen = ? WHERE id = ?",
                     (power_w, at, meter))
    finally:
        conn.close()


def events(conn: sqlite3.Connection, kind: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT body FROM events ORDER BY id").fetchall()
    out = [json.loads(r[0]) for r in rows]
    return [e for e in out if kind is None or e["kind"] == kind]


def audit_kinds(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT kind FROM audit ORDER BY seq")]


def verdict(rule: str, scope: str, *, target_kw: float | None = None) -> Verdict:
    return Verdict(rule=rule, kind="energy_cap", scope=scope, state="breach", level=1.0,
                   value=6012.4, limit=6000.0, unit="kWh", ratio=1.002, projected=6400.0,
                   seconds_to_limit=0.0, period="2026-11",
                   message="month-to-date 6012.4 kWh > limit 6000 kWh", meters=(),
                   target_kw=target_kw)


# --------------------------------------------------------------------------- MQTT helpers


@dataclass
class Bus:
    """An observer subscribed to ``#``; ``hooks`` see every message on paho's thread."""

    port: int
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    hooks: list[Callable[[str, bytes], None]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{self.port}")
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        for hook in self.hooks:
            hook(m.topic, bytes(m.payload))
        with self.cond:
            self.messages.append((m.topic, bytes(m.payload)))
            self.cond.notify_all()

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "observer did not subscribe"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, pred: Callable[[list[tuple[str, bytes]]], bool],
                 timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; seen: {self.orders_and_commands()}"
                self.cond.wait(left)
            return list(self.messages)

    def on(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def orders(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on(ORDERS)]

    def orders_and_commands(self) -> list[tuple[str, bytes]]:
        with self.cond:
            return [(t, p) for t, p in self.messages
                    if t == ORDERS or t in COMMAND_TOPICS or t.startswith("sentinel")]

    def settle(self, link: MqttLink, name: str = "sentinel") -> None:
        """Publish a sentinel on the daemon's own connection and wait for it: everything
        the daemon published before has arrived (MQTT keeps one client's order)."""
        topic = f"{name}/{time.monotonic_ns()}"
        link.publish(topic, b"x", 1, False)
        self.wait_for(lambda msgs: any(t == topic for t, _ in msgs))


class Devices:
    """Relays that obey their device commands (and, for meters without one, the order
    JSON, like a site controller would): they write the meter's power as the intake
    would after the device's next report, ``report_after_s`` later on the injected clock.
    Relays that do not obey keep reporting the power they drew."""

    def __init__(self, db: Path, clock: Clock, *, obey: bool = True,
                 report_after_s: float = 2.0) -> None:
        self.db, self.clock, self.obey, self.report_after_s = db, clock, obey, report_after_s
        self.received: list[tuple[str, str]] = []  # (meter, "on"|"off")
        self.applied = threading.Condition()
        self.controlled = set(COMMAND_TOPICS.values())

    def __call__(self, topic: str, payload: bytes) -> None:
        switched: list[tuple[str, bool]] = []
        if topic in COMMAND_TOPICS:
            switched.append((COMMAND_TOPICS[topic], self._decode(topic, payload)))
        elif topic == ORDERS:
            order = json.loads(payload)
            on = order["action"] == "resume"
            switched += [(m, on) for m in order["meters"] if m not in self.controlled]
        for meter, on in switched:
            drawing = on or not self.obey
            set_power(self.db, meter, RATED_W[meter] if drawing else 0.0,
                      self.clock() + self.report_after_s)
            with self.applied:
                self.received.append((meter, "on" if on else "off"))
                self.applied.notify_all()

    @staticmethod
    def _decode(topic: str, payload: bytes) -> bool:
        text = payload.decode()
        if topic.endswith("/POWER"):
            return text == "ON"
        if topic.endswith("/command"):
            return text == "on"
        data = json.loads(text)
        if topic.endswith("/rpc"):
            assert data["method"] == "Switch.Set"
            return bool(data["params"]["on"])
        if topic.endswith("/set"):
            return bool(data["state"] == "ON")
        return bool(data["action"] == "resume")

    def wait(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout_s
        with self.applied:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"devices got only {self.received}"
                self.applied.wait(left)
            return list(self.received)


@dataclass
class Rig:
    config: Config
    store: Store
    actions: Actions
    bus: Bus
    link: MqttLink
    clock: Clock
    devices: Devices

    @property
    def conn(self) -> sqlite3.Connection:
        return self.store.conn

    def publish(self, at: float | None = None) -> int:
        if at is not None:
            self.clock.t = at
        sent = self.actions.publish_pending(self.conn)
        self.bus.settle(self.link)
        return sent

    def verify(self, at: float) -> Any:
        self.clock.t = at
        with transaction(self.conn):
            return self.actions.verify(self.conn, at)


def make_emit(config: Config, clock: Callable[[], float]
              ) -> Callable[[sqlite3.Connection, dict[str, Any]], object]:
    def emit(conn: sqlite3.Connection, event: dict[str, Any]) -> object:
        return webhooks.enqueue(conn, event, config.webhooks, clock())

    return emit


@pytest.fixture
def rig_factory(broker: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(obey: bool = True, **actions: Any) -> Rig:
        config = make_config(tmp_path, broker.port, **actions)
        clock = Clock()
        store = Store(config.storage.path)
        seed_meters(store.conn)
        bus = Bus(broker.port)
        devices = Devices(config.storage.path, clock, obey=obey)
        bus.hooks.append(devices)
        bus.start()
        link = MqttLink(config, IntakeQueue(10), Metrics(), [])
        link.start()
        assert link.connected.wait(10), "MqttLink did not connect"
        act = Actions(config, link.publish, make_emit(config, clock), clock=clock,
                      connected=link.connected.is_set)
        rig = Rig(config, store, act, bus, link, clock, devices)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.link.close()
        rig.bus.stop()
        rig.store.close()


# --------------------------------------------------------------------------- tests


def test_breach_orders_exactly_the_scope_with_order_json_and_device_commands(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    with transaction(rig.conn):
        issued = rig.actions.apply(rig.conn, verdict("monthly-cap", "group:hall-a"),
                                   ("alert", "shutdown"), False, T0)
    assert len(issued) == 1
    order = issued[0]
    assert (order.action, order.scope, order.meters, order.state) == (
        "shutdown", "group:hall-a", ("rack-01", "rack-02"), "pending")
    assert order.deadline == T0 + rig.config.actions.confirm_within_s

    assert rig.publish() == 1
    [wire] = rig.bus.orders()
    assert wire == {"order_id": order.order_id, "action": "shutdown", "scope": "group:hall-a",
                    "meters": ["rack-01", "rack-02"], "rule": "monthly-cap",
                    "reason": "month-to-date 6012.4 kWh > limit 6000 kWh",
                    "issued_at": "2026-11-18T11:06:40Z", "attempt": 1}
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    assert rig.bus.on("shellies/sh2/relay/0/command") == [b"off"]
    commanded = {t for t, _ in rig.bus.orders_and_commands() if t in COMMAND_TOPICS}
    assert commanded == {"cmnd/pow1/POWER", "shellies/sh2/relay/0/command"}

    # recorded: the order, its publication, the audit entry and the event
    row = rig.conn.execute("SELECT state, publish_due, published_at, dry_run FROM orders"
                           " WHERE order_id = ?", (order.order_id,)).fetchone()
    assert row == ("pending", None, T0, 0)
    assert audit_kinds(rig.conn) == ["order.issued"]
    assert audit.verify(rig.conn).ok
    [ev] = events(rig.conn, "order.issued")
    assert ev["severity"] == "warning" and ev["site"] == SITE and ev["rule"] == "monthly-cap"
    assert ev["order_id"] == order.order_id and ev["action"] == "shutdown"
    assert ev["meters"] == ["rack-01", "rack-02"]
    assert (ev["value"], ev["limit"], ev["unit"], ev["period"]) == (6012.4, 6000.0, "kWh",
                                                                   "2026-11")
    assert ev["at"] == "2026-11-18T11:06:40Z"

    # published once: a second call sends nothing more
    assert rig.publish() == 0
    assert len(rig.bus.orders()) == 1


def test_site_shutdown_speaks_every_device_dialect(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    with transaction(rig.conn):
        order = rig.actions.order(rig.conn, "shutdown", "site", "ban", "ban window", T0)
    assert order is not None
    assert order.meters == ("rack-01", "rack-02", "rack-03", "rack-04", "rack-05", "rack-06")
    rig.publish()
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    assert rig.bus.on("shellies/sh2/relay/0/command") == [b"off"]
    assert [json.loads(p) for p in rig.bus.on("pro3/rpc")] == [
        {"id": 1, "src": "energy-monitor", "method": "Switch.Set",
         "params": {"id": 0, "on": False}}]
    assert [json.loads(p) for p in rig.bus.on("zigbee2mqtt/plug4/set")] == [{"state": "OFF"}]
    assert [json.loads(p) for p in rig.bus.on("devices/rack-05/cmd")] == [
        {"action": "shutdown", "meter": "rack-05", "order_id": order.order_id}]
    # rack-06 has no control: it is only in the order JSON (for a site controller)
    assert rig.bus.orders()[0]["meters"][-1] == "rack-06"


def test_dry_run_records_and_reports_but_publishes_nothing(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(mode="dry_run", confirm_within_s=60, max_resends=1)
    with transaction(rig.conn):
        order = rig.actions.order(rig.conn, "shutdown", "site", "ban", "ban window", T0)
        limit = rig.actions.order(rig.conn, "limit", "site", "curtail", "grid asks", T0,
                                  target_kw=1.0)
    assert order is not None and order.state == "dry_run" and order.dry_run
    assert limit is None  # the dry-run shutdown already holds every meter (as 0 W)
    assert rig.actions.publish_pending(rig.conn) == 0
    for at in (T0 + 61, T0 + 122, T0 + 183):
        assert not rig.verify(at)
    assert rig.actions.publish_pending(rig.conn) == 0
    rig.bus.settle(rig.link)
    assert [t for t, _ in rig.bus.orders_and_commands() if not t.startswith("sentinel")] == []
    assert rig.devices.received == []
    row = rig.conn.execute("SELECT state, dry_run, publish_due, published_at FROM orders"
                           ).fetchall()
    assert row == [("dry_run", 1, None, None)]
    [ev] = events(rig.conn, "order.issued")
    assert ev["dry_run"] is True and ev["message"].startswith("[dry run, not sent]")
    assert events(rig.conn, "order.failed") == []
    # the same request again is a duplicate of the recorded dry-run order
    with transaction(rig.conn):
        assert rig.actions.order(rig.conn, "shutdown", "site", "ban", "ban window",
                                 T0 + 200) is None


def test_obeying_devices_confirm_then_a_meter_drawing_again_alerts_once(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(confirm_within_s=120)
    with transaction(rig.conn):
        order = rig.actions.order(rig.conn, "shutdown", "group:hall-b", "monthly-cap",
                                  "over the cap", T0)
    assert order is not None
    rig.publish()
    assert sorted(rig.devices.wait(2)) == [("rack-03", "off"), ("rack-04", "off")]

    progress = rig.verify(T0 + 10)
    assert progress.confirmed == [order.order_id]
    assert rig.actions.get(rig.conn, order.order_id).state == "confirmed"  # type: ignore[union-attr]
    [ev] = events(rig.conn, "order.confirmed")
    assert ev["severity"] == "info" and ev["meters"] == ["rack-03", "rack-04"]

    # someone switches rack-04 back on by hand
    set_power(rig.config.storage.path, "rack-04", 480.0, T0 + 300)
    progress = rig.verify(T0 + 305)
    assert progress.violations == [(order.order_id, "rack-04")]
    [alert] = events(rig.conn, "alert.firing")
    assert alert["severity"] == "critical"
    assert alert["message"].startswith("meter rack-04 draws 480 W after confirmed shutdown")
    assert not rig.verify(T0 + 400)  # remembered: once
    assert len(events(rig.conn, "alert.firing")) == 1
    assert audit_kinds(rig.conn) == ["order.issued", "order.confirmed", "order.violation"]


def test_ignoring_devices_are_re_sent_then_the_order_fails_critical(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(obey=False, confirm_within_s=60, max_resends=2)
    with transaction(rig.conn):
        order = rig.actions.order(rig.conn, "shutdown", "meter:rack-01", "rack-01-cap",
                                  "3.2 kW > 3 kW", T0)
    assert order is not None
    rig.publish()
    assert not rig.verify(T0 + 59)  # before the deadline: nothing
    for attempt, at in ((2, T0 + 60), (3, T0 + 121)):
        progress = rig.verify(at)
        assert progress.resent == [order.order_id]
        rig.publish()
        assert rig.bus.orders()[-1]["attempt"] == attempt
    progress = rig.verify(T0 + 182)
    assert progress.failed == [order.order_id]
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"] * 3  # 1 + max_resends
    got = rig.actions.get(rig.conn, order.order_id)
    assert got is not None and (got.state, got.resends) == ("failed", 2)
    [ev] = events(rig.conn, "order.failed")
    assert ev["severity"] == "critical" and ev["order_id"] == order.order_id
    assert "rack-01 draws 3000 W" in ev["message"]
    assert audit_kinds(rig.conn) == ["order.issued", "order.resent", "order.resent",
                                     "order.failed"]
    # failed is final for re-sends; nothing more goes out
    assert not rig.verify(T0 + 400)
    assert rig.publish() == 0
    # but a late switch-off is still recognised
    set_power(rig.config.storage.path, "rack-01", 3.0, T0 + 500)
    assert rig.verify(T0 + 501).confirmed == [order.order_id]
    assert "late" in events(rig.conn, "order.confirmed")[0]["message"]


def test_rate_limit_refuses_records_and_reports_once(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_orders_per_hour=2)
    scope = "meter:rack-01"
    got = []
    for action, at in (("shutdown", T0), ("resume", T0 + 60), ("shutdown", T0 + 120),
                       ("shutdown", T0 + 180)):
        with transaction(rig.conn):
            got.append(rig.actions.order(rig.conn, action, scope, "rack-01-cap", "r", at))
        rig.publish(at=at)
    first, second, third, again = got
    assert first is not None and second is not None and third is not None
    assert third.state == "refused"
    assert again is not None and again.order_id == third.order_id
    assert again.data["repeats"] == 1
    [ev] = events(rig.conn, "order.failed")
    assert ev["severity"] == "critical" and "REFUSED" in ev["message"]
    assert "2026-11-18T12:06:40Z" in ev["message"]  # when the window reopens
    assert "order.refused" in audit_kinds(rig.conn)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF", b"ON"]  # the refused one never went out

    # an hour after the first order there is room again
    with transaction(rig.conn):
        later = rig.actions.order(rig.conn, "shutdown", scope, "rack-01-cap", "r", T0 + 3601)
    assert later is not None and later.state == "pending"
    # an operator's resume is never refused (it still counts)
    with transaction(rig.conn):
        op = rig.actions.resume(rig.conn, scope, T0 + 3602)
        op2 = rig.actions.resume(rig.conn, scope, T0 + 3603)
    assert op.state == "sent" and op2.state == "sent"


def test_limit_order_sheds_priority_groups_then_largest_meters(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(shed_priority=["hall-c"])
    # site draws 8.0 kW; curtailment to 5 kW: hall-c (1.0 kW) first, then rack-01 (3.0 kW)
    with transaction(rig.conn):
        order = rig.actions.apply(rig.conn, verdict("curtail", "site", target_kw=5.0),
                                  ("alert", "limit"), False, T0)[0]
    assert order.action == "limit" and order.target_kw == 5.0
    assert order.meters == ("rack-05", "rack-06", "rack-01")
    assert order.data["shed"] == {"before_w": 8000.0, "after_w": 4000.0, "reaches_target": True}
    rig.publish()
    [wire] = rig.bus.orders()
    assert wire["action"] == "limit" and wire["target_kw"] == 5.0
    assert wire["meters"] == ["rack-05", "rack-06", "rack-01"]
    commanded = {t for t, _ in rig.bus.orders_and_commands() if t in COMMAND_TOPICS}
    assert commanded == {"devices/rack-05/cmd", "cmnd/pow1/POWER"}
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    rig.devices.wait(3)
    assert rig.verify(T0 + 10).confirmed == [order.order_id]

    with transaction(rig.conn):
        # the same target again: the shed meters count as 0 W, nothing more to do
        assert rig.actions.order(rig.conn, "limit", "site", "curtail", "r", T0 + 20,
                                 target_kw=5.0) is None
        # a lower target sheds only what is missing
        tighter = rig.actions.order(rig.conn, "limit", "site", "curtail", "r", T0 + 30,
                                    target_kw=3.0)
    assert tighter is not None and tighter.meters == ("rack-02",)


def test_auto_resume_resumes_what_the_rule_shut_down(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(auto_resume=True)
    with transaction(rig.conn):
        shut = rig.actions.order(rig.conn, "shutdown", "group:hall-a", "monthly-cap", "r", T0)
    assert shut is not None
    rig.publish()
    rig.devices.wait(2)
    assert rig.verify(T0 + 10).confirmed == [shut.order_id]

    with transaction(rig.conn):
        [resumed] = rig.actions.apply(rig.conn, verdict("monthly-cap", "group:hall-a"),
                                      ("alert",), True, T0 + 100)
    assert (resumed.action, resumed.meters, resumed.state) == (
        "resume", ("rack-01", "rack-02"), "sent")
    rig.publish(at=T0 + 100)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF", b"ON"]
    assert rig.bus.on("shellies/sh2/relay/0/command") == [b"off", b"on"]
    rig.devices.wait(4)
    assert rig.verify(T0 + 110).confirmed == [resumed.order_id]
    # the shutdown is no longer in force: rack-01 drawing again is no violation
    assert events(rig.conn, "alert.firing") == []
    # clearing again finds nothing to resume
    with transaction(rig.conn):
        assert rig.actions.on_clear(rig.conn, "monthly-cap", "group:hall-a", T0 + 200) == []


def test_without_auto_resume_the_load_stays_off_and_the_operator_is_told(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(auto_resume=False)
    with transaction(rig.conn):
        shut = rig.actions.order(rig.conn, "shutdown", "group:hall-a", "monthly-cap", "r", T0)
        assert rig.actions.on_clear(rig.conn, "monthly-cap", "group:hall-a", T0 + 100) == []
    assert shut is not None
    rig.publish()
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    [held] = events(rig.conn, "order.held")
    assert held["severity"] == "info" and held["meters"] == ["rack-01", "rack-02"]
    assert "energy-monitor orders resume group:hall-a" in held["message"]


def test_auto_resume_keeps_meters_another_rule_still_holds(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(auto_resume=True)
    with transaction(rig.conn):
        rig.actions.order(rig.conn, "shutdown", "group:hall-a", "monthly-cap", "r", T0)
    rig.publish(at=T0)
    with transaction(rig.conn):
        rig.conn.execute("INSERT INTO alert_state (rule, scope, state) VALUES"
                         " ('rack-01-cap', 'meter:rack-01', 'breach')")
        [resumed] = rig.actions.on_clear(rig.conn, "monthly-cap", "group:hall-a", T0 + 100)
    assert resumed.meters == ("rack-02",)
    [held] = events(rig.conn, "order.held")
    assert held["meters"] == ["rack-01"] and "rule rack-01-cap still in breach" in held["message"]
    rig.publish(at=T0 + 100)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    assert rig.bus.on("shellies/sh2/relay/0/command") == [b"off", b"on"]


def test_operator_resume_is_audited_and_published(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    with transaction(rig.conn):
        rig.actions.order(rig.conn, "shutdown", "group:hall-b", "monthly-cap", "r", T0)
    rig.publish()
    with transaction(rig.conn):
        op = rig.actions.resume(rig.conn, "group:hall-b", T0 + 50, actor="operator:ivan")
    assert (op.action, op.actor, op.rule, op.meters) == ("resume", "operator:ivan", "",
                                                         ("rack-03", "rack-04"))
    rig.publish(at=T0 + 50)
    assert [json.loads(p)["params"]["on"] for p in rig.bus.on("pro3/rpc")] == [False, True]
    assert [json.loads(p) for p in rig.bus.on("zigbee2mqtt/plug4/set")] == [
        {"state": "OFF"}, {"state": "ON"}]
    entries = list(audit.iter_entries(rig.conn))
    assert [e.kind for e in entries] == ["order.issued", "operator.resume"]
    assert entries[1].body["actor"] == "operator:ivan"
    assert entries[1].body["order_id"] == op.order_id
    assert audit.verify(rig.conn).ok
    listed = rig.actions.list_orders(rig.conn, 10)
    assert [(o["action"], o["actor"]) for o in listed] == [("resume", "operator:ivan"),
                                                           ("shutdown", "daemon")]
    assert set(listed[0]) >= {"id", "action", "scope", "meters", "rule", "state", "issued_at",
                              "resends", "dry_run", "actor"}


def test_a_resume_supersedes_an_unconfirmed_shutdown(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(obey=False, confirm_within_s=60)
    with transaction(rig.conn):
        shut = rig.actions.order(rig.conn, "shutdown", "group:hall-a", "monthly-cap", "r", T0)
    assert shut is not None
    rig.publish()
    with transaction(rig.conn):
        rig.actions.resume(rig.conn, "meter:rack-02", T0 + 10)
    rig.publish(at=T0 + 10)
    # past the deadline the shutdown is re-sent only to the meter it still holds
    assert rig.verify(T0 + 61).resent == [shut.order_id]
    rig.publish()
    assert rig.bus.orders()[-1]["meters"] == ["rack-01"]
    assert rig.bus.on("shellies/sh2/relay/0/command") == [b"off", b"on"]
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF", b"OFF"]
    with transaction(rig.conn):
        rig.actions.resume(rig.conn, "meter:rack-01", T0 + 70)
    assert rig.verify(T0 + 71).superseded == [shut.order_id]
    rig.publish(at=T0 + 71)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF", b"OFF", b"ON"]


def test_an_unpublished_off_is_not_sent_after_the_on_that_superseded_it(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(auto_resume=True)
    with transaction(rig.conn):
        rig.actions.order(rig.conn, "shutdown", "group:hall-a", "monthly-cap", "r", T0)
        rig.actions.on_clear(rig.conn, "monthly-cap", "group:hall-a", T0 + 1)
    # both were due when the link came back: only the newer ON goes out
    assert rig.publish(at=T0 + 5) == 1
    assert rig.bus.on("cmnd/pow1/POWER") == [b"ON"]
    assert [o["action"] for o in rig.bus.orders()] == ["resume"]
    assert rig.conn.execute("SELECT count(*) FROM orders WHERE publish_due IS NOT NULL"
                            ).fetchone() == (0,)


def test_a_crash_between_commit_and_publish_is_published_on_restart(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    with transaction(rig.conn):
        order = rig.actions.order(rig.conn, "shutdown", "meter:rack-01", "rack-01-cap", "r", T0)
    assert order is not None
    # the process dies here; a new one (same store) publishes what is due
    restarted = Actions(rig.config, rig.link.publish, make_emit(rig.config, rig.clock),
                        clock=rig.clock)
    assert restarted.publish_pending(rig.conn) == 1
    rig.bus.settle(rig.link)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]
    assert [o["order_id"] for o in rig.bus.orders()] == [order.order_id]


def test_nothing_is_published_while_the_link_is_down(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    down = Actions(rig.config, rig.link.publish, make_emit(rig.config, rig.clock),
                   clock=rig.clock, connected=lambda: False)
    with transaction(rig.conn):
        down.order(rig.conn, "shutdown", "meter:rack-01", "rack-01-cap", "r", T0)
    assert down.publish_pending(rig.conn) == 0
    rig.bus.settle(rig.link)
    assert rig.bus.on("cmnd/pow1/POWER") == []
    assert rig.actions.publish_pending(rig.conn) == 1  # link up again: it goes out
    rig.bus.settle(rig.link)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]


def test_tick_verifies_and_publishes_re_sends(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(obey=False, confirm_within_s=30, max_resends=1)
    with transaction(rig.conn):
        rig.actions.order(rig.conn, "shutdown", "meter:rack-01", "rack-01-cap", "r", T0)
    rig.clock.t = T0 + 31
    progress = rig.actions.tick(rig.conn)
    assert len(progress.resent) == 1
    rig.bus.settle(rig.link)
    assert rig.bus.on("cmnd/pow1/POWER") == [b"OFF"]  # the first publication and the re-send
    assert [o["attempt"] for o in rig.bus.orders()] == [2]
